"""The atheris harnesses in fuzz/ still run against the current code: each replays its seed
inputs (libFuzzer's ``-runs=0`` executes a corpus once and stops), so an API change that breaks
a harness fails here and not first in ``./dev fuzz``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
TARGETS = ("commands", "data", "imap", "mime", "session")

pytest.importorskip("atheris", reason="atheris is in the test extras: pip install .[test]")


@pytest.mark.parametrize("target", TARGETS)
def test_harness_replays_its_seeds(target: str) -> None:
    seeds = sorted((FUZZ / "seeds" / target).iterdir())
    assert seeds, f"no seeds for {target}: run fuzz/seeds.py"
    # Files, not the folder: libFuzzer then runs each one and reports it by name.
    result = subprocess.run(
        [sys.executable, str(FUZZ / f"fuzz_{target}.py"), *map(str, seeds)],
        cwd=FUZZ,
        capture_output=True,
        text=True,
        timeout=300,  # only catches a hang
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"Executed {seeds[-1]}" in result.stderr, result.stderr[-3000:]

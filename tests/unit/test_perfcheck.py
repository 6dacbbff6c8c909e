"""benchmarks/perfcheck.py never drops a gate silently, and the build tools it depends on
are pinned.

The check itself (callgrind, Postfix) takes minutes and runs in `./dev test` after the
suite; these tests run the script where no measurement starts: with a PATH lacking
valgrind, it must fail at once, naming what it cannot measure.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
PERFCHECK = ROOT / "benchmarks" / "perfcheck.py"


def run_perfcheck(tmp_path: Path, require_all: str, *args: str) -> subprocess.CompletedProcess[str]:
    # An empty directory as PATH: no valgrind (sys.executable is an absolute path)
    env = {**os.environ, "PATH": str(tmp_path), "TACHYMAIL_REQUIRE_ALL": require_all}
    env.pop("TACHYMAIL_PURE", None)
    return subprocess.run(
        [sys.executable, str(PERFCHECK), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("require_all", "args"),
    [("1", ()), ("1", ("--allow-missing",)), ("", ()), ("", ("--update",))],
    ids=["ci", "ci-allow-missing", "no-ci", "no-ci-update"],
)
def test_without_valgrind_the_check_fails_naming_the_figures(
    tmp_path: Path, require_all: str, args: tuple[str, ...]
) -> None:
    done = run_perfcheck(tmp_path, require_all, *args)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED" in done.stderr
    assert "valgrind is not installed" in done.stderr
    for figure in (
        "kernel.canonical_body.instructions",
        "kernel.imap_fetch.instructions",
        "intake.worker_instructions_per_msg",
        "delivery.worker_instructions_per_msg",
    ):
        assert figure in done.stderr, done.stderr
    assert not (tmp_path / "perf-baseline.json").exists()


def test_outside_ci_the_failure_names_the_way_out(tmp_path: Path) -> None:
    done = run_perfcheck(tmp_path, "")
    assert done.returncode == 1
    assert "--allow-missing" in done.stderr


def test_build_tools_are_pinned_to_the_installed_versions() -> None:
    """An upstream Cython or setuptools release cannot change the compiled kernels."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    pins = {}
    for requirement in requires:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][0-9A-Za-z.]*)", requirement)
        assert match, f"{requirement!r} is not an exact pin"
        pins[match.group(1).lower()] = match.group(2)
    assert {"cython", "setuptools"} <= set(pins)
    for name, version in pins.items():
        assert importlib.metadata.version(name) == version, name
    # ./dev installs the build tools from this list, not from a list of its own
    dev = (ROOT / "dev").read_text()
    assert '["build-system"]["requires"]' in dev
    assert not re.search(r"pip install[^\n]*[Cc]ython", dev)

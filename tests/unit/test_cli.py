"""The `tachymail` console script as a user runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import tachymail


def tachymail_cmd() -> str:
    # The script installed next to this interpreter, else the one on PATH.
    beside = Path(sys.executable).with_name("tachymail")
    found = str(beside) if beside.exists() else shutil.which("tachymail")
    assert found, "the tachymail console script is not installed"
    return found


def test_version() -> None:
    out = subprocess.run([tachymail_cmd(), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"tachymail {tachymail.__version__}"


def test_help_describes_the_command() -> None:
    out = subprocess.run([tachymail_cmd(), "--help"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("usage: tachymail")
    assert "mail transfer agent" in out.stdout
    assert "TACHYMAIL_PURE" in out.stdout


def test_unknown_subcommand_fails() -> None:
    out = subprocess.run([tachymail_cmd(), "no-such-command"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "invalid choice" in out.stderr

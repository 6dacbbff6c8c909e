"""The installed package really runs the compiled hot path, and says so when it cannot."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = ("commands", "data", "mime", "imap")
REPO = Path(__file__).resolve().parents[2]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "TACHYMAIL_PURE"} | env
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO.parent,  # not the checkout, so `import tachymail` finds the installed package
        check=True,
    )


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_is_compiled_extension(kernel: str) -> None:
    compiled = importlib.import_module(f"tachymail.protocol._{kernel}")
    assert compiled.__file__ is not None
    assert compiled.__file__.endswith(".so"), compiled.__file__
    # The facade hands out the compiled objects, not the twin's.
    facade = importlib.import_module(f"tachymail.protocol.{kernel}")
    for name in compiled.__all__:
        assert getattr(facade, name) is getattr(compiled, name), name


def test_installed_package_is_not_the_source_tree() -> None:
    import tachymail

    if os.environ.get("TACHYMAIL_DEV_TREE") == "1":
        pytest.skip("TACHYMAIL_DEV_TREE=1: testing the source tree with in-place extensions")
    assert not Path(tachymail.__file__).resolve().is_relative_to(REPO / "src")


def test_info_reports_compiled_kernels() -> None:
    out = run_python("from tachymail.cli.main import main; main(['info'])").stdout
    assert "commands: compiled, data: compiled, mime: compiled, imap: compiled" in out


def test_pure_env_selects_the_twins() -> None:
    out = run_python(
        "from tachymail.cli.main import main; main(['info'])", TACHYMAIL_PURE="1"
    ).stdout
    assert "commands: pure, data: pure, mime: pure, imap: pure" in out


def test_missing_extension_falls_back_with_a_warning() -> None:
    # A None entry in sys.modules makes the import of the extension fail, as an unbuilt one would.
    code = (
        "import sys, warnings\n"
        "sys.modules['tachymail.protocol._data'] = None\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import tachymail.protocol.data as d\n"
        "print(d.DataReader.__module__)\n"
        "print([str(w.message) for w in caught if w.category is RuntimeWarning])\n"
    )
    out = run_python(code).stdout.splitlines()
    assert out[0] == "tachymail.protocol.data_py"
    assert "compiled kernel 'data' is not built" in out[1]

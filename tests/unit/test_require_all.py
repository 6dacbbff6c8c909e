"""TACHYMAIL_REQUIRE_ALL=1 turns skips into failures (tests/conftest.py), except the slow skip.

Each test runs a small test file in a fresh pytest (pytester) with a copy of the real
tests/conftest.py, once without and once with the variable.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).resolve().parent.parent / "conftest.py"

SKIPPING = """
import pytest

@pytest.fixture
def tool():
    pytest.skip("frobnicator is not installed")

def test_skips_in_test():
    pytest.skip("swaks is not installed")

def test_skips_in_fixture(tool):
    pass

def test_importorskip_in_test():
    pytest.importorskip("no_such_module_tachymail_test")

@pytest.mark.skip(reason="needs root")
def test_skip_marker():
    pass

@pytest.mark.slow
def test_slow():
    pass

def test_not_marked_slow():
    pytest.skip("slow test: set TACHYMAIL_SLOW=1 to run it")

@pytest.mark.xfail(reason="known")
def test_xfail():
    raise AssertionError

def test_passes():
    pass
"""

MODULE_IMPORTORSKIP = """
import pytest

missing = pytest.importorskip("no_such_module_tachymail_test")

def test_never_runs():
    pass
"""


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("TACHYMAIL_REQUIRE_ALL", raising=False)
    monkeypatch.delenv("TACHYMAIL_SLOW", raising=False)
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makeini("[pytest]\nmarkers =\n    slow: long tests\n")
    return pytester


def test_without_the_variable_skips_stay_skips(project: pytest.Pytester) -> None:
    project.makepyfile(test_skipping=SKIPPING)
    result = project.runpytest("-rs")
    result.assert_outcomes(passed=1, skipped=6, xfailed=1)


def test_with_the_variable_skips_fail_with_their_reason(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TACHYMAIL_REQUIRE_ALL", "1")
    project.makepyfile(test_skipping=SKIPPING)
    result = project.runpytest("-rA")
    # A skip in a fixture or by a marker happens in setup: pytest counts its failure as an error.
    result.assert_outcomes(passed=1, failed=3, errors=2, skipped=1, xfailed=1)
    for reason in (
        "swaks is not installed",
        "frobnicator is not installed",
        "no_such_module_tachymail_test",
        "needs root",
    ):
        result.stdout.fnmatch_lines([f"*REQUIRE_ALL=1: this would have skipped*{reason}*"])
    # Only a test marked slow may still skip as slow.
    result.stdout.fnmatch_lines(["*SKIPPED*slow test: set TACHYMAIL_SLOW=1*"])
    result.stdout.fnmatch_lines(["FAILED*test_not_marked_slow*"])


def test_module_importorskip_fails_collection(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.makepyfile(test_module=MODULE_IMPORTORSKIP)
    assert project.runpytest().ret == pytest.ExitCode.NO_TESTS_COLLECTED
    monkeypatch.setenv("TACHYMAIL_REQUIRE_ALL", "1")
    result = project.runpytest()
    assert result.ret == pytest.ExitCode.INTERRUPTED  # a collection error stops the run
    result.stdout.fnmatch_lines(["*this would have skipped*no_such_module_tachymail_test*"])

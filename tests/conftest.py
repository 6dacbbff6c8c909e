"""Shared fixtures: the third-party corpus, test markers, and no skips under CI.

With ``TACHYMAIL_REQUIRE_ALL=1`` (set by .ci/run) a test that would skip, for a missing
tool, package, corpus or privilege, fails instead, with the skip's reason; so does a
module whose ``pytest.importorskip`` finds nothing. The one deliberate skip left is the
slow-test skip (``TACHYMAIL_SLOW=1`` runs them; each has a short sibling in the default
run). Expected failures (xfail) stay what they are.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Generator
from pathlib import Path
from types import FrameType

import pytest

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus"

#: the reason of the one deliberate skip, which TACHYMAIL_REQUIRE_ALL=1 lets through
SLOW_SKIP = "slow test: set TACHYMAIL_SLOW=1 to run it"


@pytest.fixture(scope="session")
def corpus() -> Path:
    """Path of ../shared/corpus; tests that need it skip when it is absent (fail in CI)."""
    if not CORPUS.is_dir():
        pytest.skip(f"third-party corpus not found at {CORPUS} (it lives in ../shared/corpus)")
    return CORPUS


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (a CI timeout, a kill of the run) ends the run as Ctrl-C does: pytest then
    runs the fixtures' teardown and the tests' ``finally`` blocks, which stop the servers,
    Dovecot, Postfix and dnsmasq the tests started (the default action would leave them
    running, holding their ports)."""
    signal.signal(signal.SIGTERM, _interrupted)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long soak/load tests run only with TACHYMAIL_SLOW=1."""
    if os.environ.get("TACHYMAIL_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason=SLOW_SKIP)
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _require_all() -> bool:
    return os.environ.get("TACHYMAIL_REQUIRE_ALL") == "1"


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    text = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")  # longrepr: (path, line, "Skipped: reason")


def _refuse_skip(report: pytest.TestReport | pytest.CollectReport, slow: bool = False) -> None:
    """Turn a skip into a failure that names the reason (TACHYMAIL_REQUIRE_ALL=1 only);
    *slow*: the test is marked slow, and its slow-test skip stays a skip."""
    if not _require_all() or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if slow and reason == SLOW_SKIP:
        return
    report.outcome = "failed"
    report.longrepr = (
        f"TACHYMAIL_REQUIRE_ALL=1: this would have skipped ({reason}); "
        "install what it needs (./dev test as root does) instead of skipping"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A skip in setup (a fixture), in the test, or by a skip marker fails under CI."""
    report = yield
    _refuse_skip(report, slow=item.get_closest_marker("slow") is not None)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """A module skipped while collected (a module-level ``importorskip``) fails under CI."""
    report = yield
    _refuse_skip(report)
    return report

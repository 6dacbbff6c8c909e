"""Shared fixtures: the third-party corpus, and test markers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def corpus() -> Path:
    """Path of ../shared/corpus; tests that need it skip when it is absent."""
    if not CORPUS.is_dir():
        pytest.skip(f"third-party corpus not found at {CORPUS} (it lives in ../shared/corpus)")
    return CORPUS


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long soak/load tests run only with TACHYMAIL_SLOW=1."""
    if os.environ.get("TACHYMAIL_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set TACHYMAIL_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

"""The outbox of the replicated side stores (tachymail.queue.changes): recorded in the same
transaction as the change while the store is in a cluster, invisible to the list's readers,
bounded, and never fed by changes applied from other nodes."""

from __future__ import annotations

import time
from pathlib import Path

import lmdb
import pytest

from tachymail.queue import changes
from tachymail.queue.changes import Change
from tachymail.queue.suppression import SuppressionList
from tachymail.queue.suspensions import Suspensions


def outbox(env: lmdb.Environment) -> list[Change]:
    return [change for _, change in changes.pending(env, 10_000)]


def test_no_outbox_until_the_store_joins_a_cluster(tmp_path: Path) -> None:
    suppressions = SuppressionList(tmp_path)
    try:
        suppressions.add("a@x.example")
        assert outbox(suppressions.env) == []
        assert changes.set_enabled(suppressions.env, True)
        assert not changes.set_enabled(suppressions.env, True)  # already on
        assert changes.resend_wanted(suppressions.env)  # what it had goes to the cluster
        suppressions.add("b@x.example", scope="shop.example", reason="r", expires=2e9)
        assert suppressions.remove("a@x.example")
        recorded = outbox(suppressions.env)
        assert [(c.key, c.value is None) for c in recorded] == [
            (b"shop.example\x00b@x.example", False),
            (b"global\x00a@x.example", True),
        ]
        assert recorded[0].value is not None and recorded[0].value["reason"] == "r"
        assert recorded[0].lapses == 2e9
        # The bookkeeping is invisible to the list's readers and to its sweep.
        assert suppressions.count() == 1 and not suppressions.is_empty()
        assert [e.address for e in suppressions.list()[0]] == ["b@x.example"]
        assert suppressions.sweep(now=time.time()) == 0
        page, following = suppressions.snapshot(b"", 10)
        assert [c.key for c in page] == [b"shop.example\x00b@x.example"] and following is None
        assert suppressions.remove("b@x.example", "shop.example")
        assert suppressions.is_empty() and suppressions.count() == 0
        # Leaving the cluster drops the outbox and the bookmarks.
        assert changes.set_enabled(suppressions.env, False)
        assert outbox(suppressions.env) == [] and not changes.resend_wanted(suppressions.env)
        assert suppressions.env.stat()["entries"] == 0
    finally:
        suppressions.close()


def test_applied_changes_are_newer_wins_and_not_recorded(tmp_path: Path) -> None:
    suppressions = SuppressionList(tmp_path)
    try:
        changes.set_enabled(suppressions.env, True)
        mine = suppressions.add("a@x.example", reason="local", now=100.0)
        older = Change(b"global\x00a@x.example", 50.0, {"reason": "old", "source": "api"})
        newer = Change(b"global\x00a@x.example", 150.0, {"reason": "new", "source": "bounce"})
        bad = Change(b"global\x00not an address", 150.0, {"reason": "x"})
        assert suppressions.apply_changes([older, bad], True) == 0
        assert suppressions.get("a@x.example") == mine
        assert suppressions.apply_changes([newer], True) == 1
        got = suppressions.get("a@x.example")
        assert got is not None and (got.reason, got.source, got.created) == ("new", "bounce", 150)
        removal = Change(b"global\x00a@x.example", 120.0, None)  # older than the entry: no
        assert suppressions.apply_changes([removal], True) == 0
        removal = Change(b"global\x00a@x.example", 200.0, None)
        assert suppressions.apply_changes([removal], True) == 1
        assert suppressions.get("a@x.example") is None
        assert len(outbox(suppressions.env)) == 1  # only the local add
    finally:
        suppressions.close()


def test_suspensions_record_destinations_not_sources_and_bound_the_outbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tachymail.queue.suspensions as module

    suspensions = Suspensions(tmp_path)
    try:
        changes.set_enabled(suspensions.env, True)
        changes.want_resend(suspensions.env, False)
        suspensions.suspend("dest.example", reason="maintenance")
        suspensions.suspend("gmail.com", source="ip2", until=time.time() + 60)
        assert suspensions.resume("dest.example")
        assert [(c.key, c.value is None) for c in outbox(suspensions.env)] == [
            (b"dest.example", False),
            (b"dest.example", True),
        ]
        assert set(suspensions.active()) == {"gmail.com/ip2"}
        generation = suspensions.generation()
        applied = Change(b"other.example", time.time(), {"until": 0, "reason": "from b"})
        assert suspensions.apply_changes([applied], True) == 1
        assert suspensions.generation() > generation  # delivery workers re-read the table
        assert suspensions.suspended("other.example") is not None
        assert len(outbox(suspensions.env)) == 2
        # A full outbox (Redis away for long): the whole table is offered again instead.
        monkeypatch.setattr(module, "MAX_OUTBOX", 3)
        suspensions.suspend("c.example")
        suspensions.suspend("d.example")
        assert len(outbox(suspensions.env)) == 3 and changes.resend_wanted(suspensions.env)
        page, _ = suspensions.snapshot(b"", 100)
        assert [c.key for c in page] == [b"c.example", b"d.example", b"other.example"]
    finally:
        suspensions.close()

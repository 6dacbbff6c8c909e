"""Paging the queue listing (tachymail.queue.admin.page, used by GET /api/v1/queue): every
message exactly once across pages, the scan budget, the recipients cap."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tachymail.queue import admin
from tachymail.queue.envelope import Envelope, Recipient, new_queue_id
from tachymail.queue.select import MessageFilter
from tachymail.queue.store import QueueStore, put_message


def _fill(store: QueueStore, senders: list[str], recipients: int = 1) -> list[str]:
    envelopes = [
        Envelope(
            new_queue_id(),
            sender,
            [Recipient(f"r{i}@dest.test") for i in range(recipients)],
            arrival=time.time(),
        )
        for sender in senders
    ]
    store.apply([put_message(e, b"Subject: x\r\n\r\nx\r\n") for e in envelopes])
    return [e.id for e in envelopes]


def _walk(store: QueueStore, chosen: MessageFilter, limit: int) -> tuple[list[str], int]:
    seen: list[str] = []
    pages = 0
    cursor: str | None = ""
    while cursor is not None:
        found, cursor = admin.page(store, chosen, time.time(), after=cursor, limit=limit)
        seen += [e.id for e in found]
        pages += 1
    return seen, pages


def test_pages_list_every_match_once_in_order(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "queue")
    try:
        ids = _fill(store, [f"s{i % 3}@one.test" for i in range(25)])
        assert _walk(store, MessageFilter(), 7) == (ids, 4)
        wanted = [queue_id for i, queue_id in enumerate(ids) if i % 3 == 1]
        assert _walk(store, MessageFilter(sender="s1@one.test"), 2)[0] == wanted
        assert _walk(store, MessageFilter(sender="nobody@one.test"), 5) == ([], 1)
    finally:
        store.close()


def test_a_page_reads_a_bounded_number_of_envelopes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "SCAN_FACTOR", 1)
    monkeypatch.setattr(admin, "SCAN_MIN", 3)
    store = QueueStore(tmp_path / "queue")
    try:
        ids = _fill(store, ["a@one.test"] * 10 + ["b@two.test"])
        chosen = MessageFilter(sender="b@two.test")
        # nothing matches in the first three: an empty page, and where to go on from
        found, cursor = admin.page(store, chosen, time.time(), limit=2)
        assert found == [] and cursor == ids[2]
        assert _walk(store, chosen, 2) == ([ids[-1]], 4)
    finally:
        store.close()


def test_a_page_stops_before_too_many_recipients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "PAGE_RECIPIENTS", 25)
    store = QueueStore(tmp_path / "queue")
    try:
        ids = _fill(store, ["a@one.test"] * 5, recipients=10)
        found, cursor = admin.page(store, MessageFilter(), time.time(), limit=100)
        assert [e.id for e in found] == ids[:2] and cursor == ids[1]
        assert _walk(store, MessageFilter(), 100) == (ids, 3)
    finally:
        store.close()

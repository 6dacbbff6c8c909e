"""Destination suspensions (tachymail.queue.suspensions) and the merged destination status
(tachymail.queue.destinations), on a real LMDB environment in a temporary directory."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tachymail.queue import suspensions as mod
from tachymail.queue.destinations import (
    QueueCounts,
    decode_cursor,
    encode_cursor,
    merge,
    page,
    read_statuses,
    write_status,
)
from tachymail.queue.suspensions import (
    Suspension,
    SuspensionError,
    Suspensions,
    match,
    normalize_destination,
    parse_until,
)


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("Example.COM.", "example.com"),
        (" mx1.example.com ", "mx1.example.com"),
        ("*.Google.com", "*.google.com"),
        ("[IPv6:2001:db8::0001]", "2001:db8::1"),
        ("192.0.2.7", "192.0.2.7"),
        ("_dmarc.example.com", "_dmarc.example.com"),
    ],
)
def test_destinations_are_stored_in_one_spelling(given: str, stored: str) -> None:
    assert normalize_destination(given) == stored


@pytest.mark.parametrize(
    "bad", ["", "*.com", "*", "a b.com", "-a.com", "a-.com", "a..com", "x@y.com", "a" * 64 + ".com"]
)
def test_names_that_are_no_destination_are_refused(bad: str) -> None:
    with pytest.raises(SuspensionError):
        normalize_destination(bad)


def test_until_from_epoch_or_duration() -> None:
    assert parse_until(None, now=100) == 0
    assert parse_until("", now=100) == 0
    assert parse_until(0, now=100) == 0
    assert parse_until("30m", now=100) == 1900
    assert parse_until("2h", now=100) == 7300
    assert parse_until("1w", now=0) == 7 * 86400
    assert parse_until(250, now=100) == 250
    assert parse_until("250", now=100) == 250
    for bad in ("soon", "30", "-5m", float("nan"), float("inf"), True):
        with pytest.raises(SuspensionError):
            parse_until(bad, now=1000)  # type: ignore[arg-type]
    with pytest.raises(SuspensionError, match="already past"):
        parse_until(50, now=100)


def test_match_by_domain_host_and_pattern() -> None:
    table = {
        "example.com": Suspension("example.com", 0, "", 1),
        "*.google.com": Suspension("*.google.com", 0, "", 1),
        "mx.over.test": Suspension("mx.over.test", 50, "", 1),
    }
    assert match(table, ["example.com"], 100) is table["example.com"]
    assert match(table, ["sub.example.com"], 100) is None  # a domain is not its subdomains
    assert match(table, ["gmail.com", "aspmx.l.google.com"], 100) is table["*.google.com"]
    assert match(table, ["google.com"], 100) is None  # the pattern is below, not at
    assert match(table, ["MX.Over.Test."], 40) is table["mx.over.test"]
    assert match(table, ["mx.over.test"], 60) is None  # ran out at 50


def test_suspend_resume_and_generation(tmp_path: Path) -> None:
    store = Suspensions(tmp_path)
    other = store  # (LMDB lets a process open an environment once)
    try:
        assert store.generation() == 0
        made = store.suspend("Example.com", reason="  their\nmaintenance ", now=100)
        assert made == Suspension("example.com", 0.0, "their maintenance", 100.0)
        assert other.active(now=200) == {"example.com": made}
        assert other.suspended("example.com", now=200) == made
        assert other.suspended("mail.example.com", "mx.example.net", now=200) is None
        assert store.generation() == 1
        # Replacing keeps one entry; an expiry makes it end by itself.
        later = store.suspend("example.com", until=time.time() + 3600)
        assert list(other.active()) == ["example.com"]
        assert other.active(now=later.until + 1) == {}
        assert store.resume("EXAMPLE.COM") is True
        assert store.resume("example.com") is False
        assert other.active() == {}
        assert store.generation() == 3
        with pytest.raises(SuspensionError, match="already past"):
            store.suspend("example.com", until=50, now=100)
    finally:
        store.close()
    reopened = Suspensions(tmp_path)  # what another process, or a restart, reads
    try:
        assert reopened.generation() == 3 and reopened.active() == {}
    finally:
        reopened.close()


def test_cached_table_is_read_again_when_it_changes(tmp_path: Path) -> None:
    writer = reader = Suspensions(tmp_path)
    try:
        assert reader.suspended("example.com") is None
        writer.suspend("example.com")
        reader._cache_checked = float("-inf")  # as when REFRESH seconds have passed
        assert reader.suspended("example.com") is not None
        writer.resume("example.com")
        reader._cache_checked = float("-inf")
        assert reader.suspended("example.com") is None
    finally:
        writer.close()


def test_the_table_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mod, "MAX_SUSPENSIONS", 3)
    store = Suspensions(tmp_path)
    try:
        for i in range(3):
            store.suspend(f"d{i}.example")
        with pytest.raises(SuspensionError, match="suspended already"):
            store.suspend("d3.example")
        store.suspend("d1.example", reason="replacing one is fine")
        store.resume("d0.example")
        store.suspend("d3.example")
    finally:
        store.close()


def test_merge_of_queue_counts_worker_status_and_suspensions(tmp_path: Path) -> None:
    now = time.time()
    write_status(
        tmp_path,
        0,
        {
            "time": now,
            "domains": {
                "gmail.com": {
                    "next_hop": "mx:gmail-smtp-in.l.google.com",
                    "hosts": ["gmail-smtp-in.l.google.com"],
                    "in_flight": 2,
                    "attempts": 120,
                    "last_error": {"code": 421, "reply": "421 4.7.0 try later", "time": now},
                }
            },
            "hops": {"mx:gmail-smtp-in.l.google.com": {"connections": 3}},
        },
    )
    write_status(tmp_path, 1, {"time": now - 60, "domains": {"stale.example": {}}})
    statuses = read_statuses(tmp_path, now)
    assert len(statuses) == 1  # the worker that stopped writing is ignored
    table = {"*.google.com": Suspension("*.google.com", 0, "rate", 1)}
    counts = QueueCounts({"gmail.com": 7, "example.org": 1}, 5, True)
    entries = merge(statuses, counts, table, now)
    assert [e["destination"] for e in entries] == ["*.google.com", "example.org", "gmail.com"]
    gmail = entries[2]
    assert gmail["queued"] == 7
    assert gmail["in_flight"] == 2
    assert gmail["connections"] == 3
    assert gmail["attempts_per_second"] == 2.0
    assert gmail["last_error"]["code"] == 421
    assert gmail["suspension"]["destination"] == "*.google.com"  # through its MX host
    assert entries[1]["suspension"] is None and entries[1]["next_hop"] == ""

    first, cursor = page(entries, None, 2)
    assert [e["destination"] for e in first] == ["*.google.com", "example.org"]
    assert cursor is not None and decode_cursor(cursor) == "example.org"
    rest, end = page(entries, cursor, 2)
    assert [e["destination"] for e in rest] == ["gmail.com"] and end is None
    assert decode_cursor(encode_cursor("*.a.b")) == "*.a.b"
    for bad in ("%%%", "", "a"):
        with pytest.raises(ValueError):
            decode_cursor(bad)

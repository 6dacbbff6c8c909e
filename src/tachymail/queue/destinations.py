"""The per-destination status: what each delivery worker publishes about the destinations
it works on, merged with the queue's counts and the suspensions (``GET
/api/v1/destinations``, ``tachymail queue destinations``).

Each delivery worker writes, at most once a second, one small JSON file
``data_dir/destinations/worker-N.json`` (written to a temporary file and renamed into
place, so a reader sees a whole file or the previous one)::

    {"time": ..., "pid": ..., "index": N,
     "domains": {"example.com": {"next_hop": "mx:...", "hosts": [...], "in_flight": 2,
                                 "attempts": 120, "last_error": {...} | null}},
     "hops": {"mx:...": {"connections": 3}}}

``attempts`` counts the recipients attempted over the last minute. A file not rewritten
for :data:`STALE` seconds belongs to a worker that is gone, and is ignored. The queue's
counts come from one read snapshot of the queue (bounded by :data:`COUNT_LIMIT` messages).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from tachymail.queue.envelope import QUEUED
from tachymail.queue.store import QueueStore
from tachymail.queue.suspensions import Suspension, match

#: the status files' directory, in data_dir
STATUS_DIR = "destinations"
#: a worker's file older than this (seconds) is ignored: its worker is gone or hung
STALE = 10.0
#: the seconds over which attempts are counted for the rate
RATE_WINDOW = 60
#: messages read per queue count at most (a huge queue is counted in part, and says so)
COUNT_LIMIT = 200_000


def status_path(data_path: Path, index: int) -> Path:
    """Where delivery worker *index* publishes its status."""
    return data_path / STATUS_DIR / f"worker-{index}.json"


def write_status(data_path: Path, index: int, status: dict[str, Any]) -> None:
    """Publish *status* as worker *index*'s file, atomically (temporary file + rename).
    Raises OSError (a full disk: the caller logs it and carries on)."""
    path = status_path(data_path, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_bytes(orjson.dumps(status))
    os.replace(temporary, path)


def remove_status(data_path: Path, index: int) -> None:
    """Withdraw worker *index*'s file (at its orderly stop)."""
    with contextlib.suppress(OSError):
        status_path(data_path, index).unlink()


def read_statuses(data_path: Path, now: float | None = None) -> list[dict[str, Any]]:
    """The fresh status files of every delivery worker (unreadable or stale ones skipped)."""
    stamp = time.time() if now is None else now
    out: list[dict[str, Any]] = []
    try:
        paths = sorted((data_path / STATUS_DIR).glob("worker-*.json"))
    except OSError:
        return out
    for path in paths:
        try:
            status = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        if isinstance(status, dict) and stamp - float(status.get("time", 0)) <= STALE:
            out.append(status)
    return out


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """Pending recipients per recipient domain, from *messages* messages; ``exact`` is False
    when the queue had more than COUNT_LIMIT messages (the rest were not counted)."""

    domains: dict[str, int]
    messages: int
    exact: bool


def queue_counts(store: QueueStore, limit: int = COUNT_LIMIT) -> QueueCounts:
    """Count pending recipients per domain in one read snapshot of *store* (blocking:
    about a second per 200,000 messages; run it in a thread). Raises lmdb.Error."""
    domains: dict[str, int] = {}
    messages = 0
    for envelope in store.iter_envelopes():
        if messages >= limit:
            return QueueCounts(domains, messages, False)
        messages += 1
        for rcpt in envelope.recipients:
            if rcpt.state == QUEUED:
                domain = rcpt.address.rpartition("@")[2].lower() or "(none)"
                domains[domain] = domains.get(domain, 0) + 1
    return QueueCounts(domains, messages, True)


def merge(
    statuses: list[dict[str, Any]],
    counts: QueueCounts,
    suspensions: dict[str, Suspension],
    now: float | None = None,
) -> list[dict[str, Any]]:
    """One entry per destination, sorted by name: every domain with pending recipients in
    the queue, every domain a worker reports on, and every suspended destination::

        {"destination", "queued", "in_flight", "connections", "attempts_per_second",
         "last_error": {"code", "reply", "time"} | None, "next_hop",
         "suspension": {"destination", "until", "reason", "created", "source"} | None,
         "source_suspensions": [{... "source": SOURCE}, ...]}

    ``connections`` are those of the domain's next hop (shared by the domains routed
    there); ``suspension`` is the one in force for the domain or for a host of its next
    hop (a pattern's own entry shows it too); ``source_suspensions`` are those that stop
    only one egress source (a shaping reaction's)."""
    stamp = time.time() if now is None else now
    reported: dict[str, dict[str, Any]] = {}
    hops: dict[str, int] = {}
    for status in statuses:
        for key, hop in status.get("hops", {}).items():
            hops[key] = hops.get(key, 0) + int(hop.get("connections", 0))
        for name, entry in status.get("domains", {}).items():
            seen = reported.get(name)
            if seen is None:
                reported[name] = dict(entry)
                continue
            # Every delivery worker may deliver to a domain: add up, keep the newest error.
            seen["in_flight"] = seen.get("in_flight", 0) + entry.get("in_flight", 0)
            seen["attempts"] = seen.get("attempts", 0) + entry.get("attempts", 0)
            error, other = seen.get("last_error"), entry.get("last_error")
            if other and (not error or other.get("time", 0) > error.get("time", 0)):
                seen["last_error"] = other
    plain = {key: s for key, s in suspensions.items() if not s.source}
    sourced = [s for s in suspensions.values() if s.source and s.active(stamp)]
    names = set(counts.domains) | set(reported) | {s.destination for s in suspensions.values()}
    out: list[dict[str, Any]] = []
    for name in sorted(names):
        entry = reported.get(name, {})
        next_hop = str(entry.get("next_hop", ""))
        hosts = [str(h) for h in entry.get("hosts", [])]
        suspension = match(plain, [name, *hosts], stamp)
        by_source = [
            s.as_dict() for s in sourced if match({s.destination: s}, [name, *hosts], stamp)
        ]
        out.append(
            {
                "destination": name,
                "queued": counts.domains.get(name, 0),
                "in_flight": int(entry.get("in_flight", 0)),
                "connections": hops.get(next_hop, 0),
                "attempts_per_second": round(entry.get("attempts", 0) / RATE_WINDOW, 3),
                "last_error": entry.get("last_error") or None,
                "next_hop": next_hop,
                "suspension": suspension.as_dict() if suspension is not None else None,
                "source_suspensions": by_source,
            }
        )
    return out


def encode_cursor(name: str) -> str:
    """The opaque cursor of the page after destination *name*."""
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The destination a cursor points after; ValueError for one that is not a cursor."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        name = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        name = ""
    if not name:
        raise ValueError(f"not a cursor: {cursor!r}")
    return name


def page(
    entries: list[dict[str, Any]], cursor: str | None, limit: int
) -> tuple[list[dict[str, Any]], str | None]:
    """Up to *limit* entries (sorted by destination) after *cursor*, and the next page's
    cursor (None at the end). Raises ValueError for a bad cursor."""
    after = decode_cursor(cursor) if cursor else None
    start = 0
    if after is not None:
        start = next((i for i, e in enumerate(entries) if e["destination"] > after), len(entries))
    chosen = entries[start : start + limit]
    more = start + limit < len(entries)
    return chosen, encode_cursor(chosen[-1]["destination"]) if more and chosen else None

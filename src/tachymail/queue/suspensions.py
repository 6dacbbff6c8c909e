"""Destination suspensions: deliveries to a domain or a mail host stop until the operator
resumes them, or until an optional expiry.

A *destination* is one of:

- a recipient domain (``example.com``): its recipients are not attempted;
- a next-hop host (``mx1.example.com``, or the host of a route or of the smarthost, an
  address literal such as ``192.0.2.7`` included): every recipient domain whose next hop
  lists that host is not attempted (suspending one MX host of several stops the domain:
  an operator who suspends a host wants no mail going that way, not a fail-over);
- a suffix pattern ``*.example.com``: any domain or next-hop host *below* example.com
  (``mx1.example.com``, ``a.b.example.com``; not ``example.com`` itself), as when every
  MX of a provider (``*.google.com``) must stop at once.

Names are compared in lower case without a trailing dot. A suspension has an optional
``until`` (epoch seconds, 0 = until resumed): past it the suspension is over by itself
(ignored at once, removed by the next write). Recipients of a suspended destination stay
queued: no attempt is counted and no DSN goes out (see tachymail.delivery.destinations).

The suspensions live in a small LMDB environment of their own in ``data_dir/suspensions``,
shared by every process of the node (delivery workers read it, the CLI and the HTTP API
write it beside a running server). Writes are synced: an operator's "stop" survives a power
cut. A suspension may name an egress *source* (tachymail.delivery.egress): it then stops
only the mail leaving from that source towards the destination (a shaping reaction to a
provider's "421 4.7.28" does that), and is stored under ``DESTINATION/SOURCE``. Each write
bumps a generation counter, so a reader that caches the table
(:meth:`Suspensions.suspended`) re-reads it only when it changed, at most once a second.

In a cluster (``[cluster] redis``) each suspend and resume of a destination is also
written, in the same transaction, to the store's outbox (tachymail.queue.changes); the
node's replicator hands it to Redis and applies the other nodes'
(tachymail.cluster.replication), so a destination suspended on one node is held on all. The
expiry is part of the suspension: it lifts everywhere with no message. A suspension of one
egress source stays on its node (sources are per node: each has its own addresses).
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import lmdb
import orjson

from tachymail.lmdbenv import open_side_store
from tachymail.queue import changes
from tachymail.queue.changes import FIRST_ENTRY, Change

__all__ = [
    "MAX_SUSPENSIONS",
    "SUSPENSIONS_DIR",
    "Suspension",
    "SuspensionError",
    "Suspensions",
    "match",
    "match_source",
    "normalize_destination",
    "parse_until",
]

#: the suspensions' environment, in data_dir
SUSPENSIONS_DIR = "suspensions"
#: active suspensions a node keeps at most (each is a gauge label and a cache entry)
MAX_SUSPENSIONS = 1000
#: changes the outbox holds while Redis is away before the whole table is resent instead
MAX_OUTBOX = 10_000
#: the longest reason kept
MAX_REASON = 500
#: how long a cached table is trusted before its generation is looked at again (seconds)
REFRESH = 1.0

# The generation counter's key: sorts before every destination (which are printable).
_GENERATION = b"\x00generation"
_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
_NAME = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SOURCE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_T = TypeVar("_T")


class SuspensionError(ValueError):
    """A destination, expiry or reason the suspensions refuse; the message says which."""


@dataclass(frozen=True, slots=True)
class Suspension:
    """One suspension: the *destination* as stored (see the module doc), ``until`` epoch
    seconds (0: until resumed), the operator's *reason*, when it was made, and the egress
    *source* it stops ("" = every source)."""

    destination: str
    until: float
    reason: str
    created: float
    source: str = ""

    @property
    def key(self) -> str:
        """Its key in the table: the destination, or ``DESTINATION/SOURCE``."""
        return f"{self.destination}/{self.source}" if self.source else self.destination

    def active(self, now: float) -> bool:
        return not self.until or self.until > now

    def as_dict(self) -> dict[str, object]:
        """The suspension as plain JSON data (CLI ``--json``, the API)."""
        return {
            "destination": self.destination,
            "until": self.until,
            "reason": self.reason,
            "created": self.created,
            "source": self.source,
        }


def normalize_destination(destination: str) -> str:
    """*destination* as stored: lower case, no trailing dot; an IPv6 literal in its short
    form (brackets dropped). Raises SuspensionError unless it is a host name or domain
    (optionally ``*.`` + a domain of two labels or more) or an IP address."""
    value = destination.strip().lower().rstrip(".")
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    if value.startswith("ipv6:"):
        value = value[5:]
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if (
        len(value) > 253
        or not _NAME.fullmatch(value)
        or (value.startswith("*.") and "." not in value[2:])
    ):
        raise SuspensionError(
            f"not a destination: {destination!r} (say a domain, a mail host, *.domain "
            "or an IP address)"
        )
    return value


def parse_until(value: float | str | None, now: float | None = None) -> float:
    """The end of a suspension as epoch seconds (0: until resumed) from *value*: None, 0 or
    "" (until resumed), epoch seconds (a number, or a string of digits), or a duration from
    *now* ("90s", "30m", "2h", "1d", "1w"). Raises SuspensionError for anything else and for
    a time already past."""
    stamp = time.time() if now is None else now
    if value is None or value == "" or value == 0:
        return 0.0
    if isinstance(value, bool):
        raise SuspensionError(f"not a time: {value!r}")
    if isinstance(value, int | float):
        until = float(value)
    else:
        text = value.strip()
        duration = _DURATION.fullmatch(text)
        if duration is not None:
            until = stamp + float(duration[1]) * _UNIT[duration[2].lower()]
        else:
            try:
                until = float(text)
            except ValueError:
                raise SuspensionError(
                    f"not a time: {value!r} (say epoch seconds or a duration: 30m, 2h, 1d)"
                ) from None
    if until != until or until in (float("inf"), float("-inf")):  # NaN or infinite
        raise SuspensionError(f"not a time: {value!r}")
    if until <= stamp:
        raise SuspensionError(f"the end of the suspension ({until:.0f}) is already past")
    return until


def _candidates(name: str) -> list[str]:
    """*name* itself and the ``*.`` patterns of each domain above it (lower-cased)."""
    name = name.lower().rstrip(".")
    out = [name]
    rest = name
    while True:
        _, dot, rest = rest.partition(".")
        if not dot or "." not in rest:
            return out  # a pattern needs two labels at least (no "*.com")
        out.append("*." + rest)


def match(table: dict[str, Suspension], names: Iterable[str], now: float) -> Suspension | None:
    """The active suspension of *table* that covers any of *names* (a recipient domain,
    next-hop hosts), exact names before patterns; None when none does. A dict lookup per
    label of each name: cheap enough for every recipient."""
    if not table:
        return None
    for name in names:
        for candidate in _candidates(name):
            found = table.get(candidate)
            if found is not None and found.active(now):
                return found
    return None


def match_source(
    table: dict[str, Suspension], names: Iterable[str], source: str, now: float
) -> Suspension | None:
    """Like :func:`match`, for the suspensions that stop only egress *source*."""
    if not table:
        return None
    for name in names:
        for candidate in _candidates(name):
            found = table.get(f"{candidate}/{source}")
            if found is not None and found.active(now):
                return found
    return None


def _bump(txn: lmdb.Transaction) -> None:
    """Count one change in the generation counter (readers' caches look at it)."""
    generation = txn.get(_GENERATION)
    txn.put(_GENERATION, str(int(generation) + 1 if generation is not None else 1).encode())


def _decode(raw: bytes) -> Suspension:
    data = orjson.loads(raw)
    return Suspension(
        str(data["destination"]),
        float(data["until"]),
        str(data.get("reason", "")),
        float(data.get("created", 0.0)),
        str(data.get("source", "")),
    )


def _entries(txn: lmdb.Transaction, after: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) records of the suspensions after *after*, none of the bookkeeping."""
    cursor = txn.cursor()
    more = cursor.set_range(max(after, FIRST_ENTRY))
    if more and after and cursor.key() == after:
        more = cursor.next()
    while more:
        yield bytes(cursor.key()), bytes(cursor.value())
        more = cursor.next()


def _change(suspension: Suspension) -> Change:
    """A destination's *suspension* as a change for the cluster."""
    return Change(
        suspension.destination.encode(), suspension.created, suspension.as_dict(), suspension.until
    )


def _apply(txn: lmdb.Transaction, change: Change, at_least: bool) -> int:
    """Apply one remote *change* in *txn*: 1 when it changed the table."""
    if b"/" in change.key:
        return 0  # a source's suspension: never shared
    current = txn.get(change.key)
    if current is not None:
        try:
            held = _decode(bytes(current)).created
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            held = float("-inf")
        if change.stamp < held or (change.stamp == held and not at_least):
            return 0
    if change.value is None:
        return 1 if current is not None and txn.delete(change.key) else 0
    try:
        value = change.value
        suspension = Suspension(
            normalize_destination(change.key.decode()),
            float(value.get("until") or 0.0),
            " ".join(str(value.get("reason", "")).split())[:MAX_REASON],
            change.stamp,
        )
    except (SuspensionError, UnicodeDecodeError, TypeError, ValueError):
        return 0
    encoded = orjson.dumps(suspension.as_dict())
    if current is not None and bytes(current) == encoded:
        return 0
    txn.put(suspension.key.encode(), encoded)
    return 1


class Suspensions:
    """The node's suspensions in the LMDB environment *data_path*/suspensions (created if
    missing). Writes block on the node's single LMDB writer and a sync (microseconds on an
    idle node): call them off an event loop that serves many clients. Reads are lock-free."""

    def __init__(self, data_path: Path) -> None:
        self.path = data_path / SUSPENSIONS_DIR
        self.env = open_side_store(self.path)
        self._cache: dict[str, Suspension] = {}
        self._cache_generation = -1
        self._cache_checked = float("-inf")

    def close(self) -> None:
        self.env.close()

    # --- writing ---------------------------------------------------------------------------

    def suspend(
        self,
        destination: str,
        until: float = 0.0,
        reason: str = "",
        now: float | None = None,
        source: str = "",
    ) -> Suspension:
        """Suspend *destination* until *until* (epoch seconds; 0: until resumed) for
        *reason* (cut to MAX_REASON characters), replacing any suspension of the same
        destination (and *source*: "" = mail from every source). Raises SuspensionError
        for a bad destination or source name, an expiry already past, or a table already
        holding MAX_SUSPENSIONS active suspensions."""
        stamp = time.time() if now is None else now
        name = normalize_destination(destination)
        if source and not _SOURCE.fullmatch(source):
            raise SuspensionError(f"not a source name: {source!r}")
        if until and until <= stamp:
            raise SuspensionError(f"the end of the suspension ({until:.0f}) is already past")
        reason = " ".join(reason.split())[:MAX_REASON]
        suspension = Suspension(name, float(until), reason, round(stamp, 3), source)
        key = suspension.key.encode()

        def work(txn: lmdb.Transaction) -> None:
            self._sweep(txn, stamp)
            if txn.get(key) is None and changes.entry_count(txn) >= MAX_SUSPENSIONS:
                raise SuspensionError(
                    f"{MAX_SUSPENSIONS} destinations are suspended already; resume some first"
                )
            txn.put(key, orjson.dumps(suspension.as_dict()))
            if not source:
                changes.record(txn, [_change(suspension)], MAX_OUTBOX)
            _bump(txn)

        self._write(work)
        return suspension

    def resume(self, destination: str, source: str = "") -> bool:
        """End the suspension of *destination* (as it was suspended: a pattern by its
        pattern; of *source* only, if given); False when it was not suspended (or its
        suspension had run out). Raises SuspensionError for a name that is no destination."""
        name = normalize_destination(destination)
        key = (f"{name}/{source}" if source else name).encode()
        now = time.time()

        def work(txn: lmdb.Transaction) -> bool:
            raw = txn.get(key)
            if raw is None:
                return False
            txn.delete(key)
            if not source:
                changes.record(txn, [Change(key, now, None)], MAX_OUTBOX)
            _bump(txn)
            return _decode(bytes(raw)).active(now)

        return self._write(work)

    def _write(self, work: Callable[[lmdb.Transaction], _T]) -> _T:
        try:
            with self.env.begin(write=True) as txn:
                result = work(txn)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            return self._write(work)
        self.env.sync(True)  # an operator's stop (or go) survives a power cut
        return result

    @staticmethod
    def _sweep(txn: lmdb.Transaction, now: float) -> None:
        """Remove the suspensions that ran out (the table stays small: no batching)."""
        doomed = [key for key, raw in _entries(txn) if not _decode(raw).active(now)]
        for key in doomed:
            txn.delete(key)

    # --- the cluster's side (tachymail.cluster.replication) --------------------------------

    def apply_changes(self, batch: list[Change], at_least: bool) -> int:
        """Apply other nodes' changes (see tachymail.queue.changes.ReplicatedStore): a
        destination's suspension is written or removed where the change is newer than the
        local one (or as new, with *at_least*), never recorded in the outbox; synced, and
        the generation bumped when anything changed. A change that is no valid suspension
        is skipped. How many changed the table."""

        def work(txn: lmdb.Transaction) -> int:
            applied = sum(_apply(txn, change, at_least) for change in batch)
            if applied:
                _bump(txn)
            return applied

        return self._write(work) if batch else 0

    def snapshot(self, after: bytes, limit: int) -> tuple[list[Change], bytes | None]:
        """Up to *limit* destination suspensions after key *after* as changes (those of
        one source stay on the node), and the key to go on from (None at the end)."""
        out: list[Change] = []
        with self.env.begin() as txn:
            for _, raw in _entries(txn, after):
                if len(out) >= limit:
                    return out, out[-1].key
                suspension = _decode(raw)
                if not suspension.source:
                    out.append(_change(suspension))
        return out, None

    # --- reading ---------------------------------------------------------------------------

    def generation(self) -> int:
        """A number that changes with every write (0 before the first)."""
        with self.env.begin() as txn:
            raw = txn.get(_GENERATION)
        return int(raw) if raw is not None else 0

    def active(self, now: float | None = None) -> dict[str, Suspension]:
        """Every suspension in force at *now*, by key (destination, or destination/source),
        read from the store."""
        stamp = time.time() if now is None else now
        out: dict[str, Suspension] = {}
        with self.env.begin() as txn:
            for _, raw in _entries(txn):
                suspension = _decode(raw)
                if suspension.active(stamp):
                    out[suspension.key] = suspension
        return out

    def invalidate(self) -> None:
        """Make the next :meth:`cached` read the table again (after this process wrote)."""
        self._cache_checked = float("-inf")

    def cached(self, now: float | None = None) -> dict[str, Suspension]:
        """The table as :meth:`active` read it last, looked at again (one key read) when
        REFRESH seconds have passed and read again only when it changed. Suspensions that
        ran out since are still in it: :func:`match` skips them."""
        stamp = time.monotonic()
        if stamp - self._cache_checked >= REFRESH:
            self._cache_checked = stamp
            generation = self.generation()
            if generation != self._cache_generation:
                self._cache = self.active(now)
                self._cache_generation = generation
        return self._cache

    def suspended(
        self, domain: str, mx_host: str = "", now: float | None = None
    ) -> Suspension | None:
        """The suspension in force for a recipient at *domain* whose next hop is *mx_host*
        (either may be ""), from the cached table (see :meth:`cached`), or None."""
        stamp = time.time() if now is None else now
        names = [n for n in (domain, mx_host) if n]
        return match(self.cached(stamp), names, stamp)

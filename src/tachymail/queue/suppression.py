"""The suppression list: recipients this node must not mail again, globally or for one
sender domain.

An entry is a recipient address, a *scope* ("global", or a sender domain: the entry then
refuses only mail whose envelope sender is at that domain), a reason, where it came from
("bounce", "api", "cli", "import"), when it was made and when it lapses (0: never).

Addresses are compared case-insensitively as a whole, local part included. RFC 5321
lets a mailbox's local part be case-sensitive, but no large mailbox provider treats it so,
and a list that let ``John@example.com`` through after ``john@example.com`` hard-bounced
would mail a suppressed address, which is the one thing it exists to prevent. Scopes are
lower-cased domains. An entry is stored once under ``scope NUL address`` (both lower case).

The list is an LMDB environment of its own in ``data_dir/suppression``, opened by every
process of the node (SMTP workers check it at RCPT, HTTP injection at intake, the delivery
worker adds hard bounces, the CLI edits it beside a running server). :meth:`check` is one
read transaction and at most two key look-ups, decoding nothing unless there is a hit;
:meth:`is_empty` reads the environment's statistics without a transaction, so an empty list
costs a front end nothing. Writes sync the environment before they return: an operator's
"do not mail" must survive a power cut. Expired entries are ignored at once and removed
lazily (every :data:`SWEEP_EVERY` additions, and by :meth:`sweep`).

In a cluster (``[cluster] redis``) every node keeps its own copy: each addition and removal
is also written, in the same transaction, to the store's outbox (tachymail.queue.changes),
which the node's replicator hands to Redis and the other nodes apply
(tachymail.cluster.replication); expiry needs no message, it is part of the entry.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import csv
import datetime
import os
import re
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb

from tachymail.lmdbenv import delete_where, open_side_store
from tachymail.queue import changes
from tachymail.queue.changes import FIRST_ENTRY, Change

#: the list's environment, in data_dir
SUPPRESSION_DIR = "suppression"
#: its map (sparse on disk): some ten million entries
MAP_SIZE = 4 * 1024 * 1024 * 1024
#: additions between sweeps of expired entries
SWEEP_EVERY = 10_000
#: entries written per transaction by :meth:`SuppressionList.add_many` (LMDB has one
#: writer for the whole node: a front end waiting to add a bounce must not wait long)
BATCH = 5_000
#: where an entry may come from
SOURCES = ("bounce", "api", "cli", "import")
#: the longest address accepted (RFC 5321 §4.5.3.1.3: a path is 256 octets with its <>)
MAX_ADDRESS = 254
#: the longest reason kept (a remote reply can be long; the list keeps its gist)
MAX_REASON = 500
GLOBAL = "global"
#: changes the outbox holds while Redis is away before the whole list is resent instead
MAX_OUTBOX = changes.MAX_OUTBOX

# created, expires, source index; the reason (UTF-8) follows
_VALUE = struct.Struct("<ddB")
_SCOPE = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?|global")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
CSV_HEADER = ("address", "scope", "reason", "expires")


class SuppressionError(ValueError):
    """An entry the list refuses: a bad address, scope, source or expiry; the message
    names what is wrong (and, for CSV, ``line N:``)."""


@dataclass(frozen=True, slots=True)
class Suppression:
    """One entry. ``scope`` is "global" or a sender domain (lower case); ``expires`` is
    epoch seconds, 0 for never."""

    address: str
    scope: str
    reason: str
    source: str
    created: float
    expires: float

    def as_dict(self) -> dict[str, object]:
        """The entry as plain JSON data (CLI ``--json``, the API)."""
        return {
            "address": self.address,
            "scope": self.scope,
            "reason": self.reason,
            "source": self.source,
            "created": self.created,
            "expires": self.expires,
        }


def normalize_address(address: str) -> str:
    """*address* as the list keys it: stripped of blanks and one pair of angle brackets,
    lower case. Raises SuppressionError unless it is ``local@domain`` of sane length with
    no blanks or control characters."""
    value = address.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    local, at, domain = value.rpartition("@")
    too_long = len(value.encode("utf-8", "surrogateescape")) > MAX_ADDRESS
    if not at or not local or not domain or too_long:
        raise SuppressionError(f"not an address: {address!r}")
    if any(c.isspace() or ord(c) < 32 or c == "\x7f" for c in value):
        raise SuppressionError(f"not an address: {address!r}")
    return value.lower()


def normalize_scope(scope: str | None) -> str:
    """*scope* as stored: "global" (also for None or ""), or a lower-case domain. Raises
    SuppressionError for anything that is neither."""
    value = (scope or GLOBAL).strip().lower().rstrip(".")
    if not _SCOPE.fullmatch(value) or ".." in value:
        raise SuppressionError(f'not a scope: {scope!r} (say "global" or a sender domain)')
    return value


def parse_expiry(text: str, now: float | None = None) -> float:
    """Epoch seconds from *text*: "" or "0" for never (0.0); a duration from *now*
    ("90s", "30m", "12h", "30d", "2w"); or a time: epoch seconds, or an ISO 8601 date or
    date-time (UTC unless it has an offset). Raises SuppressionError for anything else."""
    value = text.strip()
    if value in ("", "0", "never"):
        return 0.0
    found = _DURATION.fullmatch(value)
    if found is not None:
        base = time.time() if now is None else now
        return base + float(found[1]) * _UNIT[found[2].lower()]
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise SuppressionError(
            f"not an expiry: {text!r} (a duration such as 30d, or a time: "
            "epoch seconds or ISO 8601)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def _key(scope: str, address: str) -> bytes:
    return scope.encode() + b"\x00" + address.encode("utf-8", "surrogateescape")


def _decode(key: bytes, value: bytes) -> Suppression:
    scope, _, address = key.partition(b"\x00")
    created, expires, source = _VALUE.unpack_from(value)
    return Suppression(
        address=address.decode("utf-8", "surrogateescape"),
        scope=scope.decode(),
        reason=bytes(value[_VALUE.size :]).decode("utf-8", "replace"),
        source=SOURCES[source] if source < len(SOURCES) else "unknown",
        created=created,
        expires=expires,
    )


def _encode(entry: Suppression) -> bytes:
    source = SOURCES.index(entry.source)
    reason = entry.reason.encode("utf-8", "replace")[: MAX_REASON * 4]
    return _VALUE.pack(entry.created, entry.expires, source) + reason


def make_entry(
    address: str,
    scope: str | None = None,
    reason: str = "",
    source: str = "api",
    expires: float = 0.0,
    now: float | None = None,
) -> Suppression:
    """A validated, normalized entry (raises SuppressionError naming what is wrong)."""
    if source not in SOURCES:
        raise SuppressionError(f"not a source: {source!r} (one of {', '.join(SOURCES)})")
    if expires < 0:
        raise SuppressionError(f"not an expiry: {expires!r}")
    return Suppression(
        address=normalize_address(address),
        scope=normalize_scope(scope),
        reason=" ".join(reason.split())[:MAX_REASON],
        source=source,
        created=time.time() if now is None else now,
        expires=float(expires),
    )


def parse_csv(
    lines: Iterable[str], *, source: str = "import", now: float | None = None
) -> list[Suppression]:
    """The entries of a CSV file ``address,scope,reason,expires`` with that header line
    (scope empty: global; expires as :func:`parse_expiry`). Every line is checked before
    anything is returned; raises SuppressionError listing the bad lines (``line N: ...``,
    the first 20)."""
    stamp = time.time() if now is None else now
    rows: Iterator[list[str]] = csv.reader(lines)
    problems: list[str] = []
    entries: list[Suppression] = []
    header = next(rows, None)
    if header is None:
        raise SuppressionError(
            "line 1: empty file (expected the header address,scope,reason,expires)"
        )
    if tuple(h.strip().lower() for h in header) != CSV_HEADER:
        raise SuppressionError(
            f"line 1: the header must be {','.join(CSV_HEADER)}, got {','.join(header)!r}"
        )
    for row in rows:
        number = rows.line_num  # type: ignore[attr-defined]
        if not row or all(not cell.strip() for cell in row):
            continue  # blank lines are harmless
        if len(row) > len(CSV_HEADER):
            problems.append(f"line {number}: {len(row)} fields, at most {len(CSV_HEADER)}")
            continue
        address, scope, reason, expires = [*row, "", "", "", ""][:4]
        try:
            entries.append(
                make_entry(address, scope, reason, source, parse_expiry(expires, stamp), stamp)
            )
        except SuppressionError as exc:
            problems.append(f"line {number}: {exc}")
        if len(problems) >= 20:
            break
    if problems:
        raise SuppressionError("\n".join(problems))
    return entries


class SuppressionList:
    """The node's suppression list in the LMDB environment *data_path*/suppression
    (created if missing). Thread-compatible like LMDB itself; the methods that write
    block on the node's single LMDB writer and an fsync: call them off the event loop
    unless one entry is written."""

    def __init__(self, data_path: Path) -> None:
        self.path = data_path / SUPPRESSION_DIR
        self.env = open_side_store(self.path, map_size=MAP_SIZE)
        self._added = 0

    def close(self) -> None:
        self.env.close()

    # --- reading ---------------------------------------------------------------------------

    def is_empty(self) -> bool:
        """Whether the list has no entry at all (expired ones count until swept): a
        look at the environment's statistics, and in a cluster (whose bookkeeping records
        share the environment) one cursor step."""
        entries: int = self.env.stat()["entries"]
        if entries == 0:
            return True
        if entries > 64:
            return False  # the bookkeeping is a handful of records, or a backlog: look once
        with self.env.begin() as txn:
            return not txn.cursor().set_range(FIRST_ENTRY)

    def check(
        self, address: str, sender_domain: str = "", now: float | None = None
    ) -> Suppression | None:
        """The unexpired entry that suppresses mail to *address* from a sender at
        *sender_domain* (the global entry first, then that domain's), or None. An address
        that is not one is never suppressed."""
        lowered = address.strip().lower()
        if lowered.startswith("<") and lowered.endswith(">"):
            lowered = lowered[1:-1]
        encoded = lowered.encode("utf-8", "surrogateescape")
        if len(encoded) > MAX_ADDRESS:
            return None  # never stored (and beyond LMDB's key size with a scope)
        keys = [b"global\x00" + encoded]
        domain = sender_domain.strip().lower().rstrip(".")
        if domain and domain != GLOBAL and len(domain) <= 253:
            keys.append(domain.encode("utf-8", "surrogateescape") + b"\x00" + encoded)
        with self.env.begin(buffers=True) as txn:
            for key in keys:
                raw = txn.get(key)
                if raw is None:
                    continue
                expires = _VALUE.unpack_from(raw)[1]
                if expires and expires <= (time.time() if now is None else now):
                    continue
                return _decode(key, bytes(raw))
        return None

    def get(self, address: str, scope: str | None = None) -> Suppression | None:
        """The entry stored for *address* in *scope*, expired or not, or None."""
        key = _key(normalize_scope(scope), normalize_address(address))
        with self.env.begin() as txn:
            raw = txn.get(key)
        return None if raw is None else _decode(key, raw)

    def list(
        self,
        scope: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
        now: float | None = None,
    ) -> tuple[builtins.list[Suppression], str | None]:
        """Up to *limit* unexpired entries (of *scope* only, when given) in (scope, address)
        order after *cursor*, and the cursor of the next page (None at the end). A cursor
        is an opaque string; a malformed one raises SuppressionError. At most
        ``max(50 * limit, 10000)`` records are read per page, so a page may be short (with
        a cursor to go on from) where many expired entries await their sweep."""
        stamp = time.time() if now is None else now
        budget = max(50 * limit, 10_000)
        prefix = _key(normalize_scope(scope), "") if scope else b""
        after = _decode_cursor(cursor) if cursor else b""
        out: builtins.list[Suppression] = []
        last = b""
        with self.env.begin() as txn:
            walk = txn.cursor()
            start = max(after, prefix, FIRST_ENTRY)
            more = walk.set_range(start)
            if more and after and walk.key() == after:
                more = walk.next()
            while more:
                key = walk.key()
                if prefix and not key.startswith(prefix):
                    break
                budget -= 1
                if len(out) >= limit or (budget < 0 and last):
                    return out, _encode_cursor(last)
                value = walk.value()
                expires = _VALUE.unpack_from(value)[1]
                if not expires or expires > stamp:
                    out.append(_decode(key, value))
                last = key
                more = walk.next()
        return out, None

    def count(self) -> int:
        """Entries stored (expired ones included until swept)."""
        with self.env.begin() as txn:
            return changes.entry_count(txn)

    # --- writing ---------------------------------------------------------------------------

    def add(
        self,
        address: str,
        scope: str | None = None,
        reason: str = "",
        source: str = "api",
        expires: float = 0.0,
        now: float | None = None,
    ) -> Suppression:
        """Add (or replace) the entry for *address* in *scope*; returns it as stored.
        Raises SuppressionError for a bad address, scope, source or expiry."""
        entry = make_entry(address, scope, reason, source, expires, now)
        self.add_many([entry])
        return entry

    def add_many(self, entries: Iterable[Suppression]) -> int:
        """Store *entries* (made by :func:`make_entry` or :func:`parse_csv`), replacing
        any with the same address and scope, :data:`BATCH` per transaction, synced before
        it returns; how many were written."""
        written = 0
        batch: builtins.list[Suppression] = []
        for entry in entries:
            batch.append(entry)
            if len(batch) >= BATCH:
                written += self._put(batch)
                batch = []
        if batch:
            written += self._put(batch)
        if written:
            self.env.sync(True)
        self._added += written
        if self._added >= SWEEP_EVERY:
            self._added = 0
            self.sweep()
        return written

    def _put(self, batch: builtins.list[Suppression]) -> int:
        with self.env.begin(write=True) as txn:
            for entry in batch:
                txn.put(_key(entry.scope, entry.address), _encode(entry))
            changes.record(txn, (_change(entry) for entry in batch))
        return len(batch)

    def import_csv(
        self, lines: Iterable[str], *, source: str = "import", now: float | None = None
    ) -> int:
        """Add every entry of the CSV *lines* (see :func:`parse_csv`); all or nothing:
        a bad line raises SuppressionError before anything is stored. How many were
        added."""
        return self.add_many(parse_csv(lines, source=source, now=now))

    def remove(self, address: str, scope: str | None = None) -> bool:
        """Remove the entry for *address* in *scope* (default global); whether there was
        one."""
        key = _key(normalize_scope(scope), normalize_address(address))
        with self.env.begin(write=True) as txn:
            found: bool = txn.delete(key)
            if found:
                changes.record(txn, [Change(key, time.time(), None)])
        if found:
            self.env.sync(True)
        return found

    def sweep(self, now: float | None = None) -> int:
        """Remove expired entries; how many went."""
        stamp = time.time() if now is None else now

        def expired(value: bytes) -> bool:
            lapses = _VALUE.unpack_from(value)[1]
            return bool(lapses) and lapses <= stamp

        removed = delete_where(self.env, expired, start=FIRST_ENTRY)
        if removed:
            self.env.sync(True)
        return removed

    # --- the cluster's side (tachymail.cluster.replication) --------------------------------

    def apply_changes(self, batch: builtins.list[Change], at_least: bool) -> int:
        """Apply other nodes' changes (see tachymail.queue.changes.ReplicatedStore): an
        entry is written or removed where the change is newer than the local entry (or as
        new, with *at_least*), never recorded in the outbox; synced. A change that is not
        a valid entry is skipped. How many changed the list."""
        applied = 0
        for start in range(0, len(batch), BATCH):
            with self.env.begin(write=True) as txn:
                for change in batch[start : start + BATCH]:
                    applied += _apply(txn, change, at_least)
        if applied:
            self.env.sync(True)
        return applied

    def snapshot(self, after: bytes, limit: int) -> tuple[builtins.list[Change], bytes | None]:
        """Up to *limit* stored entries after key *after* as changes, and the key to go on
        from (None at the end)."""
        out: builtins.list[Change] = []
        with self.env.begin() as txn:
            walk = txn.cursor()
            more = walk.set_range(max(after, FIRST_ENTRY))
            if more and after and walk.key() == after:
                more = walk.next()
            while more:
                if len(out) >= limit:
                    return out, out[-1].key
                out.append(_change(_decode(bytes(walk.key()), bytes(walk.value()))))
                more = walk.next()
        return out, None


def _change(entry: Suppression) -> Change:
    """*entry* as a change for the cluster (its key says the address and scope)."""
    value: dict[str, object] = {
        "reason": entry.reason,
        "source": entry.source,
        "created": entry.created,
        "expires": entry.expires,
    }
    return Change(_key(entry.scope, entry.address), entry.created, value, entry.expires)


def _apply(txn: lmdb.Transaction, change: Change, at_least: bool) -> int:
    """Apply one remote *change* in the write transaction *txn*: 1 when it changed the list."""
    if b"\x00" not in change.key or len(change.key) > 511:
        return 0
    current = txn.get(change.key)
    if current is not None:
        held = _VALUE.unpack_from(current)[0]
        if change.stamp < held or (change.stamp == held and not at_least):
            return 0
    if change.value is None:
        return 1 if current is not None and txn.delete(change.key) else 0
    scope, _, address = change.key.partition(b"\x00")
    try:
        entry = make_entry(
            address.decode("utf-8", "surrogateescape"),
            scope.decode("utf-8", "surrogateescape"),
            str(change.value.get("reason", "")),
            str(change.value.get("source", "import")),
            float(change.value.get("expires", 0.0)),
            change.stamp,
        )
    except (SuppressionError, TypeError, ValueError):
        return 0
    encoded = _encode(entry)
    if current is not None and bytes(current) == encoded:
        return 0
    txn.put(_key(entry.scope, entry.address), encoded)
    return 1


_shared: dict[Path, SuppressionList] = {}
_shared_pid = 0


def shared_list(data_path: Path) -> SuppressionList:
    """This process's one :class:`SuppressionList` of *data_path* (opened on first use).
    LMDB must not open an environment twice in one process, so every user in a process
    (the SMTP RCPT check, the HTTP API, the delivery worker) takes it from here; a forked
    child opens its own rather than use its parent's."""
    global _shared_pid
    if _shared_pid != os.getpid():
        _shared.clear()  # the parent's handles: never used (nor closed) after a fork
        _shared_pid = os.getpid()
    key = data_path.resolve()
    found = _shared.get(key)
    if found is None:
        found = _shared[key] = SuppressionList(key)
    return found


def _encode_cursor(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode().rstrip("=")


def _decode_cursor(cursor: str) -> bytes:
    try:
        key = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if b"\x00" not in key or len(key) > 511:  # LMDB's longest key
        raise SuppressionError(f"not a cursor: {cursor!r}")
    return key


__all__ = [
    "GLOBAL",
    "SOURCES",
    "Suppression",
    "SuppressionError",
    "SuppressionList",
    "make_entry",
    "normalize_address",
    "normalize_scope",
    "parse_csv",
    "parse_expiry",
    "shared_list",
]

"""A delivery worker's side of destinations: honouring suspensions, publishing status.

:class:`DestinationGate` tells the scheduler which recipients not to attempt because their
domain, or a host of their next hop, is suspended (tachymail.queue.suspensions). Such a
recipient stays queued with no attempt counted and no DSN: its next attempt moves to the
end of the suspension, or one minute on (:data:`RECHECK`) for a suspension without an end,
so it is looked at again then. When the worker sees a suspension lifted early (resumed),
the recipients it postponed under it are made due at once (remembered in memory, up to
:data:`REMEMBERED`; after a restart, or beyond that, they go at their next look, within a
minute). Attempts already under way when a suspension begins finish.

:class:`DestinationStats` counts, per recipient domain, the recipients in flight, the
attempts over the last minute, the last error and the next hop, and publishes them with
the next hops' open connections (tachymail.queue.destinations) at most once a second.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from tachymail.metrics import m
from tachymail.queue.destinations import RATE_WINDOW, remove_status, write_status
from tachymail.queue.envelope import QUEUED, Recipient
from tachymail.queue.store import Operation, QueueStore
from tachymail.queue.suspensions import Suspension, Suspensions, match, match_source

log = logging.getLogger(__name__)

#: seconds until a recipient of an open-ended suspension is looked at again
RECHECK = 60.0
#: postponed messages remembered per worker for an immediate release on resume
REMEMBERED = 100_000
#: seconds between status files (and between looks for lifted suspensions)
PUBLISH_EVERY = 1.0
#: domains whose counts a worker keeps; the least recently active go first beyond it
MAX_DOMAINS = 2000
#: a domain with nothing in flight and no attempt for this long is forgotten (seconds)
FORGET_AFTER = 600.0


def _key(suspension: Suspension) -> tuple[str, float]:
    return suspension.key, suspension.created


class DestinationGate:
    """The suspensions as one delivery worker sees them (see the module doc)."""

    def __init__(self, data_path: Path) -> None:
        self.suspensions: Suspensions | None = None
        try:
            self.suspensions = Suspensions(data_path)
        except (lmdb.Error, OSError) as exc:
            # Delivery goes on; only suspensions are not honoured (said once, loudly).
            log.error("cannot open the suspensions (%s): deliveries cannot be suspended", exc)
        #: suspension (destination, created) -> queue id -> recipient indices postponed
        self.postponed: dict[tuple[str, float], dict[str, list[int]]] = {}
        self.remembered = 0
        #: suspensions already logged, and the destinations whose gauge is 1
        self.logged: dict[tuple[str, float], Suspension] = {}
        self.gauged: set[str] = set()
        self.sourced: set[tuple[str, str]] = set()

    def _table(self, now: float) -> dict[str, Suspension]:
        """The cached suspensions table (empty when it cannot be read: logged)."""
        if self.suspensions is None:
            return {}
        try:
            return self.suspensions.cached(now)
        except lmdb.Error as exc:
            log.error("suspensions unreadable: %s", exc)
            return {}

    def check(self, names: Iterable[str], now: float) -> Suspension | None:
        """The suspension in force for any of *names* (a domain, next-hop hosts), or None;
        reads the cached table (one key read a second at most)."""
        return match(self._table(now), names, now)

    def check_source(self, names: Iterable[str], source: str, now: float) -> Suspension | None:
        """The suspension in force for mail from egress *source* to any of *names*."""
        return match_source(self._table(now), names, source, now)

    def suspend_all(
        self, destinations: Iterable[str], until: float, reason: str, source: str = ""
    ) -> None:
        """Suspend each of *destinations* (of *source* only, if given) until *until*: a
        shaping reaction. Blocks on a synced write: call it off the event loop."""
        if self.suspensions is None:
            return
        for destination in destinations:
            self.suspensions.suspend(destination, until, reason, source=source)
        self.suspensions.invalidate()

    def postpone(
        self,
        queue_id: str,
        held: Sequence[tuple[Suspension, Sequence[tuple[int, Recipient]]]],
        now: float,
    ) -> Operation:
        """The queue operation that moves the next attempt of the *held* recipients of
        *queue_id* to the end of their suspension (or RECHECK seconds on), counting no
        attempt; logs each suspension the first time it holds a recipient back."""
        moves: dict[int, float] = {}
        for suspension, rcpts in held:
            key = _key(suspension)
            if key not in self.logged:
                self.logged[key] = suspension
                until = (
                    time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(suspension.until))
                    if suspension.until
                    else "resumed"
                )
                log.warning(
                    "deliveries to %s suspended until %s%s: recipients stay queued",
                    suspension.destination,
                    until,
                    f" ({suspension.reason})" if suspension.reason else "",
                    extra={"fields": {"event": "destination_suspended", **suspension.as_dict()}},
                )
            when = min(suspension.until, now + RECHECK) if suspension.until else now + RECHECK
            for index, _ in rcpts:
                moves[index] = when
            if self.remembered < REMEMBERED:
                indices = self.postponed.setdefault(key, {}).setdefault(queue_id, [])
                indices.extend(index for index, _ in rcpts)
                self.remembered += 1
        return _move_attempts(queue_id, moves, only_later=False)

    def lifted(self, now: float) -> list[tuple[str, Operation]]:
        """Look (at most once a second, by the caller) for suspensions lifted: keeps the
        gauge and the log up to date, and returns (queue id, operation) pairs that make due
        the recipients this worker postponed under a suspension now gone."""
        if self.suspensions is None:
            return []
        try:
            table = self.suspensions.cached(now)
        except lmdb.Error as exc:
            log.error("suspensions unreadable: %s", exc)
            return []
        live = {_key(s) for s in table.values() if s.active(now)}
        names = {s.destination for s in table.values() if s.active(now) and not s.source}
        sourced = {(s.source, s.destination) for s in table.values() if s.active(now) and s.source}
        for source, name in sourced - self.sourced:
            m.source_suspended.labels(source, name).set(1)
        for source, name in self.sourced - sourced:
            m.source_suspended.labels(source, name).set(0)
        self.sourced = sourced
        for name in names - self.gauged:
            m.destination_suspended.labels(name).set(1)
        for name in self.gauged - names:
            m.destination_suspended.labels(name).set(0)
        self.gauged = names
        for key in [k for k in self.logged if k not in live]:
            suspension = self.logged.pop(key)
            log.info(
                "deliveries to %s resumed",
                suspension.destination,
                extra={"fields": {"event": "destination_resumed", **suspension.as_dict()}},
            )
        operations: list[tuple[str, Operation]] = []
        for key in [k for k in self.postponed if k not in live]:
            for queue_id, indices in self.postponed.pop(key).items():
                self.remembered -= 1
                release = _move_attempts(queue_id, dict.fromkeys(indices, now), only_later=True)
                operations.append((queue_id, release))
        return operations

    def close(self) -> None:
        if self.suspensions is not None:
            self.suspensions.close()


def _move_attempts(queue_id: str, moves: dict[int, float], only_later: bool) -> Operation:
    """Set the next attempt of recipients (index -> time) still queued; with *only_later*,
    only of those whose next attempt is later than that (a release never delays)."""

    def operation(store: QueueStore, txn: lmdb.Transaction) -> None:
        envelope = store.load(txn, queue_id)
        if envelope is None:
            return  # delivered, deleted or bounced meanwhile
        changed = False
        for index, when in moves.items():
            if index >= len(envelope.recipients):
                continue
            rcpt = envelope.recipients[index]
            if rcpt.state != QUEUED or (only_later and rcpt.next_attempt <= when):
                continue
            rcpt.next_attempt = when
            changed = True
        if changed:
            store.save(txn, envelope)

    return operation


@dataclass(slots=True)
class _Domain:
    next_hop: str = ""
    hosts: tuple[str, ...] = ()
    in_flight: int = 0
    # attempts per second of the last RATE_WINDOW seconds: count and the second it is of
    counts: list[int] = field(default_factory=lambda: [0] * RATE_WINDOW)
    seconds: list[int] = field(default_factory=lambda: [0] * RATE_WINDOW)
    last_error: dict[str, Any] | None = None
    active: float = 0.0

    def attempts(self, now: float) -> int:
        second = int(now)
        return sum(
            c for c, s in zip(self.counts, self.seconds, strict=True) if second - s < RATE_WINDOW
        )


class DestinationStats:
    """Per-domain counts of one delivery worker, published as its status file."""

    def __init__(self, data_path: Path, index: int) -> None:
        self.data_path = data_path
        self.index = index
        self.domains: dict[str, _Domain] = {}
        self.published = 0.0
        self.failed = False

    def _domain(self, name: str, now: float) -> _Domain:
        entry = self.domains.get(name)
        if entry is None:
            if len(self.domains) >= MAX_DOMAINS:
                # The least recently active tenth at once: a long tail of new domains
                # costs one sort per MAX_DOMAINS / 10 of them, not one per domain.
                idle = sorted((d.active, n) for n, d in self.domains.items() if not d.in_flight)
                for _, old in idle[: MAX_DOMAINS // 10]:
                    del self.domains[old]
            entry = self.domains[name] = _Domain()
        entry.active = now
        return entry

    def routed(self, domain: str, next_hop: str, hosts: tuple[str, ...]) -> None:
        entry = self._domain(domain, time.time())
        entry.next_hop, entry.hosts = next_hop, hosts

    def begin(self, domains: Iterable[str]) -> None:
        """Recipients at *domains* (one item each) go in flight."""
        now = time.time()
        for name in domains:
            self._domain(name, now).in_flight += 1

    def end(self, domains: Iterable[str]) -> None:
        for name in domains:
            entry = self.domains.get(name)
            if entry is not None and entry.in_flight:
                entry.in_flight -= 1

    def attempted(self, domain: str, ok: bool, code: int, reply: str, now: float) -> None:
        """One recipient's attempt at *domain*; a failure (*ok* False) is its last error."""
        entry = self._domain(domain, now)
        second = int(now)
        slot = second % RATE_WINDOW
        if entry.seconds[slot] != second:
            entry.seconds[slot], entry.counts[slot] = second, 0
        entry.counts[slot] += 1
        if not ok:
            entry.last_error = {"code": code, "reply": reply[:500], "time": round(now, 3)}

    def publish(
        self, connections: dict[str, int], now: float, extra: dict[str, Any] | None = None
    ) -> None:
        """Write the status file (*connections*: open connections per next hop; *extra*:
        more top-level fields, the shaping state) if a second has passed since the last."""
        if now - self.published < PUBLISH_EVERY:
            return
        self.published = now
        for name in [
            n for n, d in self.domains.items() if not d.in_flight and now - d.active > FORGET_AFTER
        ]:
            del self.domains[name]
        status = {
            "time": round(now, 3),
            "pid": os.getpid(),
            "index": self.index,
            "domains": {
                name: {
                    "next_hop": d.next_hop,
                    "hosts": list(d.hosts),
                    "in_flight": d.in_flight,
                    "attempts": d.attempts(now),
                    "last_error": d.last_error,
                }
                for name, d in self.domains.items()
            },
            "hops": {key: {"connections": n} for key, n in connections.items() if n},
            **(extra or {}),
        }
        try:
            write_status(self.data_path, self.index, status)
            self.failed = False
        except OSError as exc:
            if not self.failed:  # once per run of failures, not every second
                log.warning("cannot publish the destination status: %s", exc)
            self.failed = True

    def close(self) -> None:
        remove_status(self.data_path, self.index)

"""Egress sources and pools: which local address (and EHLO name) a message leaves from.

A message names its pool in the HTTP API's ``pool`` field, or in an ``X-Tachymail-Pool``
header (removed before the message is sent, here), or gets one by an ``[[egress_pool]]``
``sender_domains`` rule on its sender's domain; otherwise it uses the default pool, which
sends from the host's default address with the usual EHLO name. Within a pool the sources
take turns in proportion to their weights (smooth weighted round robin: a 3:1 pool sends
A A B A, never A A A B in bursts), skipping the sources that are suspended towards the
destination (tachymail.delivery.shaping reactions) or have reached their warm-up cap.

Warm-up: ``warmup_start`` and ``warmup_daily`` make a source send at most the day's count
(day 1 of the schedule, day 2, ...; UTC days), then nothing more until the next day, when
the message goes from another source of its pool, or waits. Each delivery worker keeps its
share of the cap (cap / workers) and writes its count to ``data_dir/warmup/`` at most once
a second, so a restart goes on from it.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from tachymail.config import Config, parse_rate

log = logging.getLogger(__name__)

#: the header that names a message's pool (removed before sending)
POOL_HEADER = b"x-tachymail-pool"
DEFAULT = "default"


@dataclass(frozen=True, slots=True)
class Source:
    """One local address to send from ("" = the host's default)."""

    name: str
    address: str = ""
    helo: str = ""
    max_connections: int = 0
    rate: float = 0.0
    warmup_start: datetime.date | None = None
    warmup_daily: tuple[int, ...] = ()

    def daily_cap(self, day: datetime.date) -> int:
        """The warm-up cap for *day* (0: none: no schedule, or past its last day)."""
        if self.warmup_start is None or not self.warmup_daily:
            return 0
        index = max(0, (day - self.warmup_start).days)
        return self.warmup_daily[index] if index < len(self.warmup_daily) else 0


DEFAULT_SOURCE = Source(DEFAULT)


@dataclass(slots=True)
class _Pool:
    name: str
    members: list[tuple[Source, int]]
    #: the smooth weighted round robin's running scores, by source name
    scores: dict[str, int] = field(default_factory=dict)


def pool_header(content: bytes) -> tuple[str, bytes]:
    """The pool an ``X-Tachymail-Pool`` header names ("" if none) and *content* without
    that header (every occurrence, folded lines included). Only the header block is read."""
    end = content.find(b"\r\n\r\n")
    head = content[: end + 2] if end >= 0 else content
    lowered = head.lower()
    tag = POOL_HEADER + b":"
    if not (lowered.startswith(tag) or b"\n" + tag in lowered):
        return "", content  # the common case: one lower() and one search
    name = ""
    kept: list[bytes] = []
    skipping = False
    for line in head.split(b"\r\n")[:-1] if end >= 0 else head.split(b"\r\n"):
        if skipping and line[:1] in (b" ", b"\t"):
            continue  # the removed header's folded continuation
        skipping = line[: len(tag)].lower() == tag
        if skipping:
            name = name or line[len(tag) :].decode("ascii", "replace").strip()
            continue
        kept.append(line + b"\r\n")
    return name, b"".join(kept) + content[len(head) :]


class Egress:
    """A delivery worker's sources and pools (see the module doc)."""

    def __init__(self, config: Config, index: int = 0, workers: int = 1) -> None:
        self.workers = max(1, workers)
        self.sources: dict[str, Source] = {}
        for item in config.egress_sources:
            self.sources[item.name] = Source(
                item.name,
                item.address,
                item.ehlo_name,
                item.max_connections,
                parse_rate(item.rate) if item.rate else 0.0,
                datetime.date.fromisoformat(item.warmup_start) if item.warmup_start else None,
                tuple(item.warmup_daily),
            )
        self.pools: dict[str, _Pool] = {}
        self.by_sender: dict[str, str] = {}
        for pool in config.egress_pools:
            members = [
                (self.sources[str(m["name"])], int(m.get("weight", 1))) for m in pool.sources
            ]
            self.pools[pool.name] = _Pool(pool.name, members)
            for domain in pool.sender_domains:
                self.by_sender.setdefault(domain.lower(), pool.name)
        self.warned: set[str] = set()
        #: warm-up counts of this worker: source -> (day, messages sent that day)
        self.counts: dict[str, tuple[datetime.date, int]] = {}
        self.count_dir = config.data_path / "warmup"
        self.index = index
        self.saved = 0.0
        self.dirty = False
        if any(s.warmup_daily for s in self.sources.values()):
            self._restore()

    @property
    def active(self) -> bool:
        """Whether any pool is configured (without, every message uses the default)."""
        return bool(self.pools)

    def pool_of(self, requested: str, sender: str) -> str:
        """The pool for a message that asked for *requested* ("" = none) from *sender*."""
        if requested:
            if requested in self.pools:
                return requested
            if requested != DEFAULT and requested not in self.warned:
                self.warned.add(requested)
                log.warning("egress pool %r is not configured: using the default", requested)
            return DEFAULT
        if self.by_sender:
            return self.by_sender.get(sender.rpartition("@")[2].lower(), DEFAULT)
        return DEFAULT

    def pick(self, pool_name: str, usable: Callable[[Source], bool]) -> Source | None:
        """The next source of the pool by weight among those *usable* says may send now;
        None when none may (all suspended or capped). The default pool: the default source."""
        pool = self.pools.get(pool_name)
        if pool is None:
            return DEFAULT_SOURCE
        scores = pool.scores
        best: Source | None = None
        total = 0
        for source, weight in pool.members:
            if not usable(source) or self.capped(source):
                continue
            total += weight
            score = scores.get(source.name, 0) + weight
            scores[source.name] = score
            if best is None or score > scores[best.name]:
                best = source
        if best is not None:
            scores[best.name] -= total
        return best

    # --- warm-up ------------------------------------------------------------------------------

    def _today(self) -> datetime.date:
        return datetime.datetime.now(datetime.UTC).date()

    def capped(self, source: Source) -> bool:
        """Whether *source* has sent its share of today's warm-up cap."""
        if not source.warmup_daily:
            return False
        today = self._today()
        cap = source.daily_cap(today)
        if not cap:
            return False
        day, sent = self.counts.get(source.name, (today, 0))
        return day == today and sent >= math.ceil(cap / self.workers)

    def sent(self, source: Source, messages: int = 1) -> None:
        """Count *messages* sent from *source* today (for its warm-up cap)."""
        if not source.warmup_daily:
            return
        today = self._today()
        day, count = self.counts.get(source.name, (today, 0))
        self.counts[source.name] = (today, (count if day == today else 0) + messages)
        self.dirty = True
        if time.monotonic() - self.saved >= 1.0:
            self.save()

    def next_day(self) -> float:
        """Epoch seconds of the next UTC midnight (when warm-up caps reset)."""
        tomorrow = self._today() + datetime.timedelta(days=1)
        return datetime.datetime.combine(tomorrow, datetime.time(), datetime.UTC).timestamp()

    def _path(self) -> Path:
        return self.count_dir / f"worker-{self.index}.json"

    def save(self) -> None:
        if not self.dirty:
            return
        self.saved = time.monotonic()
        self.dirty = False
        data = {name: [day.isoformat(), count] for name, (day, count) in self.counts.items()}
        try:
            self.count_dir.mkdir(parents=True, exist_ok=True)
            tmp = self._path().with_suffix(".tmp")
            tmp.write_bytes(orjson.dumps(data))
            os.replace(tmp, self._path())
        except OSError as exc:  # the count lives on in memory
            log.warning("warm-up counts not saved: %s", exc)

    def _restore(self) -> None:
        try:
            data = orjson.loads(self._path().read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return
        today = self._today()
        for name, (day, count) in data.items():
            if name in self.sources and day == today.isoformat():
                self.counts[name] = (today, int(count))

"""What ``tachymail bench`` counts: outcomes by reply code and a latency histogram.

Each generator process keeps its own :class:`BenchStats`; the parent merges
them (``to_dict`` / ``from_dict`` carry them through a pipe as JSON).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# Latencies are kept in microseconds; values from 256 us up share a bucket with the values
# that agree in their top 8 bits, so a percentile is off by less than 1 %.
_EXACT = 256


def _bucket(us: int) -> int:
    if us < _EXACT:
        return us
    shift = us.bit_length() - 8
    return (shift << 8) | (us >> shift)


def _bucket_value(key: int) -> float:
    """The middle of a bucket, in microseconds."""
    if key < _EXACT:
        return float(key)
    shift, mantissa = key >> 8, key & 0xFF
    return ((mantissa << shift) + ((mantissa + 1) << shift)) / 2


class LatencyHistogram:
    """Latencies in seconds, kept in buckets with under 1 % relative error; mergeable."""

    __slots__ = ("count", "counts", "max_us")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.max_us = 0

    def add(self, seconds: float) -> None:
        us = int(seconds * 1_000_000)
        key = _bucket(us) if us >= _EXACT else us
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        self.count += 1
        if us > self.max_us:
            self.max_us = us

    def merge(self, other: LatencyHistogram) -> None:
        for key, n in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + n
        self.count += other.count
        self.max_us = max(self.max_us, other.max_us)

    def percentile(self, pct: float) -> float:
        """The latency in seconds that *pct* percent of the values do not exceed (0 if empty)."""
        if not self.count:
            return 0.0
        rank = max(1, round(self.count * pct / 100))
        seen = 0
        for key in sorted(self.counts):
            seen += self.counts[key]
            if seen >= rank:
                return min(_bucket_value(key), self.max_us) / 1_000_000
        return self.max_us / 1_000_000

    @property
    def max(self) -> float:
        return self.max_us / 1_000_000

    def to_dict(self) -> dict[str, Any]:
        return {"counts": {str(k): v for k, v in self.counts.items()}, "max_us": self.max_us}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyHistogram:
        hist = cls()
        hist.counts = {int(k): int(v) for k, v in data["counts"].items()}
        hist.count = sum(hist.counts.values())
        hist.max_us = int(data["max_us"])
        return hist


@dataclass
class BenchStats:
    """Counters of one run (or one process of it).

    Every message started ends in exactly one way: a reply code in ``codes``
    (the reply to the end of data, or the first refusal before it: MAIL's, or
    RCPT's when every recipient was refused, or DATA's), or ``errors`` when the
    connection broke before any of those came.
    """

    codes: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    #: recipients refused, by code, in messages that were still sent
    rcpt_codes: Counter[int] = field(default_factory=Counter)
    #: connections that could not be set up, or broke, by reason
    conn_errors: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    elapsed: float = 0.0
    octets: int = 0

    @property
    def sent(self) -> int:
        return sum(self.codes.values()) + self.errors

    @property
    def accepted(self) -> int:
        return sum(n for code, n in self.codes.items() if 200 <= code < 300)

    @property
    def deferred(self) -> int:
        return sum(n for code, n in self.codes.items() if 400 <= code < 500)

    @property
    def rejected(self) -> int:
        return sum(n for code, n in self.codes.items() if code >= 500)

    def merge(self, other: BenchStats) -> None:
        self.codes.update(other.codes)
        self.rcpt_codes.update(other.rcpt_codes)
        self.conn_errors.update(other.conn_errors)
        self.errors += other.errors
        self.connections += other.connections
        self.latency.merge(other.latency)
        self.elapsed = max(self.elapsed, other.elapsed)
        self.octets += other.octets

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to merge this elsewhere (see :meth:`from_dict`)."""
        return {
            "codes": {str(k): v for k, v in self.codes.items()},
            "rcpt_codes": {str(k): v for k, v in self.rcpt_codes.items()},
            "conn_errors": dict(self.conn_errors),
            "errors": self.errors,
            "connections": self.connections,
            "latency": self.latency.to_dict(),
            "elapsed": self.elapsed,
            "octets": self.octets,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchStats:
        return cls(
            codes=Counter({int(k): v for k, v in data["codes"].items()}),
            rcpt_codes=Counter({int(k): v for k, v in data["rcpt_codes"].items()}),
            conn_errors=Counter(data["conn_errors"]),
            errors=data["errors"],
            connections=data["connections"],
            latency=LatencyHistogram.from_dict(data["latency"]),
            elapsed=data["elapsed"],
            octets=data["octets"],
        )

    def summary(self) -> dict[str, Any]:
        """The end-of-run summary as plain data: what ``--json`` prints.

        Keys: sent, accepted, deferred (4xx), rejected (5xx), errors (no reply),
        replies (code -> count), rcpt_replies (refused recipients by code),
        connections, connection_errors (total) and connection_error_reasons,
        elapsed_s, msgs_per_s (messages sent / elapsed), accepted_per_s,
        octets (message octets sent), latency_s {p50, p90, p99, max, count}.
        """
        elapsed = self.elapsed or 1e-9
        lat = self.latency
        return {
            "sent": self.sent,
            "accepted": self.accepted,
            "deferred": self.deferred,
            "rejected": self.rejected,
            "errors": self.errors,
            "replies": {str(k): self.codes[k] for k in sorted(self.codes)},
            "rcpt_replies": {str(k): self.rcpt_codes[k] for k in sorted(self.rcpt_codes)},
            "connections": self.connections,
            "connection_errors": sum(self.conn_errors.values()),
            "connection_error_reasons": dict(self.conn_errors.most_common()),
            "elapsed_s": round(self.elapsed, 6),
            "msgs_per_s": round(self.sent / elapsed, 1),
            "accepted_per_s": round(self.accepted / elapsed, 1),
            "octets": self.octets,
            "latency_s": {
                "p50": lat.percentile(50),
                "p90": lat.percentile(90),
                "p99": lat.percentile(99),
                "max": lat.max,
                "count": lat.count,
            },
        }

    def summary_json(self) -> str:
        return json.dumps(self.summary())

    def summary_text(self) -> str:
        """The summary for people: a few aligned lines."""
        s = self.summary()
        lat = s["latency_s"]

        def codes(table: dict[str, int]) -> str:
            return ", ".join(f"{code}: {n:,}" for code, n in table.items()) or "none"

        lines = [
            f"sent        {s['sent']:,} messages in {s['elapsed_s']:.2f} s "
            f"({s['msgs_per_s']:,.0f} msgs/s, {s['octets'] / 1e6:,.1f} MB)",
            f"accepted    {s['accepted']:,}    deferred (4xx) {s['deferred']:,}    "
            f"rejected (5xx) {s['rejected']:,}    no reply {s['errors']:,}",
            f"replies     {codes(s['replies'])}",
        ]
        if s["rcpt_replies"]:
            lines.append(f"RCPT        refused recipients: {codes(s['rcpt_replies'])}")
        lines.append(
            f"latency     p50 {_ms(lat['p50'])}  p90 {_ms(lat['p90'])}  p99 {_ms(lat['p99'])}  "
            f"max {_ms(lat['max'])}  (MAIL to the final reply)"
        )
        reasons = "; ".join(f"{why}: {n}" for why, n in s["connection_error_reasons"].items())
        lines.append(
            f"connections {s['connections']:,} used, {s['connection_errors']:,} errors"
            + (f" ({reasons})" if reasons else "")
        )
        return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"

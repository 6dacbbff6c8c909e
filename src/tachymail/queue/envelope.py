"""What the queue keeps about a message besides its content: the envelope record."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, fields
from itertools import count
from typing import Any

import orjson

#: Bumped whenever the record layout changes; readers convert older versions.
#: 2: delivery state (per-recipient attempts, replies, next attempt; message due time).
#: Version 1 records read as version 2 with those fields at their defaults.
SCHEMA_VERSION = 2

# Recipient states. "queued" ones still have to be delivered.
QUEUED = "queued"
DELIVERED = "delivered"
BOUNCED = "bounced"

# Message states.
ACTIVE = "active"
HELD = "held"

_counter = count()


def pid_bits(pid: int) -> int:
    """The pid part of queue ids: the whole pid, which Linux keeps below 2**22."""
    return pid & 0x3FFFFF


# The pid part of queue ids, kept rather than asked for per message (a system call), and
# renewed in forked children so two processes never share it.
_pid_bits = pid_bits(os.getpid())


def _renew_pid_bits() -> None:
    global _pid_bits
    _pid_bits = pid_bits(os.getpid())


os.register_at_fork(after_in_child=_renew_pid_bits)


def new_queue_id() -> str:
    """A unique, time-sortable queue id: milliseconds, process id, per-process counter.

    20 hex digits: 44 bits of milliseconds, the 22 bits of the pid, a 14-bit counter.
    Ids sort by arrival, so the oldest message is the first key. Two live processes never
    share a pid, so ids repeat only if one process makes over 16,384 in one millisecond
    or the clock steps back; the store refuses such a repeat (QueueIdTaken), never
    overwriting.
    """
    millis = time.time_ns() // 1_000_000
    return f"{millis:011x}{(_pid_bits << 14) | (next(_counter) & 0x3FFF):09x}"


@dataclass(slots=True)
class Recipient:
    """One forward-path with its RCPT parameters (NOTIFY, ORCPT) and delivery state."""

    address: str
    params: dict[str, str] = field(default_factory=dict)
    state: str = QUEUED
    attempts: int = 0
    #: unix time of the next attempt (0: as soon as possible)
    next_attempt: float = 0.0
    last_attempt: float = 0.0
    #: the last reply (or local reason) and the enhanced status it gave
    last_reply: str = ""
    status: str = ""
    remote_mta: str = ""


@dataclass(slots=True)
class Envelope:
    """Everything SMTP said about a message, stored with it before "250 OK"."""

    id: str
    sender: str
    recipients: list[Recipient]
    mail_params: dict[str, str] = field(default_factory=dict)
    arrival: float = 0.0
    size: int = 0
    client_ip: str = ""
    client_port: int = 0
    helo: str = ""
    listener: str = ""
    tls: str | None = None
    auth: str | None = None
    state: str = ACTIVE
    #: when the schedule index next lists it (0: not scheduled: held, or nothing left to do)
    due: float = 0.0
    #: a delay warning (RFC 3464 "delayed") was already sent
    warned: bool = False
    #: from the HTTP API's injection: the caller's tags and metadata, returned in every
    #: event of the message, and the egress pool it asked for ("" = the default)
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    pool: str = ""
    version: int = SCHEMA_VERSION

    def to_record(self) -> bytes:
        # Built by hand: dataclasses.asdict deep-copies recursively and is several times
        # slower, and this runs once per accepted message.
        record = {name: getattr(self, name) for name in _FIELDS}
        record["recipients"] = [
            {name: getattr(r, name) for name in _RCPT_FIELDS} for r in self.recipients
        ]
        return orjson.dumps(record)

    @classmethod
    def from_record(cls, raw: bytes | memoryview) -> Envelope:
        data: dict[str, Any] = orjson.loads(raw)
        version = data.get("version", 1)
        if version > SCHEMA_VERSION:
            raise ValueError(f"queue record schema {version} is newer than this tachymail")
        data = {_FIELD_NAMES.get(key, key): value for key, value in data.items()}
        data["recipients"] = [
            Recipient(**{_RCPT_NAMES.get(key, key): value for key, value in r.items()})
            for r in data["recipients"]
        ]
        data["version"] = SCHEMA_VERSION
        return cls(**data)

    def pending(self) -> list[Recipient]:
        """Recipients still to be delivered."""
        return [r for r in self.recipients if r.state == QUEUED]

    def next_due(self) -> float:
        """When the scheduler should look at this message again (0: never)."""
        if self.state == HELD:
            return 0.0
        times = [r.next_attempt or self.arrival for r in self.recipients if r.state == QUEUED]
        return min(times) if times else 0.0

    def summary(self) -> dict[str, Any]:
        """The record as plain data, for `tachymail queue list --json` and `show`."""
        return asdict(self)


_FIELDS = [f.name for f in fields(Envelope)]
_RCPT_FIELDS = [f.name for f in fields(Recipient)]
# The decoded record's keys are equal to the field names but not the same objects, and a
# keyword argument is matched to its parameter by identity first, else by comparing it
# with every parameter name in turn: some 250 string comparisons per record. Keyed by the
# field names' own (interned) strings, each keyword is found at once.
_FIELD_NAMES = {name: name for name in _FIELDS}
_RCPT_NAMES = {name: name for name in _RCPT_FIELDS}

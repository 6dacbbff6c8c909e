"""Which queued messages an operator means: the filters of `tachymail queue list`,
`queue summary` and `mailq` (state, destination domain, sender, age, last reason)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tachymail.queue.envelope import Envelope
from tachymail.queue.stats import message_state, recipient_domain

_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)", re.IGNORECASE)
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "": 60}


def parse_age(text: str) -> float:
    """Seconds in "90s", "30m", "2h", "1d" or a bare number of minutes (qshape's unit).

    Raises ValueError for anything else.
    """
    found = _AGE.fullmatch(text.strip())
    if found is None:
        raise ValueError(f"not an age: {text!r} (say 30s, 15m, 2h or 1d)")
    return float(found[1]) * _UNIT[found[2].lower()]


@dataclass(frozen=True, slots=True)
class MessageFilter:
    """Conditions a message must all meet; a condition left at None is not checked.

    - state: "active", "deferred" or "held" (see queue.stats.message_state);
    - domain: a pending recipient at this domain (case-insensitive);
    - sender: the envelope sender, an address or a domain (case-insensitive); "<>" or
      "" the null sender (bounces);
    - recipient: a pending recipient with this address (case-insensitive);
    - older_than: seconds since arrival, at least;
    - reason: a regular expression found (re.search, case-insensitive) in the last reply
      of a pending recipient.
    """

    state: str | None = None
    domain: str | None = None
    sender: str | None = None
    older_than: float | None = None
    reason: re.Pattern[str] | None = None
    recipient: str | None = None

    @property
    def active(self) -> bool:
        """Whether any condition is set."""
        return any(
            v is not None
            for v in (
                self.state,
                self.domain,
                self.sender,
                self.older_than,
                self.reason,
                self.recipient,
            )
        )

    def matches(self, envelope: Envelope, now: float) -> bool:
        if self.state is not None and message_state(envelope, now) != self.state:
            return False
        if self.older_than is not None and now - envelope.arrival < self.older_than:
            return False
        if self.sender is not None and not _sender_matches(envelope.sender, self.sender):
            return False
        pending = envelope.pending()
        if self.domain is not None:
            wanted = self.domain.lower().strip(".")
            if not any(recipient_domain(r) == wanted for r in pending):
                return False
        if self.recipient is not None:
            address = self.recipient.lower().strip("<>")
            if not any(r.address.lower() == address for r in pending):
                return False
        if self.reason is not None:
            reason = self.reason
            if not any(reason.search(r.last_reply) for r in pending if r.last_reply):
                return False
        return True


def _sender_matches(sender: str, wanted: str) -> bool:
    if wanted in ("<>", ""):
        return not sender
    sender, wanted = sender.lower(), wanted.lower().strip("<>")
    if "@" in wanted:
        return sender == wanted
    return sender.rpartition("@")[2] == wanted.lstrip("@")


def compile_reason(pattern: str) -> re.Pattern[str]:
    """The --reason pattern, compiled case-insensitive; raises ValueError when invalid."""
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {pattern!r} ({exc})") from exc

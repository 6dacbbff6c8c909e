"""How the queue commands print the queue: `queue list`, `queue show`, `queue summary`
and `mailq` (the layout of Postfix's ``postqueue -p``), as text or as JSON.

Every function takes envelopes already read from one snapshot of the queue and the
instant *now* at which states are decided (see tachymail.queue.stats.message_state).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from typing import TextIO

from tachymail.queue.admin import message_data as message_data
from tachymail.queue.admin import show_data as show_data
from tachymail.queue.envelope import Envelope
from tachymail.queue.stats import (
    ACTIVE,
    AGE_BUCKETS,
    DEFERRED,
    STATES,
    QueueShape,
    last_reason,
    message_state,
)


def _clock(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def list_line(envelope: Envelope, now: float) -> str:
    """One `queue list` line: id, size, state, arrival, next attempt, sender -> recipients,
    and the last reason in parentheses when there is one."""
    state = message_state(envelope, now)
    if state == DEFERRED:
        nxt = _clock(envelope.due)
    elif state == ACTIVE:
        nxt = "now"
    else:
        nxt = "on hold"
    rcpts = ", ".join(r.address for r in envelope.pending()) or "-"
    reason = last_reason(envelope)
    tail = f"  ({reason})" if reason else ""
    return (
        f"{envelope.id}  {envelope.size:>9}  {state:<8}  {_clock(envelope.arrival)}  "
        f"next {nxt:<19}  <{envelope.sender}> -> {rcpts}{tail}"
    )


def print_list(
    envelopes: Iterable[Envelope], now: float, out: TextIO, *, as_json: bool, total: int
) -> None:
    """`queue list`: a line (or a JSON object) per message; in text, a line saying so when
    nothing is listed (the queue is empty, or *total* messages of which none matched)."""
    shown = 0
    for envelope in envelopes:
        shown += 1
        if as_json:
            out.write(json.dumps(message_data(envelope, now)) + "\n")
        else:
            out.write(list_line(envelope, now) + "\n")
    if shown or as_json:
        return
    if total:
        out.write(f"no message matches ({total} in the queue)\n")
    else:
        out.write("the queue is empty\n")


# --- mailq, the layout of Postfix's postqueue -p ------------------------------------------

_MARK = {ACTIVE: "*", "held": "!", DEFERRED: " "}

#: the width of a queue id (tachymail.queue.envelope.new_queue_id: 20 hex digits)
QUEUE_ID_WIDTH = 20


def print_mailq(envelopes: Iterable[Envelope], now: float, out: TextIO) -> None:
    """The queue as ``mailq``/``postqueue -p`` print it.

    Per message: queue id followed by ``*`` (active) or ``!`` (held) or a space
    (deferred), size, arrival time and sender (``MAILER-DAEMON`` for bounces); then each
    pending recipient, preceded by its deferral reason in parentheses. A footer
    ``-- N Kbytes in M Requests.``; "Mail queue is empty" when it is.
    """
    width = QUEUE_ID_WIDTH
    indent = " " * (width + 1 + 1 + 8 + 1 + 20 + 2)
    size = count = 0
    for envelope in envelopes:  # streamed: a long queue is never held in memory
        if not count:
            out.write(
                f"{'-Queue ID-':<{width + 1}} --Size-- ----Arrival Time---- "
                "-Sender/Recipient-------\n"
            )
        count += 1
        size += envelope.size
        mark = _MARK[message_state(envelope, now)]
        arrival = time.strftime("%a %b %e %H:%M:%S", time.localtime(envelope.arrival))
        sender = envelope.sender or "MAILER-DAEMON"
        out.write(f"{envelope.id + mark:<{width + 1}} {envelope.size:>8} {arrival}  {sender}\n")
        by_reason: dict[str, list[str]] = {}
        for rcpt in envelope.pending():
            by_reason.setdefault(rcpt.last_reply, []).append(rcpt.address)
        for reason, addresses in by_reason.items():
            if reason:
                out.write(f"{' ' * 8}({reason})\n")
            for address in addresses:
                out.write(f"{indent}{address}\n")
        out.write("\n")
    if not count:
        out.write("Mail queue is empty\n")
        return
    requests = "Request" if count == 1 else "Requests"
    out.write(f"-- {math.ceil(size / 1024)} Kbytes in {count} {requests}.\n")


# --- queue summary, the layout of Postfix's qshape -----------------------------------------


def print_summary(shape: QueueShape, out: TextIO) -> None:
    """`queue summary`: per destination domain, pending recipients in total (T) and by
    age in minutes (5 … 1280, then 1280+), then by message state; TOTAL first; a footer
    with the messages by state and the oldest message's age."""
    headings = ["T", *(str(b) for b in AGE_BUCKETS), f"{AGE_BUCKETS[-1]}+", *STATES]
    rows: list[tuple[str, list[int]]] = []
    for name, dest in [("TOTAL", shape.total()), *shape.domains.items()]:
        rows.append((name, [dest.total, *dest.ages, *(dest.states.get(s, 0) for s in STATES)]))
    first = max(len("domain"), *(len(name) for name, _ in rows))
    widths = [
        max(len(h), *(len(str(cells[i])) for _, cells in rows)) for i, h in enumerate(headings)
    ]
    out.write(
        f"{'domain':<{first}} "
        + " ".join(f"{h:>{w}}" for h, w in zip(headings, widths, strict=True))
        + "\n"
    )
    for name, cells in rows:
        out.write(
            f"{name:<{first}} "
            + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))
            + "\n"
        )
    states = ", ".join(f"{shape.states.get(s, 0)} {s}" for s in STATES)
    out.write(f"-- {shape.messages} messages ({states}); oldest {_age(shape.oldest_age)}\n")


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"

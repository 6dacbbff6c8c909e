"""The messages ``tachymail bench`` sends: generated text of given sizes, or real .eml files.

Every message is prepared once in its wire form (``protocol.data.dot_stuff``:
CRLF line ends, leading dots doubled); what changes per message is only the
first header line, ``Message-ID``, which is unique to the run and to the
message number and never starts with a dot, so the stuffed rest stays valid.
"""

from __future__ import annotations

import email.utils
import os
import random
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from tachymail.protocol.data import dot_stuff

_TEXT = (
    "the quick brown fox jumps over lazy dog mail relay queue delivery message header "
    "received from by with id for subject date to cc reply bounce server client 2024 "
    "example net org transfer agent load benchmark latency throughput pipelining"
)
_WORDS = _TEXT.split()
_MESSAGE_ID = re.compile(rb"(?im)^message-id[ \t]*:.*(?:\r?\n[ \t].*)*\r?\n")
#: ``Message-ID: <` + 12 digits + `.` + 16 hex + `@bench.tachymail>`` + CRLF
MESSAGE_ID_LENGTH = len(b"Message-ID: <") + 12 + 1 + 16 + len(b"@bench.tachymail>\r\n")


@dataclass(frozen=True, slots=True)
class Body:
    """One prepared message: its wire form after the Message-ID line, and its properties."""

    wire: bytes
    #: octets as the server stores them (unstuffed, with the Message-ID line)
    size: int
    eight_bit: bool


class MessageSet:
    """The bodies of a run and which one message *n* uses.

    ``wire_head(n)`` is the Message-ID line of message *n*; the message on
    the wire is that line, then ``body(n).wire``, then ``".\\r\\n"``.
    """

    def __init__(self, bodies: list[Body], picks: list[int]) -> None:
        if not bodies:
            raise ValueError("no messages to send")
        self.bodies = bodies
        self.picks = picks
        self.run_id = secrets.token_hex(8)
        self._prefix = b"Message-ID: <"
        self._suffix = f".{self.run_id}@bench.tachymail>\r\n".encode()

    def index(self, n: int) -> int:
        picks = self.picks
        return picks[n % len(picks)]

    def message_id_line(self, n: int) -> bytes:
        return b"%s%012d%s" % (self._prefix, n % 10**12, self._suffix)


def text_body(size: int, sender: str, recipient: str, rng: random.Random) -> Body:
    """A plain-text message of exactly *size* octets (with the Message-ID line).

    Lines are words up to 76 octets; about one in fifty starts with a dot,
    so dot-stuffing is exercised. A size below the header block gives the
    header block alone (about 250 octets).
    """
    date = email.utils.formatdate(time.time())
    headers = (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: tachymail bench {size} octets\r\n"
        f"Date: {date}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    left = size - MESSAGE_ID_LENGTH - len(headers)
    lines: list[bytes] = []
    while left > 80:
        words: list[str] = []
        length = -1
        while True:
            word = rng.choice(_WORDS)
            if length + 1 + len(word) > 76:
                break
            words.append(word)
            length += 1 + len(word)
        line = " ".join(words).encode()
        if rng.random() < 0.02:
            line = b"." + line[1:]
        lines.append(line + b"\r\n")
        left -= len(line) + 2
    if left >= 2:
        lines.append(b"x" * (left - 2) + b"\r\n")  # pads to the exact size
    elif left == 1 and lines:
        lines[-1] = lines[-1][:-2] + b"x\r\n"
    text = headers + b"".join(lines)
    return Body(dot_stuff(text), MESSAGE_ID_LENGTH + len(text), False)


def eml_body(raw: bytes) -> Body:
    """A real message: its own Message-ID removed (each send gets a new one), then stuffed."""
    end = re.search(rb"\r?\n\r?\n", raw)
    head, rest = (raw[: end.end()], raw[end.end() :]) if end else (raw, b"")
    head = _MESSAGE_ID.sub(b"", head)
    wire = dot_stuff(head + rest)
    unstuffed = len(wire) - wire.count(b"\r\n.")
    return Body(wire, MESSAGE_ID_LENGTH + unstuffed, any(b > 0x7F for b in raw))


def eml_files(directory: Path) -> list[Path]:
    """The regular, non-hidden files of *directory*, in name order."""
    names = sorted(n for n in os.listdir(directory) if not n.startswith("."))
    return [directory / n for n in names if (directory / n).is_file()]


def build_message_set(
    size_mix: list[tuple[int, float]],
    template: str | None,
    eml_dir: str | None,
    sender: str,
    recipient: str,
    seed: int = 0,
) -> MessageSet:
    """The messages of a run: one template file, a directory of .eml files, or a size mix.

    With a size mix, which size message *n* gets is drawn with weights from a
    fixed sequence of 4096 choices (seeded by *seed*), the same in every
    process. Raises ValueError for an empty directory, OSError for unreadable
    files.
    """
    if template:
        return MessageSet([eml_body(Path(template).read_bytes())], [0])
    if eml_dir:
        files = eml_files(Path(eml_dir))
        if not files:
            raise ValueError(f"{eml_dir}: no message files")
        bodies = [eml_body(f.read_bytes()) for f in files]
        return MessageSet(bodies, list(range(len(bodies))))
    rng = random.Random(seed)
    shown_sender = sender.replace("{n}", "0").replace("{r}", "0")
    shown_rcpt = recipient.replace("{n}", "0").replace("{r}", "0")
    bodies = [text_body(size, shown_sender, shown_rcpt, rng) for size, _ in size_mix]
    if len(bodies) == 1:
        return MessageSet(bodies, [0])
    picks = rng.choices(range(len(bodies)), weights=[w for _, w in size_mix], k=4096)
    return MessageSet(bodies, picks)

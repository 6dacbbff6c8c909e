"""``tachymail sink``: a receive-only SMTP server for benchmarks, like Postfix's smtp-sink.

Built like the real server: one ``asyncio.Protocol`` per connection on uvloop,
command lines through the compiled ``LineReader`` and parsers, bodies through
``DataReader`` / ``BdatReader`` (counting only, unless ``--store``), every
reply produced by one read sent in one write. What it adds for benchmarks:
reply mixes drawn at random per command, added latency, a connection limit,
and counters (printed on exit, served as Prometheus metrics). With
``--procs N`` the port is shared by N processes through SO_REUSEPORT; their
counters meet in a shared memory page that the parent sums.

``--store DIR`` writes each accepted message into a real tachymail queue in
``DIR/queue`` (``QueueStore`` with the ``GroupCommitter`` the server uses), so
storage can be measured without the rest of the server.

For tests of delivery: ``--record FILE`` appends one JSON line per event
(connection, EHLO, refusal, accepted message, close) to FILE, and
``--reply-for ADDR=REPLY`` / ``--greeting-for ADDR=REPLY`` script the answer to
MAIL FROM or the greeting for clients connecting from one address or network.
Without those options the per-command path is unchanged.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import math
import mmap
import os
import random
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, cast

from tachymail.loadtest.options import ScriptedReply, parse_reply_mix, parse_scripted_reply
from tachymail.net import reuseport_socket, split_hostport
from tachymail.protocol import commands as C
from tachymail.protocol import replies as R
from tachymail.protocol.data import BdatReader, DataReader
from tachymail.protocol.errors import SmtpSyntaxError

if TYPE_CHECKING:
    from tachymail.queue.commit import GroupCommitter

log = logging.getLogger(__name__)

#: counters, in the order of the shared-memory rows; each is tachymail_sink_<name>_total
COUNTERS = (
    "connections",
    "connections_refused",
    "messages",
    "messages_rejected",
    "recipients",
    "recipients_rejected",
    "bytes",
)
_DOCS = {
    "connections": "Connections accepted (including refused ones)",
    "connections_refused": "Connections refused with 421 (--max-connections, --greeting-for)",
    "messages": "Messages accepted with 250 at the end of data",
    "messages_rejected": "Messages refused at the end of data (reply mix, or too big)",
    "recipients": "Recipients accepted",
    "recipients_rejected": "Recipients refused by the reply mix",
    "bytes": "Octets of the accepted messages (after dot-unstuffing)",
}
_SLOTS = len(COUNTERS) + 1  # and the open-connections gauge
PUBLISH_INTERVAL = 0.2
_BDAT_ARGS = re.compile(rb"(\d{1,18})(?: +(LAST))? *", re.IGNORECASE)
#: the header block kept in a recorded message event, at most
RECORD_HEADERS_MAX = 16 * 1024

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(slots=True)
class SinkConfig:
    """What ``tachymail sink`` was asked for; ``from_args`` reads the options."""

    host: str
    port: int
    procs: int = 1
    mail_mix: list[tuple[int, float]] = field(default_factory=list)
    rcpt_mix: list[tuple[int, float]] = field(default_factory=list)
    data_mix: list[tuple[int, float]] = field(default_factory=list)
    seed: int | None = None
    #: seconds added before the reply to the end of data / to every command
    latency: float = 0.0
    command_latency: float = 0.0
    max_connections: int | None = None
    max_size: int = 35 * 1024 * 1024
    hostname: str = "sink.tachymail.invalid"
    store: str | None = None
    metrics: tuple[str, int] | None = None
    #: the JSON-lines event file (--record), appended to by every process
    record: str | None = None
    #: replies scripted per client network (--reply-for, --greeting-for), first match wins
    reply_for: list[ScriptedReply] = field(default_factory=list)
    greeting_for: list[ScriptedReply] = field(default_factory=list)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SinkConfig:
        """Raises ValueError with a message for the user."""
        host, port = split_hostport(args.listen)
        return cls(
            host=host,
            port=port,
            procs=args.procs,
            mail_mix=parse_reply_mix(args.mail_reply),
            rcpt_mix=parse_reply_mix(args.rcpt_reply),
            data_mix=parse_reply_mix(args.data_reply),
            seed=args.seed,
            latency=args.latency / 1000,
            command_latency=args.command_latency / 1000,
            max_connections=args.max_connections,
            max_size=args.max_size,
            hostname=args.hostname,
            store=args.store,
            metrics=split_hostport(args.metrics) if args.metrics else None,
            record=args.record,
            reply_for=[parse_scripted_reply(v) for v in args.reply_for or []],
            greeting_for=[parse_scripted_reply(v, greeting=True) for v in args.greeting_for or []],
        )


class SinkCounters:
    """One process's counters (COUNTERS, then the open connections): plain integers."""

    __slots__ = (
        "bytes",
        "connections",
        "connections_refused",
        "messages",
        "messages_rejected",
        "open",
        "recipients",
        "recipients_rejected",
    )
    FIELDS = (*COUNTERS, "open")

    def __init__(self) -> None:
        self.connections = 0
        self.connections_refused = 0
        self.messages = 0
        self.messages_rejected = 0
        self.recipients = 0
        self.recipients_rejected = 0
        self.bytes = 0
        self.open = 0

    def values(self) -> list[int]:
        return [getattr(self, name) for name in self.FIELDS]

    def snapshot(self) -> dict[str, int]:
        return dict(zip(self.FIELDS, self.values(), strict=True))


class ReplyMix:
    """Refusals drawn at random for one command: (code, percent) -> the reply, or None (ok)."""

    def __init__(self, mix: list[tuple[int, float]], rng: random.Random, stage: str = "") -> None:
        self.rng = rng
        self.stage = stage  # mail, rcpt or data, for the record
        self.table: list[tuple[float, bytes, bool]] = []
        bound = 0.0
        for code, pct in mix:
            bound += pct
            status = f"{code // 100}.0.0"
            self.table.append((bound, R.reply(code, status, f"Sink says {code}"), code == 421))

    def __bool__(self) -> bool:
        return bool(self.table)

    def pick(self) -> tuple[bytes, bool] | None:
        """(reply, close after it) for a refusal, None to accept."""
        x = self.rng.random() * 100
        for bound, reply, close in self.table:
            if x < bound:
                return reply, close
        return None


#: a scripted reply as sent: the line with its CRLF, and whether the connection closes after it
Script = dict[str, tuple[bytes, bool]]


class ScriptedReplies:
    """Replies scripted per client address (--reply-for, --greeting-for).

    ``lookup`` gives a client's script: stage (greeting, mail, rcpt, data) -> (reply,
    close after it); for each stage the first entry whose network holds the client wins.
    """

    def __init__(self, entries: list[ScriptedReply]) -> None:
        self.table: list[tuple[_Network, str, bytes, bool]] = [
            (ipaddress.ip_network(e.network), e.stage, f"{e.line}\r\n".encode(), e.code == 421)
            for e in entries
        ]

    def __bool__(self) -> bool:
        return bool(self.table)

    def lookup(self, peer: str) -> Script | None:
        """The script for a client at *peer*, or None when nothing is scripted for it."""
        try:
            address = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return None  # not an IP peer (a Unix socket): nothing can match
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack listener sees IPv4 clients so
        script: Script = {}
        for network, stage, reply, close in self.table:
            if stage not in script and address in network:
                script[stage] = (reply, close)
        return script or None


class Recorder:
    """Events as JSON lines appended to one file; several processes may share it.

    Events are buffered and written once per loop turn (and by ``close``) with a
    single ``os.write`` of whole lines to an ``O_APPEND`` descriptor, so lines of
    different processes never interleave, and a reader sees each event within a
    loop turn of it. A write error is logged and the lines it held are dropped:
    the record is a test aid and must not stop the sink.
    """

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        self.fd = fd
        self.loop = loop
        self.pending: list[str] = []
        self.scheduled = False
        self.failed = False

    def add(self, event: dict[str, object]) -> None:
        self.pending.append(json.dumps(event, separators=(",", ":"), ensure_ascii=False))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        if not self.pending:
            return
        data = ("\n".join(self.pending) + "\n").encode("utf-8", "surrogateescape")
        self.pending.clear()
        view = memoryview(data)
        try:
            while view:  # one write unless the disk fills or a signal interrupts it
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            if not self.failed:
                log.error("sink: cannot write the record: %s", exc)
            self.failed = True


def open_record(path: str) -> int:
    """An O_APPEND descriptor for --record FILE (created 0644 if missing); OSError if not."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


def header_block(content: bytes) -> str:
    """The header block of *content* (through the CRLF before the blank line), at most 16 KiB."""
    if content.startswith(b"\r\n"):
        return ""  # no header at all: the message starts with the blank line
    end = content.find(b"\r\n\r\n", 0, RECORD_HEADERS_MAX + 4)
    block = content[: end + 2] if end >= 0 else content
    return block[:RECORD_HEADERS_MAX].decode("utf-8", "replace")


class State(IntEnum):
    COMMAND = 0
    DATA = 1
    BDAT = 2
    WAIT = 3  # a delayed reply or a commit is under way; reading is paused
    CLOSED = 4


_OK_MAIL = R.reply(250, "2.1.0", "Ok")
_OK_RCPT = R.reply(250, "2.1.5", "Ok")
_OK_DATA = R.reply(250, "2.0.0", "Ok: sunk")
_NOT_HERE = R.reply(502, "5.5.1", "Error: not implemented in the sink")
_NO_RCPT = R.NO_VALID_RCPT


class SinkServer:
    """What the sessions of one sink process share."""

    def __init__(
        self,
        config: SinkConfig,
        index: int,
        committer: GroupCommitter | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.recorder = recorder
        self.connection_seq = 0
        self.scripts = ScriptedReplies([*config.greeting_for, *config.reply_for])
        self.counters = SinkCounters()
        seed = None if config.seed is None else config.seed * 1000 + index
        rng = random.Random(seed)
        self.mail_mix = ReplyMix(config.mail_mix, rng, "mail")
        self.rcpt_mix = ReplyMix(config.rcpt_mix, rng, "rcpt")
        self.data_mix = ReplyMix(config.data_mix, rng, "data")
        self.committer = committer
        self.max_open = (
            math.ceil(config.max_connections / config.procs) if config.max_connections else 0
        )
        self.sessions: set[SinkSession] = set()
        self.greeting = R.reply(220, "", f"{config.hostname} ESMTP Tachymail sink")
        self.ehlo_lines = [
            "PIPELINING",
            f"SIZE {config.max_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
        ]

    def connection_id(self) -> int:
        """A number for a recorded connection, unique across the --procs processes."""
        self.connection_seq += 1
        return self.connection_seq * self.config.procs + self.index


class SinkSession(asyncio.Protocol):
    """One connection to the sink."""

    def __init__(self, server: SinkServer) -> None:
        self.server = server
        self.counters = server.counters
        self.config = server.config
        self.lines = C.LineReader(1000)
        self.state = State.COMMAND
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.close_after_flush = False
        self.helo: str | None = None
        self.peer: tuple[str, int] = ("", 0)
        self.resume_state = State.COMMAND
        self.recorder = server.recorder
        self.conn = 0  # the connection's number in the record
        self.script: Script | None = None  # what --reply-for/--greeting-for say to this client
        self._reset()
        self.handlers: dict[int, Callable[[bytes], None]] = {
            C.VERB_EHLO: self.cmd_ehlo,
            C.VERB_HELO: self.cmd_helo,
            C.VERB_MAIL: self.cmd_mail,
            C.VERB_RCPT: self.cmd_rcpt,
            C.VERB_DATA: self.cmd_data,
            C.VERB_BDAT: self.cmd_bdat,
            C.VERB_RSET: self.cmd_rset,
            C.VERB_NOOP: self.cmd_noop,
            C.VERB_QUIT: self.cmd_quit,
            C.VERB_VRFY: self.cmd_vrfy,
            C.VERB_HELP: self.cmd_noop,
            C.VERB_EXPN: self.cmd_not_here,
            C.VERB_STARTTLS: self.cmd_not_here,
            C.VERB_AUTH: self.cmd_not_here,
            C.VERB_UNKNOWN: self.cmd_unknown,
        }

    def _reset(self) -> None:
        self.mail_from: str | None = None
        self.mail_params: dict[str, str] = {}
        self.rcpts: list[tuple[str, dict[str, str]]] = []
        self.body: DataReader | None = None
        self.bdat: BdatReader | None = None
        self.bdat_refused = False  # BDAT chunks outside a transaction: read, then refused

    # --- connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        server, counters = self.server, self.counters
        counters.connections += 1
        peer = transport.get_extra_info("peername") or ("", 0)
        self.peer = (str(peer[0]), int(peer[1]))
        if server.max_open and counters.open >= server.max_open:
            counters.connections_refused += 1
            reply = R.reply(421, "4.7.0", "Error: too many connections, try again later")
            transport.write(reply)
            if self.recorder is not None:
                self._record_connect(refused=True)
                self._record_refusal("greeting", reply)
            self.state = State.CLOSED
            self.transport = None
            transport.close()
            return
        counters.open += 1
        server.sessions.add(self)
        if self.recorder is not None:
            self._record_connect(refused=False)
        if server.scripts:
            self.script = script = server.scripts.lookup(self.peer[0])
            if script is not None and "greeting" in script:
                self._scripted_greeting(*script["greeting"])
                return
        transport.write(server.greeting)

    def _scripted_greeting(self, reply: bytes, close: bool) -> None:
        assert self.transport is not None
        self.transport.write(reply)
        if reply.startswith(b"220"):
            return  # only the text differs: a normal session follows
        if self.recorder is not None:
            self._record_refusal("greeting", reply)
        if close:  # 421: the service is not available, close (RFC 5321 3.8)
            self.counters.connections_refused += 1
            self.state = State.CLOSED
            self.transport.close()
            return
        # Any other refusal (554): wait for QUIT, 503 to everything else (RFC 5321 3.1).
        refuse = self.cmd_refused_at_greeting
        self.handlers = dict.fromkeys(self.handlers, refuse)
        self.handlers[C.VERB_QUIT] = self.cmd_quit

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.server.sessions:
            self.server.sessions.discard(self)
            self.counters.open -= 1
        if self.recorder is not None:
            self.recorder.add({"event": "close", "t": time.time(), "conn": self.conn})
        self.state = State.CLOSED
        self.transport = None

    # --- the record (--record) -------------------------------------------------------------

    def _record_connect(self, refused: bool) -> None:
        assert self.recorder is not None
        self.conn = self.server.connection_id()
        event: dict[str, object] = {
            "event": "connect",
            "t": time.time(),
            "conn": self.conn,
            "peer": self.peer[0],
            "port": self.peer[1],
            "open": self.counters.open,
        }
        if refused:
            event["refused"] = True
        self.recorder.add(event)

    def _record_refusal(self, stage: str, reply: bytes) -> None:
        assert self.recorder is not None
        self.recorder.add(
            {
                "event": "refused",
                "t": time.time(),
                "conn": self.conn,
                "stage": stage,
                "reply": reply.decode("ascii", "replace").rstrip("\r\n"),
            }
        )

    def _message_event(self, reader: DataReader | BdatReader) -> dict[str, object]:
        """The record of the message being accepted; before ``_reset``."""
        return {
            "event": "message",
            "t": time.time(),
            "conn": self.conn,
            "peer": self.peer[0],
            "ehlo": self.helo,
            "sender": self.mail_from,
            "rcpts": [address for address, _ in self.rcpts],
            "size": reader.size,
            "headers": header_block(reader.content()),
            "open": self.counters.open,
        }

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            self.out.clear()
            return
        if self.state == State.WAIT:
            return  # the replies go out when the wait ends
        if self.out:
            transport.write(b"".join(self.out) if len(self.out) > 1 else self.out[0])
            self.out.clear()
        if self.close_after_flush:
            self.state = State.CLOSED
            transport.close()

    # --- input -----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == State.DATA:
            self._feed_data(data)
        elif state == State.BDAT:
            self._feed_bdat(data)
        elif state == State.CLOSED:
            return
        else:  # COMMAND, or WAIT when a read slipped past pause_reading
            self.lines.feed(data)
        self._process()
        self._flush()

    def _process(self) -> None:
        """Handle everything buffered, until more input is needed or a reply must wait."""
        lines = self.lines
        handlers = self.handlers
        delay = self.config.command_latency
        while True:
            state = self.state
            if state == State.COMMAND:
                item = lines.readline()
                if item is None:
                    return
                line, flags = item
                if flags & C.LINE_TOO_LONG:
                    self.out.append(R.LINE_TOO_LONG)
                else:
                    verb, args = C.parse_command(line)
                    handlers[verb](args)
                if delay and self.state != State.CLOSED and self.state != State.WAIT:
                    self._hold(delay)
                    return
            elif state == State.DATA:
                rest = lines.drain()
                if not rest:
                    return
                self._feed_data(rest)
            elif state == State.BDAT:
                rest = lines.drain()
                if not rest:
                    return
                self._feed_bdat(rest)
            else:
                return

    def _hold(self, seconds: float) -> None:
        """Send what is in ``out`` after *seconds*; read nothing meanwhile."""
        assert self.transport is not None
        self.resume_state = self.state
        self.state = State.WAIT
        self.transport.pause_reading()
        asyncio.get_running_loop().call_later(seconds, self._resume)

    def _resume(self) -> None:
        if self.transport is None:
            return
        self.state = self.resume_state
        self.transport.resume_reading()
        self._flush()
        self._process()
        self._flush()

    # --- commands --------------------------------------------------------------------------

    def cmd_ehlo(self, args: bytes) -> None:
        name = args.strip().decode("utf-8", "replace")
        if not name:
            self.out.append(R.reply(501, "5.5.4", "Syntax: EHLO hostname"))
            return
        self._reset()
        self.helo = name
        if self.recorder is not None:
            self._record_helo("EHLO", name)
        server = self.server
        self.out.append(
            R.multiline(250, [f"{server.config.hostname} greets {name}", *server.ehlo_lines])
        )

    def cmd_helo(self, args: bytes) -> None:
        name = args.strip().decode("utf-8", "replace")
        if not name:
            self.out.append(R.reply(501, "5.5.4", "Syntax: HELO hostname"))
            return
        self._reset()
        self.helo = name
        if self.recorder is not None:
            self._record_helo("HELO", name)
        self.out.append(R.reply(250, "", self.server.config.hostname))

    def _record_helo(self, verb: str, name: str) -> None:
        assert self.recorder is not None
        self.recorder.add(
            {"event": "helo", "t": time.time(), "conn": self.conn, "verb": verb, "name": name}
        )

    def cmd_mail(self, args: bytes) -> None:
        if self.helo is None:
            self.out.append(R.BAD_SEQUENCE_HELO)
            return
        if self.mail_from is not None:
            self.out.append(R.NESTED_MAIL)
            return
        try:
            sender, params = C.parse_mail(args, True)
        except SmtpSyntaxError as exc:
            self.out.append(R.reply(exc.code, exc.status, exc.text))
            return
        if self.script is not None and self._scripted("mail"):
            return
        size = params.get("SIZE")
        if size is not None and int(size) > self.config.max_size:
            self.out.append(R.MESSAGE_TOO_BIG)
            return
        if self.server.mail_mix and self._refused(self.server.mail_mix):
            return
        self.mail_from, self.mail_params = sender, params
        self.out.append(_OK_MAIL)

    def _scripted(self, stage: str) -> bool:
        """Send the reply scripted for *stage*, if any (True); a 421 closes (RFC 5321 3.8)."""
        assert self.script is not None
        scripted = self.script.get(stage)
        if scripted is None:
            return False
        reply, close = scripted
        self.out.append(reply)
        if self.recorder is not None:
            self._record_refusal(stage, reply)
        if close:
            self.close_after_flush = True
            self.state = State.CLOSED
        return True

    def _refused(self, mix: ReplyMix) -> bool:
        picked = mix.pick()
        if picked is None:
            return False
        reply, close = picked
        self.out.append(reply)
        if self.recorder is not None:
            self._record_refusal(mix.stage, reply)
        if close:
            self.close_after_flush = True
            self.state = State.CLOSED
        return True

    def cmd_rcpt(self, args: bytes) -> None:
        if self.mail_from is None:
            self.out.append(R.BAD_SEQUENCE_MAIL)
            return
        try:
            address, params = C.parse_rcpt(args, "SMTPUTF8" in self.mail_params)
        except SmtpSyntaxError as exc:
            self.out.append(R.reply(exc.code, exc.status, exc.text))
            return
        if len(self.rcpts) >= 1000:
            self.out.append(R.TOO_MANY_RECIPIENTS)
            return
        if (self.script is not None and self._scripted("rcpt")) or (
            self.server.rcpt_mix and self._refused(self.server.rcpt_mix)
        ):
            self.counters.recipients_rejected += 1
            return
        self.counters.recipients += 1
        self.rcpts.append((address, params))
        self.out.append(_OK_RCPT)

    def cmd_data(self, args: bytes) -> None:
        if self.mail_from is None:
            self.out.append(R.BAD_SEQUENCE_MAIL)
            return
        if not self.rcpts:
            self.out.append(_NO_RCPT)
            return
        if args.strip():
            self.out.append(R.reply(501, "5.5.4", "Syntax: DATA"))
            return
        server = self.server
        keep = server.committer is not None or server.recorder is not None
        self.body = DataReader(self.config.max_size, store=keep)
        self.state = State.DATA
        self.out.append(R.DATA_GO_AHEAD)

    def cmd_bdat(self, args: bytes) -> None:
        match = _BDAT_ARGS.fullmatch(args)
        if match is None:
            # Without a valid size the rest of the stream cannot be framed.
            self.out.append(R.reply(501, "5.5.4", "Syntax: BDAT size [LAST]"))
            self.close_after_flush = True
            self.state = State.CLOSED
            return
        count, last = int(match.group(1)), match.group(2) is not None
        if self.bdat is None:
            refused = self.mail_from is None or not self.rcpts
            server = self.server
            keep = server.committer is not None or server.recorder is not None
            store = keep and not refused
            self.bdat = BdatReader(self.config.max_size, store=store)
            self.bdat_refused = refused
        self.bdat.start_chunk(count, last)
        self.state = State.BDAT
        if count == 0:
            self._feed_bdat(b"")

    def cmd_rset(self, args: bytes) -> None:
        self._reset()
        self.out.append(R.OK)

    def cmd_noop(self, args: bytes) -> None:
        self.out.append(R.OK)

    def cmd_vrfy(self, args: bytes) -> None:
        self.out.append(R.VRFY_REPLY)

    def cmd_quit(self, args: bytes) -> None:
        self.out.append(R.BYE)
        self.close_after_flush = True
        self.state = State.CLOSED

    def cmd_not_here(self, args: bytes) -> None:
        self.out.append(_NOT_HERE)

    def cmd_unknown(self, args: bytes) -> None:
        self.out.append(R.UNKNOWN_COMMAND)

    def cmd_refused_at_greeting(self, args: bytes) -> None:
        self.out.append(R.reply(503, "5.5.1", "Error: no service here, only QUIT"))

    # --- bodies ----------------------------------------------------------------------------

    def _feed_data(self, data: bytes) -> None:
        reader = self.body
        assert reader is not None
        used = reader.feed(data)
        if not reader.done:
            return
        if used < len(data):
            self.lines.feed(data[used:])
        self.state = State.COMMAND
        self._end_of_message(reader)

    def _feed_bdat(self, data: bytes) -> None:
        bdat = self.bdat
        assert bdat is not None
        used = bdat.feed(data) if data else 0
        if not bdat.chunk_done:
            return
        if used < len(data):
            self.lines.feed(data[used:])
        self.state = State.COMMAND
        if self.bdat_refused:
            if bdat.done:
                self.bdat = None
            self.out.append(R.BAD_SEQUENCE_MAIL if self.mail_from is None else _NO_RCPT)
        elif bdat.done:
            self._end_of_message(bdat)
        else:
            self.out.append(R.reply(250, "2.0.0", f"{bdat.size} octets received"))

    def _end_of_message(self, reader: DataReader | BdatReader) -> None:
        server, counters = self.server, self.counters
        if reader.oversize:
            counters.messages_rejected += 1
            self.out.append(R.MESSAGE_TOO_BIG)
        elif (self.script is not None and self._scripted("data")) or (
            server.data_mix and self._refused(server.data_mix)
        ):
            counters.messages_rejected += 1
        elif server.committer is not None:
            self._store(reader)
            return
        else:
            counters.messages += 1
            counters.bytes += reader.size
            self.out.append(_OK_DATA)
            if self.recorder is not None:
                self.recorder.add(self._message_event(reader))
        self._reset()
        if self.config.latency and self.state == State.COMMAND:
            self._hold(self.config.latency)

    def _store(self, reader: DataReader | BdatReader) -> None:
        from tachymail.queue.envelope import Envelope, Recipient, new_queue_id

        committer = self.server.committer
        assert committer is not None and self.mail_from is not None
        content = reader.content()
        event = self._message_event(reader) if self.recorder is not None else None
        queue_id = new_queue_id()
        envelope = Envelope(
            id=queue_id,
            sender=self.mail_from,
            recipients=[Recipient(address, params) for address, params in self.rcpts],
            mail_params=self.mail_params,
            arrival=time.time(),
            size=len(content),
            client_ip=self.peer[0],
            client_port=self.peer[1],
            helo=self.helo or "",
            listener="sink",
        )
        self._reset()
        started = time.monotonic()
        self.resume_state = State.COMMAND
        self.state = State.WAIT
        assert self.transport is not None
        self.transport.pause_reading()
        future = committer.submit(envelope, content)
        future.add_done_callback(
            lambda done: self._committed(queue_id, len(content), started, done, event)
        )

    def _committed(
        self,
        queue_id: str,
        size: int,
        started: float,
        done: asyncio.Future[None],
        event: dict[str, object] | None = None,
    ) -> None:
        from tachymail.queue.store import StorageFull

        error = None if done.cancelled() else done.exception()
        if error is None and not done.cancelled():
            self.counters.messages += 1
            self.counters.bytes += size
            self.out.append(R.reply(250, "2.0.0", f"Ok: queued as {queue_id}"))
            if event is not None and self.recorder is not None:
                event["queue_id"] = queue_id
                self.recorder.add(event)
        else:
            self.counters.messages_rejected += 1
            log.error("sink: queue commit failed: %s", error)
            self.out.append(R.STORAGE_FULL if isinstance(error, StorageFull) else R.LOCAL_ERROR)
        if self.transport is None:
            return
        wait = self.config.latency - (time.monotonic() - started)
        if wait > 0:
            asyncio.get_running_loop().call_later(wait, self._resume)
        else:
            self._resume()


# --- processes, counters and metrics ---------------------------------------------------------


class SharedCounters:
    """One row of counters per process in an anonymous shared mapping made before fork."""

    def __init__(self, procs: int) -> None:
        self.procs = procs
        self._map = mmap.mmap(-1, procs * _SLOTS * 8)
        self.view = memoryview(self._map).cast("q")

    def publish(self, index: int, counters: SinkCounters) -> None:
        self.view[index * _SLOTS : (index + 1) * _SLOTS] = array.array("q", counters.values())

    def total(self) -> dict[str, int]:
        sums = [0] * _SLOTS
        for index in range(self.procs):
            row = self.view[index * _SLOTS : (index + 1) * _SLOTS]
            for slot in range(_SLOTS):
                sums[slot] += row[slot]
        return dict(zip(SinkCounters.FIELDS, sums, strict=True))


def start_metrics(host: str, port: int, read: Callable[[], dict[str, int]]) -> Callable[[], None]:
    """Serve the counters on http://host:port/metrics; returns the function that stops it."""
    from prometheus_client import start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import Collector, CollectorRegistry

    class SinkCollector(Collector):
        def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
            values = read()
            for name in COUNTERS:
                yield CounterMetricFamily(f"tachymail_sink_{name}", _DOCS[name], value=values[name])
            yield GaugeMetricFamily(
                "tachymail_sink_open_connections", "Connections open now", value=values["open"]
            )

    registry = CollectorRegistry(auto_describe=True)
    registry.register(SinkCollector())
    server, thread = start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop


async def serve(
    config: SinkConfig,
    sock: socket.socket,
    index: int = 0,
    publish: Callable[[SinkCounters], None] | None = None,
    on_start: Callable[[SinkCounters], None] | None = None,
    record_fd: int | None = None,
) -> SinkCounters:
    """Serve on *sock* until SIGTERM or SIGINT; returns this process's counters.

    *publish* is called every 0.2 s and once at the end (to share the counters
    with the parent); *on_start* once the server is listening. With
    ``config.record`` the events go to *record_fd* (opened here when None; the
    caller closes its own descriptor), flushed before this returns.
    """
    loop = asyncio.get_running_loop()
    recorder = None
    own_fd = False
    if config.record:
        if record_fd is None:
            record_fd, own_fd = open_record(config.record), True
        recorder = Recorder(record_fd, loop)
    store = committer = None
    if config.store:
        from tachymail.queue.commit import GroupCommitter
        from tachymail.queue.store import QueueStore

        store = QueueStore(Path(config.store) / "queue")
        committer = GroupCommitter(store)
    server_state = SinkServer(config, index, committer, recorder)
    server = await loop.create_server(lambda: SinkSession(server_state), sock=sock)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    counters = server_state.counters
    if on_start is not None:
        on_start(counters)
    ticker: asyncio.TimerHandle | None = None
    if publish is not None:

        def tick() -> None:
            nonlocal ticker
            publish(counters)
            ticker = loop.call_later(PUBLISH_INTERVAL, tick)

        tick()
    try:
        await stop.wait()
    finally:
        if ticker is not None:
            ticker.cancel()
        server.close()
        for session in list(server_state.sessions):
            if session.transport is not None:
                session.transport.abort()
        if recorder is not None:
            await asyncio.sleep(0)  # the aborted sessions' connection_lost (their close events)
            await asyncio.sleep(0)
        if committer is not None:
            deadline = time.monotonic() + 10
            while not committer.idle and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            committer.close()
        if store is not None:
            store.close()
        if publish is not None:
            publish(counters)
        if recorder is not None:
            recorder.flush()
            if own_fd:
                assert record_fd is not None
                os.close(record_fd)
    return counters


def run_sink(config: SinkConfig) -> dict[str, int]:
    """Run the sink until SIGTERM or SIGINT; returns the counters of all processes.

    Raises OSError when the address cannot be bound or the record file cannot be
    opened (before anything forks).
    """
    # SO_REUSEPORT, as the server's workers bind: the sink processes share the port.
    sockets = [reuseport_socket(config.host, config.port) for _ in range(config.procs)]
    # Opened before the fork, so a bad path fails at once; O_APPEND keeps lines whole.
    try:
        record_fd = open_record(config.record) if config.record else None
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    try:
        return _run(config, sockets, record_fd)
    finally:
        if record_fd is not None:
            os.close(record_fd)


def _run(config: SinkConfig, sockets: list[socket.socket], record_fd: int | None) -> dict[str, int]:
    import uvloop

    log.info("sink listening on %s:%d (%d process(es))", config.host, config.port, config.procs)
    if config.procs == 1:
        live: list[SinkCounters] = []
        stop_metrics = None
        if config.metrics:
            host, port = config.metrics
            stop_metrics = start_metrics(
                host, port, lambda: live[0].snapshot() if live else SinkCounters().snapshot()
            )
        try:
            counters = uvloop.run(
                serve(config, sockets[0], on_start=live.append, record_fd=record_fd)
            )
        finally:
            if stop_metrics is not None:
                stop_metrics()
        return counters.snapshot()
    return _run_forked(config, sockets, record_fd)


def _run_forked(
    config: SinkConfig, sockets: list[socket.socket], record_fd: int | None
) -> dict[str, int]:
    import uvloop

    shared = SharedCounters(config.procs)
    # Signals wait for sigwait in the parent; a child unblocks them before its loop runs.
    watched = {signal.SIGINT, signal.SIGTERM, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    pids = []
    for index, sock in enumerate(sockets):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child leaves through os._exit
            code = 1
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)
                for other in sockets:
                    if other is not sock:
                        other.close()
                publish = functools.partial(shared.publish, index)
                uvloop.run(serve(config, sock, index, publish, record_fd=record_fd))
                code = 0
            except BaseException:
                log.exception("sink process %d failed", index)
            finally:
                os._exit(code)
        pids.append(pid)
    for sock in sockets:
        sock.close()
    stop_metrics = None
    if config.metrics:
        host, port = config.metrics
        stop_metrics = start_metrics(host, port, shared.total)
    failed = False
    try:
        while True:
            sig = signal.sigwait(watched)
            if sig != signal.SIGCHLD:
                break
            if any(os.waitpid(pid, os.WNOHANG)[0] for pid in pids):
                log.error("a sink process died; stopping")
                failed = True
                break
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        if stop_metrics is not None:
            stop_metrics()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)
    if failed:
        raise RuntimeError("a sink process died")
    return shared.total()


def summary_text(counters: dict[str, int]) -> str:
    c = counters
    return (
        f"sink: {c['messages']:,} messages ({c['messages_rejected']:,} refused), "
        f"{c['recipients']:,} recipients ({c['recipients_rejected']:,} refused), "
        f"{c['bytes']:,} octets, {c['connections']:,} connections "
        f"({c['connections_refused']:,} refused)"
    )


def main(args: argparse.Namespace) -> int:
    """``tachymail sink``: serve until SIGTERM/SIGINT, then print the counters; 2 on misuse."""
    try:
        config = SinkConfig.from_args(args)
        counters = run_sink(config)
    except (ValueError, OSError) as exc:
        print(f"tachymail sink: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"tachymail sink: {exc}", file=sys.stderr)
        return 1
    counters.pop("open", None)
    print(json.dumps(counters) if args.json else summary_text(counters), flush=True)
    return 0

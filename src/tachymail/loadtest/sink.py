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
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import functools
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

from tachymail.loadtest.options import parse_reply_mix
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
    "connections_refused": "Connections refused with 421 over --max-connections",
    "messages": "Messages accepted with 250 at the end of data",
    "messages_rejected": "Messages refused at the end of data (reply mix, or too big)",
    "recipients": "Recipients accepted",
    "recipients_rejected": "Recipients refused by the reply mix",
    "bytes": "Octets of the accepted messages (after dot-unstuffing)",
}
_SLOTS = len(COUNTERS) + 1  # and the open-connections gauge
PUBLISH_INTERVAL = 0.2
_BDAT_ARGS = re.compile(rb"(\d{1,18})(?: +(LAST))? *", re.IGNORECASE)


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

    def __init__(self, mix: list[tuple[int, float]], rng: random.Random) -> None:
        self.rng = rng
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
        self, config: SinkConfig, index: int, committer: GroupCommitter | None = None
    ) -> None:
        self.config = config
        self.counters = SinkCounters()
        seed = None if config.seed is None else config.seed * 1000 + index
        rng = random.Random(seed)
        self.mail_mix = ReplyMix(config.mail_mix, rng)
        self.rcpt_mix = ReplyMix(config.rcpt_mix, rng)
        self.data_mix = ReplyMix(config.data_mix, rng)
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
            transport.write(R.reply(421, "4.7.0", "Error: too many connections, try again later"))
            self.state = State.CLOSED
            self.transport = None
            transport.close()
            return
        counters.open += 1
        server.sessions.add(self)
        transport.write(server.greeting)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.server.sessions:
            self.server.sessions.discard(self)
            self.counters.open -= 1
        self.state = State.CLOSED
        self.transport = None

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
        self.out.append(R.reply(250, "", self.server.config.hostname))

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
        size = params.get("SIZE")
        if size is not None and int(size) > self.config.max_size:
            self.out.append(R.MESSAGE_TOO_BIG)
            return
        if self.server.mail_mix and self._refused(self.server.mail_mix):
            return
        self.mail_from, self.mail_params = sender, params
        self.out.append(_OK_MAIL)

    def _refused(self, mix: ReplyMix) -> bool:
        picked = mix.pick()
        if picked is None:
            return False
        reply, close = picked
        self.out.append(reply)
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
        if self.server.rcpt_mix and self._refused(self.server.rcpt_mix):
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
        self.body = DataReader(self.config.max_size, store=self.server.committer is not None)
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
            store = self.server.committer is not None and not refused
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
        elif server.data_mix and self._refused(server.data_mix):
            counters.messages_rejected += 1
        elif server.committer is not None:
            self._store(reader)
            return
        else:
            counters.messages += 1
            counters.bytes += reader.size
            self.out.append(_OK_DATA)
        self._reset()
        if self.config.latency and self.state == State.COMMAND:
            self._hold(self.config.latency)

    def _store(self, reader: DataReader | BdatReader) -> None:
        from tachymail.queue.envelope import Envelope, Recipient, new_queue_id

        committer = self.server.committer
        assert committer is not None and self.mail_from is not None
        content = reader.content()
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
            lambda done: self._committed(queue_id, len(content), started, done)
        )

    def _committed(
        self, queue_id: str, size: int, started: float, done: asyncio.Future[None]
    ) -> None:
        from tachymail.queue.store import StorageFull

        error = None if done.cancelled() else done.exception()
        if error is None and not done.cancelled():
            self.counters.messages += 1
            self.counters.bytes += size
            self.out.append(R.reply(250, "2.0.0", f"Ok: queued as {queue_id}"))
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
) -> SinkCounters:
    """Serve on *sock* until SIGTERM or SIGINT; returns this process's counters.

    *publish* is called every 0.2 s and once at the end (to share the counters
    with the parent); *on_start* once the server is listening.
    """
    loop = asyncio.get_running_loop()
    store = committer = None
    if config.store:
        from tachymail.queue.commit import GroupCommitter
        from tachymail.queue.store import QueueStore

        store = QueueStore(Path(config.store) / "queue")
        committer = GroupCommitter(store)
    server_state = SinkServer(config, index, committer)
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
        if committer is not None:
            deadline = time.monotonic() + 10
            while not committer.idle and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            committer.close()
        if store is not None:
            store.close()
        if publish is not None:
            publish(counters)
    return counters


def run_sink(config: SinkConfig) -> dict[str, int]:
    """Run the sink until SIGTERM or SIGINT; returns the counters of all processes.

    Raises OSError when the address cannot be bound (before anything forks).
    """
    import uvloop

    # SO_REUSEPORT, as the server's workers bind: the sink processes share the port.
    sockets = [reuseport_socket(config.host, config.port) for _ in range(config.procs)]
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
            counters = uvloop.run(serve(config, sockets[0], on_start=live.append))
        finally:
            if stop_metrics is not None:
                stop_metrics()
        return counters.snapshot()
    return _run_forked(config, sockets)


def _run_forked(config: SinkConfig, sockets: list[socket.socket]) -> dict[str, int]:
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
                uvloop.run(serve(config, sock, index, functools.partial(shared.publish, index)))
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

"""``tachymail bench``: an SMTP load generator on uvloop.

Each session is an ``asyncio.Protocol``: the greeting, EHLO, STARTTLS and AUTH
are awaited one by one, then transactions run from ``data_received`` without
any await. With PIPELINING (on by default when the server offers it) a
message costs one write: its MAIL, RCPT and DATA go out together, and the
next message's commands ride behind the previous message's end of data
(RFC 2920 lets message content start a command group). ``--procs N`` forks N
generator processes before any event loop exists; each runs its share of
sessions, messages and rate and reports progress and its final counters to
the parent through a pipe, as JSON lines, and the parent merges them.

What is measured: a message is *sent* when its MAIL command is written;
its latency runs from then to its final reply (see ``BenchStats``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import selectors
import signal
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, cast

from tachymail.loadtest.messages import MessageSet, build_message_set
from tachymail.loadtest.stats import BenchStats
from tachymail.net import split_hostport

log = logging.getLogger(__name__)

# What a pending reply answers.
_MAIL, _RCPT, _DATA, _END, _RSET, _QUIT = range(6)
#: claim() results besides a message number
NO_MORE, WAIT = -1, -2
#: consecutive failed connection set-ups after which a session gives up
MAX_SETUP_FAILURES = 3
PROGRESS_INTERVAL = 0.25


@dataclass(slots=True)
class BenchConfig:
    """Everything a run needs; ``from_args`` builds it from ``tachymail bench`` options."""

    host: str
    port: int
    #: messages to send in all; None with a duration
    messages: int | None = 1000
    duration: float | None = None
    concurrency: int = 10
    procs: int = 1
    #: messages per second in all; None: as fast as the server answers
    rate: float | None = None
    size_mix: list[tuple[int, float]] = field(default_factory=lambda: [(1024, 1.0)])
    template: str | None = None
    eml_dir: str | None = None
    rcpts: int = 1
    #: messages per connection; 0: keep the connection for the whole run
    per_conn: int = 0
    pipelining: bool = True
    starttls: bool = False
    tls_verify: bool = False
    auth: tuple[str, str] | None = None
    sender: str = "bench@example.com"
    recipient: str = "user{r}@example.net"
    helo: str = "bench.tachymail.invalid"
    timeout: float = 60.0
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchConfig:
        """Raises ValueError with a message for the user on an inconsistent choice."""
        host, port = split_hostport(args.target)
        auth = None
        if args.auth:
            user, sep, password = args.auth.partition(":")
            if not sep or not user:
                raise ValueError("--auth wants USER:PASS")
            auth = (user, password)
        return cls(
            host=host,
            port=port,
            messages=None if args.duration else (args.messages or 1000),
            duration=args.duration,
            concurrency=args.concurrency,
            procs=args.procs,
            rate=args.rate,
            size_mix=args.size,
            template=args.template,
            eml_dir=args.eml_dir,
            rcpts=args.rcpts,
            per_conn=args.per_conn or 0,
            pipelining=args.pipelining,
            starttls=args.starttls,
            tls_verify=args.tls_verify,
            auth=auth,
            sender=args.sender,
            recipient=args.recipient,
            helo=args.helo,
            timeout=args.timeout,
            seed=args.seed,
        )


def _share(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


class _Txn:
    """One message on its way: what its replies said so far."""

    __slots__ = ("fail", "idx", "n", "rcpt_fail", "rcpt_ok", "start")

    def __init__(self, n: int, idx: int, start: float) -> None:
        self.n = n
        self.idx = idx
        self.start = start
        self.fail = 0  # MAIL refused: its code
        self.rcpt_ok = 0
        self.rcpt_fail: list[int] = []


class Runner:
    """One process's share of a run: hands out message numbers, paces them, keeps the stats."""

    def __init__(
        self,
        config: BenchConfig,
        messages: MessageSet,
        index: int = 0,
        procs: int = 1,
    ) -> None:
        self.config = config
        self.messages = messages
        self.index = index
        self.procs = procs
        self.stats = BenchStats()
        self.limit = None if config.messages is None else _share(config.messages, procs, index)
        self.sessions = _share(config.concurrency, procs, index)
        self.claimed = 0
        self.deadline = 0.0
        self.interval = procs / config.rate if config.rate else 0.0
        self.next_slot = 0.0
        self.stopping = False
        self.started = 0.0
        self.live: set[BenchSession] = set()
        self.returned: deque[int] = deque()
        self.tls: ssl.SSLContext | None = None
        if config.starttls:
            self.tls = ssl.create_default_context()
            if not config.tls_verify:
                self.tls.check_hostname = False
                self.tls.verify_mode = ssl.CERT_NONE
        self._build_commands()

    def _build_commands(self) -> None:
        """MAIL and RCPT lines, prepared once unless the templates use {n}."""
        config = self.config
        self.dynamic = "{n}" in config.sender or "{n}" in config.recipient
        # {r} is filled in now, {n} per message ("{n}" survives this format as itself).
        rcpts = [config.recipient.format(n="{n}", r=r) for r in range(config.rcpts)]
        self._rcpt_templates = rcpts
        self.static: list[tuple[bytes, list[bytes]]] = []
        self._sender = config.sender.format(n="{n}", r=0)
        if not self.dynamic:
            for idx in range(len(self.messages.bodies)):
                self.static.append(self._lines(self._sender, rcpts, idx))

    def _lines(self, sender: str, rcpts: list[str], idx: int) -> tuple[bytes, list[bytes]]:
        params = b" BODY=8BITMIME" if self.messages.bodies[idx].eight_bit else b""
        if not (sender.isascii() and all(r.isascii() for r in rcpts)):
            params += b" SMTPUTF8"
        mail = b"MAIL FROM:<%s>%s\r\n" % (sender.encode(), params)
        return mail, [b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts]

    def lines(self, n: int, idx: int) -> tuple[bytes, list[bytes]]:
        """(MAIL line, RCPT lines) of message *n*."""
        if not self.dynamic:
            return self.static[idx]
        sender = self._sender.replace("{n}", str(n))
        rcpts = [r.replace("{n}", str(n)) for r in self._rcpt_templates]
        return self._lines(sender, rcpts, idx)

    def claim(self) -> int:
        """The next message number, NO_MORE when the share is done, or WAIT (see next_slot)."""
        if self.stopping:
            return NO_MORE
        if self.returned:
            return self.returned.popleft()
        if self.limit is not None:
            if self.claimed >= self.limit:
                return NO_MORE
        elif time.monotonic() >= self.deadline:
            return NO_MORE
        if self.interval:
            now = time.monotonic()
            if self.next_slot > now:
                return WAIT
            # A session that was slow to ask may catch up a little, not burst unboundedly.
            self.next_slot = max(self.next_slot, now - 4 * self.interval) + self.interval
        n = self.index + self.procs * self.claimed
        self.claimed += 1
        return n

    def unclaim(self, n: int) -> None:
        """Give back a message a session claimed but could not send (its connection failed)."""
        self.returned.append(n)

    def stop(self) -> None:
        """No new messages; sessions finish what is in flight, then QUIT."""
        if self.stopping:
            for session in list(self.live):
                session.abort("stopped")
        self.stopping = True

    async def run(self, progress: Callable[[BenchStats], None] | None = None) -> BenchStats:
        loop = asyncio.get_running_loop()
        self.started = time.monotonic()
        if self.config.duration is not None:
            self.deadline = self.started + self.config.duration
        self.next_slot = self.started
        ticker = None
        if progress is not None:

            def tick() -> None:
                nonlocal ticker
                progress(self.stats)
                ticker = loop.call_later(PROGRESS_INTERVAL, tick)

            ticker = loop.call_later(PROGRESS_INTERVAL, tick)
        watchdog = loop.call_later(1.0, self._watch)
        self._watchdog = watchdog
        try:
            await asyncio.gather(*(self._session_loop() for _ in range(self.sessions)))
        finally:
            self._watchdog.cancel()
            if ticker is not None:
                ticker.cancel()
        self.stats.elapsed = time.monotonic() - self.started
        return self.stats

    def _watch(self) -> None:
        """Once a second: abort sessions that have waited longer than the timeout for a reply."""
        now = time.monotonic()
        for session in list(self.live):
            if session.expect and now - session.last_activity > self.config.timeout:
                session.abort("timeout")
        self._watchdog = asyncio.get_running_loop().call_later(1.0, self._watch)

    async def _session_loop(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            # The first message is claimed before connecting, so that no connection is
            # opened for nothing (with --per-conn 1, N messages use exactly N connections).
            n = self.claim()
            if n == NO_MORE:
                return
            if n == WAIT:
                await asyncio.sleep(max(self.next_slot - time.monotonic(), 0.0))
                continue
            session = BenchSession(self)
            if not await session.connect(loop):
                self.unclaim(n)
                failures += 1
                if failures >= MAX_SETUP_FAILURES:
                    log.debug("session gives up after %d failed connections", failures)
                    return
                await asyncio.sleep(0.05 * failures)
                continue
            failures = 0
            self.live.add(session)
            try:
                session.start(n)
                await session.closed
            finally:
                self.live.discard(session)


class BenchSession(asyncio.Protocol):
    """The client side of one SMTP connection of a run."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.stats = runner.stats
        self.messages = runner.messages
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.cont: list[bytes] = []
        self.setup = True
        self.replies: deque[tuple[int, list[bytes]]] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.expect: deque[tuple[int, _Txn | None]] = deque()
        self.pipelining = False
        self.started_here = 0
        self.need_rset = False
        self.quitting = False
        self.last_activity = time.monotonic()
        self.per_conn = runner.config.per_conn
        self.pending: deque[bytes] = deque()  # non-pipelined: RCPT lines still to send
        self.waiting = False  # a rate-limit timer will start the next message

    # --- transport callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        stats = self.stats
        seen: set[int] = set()
        lost = 0
        for _kind, txn in self.expect:
            if txn is None or id(txn) in seen:
                continue
            seen.add(id(txn))
            lost += 1
            code = txn.fail or (txn.rcpt_fail[0] if txn.rcpt_fail and not txn.rcpt_ok else 0)
            if code:
                stats.codes[code] += 1
            else:
                stats.errors += 1
        if lost and not self.setup:
            stats.conn_errors["connection lost in a transaction"] += 1
        self.expect.clear()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        if self.buf:
            data = self.buf + data
            self.buf = b""
        pos = 0
        size = len(data)
        while pos < size:
            end = data.find(b"\n", pos)
            if end < 0:
                self.buf = data[pos:]
                if len(self.buf) > 65536:
                    self.abort("reply line too long")
                return
            line = data[pos:end]
            pos = end + 1
            if len(line) > 3 and line[3] == 0x2D:  # "250-..." continues
                self.cont.append(line)
                continue
            try:
                code = int(line[:3])
            except ValueError:
                self.abort("not an SMTP reply")
                return
            if self.setup:
                self.cont.append(line)
                self.replies.append((code, self.cont))
                self.cont = []
                if self.waiter is not None and not self.waiter.done():
                    self.waiter.set_result(None)
            else:
                if self.cont:
                    self.cont = []
                self._reply(code)

    def abort(self, why: str) -> None:
        if self.transport is not None:
            self.stats.conn_errors[why] += 1
            self.transport.abort()

    # --- set-up: awaited step by step ------------------------------------------------------

    async def _read_reply(self) -> tuple[int, list[bytes]]:
        while not self.replies:
            if self.transport is None:
                raise ConnectionError("connection closed")
            self.waiter = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self.waiter, self.runner.config.timeout)
            self.waiter = None
        return self.replies.popleft()

    async def _command(self, line: bytes) -> tuple[int, list[bytes]]:
        assert self.transport is not None
        self.transport.write(line)
        return await self._read_reply()

    async def _ehlo(self) -> set[str] | None:
        code, lines = await self._command(b"EHLO %s\r\n" % self.runner.config.helo.encode())
        if code != 250:
            return None
        return {
            line[4:].split(b" ", 1)[0].strip().upper().decode("ascii", "replace")
            for line in lines[1:]
        }

    async def connect(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Connect and set up (greeting, EHLO, STARTTLS, AUTH); False when that failed."""
        runner, config = self.runner, self.runner.config
        stats = self.stats
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: self, config.host, config.port), config.timeout
            )
        except (OSError, TimeoutError) as exc:
            stats.conn_errors[f"connect: {getattr(exc, 'strerror', None) or exc or 'timeout'}"] += 1
            return False
        stats.connections += 1
        why = ""
        try:
            code, _ = await self._read_reply()
            caps = await self._ehlo() if code == 220 else None
            if code != 220:
                why = f"greeting {code}"
            elif caps is None:
                why = "EHLO refused"
            elif config.starttls:
                if "STARTTLS" not in caps:
                    why = "no STARTTLS offered"
                else:
                    code, _ = await self._command(b"STARTTLS\r\n")
                    if code != 220:
                        why = f"STARTTLS {code}"
                    else:
                        assert self.transport is not None and runner.tls is not None
                        new = await loop.start_tls(
                            self.transport,
                            self,
                            runner.tls,
                            server_hostname=config.host,
                            ssl_handshake_timeout=config.timeout,
                        )
                        self.transport = cast(asyncio.Transport, new)
                        caps = await self._ehlo()
                        if caps is None:
                            why = "EHLO refused after STARTTLS"
            if not why and config.auth is not None:
                user, password = config.auth
                token = base64.b64encode(b"\0%s\0%s" % (user.encode(), password.encode()))
                code, _ = await self._command(b"AUTH PLAIN %s\r\n" % token)
                if code != 235:
                    why = f"AUTH {code}"
        except TimeoutError:
            why = "timeout in set-up"
        except (OSError, ConnectionError, ssl.SSLError) as exc:
            why = f"set-up: {exc.__class__.__name__}"
        if why or self.transport is None:
            stats.conn_errors[why or "closed in set-up"] += 1
            if self.transport is not None:
                self.transport.abort()
            return False
        assert caps is not None
        self.pipelining = config.pipelining and "PIPELINING" in caps
        return True

    # --- transactions: driven by the replies -----------------------------------------------

    def start(self, first: int) -> None:
        """Set-up is done: send message *first* (already claimed), then go on from the replies."""
        self.setup = False
        self.last_activity = time.monotonic()
        assert self.transport is not None
        parts: list[bytes] = []
        self._begin(parts, first)
        self.transport.write(b"".join(parts))

    def _begin(self, parts: list[bytes], n: int = NO_MORE) -> bool:
        """Claim a message (unless given *n*) and append its commands to *parts*."""
        runner = self.runner
        if self.need_rset and not self.pipelining:
            # Without PIPELINING the RSET goes alone; its reply starts the next message.
            parts.append(b"RSET\r\n")
            self.expect.append((_RSET, None))
            self.need_rset = False
            return True
        if n < 0:
            if self.quitting or (self.per_conn and self.started_here >= self.per_conn):
                return False
            n = runner.claim()
        if n < 0:
            if n == WAIT and self.transport is not None:
                loop = asyncio.get_running_loop()
                wait = max(runner.next_slot - time.monotonic(), 0.0)
                loop.call_later(wait, self._wake)
                self.waiting = True
            return False
        idx = self.messages.index(n)
        mail, rcpts = runner.lines(n, idx)
        txn = _Txn(n, idx, time.perf_counter())
        self.last_activity = time.monotonic()  # the reply timeout runs from here
        self.started_here += 1
        expect = self.expect
        if self.need_rset:
            parts.append(b"RSET\r\n")
            expect.append((_RSET, None))
            self.need_rset = False
        parts.append(mail)
        expect.append((_MAIL, txn))
        if self.pipelining:
            parts.extend(rcpts)
            for _ in rcpts:
                expect.append((_RCPT, txn))
            parts.append(b"DATA\r\n")
            expect.append((_DATA, txn))
        else:
            self.pending.extend(rcpts)
        return True

    def _wake(self) -> None:
        self.waiting = False
        if self.transport is not None and not self.expect:
            self._next()

    def _next(self) -> None:
        """Nothing in flight: start the next message, or QUIT when this connection is done."""
        if self.transport is None or self.waiting:
            return
        parts: list[bytes] = []
        if self._begin(parts):
            self.transport.write(b"".join(parts))
        elif not self.waiting:
            self.quitting = True
            self.expect.append((_QUIT, None))
            self.transport.write(b"QUIT\r\n")

    def _finish(self, txn: _Txn, code: int) -> None:
        stats = self.stats
        stats.codes[code] += 1
        stats.latency.add(time.perf_counter() - txn.start)
        if txn.rcpt_fail and txn.rcpt_ok:
            stats.rcpt_codes.update(txn.rcpt_fail)

    def _reply(self, code: int) -> None:
        if not self.expect:
            self.abort("unexpected reply")
            return
        kind, txn = self.expect.popleft()
        transport = self.transport
        if transport is None:
            return
        if kind == _RCPT:
            assert txn is not None
            if code < 300:
                txn.rcpt_ok += 1
            else:
                txn.rcpt_fail.append(code)
            if not self.pipelining:
                if self.pending:
                    transport.write(self.pending.popleft())
                    self.expect.append((_RCPT, txn))
                elif txn.rcpt_ok:
                    transport.write(b"DATA\r\n")
                    self.expect.append((_DATA, txn))
                else:
                    self._finish(txn, txn.rcpt_fail[0])
                    self.need_rset = True
                    self._next()
        elif kind == _MAIL:
            assert txn is not None
            if code >= 300:
                txn.fail = code
            if not self.pipelining:
                if txn.fail:
                    self.pending.clear()
                    self._finish(txn, code)
                    self._next()
                else:
                    transport.write(self.pending.popleft())
                    self.expect.append((_RCPT, txn))
        elif kind == _DATA:
            assert txn is not None
            if code == 354:
                self._send_body(txn, transport)
            else:
                refusal = txn.fail or (txn.rcpt_fail[0] if not txn.rcpt_ok and txn.rcpt_fail else 0)
                self._finish(txn, refusal or code)
                self.need_rset = True
                if not self.expect:
                    self._next()
        elif kind == _END:
            assert txn is not None
            refusal = txn.fail or (0 if txn.rcpt_ok else (txn.rcpt_fail or [code])[0])
            self._finish(txn, refusal or code)
            if self.expect:
                # The next message's commands went out behind this one's data: its clock
                # starts now, when the server turns to it.
                for _kind, following in self.expect:
                    if following is not None:
                        following.start = time.perf_counter()
                        break
            else:
                self._next()
        elif kind == _QUIT:
            transport.close()
        elif not self.pipelining and not self.expect:  # _RSET, sent alone
            self._next()

    def _send_body(self, txn: _Txn, transport: asyncio.Transport) -> None:
        messages = self.messages
        if txn.fail or not txn.rcpt_ok:
            # A server that says 354 with no valid recipient gets an empty message.
            parts = [b".\r\n"]
        else:
            body = messages.bodies[txn.idx]
            parts = [messages.message_id_line(txn.n), body.wire, b".\r\n"]
            self.stats.octets += body.size
        self.expect.append((_END, txn))
        if self.pipelining:
            self._begin(parts)
        transport.write(b"".join(parts))


# --- running it: in this process, or forked --------------------------------------------------


class ProgressLine:
    """The live one-line display on a terminal: msgs/s, errors, replies by code."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.started = time.monotonic()
        self.window: deque[tuple[float, int]] = deque([(self.started, 0)])

    def update(self, summary: dict[str, Any]) -> None:
        now = time.monotonic()
        sent = summary["sent"]
        window = self.window
        window.append((now, sent))
        while len(window) > 2 and now - window[0][0] > 1.0:
            window.popleft()
        then, before = window[0]
        rate = (sent - before) / (now - then) if now > then else 0.0
        codes = " ".join(f"{code}:{n}" for code, n in sorted(summary["codes"].items()))
        text = (
            f"{now - self.started:6.1f}s  {sent:>9,} sent  {rate:>8,.0f} msgs/s  "
            f"{summary['errors'] + summary['conn_errors']:,} errors  [{codes}]"
        )
        width = 200
        with contextlib.suppress(OSError):
            width = os.get_terminal_size(self.stream.fileno()).columns - 1
        self.stream.write("\r" + text[:width] + "\x1b[K")
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\x1b[K")
        self.stream.flush()


def _progress(stats: BenchStats) -> dict[str, Any]:
    return {
        "sent": stats.sent,
        "errors": stats.errors,
        "conn_errors": sum(stats.conn_errors.values()),
        "codes": {str(k): v for k, v in stats.codes.items()},
    }


def _merge_progress(parts: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"sent": 0, "errors": 0, "conn_errors": 0, "codes": {}}
    for part in parts:
        for key in ("sent", "errors", "conn_errors"):
            total[key] += part[key]
        for code, n in part["codes"].items():
            total["codes"][code] = total["codes"].get(code, 0) + n
    return total


def _install_stop(loop: asyncio.AbstractEventLoop, runner: Runner, sigs: list[int]) -> None:
    for sig in sigs:
        loop.add_signal_handler(sig, runner.stop)


def run_bench(config: BenchConfig, progress: IO[str] | None = None) -> BenchStats:
    """Run the whole load and return the merged counters.

    *progress*, a terminal, gets the live line. With ``procs > 1`` the work is
    forked into that many processes (never more than there are sessions).
    SIGINT or SIGTERM stops starting messages and lets those in flight finish;
    a second one aborts them. Raises ValueError/OSError when the messages
    cannot be prepared.
    """
    messages = build_message_set(
        config.size_mix,
        config.template,
        config.eml_dir,
        config.sender,
        config.recipient,
        config.seed,
    )
    procs = max(1, min(config.procs, config.concurrency))
    if config.messages is not None:
        procs = max(1, min(procs, config.messages))
    if procs == 1:
        return _run_here(config, messages, progress)
    return _run_forked(config, messages, procs, progress)


def _run_here(config: BenchConfig, messages: MessageSet, stream: IO[str] | None) -> BenchStats:
    import uvloop

    display = ProgressLine(stream) if stream is not None else None

    async def main() -> BenchStats:
        runner = Runner(config, messages)
        _install_stop(asyncio.get_running_loop(), runner, [signal.SIGINT, signal.SIGTERM])
        show = None if display is None else (lambda s: display.update(_progress(s)))
        return await runner.run(show)

    try:
        return uvloop.run(main())
    finally:
        if display is not None:
            display.clear()


def _child(config: BenchConfig, messages: MessageSet, index: int, procs: int, out: int) -> int:
    import uvloop

    # The parent forwards SIGINT as SIGTERM: a terminal's Ctrl-C must not count twice here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def send(kind: str, payload: dict[str, Any]) -> None:
        data = json.dumps({kind: payload}).encode() + b"\n"
        while data:
            data = data[os.write(out, data) :]

    async def main() -> BenchStats:
        runner = Runner(config, messages, index, procs)
        _install_stop(asyncio.get_running_loop(), runner, [signal.SIGTERM])
        return await runner.run(lambda s: send("progress", _progress(s)))

    stats = uvloop.run(main())
    send("result", stats.to_dict())
    return 0


def _run_forked(
    config: BenchConfig, messages: MessageSet, procs: int, stream: IO[str] | None
) -> BenchStats:
    children: dict[int, int] = {}  # read end -> pid
    for index in range(procs):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child leaves through os._exit
            code = 1
            try:
                for fd in children:
                    os.close(fd)
                os.close(read_end)
                code = _child(config, messages, index, procs, write_end)
            except BaseException:
                log.exception("bench process %d failed", index)
            finally:
                os._exit(code)
        os.close(write_end)
        children[read_end] = pid

    def forward(signum: int, frame: object) -> None:
        for pid in children.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    display = ProgressLine(stream) if stream is not None else None
    progress: dict[int, dict[str, Any]] = {}
    results: dict[int, BenchStats] = {}
    buffers = {fd: b"" for fd in children}
    selector = selectors.DefaultSelector()
    for fd in children:
        selector.register(fd, selectors.EVENT_READ)
    try:
        while selector.get_map():
            for key, _ in selector.select(PROGRESS_INTERVAL):
                fd = key.fd
                data = os.read(fd, 1 << 16)
                if not data:
                    selector.unregister(fd)
                    os.close(fd)
                    continue
                *lines, buffers[fd] = (buffers[fd] + data).split(b"\n")
                for line in lines:
                    item = json.loads(line)
                    if "progress" in item:
                        progress[fd] = item["progress"]
                    else:
                        results[fd] = BenchStats.from_dict(item["result"])
            if display is not None and progress:
                display.update(_merge_progress(list(progress.values())))
    finally:
        selector.close()
        if display is not None:
            display.clear()
        failed = 0
        for pid in children.values():
            _, status = os.waitpid(pid, 0)
            failed += os.waitstatus_to_exitcode(status) != 0
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if failed or len(results) != len(children):
        raise RuntimeError(f"{failed or len(children) - len(results)} bench process(es) failed")
    total = BenchStats()
    for stats in results.values():
        total.merge(stats)
    return total


def main(args: argparse.Namespace) -> int:
    """``tachymail bench``: exit 0 when some messages were accepted, 1 when none, 2 on misuse."""
    try:
        config = BenchConfig.from_args(args)
        stream = sys.stdout if sys.stdout.isatty() and not args.json else None
        if stream is None and sys.stdout.isatty():
            stream = sys.stderr if sys.stderr.isatty() else None
        stats = run_bench(config, stream)
    except (ValueError, OSError) as exc:
        print(f"tachymail bench: {exc}", file=sys.stderr)
        return 2
    print(stats.summary_json() if args.json else stats.summary_text())
    if stats.accepted == 0:
        if stats.sent == 0:
            reasons = ", ".join(stats.conn_errors) or "no session started"
            print(f"tachymail bench: no connection could be set up ({reasons})", file=sys.stderr)
        else:
            print("tachymail bench: the server accepted no message", file=sys.stderr)
        return 1
    return 0

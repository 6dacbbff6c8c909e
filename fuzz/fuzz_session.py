"""Fuzz the SMTP session state machine (``tachymail.smtp.session.SmtpSession``).

Random byte streams, cut into reads at points the fuzzer picks, go to ``data_received``
through a fake transport; the session runs on a real WorkerContext with a real QueueStore and
GroupCommitter (in a temporary directory, on tmpfs when there is one) and an event loop this
harness drives between reads, as a real transport would: no read is delivered while reading is
paused (a commit or an AUTH check is under way), and the loop runs until it is resumed.

Invariants: no exception escapes ``data_received`` or any loop callback (the loop's exception
handler re-raises, and log records are formatted, so a bad log call is a crash too); every
line written is a well-formed reply (three digits, space or hyphen, CRLF; the enhanced
status, if any, of the same class); the session's reply list is empty after each read; the
LineReader holds at most ``max_command_line`` octets (12,288 for an AUTH line) in a command
state; output stays proportional to input; the transport is closed after any 421 and nothing
is written after close; the session never stays in WAIT (a bounded wait, not a timing
assertion); no message queued holds a bare CR or LF (the smuggling guard) or lacks a
recipient; a client leaving while its message commits or its AUTH is checked is no
problem.  Each input
runs twice, on the compiled kernels and on their pure twins: the replies must be identical.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import atheris
from _common import agree, fragments, main, option

with atheris.instrument_imports(include=["tachymail.smtp.session", "tachymail.protocol"]):
    from tachymail.protocol import commands_py, data_py, mime_py
    from tachymail.smtp import session as session_module
    from tachymail.smtp.session import SmtpSession, State

from tachymail.auth.users import UsersFile, hash_password
from tachymail.config import from_dict
from tachymail.protocol import commands as facade_commands
from tachymail.protocol import data as facade_data
from tachymail.protocol import mime as facade_mime
from tachymail.queue.commit import GroupCommitter
from tachymail.queue.envelope import Envelope
from tachymail.queue.store import MiB, QueueStore
from tachymail.smtp.worker import WorkerContext

REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])([2-5]\.[0-9]{1,3}\.[0-9]{1,3} )?[^\r\n]*")
# Generous: only a session that never leaves WAIT (a lost callback) takes this long.
WAIT_BOUND = 10.0
# Committed messages are dropped with the store this often, so a long run stays small.
REBUILD_AFTER = 2000


class Strict(logging.Handler):
    """Formats every record (a bad log call raises into the session) and drops it."""

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)

    def handleError(self, record: logging.LogRecord) -> None:
        raise


class Recording(GroupCommitter):
    """The real group committer, also keeping what each message queued looked like."""

    def __init__(self, store: QueueStore) -> None:
        super().__init__(store, inline=True)
        self.queued: list[tuple[Envelope, bytes]] = []

    def submit(self, envelope: Envelope, content: bytes) -> asyncio.Future[None]:
        self.queued.append((envelope, content))
        return super().submit(envelope, content)


class QuickUsers(UsersFile):
    """The real users file, minus the dummy scrypt run for unknown names.

    That run only evens out timing (30 ms each); the fuzzer would spend most of its time in it.
    Known users are checked for real, against a deliberately cheap hash (see Harness).
    """

    def check(self, name: str, password: str) -> bool:
        return name in self.users() and super().check(name, password)


class FakeSSL:
    """What ``tls_description`` reads from an implicit-TLS transport."""

    def version(self) -> str:
        return "TLSv1.3"

    def cipher(self) -> tuple[str, str, int]:
        return ("TLS_AES_256_GCM_SHA384", "TLSv1.3", 256)


class FakeTransport:
    """A transport recording what the session does with it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, peer: tuple[str, int], tls: bool) -> None:
        self.loop = loop
        self.peer = peer
        self.tls = tls
        self.written = bytearray()
        self.paused = False
        self.closed = False
        self.session: SmtpSession | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.peer
        if name == "ssl_object" and self.tls:
            return FakeSSL()
        return default

    def write(self, data: bytes) -> None:
        assert not self.closed, f"write after close: {data!r}"
        self.written += data

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            # As asyncio does: connection_lost comes on a later loop iteration.
            self.loop.call_soon(self.session.connection_lost, None)  # type: ignore[union-attr]

    def abort(self) -> None:
        self.close()


class Harness:
    """A worker's context on a private queue, rebuilt when its store has filled a little."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="tachymail-fuzz-", dir=_tmp_root()))
        atexit.register(shutil.rmtree, self.base, True)
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, context: self.errors.append(context))
        self.loop.set_default_executor(ThreadPoolExecutor(1))  # see quiesce()
        self.generation = 0
        self.ctx = self.loop.run_until_complete(self._context())

    async def _context(self) -> WorkerContext:
        self.generation += 1
        data_dir = self.base / str(self.generation)
        config = from_dict(
            {
                "server": {"hostname": "fuzz.example", "data_dir": str(data_dir), "hold": True},
                "limits": {"max_errors": 5, "max_recipients": 100},
                # Per session only: counts kept across sessions (lockouts) would make an
                # input's outcome depend on the inputs before it.
                "auth": {
                    "failure_delay": 0.0,
                    "max_failures": 2,
                    "max_failures_per_ip": 0,
                    "max_failures_per_user": 0,
                    # "user" may send as the seeds' sender (sender_login on smtps).
                    "senders": {"user": ["a@example.com", "@example.org"]},
                },
                "queue": {"commit": "inline", "commit_linger_ms": 0.0, "map_size_mb": 8},
                # Relay domains take mail from anyone; local ones refuse every user (no mailboxes).
                "policy": {"local_domains": ["localhost"], "relay_domains": ["example.org"]},
                "metrics": {"address": ""},
            }
        )
        store = QueueStore(data_dir / "queue", map_size=8 * MiB, max_map_size=256 * MiB)
        committer = Recording(store)
        # One user, "user" / "pass" (AUTH PLAIN AHVzZXIAcGFzcw==), so AUTH can also succeed.
        config.users_path.write_text(f"user:{hash_password('pass', n=2, r=1, p=1)}\n")
        ctx = WorkerContext(config, asyncio.get_running_loop(), committer, None)
        ctx.users = QuickUsers(config.users_path)
        return ctx

    def renew(self) -> None:
        if self.ctx.committer.messages < REBUILD_AFTER:
            return
        old = self.ctx
        old.committer.close()
        old.committer.store.close()
        old.auth_throttle.close()  # its LMDB map would outlive the deleted directory
        shutil.rmtree(old.config.data_path, ignore_errors=True)
        self.ctx = self.loop.run_until_complete(self._context())

    def spin(self) -> None:
        """One pass of the loop over the callbacks that are ready (cheaper than a sleep(0))."""
        self.loop.call_soon(self.loop.stop)
        self.loop.run_forever()

    def settle(self, transport: FakeTransport) -> None:
        """Run the loop for pending callbacks; while reading is paused, until it resumes."""
        self.spin()
        deadline = time.monotonic() + WAIT_BOUND
        while transport.paused and not transport.closed:
            assert time.monotonic() < deadline, "session stuck with reading paused"
            self.loop.run_until_complete(asyncio.sleep(0.0005))
            self.spin()
        self.raise_errors()

    def quiesce(self) -> None:
        """Run the loop until no AUTH check, commit or callback is left in flight."""
        # One worker thread, first in first out: once a no-op ran, every check before it has.
        self.loop.run_until_complete(self.loop.run_in_executor(None, lambda: None))
        for _ in range(4):  # the check's callback, the commit's _finish, their replies
            self.spin()
        self.raise_errors()

    def raise_errors(self) -> None:
        if self.errors:
            context = self.errors[0]
            self.errors.clear()
            exc = context.get("exception")
            raise AssertionError(f"exception in a loop callback: {context}") from exc


def _tmp_root() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def check_replies(written: bytes, start: int, data: bytes) -> tuple[int, list[bytes]]:
    """Check the reply lines written from offset *start* (a line start) on: the offset where
    the unfinished rest begins, and the reply codes seen."""
    end = written.rfind(b"\r\n") + 2
    if end < start + 2:
        return start, []
    codes = []
    for line in written[start : end - 2].split(b"\r\n"):
        match = REPLY_LINE.fullmatch(line)
        assert match, (line, data)
        status = match.group(3)
        assert status is None or status[:1] == match.group(1)[:1], (line, data)
        codes.append(match.group(1))
    return end, codes


HARNESS: Harness | None = None
ROLES = [("mx", False), ("mx", False), ("submission", False), ("smtps", True)]
PEERS = [("192.0.2.7", 40000), ("127.0.0.1", 40001)]
QUEUE_ID = re.compile(rb"queued as [0-9A-Za-z]+")
BARE_NEWLINE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def kernels(pure: bool) -> dict[str, Any]:
    """The session module's kernel bindings: the compiled kernels, or their pure twins (what
    TACHYMAIL_PURE=1 gives at import), so one input can run the session on each."""
    commands = commands_py if pure else facade_commands
    return {
        "C": SimpleNamespace(**{name: getattr(commands, name) for name in commands.__all__}),
        "DataReader": (data_py if pure else facade_data).DataReader,
        "BdatReader": (data_py if pure else facade_data).BdatReader,
        "header_value": (mime_py if pure else facade_mime).header_value,
    }


BINDINGS = {False: kernels(False), True: kernels(True)}


def run_session(harness: Harness, data: bytes, pure: bool) -> bytes:
    """One session fed *data* (options, split points, stream); what it wrote, checked."""
    vars(session_module).update(BINDINGS[pure])
    ctx = harness.ctx
    # Input: 4 option bytes, 32 bytes of split points, the stream.
    role, tls = ROLES[option(data, 0) % len(ROLES)]
    peer = PEERS[option(data, 1) % len(PEERS)]
    ctx.config.policy.bare_newline = "normalize" if option(data, 2) & 1 else "reject"
    ctx.config.limits.max_text_line = 1000 if option(data, 2) & 2 else 0
    # Below the RFC minimum that validate() enforces, only so short inputs reach 552 5.3.4.
    ctx.config.limits.max_message_size = 300 if option(data, 2) & 4 else 35 * 1024 * 1024
    early = option(data, 3) == 0xEE  # a client talking before a (delayed) greeting
    hangup = option(data, 3) & 0x10  # the client leaves at the end, even during a commit
    ctx.config.limits.greeting_delay = 0.001 if early else 0.0
    cuts = data[4:36]
    stream = data[36:]

    transport = FakeTransport(harness.loop, peer, tls)
    session = SmtpSession(ctx, role, implicit_tls=tls)
    transport.session = session
    session.connection_made(transport)  # type: ignore[arg-type]
    fed = checked = 0
    try:
        for piece in fragments(atheris.FuzzedDataProvider(cuts), stream, 24):
            if transport.closed:
                break
            if transport.paused:
                harness.settle(transport)
            if transport.closed:
                break
            session.data_received(piece)
            fed += len(piece)
            assert not session.out, (session.out, data)
            if session.state in (State.COMMAND, State.AUTH):
                # 512 (limits.max_command_line), or 12,288 for a partial AUTH line (RFC 4954).
                assert session.lines.pending <= session.lines.auth_limit, data
            elif session.state == State.WAIT:
                bound = session.lines.auth_limit + len(piece)
                assert session.lines.pending <= bound, (session.lines.pending, data)
            if session.state == State.CLOSED:
                assert transport.closed, ("CLOSED state with an open transport", data)
            checked, codes = check_replies(transport.written, checked, data)
            if b"421" in codes:
                assert transport.closed, ("421 without closing", data)
            assert len(transport.written) <= 4096 + 64 * fed, (len(transport.written), fed, data)
        if hangup and transport.paused:
            # Gone while its message commits or its password is checked: the callbacks
            # must find the transport gone and write nothing.
            transport.close()
            harness.quiesce()
        else:
            harness.settle(transport)
        checked, _ = check_replies(transport.written, checked, data)
        assert checked == len(transport.written), ("reply without CRLF", transport.written, data)
    finally:
        if not transport.closed:
            transport.close()
        harness.spin()
    assert session.transport is None and session not in ctx.sessions, data
    committer = ctx.committer
    assert isinstance(committer, Recording)
    for envelope, content in committer.queued:
        # The SMTP smuggling guard: the queue never holds a bare CR or LF (refused or
        # normalised), and never a message without a recipient or above the size limit.
        assert not BARE_NEWLINE.search(content), (content, data)
        assert envelope.recipients, (envelope, data)
        assert len(content) <= ctx.config.limits.max_message_size + 2048, (len(content), data)
    committer.queued.clear()
    return QUEUE_ID.sub(b"queued as ID", bytes(transport.written))


def test_one_input(data: bytes) -> None:
    global HARNESS
    if HARNESS is None:
        HARNESS = Harness()
        logging.getLogger("tachymail").addHandler(Strict())
        logging.getLogger("tachymail").setLevel(logging.INFO)
        logging.getLogger("tachymail").propagate = False
    HARNESS.renew()
    # The same dialogue on the compiled kernels and on their twins: same replies, byte for byte.
    compiled = run_session(HARNESS, data, pure=False)
    agree("session replies", compiled, run_session(HARNESS, data, pure=True), data)


if __name__ == "__main__":
    main(test_one_input)
    sys.exit(0)

"""One POP3 connection: an asyncio.Protocol with an explicit state machine (RFC 1939).

AUTHORIZATION (USER/PASS, AUTH PLAIN, CAPA, STLS) -> TRANSACTION on the INBOX of a local
user, locked for the session with :class:`tachymail.mailbox.MaildropLock` and listed once
at login (mail delivered later shows in the next session) -> UPDATE at QUIT, where the
messages marked with DELE are expunged, and those retrieved get ``\\Seen``, in the mailbox
store's group commit: ``+OK`` only once that is synced. A session that ends any other
way deletes nothing.

Bytes go into the compiled line reader; there is no StreamReader and no await per line.
The replies to a pipelined batch go out in one ``write``. RETR and TOP stream the message
from the store in pieces of about 64 KiB, dot-stuffed by the compiled kernel, and stop
while the client reads nothing (``pause_writing``): a large message is never held whole,
and a client that does not read costs one piece of memory. Password checks (scrypt) and
the maildrop listing run off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Callable
from enum import IntEnum
from typing import TYPE_CHECKING, Any, cast

from tachymail.frontend import (
    is_trusted,
    log_locked_out,
    refusal_reason,
    stop_plaintext,
    tarpit_delay,
    tls_description,
    tls_handshake,
)
from tachymail.mailbox import SEEN, MaildropLock, MessageInfo, expunge, set_flags
from tachymail.mailbox.store import ContentReader
from tachymail.metrics import m
from tachymail.pop3.commands import (
    AUTH,
    AUTH_LINE_LIMIT,
    CHUNK,
    IN_USE,
    SYS_TEMP,
    MessageStream,
    err,
    multiline,
    ok,
    parse_number,
    uidl,
    whole_message,
)
from tachymail.protocol import commands as C

if TYPE_CHECKING:
    from tachymail.auth.throttle import Verdict
    from tachymail.smtp.worker import WorkerContext

log = logging.getLogger(__name__)


class State(IntEnum):
    AUTHORIZATION = 0
    SASL = 1  # expecting an AUTH continuation line
    WAIT = 2  # reading paused: a password check, a TLS handshake or the UPDATE commit
    TRANSACTION = 3
    SENDING = 4  # streaming a RETR/TOP; later commands wait in the line reader
    CLOSED = 5


#: output gathered before it is written mid-batch (a long pipeline of RETRs)
FLUSH_BYTES = 256 * 1024
#: pieces of a message written per turn of the event loop, so other clients get theirs
PIECES_PER_TURN = 16
#: capabilities listed in every state (RFC 2449 §6)
_CAPABILITIES = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
_GREETING = ok("Tachymail POP3 server ready")
_AUTH_FAILED = err("Authentication failed", AUTH)
_LOCKED_OUT = err("Too many failed logins, try again later", SYS_TEMP)
_PLAINTEXT_REFUSED = err("Plaintext authentication disallowed before STLS", AUTH)
_LINE_TOO_LONG = err("Line too long")
_NO_SUCH_MESSAGE = err("No such message")
_STATE_COMMANDS = {
    State.AUTHORIZATION: frozenset({"USER", "PASS", "AUTH", "STLS", "CAPA", "QUIT"}),
    State.TRANSACTION: frozenset(
        {"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "CAPA", "QUIT"}
    ),
}
_ALL_COMMANDS = _STATE_COMMANDS[State.AUTHORIZATION] | _STATE_COMMANDS[State.TRANSACTION]


class Pop3Session(asyncio.Protocol):
    """The server side of one POP3 connection on a pop3 (STLS) or pop3s listener.

    Shares the SMTP worker's connection accounting: ``trusted``, ``role``, ``peer_ip``,
    ``idle``, ``shut_down``, ``close`` and ``rearm_timer`` are what the worker uses.
    """

    def __init__(self, ctx: WorkerContext, role: str, implicit_tls: bool = False) -> None:
        self.ctx = ctx
        self.role = role
        self.implicit_tls = implicit_tls
        self.lines = C.LineReader(ctx.config.pop3.max_command_line, AUTH_LINE_LIMIT)
        self.state = State.AUTHORIZATION
        self.transport: asyncio.Transport | None = None
        self.peer_ip = ""
        self.peer_port = 0
        self.trusted = False
        self.tls: str | None = None
        self.out: list[bytes] = []
        self.out_size = 0
        self.close_after_flush = False
        self.errors = 0
        self.auth_failures = 0
        self.opened = False
        self.outcome = "disconnect"
        self.last_activity = time.monotonic()
        self.write_paused = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.user_name: str | None = None  # given by USER, waiting for PASS
        self.user: str | None = None  # logged in
        self.lock: MaildropLock | None = None
        self.uidvalidity = 0
        self.drop: list[MessageInfo] = []
        self.deleted: set[int] = set()  # indexes into drop
        self.retrieved: set[int] = set()
        self.updating = False  # the UPDATE commit is under way: it releases the lock
        self.retrieved_count = 0
        self.deleted_count = 0
        self._stream: MessageStream | None = None
        self._stream_index = -1
        self._stream_top = False
        self._pump_scheduled = False
        #: one read transaction for the RETRs of a pipelined batch, closed at its flush
        self._reader: ContentReader | None = None

    # --- connection life cycle -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("", 0)
        self.peer_ip, self.peer_port = peer[0], peer[1]
        m.pop3_sessions[self.role].inc()
        if self.implicit_tls:
            self.tls = tls_description(transport)
        self.trusted = is_trusted(self.peer_ip, self.ctx.trusted)
        refused = self.ctx.admit(self)
        if refused is not None:
            why = refusal_reason(refused, self.peer_ip)
            log.warning("refused POP3 connection from %s: %s", self.peer_ip, why)
            self.outcome = "refused"
            m.smtp_connections_refused[refused].inc()
            transport.write(err(f"{why}, try again later", SYS_TEMP))
            self.state = State.CLOSED
            transport.close()
            return
        self.opened = True
        m.pop3_sessions_open[self.role].inc()
        transport.write(_GREETING)
        self.rearm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.outcome == "disconnect":
            self.outcome = "error"
        was_streaming = self.state == State.SENDING
        self.state = State.CLOSED
        self.transport = None
        self._close_reader()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.updating:
            # No UPDATE: nothing is deleted; what was read is still marked seen.
            self._mark_seen_only()
            self._release()
        log.info(
            "pop3 session %s:%s closed (%s): user %s, %d retrieved, %d deleted, %d error(s)%s%s",
            self.peer_ip,
            self.peer_port,
            self.outcome,
            self.user or "-",
            self.retrieved_count,
            self.deleted_count,
            self.errors,
            " during a RETR/TOP" if was_streaming else "",
            f" ({exc})" if exc else "",
            extra={
                "fields": {
                    "event": "pop3_session",
                    "outcome": self.outcome,
                    "client": f"{self.peer_ip}:{self.peer_port}",
                    "listener": self.role,
                    "tls": self.tls,
                    "user": self.user,
                    "retrieved": self.retrieved_count,
                    "deleted": self.deleted_count,
                    "errors": self.errors,
                }
            },
        )
        if self.opened:
            self.opened = False
            m.pop3_sessions_open[self.role].dec()
        self.ctx.release(self)

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _mark_seen_only(self) -> None:
        """After a session that ended without QUIT: the retrieved messages get \\Seen (the
        client has them), nothing is deleted."""
        seen = self._seen_uids(include_deleted=True)
        committer = self.ctx.mailbox_committer
        if not seen or self.user is None:
            return
        future = committer.submit_operation(set_flags(self.user, "INBOX", seen, [SEEN], "add"))
        user = self.user
        future.add_done_callback(lambda done: _log_failure(done, f"marking {user}'s mail seen"))

    # --- timers ----------------------------------------------------------------------------

    def rearm_timer(self) -> None:
        """Work out when the session times out again (also when stress mode begins)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is None or self.state == State.CLOSED:
            return
        due, _ = self._due(time.monotonic())
        self.timer = self.ctx.loop.call_later(
            max(due - time.monotonic(), 0.05), self._check_timeout
        )

    def _due(self, now: float) -> tuple[float, str]:
        """When the session's idle limit runs out, and why ("" while it is our turn)."""
        idle = self.ctx.config.pop3.idle_timeout
        if self.write_paused:
            return self.write_paused + idle, "write_stalled"
        if self.state in (State.WAIT, State.SENDING):
            return max(self.last_activity + idle, now + 1.0), ""
        stress = self.ctx.stress_timeout
        if self.state != State.TRANSACTION and self.ctx.stress and 0 < stress < idle:
            return self.last_activity + stress, "stress_timeout"  # before login only
        return self.last_activity + idle, "idle_timeout"

    def _check_timeout(self) -> None:
        self.timer = None
        transport = self.transport
        if transport is None:
            return
        now = time.monotonic()
        due, why = self._due(now)
        if self.state == State.CLOSED:
            transport.abort()  # our last words were never read
            return
        if why and now >= due:
            log.info("pop3 session %s:%s cut off: %s", self.peer_ip, self.peer_port, why)
            self.outcome = why
            if why == "write_stalled":
                self.state = State.CLOSED
                transport.abort()
                return
            # RFC 1939 §3: the autologout timer ends the session without UPDATE.
            self.out.append(err("Autologout: idle for too long"))
            self.close_after_flush = True
            self._flush()
            self.timer = self.ctx.loop.call_later(10.0, self._check_timeout)
            return
        self.rearm_timer()

    # --- write-side back-pressure ----------------------------------------------------------

    def pause_writing(self) -> None:
        """The client is not reading: stop sending the message and reading commands."""
        self.write_paused = time.monotonic()
        if self.transport is not None and self.state != State.WAIT:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """Output drained: go on with the message under way, then with pipelined commands."""
        self.write_paused = 0.0
        self.last_activity = time.monotonic()
        if self.transport is None or self.state in (State.WAIT, State.CLOSED):
            return
        if self.state == State.SENDING:
            self._pump()
        if self.state != State.SENDING:
            self.transport.resume_reading()
            self._run()
        self._flush()

    def shut_down(self, reply: bytes) -> None:
        """The server is going away: say so (POP3's own words, not SMTP's *reply*) and
        close without UPDATE."""
        self.outcome = "shutdown"
        self.out.append(err("Server shutting down, try again later", SYS_TEMP))
        self.close_after_flush = True
        self._flush()

    def close(self) -> None:
        """Close at once (shutdown, after the drain period)."""
        if self.transport is not None:
            self.transport.close()

    @property
    def idle(self) -> bool:
        """Waiting for a command: safe to close when draining (a RETR or the UPDATE
        commit under way is not)."""
        return self.state in (State.AUTHORIZATION, State.SASL, State.TRANSACTION)

    def _queue(self, data: bytes) -> None:
        self.out.append(data)
        self.out_size += len(data)
        if self.out_size >= FLUSH_BYTES:
            self._write_out()

    def _write_out(self) -> None:
        transport = self.transport
        if transport is None:
            self.out.clear()
        elif self.out:
            data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
            self.out.clear()
            transport.write(data)  # may call pause_writing at once
        self.out_size = 0

    def _flush(self) -> None:
        self._close_reader()
        self._write_out()
        if self.close_after_flush and self.transport is not None:
            self.state = State.CLOSED
            self.transport.close()

    # --- input -----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        self.lines.feed(data)
        if self.state in (State.AUTHORIZATION, State.SASL, State.TRANSACTION):
            self._run()
            self._flush()
        # WAIT/SENDING: reading is paused; whatever the transport still hands over waits.

    def _run(self) -> None:
        """Handle every complete command line buffered, while in a command state."""
        lines = self.lines
        while (
            self.state == State.AUTHORIZATION
            or self.state == State.TRANSACTION
            or self.state == State.SASL
        ) and not (self.write_paused or self.close_after_flush):
            item = lines.readline()
            if item is None:
                break
            line, flags = item
            if flags & C.LINE_TOO_LONG:
                if self.state == State.SASL:
                    self._leave_sasl()
                self._error(_LINE_TOO_LONG, "line too long")
                continue
            if flags:
                line = line.replace(b"\r", b"")  # a bare LF ends a line as well as CRLF
            if self.state == State.SASL:
                self._leave_sasl()
                self._sasl_plain(line)
                continue
            keyword, _, args = line.partition(b" ")
            # Clients send keywords in upper case; any case is accepted (RFC 1939 §3).
            handler = _BY_KEYWORD.get(keyword) or _BY_KEYWORD.get(keyword.upper())
            if handler is None:
                self._error(err("Unknown command"), f"unknown command {line[:20]!r}")
            elif handler not in _STATE_HANDLERS[self.state]:
                name = keyword.decode("ascii").upper()
                self._error(err(f"{name} not valid in this state"), f"{name} out of state")
            else:
                handler(self, args)

    def _error(self, reply: bytes, why: str) -> None:
        """A ``-ERR`` for bad input; past limits.max_errors the session ends."""
        self.errors += 1
        log.info("pop3 session %s:%s: %s", self.peer_ip, self.peer_port, why)
        self.out.append(reply)
        if self.errors > self.ctx.config.limits.max_errors:
            self.out.append(err("Too many errors, closing connection"))
            self.outcome = "too_many_errors"
            self.close_after_flush = True

    # --- AUTHORIZATION ---------------------------------------------------------------------

    def _may_login(self) -> bool:
        """Passwords only under TLS, from trusted networks, or when pop3.plaintext_auth."""
        return bool(self.tls) or self.trusted or self.ctx.config.pop3.plaintext_auth

    def cmd_capa(self, args: bytes) -> None:
        capabilities = list(_CAPABILITIES)
        if self.state == State.AUTHORIZATION:
            if self._may_login():
                capabilities += ["USER", "SASL PLAIN"]
            if self.role == "pop3" and not self.tls and self.ctx.tls_context is not None:
                capabilities.append("STLS")
        capabilities.append("IMPLEMENTATION Tachymail")
        self.out.append(multiline("Capability list follows", capabilities))

    def cmd_user(self, args: bytes) -> None:
        if not self._may_login():
            self._error(_PLAINTEXT_REFUSED, "USER before TLS")
            return
        name = args.strip()
        if not name:
            self._error(err("Syntax: USER name"), "USER without a name")
            return
        self.user_name = name.decode("utf-8", "replace")
        self.out.append(ok("Send PASS"))

    def cmd_pass(self, args: bytes) -> None:
        if not self._may_login():
            self._error(_PLAINTEXT_REFUSED, "PASS before TLS")
            return
        name, self.user_name = self.user_name, None
        if name is None:
            self._error(err("Send USER first"), "PASS without USER")
            return
        # RFC 1939 §7: the password is the rest of the line, spaces included.
        self._login(name, args.decode("utf-8", "replace"))

    def cmd_auth(self, args: bytes) -> None:
        self.user_name = None
        mechanism, _, initial = args.strip().partition(b" ")
        if not mechanism:
            self.out.append(multiline("Supported SASL mechanisms", ["PLAIN"]))
            return
        if mechanism.upper() != b"PLAIN":
            self._error(err("Unsupported authentication mechanism"), "AUTH mechanism")
            return
        if not self._may_login():
            self._error(_PLAINTEXT_REFUSED, "AUTH before TLS")
            return
        if initial:
            self._sasl_plain(initial.strip())
            return
        self.out.append(b"+ \r\n")
        self.state = State.SASL
        self.lines.auth_exchange = True

    def _leave_sasl(self) -> None:
        self.state = State.AUTHORIZATION
        self.lines.auth_exchange = False

    def _sasl_plain(self, response: bytes) -> None:
        """RFC 4616 PLAIN: authzid NUL authcid NUL password, base64 (``=``: empty)."""
        if response == b"*":
            self.out.append(err("Authentication cancelled"))  # RFC 5034 §4
            return
        try:
            decoded = b"" if response == b"=" else base64.b64decode(response, validate=True)
        except (binascii.Error, ValueError):
            self._error(err("Invalid base64 in AUTH response"), "AUTH bad base64")
            return
        parts = decoded.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            self._error(err("Malformed PLAIN response"), "AUTH PLAIN malformed")
            return
        authzid, authcid, password = parts
        if authzid and authzid.lower() != authcid.lower():
            self._error(err("Logging in as another user is not supported", AUTH), "AUTH authzid")
            return
        self._login(authcid.decode("utf-8", "replace"), password.decode("utf-8", "replace"))

    def _login(self, name: str, password: str) -> None:
        """Check the password off the loop (through the cross-worker AuthThrottle), then
        lock and list the maildrop there too; the reply comes from :meth:`_login_done`."""
        ctx = self.ctx
        store = ctx.mailbox
        user = name.strip().lower()
        self.state = State.WAIT
        assert self.transport is not None
        self.transport.pause_reading()
        _, at, domain = user.rpartition("@")
        # Only users of a local domain have a maildrop; others fail like a wrong password.
        local = bool(at) and domain in ctx.local_domains
        users, ip = ctx.users, self.peer_ip
        store_dir = ctx.config.mailbox_path

        def work() -> tuple[Verdict, MaildropLock | None, int, list[MessageInfo]]:
            verdict = ctx.auth_throttle.attempt(
                ip, user, lambda: users.check(user, password) and local
            )
            if not verdict.ok:
                return verdict, None, 0, []
            lock = MaildropLock.acquire(store_dir, user)
            if lock is None:
                return verdict, None, 0, []
            try:
                info = store.mailbox(user, "INBOX")
                listing = store.messages(user, "INBOX") if info is not None else []
            except BaseException:
                lock.release()
                raise
            return verdict, lock, info.uidvalidity if info is not None else 0, listing

        job = ctx.loop.run_in_executor(None, work)
        job.add_done_callback(lambda done: self._login_done(user, done))

    def _login_done(self, user: str, done: asyncio.Future[Any]) -> None:
        if done.cancelled() or done.exception() is not None:
            log.error("pop3 session %s: login check failed: %s", self.peer_ip, done.exception())
            if self.transport is not None:
                self._resume(State.AUTHORIZATION, err("Login temporarily unavailable", SYS_TEMP))
            return
        verdict, lock, uidvalidity, listing = done.result()
        if self.transport is None:
            if lock is not None:
                lock.release()  # the client left while we were checking
            return
        shown = user[:100]  # the name came from the client
        if verdict.ok and lock is None:
            m.pop3_logins["in_use"].inc()
            log.info("pop3 session %s: maildrop of %s in use", self.peer_ip, shown)
            self._resume(State.AUTHORIZATION, err("Maildrop already locked by a session", IN_USE))
            return
        if verdict.ok:
            m.pop3_logins["success"].inc()
            self.user, self.lock = user, lock
            self.uidvalidity, self.drop = uidvalidity, listing
            total = sum(message.size for message in listing)
            log.info(
                "pop3 session %s: %s logged in, %d messages (%d octets)",
                self.peer_ip,
                user,
                len(listing),
                total,
            )
            reply = ok(f"Logged in, maildrop has {len(listing)} messages ({total} octets)")
            self._resume(State.TRANSACTION, reply)
            return
        auth = self.ctx.config.auth
        self.auth_failures += 1
        if verdict.lockout is not None:
            m.pop3_logins["locked_out"].inc()
            m.auth_locked_attempts.inc()
            log_locked_out(log, f"pop3 session {self.peer_ip}", "login", shown, verdict.lockout)
            self.ctx.loop.call_later(auth.failure_delay, self._login_failed, _LOCKED_OUT)
            return
        m.pop3_logins["failure"].inc()
        log.warning("pop3 session %s: login failed for %r", self.peer_ip, shown)
        delay = tarpit_delay(verdict, auth, self.peer_ip, shown, log)
        self.ctx.loop.call_later(delay, self._login_failed, _AUTH_FAILED)

    def _login_failed(self, reply: bytes) -> None:
        if self.transport is None:
            return
        if self.auth_failures >= self.ctx.config.auth.max_failures:
            self.out.append(reply)
            self.out.append(err("Too many failed logins, closing connection"))
            self.outcome = "auth_failures"
            self.close_after_flush = True
            self._flush()
            return
        self._resume(State.AUTHORIZATION, reply)

    def _resume(self, state: State, reply: bytes) -> None:
        """Leave WAIT for *state*: send *reply*, read again, run what was pipelined."""
        self.out.append(reply)
        self.state = state
        assert self.transport is not None
        if not self.write_paused:  # else resume_writing resumes reading
            self.transport.resume_reading()
        self.last_activity = time.monotonic()
        self._run()
        self._flush()

    def cmd_stls(self, args: bytes) -> None:
        if self.tls is not None:
            self._error(err("Command not permitted when TLS active"), "STLS twice")
            return
        if self.role != "pop3" or self.ctx.tls_context is None:
            self._error(err("STLS not available"), "STLS unavailable")
            return
        self.out.append(ok("Begin TLS negotiation"))
        self._flush()
        self.state = State.WAIT
        assert self.transport is not None
        stop_plaintext(self.transport, self.lines, log, f"pop3 session {self.peer_ip}", "STLS")
        self.ctx.loop.create_task(self._upgrade())

    async def _upgrade(self) -> None:
        transport = self.transport
        assert transport is not None and self.ctx.tls_context is not None
        who = f"pop3 session {self.peer_ip}"
        new = await tls_handshake(self.ctx.loop, transport, self, self.ctx.tls_context, log, who)
        if new is None:
            return
        self.transport = new
        self.tls = tls_description(new)
        self.user_name = None  # RFC 2595 §4: nothing learnt before TLS carries over
        self.state = State.AUTHORIZATION
        self._run()
        self._flush()

    # --- TRANSACTION -----------------------------------------------------------------------

    def _message(self, arg: bytes, keyword: str) -> int | None:
        """The index into the maildrop of message number *arg*, or None (replied)."""
        number = parse_number(arg)
        if number is None:
            self._error(err(f"Syntax: {keyword} message-number"), f"{keyword} {arg[:20]!r}")
            return None
        if not 1 <= number <= len(self.drop):
            self._error(_NO_SUCH_MESSAGE, f"{keyword} {number}: no such message")
            return None
        if number - 1 in self.deleted:
            self._error(err(f"Message {number} already deleted"), f"{keyword} {number}: deleted")
            return None
        return number - 1

    def _listing(self) -> tuple[int, int]:
        """(messages, octets) of the maildrop without those marked deleted."""
        count = size = 0
        for index, message in enumerate(self.drop):
            if index not in self.deleted:
                count += 1
                size += message.size
        return count, size

    def cmd_stat(self, args: bytes) -> None:
        if args.strip():
            self._error(err("Syntax: STAT"), "STAT with arguments")
            return
        count, size = self._listing()
        self.out.append(ok(f"{count} {size}"))

    def _scan(self, args: bytes, keyword: str, value: Callable[[int], str]) -> None:
        """LIST and UIDL: one message with an argument, else every undeleted one."""
        args = args.strip()
        if args:
            index = self._message(args, keyword)
            if index is not None:
                self.out.append(ok(f"{index + 1} {value(index)}"))
            return
        count, size = self._listing()
        lines = [f"{i + 1} {value(i)}" for i in range(len(self.drop)) if i not in self.deleted]
        self.out.append(multiline(f"{count} messages ({size} octets)", lines))

    def cmd_list(self, args: bytes) -> None:
        self._scan(args, "LIST", lambda i: str(self.drop[i].size))

    def cmd_uidl(self, args: bytes) -> None:
        self._scan(args, "UIDL", lambda i: uidl(self.uidvalidity, self.drop[i].uid))

    def cmd_retr(self, args: bytes) -> None:
        # The common case inline (a pipelined RETR costs a few microseconds in all):
        # digits only, a message that exists and is not deleted.
        if args.isdigit() and len(args) <= 9:
            index = int(args) - 1
            if 0 <= index < len(self.drop) and index not in self.deleted:
                self._send(index, -1)
                return
        found = self._message(args.strip(), "RETR")
        if found is not None:
            self._send(found, -1)

    def cmd_top(self, args: bytes) -> None:
        parts = args.strip().split(b" ")
        lines = parse_number(parts[1]) if len(parts) == 2 else None
        if lines is None:
            self._error(err("Syntax: TOP message-number lines"), f"TOP {args[:20]!r}")
            return
        index = self._message(parts[0], "TOP")
        if index is not None:
            self._send(index, lines)

    def cmd_dele(self, args: bytes) -> None:
        index = self._message(args.strip(), "DELE")
        if index is not None:
            self.deleted.add(index)
            self.out.append(ok(f"Message {index + 1} deleted"))

    def cmd_noop(self, args: bytes) -> None:
        self.out.append(ok())

    def cmd_rset(self, args: bytes) -> None:
        self.deleted.clear()
        count, size = self._listing()
        self.out.append(ok(f"Maildrop has {count} messages ({size} octets)"))

    # --- RETR / TOP: the message streamed from the store -----------------------------------

    def _send(self, index: int, top: int) -> None:
        """RETR (*top* < 0) or TOP: the reply line, then the message piece by piece."""
        message = self.drop[index]
        size = message.size
        if top < 0 and 0 < size <= CHUNK:
            # Most messages fit one piece: one read and one reply, no stream to step through
            # (a third of the CPU of a pipelined 1 KiB RETR).
            try:
                reader = self._reader
                if reader is None:
                    reader = self._reader = self.ctx.mailbox.reader()
                data = reader.read(message.content_id, 0, size)
            except Exception:  # the stream below reads again, and logs what goes wrong
                data = b""
            if len(data) == size:
                wire = whole_message(data)
                self._queue(b"+OK %d octets\r\n%s" % (size, wire))
                self.retrieved.add(index)
                self.retrieved_count += 1
                m.pop3_retrieved_messages.inc()
                m.pop3_retrieved_bytes.inc(len(wire) - 3)  # wire octets, as the stream counts
                return
        self._queue(ok(f"{message.size} octets") if top < 0 else ok("Top of message follows"))
        self._stream = MessageStream(message.size, top)
        self._stream_index = index
        self._stream_top = top >= 0
        self.state = State.SENDING
        self._pump()

    def _pump(self) -> bool:
        """Write pieces of the message until it is sent (True), the client stops reading,
        or this turn of the loop has had its share (False: it goes on later)."""
        stream = self._stream
        assert stream is not None
        message = self.drop[self._stream_index]
        read = self.ctx.mailbox.read
        pieces = 0
        while not stream.done:
            if self.transport is None:
                return False
            if self.write_paused:
                return False  # resume_writing pumps again
            if pieces >= PIECES_PER_TURN:
                self.transport.pause_reading()  # commands wait until the message is out
                if not self._pump_scheduled:
                    self._pump_scheduled = True
                    self.ctx.loop.call_soon(self._pump_later)
                return False
            offset, length = stream.want()
            try:
                data = read(message.content_id, offset, length)
            except Exception as exc:  # an unreadable message must not kill the session
                log.error("pop3: reading message uid %d of %s: %s", message.uid, self.user, exc)
                data = b""
            wire = stream.take(data)
            if not data and not stream.sent:
                log.error("pop3: message uid %d of %s has no content", message.uid, self.user)
            if wire:
                self._queue(wire)
            pieces += 1
        self._queue(stream.finish())
        if not self._stream_top:
            self.retrieved.add(self._stream_index)
            self.retrieved_count += 1
            m.pop3_retrieved_messages.inc()
        m.pop3_retrieved_bytes.inc(stream.sent)
        self._stream = None
        self._stream_index = -1
        self.state = State.TRANSACTION
        return True

    def _pump_later(self) -> None:
        self._pump_scheduled = False
        if self.state != State.SENDING or self.transport is None:
            return
        if self._pump() and not self.write_paused:
            self.transport.resume_reading()
            self._run()
        self._flush()

    # --- QUIT and UPDATE -------------------------------------------------------------------

    def cmd_quit(self, args: bytes) -> None:
        if self.state == State.AUTHORIZATION:
            self.outcome = "quit"
            self.out.append(ok("Bye"))
            self.close_after_flush = True
            return
        self._update()

    def _seen_uids(self, include_deleted: bool = False) -> list[int]:
        if not self.ctx.config.pop3.mark_seen:
            return []
        return [
            self.drop[i].uid
            for i in sorted(self.retrieved)
            if (include_deleted or i not in self.deleted) and SEEN not in self.drop[i].flags
        ]

    def _update(self) -> None:
        """RFC 1939 §6: expunge what was marked deleted, mark what was retrieved seen, in
        the store's group commit; ``+OK`` only once that is synced."""
        assert self.user is not None
        deleted = sorted(self.drop[i].uid for i in self.deleted)
        seen = self._seen_uids()
        committer = self.ctx.mailbox_committer
        self.outcome = "quit"
        if not deleted and not seen:
            self._finish_update(ok("Bye"))
            return
        self.updating = True
        self.state = State.WAIT
        assert self.transport is not None
        self.transport.pause_reading()
        futures = []
        if seen:  # first: if the expunge fails, the messages read are still marked seen
            futures.append(
                committer.submit_operation(set_flags(self.user, "INBOX", seen, [SEEN], "add"))
            )
        if deleted:
            futures.append(committer.submit_operation(expunge(self.user, "INBOX", deleted)))
        gathered = asyncio.gather(*futures, return_exceptions=True)
        gathered.add_done_callback(lambda done: self._updated(deleted, done))

    def _updated(self, deleted: list[int], done: asyncio.Future[list[Any]]) -> None:
        """The UPDATE commit is over: ``+OK`` when the expunge is synced, else ``-ERR``
        (nothing was deleted: the operation writes all or nothing)."""
        self.updating = False
        if done.cancelled():
            outcomes: list[Any] = [RuntimeError("commit cancelled")]
        else:
            outcomes = done.result()
        expunged = outcomes[-1] if deleted else []
        seen = outcomes[0] if len(outcomes) == 2 or not deleted else None
        if isinstance(seen, BaseException):
            log.error("pop3: marking %s's mail seen failed: %s", self.user, seen)
        if isinstance(expunged, BaseException):
            log.error("pop3: UPDATE of %s failed, nothing deleted: %s", self.user, expunged)
            self.outcome = "update_failed"
            self._finish_update(err("Some deleted messages not removed, try again", SYS_TEMP))
            return
        self.deleted_count = len(expunged)
        m.pop3_deleted_messages.inc(len(expunged))
        left = len(self.drop) - len(self.deleted)
        self._finish_update(ok(f"Bye, {left} messages left" if left else "Bye, maildrop empty"))

    def _finish_update(self, reply: bytes) -> None:
        self._release()
        self.retrieved.clear()  # nothing left to mark seen when the connection goes
        if self.transport is None:
            return
        self.out.append(reply)
        self.close_after_flush = True
        self._flush()


def _log_failure(done: asyncio.Future[Any], what: str) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("pop3: %s failed: %s", what, done.exception())


# Keyword -> handler, once for the class.
_HANDLERS: dict[str, Callable[[Pop3Session, bytes], None]] = {
    "USER": Pop3Session.cmd_user,
    "PASS": Pop3Session.cmd_pass,
    "AUTH": Pop3Session.cmd_auth,
    "STLS": Pop3Session.cmd_stls,
    "CAPA": Pop3Session.cmd_capa,
    "QUIT": Pop3Session.cmd_quit,
    "STAT": Pop3Session.cmd_stat,
    "LIST": Pop3Session.cmd_list,
    "RETR": Pop3Session.cmd_retr,
    "DELE": Pop3Session.cmd_dele,
    "NOOP": Pop3Session.cmd_noop,
    "RSET": Pop3Session.cmd_rset,
    "TOP": Pop3Session.cmd_top,
    "UIDL": Pop3Session.cmd_uidl,
}
assert set(_HANDLERS) == _ALL_COMMANDS
_BY_KEYWORD = {name.encode(): handler for name, handler in _HANDLERS.items()}
_STATE_HANDLERS = {
    state: frozenset(_HANDLERS[name] for name in names) for state, names in _STATE_COMMANDS.items()
}

"""One inbound SMTP connection: an asyncio.Protocol with an explicit state machine.

Bytes go straight into the compiled readers (``protocol.commands`` for command
lines, ``protocol.data`` for DATA and BDAT bodies); there is no StreamReader and
no await per line. Every reply produced while handling one read goes out in one
``write``, so a pipelined batch (RFC 2920) costs one system call. While a
message waits for its group commit, reading is paused (back-pressure), and the
250 is sent only after the commit has synced.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import functools
import logging
import re
import time
from collections.abc import Callable
from enum import IntEnum
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

from tachymail.frontend import (
    is_trusted,
    log_intake,
    log_locked_out,
    refusal_reason,
    stop_plaintext,
    tarpit_delay,
    tls_description,
    tls_handshake,
)
from tachymail.mailauth.results import remove_forged
from tachymail.metrics import m
from tachymail.protocol import commands as C
from tachymail.protocol import replies as R
from tachymail.protocol.data import BdatReader, DataReader
from tachymail.protocol.errors import SmtpSyntaxError
from tachymail.protocol.mime import header_value
from tachymail.queue.envelope import ACTIVE, HELD, Envelope, Recipient, new_queue_id
from tachymail.queue.events import events_wanted, put_message_reported
from tachymail.queue.store import StorageFull
from tachymail.smtp.checks import DISCARD, HOLD, REJECT, checks_for
from tachymail.smtp.verify import DELIVERABLE, UNDELIVERABLE, UNVERIFIED, ProbeResult

if TYPE_CHECKING:
    from tachymail.auth.throttle import Verdict
    from tachymail.mailauth.inbound import ConnectVerdict, MailVerdict, MessageVerdict
    from tachymail.mailauth.iprev import IprevResult
    from tachymail.smtp.worker import WorkerContext

log = logging.getLogger(__name__)


class SessionState(IntEnum):
    GREETING = 0  # connected, greeting delayed: the client must not talk yet
    COMMAND = 1
    DATA = 2  # reading a DATA body
    BDAT = 3  # reading a BDAT chunk
    WAIT = 4  # reading paused: a commit, an AUTH check or a TLS handshake is under way
    AUTH = 5  # expecting an AUTH continuation line
    CLOSED = 6


class State:
    """SessionState's members as plain class attributes, which the session reads on every
    command and chunk: Python 3.11's EnumType has a ``__getattr__`` hook, which makes each
    ``SessionState.X`` a Python-level ``__getattribute__`` call (about 860 instructions; a
    session read 15 of them per message, 5% of an SMTP worker's instructions)."""

    GREETING = SessionState.GREETING
    COMMAND = SessionState.COMMAND
    DATA = SessionState.DATA
    BDAT = SessionState.BDAT
    WAIT = SessionState.WAIT
    AUTH = SessionState.AUTH
    CLOSED = SessionState.CLOSED


#: queue ids named in a session's log line; a longer session logs the count only beyond it
LOGGED_IDS = 100
#: replies gathered before a long pipelined batch is flushed mid-way, so that a client
#: reading none of them meets the transport's high-water mark (pause_writing) early
FLUSH_REPLIES = 256
#: longest AUTH command (with an initial response) or AUTH exchange line, CRLF included
#: (RFC 4954 §4); 500 5.5.6 beyond, for an exchange line
AUTH_LINE_LIMIT = 12288
#: a RCPT's answer when its probe outlasts policy.verify_timeout (the probe goes on)
IN_PROGRESS = ProbeResult(UNVERIFIED, "", "address verification in progress")
PROBE_CANCELLED = ProbeResult(UNVERIFIED, "", "address verification interrupted")
_BARE_NEWLINE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_BDAT_ARGS = re.compile(rb"(\d{1,18})(?: +(LAST))? *", re.IGNORECASE)
_HELP = R.multiline(
    214,
    [
        "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH",
        "See RFC 5321",
    ],
    "2.0.0",
)


class SmtpSession(asyncio.Protocol):
    """The server side of one SMTP connection on one listener.

    Inbound authentication (``mailauth``, the listener's mode: "enforce", "tag" or "off")
    runs for clients that are neither trusted (policy.trusted_networks) nor authenticated,
    through the worker's :class:`~tachymail.mailauth.inbound.InboundChecker`, without an
    await per line: DNSBL/DNSWL before the greeting (a listed client gets the 554 5.7.1 as
    its greeting, then 503 5.5.1 to everything but QUIT, RFC 5321 §3.1), iprev from the
    connect on, SPF from MAIL FROM on (MAIL's reply waits for it only with
    ``spf_reject_fail``: then 550 5.7.23 for an SPF fail), and DKIM, ARC and DMARC at the
    end of the message, reading paused meanwhile (WAIT). A DMARC p=reject failure gets the
    checker's 550 5.7.1 and nothing is queued; a quarantined message is queued held.
    Authentication-Results (and an ARC set when sealing) go on top of the queued message,
    above our Received field (RFC 8601 §5: above any other trace field), and fields
    forging our authserv-id are removed. A client that leaves while a check runs leaves
    nothing running: the session's checks are cancelled.
    """

    #: verb number -> handler of this class (set below the class; a subclass that
    #: overrides a ``cmd_*`` method gets its own table, see __init_subclass__)
    commands: ClassVar[dict[int, Callable[[Any, bytes], None]]]
    # The inbound checks under way, None when none (class defaults: an idle session on a
    # listener without checks stores nothing for them).
    _connect_check: asyncio.Task[ConnectVerdict] | None = None
    _iprev_check: asyncio.Task[IprevResult | None] | None = None
    _mail_check: asyncio.Future[MailVerdict] | None = None
    _message_check: asyncio.Task[MessageVerdict] | None = None
    #: (HELO name, sender, the finished SPF check) of the session's last transaction whose
    #: SPF came from the resolver's cache without a temperror: the same client, HELO name
    #: and sender get the same verdict while the records stay cached, so a session that
    #: sends message after message from one sender checks it once
    _spf_known: tuple[str, str, asyncio.Future[MailVerdict]] | None = None
    #: the client is on a DNSWL zone: the later checks are skipped
    allowlisted = False
    #: the trace fields the inbound checks put on the message being accepted (our
    #: Received field is then already on its content, under them)
    _trace: bytes | None = None
    #: the inbound results of the message being committed, for its intake log line
    _auth_pending: str | None = None
    #: the inbound results of the session's last checked message, for its log line
    auth_last: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The same verbs, each dispatched to the subclass's override when it has one.
        cls.commands = {verb: getattr(cls, fn.__name__) for verb, fn in _COMMANDS.items()}

    def __init__(
        self, ctx: WorkerContext, role: str, implicit_tls: bool = False, mailauth: str = "off"
    ) -> None:
        self.ctx = ctx
        self.role = role
        self.implicit_tls = implicit_tls
        self.mailauth = mailauth  # the listener's inbound-authentication mode
        # The command table; a client refused at connect gets one that only lets QUIT out.
        self.handlers = self.commands
        limits = ctx.config.limits
        self.lines = C.LineReader(limits.max_command_line, AUTH_LINE_LIMIT)
        self.state = State.GREETING
        self.transport: asyncio.Transport | None = None
        self.peer_ip = ""
        self.peer_port = 0
        self.trusted = False
        self.out: list[bytes] = []
        self.close_after_flush = False
        self.errors = 0
        self.auth_failures = 0
        self.helo: str | None = None
        self.esmtp = False
        self.tls: str | None = None
        self.auth_user: str | None = None
        self.messages = 0
        self.queue_ids: list[str] = []  # for the session's log line (the first LOGGED_IDS)
        self.opened = False  # counted in the open-connections gauge
        self.outcome = "disconnect"  # how the session ended, for its log line
        # Monotonic stamps the timer checks; input only stamps them (0.0: not running).
        self.last_activity = time.monotonic()
        self.line_started = 0.0  # the first octet of the partial command line buffered
        self.write_paused = 0.0  # the transport's buffer went over its high-water mark
        self.timer: asyncio.TimerHandle | None = None
        self._reset_transaction()
        self._auth_step: Callable[[bytes], None] | None = None
        self._auth_login_user = ""
        self._probing: asyncio.Future[ProbeResult] | None = None  # a RCPT awaiting its probe

    def _reset_transaction(self) -> None:
        self.mail_from: str | None = None
        self.mail_params: dict[str, str] = {}
        self.rcpts: list[Recipient] = []
        self.rcpt_refused = 0
        self.body: DataReader | None = None
        self.bdat: BdatReader | None = None
        self.bdat_refused = False  # BDAT chunks of a refused transaction: read, then discarded
        self.data_started = 0.0  # the DATA command or first BDAT of the transfer under way
        if self._mail_check is not None:  # the SPF check of a transaction given up
            self._mail_check.cancel()
            self._mail_check = None

    # --- connection life cycle -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("", 0)
        self.peer_ip, self.peer_port = peer[0], peer[1]
        ctx = self.ctx
        m.smtp_connections[self.role].inc()
        if self.implicit_tls:
            self.tls = tls_description(transport)
            m.tls_handshakes[self.role].inc()
        self.trusted = is_trusted(self.peer_ip, ctx.trusted)
        refused = ctx.admit(self)
        if refused is not None:
            why = refusal_reason(refused, self.peer_ip)
            log.warning("refused connection from %s: %s", self.peer_ip, why)
            self.outcome = "refused"
            m.smtp_connections_refused[refused].inc()
            m.REPLIES[4] += 1
            transport.write(R.reply(421, "4.7.0", f"Error: {why}, try again later"))
            self.state = State.CLOSED
            transport.close()
            return
        self.opened = True
        m.smtp_connections_open[self.role].inc()
        delay = ctx.config.limits.greeting_delay
        if self.mailauth != "off" and not self.trusted and self._connect_checks():
            pass  # the greeting waits for the DNSBL/DNSWL verdict (see _connected)
        elif delay > 0:
            self.ctx.loop.call_later(delay, self._greet)
        else:
            self._greet()
        self.rearm_timer()  # admit() may already have armed it (stress mode began)

    def _greet(self) -> None:
        if self.state != State.GREETING or self.transport is None:
            return
        self.state = State.COMMAND
        m.REPLIES[2] += 1
        self.transport.write(R.reply(220, "", f"{self.ctx.hostname} ESMTP Tachymail"))

    # --- inbound authentication (mailauth) -----------------------------------------------

    def _connect_checks(self) -> bool:
        """Start the checks of a new untrusted client: iprev in the background, and the
        DNSBL/DNSWL lookups when zones are configured; True when the greeting waits for
        those (:meth:`_connected` sends it)."""
        inbound = self.ctx.inbound
        assert inbound is not None  # the worker makes one when a listener has checks on
        settings = self.ctx.config.mailauth
        loop = self.ctx.loop
        if settings.iprev:  # its PTR and address lookups run beside the greeting
            self._iprev_check = loop.create_task(inbound.iprev(self.peer_ip))
            self._iprev_check.add_done_callback(_retrieve)
        if not (settings.dnsbl_zones or settings.dnswl_zones):
            return False
        started = time.monotonic()
        check = loop.create_task(inbound.connect(self.peer_ip))
        self._connect_check = check
        check.add_done_callback(lambda done: self._connected(done, started))
        return True

    def _connected(self, done: asyncio.Task[ConnectVerdict], started: float) -> None:
        """The DNSBL/DNSWL verdict: a 554 greeting for a listed client, else the usual
        greeting once limits.greeting_delay (counted from the connect) has passed."""
        if self._connect_check is not done:
            return
        self._connect_check = None
        if self.transport is None or self.state != State.GREETING:
            return  # gone, or cut off meanwhile
        verdict = _outcome(done, f"session {self.peer_ip}: DNSBL/DNSWL check")
        if verdict is not None:
            if self.ctx.config.mailauth.dnsbl_zones:
                m.auth_result("dnsbl", "fail" if verdict.reply is not None else "pass")
            if self.ctx.config.mailauth.dnswl_zones:
                m.auth_result("dnswl", "pass" if verdict.allowlisted else "none")
            if verdict.reply is not None and self.mailauth == "enforce":
                self._refuse_client(verdict)
                return
            if verdict.allowlisted:
                self.allowlisted = True
                log.info("session %s: on a DNSWL, later checks skipped", self.peer_ip)
                if self._iprev_check is not None:
                    self._iprev_check.cancel()
                    self._iprev_check = None
        delay = self.ctx.config.limits.greeting_delay - (time.monotonic() - started)
        if delay > 0:
            self.ctx.loop.call_later(delay, self._greet)
        else:
            self._greet()

    def _refuse_client(self, verdict: ConnectVerdict) -> None:
        """Greet a DNSBL-listed client with the 554 5.7.1 naming the zone, then answer
        every command but QUIT with 503 5.5.1 (RFC 5321 §3.1: the server waits for QUIT);
        the error budget (limits.max_errors) ends a client that keeps talking."""
        assert verdict.reply is not None and self.transport is not None
        zones = ", ".join(listing.zone for listing in verdict.listings)
        log.warning(
            "refused connection from %s: listed on %s",
            self.peer_ip,
            zones,
            extra={
                "fields": {
                    "event": "dnsbl_refused",
                    "client": f"{self.peer_ip}:{self.peer_port}",
                    "zones": [listing.zone for listing in verdict.listings],
                }
            },
        )
        self.outcome = "dnsbl"
        m.smtp_connections_refused["dnsbl"].inc()
        if self._iprev_check is not None:
            self._iprev_check.cancel()
            self._iprev_check = None
        self.handlers = _REFUSED_COMMANDS
        self.state = State.COMMAND
        m.REPLIES[5] += 1
        self.transport.write(verdict.reply)

    def _refused_command(self, args: bytes) -> None:
        self._error(R.reply(503, "5.5.1", "Error: service refused, send QUIT"), "refused client")

    def _refused_quit(self, args: bytes) -> None:
        self.out.append(R.BYE)  # the session's outcome stays "dnsbl"
        self.close_after_flush = True
        self.state = State.CLOSED

    def _checking(self) -> bool:
        """Whether this transaction gets the inbound checks: on for the listener, and a
        client neither trusted, authenticated nor on a DNSWL."""
        return (
            self.mailauth != "off"
            and not self.trusted
            and self.auth_user is None
            and not self.allowlisted
        )

    def _mail_checked(
        self, sender: str, params: dict[str, str], done: asyncio.Future[MailVerdict]
    ) -> None:
        """MAIL's reply once SPF is known (``spf_reject_fail``): 550 5.7.23 for an SPF
        fail (enforce mode), else 250 and the transaction opens."""
        if self._mail_check is not done or self.transport is None:
            return
        verdict = _outcome(done, f"session {self.peer_ip}: SPF check")
        if verdict is not None and verdict.reply is not None and self.mailauth == "enforce":
            self._mail_check = None
            m.senders_rejected["spf"].inc()
            spf = verdict.spf
            log.info(
                "session %s: MAIL FROM <%s> refused: spf=%s%s",
                self.peer_ip,
                sender,
                spf.result if spf is not None else "?",
                f" ({spf.mechanism})" if spf is not None and spf.mechanism else "",
            )
            self._resume(verdict.reply)
            return
        self.mail_from, self.mail_params = sender, params
        self._resume(R.reply(250, "2.1.0", "Ok"))

    def _authenticate(self, queue_id: str, content: bytes, hold: bool) -> None:
        """Run DKIM, ARC and DMARC on the finished message, then queue it or refuse it
        (:meth:`_judged`): at once when the resolver's cache answers every lookup (the
        common case on a busy MX), else in a task, reading paused meanwhile."""
        # Our Received field goes under Authentication-Results. An ARC seal covers it, so
        # it is on the content the checks see when we may seal; otherwise it stays apart
        # and joins the content only once, when the message is queued (a 64 KiB message is
        # not copied twice), and the checks see the message as it came.
        received = self._received_header(queue_id, time.time())
        if self._relayed():
            content, received = received + content, b""
        try:
            verdict = self._message_verdict_now(content)
        except Exception:
            # a bug, not bad input: the task path runs the checks again and, should they
            # fail there too, answers 451 4.3.0 rather than leaving the client unanswered
            log.exception("session %s: inbound checks of %s failed", self.peer_ip, queue_id)
            verdict = None
        if verdict is not None:
            self._judged(queue_id, hold, verdict, received)
            return
        self.state = State.WAIT
        assert self.transport is not None
        self.transport.pause_reading()
        check = self.ctx.loop.create_task(self._message_verdict(content))
        self._message_check = check
        check.add_done_callback(lambda done: self._authenticated(queue_id, hold, received, done))

    def _message_verdict_now(self, content: bytes) -> MessageVerdict | None:
        """The message's verdict when it needs no wait: SPF and iprev known, and every
        record the checks need in the resolver's cache (:meth:`InboundChecker.message_now`)."""
        inbound, mail_check, iprev_check = self.ctx.inbound, self._mail_check, self._iprev_check
        assert inbound is not None and self.mail_from is not None
        if mail_check is None or not mail_check.done() or mail_check.cancelled():
            return None
        if mail_check.exception() is not None:
            return None  # the task path logs it and answers 451
        iprev = None
        if iprev_check is not None:
            if not iprev_check.done() or iprev_check.cancelled():
                return None
            if iprev_check.exception() is not None:
                return None
            iprev = iprev_check.result()
        return inbound.message_now(
            ip=self.peer_ip,
            helo=self.helo or "",
            mail_from=self.mail_from,
            mail=mail_check.result(),
            iprev=iprev,
            content=content,
            mode=self.mailauth,
            relay=self._relayed(),
            crlf=True,  # bare CR and LF were refused or made CRLF (_end_of_message)
        )

    def _relayed(self) -> bool:
        """Whether a recipient is delivered elsewhere, as the checks' ARC seal asks: False
        when none is set up (nothing else asks, and the recipients are not gone through)."""
        inbound = self.ctx.inbound
        if inbound is None or inbound.sealer is None:
            return False
        return any(not self._local_recipient(rcpt.address) for rcpt in self.rcpts)

    async def _message_verdict(self, content: bytes) -> MessageVerdict:
        inbound = self.ctx.inbound
        assert inbound is not None and self.mail_from is not None
        ip, helo, sender = self.peer_ip, self.helo or "", self.mail_from
        mail = await self._mail_check if self._mail_check is not None else None
        if mail is None:  # a transaction opened before a check could start (none today)
            mail = await inbound.mail(ip, helo, sender)
        iprev = None
        check = self._iprev_check
        if check is not None and check.done() and not check.cancelled():
            iprev = check.result()  # done (the usual case): no shield, no loop turn
        elif check is not None:
            iprev = await asyncio.shield(check)  # shared by the session's messages
        return await inbound.message(
            ip=ip,
            helo=helo,
            mail_from=sender,
            mail=mail,
            iprev=iprev,
            content=content,
            mode=self.mailauth,
            relay=self._relayed(),
            crlf=True,  # bare CR and LF were refused or made CRLF (_end_of_message)
        )

    def _authenticated(
        self, queue_id: str, hold: bool, received: bytes, done: asyncio.Task[MessageVerdict]
    ) -> None:
        """The checks' task is done: answer as :meth:`_judged` says, then read again."""
        if self._message_check is not done:
            return
        self._message_check = None
        if self.transport is None:
            return  # the client left before a reply: nothing was queued
        verdict = _outcome(done, f"session {self.peer_ip}: inbound checks of {queue_id}")
        if verdict is None:
            m.messages_rejected["mailauth_error"].inc()
            self._end_reply(R.reply(451, "4.3.0", "Error: message checks failed, try again later"))
            self._continue()
            return
        if not self._judged(queue_id, hold, verdict, received):
            self._continue()

    def _judged(self, queue_id: str, hold: bool, verdict: MessageVerdict, received: bytes) -> bool:
        """The message's verdict: refused (DMARC reject: the checker's 550 5.7.1, or 451
        4.4.3 when a DNS failure may hide an aligned pass), or queued, held when
        quarantined, with our Received field (*received*, b"" when the content has it
        already) under the verdict's fields. True when it is being queued (its reply comes
        with the commit)."""
        m.auth_results_of(verdict.results)
        self.auth_last = verdict.summary
        if verdict.action == "reject" and verdict.reply is not None:
            # 451 4.4.3 when a DNS failure may hide an aligned pass, else 550 5.7.1
            reason = "dmarc_tempfail" if verdict.reply.startswith(b"4") else "dmarc"
            log.warning(
                "session %s: message from <%s> refused: %s",
                self.peer_ip,
                self.mail_from,
                verdict.summary,
                extra={
                    "fields": {
                        "event": "message_refused",
                        "client": f"{self.peer_ip}:{self.peer_port}",
                        "sender": self.mail_from,
                        "reason": reason,
                        "auth": verdict.summary,
                    }
                },
            )
            m.messages_rejected[reason].inc()
            self._end_reply(verdict.reply)
            return False
        if verdict.action == "quarantine":
            log.info("%s quarantined (held): %s", queue_id, verdict.summary)
            hold = True
        self._trace = verdict.headers + received
        self._auth_pending = verdict.summary
        self._accept_message(queue_id, verdict.content, hold)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.outcome == "disconnect":
            self.outcome = "error"
        log.info(
            "session %s:%s closed (%s): %d message(s), %d error(s)%s%s%s",
            self.peer_ip,
            self.peer_port,
            self.outcome,
            self.messages,
            self.errors,
            f" queued {' '.join(self.queue_ids)}" if self.queue_ids else "",
            f"; last checked: {self.auth_last}" if self.auth_last else "",
            f" ({exc})" if exc else "",
            extra={"fields": self._log_fields(exc)},
        )
        # Checks still running have nobody to answer: stop them (their callbacks see no
        # transport and do nothing; nothing was queued without its reply).
        for check in (
            self._connect_check,
            self._iprev_check,
            self._mail_check,
            self._message_check,
        ):
            if check is not None:
                check.cancel()
        if self.opened:
            self.opened = False
            m.smtp_connections_open[self.role].dec()
        self.state = State.CLOSED
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()
        self.ctx.release(self)  # nothing for a refused connection: it was never counted

    def _log_fields(self, exc: Exception | None) -> dict[str, object]:
        return {
            "event": "smtp_session",
            "outcome": self.outcome,
            "client": f"{self.peer_ip}:{self.peer_port}",
            "listener": self.role,
            "helo": self.helo,
            "tls": self.tls,
            "auth": self.auth_user,
            "messages": self.messages,
            "errors": self.errors,
            "queue_ids": self.queue_ids,
            "mailauth": self.auth_last,
            "error": str(exc) if exc else None,
        }

    def _arm_timer(self) -> None:
        # One timer per session, re-armed lazily: input only stamps times, and the timer,
        # when it fires, works out the next limit due (often later than first thought).
        now = time.monotonic()
        due, _ = self._next_limit(now)
        delay = min(due - now, self.ctx.recheck)
        self.timer = self.ctx.loop.call_later(max(delay, 0.05), self._check_timeout)

    def rearm_timer(self) -> None:
        """Work out the next limit due again (stress mode began: idle limits shrank)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None and self.state != State.CLOSED:
            self._arm_timer()

    def _next_limit(self, now: float) -> tuple[float, str]:
        """When the session's next limit runs out, and its name ("" for none: check again).

        Silence: ``command_timeout`` (``stress_command_timeout`` in stress mode while idle)
        or ``data_timeout``; ``command_deadline`` for one command line; ``data_deadline``
        and ``min_data_rate`` for a DATA/BDAT transfer; and, while the client reads none
        of our output, ``command_timeout`` from when it stopped ("write_stalled").
        """
        limits = self.ctx.config.limits
        if self.write_paused:
            return self.write_paused + limits.command_timeout, "write_stalled"
        state = self.state
        if state == State.WAIT:  # our turn (a commit, AUTH check, TLS): the client owes nothing
            return max(self.last_activity + limits.command_timeout, now + 1.0), ""
        if state == State.DATA or state == State.BDAT:
            due, limit = self.last_activity + limits.data_timeout, "data_timeout"
        else:
            due, limit = self.last_activity + limits.command_timeout, "command_timeout"
            stress = self.ctx.stress_timeout
            if self.ctx.stress and stress < limits.command_timeout:
                due, limit = self.last_activity + stress, "stress_timeout"
            if self.line_started and limits.command_deadline and state != State.GREETING:
                line_due = self.line_started + limits.command_deadline
                if line_due < due:
                    due, limit = line_due, "command_deadline"
        reader = self.body if self.body is not None else self.bdat
        if reader is not None and self.data_started:
            if limits.data_deadline:
                data_due = self.data_started + limits.data_deadline
                if data_due < due:
                    due, limit = data_due, "data_deadline"
            if limits.min_data_rate:
                # The moment the average rate so far would fall below the minimum.
                rate_due = self.data_started + max(
                    limits.data_rate_grace, reader.size / limits.min_data_rate
                )
                if rate_due < due:
                    due, limit = rate_due, "min_data_rate"
        return due, limit

    def _check_timeout(self) -> None:
        self.timer = None
        transport = self.transport
        if transport is None:
            return
        now = time.monotonic()
        if self.state == State.CLOSED:
            # Closing, but close() waits for our last words, which the client does not read.
            give_up = self.last_activity + self.ctx.config.limits.command_timeout
            if now >= give_up:
                transport.abort()
            else:
                self.timer = self.ctx.loop.call_later(give_up - now, self._check_timeout)
            return
        due, limit = self._next_limit(now)
        if limit and now >= due:
            self._cut(limit)
            return
        self._arm_timer()

    def _cut(self, limit: str) -> None:
        """End the session for exceeding *limit*: 421 4.4.2, or an abort when the client
        reads nothing (a reply could never reach it, and close() would wait for it)."""
        log.info(
            "session %s:%s cut off in state %s: %s exceeded",
            self.peer_ip,
            self.peer_port,
            self.state.name,
            limit,
        )
        m.smtp_sessions_cut[limit].inc()
        if limit == "write_stalled":
            self.outcome = limit
            self.state = State.CLOSED
            assert self.transport is not None
            self.transport.abort()
            return
        self.outcome = "timeout" if limit in ("command_timeout", "data_timeout") else limit
        self.out.append(R.TIMEOUT)
        self.close_after_flush = True
        self._flush()
        if self.transport is not None:
            # close() waits for the 421 to drain; a client that reads nothing would hold its
            # slot and descriptor for ever: the CLOSED branch of _check_timeout aborts it.
            self.last_activity = time.monotonic()
            self.timer = self.ctx.loop.call_later(
                self.ctx.config.limits.command_timeout, self._check_timeout
            )

    # --- write-side back-pressure ----------------------------------------------------------

    def pause_writing(self) -> None:
        """The client is not reading our replies: read none of its commands until it does."""
        self.write_paused = time.monotonic()
        if self.transport is not None and self.state != State.WAIT:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """Our output drained: read again (unless WAIT still holds reading), and run the
        commands left buffered when output stalled."""
        self.write_paused = 0.0
        transport = self.transport
        state = self.state
        if transport is None or state == State.WAIT or state == State.CLOSED:
            return
        transport.resume_reading()
        if state == State.COMMAND or state == State.AUTH:
            self._run()
            self._flush()

    def shut_down(self, reply: bytes) -> None:
        """Send *reply* (a 421) and close: the server is going away."""
        self.outcome = "shutdown"
        self.out.append(reply)
        self.close_after_flush = True
        self._flush()

    def close(self) -> None:
        """Close at once (used on shutdown after the drain period)."""
        if self.transport is not None:
            self.transport.close()

    @property
    def idle(self) -> bool:
        """No transaction and no commit under way: safe to close when draining."""
        return self.state in (State.COMMAND, State.GREETING) and self.mail_from is None

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            self.out.clear()
            return
        if self.out:
            replies = m.REPLIES
            for reply in self.out:
                replies[reply[0] - 48] += 1
            transport.write(b"".join(self.out) if len(self.out) > 1 else self.out[0])
            self.out.clear()
        if self.close_after_flush:
            self.state = State.CLOSED
            transport.close()

    # --- input -----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        state = self.state
        if state == State.DATA:
            self._feed_data(data)
        elif state == State.BDAT:
            self._feed_bdat(data)
        elif state in (State.COMMAND, State.AUTH):
            self.lines.feed(data)
            self._run()
        elif state == State.GREETING:
            log.warning(
                "early talker %s:%s: sent data before the greeting", self.peer_ip, self.peer_port
            )
            self.out.append(R.reply(554, "5.5.1", "Error: data received before greeting"))
            self.outcome = "early_talker"
            m.smtp_connections_refused["early_talker"].inc()
            self.close_after_flush = True
        elif state == State.WAIT:
            # Only reached when a transport delivers data despite pause_reading; keep it.
            self.lines.feed(data)
            return
        self._flush()

    def _run(self) -> None:
        """Handle every complete command line buffered, while in a command state."""
        lines = self.lines
        handlers = self.handlers
        out = self.out
        got_line = False
        # A client that reads no replies stops the loop (pause_writing); the rest waits.
        while (self.state == State.COMMAND or self.state == State.AUTH) and not self.write_paused:
            if len(out) >= FLUSH_REPLIES:
                self._flush()  # a long pipeline: let the transport see the output grow
                continue
            item = lines.readline()
            if item is None:
                break
            got_line = True
            line, flags = item
            if flags:
                if flags & C.LINE_TOO_LONG:
                    if self.state == State.AUTH:
                        self._leave_auth_exchange()  # RFC 4954 §4: the exchange fails
                        self._error(R.AUTH_LINE_TOO_LONG, "AUTH line too long")
                    else:
                        self._error(R.LINE_TOO_LONG, "line too long")
                    continue
                if self.ctx.config.policy.bare_newline == "reject":
                    self._error(R.BARE_NEWLINE_COMMAND, "bare CR/LF in command")
                    continue
                line = line.replace(b"\r", b"")
            if self.state == State.AUTH:
                step = self._auth_step
                assert step is not None
                step(line)
                continue
            verb, args = C.parse_command(line)
            m.COMMANDS[verb] += 1
            handlers[verb](self, args)
        # command_deadline runs from the first octet of a partial line (no per-byte work).
        if not lines.pending:
            self.line_started = 0.0
        elif got_line or not self.line_started:
            self.line_started = self.last_activity

    def _error(self, reply: bytes, why: str) -> None:
        """A 5xx for a bad command; past the budget the session ends with 421."""
        self.errors += 1
        log.info(
            "session %s:%s: %s (%s)", self.peer_ip, self.peer_port, why, reply.decode().strip()
        )
        if self.errors > self.ctx.config.limits.max_errors:
            self.out.append(R.TOO_MANY_ERRORS)
            self.outcome = "too_many_errors"
            self.close_after_flush = True
            self.state = State.CLOSED
        else:
            self.out.append(reply)

    def _syntax(self, exc: SmtpSyntaxError) -> None:
        self._error(R.reply(exc.code, exc.status, exc.text), "syntax error")

    # --- commands --------------------------------------------------------------------------

    def _hello(self, args: bytes, verb: str, esmtp: bool) -> bool:
        """HELO, EHLO or LHLO (*verb*): take the client's name and start a new transaction;
        False, having sent 501 5.5.4, when there is no name."""
        name = args.strip().decode("utf-8", "replace")
        if not name:
            self._error(R.reply(501, "5.5.4", f"Syntax: {verb} hostname"), f"{verb} without name")
            return False
        self._reset_transaction()
        self.helo, self.esmtp = name, esmtp
        return True

    def cmd_helo(self, args: bytes) -> None:
        if self._hello(args, "HELO", False):
            self.out.append(R.reply(250, "", f"{self.ctx.hostname}"))

    def cmd_ehlo(self, args: bytes) -> None:
        if self._hello(args, "EHLO", True):
            self.out.append(self.ctx.ehlo_reply(self.peer_ip, tls=self.tls is not None))

    def cmd_mail(self, args: bytes) -> None:
        if self.helo is None:
            self._error(R.BAD_SEQUENCE_HELO, "MAIL before HELO")
            return
        if self.mail_from is not None:
            self._error(R.NESTED_MAIL, "nested MAIL")
            return
        if self.role != "mx" and self.auth_user is None:
            need_tls = self.role == "submission" and self.tls is None
            self._error(R.TLS_REQUIRED if need_tls else R.AUTH_REQUIRED, "MAIL without AUTH")
            return
        self._mail(args)

    def _mail(self, args: bytes) -> None:
        """MAIL once the session may start a transaction: parse, check the parameters and
        the sender-login policy, then open the transaction (LMTP's MAIL shares this)."""
        try:
            sender, params = C.parse_mail(args, self.esmtp)
        except SmtpSyntaxError as exc:
            self._syntax(exc)
            return
        if params:
            refused = self._check_mail_params(params)
            if refused:
                self._error(refused, "MAIL parameter refused")
                return
        user = self._sender_login_user()
        if user is not None and not self.ctx.sender_ownership.owns(user, sender):
            # Sender-login policy: no sending (and DKIM signing) as someone else's address.
            m.senders_rejected["not_owned"].inc()
            why = f"MAIL FROM <{sender}> not owned by {user}"
            self._error(R.sender_not_owned(sender, user), why)
            return
        if self._checking():
            inbound = self.ctx.inbound
            assert inbound is not None and self.helo is not None
            # From the resolver's cache when it holds every SPF answer (a busy MX's usual
            # case): a finished future, no task; else the lookups run in a task.
            check: asyncio.Future[MailVerdict]
            last = self._spf_known
            if last is not None and last[0] == self.helo and last[1] == sender:
                check = last[2]
            elif (known := inbound.mail_now(self.peer_ip, self.helo, sender)) is not None:
                check = self.ctx.loop.create_future()
                check.set_result(known)
                if not _temporary(known):
                    self._spf_known = (self.helo, sender, check)
            else:
                check = self.ctx.loop.create_task(inbound.mail(self.peer_ip, self.helo, sender))
                check.add_done_callback(_retrieve)
            self._mail_check = check
            if self.mailauth == "enforce" and self.ctx.config.mailauth.spf_reject_fail:
                # MAIL's reply waits for SPF; pipelined commands wait with it, in order.
                self.state = State.WAIT
                assert self.transport is not None
                self.transport.pause_reading()
                check.add_done_callback(lambda done: self._mail_checked(sender, params, done))
                return
        self.mail_from, self.mail_params = sender, params
        self.out.append(R.reply(250, "2.1.0", "Ok"))

    def _sender_login_user(self) -> str | None:
        """The authenticated user when the sender-login policy covers this listener."""
        user = self.auth_user
        if user is None or self.role not in self.ctx.config.auth.sender_login:
            return None
        return user

    def _unowned_author(self, content: bytes) -> str | None:
        """Under the sender-login policy, the first From: address of *content* that the
        user does not own (such a message is queued but not DKIM-signed), else None."""
        user = self._sender_login_user()
        raw = header_value(content, b"From") if user is not None else None
        if user is None or raw is None:
            return None
        for _, address in email.utils.getaddresses([raw.decode("utf-8", "replace")]):
            if address and not self.ctx.sender_ownership.owns(user, address):
                return address
        return None

    def _check_mail_params(self, params: dict[str, str]) -> bytes | None:
        if not self.esmtp:
            return R.reply(555, "5.5.4", "Error: parameters need EHLO")
        size = params.get("SIZE")
        if size is not None and int(size) > self.ctx.config.limits.max_message_size:
            return R.MESSAGE_TOO_BIG
        if params.get("BODY") == "BINARYMIME":
            return R.reply(555, "5.5.4", "Error: BODY=BINARYMIME is not supported")
        if "REQUIRETLS" in params and self.tls is None:
            return R.reply(555, "5.5.4", "Error: REQUIRETLS needs a TLS session")
        if "AUTH" in params and self.auth_user is None:
            params["AUTH"] = "<>"  # RFC 4954 §5: not trusted without our own AUTH
        return None

    def cmd_rcpt(self, args: bytes) -> None:
        """RCPT: the checks every recipient passes (a transaction, the syntax, the count:
        503 5.5.1, 501/555 5.5.x, 452 4.5.3), then :meth:`_recipient` (LMTP's differs)."""
        if self.mail_from is None:
            self._error(R.BAD_SEQUENCE_MAIL, "RCPT before MAIL")
            return
        try:
            address, params = C.parse_rcpt(args, "SMTPUTF8" in self.mail_params)
        except SmtpSyntaxError as exc:
            self.rcpt_refused += 1
            m.recipients_rejected["syntax"].inc()
            self._syntax(exc)
            return
        if params and not self.esmtp:
            self.rcpt_refused += 1
            self._error(R.reply(555, "5.5.4", "Error: parameters need EHLO"), "RCPT parameters")
            return
        if len(self.rcpts) >= self.ctx.config.limits.max_recipients:
            self.rcpt_refused += 1
            m.recipients_rejected["too_many"].inc()
            self.out.append(R.TOO_MANY_RECIPIENTS)
            return
        self._recipient(address, params)

    def _recipient(self, address: str, params: dict[str, str]) -> None:
        """Accept or refuse the well-formed RCPT *address*: a local one is resolved now,
        a remote one needs a relay right (554 5.7.1) and maybe a probe."""
        if self._local_recipient(address):
            # From any client: a local recipient is known here, or refused now (no backscatter).
            expanded = self._expand_local(address, params)
            if isinstance(expanded, bytes):
                self.rcpt_refused += 1
                self.out.append(expanded)
                return
            self.rcpts.extend(expanded)
            self.out.append(R.reply(250, "2.1.5", "Ok"))
            return
        untrusted_mx = self.role == "mx" and not (self.trusted or self.auth_user)
        domain = address.rpartition("@")[2].lower()
        if untrusted_mx and "@" in address and domain not in self.ctx.accepted_domains:
            self.rcpt_refused += 1
            m.recipients_rejected["relay_denied"].inc()
            log.info("session %s: relay denied to %s", self.peer_ip, address)
            self.out.append(R.RELAY_DENIED)
            return
        # After the relay check: the list is not shown to clients that may not relay.
        if self._suppressed(address):
            return
        if untrusted_mx and self.ctx.verifier is not None and domain in self.ctx.relay_domains:
            self._verify_recipient(Recipient(address, params))
            return
        self.rcpts.append(Recipient(address, params))
        self.out.append(R.reply(250, "2.1.5", "Ok"))

    def _suppressed(self, address: str) -> bool:
        """Refuse *address* with 550 5.7.1 (counted, logged) if the suppression list has it
        for this transaction's sender domain or globally ([suppression] refuse_at_rcpt).
        An empty list costs one look at its statistics; a list that cannot be read lets
        the recipient through (logged): the list guards reputation, not delivery."""
        suppressions = self.ctx.suppressions
        if not self.ctx.config.suppression.refuse_at_rcpt or suppressions.is_empty():
            return False
        sender_domain = (self.mail_from or "").rpartition("@")[2]
        try:
            entry = suppressions.check(address, sender_domain)
        except Exception as exc:  # an LMDB error: never a crash of the session
            log.error("session %s: suppression list unreadable: %s", self.peer_ip, exc)
            return False
        if entry is None:
            return False
        self.rcpt_refused += 1
        m.recipients_rejected["suppressed"].inc()
        log.info(
            "session %s: recipient <%s> refused: suppressed (%s, scope %s)",
            self.peer_ip,
            address,
            entry.reason,
            entry.scope,
        )
        self.out.append(R.suppressed_recipient(address, entry.reason))
        return True

    def _verify_recipient(self, rcpt: Recipient) -> None:
        """Accept *rcpt*, a relay-domain recipient from an untrusted client, only if its next
        hop would (``policy.verify_recipients``): from the cache at once, else after a probe
        (reading paused meanwhile, so pipelined commands are answered in order).

        Replies: 250 2.1.5; 550 5.1.1 (or the routing failure's 5.1.x) when the next hop
        refuses it; 450 4.1.1 when the probe could not tell or took over ``verify_timeout``
        seconds (250 instead with ``verify_tempfail = "accept"``).
        """
        verifier = self.ctx.verifier
        assert verifier is not None and self.transport is not None
        known = verifier.cached(rcpt.address)
        if known is not None:
            self.out.append(self._verified(rcpt, known))
            return
        self.state = State.WAIT
        self.transport.pause_reading()
        probe = verifier.probe(rcpt.address)
        self._probing = probe
        timeout = self.ctx.config.policy.verify_timeout
        timer = self.ctx.loop.call_later(timeout, self._probe_answered, rcpt, probe, IN_PROGRESS)

        def done(_: object) -> None:
            timer.cancel()
            self._probe_answered(rcpt, probe, None)

        probe.add_done_callback(done)

    def _probe_answered(
        self, rcpt: Recipient, probe: asyncio.Future[ProbeResult], result: ProbeResult | None
    ) -> None:
        if self._probing is not probe or self.transport is None:
            return  # answered already (it took too long) or the client left: it is cached
        self._probing = None
        if result is None:
            # The probe never fails (AddressVerifier.probe); it is cancelled only at shutdown.
            result = PROBE_CANCELLED if probe.cancelled() else probe.result()
        self._resume(self._verified(rcpt, result))

    def _verified(self, rcpt: Recipient, result: ProbeResult) -> bytes:
        """The reply to RCPT *rcpt* given its probe's *result*; adds it when accepted."""
        accept_unverified = self.ctx.config.policy.verify_tempfail == "accept"
        if result.kind == DELIVERABLE or (result.kind == UNVERIFIED and accept_unverified):
            if result.kind == UNVERIFIED:
                log.info(
                    "session %s: <%s> accepted unverified: %s",
                    self.peer_ip,
                    rcpt.address,
                    result.detail,
                )
            self.rcpts.append(rcpt)
            return R.reply(250, "2.1.5", "Ok")
        self.rcpt_refused += 1
        m.recipients_rejected["unverified"].inc()
        log.info(
            "session %s: recipient <%s> refused: %s address: %s",
            self.peer_ip,
            rcpt.address,
            result.kind,
            result.detail,
        )
        if result.kind == UNDELIVERABLE:
            return R.undeliverable_recipient(rcpt.address, result.status or "5.1.1", result.detail)
        return R.unverified_recipient(rcpt.address, result.detail)

    def _local_recipient(self, address: str) -> bool:
        """Whether *address* would be delivered here: a local domain (see
        ``Config.local_delivery_domains``) or a domain-less ``<postmaster>`` (this host)."""
        _, at, domain = address.rpartition("@")
        if not at:
            return True  # parse_rcpt only lets a domain-less <postmaster> through
        return domain.lower() in self.ctx.local_domains

    def _expand_local(self, address: str, params: dict[str, str]) -> list[Recipient] | bytes:
        """The final recipients that local *address* stands for (aliases expanded, as
        Postfix's virtual_alias_maps do at intake), not yet in this transaction; or the
        refusal, counted and logged: 550 5.1.1 for no such user or alias, 452 4.2.2 when
        every local mailbox it reaches is at its quota (and nothing is relayed), 452 4.5.3
        when the expansion would pass limits.max_recipients.

        Each target keeps the RCPT's parameters; one that differs from *address* gets
        ORCPT=rfc822;<address> when the client gave no ORCPT, so a DSN names the address
        the sender used.
        """
        directory = self.ctx.directory
        found = directory.resolve(address)
        if found is None:
            m.recipients_rejected["unknown_user"].inc()
            log.info("session %s: unknown local recipient <%s>", self.peer_ip, address)
            return R.unknown_local_user(address)
        if found.local and not found.remote and all(map(self._mailbox_full, found.local)):
            m.recipients_rejected["over_quota"].inc()
            log.info("session %s: recipient <%s> refused: mailbox full", self.peer_ip, address)
            return R.mailbox_full(address)
        taken = {rcpt.address.lower() for rcpt in self.rcpts}
        targets = [t for t in (*found.local, *found.remote) if t.lower() not in taken]
        if len(self.rcpts) + len(targets) > self.ctx.config.limits.max_recipients:
            m.recipients_rejected["too_many"].inc()
            log.info(
                "session %s: <%s> expands to %d recipients: too many",
                self.peer_ip,
                address,
                len(targets),
            )
            return R.TOO_MANY_RECIPIENTS
        expanded = []
        for target in targets:
            target_params = dict(params)
            # ORCPT is xtext, ASCII only: a UTF-8 original is left out rather than mangled.
            if "ORCPT" not in params and target.lower() != address.lower() and address.isascii():
                target_params["ORCPT"] = f"rfc822;{address}"
            expanded.append(Recipient(target, target_params))
        if [t.lower() for t in targets] != [address.lower()]:
            log.info(
                "session %s: <%s> expands to %s",
                self.peer_ip,
                address,
                ", ".join(f"<{t}>" for t in targets) or "recipients already given",
            )
        return expanded

    def _mailbox_full(self, recipient: str) -> bool:
        """Whether the mailbox of final local *recipient* holds its quota or more. A store
        that cannot be read counts as not full: delivery checks the quota again."""
        directory = self.ctx.directory
        user = directory.user_of(recipient)
        if user is None:
            return False
        quota = directory.quota(user)
        if not quota:
            return False
        try:
            used = self.ctx.mailbox.usage(user)[0]
        except Exception:  # the store's own errors (lmdb) are not ours to name here
            log.exception("session %s: quota of %s not readable", self.peer_ip, user)
            return False
        return used >= quota

    def cmd_data(self, args: bytes) -> None:
        if self.mail_from is None:
            self._error(R.BAD_SEQUENCE_MAIL, "DATA before MAIL")
            return
        if self.bdat is not None:
            self._error(R.reply(503, "5.5.1", "Error: DATA after BDAT"), "DATA after BDAT")
            return
        if not self.rcpts:
            if self.rcpt_refused:
                self._error(R.NO_VALID_RCPT, "DATA without valid RCPT")
            else:
                self._error(R.BAD_SEQUENCE_RCPT, "DATA before RCPT")
            return
        if args.strip():
            self._error(R.reply(501, "5.5.4", "Syntax: DATA"), "DATA with arguments")
            return
        self.out.append(R.DATA_GO_AHEAD)
        self.body = DataReader(self.ctx.config.limits.max_message_size)
        self.data_started = self.last_activity
        self.state = State.DATA
        rest = self.lines.drain()
        if rest:
            self._feed_data(rest)

    def _feed_data(self, data: bytes) -> None:
        body = self.body
        assert body is not None
        used = body.feed(data)
        if not body.done:
            return
        if used < len(data):
            self.lines.feed(data[used:])  # pipelined commands after the end of data
        self.state = State.COMMAND
        self._end_of_message(body)
        self._run()

    def cmd_bdat(self, args: bytes) -> None:
        match = _BDAT_ARGS.fullmatch(args)
        if match is None:
            # Without a valid size the rest of the stream cannot be framed: end the session.
            self._error(R.reply(501, "5.5.4", "Syntax: BDAT size [LAST]"), "BDAT syntax")
            self.out.append(R.reply(421, "4.7.0", "Error: cannot continue after bad BDAT"))
            self.close_after_flush = True
            self.state = State.CLOSED
            return
        count, last = int(match.group(1)), match.group(2) is not None
        if self.bdat is None:
            refused = self.mail_from is None or not self.rcpts
            self.bdat_refused = refused
            if refused:
                self.bdat = BdatReader(store=False)
            else:
                self.bdat = BdatReader(self.ctx.config.limits.max_message_size)
            self.data_started = self.last_activity
        self.bdat.start_chunk(count, last)
        self.state = State.BDAT
        rest = self.lines.drain()
        if rest or count == 0:
            self._feed_bdat(rest)

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
            reply = R.BAD_SEQUENCE_MAIL if self.mail_from is None else R.BAD_SEQUENCE_RCPT
            self._error(reply, "BDAT outside a transaction")
            if bdat.done:
                self.bdat = None
                self.bdat_refused = False
        elif bdat.done:
            self._end_of_message(bdat)
        else:
            self.out.append(R.reply(250, "2.0.0", f"{bdat.size} octets received"))
        self._run()

    def cmd_rset(self, args: bytes) -> None:
        self._reset_transaction()
        self.out.append(R.OK)

    def cmd_noop(self, args: bytes) -> None:
        self.out.append(R.OK)

    def cmd_quit(self, args: bytes) -> None:
        self.outcome = "quit"
        self.out.append(R.BYE)
        self.close_after_flush = True
        self.state = State.CLOSED

    def cmd_vrfy(self, args: bytes) -> None:
        if not args.strip():
            self._error(R.reply(501, "5.5.4", "Syntax: VRFY address"), "VRFY without argument")
            return
        self.out.append(R.VRFY_REPLY)

    def cmd_expn(self, args: bytes) -> None:
        self._error(R.reply(502, "5.5.1", "Error: EXPN not available"), "EXPN")

    def cmd_help(self, args: bytes) -> None:
        self.out.append(_HELP)

    def cmd_unknown(self, args: bytes) -> None:
        self._error(R.UNKNOWN_COMMAND, f"unknown command {args[:20]!r}")

    # --- STARTTLS (RFC 3207) ---------------------------------------------------------------

    def cmd_starttls(self, args: bytes) -> None:
        if self.tls is not None:
            self._error(R.reply(503, "5.5.1", "Error: TLS already active"), "STARTTLS twice")
            return
        if self.ctx.tls_context is None:
            self._error(R.reply(502, "5.5.1", "Error: STARTTLS not available"), "STARTTLS")
            return
        if args.strip():
            self._error(R.reply(501, "5.5.4", "Syntax: STARTTLS"), "STARTTLS with arguments")
            return
        self.out.append(R.reply(220, "2.0.0", "Ready to start TLS"))
        self._flush()
        self.state = State.WAIT
        assert self.transport is not None
        stop_plaintext(self.transport, self.lines, log, f"session {self.peer_ip}", "STARTTLS")
        self.ctx.loop.create_task(self._upgrade())

    async def _upgrade(self) -> None:
        transport = self.transport
        assert transport is not None and self.ctx.tls_context is not None
        new = await tls_handshake(
            self.ctx.loop, transport, self, self.ctx.tls_context, log, f"session {self.peer_ip}"
        )
        if new is None:
            self.ctx.tls_failures += 1
            m.tls_failures[self.role].inc()
            return
        self.transport = new
        self.tls = tls_description(new)
        m.tls_handshakes[self.role].inc()
        # RFC 3207 §4.2: forget everything learnt before TLS.
        self.helo, self.esmtp, self.auth_user = None, False, None
        self._reset_transaction()
        self.state = State.COMMAND
        self._run()  # the client may already have sent its new EHLO
        self._flush()

    # --- AUTH (RFC 4954) -------------------------------------------------------------------

    def cmd_auth(self, args: bytes) -> None:
        if not self.esmtp:
            self._error(R.BAD_SEQUENCE_HELO, "AUTH before EHLO")
            return
        if self.auth_user is not None:
            self._error(R.reply(503, "5.5.1", "Error: already authenticated"), "AUTH twice")
            return
        if self.mail_from is not None:
            self._error(R.reply(503, "5.5.1", "Error: AUTH during a transaction"), "AUTH in txn")
            return
        if self.tls is None:
            self._error(R.ENCRYPTION_REQUIRED, "AUTH without TLS")
            return
        mechanism, _, initial = args.strip().partition(b" ")
        mechanism = mechanism.upper()
        if mechanism == b"PLAIN":
            if initial:
                self._auth_plain(initial)
            else:
                self._expect_auth_line(self._auth_plain, b"334 \r\n")
        elif mechanism == b"LOGIN":
            if initial:
                self._auth_login_username(initial)
            else:
                self._expect_auth_line(self._auth_login_username, b"334 VXNlcm5hbWU6\r\n")
        else:
            self._error(
                R.reply(504, "5.5.4", "Error: unrecognized authentication type"), "AUTH mech"
            )

    def _expect_auth_line(self, step: Callable[[bytes], None], challenge: bytes) -> None:
        """Send *challenge* (a 334) and hand the next line, up to AUTH_LINE_LIMIT, to *step*."""
        self._auth_step = step
        self.state = State.AUTH
        self.lines.auth_exchange = True
        self.out.append(challenge)

    def _leave_auth_exchange(self) -> None:
        self._auth_step = None
        self.state = State.COMMAND
        self.lines.auth_exchange = False

    def _auth_decode(self, line: bytes) -> bytes | None:
        self._leave_auth_exchange()
        if line.strip() == b"*":
            self._error(R.reply(501, "5.7.0", "Authentication aborted"), "AUTH aborted")
            return None
        try:
            return base64.b64decode(line.strip(), validate=True)
        except (binascii.Error, ValueError):
            self._error(R.reply(501, "5.5.2", "Error: cannot decode response"), "AUTH bad base64")
            return None

    def _auth_plain(self, line: bytes) -> None:
        decoded = self._auth_decode(line)
        if decoded is None:
            return
        parts = decoded.split(b"\x00")
        if len(parts) != 3:
            self._error(R.reply(501, "5.5.2", "Error: malformed PLAIN response"), "AUTH PLAIN")
            return
        self._auth_check(parts[1], parts[2])

    def _auth_login_username(self, line: bytes) -> None:
        decoded = self._auth_decode(line)
        if decoded is None:
            return
        self._auth_login_user = decoded.decode("utf-8", "replace")
        self._expect_auth_line(self._auth_login_password, b"334 UGFzc3dvcmQ6\r\n")

    def _auth_login_password(self, line: bytes) -> None:
        decoded = self._auth_decode(line)
        if decoded is not None:
            self._auth_check(self._auth_login_user.encode(), decoded)

    def _auth_check(self, user: bytes, password: bytes) -> None:
        """Check the credentials off the event loop, unless a lockout refuses them unchecked.

        Replies: 235 2.7.0; 535 5.7.8 for wrong credentials, after a delay that grows with
        the failures counted for this address or user (a tarpit); 454 4.7.0 during a
        lockout (see :mod:`tachymail.auth.throttle`); after ``auth.max_failures`` of
        either in one session, 421 4.7.0 and close.
        """
        name = user.decode("utf-8", "replace")
        secret = password.decode("utf-8", "replace")
        self.state = State.WAIT
        assert self.transport is not None
        self.transport.pause_reading()
        users, ip = self.ctx.users, self.peer_ip
        work = self.ctx.loop.run_in_executor(
            None, self.ctx.auth_throttle.attempt, ip, name, lambda: users.check(name, secret)
        )
        work.add_done_callback(lambda done: self._auth_done(name, done))

    def _auth_done(self, name: str, done: asyncio.Future[Verdict]) -> None:
        if self.transport is None:
            return
        if done.cancelled() or done.exception() is not None:
            log.error("session %s: AUTH check failed: %s", self.peer_ip, done.exception())
            verdict = None
        else:
            verdict = done.result()
        if verdict is not None and verdict.ok:
            self.ctx.auth_successes += 1
            m.auth_successes.inc()
            self.auth_user = name
            log.info("session %s: authenticated as %s", self.peer_ip, name)
            self._resume(R.AUTH_OK)
            return
        auth = self.ctx.config.auth
        self.auth_failures += 1
        shown = name[:100]  # the name came from the client: it may be 12 KB of anything
        if verdict is not None and verdict.lockout is not None:
            m.auth_locked_attempts.inc()
            log_locked_out(log, f"session {self.peer_ip}", "AUTH", shown, verdict.lockout)
            self.ctx.loop.call_later(auth.failure_delay, self._auth_failed, R.AUTH_LOCKED)
            return
        self.ctx.auth_failures += 1
        m.auth_failures.inc()
        log.warning("session %s: AUTH failed for %r", self.peer_ip, shown)
        delay = tarpit_delay(verdict, auth, self.peer_ip, shown, log)
        self.ctx.loop.call_later(delay, self._auth_failed, R.AUTH_FAILED)

    def _auth_failed(self, reply: bytes) -> None:
        if self.transport is None:
            return
        if self.auth_failures >= self.ctx.config.auth.max_failures:
            self.out.append(reply)
            self.out.append(R.reply(421, "4.7.0", "Error: too many failed authentications"))
            self.close_after_flush = True
            self._flush()
            return
        self._resume(reply)

    def _resume(self, reply: bytes) -> None:
        """Leave WAIT: send *reply*, read again and handle what was pipelined meanwhile."""
        self.out.append(reply)
        self._continue()

    def _continue(self) -> None:
        """Leave WAIT with the replies already in ``out``: read again and handle what was
        pipelined meanwhile."""
        self.state = State.COMMAND
        assert self.transport is not None
        if not self.write_paused:  # else resume_writing resumes reading
            self.transport.resume_reading()
        self.last_activity = time.monotonic()
        self._run()
        self._flush()

    # --- end of a message ------------------------------------------------------------------

    def _end_of_message(self, reader: DataReader | BdatReader) -> None:
        """Check the finished body, then queue it; the reply is sent after the commit."""
        self.body, self.bdat = None, None
        if reader.oversize:
            log.info(
                "session %s: message of %d octets refused (too big)", self.peer_ip, reader.size
            )
            m.messages_rejected["too_big"].inc()
            self._end_reply(R.MESSAGE_TOO_BIG)
            return
        longest = self.ctx.config.limits.max_text_line
        if longest and reader.max_line > longest:
            log.info("session %s: message refused: a %d-octet line", self.peer_ip, reader.max_line)
            m.messages_rejected["line_too_long"].inc()
            self._end_reply(
                R.reply(550, "5.6.0", f"Error: message has a line over {longest} octets")
            )
            return
        content = reader.content()
        if reader.bare_cr or reader.bare_lf:
            if self.ctx.config.policy.bare_newline == "reject":
                log.warning(
                    "session %s: message refused: bare %s in DATA (SMTP smuggling guard)",
                    self.peer_ip,
                    "CR" if reader.bare_cr else "LF",
                )
                m.messages_rejected["bare_newline"].inc()
                self._end_reply(R.BARE_NEWLINE_DATA)
                return
            content = _BARE_NEWLINE.sub(b"\r\n", content)
        # Hop count (mail loops) and the operator's header/body rules: see smtp/checks.py.
        verdict = checks_for(self.ctx.config).check(content)
        queue_id = new_queue_id()
        if verdict.action == REJECT:
            log.warning("session %s: message refused: %s", self.peer_ip, verdict.reason)
            m.messages_rejected[verdict.metric].inc()
            self._end_reply(verdict.reply)
            return
        if verdict.action == DISCARD:
            # The usual reply, as Postfix's DISCARD gives: the id is only in the log.
            log.info(
                "%s discarded, not queued: from <%s>; %s", queue_id, self.mail_from, verdict.reason
            )
            self._end_reply(R.reply(250, "2.0.0", f"Ok: queued as {queue_id}"))
            return
        if verdict.applied:
            log.info("%s content checks: %s", queue_id, "; ".join(verdict.applied))
        if self._checking():
            self._authenticate(queue_id, verdict.content, verdict.action == HOLD)
            return
        content = verdict.content
        if verdict.results_fields and self.role != "lmtp":
            # Unchecked mail (trusted, authenticated, allow-listed, or checks off) must not
            # carry results that claim to be ours either. LMTP's client is the MTA that
            # checked the message, perhaps on this host under the same name: kept.
            content, forged = remove_forged(content, self.ctx.authserv_id)
            if forged:
                log.warning(
                    "%s: %d Authentication-Results field(s) claiming %s removed",
                    queue_id,
                    forged,
                    self.ctx.authserv_id,
                )
        self._accept_message(queue_id, content, verdict.action == HOLD)

    def _end_reply(self, reply: bytes) -> None:
        """Answer the end of the message with *reply* and end the transaction (a subclass
        may answer otherwise: LMTP gives one reply per accepted recipient)."""
        self.out.append(reply)
        self._reset_transaction()

    def _accept_message(self, queue_id: str, content: bytes, hold: bool) -> None:
        """Queue the checked message as *queue_id* (held when *hold*): one envelope, one
        group commit, and the 250 only once it is synced (a subclass may deliver it
        otherwise: LMTP puts it into the mailboxes)."""
        now = time.time()
        trace, self._trace = self._trace, None
        # After the inbound checks our Received field is in the trace already (or on the
        # content), under Authentication-Results (RFC 8601 §5: above every other trace field).
        headers = [trace if trace is not None else self._received_header(queue_id, now)]
        if self.role != "mx":
            headers.extend(self._submission_headers(content, queue_id, now))
        content = b"".join([*headers, content])
        assert self.mail_from is not None
        envelope = self._envelope(
            queue_id, self.mail_from, self.rcpts, self.mail_params, now, len(content), hold
        )
        self._reset_transaction()
        self.state = State.WAIT
        assert self.transport is not None
        self.transport.pause_reading()
        signer = self.ctx.dkim
        domain = None
        if signer is not None and (self.auth_user or self.trusted):
            # Only mail we originate is signed: never an inbound message claiming our domain.
            domain = signer.signing_domain(envelope.sender, content)
            author = self._unowned_author(content) if domain is not None else None
            if author is not None:
                # A signature would vouch for a From: the user may not use: queue it unsigned.
                log.warning(
                    "%s not DKIM-signed: From: <%s> is not owned by %s",
                    queue_id,
                    author,
                    self.auth_user,
                )
                domain = None
        if domain is None:
            self._commit(envelope, content)
            return
        # Signing hashes the whole message: off the event loop.
        work = self.ctx.loop.run_in_executor(None, signer.sign, content, domain)  # type: ignore[union-attr]
        work.add_done_callback(lambda done: self._signed(envelope, content, done))

    def _envelope(
        self,
        queue_id: str,
        sender: str,
        recipients: list[Recipient],
        mail_params: dict[str, str],
        arrival: float,
        size: int,
        hold: bool,
    ) -> Envelope:
        """The queue envelope of a message received in this session: the client, HELO,
        listener, TLS and AUTH of the session; held when *hold*."""
        return Envelope(
            id=queue_id,
            sender=sender,
            recipients=recipients,
            mail_params=mail_params,
            arrival=arrival,
            size=size,
            client_ip=self.peer_ip,
            client_port=self.peer_port,
            helo=self.helo or "",
            listener=self.role,
            tls=self.tls,
            auth=self.auth_user,
            state=HELD if hold else ACTIVE,
        )

    def _signed(self, envelope: Envelope, content: bytes, done: asyncio.Future[bytes]) -> None:
        if done.exception() is not None:
            log.error(
                "DKIM signing of %s failed: %s; queued unsigned", envelope.id, done.exception()
            )
        else:
            content = done.result() + content
            envelope.size = len(content)
        self._commit(envelope, content)

    def _commit(self, envelope: Envelope, content: bytes) -> None:
        config = self.ctx.config
        if config.webhooks and events_wanted(config, "reception"):
            # the events commit with the message: never one without the other
            future = self.ctx.committer.submit_operation(put_message_reported(envelope, content))
        else:
            future = self.ctx.committer.submit(envelope, content)
        # The intake line maps the Message-ID to the queue id (`tachymail log`).
        message_id = None
        if log.isEnabledFor(logging.INFO):
            found = header_value(content, b"Message-ID")
            message_id = found.decode("utf-8", "replace") if found else ""
        auth, self._auth_pending = self._auth_pending, None
        future.add_done_callback(lambda done: self._committed(envelope, done, message_id, auth))

    def _committed(
        self,
        envelope: Envelope,
        done: asyncio.Future[None],
        message_id: str | None = None,
        auth: str | None = None,
    ) -> None:
        error = done.exception() if not done.cancelled() else None
        queue_id, size = envelope.id, envelope.size
        if error is None:
            if message_id is not None:
                log_intake(log, envelope, message_id, auth)
            notifier = self.ctx.notifier
            if notifier is not None:
                notifier.queued(queue_id, envelope.recipients)
            self._count_accepted(queue_id, size)
            reply = R.reply(250, "2.0.0", f"Ok: queued as {queue_id}")
        elif isinstance(error, StorageFull):
            log.error("queue full, message refused: %s", error)
            m.messages_rejected["queue_full"].inc()
            reply = R.STORAGE_FULL
        else:
            log.error("queue commit failed: %s", error)
            m.messages_rejected["queue_error"].inc()
            reply = R.LOCAL_ERROR
        if self.transport is None:
            return  # the client left; a committed message is delivered all the same
        self._resume(reply)

    def _count_accepted(self, queue_id: str, size: int) -> None:
        """Count a message of *size* octets accepted as *queue_id*: in the session (and
        its log line), the worker's statistics and the metrics."""
        self.messages += 1
        self.ctx.accepted += 1
        if len(self.queue_ids) < LOGGED_IDS:
            self.queue_ids.append(queue_id)
        m.messages_accepted[self.role].inc()
        m.received_bytes[self.role].inc(size)
        m.message_size.observe(size)

    def _protocol_name(self) -> str:
        """The Received header's protocol type before its S/A suffixes (RFC 3848)."""
        return "ESMTP" if self.esmtp else "SMTP"

    def _received_header(self, queue_id: str, now: float) -> bytes:
        protocol = self._protocol_name()
        if self.tls:
            protocol += "S"
        if self.auth_user:
            protocol += "A"  # RFC 3848 protocol types: ESMTPS, ESMTPA, ESMTPSA
        if "SMTPUTF8" in self.mail_params:
            protocol = "UTF8" + protocol  # RFC 6531 §3.7.3
        tls = f"\r\n\t(using {self.tls})" if self.tls else ""
        auth = " (authenticated)" if self.auth_user else ""
        rcpt = f"\r\n\tfor <{self.rcpts[0].address}>" if len(self.rcpts) == 1 else ""
        return (
            f"Received: from {_header_safe(self.helo or 'unknown')} ([{self.peer_ip}])\r\n"
            f"\tby {self.ctx.hostname} (Tachymail) with {protocol} id {queue_id}{auth}"
            f"{tls}{rcpt};\r\n\t{rfc5322_date(now)}\r\n"
        ).encode()

    def _submission_headers(self, content: bytes, queue_id: str, now: float) -> list[bytes]:
        """Date and Message-ID for a submitted message that lacks them (RFC 6409 §8)."""
        end = content.find(b"\r\n\r\n")
        header_block = content if end < 0 else content[: end + 2]
        added = []
        if header_value(header_block, b"Date") is None:
            added.append(f"Date: {rfc5322_date(now)}\r\n".encode())
        if header_value(header_block, b"Message-ID") is None:
            added.append(f"Message-ID: <{queue_id}@{self.ctx.hostname}>\r\n".encode())
        return added


# Verb number -> handler, once for the class (a dict of bound methods per session would
# cost about 1.6 KB of every idle connection).
_COMMANDS: dict[int, Callable[[SmtpSession, bytes], None]] = {
    C.VERB_HELO: SmtpSession.cmd_helo,
    C.VERB_EHLO: SmtpSession.cmd_ehlo,
    C.VERB_MAIL: SmtpSession.cmd_mail,
    C.VERB_RCPT: SmtpSession.cmd_rcpt,
    C.VERB_DATA: SmtpSession.cmd_data,
    C.VERB_BDAT: SmtpSession.cmd_bdat,
    C.VERB_RSET: SmtpSession.cmd_rset,
    C.VERB_NOOP: SmtpSession.cmd_noop,
    C.VERB_QUIT: SmtpSession.cmd_quit,
    C.VERB_VRFY: SmtpSession.cmd_vrfy,
    C.VERB_EXPN: SmtpSession.cmd_expn,
    C.VERB_HELP: SmtpSession.cmd_help,
    C.VERB_STARTTLS: SmtpSession.cmd_starttls,
    C.VERB_AUTH: SmtpSession.cmd_auth,
    C.VERB_UNKNOWN: SmtpSession.cmd_unknown,
}
SmtpSession.commands = _COMMANDS
# A client refused at connect (DNSBL): QUIT, and 503 5.5.1 for everything else.
_REFUSED_COMMANDS: dict[int, Callable[[SmtpSession, bytes], None]] = {
    verb: SmtpSession._refused_quit if verb == C.VERB_QUIT else SmtpSession._refused_command
    for verb in _COMMANDS
}

T = TypeVar("T")


def _temporary(verdict: MailVerdict) -> bool:
    """Whether an SPF identity of *verdict* failed for now (asked again next time)."""
    return any(r is not None and r.result == "temperror" for r in (verdict.spf, verdict.helo))


def _outcome(done: asyncio.Future[T], what: str) -> T | None:
    """The result of a finished check, or None (logged) when it was cancelled or failed:
    the checks never raise for bad input or DNS trouble, so a failure here is a bug."""
    if done.cancelled():
        return None
    error = done.exception()
    if error is not None:
        log.error("%s failed: %r", what, error, exc_info=error)
        return None
    return done.result()


def _retrieve(done: asyncio.Future[Any]) -> None:
    """Retrieve a background check's exception, so none is left unretrieved (it is
    logged where the result is used, or here when nobody waits for it)."""
    if not done.cancelled() and done.exception() is not None:
        log.debug("background check failed: %r", done.exception())


_date_cache: tuple[int, str] = (0, "")


def rfc5322_date(now: float) -> str:
    """The date for Received and Date headers, formatted once per second."""
    global _date_cache
    second = int(now)
    if _date_cache[0] != second:
        _date_cache = (second, email.utils.formatdate(second))
    return _date_cache[1]


@functools.lru_cache(maxsize=256)
def _header_safe(text: str) -> str:
    """*text* (a HELO name) fit for our Received field; cached, as a session's messages all
    carry its one HELO name (a character at a time, it cost 4 us a message)."""
    return "".join(c if c.isprintable() and c not in "()" else "?" for c in text)[:200]

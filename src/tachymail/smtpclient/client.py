"""The client side of SMTP: one outbound connection, pipelined when the peer allows it.

An ``asyncio.Protocol`` parses replies incrementally and hands each complete
batch of replies to the oldest waiting future, so a pipelined batch (RFC 2920)
is one ``write`` and one await, with no read loop per line.

A transaction is started (:meth:`SmtpConnection.start`) and finished
(:meth:`SmtpConnection.finish`) apart. In between, the message content waits in
the connection: if the next transaction starts first, the content, its final dot
and the next MAIL, RCPTs and DATA go out in one write (RFC 2920 §3.1 lets the
content begin a group), so a busy connection costs one write and one read per
message instead of two of each. On loopback and in virtual machines each write
that wakes the peer costs tens of microseconds of system time: this is most of
what a relay spends per message.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from collections import deque
from dataclasses import dataclass, field
from typing import cast

from tachymail.protocol.data import dot_stuff

log = logging.getLogger(__name__)

MAX_REPLY = 64 * 1024  # a reply longer than this is a broken or hostile peer


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: its code and the text of each of its lines."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines).strip()

    @property
    def status(self) -> str:
        """The RFC 3463 enhanced code at the start of the text, or ""."""
        head = self.text.split(" ", 1)[0]
        parts = head.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and head[0] in "245":
            return head
        return ""

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()


class SmtpClientError(Exception):
    """The connection failed or the peer broke the protocol (treated as a 4xx)."""


@dataclass(slots=True)
class TransactionResult:
    """What the peer said to one mail transaction."""

    mail: Reply
    rcpts: list[Reply]
    data: Reply | None  # None when no recipient was accepted (DATA not sent or refused)


@dataclass(slots=True)
class PendingData:
    """A transaction the peer said 354 to: its content waits to be written, then the reply."""

    mail: Reply
    rcpts: list[Reply]
    reply: asyncio.Future[list[Reply]]
    #: the content and final dot, until written
    content: bytes


class _ReplyProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.lines: list[str] = []
        # Each waiter wants a number of replies: a pipelined batch is one future, not one
        # per command.
        self.waiters: deque[tuple[asyncio.Future[list[Reply]], int, list[Reply]]] = deque()
        self.ready: deque[Reply] = deque()
        self.lost: Exception | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # Kept, not asked for per reply: asyncio.get_running_loop() makes a getpid call.
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > MAX_REPLY:
                    self._fail(SmtpClientError("reply line too long"))
                return
            line = bytes(self.buffer[:end]).rstrip(b"\r").decode("utf-8", "replace")
            del self.buffer[: end + 1]
            if len(line) < 3 or not line[:3].isdigit():
                self._fail(SmtpClientError(f"malformed reply {line[:80]!r}"))
                return
            self.lines.append(line[4:])
            if line[3:4] != "-":
                reply = Reply(int(line[:3]), tuple(self.lines))
                self.lines = []
                if self.waiters:
                    waiter, count, got = self.waiters[0]
                    got.append(reply)
                    if len(got) == count:
                        self.waiters.popleft()
                        if not waiter.done():
                            waiter.set_result(got)
                else:
                    self.ready.append(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(SmtpClientError(f"connection lost: {exc}" if exc else "connection closed"))

    def _fail(self, exc: Exception) -> None:
        self.lost = self.lost or exc
        while self.waiters:
            waiter, count, got = self.waiters.popleft()
            if waiter.done():
                continue
            if got and got[-1].code == 421:
                # The server said 421 and closed (RFC 5321 §3.8): that is the answer to
                # the rest of the pipelined commands too, not "connection closed" (a
                # provider's "421 4.7.28" must reach the shaping reactions).
                waiter.set_result(got + [got[-1]] * (count - len(got)))
            else:
                waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def replies(self, count: int) -> asyncio.Future[list[Reply]]:
        """A future for the next *count* replies, in order."""
        future: asyncio.Future[list[Reply]] = (
            self.loop or asyncio.get_running_loop()
        ).create_future()
        got: list[Reply] = []
        ready = self.ready
        while ready and len(got) < count and not self.waiters:
            got.append(ready.popleft())
        if len(got) == count:
            future.set_result(got)
        elif self.lost is not None and got and got[-1].code == 421:
            future.set_result(got + [got[-1]] * (count - len(got)))  # see _fail
        elif self.lost is not None:
            future.set_exception(self.lost)
        else:
            self.waiters.append((future, count, got))
        return future


@dataclass(slots=True)
class ClientSettings:
    """How to talk to one next hop."""

    helo: str
    tls: str = "opportunistic"  # "none" | "opportunistic" | "required"
    tls_verify: bool = False
    #: PEM file of the CAs to verify against; empty: the system's
    tls_ca: str = ""
    #: sent only under TLS whose certificate was verified (the router sets tls_verify)
    auth: tuple[str, str] | None = None
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    server_name: str = ""  # for certificate verification (SNI and hostname check)
    #: the local address to send from (an egress source); "" = the host's default
    local_address: str = ""


@dataclass(slots=True)
class SmtpConnection:
    """One established SMTP session to a remote host, reusable for many transactions."""

    host: str
    address: str
    port: int
    settings: ClientSettings
    protocol: _ReplyProtocol = field(default_factory=_ReplyProtocol)
    extensions: dict[str, str] = field(default_factory=dict)
    tls_version: str = ""
    messages: int = 0
    #: content and final dot of the transaction in progress, not yet written
    unsent: bytes = b""

    @property
    def transport(self) -> asyncio.Transport:
        transport = self.protocol.transport
        if transport is None:
            raise SmtpClientError("not connected")
        if transport.is_closing():
            # uvloop raises RuntimeError on a write to a closed transport: the peer or an
            # abort closed it between two transactions.
            raise SmtpClientError(f"connection closed: {self.protocol.lost or 'aborted'}")
        return transport

    @property
    def usable(self) -> bool:
        transport = self.protocol.transport
        return self.protocol.lost is None and transport is not None and not transport.is_closing()

    async def _reply(self) -> Reply:
        return (await self._replies(1))[0]

    async def _replies(self, count: int) -> list[Reply]:
        """The next *count* replies, all within one command timeout."""
        return await self._wait(self.protocol.replies(count))

    async def _wait(self, future: asyncio.Future[list[Reply]]) -> list[Reply]:
        # One timer per batch rather than ``asyncio.wait_for`` per reply: wait_for wraps
        # the future in a task each time, several times the cost of reading the reply.
        if not future.done():
            loop = self.protocol.loop or asyncio.get_running_loop()
            timer = loop.call_later(self.settings.command_timeout, _expire, future)
            try:
                await future
            except TimeoutError as exc:
                self.abort()
                raise SmtpClientError("timeout waiting for a reply") from exc
            finally:
                timer.cancel()
        return future.result()

    async def _command(self, line: str) -> Reply:
        self.transport.write(line.encode() + b"\r\n")
        return await self._reply()

    @classmethod
    async def open(
        cls, host: str, address: str, port: int, settings: ClientSettings
    ) -> SmtpConnection:
        """Connect, read the greeting, EHLO (HELO as a fallback), STARTTLS and AUTH as set.

        Raises SmtpClientError for network trouble and :class:`ReplyError` when the peer
        refuses the session (a 4xx/5xx greeting, required TLS not offered, AUTH refused).
        Credentials go out only under TLS with a verified certificate: otherwise
        :class:`TlsPolicyError`, 451 4.7.10 (no TLS) or 451 4.7.5 (certificate not verified).
        """
        loop = asyncio.get_running_loop()
        conn = cls(host, address, port, settings)
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: conn.protocol,
                    address,
                    port,
                    local_addr=(settings.local_address, 0) if settings.local_address else None,
                ),
                settings.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise SmtpClientError(f"cannot connect to {address}:{port}: {exc}") from exc
        greeting = await conn._reply()
        if greeting.code != 220:
            conn.abort()
            raise ReplyError(greeting, "greeting")
        await conn._hello()
        if settings.tls != "none" and "STARTTLS" in conn.extensions:
            await conn._starttls()
        elif settings.tls == "required":
            conn.abort()
            refusal = Reply(421, ("4.7.0 TLS required but not offered by the peer",))
            raise ReplyError(refusal, "tls")
        if settings.auth is not None:
            if not conn.tls_version or not settings.tls_verify:
                conn.abort()
                why = "refused STARTTLS" if "STARTTLS" in conn.extensions else "offers no TLS"
                if conn.tls_version:
                    why = "has an unverified certificate"  # only if built without the router
                log.warning("%s [%s]: %s; credentials not sent", host, address, why)
                refusal = Reply(451, (f"4.7.10 {host} {why}; credentials not sent",))
                raise TlsPolicyError(refusal, "AUTH")
            await conn._authenticate(*settings.auth)
        return conn

    async def _hello(self) -> None:
        reply = await self._command(f"EHLO {self.settings.helo}")
        if reply.code == 250:
            self.extensions = parse_ehlo(reply)
            return
        reply = await self._command(f"HELO {self.settings.helo}")
        if reply.code != 250:
            self.abort()
            raise ReplyError(reply, "HELO")
        self.extensions = {}

    async def _starttls(self) -> None:
        reply = await self._command("STARTTLS")
        if reply.code != 220:
            if self.settings.tls == "required":
                self.abort()
                raise ReplyError(reply, "STARTTLS")
            return
        context = ssl.create_default_context(cafile=self.settings.tls_ca or None)
        if not self.settings.tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(
                self.transport,
                self.protocol,
                context,
                server_hostname=self.settings.server_name or self.host,
                ssl_handshake_timeout=self.settings.connect_timeout,
            )
        except ssl.SSLCertVerificationError as exc:
            self.abort()
            why = f"certificate of {self.host} not verified: {exc.verify_message}"
            log.warning("%s [%s]: %s", self.host, self.address, why)
            # RFC 3463 X.7.5, as Postfix reports an unverified server certificate
            raise TlsPolicyError(Reply(451, (f"4.7.5 {why}",)), "STARTTLS") from exc
        except Exception as exc:
            self.abort()
            raise SmtpClientError(f"TLS handshake with {self.host} failed: {exc!r}") from exc
        self.protocol.transport = cast(asyncio.Transport, new)
        ssl_object = new.get_extra_info("ssl_object") if new is not None else None
        self.tls_version = ssl_object.version() if ssl_object is not None else ""
        await self._hello()

    async def _authenticate(self, user: str, password: str) -> None:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        reply = await self._command(f"AUTH PLAIN {token}")
        if reply.code != 235:
            self.abort()
            raise ReplyError(reply, "AUTH")

    async def send(
        self,
        sender: str,
        mail_params: str,
        recipients: list[tuple[str, str]],
        content: bytes,
    ) -> TransactionResult:
        """One whole transaction: :meth:`start`, then :meth:`finish` if the peer said 354."""
        started = await self.start(sender, mail_params, recipients, content)
        if isinstance(started, PendingData):
            return await self.finish(started)
        return started

    async def start(
        self,
        sender: str,
        mail_params: str,
        recipients: list[tuple[str, str]],
        content: bytes,
    ) -> TransactionResult | PendingData:
        """MAIL, every RCPT, then DATA (or BDAT when offered), up to the 354.

        With PIPELINING everything up to DATA goes out in one write, after the content of
        the previous transaction if it is still unsent (and with CHUNKING the whole message
        too, as one BDAT LAST chunk). After a 354 the content is left in :attr:`unsent`
        and a :class:`PendingData` returned: :meth:`finish` writes it, or the next
        :meth:`start` does. *mail_params* and each recipient's parameter string are
        appended as given.
        """
        pipelining = "PIPELINING" in self.extensions
        chunking = "CHUNKING" in self.extensions
        mail_line = f"MAIL FROM:<{sender}>{mail_params}\r\n".encode()
        rcpt_lines = [f"RCPT TO:<{addr}>{params}\r\n".encode() for addr, params in recipients]
        self.messages += 1
        if pipelining:
            batch = [self.unsent, mail_line, *rcpt_lines]
            self.unsent = b""
            if chunking:
                batch += [b"BDAT %d LAST\r\n" % len(content), content]
            else:
                batch.append(b"DATA\r\n")
            self.transport.write(b"".join(batch))
            replies = await self._replies(len(recipients) + 2)
            mail, rcpts, last = replies[0], replies[1:-1], replies[-1]
            if not any(r.code // 100 == 2 for r in rcpts) or mail.code // 100 != 2:
                if not chunking and last.code == 354:
                    # Nobody to deliver to but the peer wants data: end it empty.
                    self.transport.write(b".\r\n")
                    await self._reply()
                self._reset_after_failure()
                return TransactionResult(mail, rcpts, None)
            if chunking or last.code != 354:
                return TransactionResult(mail, rcpts, last)
            # The reply's waiter is queued now, ahead of any later transaction's.
            pending = PendingData(
                mail, rcpts, self.protocol.replies(1), dot_stuff(content) + b".\r\n"
            )
            self.unsent = pending.content
            return pending
        self.flush()
        mail = await self._command(mail_line.decode().rstrip("\r\n"))
        if mail.code // 100 != 2:
            return TransactionResult(mail, [mail] * len(recipients), None)
        rcpts = []
        for line in rcpt_lines:
            self.transport.write(line)
            rcpts.append(await self._reply())
        if not any(r.code // 100 == 2 for r in rcpts):
            await self._command("RSET")
            return TransactionResult(mail, rcpts, None)
        if chunking:
            self.transport.write(b"BDAT %d LAST\r\n" % len(content) + content)
            return TransactionResult(mail, rcpts, await self._reply())
        go = await self._command("DATA")
        if go.code != 354:
            return TransactionResult(mail, rcpts, go)
        self.transport.write(dot_stuff(content) + b".\r\n")
        return TransactionResult(mail, rcpts, await self._reply())

    async def verify(
        self, sender: str, recipient: str, mail_params: str = ""
    ) -> tuple[Reply, Reply | None]:
        """An address-verification probe: MAIL FROM, RCPT TO, then RSET; never DATA.

        Returns the replies to MAIL and to RCPT (None when MAIL was refused). With
        PIPELINING the three commands go out in one write. Raises SmtpClientError when the
        connection fails or a reply does not come within the command timeout.
        """
        self.flush()
        mail_line = f"MAIL FROM:<{sender}>{mail_params}\r\n".encode()
        rcpt_line = f"RCPT TO:<{recipient}>\r\n".encode()
        if "PIPELINING" in self.extensions:
            self.transport.write(mail_line + rcpt_line + b"RSET\r\n")
            mail, rcpt, _ = await self._replies(3)
            return mail, rcpt if mail.code // 100 == 2 else None
        self.transport.write(mail_line)
        mail = await self._reply()
        if mail.code // 100 != 2:
            return mail, None
        self.transport.write(rcpt_line)
        rcpt = await self._reply()
        await self._command("RSET")
        return mail, rcpt

    def flush(self) -> None:
        """Write the content still waiting for the next transaction's commands."""
        if self.unsent:
            unsent, self.unsent = self.unsent, b""
            self.transport.write(unsent)

    async def finish(self, pending: PendingData) -> TransactionResult:
        """The final reply to a started transaction (its content is written first if need be).

        Only this transaction's own content is flushed: when a later transaction has started
        meanwhile, the content waiting is that one's, and this one's went out before it.
        """
        if self.unsent is pending.content:
            self.flush()
        replies = await self._wait(pending.reply)
        return TransactionResult(pending.mail, pending.rcpts, replies[0])

    def _reset_after_failure(self) -> None:
        # RSET pipelined; its reply is consumed before the next transaction's replies.
        if not self.usable:
            return  # closed (after a 421): the connection is not used again
        self.transport.write(b"RSET\r\n")
        self.protocol.replies(1).add_done_callback(_ignore)

    async def quit(self) -> None:
        """Say QUIT politely and close; never raises."""
        try:
            # Never content still unsent: its transaction is not recorded as delivered.
            if self.usable and not self.unsent:
                self.transport.write(b"QUIT\r\n")
                await asyncio.wait_for(self.protocol.replies(1), 5)
        except Exception:  # the peer may already be gone; closing is all that matters
            pass
        self.abort()

    def abort(self) -> None:
        if self.protocol.transport is not None:
            self.protocol.transport.close()


class ReplyError(SmtpClientError):
    """The peer answered a session step (greeting, EHLO, STARTTLS, AUTH) with an error."""

    def __init__(self, reply: Reply, step: str) -> None:
        super().__init__(f"{step}: {reply}")
        self.reply = reply
        self.step = step


class TlsPolicyError(ReplyError):
    """We ended the session ourselves: credentials without verified TLS (451 4.7.10) or a
    certificate that does not verify (451 4.7.5). The message is deferred with ``reply``."""


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """The extensions an EHLO reply advertises: keyword (upper-case) → parameters."""
    extensions = {}
    for line in reply.lines[1:]:  # the first line is the greeting
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params
    return extensions


def _ignore(future: asyncio.Future[list[Reply]]) -> None:
    if not future.cancelled():
        future.exception()


def _expire(future: asyncio.Future[list[Reply]]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())

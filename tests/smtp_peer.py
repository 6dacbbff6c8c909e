"""A small scripted SMTP server for delivery tests: real TCP on 127.0.0.1, its own thread.

It answers like a receiving MTA, with replies scripted per test (a 4xx or 5xx for
some recipients or at end of data, a 421 greeting, slow replies, a connection cut
after a command), advertises a chosen set of extensions, and records what it got:
every message with its envelope, every connection, and the size of every read (so a
test can see that a pipelined batch arrived in one write).

For TLS and AUTH tests it can offer STARTTLS (with a server context the test makes) and
AUTH, and records every AUTH line with whether it came under TLS. For fault injection it
can cut the connection at a chosen point, the first few times or always (``cut_at``,
``cut_times``): see :class:`Script`.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_EXTENSIONS = (
    "PIPELINING",
    "8BITMIME",
    "SMTPUTF8",
    "SIZE 104857600",
    "DSN",
    "ENHANCEDSTATUSCODES",
)


@dataclass
class Received:
    sender: str
    mail_args: str
    recipients: list[str]
    rcpt_args: list[str]
    content: bytes
    connection: int


@dataclass
class Script:
    """How the peer behaves; tests change it while it runs (it is read per command)."""

    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    greeting: str = "220 peer.test ESMTP scripted"
    #: recipient address -> reply for its RCPT
    rcpt: dict[str, str] = field(default_factory=dict)
    #: reply to MAIL (None: 250)
    mail: str | None = None
    #: reply at the end of data (None: 250 with a queue id)
    data: str | None = None
    #: seconds to wait before every reply
    delay: float = 0.0
    #: close the connection instead of answering this verb ("MAIL", "DATA", "EOD", ...), or:
    #: "CONTENT": after the 354, on the first bytes of content (before the dot);
    #: "EOD": after the dot, before any reply, the message discarded;
    #: "EOD_KEPT": after the dot, before any reply, the message kept (as if queued);
    #: "EOD_PARTIAL": the message kept, ``partial_reply`` written without CRLF, then closed
    cut_at: str = ""
    #: cut only this many times, then behave (0: every time)
    cut_times: int = 0
    partial_reply: str = "250 2.0.0 O"
    #: offer STARTTLS with this server context
    tls_context: ssl.SSLContext | None = None
    #: offer AUTH PLAIN LOGIN (and accept any credentials with 235)
    auth: bool = False
    #: called with each accepted message (for tests that change the script as mail arrives)
    on_message: Callable[[Received], None] | None = None


class _Session(asyncio.Protocol):
    def __init__(self, peer: SmtpPeer) -> None:
        self.peer = peer
        self.buffer = b""
        self.in_data = False
        self.bdat_left = 0
        self.bdat_last = False
        self.body = bytearray()
        self.reset()
        self.tls = False
        self.upgrading = False
        peer.connections += 1
        self.number = peer.connections
        peer.open_now += 1
        peer.max_open = max(peer.max_open, peer.open_now)

    def reset(self) -> None:
        self.sender: str | None = None
        self.mail_args = ""
        self.rcpts: list[str] = []
        self.rcpt_args: list[str] = []
        self.body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.reply(self.peer.script.greeting)
        if self.peer.script.greeting.startswith(("421", "554")):
            self.transport.close()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.peer.open_now -= 1

    async def upgrade(self, context: ssl.SSLContext) -> None:
        """STARTTLS on the server side; a failed handshake just ends the connection."""
        loop = asyncio.get_running_loop()
        self.buffer = b""  # RFC 3207 §4.2: nothing sent before the handshake counts
        # Commands may arrive (decrypted) before start_tls returns the new transport: they
        # wait in the buffer, or their replies would go out in plaintext.
        self.upgrading = True
        try:
            new = await loop.start_tls(
                self.transport,  # type: ignore[arg-type]
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=10,
            )
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as exc:
            self.peer.tls_failures.append(repr(exc))
            self.transport.close()  # type: ignore[attr-defined]
            return
        if new is None:
            return
        self.transport = new  # type: ignore[assignment]
        self.tls = True
        self.upgrading = False
        self.reset()
        if self.buffer:
            self.data_received(b"")

    def reply(self, text: str) -> None:
        delay = self.peer.script.delay
        if delay:
            time.sleep(delay)  # the peer is slow: everything waits, as a loaded server would
        self.transport.write(text.encode() + b"\r\n")  # type: ignore[attr-defined]

    def cut(self, verb: str) -> bool:
        script = self.peer.script
        if script.cut_at == verb and (not script.cut_times or self.peer.cuts < script.cut_times):
            self.peer.cuts += 1
            self.transport.close()  # type: ignore[attr-defined]
            return True
        return False

    def data_received(self, data: bytes) -> None:
        if data:
            self.peer.reads.append(len(data))
        self.buffer += data
        while self.buffer and not self.upgrading:
            if self.bdat_left:
                take = self.buffer[: self.bdat_left]
                self.body += take
                self.buffer = self.buffer[len(take) :]
                self.bdat_left -= len(take)
                if self.bdat_left == 0:
                    if self.bdat_last:
                        self.end_of_message(bytes(self.body))
                    else:
                        self.reply("250 2.0.0 chunk ok")
                continue
            if self.in_data:
                if self.cut("CONTENT"):
                    return
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0 and self.buffer.startswith(b".\r\n"):
                    end = -2
                if end == -1:
                    return
                raw = self.buffer[: end + 2] if end >= 0 else b""
                self.buffer = self.buffer[end + 5 :]
                self.in_data = False
                self.end_of_message(re.sub(rb"(?m)^\.\.", b".", raw))
                continue
            line, sep, rest = self.buffer.partition(b"\r\n")
            if not sep:
                return
            self.buffer = rest
            if not self.command(line.decode("utf-8", "replace")):
                return

    def end_of_message(self, content: bytes) -> None:
        if self.cut("EOD"):
            return
        reply = self.peer.script.data
        script = self.peer.script
        cut_at = script.cut_at
        kept_then_cut = cut_at in ("EOD_KEPT", "EOD_PARTIAL") and (
            not script.cut_times or self.peer.cuts < script.cut_times
        )
        if reply is None or reply.startswith("2") or kept_then_cut:
            received = Received(
                self.sender or "",
                self.mail_args,
                list(self.rcpts),
                list(self.rcpt_args),
                content,
                self.number,
            )
            self.peer.messages.append(received)
            if self.peer.script.on_message:
                self.peer.script.on_message(received)
        if kept_then_cut:
            if cut_at == "EOD_PARTIAL":  # a reply line begun, never finished
                self.transport.write(script.partial_reply.encode())  # type: ignore[attr-defined]
            self.cut(cut_at)
            return
        self.reply(reply or f"250 2.0.0 Ok: queued as P{len(self.peer.messages)}")
        self.reset()

    def command(self, line: str) -> bool:
        verb = line.split(" ", 1)[0].upper()
        script = self.peer.script
        if self.cut(verb):
            return False
        if verb == "EHLO":
            lines = ["peer.test", *script.extensions]
            if script.tls_context is not None and not self.tls:
                lines.append("STARTTLS")
            if script.auth:
                lines.append("AUTH PLAIN LOGIN")
            out = [f"250-{x}" for x in lines[:-1]] + [f"250 {lines[-1]}"]
            self.reply("\r\n".join(out))
        elif verb == "HELO":
            self.reply("250 peer.test")
        elif verb == "MAIL":
            match = re.match(r"MAIL FROM:<([^>]*)>(.*)", line, re.I)
            if script.mail:
                self.reply(script.mail)
            elif match is None:
                self.reply("501 5.5.4 syntax")
            else:
                self.sender, self.mail_args = match.group(1), match.group(2).strip()
                self.reply("250 2.1.0 Ok")
        elif verb == "RCPT":
            match = re.match(r"RCPT TO:<([^>]*)>(.*)", line, re.I)
            address = match.group(1) if match else ""
            answer = script.rcpt.get(address, "250 2.1.5 Ok")
            if self.sender is None:  # MAIL was refused (or never sent): RFC 5321 §3.3
                answer = "503 5.5.1 MAIL first"
            if answer.startswith("2"):
                self.rcpts.append(address)
                self.rcpt_args.append(match.group(2).strip() if match else "")
            self.reply(answer)
        elif verb == "DATA":
            if not self.rcpts:
                self.reply("554 5.5.1 no valid recipients")
            else:
                self.in_data = True
                self.reply("354 go ahead")
        elif verb == "BDAT":
            parts = line.split()
            self.bdat_left = int(parts[1])
            self.bdat_last = len(parts) > 2 and parts[2].upper() == "LAST"
            if self.bdat_left == 0 and self.bdat_last:
                self.end_of_message(bytes(self.body))
        elif verb == "STARTTLS" and script.tls_context is not None and not self.tls:
            self.reply("220 2.0.0 go ahead")
            self.transport.pause_reading()  # type: ignore[attr-defined]
            self.upgrade_task = asyncio.ensure_future(self.upgrade(script.tls_context))
            return False
        elif verb == "AUTH" and script.auth:
            self.peer.auth_lines.append((self.tls, line))
            self.reply("235 2.7.0 authenticated")
        elif verb == "RSET":
            self.reset()
            self.reply("250 2.0.0 Ok")
        elif verb == "QUIT":
            self.reply("221 2.0.0 Bye")
            self.transport.close()  # type: ignore[attr-defined]
            return False
        else:
            self.reply("250 2.0.0 Ok")
        return True


class SmtpPeer:
    """Start with ``with SmtpPeer() as peer:``; ``peer.port`` is where it listens."""

    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.messages: list[Received] = []
        self.connections = 0
        #: connections open now, and the most ever open at once
        self.open_now = 0
        self.max_open = 0
        self.reads: list[int] = []
        #: (under TLS, the AUTH command line) for every AUTH received
        self.auth_lines: list[tuple[bool, str]] = []
        #: handshakes that failed (the client refused the certificate, ...)
        self.tls_failures: list[str] = []
        #: connections cut by ``Script.cut_at``
        self.cuts = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> SmtpPeer:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            self._loop.create_server(lambda: _Session(self), "127.0.0.1", 0), self._loop
        )
        self._server = future.result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        """Block until *count* messages arrived (or fail after *timeout* seconds)."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"peer got {len(self.messages)} of {count} messages")
            time.sleep(0.02)
        return self.messages

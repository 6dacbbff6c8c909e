"""What the front ends' sessions (SMTP and LMTP, POP3) do alike: the client's standing,
the STARTTLS/STLS upgrade and the tarpit after a failed login.

Each session keeps its own state machine, replies and log wording; the steps here are
those whose logic is the same whatever the protocol. Callers pass their own logger and
the words that name the session (``"session 192.0.2.1"``), so a log line reads and files
as it did when each front end had its own copy.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from tachymail.metrics import m
from tachymail.queue.envelope import HELD

if TYPE_CHECKING:
    from tachymail.auth.throttle import Lockout, Verdict
    from tachymail.config import AuthConfig
    from tachymail.protocol.commands import LineReader
    from tachymail.queue.envelope import Envelope

#: seconds a client has to finish the TLS handshake after STARTTLS / STLS
HANDSHAKE_TIMEOUT = 30.0


def is_trusted(
    peer_ip: str, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    """Whether *peer_ip* lies in one of *networks* (``policy.trusted_networks``); False
    for an address that does not parse (a UNIX socket's empty peer name)."""
    try:
        address = ipaddress.ip_address(peer_ip)
    except ValueError:
        return False
    return any(address in net for net in networks)


def refusal_reason(refused: str, peer_ip: str) -> str:
    """The words for a connection ``WorkerContext.admit`` turned away (*refused* is its
    reason: "max_connections", "max_per_ip", ...)."""
    why = "too many connections"
    if refused == "max_per_ip":
        why += f" from {peer_ip}"
    return why


def tls_description(transport: asyncio.BaseTransport) -> str | None:
    """ "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384", or None when the transport is plain."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()} with cipher {cipher[0] if cipher else 'unknown'}"


def stop_plaintext(
    transport: asyncio.Transport, lines: LineReader, logger: logging.Logger, who: str, verb: str
) -> None:
    """After the reply that lets *verb* (STARTTLS, STLS) begin TLS: drop what the client
    pipelined behind it, which must never run inside TLS (CVE-2011-0411, RFC 2595 §4),
    and read nothing more until :func:`tls_handshake` is over."""
    injected = lines.drain()
    if injected:
        logger.warning("%s: discarded %d bytes sent after %s", who, len(injected), verb)
    transport.pause_reading()


async def tls_handshake(
    loop: asyncio.AbstractEventLoop,
    transport: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    logger: logging.Logger,
    who: str,
) -> asyncio.Transport | None:
    """Run the server side of a TLS handshake over *transport* for *protocol*: the TLS
    transport, or None when the handshake failed or took over HANDSHAKE_TIMEOUT (logged;
    the connection is aborted, and the caller counts the failure)."""
    try:
        new = await loop.start_tls(
            transport,
            protocol,
            context,
            server_side=True,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
        )
    except (TimeoutError, OSError, ConnectionError) as exc:
        logger.info("%s: TLS handshake failed: %s", who, exc)
        transport.abort()
        return None
    return new


def log_locked_out(
    logger: logging.Logger, who: str, what: str, shown: str, lockout: Lockout
) -> None:
    """Log a login refused unchecked by *lockout* ("<who>: <what> for 'name' refused: ...")."""
    logger.warning(
        "%s: %s for %r refused: %s locked out for %.0f more seconds",
        who,
        what,
        shown,
        "client address" if lockout.scope == "ip" else "user",
        max(lockout.until - time.time(), 0.0),
    )


def tarpit_delay(
    verdict: Verdict | None, auth: AuthConfig, peer_ip: str, shown: str, logger: logging.Logger
) -> float:
    """Seconds the reply to a wrong password waits: ``auth.failure_delay`` times the
    failures counted for the client address or user, at most ``auth.max_failure_delay``
    (guessing slows down as failures add up). Logs and counts every lockout this failure
    began (*shown*: the user name as it may be logged)."""
    count = 1.0
    if verdict is not None and verdict.failure is not None:
        count = max(verdict.failure.count, 1.0)
        for scope in verdict.failure.began:
            m.auth_lockouts[scope].inc()
            logger.warning(
                "AUTH lockout for %.0f seconds: %s after too many failures",
                auth.lockout,
                f"client {peer_ip}" if scope == "ip" else f"user {shown!r}",
            )
    return min(auth.failure_delay * count, auth.max_failure_delay)


def log_intake(
    logger: logging.Logger, envelope: Envelope, message_id: str, auth: str | None = None
) -> None:
    """The line of one accepted message, whatever front end took it (event
    ``message_accepted``; `tachymail log` reads it); *auth*: the inbound-authentication
    results ("spf=pass dkim=pass dmarc=pass ..."), when the message was checked."""
    rcpts = [r.address for r in envelope.recipients]
    client = f"{envelope.client_ip}:{envelope.client_port}"
    logger.info(
        # The message-id stays last: `tachymail log` reads it to the end of the line.
        "%s queued: from <%s> to %s; %d octets; client %s%s%s; message-id %s",
        envelope.id,
        envelope.sender,
        ", ".join(f"<{r}>" for r in rcpts),
        envelope.size,
        client,
        "; held" if envelope.state == HELD else "",
        f"; {auth}" if auth else "",
        message_id or "(none)",
        extra={
            "fields": {
                "event": "message_accepted",
                "queue_id": envelope.id,
                "message_id": message_id or None,
                "sender": envelope.sender,
                "recipients": rcpts,
                "size": envelope.size,
                "client": client,
                "listener": envelope.listener,
                "user": envelope.auth,  # the SMTP AUTH user, or the HTTP token's name
                "auth": auth,
            }
        },
    )

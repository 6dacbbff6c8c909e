"""One SMTP worker process: a uvloop event loop serving every listener via SO_REUSEPORT.

The supervisor forks the workers; each opens its own queue environment after
the fork, binds its own socket per listener (the kernel spreads connections
across the workers' sockets) and runs until SIGTERM, when it stops accepting
and lets open transactions finish within the drain timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import socket
import ssl
import sys
import time
from collections import Counter

import uvloop

from tachymail import metrics
from tachymail.auth.users import UsersFile
from tachymail.config import Config, ListenerConfig
from tachymail.delivery.dkim import DkimSigner
from tachymail.protocol import replies as R
from tachymail.queue.commit import GroupCommitter
from tachymail.queue.notify import Notifier
from tachymail.queue.store import MiB, QueueStore
from tachymail.smtp.session import SmtpSession
from tachymail.smtp.tls import server_context

log = logging.getLogger(__name__)


class WorkerContext:
    """What every session of one worker shares: configuration, queue, TLS, users, counters."""

    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        committer: GroupCommitter,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        self.config = config
        self.loop = loop
        self.committer = committer
        self.tls_context = tls_context
        self.hostname = config.server.hostname
        self.trusted = config.policy.trusted()
        policy = config.policy
        self.accepted_domains = {d.lower() for d in [*policy.local_domains, *policy.relay_domains]}
        self.users = UsersFile(config.users_path)
        # Keys load once per worker; a missing key stops the worker with the keygen command.
        self.dkim = (
            DkimSigner(config.data_path, config.dkim.domains) if config.dkim.domains else None
        )
        # Newly queued ids go straight to the delivery workers (none while holding).
        self.notifier = (
            None if config.server.hold else Notifier(config.data_path, config.delivery.workers)
        )
        self.sessions: set[SmtpSession] = set()
        self.per_ip: Counter[str] = Counter()
        # Connection limits are for the whole server; each worker takes its share, since
        # SO_REUSEPORT spreads connections evenly across the workers' sockets.
        workers = config.worker_count
        limits = config.limits
        self.max_connections = math.ceil(limits.max_connections / workers)
        self.max_per_ip = math.ceil(limits.max_connections_per_ip / workers)
        self.accepted = 0
        self.tls_failures = 0
        self.auth_successes = 0
        self.auth_failures = 0
        self._ehlo: dict[bool, list[str]] = {tls: self._extensions(tls) for tls in (False, True)}

    def _extensions(self, tls: bool) -> list[str]:
        extensions = [
            "PIPELINING",
            f"SIZE {self.config.limits.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
            "DSN",
        ]
        if tls:
            extensions += ["AUTH PLAIN LOGIN", "REQUIRETLS"]
        elif self.tls_context is not None:
            extensions.append("STARTTLS")
        return extensions

    def ehlo_reply(self, peer_ip: str, tls: bool) -> bytes:
        return R.multiline(250, [f"{self.hostname} greets [{peer_ip}]", *self._ehlo[tls]])

    def admit(self, ip: str, trusted: bool) -> str | None:
        """Count a new connection; the reason to refuse it, or None.

        Trusted networks are exempt from the per-IP limit (as Postfix exempts
        $mynetworks), so a local load generator or relay is never throttled.
        """
        if len(self.sessions) > self.max_connections:
            return "too many connections"
        if self.per_ip[ip] >= self.max_per_ip and not trusted:
            return f"too many connections from {ip}"
        self.per_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        if self.per_ip[ip] > 0:
            self.per_ip[ip] -= 1
            if not self.per_ip[ip]:
                del self.per_ip[ip]


def listening_socket(listener: ListenerConfig) -> socket.socket:
    """The listener's socket, bound with SO_REUSEPORT (see :func:`reuseport_socket`)."""
    return reuseport_socket(listener.host, listener.port)


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A listening socket bound with SO_REUSEPORT, so several processes (every worker, or
    every `tachymail sink` process) can bind the same address."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(info[4])
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve_worker(config: Config, index: int) -> int:
    loop = asyncio.get_running_loop()
    store = QueueStore(
        config.data_path / "queue",
        map_size=config.queue.map_size_mb * MiB,
        max_map_size=config.queue.max_map_size_mb * MiB,
    )
    committer = GroupCommitter(
        store,
        max_batch=config.queue.max_batch,
        linger=config.queue.commit_linger_ms / 1000 if config.queue.commit == "inline" else 0.0,
        inline=config.queue.commit == "inline",
    )
    tls = server_context(config)
    ctx = WorkerContext(config, loop, committer, tls)
    # A lone client, or every client already waiting for this commit: nobody can join it,
    # so it starts at once instead of lingering (one session would otherwise wait 1 ms
    # per message for company that never comes).
    committer.more_may_join = lambda pending: len(ctx.sessions) > pending
    servers = []
    for listener in config.listeners:
        implicit = listener.role == "smtps"
        role = listener.role

        def factory(role: str = role, implicit: bool = implicit) -> SmtpSession:
            return SmtpSession(ctx, role, implicit)

        servers.append(
            await loop.create_server(
                factory,
                sock=listening_socket(listener),
                ssl=tls if implicit else None,
                ssl_handshake_timeout=30 if implicit else None,
            )
        )
    log.info(
        "worker %d (pid %d) listening on %s",
        index,
        os.getpid(),
        ", ".join(f"{lst.address} ({lst.role})" for lst in config.listeners),
    )
    stop = asyncio.Event()
    retire = False

    def retire_gently() -> None:
        nonlocal retire
        retire = True
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    # SIGUSR1: replaced after a reload; sessions may go on to their natural end.
    loop.add_signal_handler(signal.SIGUSR1, retire_gently)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the supervisor handles reloads
    parent = os.getppid()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except TimeoutError:
            metrics.flush()  # the hot-path tallies reach /metrics within about a second
            if os.getppid() != parent:  # the supervisor is gone: do not linger as an orphan
                log.warning("worker %d: supervisor died, shutting down", index)
                break
    await drain(ctx, servers, config.server.drain_timeout, keep_idle=retire)
    committer.close()
    if ctx.notifier is not None:
        ctx.notifier.close()
    store.close()
    log.info(
        "worker %d (pid %d) stopped after accepting %d messages", index, os.getpid(), ctx.accepted
    )
    return 0


async def drain(
    ctx: WorkerContext, servers: list[asyncio.Server], timeout: float, keep_idle: bool = False
) -> None:
    """Stop accepting, let open transactions finish (bounded), then close every session.

    On shutdown idle sessions are told 421 at once; when the worker is only being
    replaced (``keep_idle``, after a reload) they may go on until they end.
    """
    for server in servers:
        server.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [s for s in ctx.sessions if keep_idle or not s.idle]
        for session in ctx.sessions - set(busy):
            session.shut_down(R.reply(421, "4.3.2", "Service shutting down"))
        if not busy and ctx.committer.idle:
            break
        await asyncio.sleep(0.05)
    for session in list(ctx.sessions):
        session.close()
    while not ctx.committer.idle and time.monotonic() < deadline + 5:
        await asyncio.sleep(0.01)


def run_worker(config: Config, index: int) -> int:
    """Entry point in the forked child."""
    # The commit thread sleeps in fsync and then needs the GIL back at once: with the
    # default 5 ms switch interval a busy event loop would make every commit wait that long.
    sys.setswitchinterval(0.0002)
    return uvloop.run(serve_worker(config, index))

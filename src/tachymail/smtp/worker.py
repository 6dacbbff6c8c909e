"""One SMTP worker process: a uvloop event loop serving every listener via SO_REUSEPORT.

The supervisor forks the workers; each opens its own queue environment after
the fork, accepts on its position's own socket per listener (bound by the
supervisor with SO_REUSEPORT and kept across reloads; the kernel spreads
connections across the positions' sockets), tells the supervisor once it is
listening, and runs until SIGTERM, when it stops accepting and lets open
transactions finish within the drain timeout (SIGUSR1, after a reload: its
sessions may run to their natural end).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import resource
import signal
import socket
import ssl
import sys
import time
import typing
from collections import Counter
from collections.abc import Sequence

import uvloop

from tachymail import metrics
from tachymail.auth.throttle import AUTH_FAILURES_DIR, AuthThrottle
from tachymail.auth.users import SenderOwnership, UsersFile
from tachymail.config import Config, ListenerConfig
from tachymail.dns import Resolver
from tachymail.imap.session import ImapSession
from tachymail.lmtp.session import LmtpSession
from tachymail.mailauth.dkim import DkimSigner
from tachymail.mailauth.inbound import InboundChecker
from tachymail.mailbox import ChangeNotifier, Directory, MailboxStore
from tachymail.mailbox.notify import DIRECTORY as MAILBOX_NOTIFY_DIRECTORY
from tachymail.net import reuseport_socket
from tachymail.pop3.session import Pop3Session
from tachymail.protocol import replies as R
from tachymail.queue.commit import GroupCommitter
from tachymail.queue.journal import JournalCommitter, journal_directory, replay_journals
from tachymail.queue.notify import Notifier
from tachymail.queue.store import MiB, QueueStore
from tachymail.queue.suppression import shared_list
from tachymail.smtp.session import SmtpSession
from tachymail.smtp.tls import server_context
from tachymail.smtp.verify import AddressVerifier
from tachymail.smtpclient.routing import Router

if typing.TYPE_CHECKING:
    from aiohttp import web

    from tachymail.queue.admin import Reporter

log = logging.getLogger(__name__)

#: a worker enters stress mode with this share of its connection slots open, and leaves it
#: below STRESS_OFF (the gap keeps it from flapping at the threshold)
STRESS_ON = 0.8
STRESS_OFF = 0.7

#: what a new worker writes to the supervisor's pipe once it accepts on every listener
LISTENING = b"listening\n"
#: listener roles served with implicit TLS (RFC 8314)
IMPLICIT_TLS_ROLES = ("smtps", "pop3s", "imaps")


class ServedSession(typing.Protocol):
    """What the worker's connection accounting and drain need of any front end's session
    (SMTP, LMTP, POP3)."""

    trusted: bool
    role: str
    peer_ip: str

    @property
    def idle(self) -> bool: ...

    def shut_down(self, reply: bytes) -> None: ...

    def close(self) -> None: ...

    def rearm_timer(self) -> None: ...


class WorkerContext:
    """What every session of one worker shares: configuration, queue, TLS, users, counters."""

    #: the mailbox store (LMTP, POP3, quota checks at RCPT) and its group committer, set by
    #: serve_worker once the event loop runs
    mailbox: MailboxStore
    mailbox_committer: GroupCommitter
    #: the mailbox store's change notification (IMAP IDLE and untagged updates subscribe
    #: to it); not ``notifier``, which is the queue's news for the delivery workers
    mailbox_notifier: ChangeNotifier

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
        # Recipients delivered here: resolved at RCPT (unknown ones refused: no backscatter).
        self.local_domains = config.local_delivery_domains
        self.directory = Directory(config)
        # Relay-domain recipients from untrusted clients are probed at RCPT when asked to.
        self.relay_domains = frozenset(d.lower() for d in policy.relay_domains)
        delivery = config.delivery
        # One resolver (and cache) per worker for every intake lookup: the inbound checks
        # and the recipient probes; [delivery] resolver (serve --resolver) names its server.
        self.resolver = Resolver(delivery.resolver or None, timeout=delivery.dns_timeout)
        self.verifier = (
            AddressVerifier(config, router=Router(config, self.resolver))
            if policy.verify_recipients
            else None
        )
        # SPF, DKIM, DMARC, ARC, iprev, DNSBL for listeners whose mailauth mode is not off.
        self.inbound = (
            InboundChecker(config, self.resolver)
            if any(listener.mailauth_mode != "off" for listener in config.listeners)
            else None
        )
        #: the Authentication-Results id: fields claiming it are removed from every message
        #: not checked here too (a trusted or authenticated client could forge them)
        self.authserv_id = config.mailauth.authserv_id or config.server.hostname
        self.users = UsersFile(config.users_path)
        auth = config.auth
        # AUTH failures are counted across every worker: one LMDB environment per node.
        self.auth_throttle = AuthThrottle(
            config.data_path / AUTH_FAILURES_DIR,
            max_per_ip=auth.max_failures_per_ip,
            max_per_user=auth.max_failures_per_user,
            lockout=auth.lockout,
            half_life=auth.failure_half_life,
        )
        #: the node's suppression list: checked at RCPT ([suppression] refuse_at_rcpt) and
        #: by HTTP injection; one LMDB environment shared by every process
        self.suppressions = shared_list(config.data_path)
        self.sender_ownership = SenderOwnership(auth.senders, null_sender=auth.null_sender)
        # Keys load once per worker; a missing key stops the worker with the keygen command.
        self.dkim = (
            DkimSigner(config.data_path, config.dkim.domains) if config.dkim.domains else None
        )
        # Newly queued ids go straight to the delivery workers (none while holding).
        self.notifier = (
            None if config.server.hold else Notifier(config.data_path, config.delivery.workers)
        )
        self.sessions: set[ServedSession] = set()
        self.per_ip: Counter[str] = Counter()
        # Connection limits are for the whole server; each worker takes its share, since
        # SO_REUSEPORT spreads connections evenly across the workers' sockets.
        workers = config.worker_count
        limits = config.limits
        self.max_connections = math.ceil(limits.max_connections / workers)
        self.max_per_ip = math.ceil(limits.max_connections_per_ip / workers)
        # Slots only trusted clients and submission/smtps may take; untrusted mx keeps one.
        self.reserved = min(math.ceil(limits.reserved / workers), self.max_connections - 1)
        self.stress_timeout = limits.stress_command_timeout
        # A session's timer wakes at least this often: a limit that starts after it was
        # armed (a partial line, DATA) is then caught on time without re-arming per input.
        self.recheck = min(
            (
                t
                for t in (
                    limits.command_timeout,
                    limits.data_timeout,
                    limits.command_deadline,
                    limits.data_deadline,
                    limits.data_rate_grace if limits.min_data_rate else 0.0,
                )
                if t > 0
            ),
            default=60.0,
        )
        self.stress = False
        self._stress_on = max(1, math.ceil(self.max_connections * STRESS_ON))
        self._stress_off = max(1, math.floor(self.max_connections * STRESS_OFF))
        self.accepted = 0
        self.tls_failures = 0
        self.auth_successes = 0
        self.auth_failures = 0
        #: HTTP injection requests under way (tachymail.http.inject): like open sessions,
        #: each may still add a message to the queue's next commit
        self.http_injections = 0
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

    def admit(self, session: ServedSession) -> str | None:
        """Count *session* in (``sessions``, per-IP counts) or say why not: None when
        admitted, else the metric reason ("max_connections" or "max_per_ip"), which the
        session turns into 421 4.7.0.

        Untrusted clients on mx listeners may not take the last ``reserved`` slots, so
        trusted networks and submission/smtps are still served in a flood. Trusted
        networks are exempt from the per-IP limit (as Postfix exempts $mynetworks), so a
        local load generator or relay is never throttled.
        """
        privileged = session.trusted or session.role != "mx"
        limit = self.max_connections if privileged else self.max_connections - self.reserved
        if len(self.sessions) >= limit:
            return "max_connections"
        ip = session.peer_ip
        if not session.trusted and self.per_ip[ip] >= self.max_per_ip:
            return "max_per_ip"
        self.per_ip[ip] += 1
        self.sessions.add(session)
        self._check_stress()
        return None

    def release(self, session: ServedSession) -> None:
        """Count *session* out; nothing for a session that was never admitted."""
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        ip = session.peer_ip
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]
        self._check_stress()

    def _check_stress(self) -> None:
        # Near the limit idle sessions get stress_timeout (Postfix's stress mode).
        open_now = len(self.sessions)
        if not self.stress and self.stress_timeout and open_now >= self._stress_on:
            self.stress = True
            metrics.m.smtp_stress.inc()
            log.warning(
                "stress mode started: %d of %d connections open; idle timeout now %gs",
                open_now,
                self.max_connections,
                self.stress_timeout,
            )
            for session in self.sessions:  # their timers may be set far ahead
                session.rearm_timer()
        elif self.stress and open_now < self._stress_off:
            self.stress = False
            metrics.m.smtp_stress.dec()
            log.warning(
                "stress mode ended: %d of %d connections open", open_now, self.max_connections
            )


def raise_open_files_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (every connection is a descriptor);
    returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:  # an unlimited hard limit still stops at the kernel's nr_open
            with open("/proc/sys/fs/nr_open") as nr_open:
                target = int(nr_open.read())
        except (OSError, ValueError):
            return soft, soft
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft, soft
        return soft, target
    return soft, soft


async def serve_worker(
    config: Config,
    index: int,
    sockets: Sequence[socket.socket] | None = None,
    ready_fd: int | None = None,
    reporter: Reporter | None = None,
) -> int:
    """Serve every listener until SIGTERM (drain) or SIGUSR1 (retire); returns the exit code.

    *sockets*: one listening socket per configured listener, in order, which the
    supervisor binds once and hands to each generation of workers (so a reload never
    leaves a port without a listener); None binds fresh SO_REUSEPORT sockets (a worker
    run on its own, as the perf check does). *ready_fd*: a pipe to which ``listening`` is
    written once every listener accepts, then closed. *reporter*: the bounce report builder
    of the HTTP API's queue bounce (the supervisor's; None: that endpoint answers 503).
    """
    loop = asyncio.get_running_loop()
    before, files = raise_open_files_limit()
    log.info("worker %d: open files limit %d (was %d)", index, files, before)
    if files < math.ceil(config.limits.max_connections / config.worker_count) + 100:
        log.warning(
            "worker %d: open files limit %d is below its share of limits.max_connections; "
            "raise the hard limit (ulimit -Hn, LimitNOFILE=)",
            index,
            files,
        )
    inline = config.queue.commit == "inline"
    store = QueueStore(
        config.data_path / "queue",
        map_size=config.queue.map_size_mb * MiB,
        max_map_size=config.queue.max_map_size_mb * MiB,
        # one sync per LMDB commit: in journal mode the journal is the durable copy (see
        # JournalCommitter); inline, a batch waits for the next sync (GroupCommitter chain)
        metasync=config.queue.commit == "thread",
    )
    # A predecessor's journal (a crashed worker of journal mode): into LMDB first.
    replay_journals(store, journal_directory(config.data_path))
    committer: GroupCommitter
    if config.queue.commit == "journal":
        committer = JournalCommitter(
            store, journal_directory(config.data_path), max_batch=config.queue.max_batch
        )
    else:
        committer = GroupCommitter(
            store,
            max_batch=config.queue.max_batch,
            linger=config.queue.commit_linger_ms / 1000 if inline else 0.0,
            inline=inline,
            chain=inline,  # the store above is opened without metasync for it
            slide=True,  # time spent checking a message is not taken from the window
        )
    tls = server_context(config)
    ctx = WorkerContext(config, loop, committer, tls)
    if isinstance(committer, JournalCommitter):
        # delivery hears of a journaled message once it is in LMDB, not before
        committer.attach_notifier(ctx.notifier)
    # A lone client, or every client already waiting for this commit: nobody can join it,
    # so it starts at once instead of lingering (one session would otherwise wait 1 ms
    # per message for company that never comes).
    committer.more_may_join = lambda pending: len(ctx.sessions) + ctx.http_injections > pending
    # One mailbox environment per process (never across a fork), committed like intake
    # ([mailbox] commit): an LMTP 250 or a POP3 deletion waits for its synced batch.
    mailbox = MailboxStore(
        config.mailbox_path,
        map_size=config.mailbox.map_size_mb * MiB,
        max_map_size=config.mailbox.max_map_size_mb * MiB,
    )
    ctx.mailbox = mailbox
    # Every commit of this process (LMTP, POP3, IMAP) wakes the sessions of the users it
    # changed, here and in every other process (IDLE sees new mail at once).
    ctx.mailbox_notifier = ChangeNotifier(config.data_path / MAILBOX_NOTIFY_DIRECTORY)
    ctx.mailbox_notifier.start(loop)
    mailbox.on_commit = ctx.mailbox_notifier.publish
    mailbox_inline = config.mailbox.commit == "inline"
    ctx.mailbox_committer = GroupCommitter(
        mailbox,
        max_batch=config.mailbox.max_batch,
        linger=config.mailbox.commit_linger_ms / 1000 if mailbox_inline else 0.0,
        inline=mailbox_inline,
        observe=False,
    )
    servers = []
    http_runners: list[web.AppRunner] = []
    for position, listener in enumerate(config.listeners):
        if listener.role == "http":
            sock = sockets[position] if sockets is not None else None
            http_runners.append(await serve_http(ctx, listener, sock, reporter))
            continue
        implicit = listener.role in IMPLICIT_TLS_ROLES
        role = listener.role
        mailauth = listener.mailauth_mode

        def factory(
            role: str = role, implicit: bool = implicit, mailauth: str = mailauth
        ) -> asyncio.Protocol:
            if role in ("pop3", "pop3s"):
                return Pop3Session(ctx, role, implicit)
            if role in ("imap", "imaps"):
                return ImapSession(ctx, role, implicit)
            if role == "lmtp":
                return LmtpSession(ctx, role)  # LMTP carries mail already checked: no mailauth
            return SmtpSession(ctx, role, implicit, mailauth if ctx.inbound else "off")

        servers.append(
            await loop.create_server(
                factory,
                sock=(
                    sockets[position]
                    if sockets is not None
                    else reuseport_socket(listener.host, listener.port)
                ),
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
    # What exists now (modules, configuration, stores, the public suffix list, TLS) lives as
    # long as the process: frozen, no full collection walks it again. Unfrozen, each one
    # stopped a busy worker's loop for 70-90 ms: the p99 of accept-to-delivery latency.
    gc.collect()
    gc.freeze()
    if ready_fd is not None:
        report_listening(ready_fd)
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
    # A held node runs no delivery worker 0 to share the lists (tachymail.cluster.replication):
    # worker 0 shares the suppression list its RCPT checks read; suspensions wait for delivery.
    replicating = None
    if index == 0 and config.server.hold and config.cluster.redis:
        from tachymail.cluster.replication import replicate  # redis: only for a cluster

        replicating = loop.create_task(replicate(config, None, stop))
    parent = os.getppid()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except TimeoutError:
            metrics.flush()  # the hot-path tallies reach /metrics within about a second
            if os.getppid() != parent:  # the supervisor is gone: do not linger as an orphan
                log.warning("worker %d: supervisor died, shutting down", index)
                break
    # The HTTP API's requests in flight finish beside the SMTP sessions (runner.cleanup
    # waits for them up to the drain timeout), while the committer still runs.
    await asyncio.gather(
        drain(ctx, servers, config.server.drain_timeout, keep_idle=retire),
        *(runner.cleanup() for runner in http_runners),
    )
    if replicating is not None:  # what it did not push stays in the outbox for the next start
        stop.set()  # also when the loop above ended because the supervisor died
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(replicating, 5.0)
    while not ctx.mailbox_committer.idle:  # an LMTP batch still lingering: let it commit
        await asyncio.sleep(0.01)
    ctx.mailbox_committer.close()
    mailbox.on_commit = None
    ctx.mailbox_notifier.close()
    if ctx.inbound is not None:
        ctx.inbound.flush()  # the DMARC aggregate data still buffered
    mailbox.close()
    committer.close()
    if ctx.notifier is not None:
        ctx.notifier.close()
    if ctx.verifier is not None:
        ctx.verifier.close()
    store.close()
    log.info(
        "worker %d (pid %d) stopped after accepting %d messages", index, os.getpid(), ctx.accepted
    )
    return 0


async def serve_http(
    ctx: WorkerContext,
    listener: ListenerConfig,
    sock: socket.socket | None,
    reporter: Reporter | None,
) -> web.AppRunner:
    """Serve the HTTP API (tachymail.http.server) on *listener*'s socket *sock* (None: bind
    one), with TLS when the listener says ``tls = true``; returns the runner to clean up."""
    from aiohttp import web

    from tachymail.http.server import build_app, protocol_logger

    runner = web.AppRunner(
        build_app(ctx, reporter),
        handle_signals=False,
        access_log=None,  # the application logs each request itself, with its token name
        logger=protocol_logger(),
        shutdown_timeout=ctx.config.server.drain_timeout,
    )
    await runner.setup()
    site = web.SockSite(
        runner,
        sock if sock is not None else reuseport_socket(listener.host, listener.port),
        ssl_context=ctx.tls_context if listener.tls else None,
    )
    await site.start()
    return runner


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


def report_listening(fd: int) -> None:
    """Write ``listening`` to the supervisor's pipe *fd* and close it; a supervisor that
    stopped waiting (closed its end) is not an error."""
    try:
        os.write(fd, LISTENING)
    except OSError as exc:
        log.debug("could not report listening: %s", exc)
    finally:
        os.close(fd)


def run_worker(
    config: Config,
    index: int,
    sockets: Sequence[socket.socket] | None = None,
    ready_fd: int | None = None,
    reporter: Reporter | None = None,
) -> int:
    """Entry point in the forked child (see :func:`serve_worker` for the arguments)."""
    # The commit thread sleeps in fsync and then needs the GIL back at once: with the
    # default 5 ms switch interval a busy event loop would make every commit wait that long.
    sys.setswitchinterval(0.0002)
    if sockets is None and ready_fd is None:
        # The two-argument call, which the perf check's wrapper of serve_worker expects.
        return uvloop.run(serve_worker(config, index))
    return uvloop.run(serve_worker(config, index, sockets, ready_fd, reporter))

"""One destination's pool of persistent SMTP connections, with adaptive concurrency.

Each connection is a runner task that takes transactions from the pool's queue
until the queue stays empty for ``idle_timeout``. The pool opens connections up
to its current concurrency, which starts at ``initial_connections`` and grows by
one per successful transaction up to ``max_connections`` (slow start). Trouble with
the destination halves it and paces the pool with a back-off, as Postfix's
scheduler does: connection-level trouble at once (no connection, a 4xx greeting, a
TLS failure, a 421 to any command, a 4xx to MAIL, a connection lost mid-transaction),
and temporary failures only when they run across ``RECIPIENT_RUN`` distinct
recipients with no message accepted between. One mailbox's 4xx (a full mailbox,
greylisting of one sender) defers that recipient only. Connection failures move on
to the next MX host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from tachymail.cluster.limits import Rate, Slots
from tachymail.config import PoolConfig
from tachymail.delivery.eightbit import downgrade
from tachymail.dns.resolver import Resolver, TemporaryDnsError
from tachymail.metrics import m
from tachymail.queue.envelope import Recipient
from tachymail.smtpclient.client import (
    PendingData,
    ReplyError,
    SmtpClientError,
    SmtpConnection,
    TlsPolicyError,
    TransactionResult,
)
from tachymail.smtpclient.routing import NextHop, OwnEndpoints

log = logging.getLogger(__name__)

DELIVERED, DEFERRED, FAILED = "delivered", "deferred", "failed"
TROUBLE_RUN = 3  # temporary failures in a row that count as trouble
#: distinct recipients deferred in a row (no message accepted between) that count as
#: trouble with the destination; one mailbox deferred again and again never does
RECIPIENT_RUN = 5
_RUN_MEMORY = 1000  # distinct addresses remembered per run: enough to know it is long
MAX_PACE = 10.0  # seconds between transactions at worst


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one recipient in one attempt."""

    kind: str  # DELIVERED, DEFERRED or FAILED
    code: int
    status: str
    text: str

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}".strip()


@dataclass(slots=True)
class Job:
    """One transaction to send: a message to some of its recipients at one destination."""

    sender: str
    mail_params: dict[str, str]
    recipients: list[Recipient]
    content: bytes
    eight_bit: bool
    future: asyncio.Future[JobResult]
    #: made due by `tachymail queue flush`: the first such job skips the pace (see _wait_turn)
    flushed: bool = False


@dataclass(slots=True)
class JobResult:
    outcomes: list[Outcome]
    remote_host: str = ""
    remote_ip: str = ""
    tls: str = ""
    #: no connection could be made: always trouble for the pool
    connect_failed: bool = False
    #: trouble with the session rather than with the recipients (a 4xx to MAIL, the
    #: connection lost): slows the pool like a failed connection
    session_failed: bool = False
    #: the next hop advertised DSN, so NOTIFY, ORCPT, RET and ENVID went with the message
    #: and its success is the next hop's to report (RFC 3461 §5.2.1)
    dsn: bool = False


class NextHopDnsError(SmtpClientError):
    """No host of the next hop could be tried because the DNS failed temporarily: the
    recipients are deferred with 451 4.4.3 (RFC 3463: directory server failure)."""


class RoutingLoop(SmtpClientError):
    """The next hop (before any better one answered) is ourselves: the recipients bounce
    with ``554 5.4.6 mail for DOMAIN loops back to myself``, as Postfix says, instead of
    the message going round until its hop count runs out."""


def all_outcomes(job: Job, outcome: Outcome, conn: SmtpConnection | None = None) -> JobResult:
    result = JobResult([outcome] * len(job.recipients))
    if conn is not None:
        result.remote_host, result.remote_ip, result.tls = conn.host, conn.address, conn.tls_version
    return result


def classify(code: int, text: str, status_fallback: str) -> Outcome:
    kind = DELIVERED if code // 100 == 2 else DEFERRED if code // 100 == 4 else FAILED
    head = text.split(" ", 1)[0]
    parts = head.split(".")
    status = head if len(parts) == 3 and all(p.isdigit() for p in parts) else status_fallback
    return Outcome(kind, code, status, text)


def xtext(value: str) -> str:
    """RFC 3461 §4 xtext: "+" and "=" and anything outside ! to ~ as +XX."""
    return "".join(
        c if "!" <= c <= "~" and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
        for c in value
    )


@dataclass(slots=True)
class DeliveryPool:
    """Connections to one destination (see the module docstring)."""

    hop: NextHop
    limits: PoolConfig
    resolver: Resolver
    jobs: deque[Job] = field(default_factory=deque)
    runners: int = 0
    idle: deque[asyncio.Future[None]] = field(default_factory=deque)
    concurrency: int = 1
    trouble: int = 0
    #: distinct recipients deferred since a message was last accepted (lower-cased)
    deferred_run: set[str] = field(default_factory=set)
    pace: float = 0.0
    next_send: float = 0.0
    #: when a flushed job last went without waiting for the pace (see _wait_turn)
    flush_pass: float = 0.0
    tokens: float = 0.0
    last_refill: float = 0.0
    #: counters for metrics and tests
    connections_opened: int = 0
    transactions: int = 0
    #: connections open now (the destination status of tachymail.delivery.destinations)
    open_connections: int = 0
    #: our own listeners: a next hop among them is a mail loop (None: not checked)
    own: OwnEndpoints | None = None
    #: shaping budgets this pool draws on (tachymail.delivery.shaping): a message waits for
    #: each rate, a connection for each slot (a rule's, its egress source's)
    rates: tuple[Rate, ...] = ()
    slots: tuple[Slots, ...] = ()
    loop: asyncio.AbstractEventLoop = field(init=False)

    def __post_init__(self) -> None:
        # Kept, not asked for per job: asyncio.get_running_loop() makes a getpid call.
        self.loop = asyncio.get_running_loop()
        self.concurrency = max(1, min(self.limits.initial_connections, self.limits.max_connections))
        self.tokens = max(1.0, self.limits.rate)
        self.last_refill = time.monotonic()

    def submit(self, job: Job) -> None:
        self.jobs.append(job)
        while self.idle:
            waiter = self.idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        # A new connection only when the busy ones have a job each waiting already: a
        # connection with a queue pipelines (one write per message, see
        # tachymail.smtpclient.client), and a busy one takes its next job within a round trip.
        if self.runners < self.concurrency and len(self.jobs) > self.runners:
            self.runners += 1
            self.loop.create_task(self._runner())

    async def _take(self, connected: bool) -> Job | None:
        if not connected:
            return None
        deadline = time.monotonic() + self.limits.idle_timeout
        while not self.jobs:
            # Another runner may take the job we were woken for: then wait on, not close.
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.runners > self.concurrency:
                return None  # idle too long, or one too many since the pool shrank
            for slots in self.slots:
                if slots.contended:
                    # another node waits for the slot this idle connection holds: this one
                    # closes for it, the others stay until a renewal says more wait
                    slots.contended = False
                    return None
            waiter: asyncio.Future[None] = self.loop.create_future()
            self.idle.append(waiter)
            try:
                # With connection budgets, look again every second whether others wait.
                await asyncio.wait_for(waiter, min(remaining, 1.0) if self.slots else remaining)
            except TimeoutError:
                continue
        return self.jobs.popleft()

    async def _wait_turn(self, job: Job, pending: list[Rate] | None = None) -> None:
        """Rate limit (token bucket) and the back-off pace after trouble.

        The first job `queue flush` made due goes without waiting for the pace (the
        operator asks for an attempt now, as Postfix's flush does for a throttled
        destination); later ones within one pace interval wait their turn.
        """
        now = time.monotonic()
        if self.pace and self.next_send > now:
            if job.flushed and now - self.flush_pass >= self.pace:
                self.flush_pass = now
            else:
                await asyncio.sleep(self.next_send - now)
        self.next_send = time.monotonic() + self.pace
        for budget in pending or ():
            if await budget.take():  # counted only when it had to wait
                m.shaping_waits.labels(budget.rule).inc()
        rate = self.limits.rate
        if rate > 0:
            while True:
                now = time.monotonic()
                self.tokens = min(max(1.0, rate), self.tokens + (now - self.last_refill) * rate)
                self.last_refill = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await asyncio.sleep((1 - self.tokens) / rate)

    async def _runner(self) -> None:
        conn: SmtpConnection | None = None
        # The job whose content waits in the connection, to go out in one write with the
        # next job's commands (see tachymail.smtpclient.client).
        inflight: tuple[Job, PendingData] | None = None
        yielded = False
        try:
            while True:
                # The common case under load, a job waiting and no limit to observe, costs
                # no coroutine: this loop runs once per message.
                if self.jobs:
                    job: Job | None = self.jobs.popleft()
                elif inflight is not None and conn is not None:
                    if not yielded:
                        # Jobs of the same burst may still be on their way from their
                        # tasks: one turn of the loop lets them reach the queue.
                        yielded = True
                        await asyncio.sleep(0)
                        continue
                    # Nothing to send with it: finish the message under way now.
                    self._complete(inflight[0], await self._finish(conn, *inflight))
                    inflight = None
                    continue
                else:
                    job = await self._take(conn is not None and conn.usable)
                if job is None:
                    break
                yielded = False
                # Budgets that do not bind now are taken without waiting, and the message
                # goes out pipelined with the one under way; only a binding one makes it wait.
                pending = [r for r in self.rates if not r.try_take()] if self.rates else None
                waits = self.pace or self.limits.rate > 0 or pending
                renew = (
                    conn is None
                    or not conn.usable
                    or (conn.messages >= self.limits.max_messages_per_connection)
                )
                if inflight is not None and conn is not None and (waits or renew):
                    self._complete(inflight[0], await self._finish(conn, *inflight))
                    inflight = None
                if waits:
                    await self._wait_turn(job, pending)
                if renew:
                    if conn is not None:
                        self.loop.create_task(conn.quit())
                        m.outbound_connections_open.dec()
                        self.open_connections -= 1
                        conn = None
                        self._release()
                    try:
                        await self._acquire()
                    except BaseException:
                        self.jobs.appendleft(job)  # cancelled while waiting: not lost
                        raise
                    try:
                        conn = await self._connect()
                    except SmtpClientError as exc:
                        self._release()
                        if not isinstance(exc, RoutingLoop):  # no connection was tried
                            m.outbound_connection_failures.inc()
                        self._complete(job, self._connect_failure(job, exc))
                        if self.runners > self.concurrency:
                            break
                        continue
                    m.outbound_connections_open.inc()
                    self.open_connections += 1
                elif conn is not None and conn.messages:
                    m.outbound_connections_reused.inc()
                assert conn is not None
                started = await self._start(conn, job)
                if inflight is not None:
                    # Its final reply came before the replies just read.
                    self._complete(inflight[0], await self._finish(conn, *inflight))
                    inflight = None
                if isinstance(started, PendingData):
                    inflight = (job, started)
                else:
                    self._complete(job, started)
                if self.runners > self.concurrency:
                    # Shrink after trouble: the message under way is finished first.
                    if inflight is not None:
                        self._complete(inflight[0], await self._finish(conn, *inflight))
                        inflight = None
                    break
        finally:
            self.runners -= 1
            if inflight is not None and not inflight[0].future.done():
                # Only on cancellation (shutdown): the message stays queued, and the
                # connection is dropped rather than closed with QUIT, which would send its
                # unsent content first and deliver what is recorded as not delivered.
                lost = Outcome(DEFERRED, 451, "4.4.2", "delivery interrupted before the reply")
                inflight[0].future.set_result(all_outcomes(inflight[0], lost, conn))
                if conn is not None:
                    conn.abort()
            if conn is not None:
                self.loop.create_task(conn.quit())
                m.outbound_connections_open.dec()
                self.open_connections -= 1
                self._release()
            # Jobs left behind by a shrinking runner still need one to carry them.
            if self.jobs and self.runners == 0:
                self.runners += 1
                self.loop.create_task(self._runner())

    async def _acquire(self) -> None:
        """A slot of each connection budget, in order (every pool takes them in the same
        order, rule before source, so two pools never wait for each other's)."""
        for taken, slots in enumerate(self.slots):
            try:
                if await slots.acquire():
                    m.shaping_waits.labels(slots.rule).inc()
            except BaseException:
                for held in self.slots[:taken]:
                    held.release()
                raise

    def _release(self) -> None:
        for slots in self.slots:
            slots.release()

    def _complete(self, job: Job, result: JobResult) -> None:
        """Hand *job* its result and let the outcome steer the pool's concurrency."""
        if not job.future.done():
            job.future.set_result(result)
        if (
            result.connect_failed
            or result.session_failed
            or any(o.code == 421 for o in result.outcomes)
        ):
            self._feedback(False, trouble=True)
            return
        deferred = [
            rcpt.address.lower()
            for rcpt, outcome in zip(job.recipients, result.outcomes, strict=False)
            if outcome.kind == DEFERRED
        ]
        if len(deferred) < len(result.outcomes):
            self.deferred_run.clear()  # the destination accepts (or refuses) mail: no run
        if not deferred:
            self._feedback(True, trouble=False)
            return
        for address in deferred[: _RUN_MEMORY - len(self.deferred_run)]:
            self.deferred_run.add(address)
        self._feedback(False, trouble=len(self.deferred_run) >= RECIPIENT_RUN)

    def _feedback(self, success: bool, trouble: bool) -> None:
        if success:
            self.trouble = 0
            self.pace = self.pace / 2 if self.pace > 0.01 else 0.0
            if self.concurrency < self.limits.max_connections:
                self.concurrency += 1
            return
        if trouble:
            self.trouble += 1
            if self.trouble >= TROUBLE_RUN or (self.trouble == 1 and self.pace == 0):
                halved = max(1, self.concurrency // 2)
                if halved < self.concurrency:
                    log.info(
                        "destination %s in trouble: concurrency %d -> %d",
                        self.hop.key,
                        self.concurrency,
                        halved,
                    )
                self.concurrency = halved
                self.pace = min(max(self.pace * 2, 0.1), MAX_PACE)
                # Idle runners beyond the new concurrency close their connections now (a
                # woken runner finding no job and no room ends; see _take).
                excess = self.runners - self.concurrency
                while excess > 0 and self.idle:
                    waiter = self.idle.popleft()
                    if not waiter.done():
                        waiter.set_result(None)
                        excess -= 1

    async def _addresses(self, host: str) -> list[str]:
        # A bare IP (a route or smarthost "127.0.0.1:25") needs no DNS; the resolver handles
        # bracketed address literals and names.
        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            pass
        return await self.resolver.addresses(host)

    async def _connect(self) -> SmtpConnection:
        """The first host (and address) of the next hop that lets us in."""
        errors: list[str] = []
        last: SmtpClientError | None = None
        dns_trouble = False
        own, port = self.own, self.hop.port
        looped = ""
        for host in self.hop.hosts:
            if own is not None and own.is_own_name(host, port):
                looped = host
                break
            try:
                addresses = await self._addresses(host)
            except TemporaryDnsError as exc:
                dns_trouble = True
                errors.append(f"{host}: {exc}")
                continue
            if not addresses:
                errors.append(f"{host}: no address")
                continue
            if own is not None and any(own.is_own(a, port) for a in addresses):
                looped = host
                break
            for address in addresses:
                try:
                    conn = await SmtpConnection.open(
                        host, address, self.hop.port, self.hop.settings
                    )
                except SmtpClientError as exc:
                    last = exc
                    errors.append(str(exc))
                    continue
                self.connections_opened += 1
                m.outbound_connections.inc()
                return conn
        if looped:
            # Ourselves and any less preferred host are never tried (as Postfix drops the
            # MX records from its own on): a loop unless a better host failed first.
            log.warning("next hop %s:%d of %s is this server", looped, port, self.hop.key)
            if not errors:
                raise RoutingLoop(f"{looped}:{port} is this server")
        if isinstance(last, ReplyError) and len(self.hop.hosts) == 1:
            raise last
        if dns_trouble and last is None:
            raise NextHopDnsError("; ".join(errors))
        raise SmtpClientError("; ".join(errors) or "no host to connect to")

    def _connect_failure(self, job: Job, exc: SmtpClientError) -> JobResult:
        if isinstance(exc, RoutingLoop):
            domain = job.recipients[0].address.rpartition("@")[2] if job.recipients else ""
            text = f"5.4.6 mail for {domain} loops back to myself ({exc})"
            return all_outcomes(job, Outcome(FAILED, 554, "5.4.6", text))
        if isinstance(exc, TlsPolicyError):
            outcome = Outcome(DEFERRED, exc.reply.code, exc.reply.status, exc.reply.text)
        elif isinstance(exc, NextHopDnsError):
            outcome = Outcome(DEFERRED, 451, "4.4.3", f"4.4.3 DNS lookup failed: {exc}")
        elif isinstance(exc, ReplyError) and exc.reply.code // 100 == 5 and exc.step != "greeting":
            outcome = classify(exc.reply.code, exc.reply.text, "5.0.0")
        elif isinstance(exc, ReplyError):
            outcome = Outcome(DEFERRED, exc.reply.code, exc.reply.status or "4.4.1", str(exc))
        else:
            outcome = Outcome(DEFERRED, 451, "4.4.1", str(exc))
        result = all_outcomes(job, outcome)
        result.connect_failed = True
        return result

    async def _start(self, conn: SmtpConnection, job: Job) -> JobResult | PendingData:
        """Start *job* on *conn*: its result, or the pending final reply after a 354."""
        extensions = conn.extensions
        params = job.mail_params
        content = job.content
        if "SMTPUTF8" in params and "SMTPUTF8" not in extensions:
            refusal = Outcome(FAILED, 553, "5.6.7", "5.6.7 the next hop does not support SMTPUTF8")
            return all_outcomes(job, refusal, conn)
        if "REQUIRETLS" in params and (not conn.tls_version or "REQUIRETLS" not in extensions):
            refusal = Outcome(
                FAILED, 550, "5.7.10", "5.7.10 REQUIRETLS not supported by the next hop"
            )
            return all_outcomes(job, refusal, conn)
        eight_bit = job.eight_bit
        if eight_bit and "8BITMIME" not in extensions:
            converted = downgrade(content)
            if converted is None:
                refusal = Outcome(
                    FAILED, 554, "5.6.3", "5.6.3 8-bit message cannot be converted for a 7-bit peer"
                )
                return all_outcomes(job, refusal, conn)
            content, eight_bit = converted, False
        mail = ""
        if "SIZE" in extensions:
            mail += f" SIZE={len(content)}"
        if eight_bit:
            mail += " BODY=8BITMIME"
        if "SMTPUTF8" in params:
            mail += " SMTPUTF8"
        if "REQUIRETLS" in params:
            mail += " REQUIRETLS"
        dsn = "DSN" in extensions
        if dsn and "RET" in params:
            mail += f" RET={params['RET']}"
        if dsn and "ENVID" in params:
            mail += f" ENVID={xtext(params['ENVID'])}"
        rcpts = []
        for rcpt in job.recipients:
            extra = ""
            if dsn and "NOTIFY" in rcpt.params:
                extra += f" NOTIFY={rcpt.params['NOTIFY']}"
            if dsn and "ORCPT" in rcpt.params:
                kind, _, address = rcpt.params["ORCPT"].partition(";")
                extra += f" ORCPT={kind};{xtext(address)}"
            rcpts.append((rcpt.address, extra))
        self.transactions += 1
        try:
            started = await conn.start(job.sender, mail, rcpts, content)
        except SmtpClientError as exc:
            conn.abort()
            return self._lost(job, exc, conn)
        if isinstance(started, PendingData):
            return started
        return self._outcomes(job, started, conn)

    async def _finish(self, conn: SmtpConnection, job: Job, pending: PendingData) -> JobResult:
        try:
            result = await conn.finish(pending)
        except SmtpClientError as exc:
            conn.abort()
            return self._lost(job, exc, conn)
        return self._outcomes(job, result, conn)

    @staticmethod
    def _lost(job: Job, exc: SmtpClientError, conn: SmtpConnection) -> JobResult:
        """The connection broke or timed out mid-transaction: every recipient is deferred
        with ``451 4.4.2`` and the destination counts as in trouble."""
        result = all_outcomes(job, Outcome(DEFERRED, 451, "4.4.2", str(exc)), conn)
        result.session_failed = True
        return result

    @staticmethod
    def _outcomes(job: Job, result: TransactionResult, conn: SmtpConnection) -> JobResult:
        out = JobResult([], conn.host, conn.address, conn.tls_version)
        out.dsn = "DSN" in conn.extensions
        if result.mail.code // 100 != 2:
            outcome = classify(
                result.mail.code, result.mail.text, "4.0.0" if result.mail.code < 500 else "5.0.0"
            )
            out.outcomes = [outcome] * len(job.recipients)
            out.session_failed = outcome.kind == DEFERRED  # the server, not a mailbox, is busy
            return out
        for reply in result.rcpts:
            if reply.code // 100 != 2:
                fallback = "4.0.0" if reply.code < 500 else "5.1.1"
                out.outcomes.append(classify(reply.code, reply.text, fallback))
            elif result.data is None:
                out.outcomes.append(Outcome(DEFERRED, 451, "4.3.0", "no final reply"))
            else:
                data = result.data
                fallback = "2.0.0" if data.code < 400 else "4.0.0" if data.code < 500 else "5.0.0"
                out.outcomes.append(classify(data.code, data.text, fallback))
        return out

"""Recipient verification for relay domains: a probe to the next hop, with a shared cache.

With ``policy.verify_recipients`` the SMTP front end asks, at RCPT, whether the next hop of
a relay domain would take the address, as Postfix's ``reject_unverified_recipient`` does.
A probe connects to the hop delivery would use (a ``[[route]]``, the smarthost or the MX
hosts, through :class:`~tachymail.smtpclient.routing.Router`) and says EHLO, ``MAIL FROM:<>``
(or ``policy.verify_sender``), ``RCPT TO:<address>``, RSET and QUIT: never DATA.

Results, each one of :data:`DELIVERABLE` (a 2xx to RCPT), :data:`UNDELIVERABLE` (a 5xx to
RCPT, or a domain that cannot receive mail: NXDOMAIN, null MX) and :data:`UNVERIFIED`
(a 4xx, no connection, a refused probe sender, a timeout: nothing is known about the
address), are cached for ``verify_positive_ttl``, ``verify_negative_ttl`` and
``verify_tempfail_ttl`` seconds in an LMDB environment in ``data_dir/verify`` that every
SMTP worker of the node opens after the fork, so an address is probed once per node
however the kernel spreads the clients. Within a worker, sessions asking for an address
whose probe is under way join it; two workers may each probe an address once at the same
moment. A probe may take up to ``PROBE_TIME_FACTOR`` times ``verify_timeout``: a client
gives up waiting after ``verify_timeout`` (450 4.1.1), and the probe's result is cached
for its retry (Postfix's "address verification in progress").

Cache reads and writes run on the event loop: an LMDB read is a lookup in mapped memory,
and a write (no fsync: a lost result only costs a probe) takes microseconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import lmdb

from tachymail.config import Config
from tachymail.dns.resolver import Resolver, TemporaryDnsError
from tachymail.lmdbenv import delete_where, open_side_store
from tachymail.metrics import m
from tachymail.smtpclient.client import SmtpClientError, SmtpConnection
from tachymail.smtpclient.routing import NextHop, Router, RoutingFailure

log = logging.getLogger(__name__)

DELIVERABLE = "deliverable"
UNDELIVERABLE = "undeliverable"
UNVERIFIED = "unverified"
_KINDS = (DELIVERABLE, UNDELIVERABLE, UNVERIFIED)
#: a probe may run this many times ``verify_timeout`` before it counts as unverified
PROBE_TIME_FACTOR = 3
#: the environment's map (sparse on disk): some hundred thousand cached results
MAP_SIZE = 128 * 1024 * 1024
#: the cache's environment, in data_dir
VERIFY_DIR = "verify"
#: cache writes between sweeps of expired results (run off the loop)
SWEEP_EVERY = 4096
#: longest next-hop text kept (our reply line must stay within 512 octets with it)
DETAIL_LIMIT = 300
# expiry (epoch), kind (index in _KINDS); then "status\0detail" in UTF-8
_RECORD = struct.Struct("<dB")


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What a probe found: ``kind`` is one of DELIVERABLE, UNDELIVERABLE, UNVERIFIED;
    ``status`` the RFC 3463 code for our refusal (5.1.1 for a refused RCPT, or the routing
    failure's); ``detail`` says why in words fit for a reply line (printable, bounded)."""

    kind: str
    status: str = ""
    detail: str = ""


def _printable(text: str) -> str:
    # The next hop's text goes into our reply line: no CR/LF, nothing unprintable, bounded.
    clean = "".join(c if c.isprintable() else " " for c in text)
    return clean[:DETAIL_LIMIT]


def cache_key(address: str) -> bytes:
    """The cache's key of *address*: the domain is case-insensitive, the local part is not
    (RFC 5321 §2.4); hashed to a fixed size whatever the address's length."""
    local, at, domain = address.rpartition("@")
    canonical = f"{local}{at}{domain.lower()}".encode("utf-8", "surrogateescape")
    return hashlib.blake2b(canonical, digest_size=16).digest()


class VerifyCache:
    """Probe results in the LMDB environment at *path* (created if missing), shared by
    every process of a node; *clock* gives epoch seconds (the processes must share it)."""

    def __init__(
        self,
        path: Path,
        ttls: dict[str, float],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.env = open_side_store(path, MAP_SIZE)
        self.ttls = ttls
        self.clock = clock
        self._writes = 0

    def close(self) -> None:
        self.env.close()

    def get(self, address: str) -> ProbeResult | None:
        """The cached result for *address*, or None when there is none or it expired."""
        with self.env.begin() as txn:
            raw = txn.get(cache_key(address))
            if raw is None:
                return None
            raw = bytes(raw)
        expires, kind = _RECORD.unpack_from(raw)
        if expires <= self.clock() or kind >= len(_KINDS):
            return None
        status, _, detail = raw[_RECORD.size :].decode("utf-8", "replace").partition("\0")
        return ProbeResult(_KINDS[kind], status, detail)

    def put(self, address: str, result: ProbeResult) -> bool:
        """Keep *result* for its kind's TTL (a TTL of 0 keeps nothing); False when the map
        is full (a sweep is due: see :meth:`sweep_due`)."""
        ttl = self.ttls.get(result.kind, 0.0)
        if ttl <= 0:
            return True
        record = _RECORD.pack(self.clock() + ttl, _KINDS.index(result.kind))
        record += f"{result.status}\0{result.detail}".encode()
        self._writes += 1
        try:
            with self.env.begin(write=True) as txn:
                txn.put(cache_key(address), record)
        except lmdb.MapFullError:
            return False
        return True

    @property
    def sweep_due(self) -> bool:
        return self._writes % SWEEP_EVERY == 0

    def sweep(self) -> int:
        """Remove the expired results; how many went. Blocking: run it off the loop."""
        now = self.clock()
        return delete_where(self.env, lambda value: _RECORD.unpack_from(value)[0] <= now)


class AddressVerifier:
    """Probes and their cache for one SMTP worker process (one event loop).

    :meth:`cached` answers from the cache without waiting; :meth:`probe` starts a probe (or
    joins the one under way for the same address) and gives a future that never fails: any
    trouble is an UNVERIFIED result. A finished probe is cached and counted in
    ``tachymail_address_probes_total`` by result.
    """

    def __init__(
        self,
        config: Config,
        cache: VerifyCache | None = None,
        router: Router | None = None,
    ) -> None:
        policy, delivery = config.policy, config.delivery
        self.sender = policy.verify_sender
        self.timeout = policy.verify_timeout
        self.cache = cache or VerifyCache(
            config.data_path / VERIFY_DIR,
            {
                DELIVERABLE: policy.verify_positive_ttl,
                UNDELIVERABLE: policy.verify_negative_ttl,
                UNVERIFIED: policy.verify_tempfail_ttl,
            },
        )
        if router is None:
            resolver = Resolver(delivery.resolver or None, timeout=delivery.dns_timeout)
            router = Router(config, resolver)
        self.router = router
        self._inflight: dict[bytes, asyncio.Task[ProbeResult]] = {}
        self._closing: set[asyncio.Task[None]] = set()  # QUITs under way (kept from the GC)
        self._sweeping: asyncio.Future[None] | None = None

    def close(self) -> None:
        for task in self._inflight.values():
            task.cancel()
        if self._sweeping is None or self._sweeping.done():
            self.cache.close()  # else the process exit closes it: the sweep thread holds it

    def cached(self, address: str) -> ProbeResult | None:
        """The cached result for *address*, or None (then :meth:`probe` it)."""
        try:
            return self.cache.get(address)
        except lmdb.Error as exc:
            log.error("address verification cache unreadable: %s", exc)
            return None

    def probe(self, address: str) -> asyncio.Future[ProbeResult]:
        """The result of probing *address*'s next hop, shared by every caller meanwhile."""
        key = cache_key(address)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._probe(address))
            self._inflight[key] = task
            task.add_done_callback(lambda _done: self._inflight.pop(key, None))
        return task

    async def _probe(self, address: str) -> ProbeResult:
        limit = self.timeout * PROBE_TIME_FACTOR
        try:
            result = await asyncio.wait_for(self._ask_next_hop(address, limit), limit)
        except TimeoutError:
            result = ProbeResult(UNVERIFIED, "", f"probe timed out after {limit:g} seconds")
        except Exception as exc:  # a bug must answer the client, not leave it waiting
            log.exception("probe of <%s> failed", address)
            result = ProbeResult(UNVERIFIED, "", f"probe failed: {_printable(str(exc))}")
        m.address_probes[result.kind].inc()
        log.info(
            "address probe <%s>: %s (%s)",
            address,
            result.kind,
            result.detail,
            extra={
                "fields": {
                    "event": "address_probe",
                    "recipient": address,
                    "result": result.kind,
                    "detail": result.detail,
                }
            },
        )
        self._store(address, result)
        return result

    def _store(self, address: str, result: ProbeResult) -> None:
        try:
            stored = self.cache.put(address, result)
        except lmdb.Error as exc:
            log.error("address verification cache not written: %s", exc)
            return
        if not stored:
            log.warning("address verification cache full: result for <%s> not kept", address)
        sweeping = self._sweeping is not None and not self._sweeping.done()
        if (not stored or self.cache.sweep_due) and not sweeping:
            self._sweeping = asyncio.get_running_loop().run_in_executor(None, self._sweep)

    def _sweep(self) -> None:
        try:
            removed = self.cache.sweep()
        except lmdb.Error as exc:
            log.error("address verification cache sweep failed: %s", exc)
            return
        log.info("address verification cache: %d expired result(s) removed", removed)

    async def _ask_next_hop(self, address: str, limit: float) -> ProbeResult:
        domain = address.rpartition("@")[2]
        hop = await self.router.route(domain)
        if isinstance(hop, RoutingFailure):
            kind = UNDELIVERABLE if hop.permanent else UNVERIFIED
            return ProbeResult(kind, hop.status, _printable(hop.text))
        if hop.local:
            return ProbeResult(DELIVERABLE, "", "delivered here")
        conn, why = await self._connect(hop, limit)
        if conn is None:
            return ProbeResult(UNVERIFIED, "", _printable(why))
        where = f"host {conn.host}[{conn.address}]"
        try:
            params = ""
            if not address.isascii():
                if "SMTPUTF8" not in conn.extensions:
                    why = f"{where} does not support SMTPUTF8"
                    return ProbeResult(UNDELIVERABLE, "5.6.7", why)
                params = " SMTPUTF8"
            mail, rcpt = await conn.verify(self.sender, address, params)
        except SmtpClientError as exc:
            return ProbeResult(UNVERIFIED, "", _printable(f"{where}: {exc}"))
        finally:
            # QUIT's reply is not worth the client's wait: the answer is known already.
            closing = asyncio.get_running_loop().create_task(conn.quit())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        if rcpt is None:
            # The probe's sender was refused: that says nothing about the address.
            said = f"{where} said: {mail} (in reply to MAIL FROM command)"
            return ProbeResult(UNVERIFIED, "", _printable(said))
        said = _printable(f"{where} said: {rcpt} (in reply to RCPT TO command)")
        if rcpt.code // 100 == 2:
            return ProbeResult(DELIVERABLE, "", said)
        if rcpt.code // 100 == 5:
            return ProbeResult(UNDELIVERABLE, "5.1.1", said)
        return ProbeResult(UNVERIFIED, "", said)

    async def _connect(self, hop: NextHop, limit: float) -> tuple[SmtpConnection | None, str]:
        """The first host (and address) of *hop* that lets us in, or None and why not."""
        settings = replace(
            hop.settings,
            connect_timeout=min(hop.settings.connect_timeout, limit),
            command_timeout=min(hop.settings.command_timeout, limit),
        )
        errors: list[str] = []
        for host in hop.hosts:
            try:
                addresses = await self._addresses(host)
            except TemporaryDnsError as exc:
                errors.append(f"{host}: {exc}")
                continue
            if not addresses:
                errors.append(f"{host}: no address")
            for address in addresses:
                try:
                    return await SmtpConnection.open(host, address, hop.port, settings), ""
                except SmtpClientError as exc:
                    errors.append(str(exc))
        return None, "; ".join(errors) or "no host to connect to"

    async def _addresses(self, host: str) -> list[str]:
        # A route or smarthost given as an IP needs no DNS (as in DeliveryPool).
        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            return await self.router.resolver.addresses(host)

"""The next-hop resolver: MX, implicit MX, null MX and addresses, cached by TTL.

See the package docstring (:mod:`tachymail.dns`) for the rules; this module implements them
with dnspython's asyncio resolver. One :class:`Resolver` per delivery process: its cache and
its table of lookups in flight are per instance and not thread-safe (one event loop).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar, cast

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename
import dns.rrset
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.SOA import SOA

from tachymail.metrics import m

log = logging.getLogger(__name__)

#: the statuses of :class:`Resolution`, documented in :mod:`tachymail.dns`
OK = "ok"
NULL_MX = "null_mx"
NXDOMAIN = "nxdomain"
NO_HOST = "no_host"
TEMPORARY = "temporary"

# Host names as they travel on the wire after IDNA: LDH labels (underscore tolerated, as
# some real MX targets have one); anything else can only be a typo or an attack.
_HOST_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class MxHost:
    """One host to try: ``name`` is lower-case A-label text without the trailing dot, or an
    address literal such as ``"[192.0.2.1]"``; never empty. ``preference`` is the MX
    preference, ``-1`` for an implicit MX (the domain's own A/AAAA, RFC 5321 §5.1) and ``0``
    for an address literal."""

    name: str
    preference: int


@dataclass(frozen=True, slots=True)
class Resolution:
    """The outcome of :meth:`Resolver.mx`.

    ``status`` is one of ``"ok"``, ``"null_mx"``, ``"nxdomain"``, ``"no_host"`` or
    ``"temporary"`` (meanings in :mod:`tachymail.dns`). ``hosts`` is non-empty exactly when the
    status is ``"ok"``: ascending preference, equal preferences in a fresh random order on
    every call. ``detail`` says why for the other statuses, in words fit for a log line or a
    bounce ("example.org: no such domain (NXDOMAIN)").
    """

    status: str
    hosts: tuple[MxHost, ...] = ()
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Records:
    """The outcome of one record lookup (:meth:`Resolver.txt`, ``a``, ``aaaa``,
    ``mx_records``, ``ptr``), for the message-authentication checks.

    ``status`` is ``"ok"`` (``values`` may be empty: the name exists but has no record of the
    type, NODATA), ``"nxdomain"`` (the name does not exist, or cannot: an invalid name) or
    ``"temporary"`` (SERVFAIL, REFUSED, timeout, network error; ``detail`` says which).
    ``values`` by type: TXT, each record's character-strings joined, as ``bytes``; A and
    AAAA, address text; MX, ``(preference, host)`` with the host lower-case and without
    the final dot (``""`` for a null MX's root); PTR, host names likewise.
    """

    status: str
    values: tuple[Any, ...] = ()
    detail: str = ""

    @property
    def void(self) -> bool:
        """No answer that helps: NXDOMAIN or NODATA (RFC 7208 §4.6.4 "void lookup")."""
        return self.status == NXDOMAIN or (self.status == OK and not self.values)


class TemporaryDnsError(Exception):
    """The DNS could not answer now (SERVFAIL, REFUSED, timeout, network error): try later.

    The delivery engine defers the recipients with 451 4.4.3; ``str()`` is the reason.
    """


@dataclass(frozen=True, slots=True)
class _Answer:
    """One query's answer: ``rrset`` None means no data (or NXDOMAIN when ``nxdomain``)."""

    rrset: dns.rrset.RRset | None
    nxdomain: bool
    ttl: float


@dataclass(frozen=True, slots=True)
class _Failure:
    detail: str


@dataclass(frozen=True, slots=True)
class _Addresses:
    """A host's addresses: status "ok" (possibly none: no data), "nxdomain" or "temporary"."""

    status: str
    addresses: tuple[str, ...] = ()
    detail: str = ""


class _TtlCache(Generic[V]):
    """Values that expire, with least-recently-used eviction beyond ``size`` entries."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def get(self, key: str, now: float) -> tuple[V, float] | None:
        """The value and when it expires (``time.monotonic()`` clock), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value, expires

    def put(self, key: str, value: V, expires: float) -> None:
        self._entries[key] = (expires, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class Resolver:
    """MX and address lookups for outbound delivery, cached by TTL.

    ``nameserver`` is ``"HOST:PORT"``, ``"HOST"`` (port 53) or ``"[IPv6]:PORT"``, where HOST is
    an IP address; ``None`` or ``""`` uses the system's resolvers from ``/etc/resolv.conf``.
    ``timeout`` bounds one DNS query in seconds, retries included (so :meth:`addresses`, whose
    A and AAAA queries run side by side, takes at most about ``timeout``; :meth:`mx` at most
    twice that when it falls back to an implicit MX).

    The keyword arguments tune the cache (seconds): answers are kept for their TTL clamped to
    ``[min_ttl, max_ttl]``; negative answers without an SOA for ``negative_ttl`` (with one, for
    the SOA's TTL and MINIMUM field, the lower, RFC 2308); temporary failures for
    ``failure_ttl``. At most ``cache_size`` MX answers and as many address answers are kept,
    the least recently used going first.

    Counters, plain ints that only grow, for the metrics exporter:
    ``lookups`` (calls of :meth:`mx` and :meth:`addresses`), ``cache_hits`` (those answered
    from the cache or by joining an identical lookup in flight), ``queries`` (DNS queries
    sent) and ``failures`` (queries that failed temporarily: SERVFAIL, REFUSED, timeout,
    network error).
    """

    def __init__(
        self,
        nameserver: str | None = None,
        timeout: float = 5.0,
        *,
        min_ttl: float = 5.0,
        max_ttl: float = 3600.0,
        negative_ttl: float = 60.0,
        failure_ttl: float = 5.0,
        cache_size: int = 10_000,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"DNS timeout must be positive, not {timeout}")
        if nameserver:
            host, port = parse_nameserver(nameserver)
            self._dns = dns.asyncresolver.Resolver(configure=False)
            self._dns.nameservers = [host]
            self._dns.port = port
            self.nameserver = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        else:
            self._dns = dns.asyncresolver.Resolver()  # /etc/resolv.conf
            self.nameserver = "system resolver"
        self.timeout = timeout
        self._dns.lifetime = timeout
        # Several tries per query within the lifetime, so one lost UDP datagram is not a failure.
        self._dns.timeout = min(timeout, 2.0)
        # EDNS with a payload that does not fragment: big MX sets need no TCP fallback.
        self._dns.use_edns(0, 0, 1232)
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self.failure_ttl = failure_ttl
        self._mx_cache: _TtlCache[Resolution] = _TtlCache(cache_size)
        self._addr_cache: _TtlCache[_Addresses] = _TtlCache(cache_size)
        self._mx_inflight: dict[str, asyncio.Future[tuple[Resolution, float]]] = {}
        self._addr_inflight: dict[str, asyncio.Future[tuple[_Addresses, float]]] = {}
        self._records_cache: _TtlCache[Records] = _TtlCache(cache_size)
        self._records_inflight: dict[str, asyncio.Future[tuple[Records, float]]] = {}
        self.lookups = 0
        self.cache_hits = 0
        self.queries = 0
        self.failures = 0

    # -- the API -----------------------------------------------------------------------------

    async def mx(self, domain: str) -> Resolution:
        """The hosts that receive mail for ``domain`` (RFC 5321 §5.1, RFC 7505).

        ``domain`` may be an A-label or U-label name in any case, with or without the final
        dot, or an address literal (``"[192.0.2.1]"``, ``"[IPv6:2001:db8::1]"``), which is
        answered without DNS. Never raises for DNS trouble: that is status ``"temporary"``.
        """
        self.lookups += 1
        if domain.startswith("["):
            literal = address_literal(domain)
            if literal is None:
                return Resolution(NXDOMAIN, detail=f"{domain}: not a valid address literal")
            return Resolution(OK, (MxHost(literal[0], 0),))
        try:
            name = normalize_name(domain)
        except ValueError:
            return Resolution(NXDOMAIN, detail=f"{domain!r} is not a valid domain name")
        resolution, _expires, cached = await self._shared(
            self._mx_inflight, self._mx_cache, name, self._resolve_mx
        )
        if cached:
            self.cache_hits += 1
            m.dns_cache_hits.inc()
        if len(resolution.hosts) > 1:
            return replace(resolution, hosts=_shuffle_equal(resolution.hosts))
        return resolution

    async def addresses(self, host: str) -> list[str]:
        """The IPv4 then IPv6 addresses of ``host`` as strings; ``[]`` if it has none or does
        not exist (or is not a valid host name).

        An address literal gives its address without DNS. Raises :class:`TemporaryDnsError`
        when the DNS cannot answer; when only one of the A and AAAA queries fails, the other
        family's addresses are returned (and kept only ``failure_ttl`` seconds).
        """
        self.lookups += 1
        if host.startswith("["):
            literal = address_literal(host)
            return [] if literal is None else [literal[1]]
        try:
            name = normalize_name(host)
        except ValueError:
            return []
        result, _expires, cached = await self._shared(
            self._addr_inflight, self._addr_cache, name, self._resolve_addresses
        )
        if cached:
            self.cache_hits += 1
            m.dns_cache_hits.inc()
        if result.status == TEMPORARY:
            raise TemporaryDnsError(result.detail)
        return list(result.addresses)

    async def txt(self, name: str) -> Records:
        """The TXT records of *name* (each record's strings joined, as bytes)."""
        return await self._records(name, "TXT")

    async def a(self, name: str) -> Records:
        """The IPv4 addresses of *name*."""
        return await self._records(name, "A")

    async def aaaa(self, name: str) -> Records:
        """The IPv6 addresses of *name* (compressed text)."""
        return await self._records(name, "AAAA")

    async def mx_records(self, name: str) -> Records:
        """The MX records of *name* as they are, ``(preference, host)``: no implicit MX, no
        shuffling (what SPF's ``mx`` mechanism reads; delivery uses :meth:`mx`)."""
        return await self._records(name, "MX")

    async def ptr(self, address: str) -> Records:
        """The names of *address* (IPv4 or IPv6 text) from its reverse zone; a string
        that is not an address is ``nxdomain``."""
        try:
            reverse = dns.reversename.from_address(address).to_text(omit_final_dot=True)
        except (dns.exception.DNSException, ValueError):
            return Records(NXDOMAIN, detail=f"{address!r} is not an IP address")
        return await self._records(reverse, "PTR")

    def cached(self, kind: str, name: str) -> Records | None:
        """The answer :meth:`txt`, :meth:`a`, :meth:`aaaa` or :meth:`mx_records` (*kind*
        ``"TXT"``, ``"A"``, ``"AAAA"``, ``"MX"``) would give for *name* right now from the
        cache, without a coroutine; None when it would have to ask the DNS (or join a
        lookup in flight). A hit counts as a lookup answered from the cache, as theirs do.
        The mailauth checks use it, when their DnsLookups has it, to skip an await."""
        hit = self._records_cache.get(f"{kind} {name.rstrip('.').lower()}", time.monotonic())
        if hit is None:
            return None
        self.lookups += 1
        self.cache_hits += 1
        m.dns_cache_hits.inc()
        return hit[0]

    def clear_cache(self) -> None:
        """Forget every cached answer (lookups in flight are not affected)."""
        self._mx_cache.clear()
        self._addr_cache.clear()
        self._records_cache.clear()

    async def _records(self, name: str, kind: str) -> Records:
        """One record lookup through the cache: names are taken as they come (lower-cased,
        final dot dropped; SPF macros make names no host has), only those the DNS cannot
        carry are ``nxdomain`` without a query."""
        self.lookups += 1
        text = name.rstrip(".").lower()
        key = f"{kind} {text}"
        # a cached answer first: only names that parsed were ever stored under their key
        hit = self._records_cache.get(key, time.monotonic())
        if hit is not None:
            self.cache_hits += 1
            m.dns_cache_hits.inc()
            return hit[0]
        try:
            qname = dns.name.from_text(text)
        except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
            return Records(NXDOMAIN, detail=f"{name!r} is not a valid domain name ({exc})")
        if not text or qname == dns.name.root:
            return Records(NXDOMAIN, detail=f"{name!r} is not a valid domain name")
        records, _expires, cached = await self._shared(
            self._records_inflight,
            self._records_cache,
            key,
            lambda _key: self._resolve_records(qname, text, kind),
        )
        if cached:
            self.cache_hits += 1
            m.dns_cache_hits.inc()
        return records

    async def _resolve_records(
        self, qname: dns.name.Name, text: str, kind: str
    ) -> tuple[Records, float]:
        answer = await self._query(text, dns.rdatatype.from_text(kind), qname)
        if isinstance(answer, _Failure):
            return Records(TEMPORARY, detail=answer.detail), self.failure_ttl
        if answer.nxdomain:
            return Records(NXDOMAIN, detail=f"{text}: no such domain (NXDOMAIN)"), answer.ttl
        if answer.rrset is None:
            return Records(OK), answer.ttl
        values: list[Any] = []
        for rdata in answer.rrset:
            if kind == "TXT":
                values.append(b"".join(rdata.strings))
            elif kind == "MX":
                mx = cast(MX, rdata)
                host = "" if mx.exchange == dns.name.root else mx.exchange.to_text(True).lower()
                values.append((mx.preference, host))
            elif kind == "PTR":
                target = rdata.target
                values.append(target.to_text(omit_final_dot=True).lower())
            else:
                values.append(rdata.to_text())
        return Records(OK, tuple(values)), answer.ttl

    # -- caching and sharing -----------------------------------------------------------------

    async def _shared(
        self,
        inflight: dict[str, asyncio.Future[tuple[V, float]]],
        cache: _TtlCache[V],
        key: str,
        fetch: Callable[[str], Awaitable[tuple[V, float]]],
    ) -> tuple[V, float, bool]:
        """(value, expiry, whether it came from the cache or a lookup already in flight)."""
        hit = cache.get(key, time.monotonic())
        if hit is not None:
            return hit[0], hit[1], True
        future = inflight.get(key)
        joined = future is not None
        if future is None:
            future = asyncio.ensure_future(self._fetch_and_store(cache, key, fetch))
            inflight[key] = future
            future.add_done_callback(lambda _done: inflight.pop(key, None))
        # shield: one caller giving up must not cancel the lookup the others are waiting for
        value, expires = await asyncio.shield(future)
        return value, expires, joined

    async def _fetch_and_store(
        self,
        cache: _TtlCache[V],
        key: str,
        fetch: Callable[[str], Awaitable[tuple[V, float]]],
    ) -> tuple[V, float]:
        value, ttl = await fetch(key)
        expires = time.monotonic() + ttl
        cache.put(key, value, expires)
        return value, expires

    # -- the lookups -------------------------------------------------------------------------

    async def _resolve_mx(self, name: str) -> tuple[Resolution, float]:
        answer = await self._query(name, dns.rdatatype.MX)
        if isinstance(answer, _Failure):
            return Resolution(TEMPORARY, detail=answer.detail), self.failure_ttl
        if answer.nxdomain:
            return Resolution(NXDOMAIN, detail=f"{name}: no such domain (NXDOMAIN)"), answer.ttl
        if answer.rrset is not None and len(answer.rrset) > 0:
            return self._mx_hosts(name, answer.rrset), answer.ttl
        # No MX records: the domain itself is the host (implicit MX, RFC 5321 §5.1).
        addrs, expires, _cached = await self._shared(
            self._addr_inflight, self._addr_cache, name, self._resolve_addresses
        )
        ttl = min(answer.ttl, self._clamp(expires - time.monotonic()))
        if addrs.status == TEMPORARY:
            return Resolution(TEMPORARY, detail=addrs.detail), self.failure_ttl
        if addrs.status == NXDOMAIN:
            return Resolution(NXDOMAIN, detail=f"{name}: no such domain (NXDOMAIN)"), ttl
        if not addrs.addresses:
            return Resolution(NO_HOST, detail=f"{name}: no MX, A or AAAA records"), ttl
        return Resolution(OK, (MxHost(name, -1),)), ttl

    def _mx_hosts(self, name: str, rrset: dns.rrset.RRset) -> Resolution:
        best: dict[str, int] = {}
        null_targets = 0
        for rdata in rrset:
            mx = cast(MX, rdata)
            if mx.exchange == dns.name.root:
                null_targets += 1
                continue
            host = mx.exchange.to_text(omit_final_dot=True).lower()
            best[host] = min(mx.preference, best.get(host, mx.preference))
        if not best:
            return Resolution(NULL_MX, detail=f"{name} accepts no mail (null MX, RFC 7505)")
        if null_targets:
            # RFC 7505 §3: a null MX must stand alone; a mixed set is a mistake, so use the rest.
            log.info("%s: ignoring the '.' MX record among %d real ones", name, len(best))
        hosts = sorted((MxHost(host, pref) for host, pref in best.items()), key=_by_preference)
        return Resolution(OK, tuple(hosts))

    async def _resolve_addresses(self, name: str) -> tuple[_Addresses, float]:
        a, aaaa = await asyncio.gather(
            self._query(name, dns.rdatatype.A), self._query(name, dns.rdatatype.AAAA)
        )
        addresses: list[str] = []
        ttls: list[float] = []
        failures: list[str] = []
        nxdomain = False
        for answer in (a, aaaa):
            if isinstance(answer, _Failure):
                failures.append(answer.detail)
                continue
            ttls.append(answer.ttl)
            nxdomain = nxdomain or answer.nxdomain
            if answer.rrset is not None:
                addresses.extend(rdata.to_text() for rdata in answer.rrset)
        if failures:
            if not addresses:
                return _Addresses(TEMPORARY, detail="; ".join(failures)), self.failure_ttl
            log.warning("%s: using %s only: %s", name, ", ".join(addresses), failures[0])
            return _Addresses(OK, tuple(addresses)), self.failure_ttl
        if nxdomain and not addresses:
            return _Addresses(NXDOMAIN), min(ttls)
        return _Addresses(OK, tuple(addresses)), min(ttls)

    async def _query(
        self, name: str, rdtype: dns.rdatatype.RdataType, qname: dns.name.Name | None = None
    ) -> _Answer | _Failure:
        """One question to the DNS; only unexpected programming errors escape."""
        self.queries += 1
        if qname is None:
            qname = dns.name.from_text(name)
        kind = dns.rdatatype.to_text(rdtype)
        counted = kind in m.dns_queries
        if counted:
            m.dns_queries[kind].inc()
        started = time.perf_counter()
        try:
            try:
                answer = await self._dns.resolve(qname, rdtype, raise_on_no_answer=False)
            finally:
                m.dns_duration.observe(time.perf_counter() - started)
        except dns.resolver.NXDOMAIN as exc:
            response = (exc.kwargs.get("responses") or {}).get(qname)
            return _Answer(None, True, self._negative_ttl(response))
        except dns.exception.Timeout:
            detail = f"{name} {kind}: no answer from {self.nameserver} in {self.timeout:g}s"
        except dns.resolver.NoNameservers as exc:
            detail = f"{name} {kind}: {_server_errors(exc)}"
        except (dns.exception.DNSException, OSError) as exc:
            detail = f"{name} {kind}: {type(exc).__name__}: {exc}"
        else:
            if answer.rrset is None:
                ttl = self._negative_ttl(answer.response)
                for cname in answer.chaining_result.cnames:
                    ttl = min(ttl, self._clamp(cname.ttl))
                return _Answer(None, False, ttl)
            return _Answer(answer.rrset, False, self._clamp(answer.chaining_result.minimum_ttl))
        self.failures += 1
        if counted:
            m.dns_failures[kind].inc()
        log.warning("DNS lookup failed: %s", detail)
        return _Failure(detail)

    def _negative_ttl(self, response: dns.message.Message | None) -> float:
        """RFC 2308 §5: the SOA's TTL or MINIMUM, the lower; ``negative_ttl`` without one."""
        if response is not None:
            for rrset in response.authority:
                if rrset.rdtype == dns.rdatatype.SOA and len(rrset) > 0:
                    soa = cast(SOA, rrset[0])
                    return self._clamp(min(rrset.ttl, soa.minimum))
        return self._clamp(self.negative_ttl)

    def _clamp(self, ttl: float) -> float:
        return min(max(float(ttl), self.min_ttl), self.max_ttl)


# -- helpers, public for the delivery engine and the tests ---------------------------------


def normalize_name(text: str) -> str:
    """``text`` as lower-case A-labels without the final dot (IDNA for U-labels).

    Raises ValueError for anything that is not a host name: empty, the root, empty or
    over-long labels, characters outside letters, digits, ``-`` and ``_``.
    """
    if not text or text != text.strip():
        raise ValueError(f"not a domain name: {text!r}")
    try:
        # dnspython applies IDNA 2008 (UTS 46 mapping) when the idna package is installed,
        # IDNA 2003 otherwise; both lower-case and map U-labels to xn-- A-labels.
        name = dns.name.from_text(text)
    except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
        raise ValueError(f"not a domain name: {text!r} ({exc})") from None
    ascii_text = name.to_text(omit_final_dot=True).lower()
    if name == dns.name.root or not _HOST_NAME.fullmatch(ascii_text):
        raise ValueError(f"not a domain name: {text!r}")
    return ascii_text


def address_literal(text: str) -> tuple[str, str] | None:
    """``("[192.0.2.1]", "192.0.2.1")`` for an RFC 5321 §4.1.3 address literal: its canonical
    form and its address; IPv6 as ``("[IPv6:2001:db8::1]", "2001:db8::1")``. None when
    ``text`` is not a valid IPv4 or IPv6 literal (general literals are not supported)."""
    if len(text) < 3 or text[0] != "[" or text[-1] != "]":
        return None
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipv6 = ipaddress.IPv6Address(inner[5:])
            if ipv6.scope_id is not None:
                return None
            return f"[IPv6:{ipv6.compressed}]", ipv6.compressed
        ipv4 = ipaddress.IPv4Address(inner)
    except ValueError:
        return None
    return f"[{ipv4}]", str(ipv4)


def parse_nameserver(text: str) -> tuple[str, int]:
    """``"HOST:PORT"``, ``"HOST"`` or ``"[IPv6]:PORT"`` as (address, port); ValueError if the
    host is not an IP address or the port is not in 1..65535."""
    host, port_text = text, ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad DNS server address {text!r}: expected [IPv6]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    try:
        address = ipaddress.ip_address(host)
        port = int(port_text) if port_text else 53
    except ValueError:
        raise ValueError(f"bad DNS server address {text!r}: expected IP[:PORT]") from None
    if not 0 < port < 65536:
        raise ValueError(f"bad DNS server address {text!r}: port out of range")
    return str(address), port


def _by_preference(host: MxHost) -> int:
    return host.preference


def _shuffle_equal(hosts: tuple[MxHost, ...]) -> tuple[MxHost, ...]:
    """The hosts still by preference, each run of equal preferences in a new random order."""
    out: list[MxHost] = []
    start = 0
    while start < len(hosts):
        end = start + 1
        while end < len(hosts) and hosts[end].preference == hosts[start].preference:
            end += 1
        group = list(hosts[start:end])
        random.shuffle(group)
        out.extend(group)
        start = end
    return tuple(out)


def _server_errors(exc: dns.resolver.NoNameservers) -> str:
    """What each server said ("127.0.0.1:53 answered SERVFAIL"), shorter than str(exc)."""
    parts: list[str] = []
    # dnspython's tuples: (server, tcp, port, exception or rcode text, response)
    for server, _tcp, port, what, _response in exc.kwargs.get("errors") or []:
        host = str(server).removeprefix("Do53:").partition("@")[0]
        said = f"answered {what}" if isinstance(what, str) else f"{type(what).__name__}: {what}"
        text = f"{host}:{port} {said}"
        if text not in parts:  # retries repeat the same complaint
            parts.append(text)
    return "; ".join(parts) if parts else str(exc)

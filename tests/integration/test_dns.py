"""The next-hop resolver against a real DNS server (dnsmasq on a loopback port).

Every count of DNS queries here comes from dnsmasq's own query log, so "answered from the
cache" means the server really was not asked.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import dns.name
import pytest
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnsserver import DnsRecords, DnsServer, running_dnsmasq
from tachymail.dns import MxHost, Records, Resolution, Resolver, TemporaryDnsError
from tachymail.dns.resolver import parse_nameserver

T = TypeVar("T")

# A DKIM-like key: over 255 bytes, with the characters a TXT record really carries.
DKIM_TXT = 'v=DKIM1; k=rsa; t=s, "q"; p=' + "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" * 12

RECORDS = (
    DnsRecords()
    # ordering and shuffling
    .mx("spread.test", "mx-b.spread.test", 10)
    .mx("spread.test", "MX-A.spread.test", 10)
    .mx("spread.test", "backup.spread.test", 20)
    .mx("spread.test", "last.spread.test", 30)
    .mx("dup.test", "mx.dup.test", 20)
    .mx("dup.test", "mx.dup.test", 5)
    .mx("shuffle.test", "one.shuffle.test", 10)
    .mx("shuffle.test", "two.shuffle.test", 10)
    .mx("shuffle.test", "three.shuffle.test", 10)
    .mx("shuffle.test", "fallback.shuffle.test", 50)
    # implicit MX
    .a("implicit.test", "192.0.2.10")
    .aaaa("implicit6.test", "2001:db8::10")
    # null MX, pure and mixed with a real host
    .null_mx("nomail.test")
    .null_mx("mixed.test")
    .mx("mixed.test", "real.mixed.test", 10)
    # NXDOMAIN and exists-without-records
    .nxdomain("gone.test")
    .exists("bare.test")
    # addresses
    .a("dual.test", "192.0.2.1", "192.0.2.2")
    .aaaa("dual.test", "2001:db8::1")
    .a("v4only.test", "192.0.2.3")
    .aaaa("v6only.test", "2001:db8::3")
    .a("short.test", "192.0.2.4", ttl=1)
    .a("cached.test", "192.0.2.5")
    .aaaa("cached.test", "2001:db8::5")
    .mx("cachedmx.test", "mx.cachedmx.test", 10)
    .mx("capped.test", "mx.capped.test", 10)
    .mx("crowd.test", "mx.crowd.test", 10)
    .a("crowd-implicit.test", "192.0.2.6")
    .a("crowd-host.test", "192.0.2.7")
    .mx("lru1.test", "mx.lru1.test", 10)
    .mx("lru2.test", "mx.lru2.test", 10)
    .mx("lru3.test", "mx.lru3.test", 10)
    .mx("cancel.test", "mx.cancel.test", 10)
    # IDNA
    .mx("bücher.test", "mx.bücher.test", 5)
    .a("mx.bücher.test", "192.0.2.8")
    # temporary failures from the server itself
    .refused("refused.test")
    .unanswered("silent.test")
    # a DKIM key
    .txt("sel._domainkey.dkim.test", DKIM_TXT)
    # record lookups for the inbound checks
    .txt("spf.test", "v=spf1 ip4:192.0.2.0/24 -all")
    .txt("spf.test", "unrelated text")
    .raw("200.2.0.192.in-addr.arpa", "PTR", dns.name.from_text("host.spf.test.").to_wire())
)

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def run(coro: Awaitable[T], loop: str = "asyncio") -> T:
    async def main() -> T:
        return await coro

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(main())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    with running_dnsmasq(tmp_path_factory.mktemp("dnsmasq"), RECORDS) as dns_server:
        yield dns_server


def resolver(server: DnsServer, **kwargs: Any) -> Resolver:
    return Resolver(server.address, timeout=kwargs.pop("timeout", 2.0), **kwargs)


def silent_udp_port() -> socket.socket:
    """A bound UDP socket nobody reads: queries to it get no answer and no ICMP error."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


# -- MX ordering ---------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_mx_hosts_come_sorted_by_preference(server: DnsServer, loop: str) -> None:
    result = run(resolver(server).mx("spread.test"), loop)
    assert result.status == "ok"
    assert result.detail == ""
    assert [h.preference for h in result.hosts] == [10, 10, 20, 30]
    assert {h.name for h in result.hosts[:2]} == {"mx-a.spread.test", "mx-b.spread.test"}
    assert [h.name for h in result.hosts[2:]] == ["backup.spread.test", "last.spread.test"]


def test_equal_preferences_are_shuffled_on_every_call_even_from_the_cache(
    server: DnsServer,
) -> None:
    before = server.queries("shuffle.test", "MX")
    res = resolver(server)

    async def many() -> list[Resolution]:
        return [await res.mx("shuffle.test") for _ in range(300)]

    results = run(many())
    orders = {tuple(h.name for h in r.hosts) for r in results}
    firsts = {order[0] for order in orders}
    # 3 hosts share preference 10: all 6 orders are equally likely, 300 draws see them all
    # (the chance of missing one is about 6 * (5/6)**300, i.e. never).
    assert len(orders) == 6
    assert firsts == {"one.shuffle.test", "two.shuffle.test", "three.shuffle.test"}
    assert all(order[-1] == "fallback.shuffle.test" for order in orders)
    assert all([h.preference for h in r.hosts] == [10, 10, 10, 50] for r in results)
    assert server.queries("shuffle.test", "MX") - before == 1  # the other 299 were cached
    assert res.cache_hits == 299


def test_a_host_listed_twice_keeps_its_lowest_preference(server: DnsServer) -> None:
    result = run(resolver(server).mx("dup.test"))
    assert result == Resolution("ok", (MxHost("mx.dup.test", 5),))


# -- implicit MX, null MX, NXDOMAIN, no host ------------------------------------------------


def test_implicit_mx_when_the_domain_has_only_addresses(server: DnsServer) -> None:
    res = resolver(server)

    async def lookups() -> tuple[Resolution, Resolution, list[str]]:
        return (
            await res.mx("implicit.test"),
            await res.mx("implicit6.test"),
            await res.addresses("implicit.test"),
        )

    before = server.queries("implicit.test")
    v4, v6, addresses = run(lookups())
    assert v4 == Resolution("ok", (MxHost("implicit.test", -1),))
    assert v6 == Resolution("ok", (MxHost("implicit6.test", -1),))
    assert addresses == ["192.0.2.10"]
    # MX, A and AAAA once each: addresses() after mx() was served from the cache
    assert server.queries("implicit.test") - before == 3


def test_null_mx_means_the_domain_accepts_no_mail(server: DnsServer) -> None:
    # what dnsmasq really serves: one MX, preference 0, the root name as target
    wire = server.query("nomail.test", "MX").answer
    assert len(wire) == 1
    assert [(rd.preference, rd.exchange) for rd in wire[0]] == [(0, dns.name.root)]

    result = run(resolver(server).mx("nomail.test"))
    assert result.status == "null_mx"
    assert result.hosts == ()
    assert "null MX" in result.detail and "nomail.test" in result.detail


def test_a_null_target_mixed_with_real_hosts_is_ignored(server: DnsServer) -> None:
    result = run(resolver(server).mx("mixed.test"))
    assert result == Resolution("ok", (MxHost("real.mixed.test", 10),))


def test_nxdomain(server: DnsServer) -> None:
    before = server.queries("gone.test")
    result = run(resolver(server).mx("gone.test"))
    assert result.status == "nxdomain"
    assert result.hosts == ()
    assert "gone.test" in result.detail and "NXDOMAIN" in result.detail
    assert server.queries("gone.test") - before == 1  # no A/AAAA after NXDOMAIN


def test_a_domain_without_mx_or_addresses_has_no_host(server: DnsServer) -> None:
    result = run(resolver(server).mx("bare.test"))
    assert result.status == "no_host"
    assert result.hosts == ()
    assert "bare.test" in result.detail


def test_invalid_names_never_reach_the_dns(server: DnsServer) -> None:
    res = resolver(server)
    before = len(server.query_log())

    async def lookups() -> list[Resolution]:
        return [await res.mx(name) for name in ("a..b.test", "", ".", "bad name.test")]

    assert all(r.status == "nxdomain" and r.detail for r in run(lookups()))
    assert run(res.addresses("a..b.test")) == []
    assert len(server.query_log()) == before


# -- address literals ----------------------------------------------------------------------


def test_address_literals_are_answered_without_dns(server: DnsServer) -> None:
    res = resolver(server)

    async def lookups() -> list[object]:
        return [
            await res.mx("[192.0.2.1]"),
            await res.mx("[IPv6:2001:DB8:0::1]"),
            await res.addresses("[192.0.2.1]"),
            await res.addresses("[IPv6:2001:db8::1]"),
            await res.mx("[192.0.2.300]"),
            await res.mx("[tag:general]"),
            await res.addresses("[not an address]"),
        ]

    before = len(server.query_log())
    v4, v6, v4_addr, v6_addr, bad, general, bad_addr = run(lookups())
    assert v4 == Resolution("ok", (MxHost("[192.0.2.1]", 0),))
    assert v6 == Resolution("ok", (MxHost("[IPv6:2001:db8::1]", 0),))
    assert v4_addr == ["192.0.2.1"]
    assert v6_addr == ["2001:db8::1"]
    assert isinstance(bad, Resolution) and bad.status == "nxdomain"
    assert isinstance(general, Resolution) and general.status == "nxdomain"
    assert bad_addr == []
    assert len(server.query_log()) == before


# -- addresses -----------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_addresses_ipv4_then_ipv6(server: DnsServer, loop: str) -> None:
    res = resolver(server)

    async def lookups() -> list[list[str]]:
        names = ("dual.test", "V4ONLY.test.", "v6only.test", "gone.test", "bare.test")
        return [await res.addresses(name) for name in names]

    dual, v4, v6, gone, bare = run(lookups(), loop)
    assert sorted(dual[:2]) == ["192.0.2.1", "192.0.2.2"]
    assert dual[2:] == ["2001:db8::1"]
    assert v4 == ["192.0.2.3"]
    assert v6 == ["2001:db8::3"]
    assert gone == []
    assert bare == []


# -- the cache -----------------------------------------------------------------------------


def test_a_second_lookup_is_answered_from_the_cache(server: DnsServer) -> None:
    res = resolver(server)
    mx_before = server.queries("cachedmx.test")
    addr_before = server.queries("cached.test")

    async def twice() -> None:
        first = await res.mx("cachedmx.test")
        assert first == await res.mx("CachedMX.test.")
        assert await res.addresses("cached.test") == await res.addresses("cached.test")

    run(twice())
    assert server.queries("cachedmx.test") - mx_before == 1
    assert server.queries("cached.test") - addr_before == 2  # one A, one AAAA
    assert (res.lookups, res.cache_hits, res.queries, res.failures) == (4, 2, 3, 0)


def test_a_short_ttl_is_asked_again_once_it_expires(server: DnsServer) -> None:
    res = resolver(server, min_ttl=0.2)
    before = server.queries("short.test", "A")
    assert run(res.addresses("short.test")) == ["192.0.2.4"]
    assert run(res.addresses("short.test")) == ["192.0.2.4"]
    assert server.queries("short.test", "A") - before == 1
    time.sleep(1.2)  # the A record's TTL is 1 s
    assert run(res.addresses("short.test")) == ["192.0.2.4"]
    assert server.queries("short.test", "A") - before == 2


def test_ttls_are_capped_by_max_ttl(server: DnsServer) -> None:
    res = resolver(server, min_ttl=0.1, max_ttl=0.3)  # the record says 300 s
    before = server.queries("capped.test", "MX")
    run(res.mx("capped.test"))
    run(res.mx("capped.test"))
    assert server.queries("capped.test", "MX") - before == 1
    time.sleep(0.4)
    run(res.mx("capped.test"))
    assert server.queries("capped.test", "MX") - before == 2


def test_negative_answers_without_soa_are_cached_for_negative_ttl(server: DnsServer) -> None:
    res = resolver(server, min_ttl=0.1, negative_ttl=0.3)
    before = server.queries("gone.test", "MX")
    assert run(res.mx("gone.test")).status == "nxdomain"
    assert run(res.mx("gone.test")).status == "nxdomain"
    assert server.queries("gone.test", "MX") - before == 1
    time.sleep(0.4)
    assert run(res.mx("gone.test")).status == "nxdomain"
    assert server.queries("gone.test", "MX") - before == 2


def test_authoritative_zone_ttls_and_soa_negative_caching(tmp_path: Path) -> None:
    records = (
        DnsRecords(ttl=1, zone="auth.test")
        .mx("auth.test", "mx.auth.test", 10)
        .nxdomain("gone.auth.test")
        .exists("bare.auth.test")
    )
    with running_dnsmasq(tmp_path, records) as zone_server:
        # negative_ttl would keep them a minute: only the SOA (TTL and MINIMUM 1 s) says 1 s
        res = Resolver(zone_server.address, timeout=2.0, min_ttl=0.2, negative_ttl=60)

        async def lookups() -> list[str]:
            names = ("auth.test", "gone.auth.test", "bare.auth.test")
            return [(await res.mx(name)).status for name in names]

        assert run(lookups()) == ["ok", "nxdomain", "no_host"]
        assert run(lookups()) == ["ok", "nxdomain", "no_host"]
        names = ("auth.test", "gone.auth.test", "bare.auth.test")
        assert [zone_server.queries(name, "MX") for name in names] == [1, 1, 1]
        time.sleep(1.2)
        assert run(lookups()) == ["ok", "nxdomain", "no_host"]
        assert [zone_server.queries(name, "MX") for name in names] == [2, 2, 2]
        assert zone_server.query("gone.auth.test", "A").authority[0].rdtype == 6  # SOA


def test_the_cache_is_bounded(server: DnsServer) -> None:
    res = resolver(server, cache_size=2)
    before = server.queries("lru1.test", "MX")

    async def lookups() -> None:
        for name in ("lru1.test", "lru2.test", "lru1.test", "lru3.test", "lru2.test"):
            await res.mx(name)
        # lru1 was used after lru2, so lru3 evicted lru2, and lru2 in turn evicted lru1
        await res.mx("lru1.test")

    run(lookups())
    assert server.queries("lru1.test", "MX") - before == 2
    assert res.cache_hits == 1


# -- concurrency ---------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_concurrent_identical_lookups_share_one_query(server: DnsServer, loop: str) -> None:
    res = resolver(server)
    before = {n: server.queries(n) for n in ("crowd.test", "crowd-implicit.test")}
    before_host = server.queries("crowd-host.test")

    async def crowd() -> tuple[list[Resolution], list[Resolution], list[list[str]]]:
        mx = asyncio.gather(*(res.mx("crowd.test") for _ in range(50)))
        implicit = asyncio.gather(*(res.mx("crowd-implicit.test") for _ in range(50)))
        hosts = asyncio.gather(*(res.addresses("crowd-host.test") for _ in range(50)))
        return await mx, await implicit, await hosts

    mx, implicit, hosts = run(crowd(), loop)
    assert all(r == Resolution("ok", (MxHost("mx.crowd.test", 10),)) for r in mx)
    assert all(r == Resolution("ok", (MxHost("crowd-implicit.test", -1),)) for r in implicit)
    assert all(h == ["192.0.2.7"] for h in hosts)
    assert server.queries("crowd.test") - before["crowd.test"] == 1
    # MX, then A and AAAA for the implicit MX: once each for all 50
    assert server.queries("crowd-implicit.test") - before["crowd-implicit.test"] == 3
    assert server.queries("crowd-host.test") - before_host == 2
    assert res.cache_hits == 147


def test_a_cancelled_caller_does_not_cancel_the_shared_lookup(tmp_path: Path) -> None:
    records = DnsRecords().mx("late.test", "mx.late.test", 10)
    with running_dnsmasq(tmp_path, records) as dns_server:
        res = Resolver(dns_server.address, timeout=2.0)

        async def scenario() -> Resolution:
            impatient = asyncio.ensure_future(res.mx("late.test"))
            patient = asyncio.ensure_future(res.mx("late.test"))
            await asyncio.sleep(0)  # both are waiting on the one query now
            impatient.cancel()
            return await patient

        assert run(scenario()) == Resolution("ok", (MxHost("mx.late.test", 10),))
        assert dns_server.queries("late.test", "MX") == 1


# -- temporary failures --------------------------------------------------------------------


def test_a_server_that_never_answers_is_a_quick_temporary_failure() -> None:
    with silent_udp_port() as sock:
        res = Resolver(f"127.0.0.1:{sock.getsockname()[1]}", timeout=0.5)
        started = time.monotonic()
        result = run(res.mx("example.test"))
        elapsed = time.monotonic() - started
        assert result.status == "temporary"
        assert result.hosts == ()
        assert "no answer" in result.detail
        assert elapsed < 2.0
        with pytest.raises(TemporaryDnsError, match="no answer"):
            run(res.addresses("mx.example.test"))
        assert res.failures == 3  # MX, A, AAAA


def test_a_closed_port_is_a_temporary_failure() -> None:
    with silent_udp_port() as sock:
        port = sock.getsockname()[1]
    # the socket is closed: the kernel answers with ICMP port unreachable
    res = Resolver(f"127.0.0.1:{port}", timeout=0.5)
    started = time.monotonic()
    assert run(res.mx("example.test")).status == "temporary"
    assert time.monotonic() - started < 2.0


def test_refused_and_unanswered_domains_are_temporary(server: DnsServer) -> None:
    res = resolver(server, timeout=0.5)
    refused = run(res.mx("refused.test"))
    assert refused.status == "temporary"
    assert "REFUSED" in refused.detail
    silent = run(res.mx("www.silent.test"))
    assert silent.status == "temporary"
    assert "no answer" in silent.detail
    with pytest.raises(TemporaryDnsError, match="REFUSED"):
        run(res.addresses("mx.refused.test"))


def test_temporary_failures_are_cached_briefly(server: DnsServer) -> None:
    res = resolver(server, failure_ttl=0.3)
    before = server.queries("refused.test", "MX")
    assert run(res.mx("refused.test")).status == "temporary"
    assert run(res.mx("refused.test")).status == "temporary"
    assert server.queries("refused.test", "MX") - before == 1
    time.sleep(0.4)
    assert run(res.mx("refused.test")).status == "temporary"
    assert server.queries("refused.test", "MX") - before == 2


# -- names ---------------------------------------------------------------------------------


def test_idna_names_are_looked_up_as_a_labels(server: DnsServer) -> None:
    res = resolver(server)
    before = server.queries("xn--bcher-kva.test", "MX")

    async def lookups() -> tuple[Resolution, Resolution, list[str]]:
        return (
            await res.mx("Bücher.TEST"),
            await res.mx("xn--bcher-kva.test"),  # the same name: from the cache
            await res.addresses("mx.bücher.test"),
        )

    unicode, ascii_, addresses = run(lookups())
    assert unicode == Resolution("ok", (MxHost("mx.xn--bcher-kva.test", 5),))
    assert ascii_ == unicode
    assert addresses == ["192.0.2.8"]
    assert server.queries("xn--bcher-kva.test", "MX") - before == 1
    assert ("A", "mx.xn--bcher-kva.test") in server.query_log()


def test_nameserver_addresses() -> None:
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("127.0.0.1") == ("127.0.0.1", 53)
    assert parse_nameserver("[::1]:5353") == ("::1", 5353)
    assert parse_nameserver("2001:db8::53") == ("2001:db8::53", 53)
    for bad in ("dns.example:53", "127.0.0.1:0", "127.0.0.1:x", "[::1]x", "[::1"):
        with pytest.raises(ValueError):
            parse_nameserver(bad)
    assert Resolver("127.0.0.1:5353").nameserver == "127.0.0.1:5353"


# -- record lookups for the inbound checks (tachymail.mailauth) -----------------------------


def test_record_lookups_give_values_nodata_and_nxdomain(server: DnsServer) -> None:
    async def lookups() -> list[Records]:
        r = resolver(server)
        return [
            await r.txt("SPF.test."),
            await r.txt("sel._domainkey.dkim.test"),
            await r.a("dual.test"),
            await r.aaaa("dual.test"),
            await r.mx_records("mixed.test"),
            await r.ptr("192.0.2.200"),
            await r.txt("dual.test"),  # addresses only: NODATA for TXT
            await r.txt("gone.test"),
            await r.ptr("not an address"),
            await r.txt("refused.test"),
        ]

    spf, dkim, a, aaaa, mx, ptr, nodata, gone, bad, refused = run(lookups(), "uvloop")
    assert spf.status == "ok"
    assert sorted(spf.values) == [b"unrelated text", b"v=spf1 ip4:192.0.2.0/24 -all"]
    assert dkim.values == (DKIM_TXT.encode(),)  # the 255-byte strings joined
    assert sorted(a.values) == ["192.0.2.1", "192.0.2.2"] and aaaa.values == ("2001:db8::1",)
    assert sorted(mx.values) == [(0, ""), (10, "real.mixed.test")]  # as published
    assert ptr.values == ("host.spf.test",)
    assert nodata.status == "ok" and nodata.values == () and nodata.void
    assert gone.status == "nxdomain" and gone.void
    assert bad.status == "nxdomain" and "not an IP address" in bad.detail
    assert refused.status == "temporary" and not refused.void and "REFUSED" in refused.detail


def test_record_lookups_are_cached(server: DnsServer) -> None:
    async def twice() -> None:
        r = resolver(server)
        await r.txt("spf.test")
        await asyncio.gather(*(r.txt("SPF.TEST") for _ in range(5)))

    before = server.queries("spf.test", "TXT")
    run(twice())
    assert server.queries("spf.test", "TXT") == before + 1


# -- the helper itself ---------------------------------------------------------------------


def test_long_txt_records_are_split_into_255_byte_strings(server: DnsServer) -> None:
    answer = server.query("sel._domainkey.dkim.test", "TXT").answer
    assert len(answer) == 1 and len(answer[0]) == 1
    strings = answer[0][0].strings
    assert len(strings) == -(-len(DKIM_TXT) // 255)
    assert all(len(s) == 255 for s in strings[:-1])
    assert b"".join(strings).decode() == DKIM_TXT

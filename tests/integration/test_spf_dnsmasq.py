"""SPF through the real resolver: ``tachymail.dns.Resolver`` asking dnsmasq on loopback.

The records are real DNS records on the wire (TXT strings over 255 bytes split as a real
server splits them, PTR and MX answers), so these cases check what the in-memory suites
cannot: that the evaluator and the resolver agree on names, record formats and failures.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnsserver import DnsRecords, DnsServer, running_dnsmasq
from tachymail.dns import Resolver
from tachymail.mailauth.spf import check_host, check_spf

# a record longer than one 255-byte TXT string: dnsmasq sends it as several strings
LONG = "v=spf1 " + " ".join(f"ip4:198.51.100.{n}" for n in range(1, 20)) + " ip4:192.0.2.0/24 -all"

RECORDS = (
    DnsRecords()
    .txt("pass.test", "v=spf1 ip4:192.0.2.0/24 -all")
    .txt("pass.test", "google-site-verification=unrelated")
    .txt("fail.test", "v=spf1 a:mail.fail.test -all exp=why.fail.test")
    .a("mail.fail.test", "198.51.100.7")
    .txt("why.fail.test", "%{i} may not send for %{d} (%{s})")
    .txt("chain.test", "v=spf1 include:one.chain.test -all")
    .txt("one.chain.test", "v=spf1 include:two.chain.test ~all")
    .txt("two.chain.test", "v=spf1 mx:mx.chain.test ?all")
    .mx("mx.chain.test", "in1.chain.test", 10)
    .mx("mx.chain.test", "in2.chain.test", 20)
    .a("in1.chain.test", "198.51.100.1")
    .a("in2.chain.test", "203.0.113.25")
    .txt("void.test", "v=spf1 a:gone1.void.test a:gone2.void.test mx:gone3.void.test -all")
    .nxdomain("gone1.void.test")
    .txt("slow.test", "v=spf1 include:dns.silent.test -all")
    .unanswered("silent.test")
    .txt("long.test", LONG)
    .txt("helo.test", "v=spf1 ptr -all")
    .ptr("203.0.113.9", "out.helo.test")
    .a("out.helo.test", "203.0.113.9")
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    with running_dnsmasq(tmp_path_factory.mktemp("dnsmasq"), RECORDS) as dns_server:
        yield dns_server


def resolver(server: DnsServer, timeout: float = 2.0) -> Resolver:
    return Resolver(server.address, timeout=timeout)


def test_pass_by_ip4(server: DnsServer) -> None:
    mail, helo = asyncio.run(
        check_spf(resolver(server), "192.0.2.10", "a@pass.test", "x.pass.test")
    )
    assert (mail.result, mail.mechanism, mail.domain) == ("pass", "ip4:192.0.2.0/24", "pass.test")
    assert mail.identity == "mailfrom"
    assert helo.identity == "helo"
    assert helo.result == "none"  # x.pass.test has no record (NXDOMAIN)
    assert server.queries("pass.test", "TXT") == 1
    assert server.queries("why.fail.test", "TXT") == 0


def test_fail_by_all_with_explanation(server: DnsServer) -> None:
    result = asyncio.run(
        check_host(resolver(server), "192.0.2.99", "fail.test", "Bob@fail.test", "h.example")
    )
    assert result.result == "fail"
    assert result.mechanism == "-all"
    assert result.explanation == "192.0.2.99 may not send for fail.test (Bob@fail.test)"
    allowed = asyncio.run(
        check_host(resolver(server), "198.51.100.7", "fail.test", "Bob@fail.test", "h.example")
    )
    assert (allowed.result, allowed.mechanism, allowed.explanation) == (
        "pass",
        "a:mail.fail.test",
        "",
    )


def test_include_chain_reaches_mx_hosts(server: DnsServer) -> None:
    res = resolver(server)
    ok = asyncio.run(check_host(res, "203.0.113.25", "chain.test", "x@chain.test", "h"))
    assert (ok.result, ok.mechanism) == ("pass", "include:one.chain.test")
    other = asyncio.run(check_host(res, "203.0.113.26", "chain.test", "x@chain.test", "h"))
    # two.chain.test ends in ?all (neutral: no match for one.chain.test's include), so
    # one.chain.test says ~all (softfail: no match for chain.test's include): -all
    assert (other.result, other.mechanism) == ("fail", "-all")
    assert server.queries("in1.chain.test", "A") == 1
    assert server.queries("in2.chain.test", "A") == 1


def test_third_void_lookup_is_permerror(server: DnsServer) -> None:
    result = asyncio.run(check_host(resolver(server), "192.0.2.1", "void.test", "a@void.test", "h"))
    assert result.result == "permerror"
    assert "void" in result.detail
    assert server.queries("gone3.void.test", "MX") == 1


def test_unanswering_server_is_temperror(server: DnsServer) -> None:
    result = asyncio.run(
        check_host(resolver(server, timeout=0.5), "192.0.2.1", "slow.test", "a@slow.test", "h")
    )
    assert result.result == "temperror"
    assert "dns.silent.test" in result.detail


def test_long_record_split_into_strings_is_joined(server: DnsServer) -> None:
    assert len(LONG) > 255
    result = asyncio.run(
        check_host(resolver(server), "192.0.2.77", "long.test", "a@long.test", "h")
    )
    assert (result.result, result.mechanism) == ("pass", "ip4:192.0.2.0/24")


def test_helo_identity_with_ptr_and_null_sender(server: DnsServer) -> None:
    mail, helo = asyncio.run(check_spf(resolver(server), "203.0.113.9", "", "helo.test"))
    assert (helo.result, helo.identity, helo.sender) == ("pass", "helo", "postmaster@helo.test")
    assert (mail.result, mail.identity, mail.sender) == ("pass", "mailfrom", "postmaster@helo.test")
    literal = asyncio.run(check_spf(resolver(server), "203.0.113.9", "", "[203.0.113.9]"))
    assert [r.result for r in literal] == ["none", "none"]

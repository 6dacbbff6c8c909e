"""iprev and DNS block/allow lists against a real DNS server (dnsmasq on a loopback port),
through the real resolver; plus the connect verdict the SMTP session gets from them."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnsserver import DnsRecords, DnsServer, running_dnsmasq
from tachymail.config import from_dict
from tachymail.dns import Resolver
from tachymail.mailauth.dnsbl import Listing, dnsbl, is_listing, query_name
from tachymail.mailauth.inbound import InboundChecker
from tachymail.mailauth.iprev import MAX_NAMES, IprevResult, check_iprev

T = TypeVar("T")

V6 = "2001:db8::25"
V6_LISTED = "2001:db8:0:1::99"

RECORDS = (
    DnsRecords()
    # iprev pass, with one name and with the second of two names
    .ptr("192.0.2.10", "mail.good.test")
    .a("mail.good.test", "192.0.2.10")
    .ptr("192.0.2.11", "other.test", "mail2.good.test")
    .a("other.test", "198.51.100.1")
    .a("mail2.good.test", "198.51.100.7", "192.0.2.11")
    # IPv6: the AAAA answers, not the A
    .ptr(V6, "v6.good.test")
    .aaaa("v6.good.test", V6)
    .a("v6.good.test", "192.0.2.250")
    .ptr("2001:db8::26", "v4name.test")
    .a("v4name.test", "192.0.2.26")
    # fail: the name maps elsewhere, or nowhere
    .ptr("192.0.2.20", "liar.test")
    .a("liar.test", "198.51.100.2")
    .ptr("192.0.2.21", "gone.test")
    .nxdomain("gone.test")
    # more names than are checked, none mapping back
    .ptr("192.0.2.22", *[f"n{i:02d}.many.test" for i in range(MAX_NAMES + 5)])
    # temperror: the forward lookup gets no answer; the reverse zone of .40 neither
    .ptr("192.0.2.41", "host.slow.test")
    .unanswered("slow.test")
    .unanswered("40.2.0.192.in-addr.arpa")
    # block lists: the RFC 5782 test entry, a listing with a reason, an error code
    .a(query_name("127.0.0.2", "bl.test"), "127.0.0.2")
    .txt(query_name("127.0.0.2", "bl.test"), "test entry")
    .a(query_name("192.0.2.99", "bl.test"), "127.0.0.4")
    .txt(query_name("192.0.2.99", "bl.test"), "Listed: see https://bl.test/q?192.0.2.99")
    .a(query_name("192.0.2.99", "bl2.test"), "127.0.0.11", "127.0.0.10")
    .a(query_name("192.0.2.98", "bl.test"), "127.255.255.254")
    .a(query_name("192.0.2.97", "bl.test"), "192.0.2.1")
    .a(query_name(V6_LISTED, "bl.test"), "127.0.0.2")
    .unanswered("slowbl.test")
    # an allow list in DNSWL's style (127.0.<category>.<trust>)
    .a(query_name("192.0.2.50", "wl.test"), "127.0.15.2")
    .a(query_name("192.0.2.50", "bl.test"), "127.0.0.2")
)


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    with running_dnsmasq(tmp_path_factory.mktemp("dnsmasq"), RECORDS) as dns_server:
        yield dns_server


def resolver(server: DnsServer) -> Resolver:
    # short: the "unanswered" names must time out quickly
    return Resolver(server.address, timeout=1.0)


# -- iprev -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("192.0.2.10", IprevResult("pass", "mail.good.test", "", "192.0.2.10")),
        ("192.0.2.11", IprevResult("pass", "mail2.good.test", "", "192.0.2.11")),
        ("::ffff:192.0.2.10", IprevResult("pass", "mail.good.test", "", "192.0.2.10")),
        (V6, IprevResult("pass", "v6.good.test", "", V6)),
        (
            "192.0.2.20",
            IprevResult(
                "fail", "liar.test", "no A record of liar.test is 192.0.2.20", "192.0.2.20"
            ),
        ),
        (
            "192.0.2.21",
            IprevResult(
                "fail", "gone.test", "no A record of gone.test is 192.0.2.21", "192.0.2.21"
            ),
        ),
        (
            "2001:db8::26",
            IprevResult(
                "fail",
                "v4name.test",
                "no AAAA record of v4name.test is 2001:db8::26",
                "2001:db8::26",
            ),
        ),
        (
            "192.0.2.30",
            IprevResult("permerror", "", "no PTR record for 192.0.2.30", "192.0.2.30"),
        ),
        ("not-an-ip", IprevResult("permerror", "", "'not-an-ip' is not an IP address")),
    ],
)
def test_iprev(server: DnsServer, ip: str, expected: IprevResult) -> None:
    assert run(check_iprev(resolver(server), ip)) == expected


def test_iprev_checks_at_most_ten_names(server: DnsServer) -> None:
    result = run(check_iprev(resolver(server), "192.0.2.22"))
    assert result.result == "fail" and result.name.endswith(".many.test")
    asked = [name for kind, name in server.query_log() if name.endswith(".many.test")]
    assert len(asked) == MAX_NAMES, "a hostile reverse zone cannot make us ask more"


def test_iprev_temperror_when_the_dns_does_not_answer(server: DnsServer) -> None:
    forward = run(check_iprev(resolver(server), "192.0.2.41"))
    assert (forward.result, forward.name) == ("temperror", "host.slow.test")
    assert "host.slow.test" in forward.detail
    reverse = run(check_iprev(resolver(server), "192.0.2.40"))
    assert (reverse.result, reverse.name) == ("temperror", "")
    assert reverse.detail.startswith("PTR lookup of 192.0.2.40")


# -- DNSBL -------------------------------------------------------------------------------------


def test_query_names() -> None:
    assert query_name("192.0.2.99", "bl.test.") == "99.2.0.192.bl.test"
    assert query_name("::ffff:192.0.2.99", "BL.test") == "99.2.0.192.bl.test"
    nibbles = "9.9.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
    assert query_name(V6_LISTED, "bl.test") == f"{nibbles}.bl.test"  # RFC 5782 §2.4
    with pytest.raises(ValueError):
        query_name("999.1.1.1", "bl.test")


@pytest.mark.parametrize(
    ("code", "listed"),
    [
        ("127.0.0.2", True),
        ("127.0.0.11", True),
        ("127.0.15.2", True),
        ("127.0.0.1", False),
        ("127.255.255.254", False),
        ("127.255.255.255", False),
        ("127.0.0.255", False),
        ("192.0.2.1", False),
        ("::1", False),
    ],
)
def test_what_counts_as_a_listing(code: str, listed: bool) -> None:
    assert is_listing(code) is listed


def test_listed_in_both_zones_with_reasons(server: DnsServer) -> None:
    found = run(dnsbl(resolver(server), "192.0.2.99", ["bl.test", "BL2.test.", "none.test"]))
    assert found == [
        Listing("bl.test", ("127.0.0.4",), "Listed: see https://bl.test/q?192.0.2.99"),
        Listing("bl2.test", ("127.0.0.10", "127.0.0.11"), ""),
    ]


def test_rfc5782_test_entry_and_ipv6(server: DnsServer) -> None:
    dns = resolver(server)
    assert run(dnsbl(dns, "127.0.0.2", ["bl.test"])) == [
        Listing("bl.test", ("127.0.0.2",), "test entry")
    ]
    assert run(dnsbl(dns, V6_LISTED, ["bl.test"])) == [Listing("bl.test", ("127.0.0.2",), "")]
    assert run(dnsbl(dns, "127.0.0.1", ["bl.test"])) == []  # RFC 5782 §5: never listed


def test_not_listed(server: DnsServer) -> None:
    dns = resolver(server)
    assert run(dnsbl(dns, "192.0.2.10", ["bl.test", "bl2.test"])) == []
    assert run(dnsbl(dns, V6, ["bl.test"])) == []
    assert run(dnsbl(dns, "not-an-ip", ["bl.test"])) == []
    assert run(dnsbl(dns, "192.0.2.10", [])) == []


def test_error_codes_and_foreign_answers_are_not_listings(
    server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "tachymail.mailauth.dnsbl")
    dns = resolver(server)
    assert run(dnsbl(dns, "192.0.2.98", ["bl.test"])) == []
    assert run(dnsbl(dns, "192.0.2.97", ["bl.test"])) == []
    assert "127.255.255.254" in caplog.text and "error codes, not a listing" in caplog.text
    assert server.queries(query_name("192.0.2.98", "bl.test"), "TXT") == 0


def test_a_zone_that_times_out_is_not_a_listing_and_is_logged(
    server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "tachymail.mailauth.dnsbl")
    found = run(dnsbl(resolver(server), "192.0.2.99", ["slowbl.test", "bl.test"]))
    assert [listing.zone for listing in found] == ["bl.test"], "the other zone still counts"
    assert "DNSBL slowbl.test" in caplog.text and "not listed" in caplog.text


def test_zones_are_asked_in_parallel(server: DnsServer) -> None:
    # The silent zone takes the whole timeout; asked one after the other, three of them
    # would take three timeouts. The bound only catches serial lookups, not a slow machine.
    dns = Resolver(server.address, timeout=2.0)
    zones = ["a.slowbl.test", "b.slowbl.test", "c.slowbl.test"]

    async def timed() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await dnsbl(dns, "192.0.2.99", zones) == []
        return loop.time() - start

    assert run(timed()) < 5.5


# -- the connect verdict ----------------------------------------------------------------------


def checker(server: DnsServer, **mailauth: object) -> InboundChecker:
    config = from_dict({"mailauth": {"dmarc_reports": False, **mailauth}})
    return InboundChecker(config, resolver(server))


def test_connect_refuses_a_listed_client_naming_the_zone(server: DnsServer) -> None:
    verdict = run(checker(server, dnsbl_zones=["bl2.test", "bl.test"]).connect("192.0.2.99"))
    assert verdict.reply == (
        b"554 5.7.1 Service unavailable; client [192.0.2.99] blocked using bl2.test\r\n"
    )
    assert not verdict.allowlisted
    assert [listing.zone for listing in verdict.listings] == ["bl2.test", "bl.test"]
    reason = run(checker(server, dnsbl_zones=["bl.test"]).connect("192.0.2.99"))
    assert reason.reply == (
        b"554 5.7.1 Service unavailable; client [192.0.2.99] blocked using bl.test; "
        b"Listed: see https://bl.test/q?192.0.2.99\r\n"
    )


def test_connect_lets_unlisted_and_allowlisted_clients_in(server: DnsServer) -> None:
    both = checker(server, dnsbl_zones=["bl.test"], dnswl_zones=["wl.test"])
    clean = run(both.connect("192.0.2.10"))
    assert (clean.reply, clean.allowlisted, clean.listings) == (None, False, ())
    trusted = run(both.connect("192.0.2.50"))
    assert trusted.reply is None and trusted.allowlisted
    assert {listing.zone for listing in trusted.listings} == {"bl.test", "wl.test"}
    nothing = run(checker(server).connect("192.0.2.99"))
    assert (nothing.reply, nothing.allowlisted) == (None, False)


def test_checker_iprev_follows_the_setting(server: DnsServer) -> None:
    assert run(checker(server).iprev("192.0.2.10")) == IprevResult(
        "pass", "mail.good.test", "", "192.0.2.10"
    )
    assert run(checker(server, iprev=False).iprev("192.0.2.10")) is None

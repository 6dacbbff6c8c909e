"""SPF cases the openspf suites do not cover: the macro examples of RFC 7208 §7.4, the
exp-only macros (%{c} %{r} %{t}), non-ASCII local parts, the configurable limits, the
elapsed-time limit, parallel lookups, and the two identities of ``check_spf``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fakedns import ZoneLookups
from tachymail.mailauth import spf
from tachymail.mailauth.spf import SpfResult, check_host, check_spf

SENDER = "strong-bad@email.example.com"


def explanation_of(text: str, ip: str = "192.0.2.3", sender: str = SENDER, **kw: Any) -> str:
    """The explanation a ``-all`` gives when exp= points at a TXT record ``text``."""
    domain = sender.rpartition("@")[2]
    zone = ZoneLookups(
        {
            (domain, "TXT"): ["v=spf1 -all exp=exp.example.net"],
            ("exp.example.net", "TXT"): [text],
        }
    )
    result = asyncio.run(check_host(zone, ip, domain, sender, "helo.example.org", **kw))
    assert result.result == "fail", result
    return result.explanation


# RFC 7208 §7.4: sender strong-bad@email.example.com, IPv4 client 192.0.2.3
RFC_EXAMPLES = {
    "%{s}": "strong-bad@email.example.com",
    "%{o}": "email.example.com",
    "%{d}": "email.example.com",
    "%{d4}": "email.example.com",
    "%{d3}": "email.example.com",
    "%{d2}": "example.com",
    "%{d1}": "com",
    "%{dr}": "com.example.email",
    "%{d2r}": "example.email",
    "%{l}": "strong-bad",
    "%{l-}": "strong.bad",
    "%{lr}": "strong-bad",
    "%{lr-}": "bad.strong",
    "%{l1r-}": "strong",
    "%{ir}.%{v}._spf.%{d2}": "3.2.0.192.in-addr._spf.example.com",
    "%{lr-}.lp._spf.%{d2}": "bad.strong.lp._spf.example.com",
    "%{lr-}.lp.%{ir}.%{v}._spf.%{d2}": "bad.strong.lp.3.2.0.192.in-addr._spf.example.com",
    "%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}": "3.2.0.192.in-addr.strong.lp._spf.example.com",
    "%{d2}.trusted-domains.example.net": "example.com.trusted-domains.example.net",
}


@pytest.mark.parametrize(("macro", "expanded"), RFC_EXAMPLES.items())
def test_rfc7208_macro_examples(macro: str, expanded: str) -> None:
    assert explanation_of(macro) == expanded


def test_rfc7208_ipv6_macro_example_finds_the_record() -> None:
    """§7.4: %{ir}.%{v}._spf.%{d2} for 2001:db8::cb01 names the nibble domain."""
    nibbles = "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
    zone = ZoneLookups(
        {
            ("email.example.com", "TXT"): ["v=spf1 exists:%{ir}.%{v}._spf.%{d2} -all"],
            (f"{nibbles}.ip6._spf.example.com", "A"): ["127.0.0.2"],
        }
    )
    result = asyncio.run(check_host(zone, "2001:db8::cb01", "email.example.com", SENDER, "h"))
    assert (result.result, result.mechanism) == ("pass", "exists:%{ir}.%{v}._spf.%{d2}")
    other = asyncio.run(check_host(zone, "2001:db8::cb02", "email.example.com", SENDER, "h"))
    assert other.result == "fail"


def test_explanation_only_macros() -> None:
    text = explanation_of(
        "%{c} from %{h} rejected by %{r} at %{t}",
        ip="2001:DB8::CB01",
        receiver="mx.example.org",
        now=1_700_000_000.9,
    )
    assert text == "2001:db8::cb01 from helo.example.org rejected by mx.example.org at 1700000000"
    assert explanation_of("%{r}") == "unknown"


def test_url_escaping_of_upper_case_macros_uses_utf8() -> None:
    sender = "jösé+tag@email.example.com"
    assert explanation_of("%{L} / %{l}", sender=sender) == "j%C3%B6s%C3%A9%2Btag / jösé+tag"
    assert explanation_of("%{S}", sender=sender) == "j%C3%B6s%C3%A9%2Btag%40email.example.com"


def test_literal_escapes_and_delimiters() -> None:
    assert explanation_of("100%% %_ %- sure") == "100%   %20 sure"
    assert explanation_of("%{l+-}", sender="a+b-c@email.example.com") == "a.b.c"
    assert explanation_of("%{l2r+-}", sender="a+b-c@email.example.com") == "b.a"
    assert explanation_of("%{D999}") == "email.example.com"


def test_explanation_with_a_bad_macro_is_dropped() -> None:
    assert explanation_of("see %{d0}") == ""
    assert explanation_of("see %{z}") == ""
    assert explanation_of("50% off") == ""


@pytest.mark.parametrize(
    "record",
    [
        "v=spf1 exists:%{d0}.example.com -all",  # zero digit transformer
        "v=spf1 a:%{c}.example.com -all",  # c is for exp= text only
        "v=spf1 a:%{t}.example.com -all",
        "v=spf1 include:example.com\t-all",  # terms are separated by spaces only
        "v=spf1 ip4:192.0.2.1/24/24",
        "v=spf1 ip4:192.0.2.01",
        "v=spf1 ip6:2001:db8::1%eth0",
        "v=spf1 mx:example.com/024",
        "v=spf1 a://64",  # an empty domain before the cidr
        "v=spf1 exp=a.example.com exp=b.example.com",
        "v=spf1 foo=%{c}",  # an unknown modifier's value is a domain macro-string too
        "v=spf1 ~",
    ],
)
def test_syntax_errors_are_permerror(record: str) -> None:
    zone = ZoneLookups({("example.com", "TXT"): [record]})
    result = asyncio.run(check_host(zone, "192.0.2.1", "example.com", "a@example.com", "h"))
    assert result.result == "permerror", result
    assert result.detail.startswith("example.com: ")


def test_lookup_limits_are_configurable() -> None:
    zone = ZoneLookups(
        {
            ("example.com", "TXT"): ["v=spf1 a:a.example.com a:b.example.com ip4:192.0.2.1 -all"],
            ("a.example.com", "A"): ["198.51.100.1"],
            ("b.example.com", "A"): ["198.51.100.2"],
        }
    )
    args = (zone, "192.0.2.1", "example.com", "a@example.com", "h")
    assert asyncio.run(check_host(*args)).result == "pass"
    limited = asyncio.run(check_host(*args, max_lookups=1))
    assert limited.result == "permerror"
    assert "more than 1 DNS-querying terms" in limited.detail
    voids = ZoneLookups({("example.com", "TXT"): ["v=spf1 a:gone.example.com ?all"]})
    args = (voids, "192.0.2.1", "example.com", "a@example.com", "h")
    assert asyncio.run(check_host(*args)).result == "neutral"
    assert asyncio.run(check_host(*args, max_void_lookups=0)).result == "permerror"


def test_mx_host_lookups_run_in_parallel_and_read_in_order() -> None:
    records: dict[tuple[str, str], Any] = {
        ("example.com", "TXT"): ["v=spf1 mx -all"],
        ("example.com", "MX"): [(n, f"mx{n}.example.com") for n in range(5)],
    }
    for n in range(5):
        records[(f"mx{n}.example.com", "A")] = [f"198.51.100.{n}"]
    zone = ZoneLookups(records, delay=0.01)
    result = asyncio.run(check_host(zone, "198.51.100.4", "example.com", "a@example.com", "h"))
    assert (result.result, result.mechanism) == ("pass", "mx")
    assert zone.max_in_flight == 5
    assert zone.lookups == 7  # TXT, MX, and the five A lookups
    # a host that fails before the matching one: temperror, as a one-by-one check would
    records[("mx1.example.com", "A")] = "TIMEOUT"
    result = asyncio.run(
        check_host(ZoneLookups(records), "198.51.100.4", "example.com", "a@example.com", "h")
    )
    assert result.result == "temperror"
    # ... and a failure after it does not matter
    result = asyncio.run(
        check_host(ZoneLookups(records), "198.51.100.0", "example.com", "a@example.com", "h")
    )
    assert result.result == "pass"


def test_explanation_is_looked_up_only_for_fail() -> None:
    zone = ZoneLookups(
        {
            ("example.com", "TXT"): ["v=spf1 ip4:192.0.2.1 ~ip4:192.0.2.2 -all exp=e.example.com"],
            ("e.example.com", "TXT"): ["no"],
        }
    )
    for ip, result in (("192.0.2.1", "pass"), ("192.0.2.2", "softfail")):
        outcome = asyncio.run(check_host(zone, ip, "example.com", "a@example.com", "h"))
        assert (outcome.result, outcome.explanation) == (result, "")
    assert zone.count("e.example.com", "TXT") == 0
    outcome = asyncio.run(check_host(zone, "192.0.2.3", "example.com", "a@example.com", "h"))
    assert (outcome.result, outcome.explanation) == ("fail", "no")
    assert zone.count("e.example.com", "TXT") == 1


def test_elapsed_time_limit_gives_temperror(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spf, "MAX_ELAPSED", 0.05)
    zone = ZoneLookups({("example.com", "TXT"): ["v=spf1 -all"]}, delay=5.0)
    result = asyncio.run(check_host(zone, "192.0.2.1", "example.com", "a@example.com", "h"))
    assert result.result == "temperror"
    assert "no answer within" in result.detail


def test_international_domain_is_looked_up_as_a_labels() -> None:
    zone = ZoneLookups({("xn--bcher-kva.example", "TXT"): ["v=spf1 ip4:192.0.2.1 -all"]})
    result = asyncio.run(check_host(zone, "192.0.2.1", "bücher.example", "a@bücher.example", "h"))
    assert (result.result, result.domain) == ("pass", "xn--bcher-kva.example")


@pytest.mark.parametrize(
    ("ip", "domain", "why"),
    [
        ("not-an-ip", "example.com", "is not an IP address"),
        ("192.0.2.1", "[192.0.2.1]", "is not a domain name"),
        ("192.0.2.1", "192.0.2.1", "is not a domain name"),
        ("192.0.2.1", "localhost", "is not a domain name"),
        ("192.0.2.1", "a..example.com", "is not a domain name"),
    ],
)
def test_what_cannot_be_checked_is_none(ip: str, domain: str, why: str) -> None:
    zone = ZoneLookups({})
    result = asyncio.run(check_host(zone, ip, domain, f"a@{domain}", "h"))
    assert result.result == "none"
    assert why in result.detail
    assert zone.lookups == 0


def test_check_spf_both_identities() -> None:
    zone = ZoneLookups(
        {
            ("example.com", "TXT"): ["v=spf1 ip4:192.0.2.1 -all"],
            ("mail.example.net", "TXT"): ["v=spf1 ~all"],
        }
    )
    mail, helo = asyncio.run(check_spf(zone, "192.0.2.1", "<Bob@Example.COM>", "mail.example.net"))
    assert mail == SpfResult(
        "pass",
        "mailfrom",
        "example.com",
        "Bob@Example.COM",
        mechanism="ip4:192.0.2.1",
        detail="example.com: 'ip4:192.0.2.1' matched 192.0.2.1",
    )
    assert (helo.result, helo.identity, helo.domain, helo.sender) == (
        "softfail",
        "helo",
        "mail.example.net",
        "postmaster@mail.example.net",
    )
    mail, helo = asyncio.run(check_spf(zone, "::ffff:192.0.2.1", "", "[192.0.2.1]"))
    assert (mail.result, mail.identity, helo.result, helo.identity) == (
        "none",
        "mailfrom",
        "none",
        "helo",
    )
    assert "not a domain name" in helo.detail


def test_null_sender_is_checked_once_as_postmaster_at_helo() -> None:
    zone = ZoneLookups({("mail.example.net", "TXT"): ["v=spf1 -all"]})
    mail, helo = asyncio.run(check_spf(zone, "192.0.2.1", "", "mail.example.net"))
    assert (mail.result, mail.identity, mail.sender) == (
        "fail",
        "mailfrom",
        "postmaster@mail.example.net",
    )
    assert (helo.result, helo.identity) == ("fail", "helo")
    assert zone.lookups == 1


def test_ipv4_mapped_client_is_ipv4() -> None:
    zone = ZoneLookups(
        {
            ("example.com", "TXT"): ["v=spf1 exists:%{ir}.%{v}.bl.example.com -all"],
            ("1.2.0.192.in-addr.bl.example.com", "A"): ["127.0.0.2"],
        }
    )
    result = asyncio.run(check_host(zone, "::ffff:192.0.2.1", "example.com", "a@example.com", "h"))
    assert result.result == "pass"


def test_huge_digit_transformer_means_every_part() -> None:
    assert explanation_of("%{d" + "9" * 5000 + "}") == "email.example.com"
    assert explanation_of("%{d0001}") == "com"


def test_include_of_a_malformed_domain_is_permerror() -> None:
    zone = ZoneLookups({("example.com", "TXT"): ["v=spf1 include:%{l}.example.com -all"]})
    sender = "x" * 64 + "@example.com"  # a 64-octet label: no DNS name
    result = asyncio.run(check_host(zone, "192.0.2.1", "example.com", sender, "h"))
    assert result.result == "permerror"
    assert "names no valid domain" in result.detail


class BrokenLookups(ZoneLookups):
    async def txt(self, name: str) -> Any:
        raise RuntimeError("a bug in a DNS layer")


def test_an_unexpected_error_is_temperror_not_an_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    zone = BrokenLookups({})
    result = asyncio.run(check_host(zone, "192.0.2.1", "example.com", "a@example.com", "h"))
    assert result.result == "temperror"
    assert "a bug in a DNS layer" in result.detail
    assert "SPF check of example.com for 192.0.2.1 failed" in caplog.text

"""DMARC (RFC 7489): organizational domains, the From domain, record discovery and parsing,
alignment, sp for subdomains, pct sampling and DNS trouble, on an in-memory zone."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakedns import ZoneLookups
from tachymail.mailauth.dkim import DkimResult
from tachymail.mailauth.dmarc import (
    DmarcResult,
    check_dmarc,
    from_domain,
    is_dmarc_record,
    organizational_domain,
    parse_record,
)
from tachymail.mailauth.spf import SpfResult


def spf(result: str, domain: str, identity: str = "mailfrom") -> SpfResult:
    return SpfResult(result, identity, domain, f"bounce@{domain}")


def dkim(result: str, domain: str, selector: str = "s1") -> DkimResult:
    return DkimResult(result, domain, selector, "rsa-sha256", "", "AbCdEfGh12345678")


def run(
    zone: dict[tuple[str, str], object],
    author: str | None,
    spf_result: SpfResult | None = None,
    dkim_results: Sequence[DkimResult] = (),
    rng: float = 0.0,
) -> tuple[DmarcResult, ZoneLookups]:
    lookups = ZoneLookups(zone)  # type: ignore[arg-type]
    result = asyncio.run(check_dmarc(lookups, author, spf_result, dkim_results, rng=lambda: rng))
    return result, lookups


# --------------------------------------------------------------------- organizational domain


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("example.com", "example.com"),
        ("mail.example.com", "example.com"),
        ("a.b.c.example.com", "example.com"),
        ("EXAMPLE.COM.", "example.com"),
        ("example.co.uk", "example.co.uk"),
        ("a.b.example.co.uk", "example.co.uk"),
        ("shop.example.com.au", "example.com.au"),
        ("news.bbc.co.uk", "bbc.co.uk"),
        ("x.kawasaki.jp", "x.kawasaki.jp"),  # *.kawasaki.jp is a wildcard public suffix
        ("y.x.kawasaki.jp", "y.x.kawasaki.jp"),
        ("city.kawasaki.jp", "city.kawasaki.jp"),  # !city.kawasaki.jp: an exception rule
        ("a.city.kawasaki.jp", "city.kawasaki.jp"),
        ("me.github.io", "me.github.io"),  # the list's private section counts
        ("www.me.github.io", "me.github.io"),
        ("host.example.unknowntld", "example.unknowntld"),  # unknown TLD: a public suffix
        ("co.uk", "co.uk"),  # a public suffix itself stays as it is
        ("com", "com"),
        ("", ""),
    ],
)
def test_organizational_domain(domain: str, org: str) -> None:
    assert organizational_domain(domain) == org


# --------------------------------------------------------------------- the From domain


@pytest.mark.parametrize(
    ("headers", "domain"),
    [
        (b"From: alice@Example.COM\r\n", "example.com"),
        (b'From: "Alice, Example" <alice@mail.example.org>\r\n', "mail.example.org"),
        (b"From: Alice\r\n <alice@example.net>\r\n", "example.net"),  # folded
        (b"From: alice@example.com\n", "example.com"),  # bare LF line ends
        (b"from: alice@example.com (comment)\r\n", "example.com"),
        (b"From: a@example.com, b@EXAMPLE.com\r\n", "example.com"),  # one domain, twice
        (b"From: a@example.com, b@example.org\r\n", None),  # two domains
        (b"From: a@example.com\r\nFrom: b@example.com\r\n", None),  # two From fields
        (b"Sender: a@example.com\r\n", None),  # no From field
        (b"From: undisclosed\r\n", None),  # no address
        (b"From: <>\r\n", None),
        (b"From: user@[192.0.2.1]\r\n", None),  # an address literal is no domain
        (b"From: \x00@\x00\r\n", None),  # control characters are no domain
        (b"From: a@exa_mple.com;x\r\n", None),
        ("From: jörg@bücher.example\r\n".encode(), "xn--bcher-kva.example"),  # SMTPUTF8
        (b"From: =?utf-8?q?J=C3=B6rg?= <j@example.com>\r\n", "example.com"),
    ],
)
def test_from_domain(headers: bytes, domain: str | None) -> None:
    message = b"Subject: hi\r\n" + headers + b"To: bob@example.net\r\n\r\nbody\r\n"
    assert from_domain(message) == domain


def test_from_in_the_body_is_not_a_from_field() -> None:
    message = b"From: a@example.com\r\nSubject: x\r\n\r\nFrom: b@example.org\r\n"
    assert from_domain(message) == "example.com"
    assert from_domain(b"Subject: x\r\n\r\nFrom: b@example.org\r\n") is None


# --------------------------------------------------------------------- record parsing


def test_record_defaults() -> None:
    record = parse_record(b"v=DMARC1; p=reject")
    assert (record.p, record.sp, record.adkim, record.aspf, record.pct) == (
        "reject",
        "",
        "r",
        "r",
        100,
    )
    assert record.rua == () and record.fo == "0"


def test_record_tags_case_space_unknown_and_repeats() -> None:
    record = parse_record(
        b"v=DMARC1 ;P = Quarantine ; SP=none;adkim=S; aspf = s ;pct=25; "
        b"rua=mailto:agg@example.com!10m, mailto:other@example.net; x-future=1; "
        b"garbage; fo=1:d; p=reject"
    )
    assert (record.p, record.sp, record.adkim, record.aspf, record.pct, record.fo) == (
        "quarantine",
        "none",
        "s",
        "s",
        25,
        "1:d",
    )
    assert record.rua == ("mailto:agg@example.com", "mailto:other@example.net")


@pytest.mark.parametrize(
    ("text", "pct", "adkim"),
    [
        (b"v=DMARC1; p=none; pct=abc; adkim=x", 100, "r"),
        (b"v=DMARC1; p=none; pct=250", 100, "r"),
        (b"v=DMARC1; p=none; pct=0", 0, "r"),
        (b"v=DMARC1; p=none; pct=-5", 100, "r"),
        (b"v=DMARC1; p=none; pct=", 100, "r"),
    ],
)
def test_invalid_values_take_the_default(text: bytes, pct: int, adkim: str) -> None:
    record = parse_record(text)
    assert (record.pct, record.adkim) == (pct, adkim)


def test_missing_p_with_a_valid_rua_reads_as_none() -> None:
    record = parse_record(b"v=DMARC1; rua=mailto:dmarc@example.com")
    assert record.p == "none" and record.sp == ""
    record = parse_record(b"v=DMARC1; p=reject; sp=bogus; rua=mailto:dmarc@example.com")
    assert (record.p, record.sp) == ("none", "")


@pytest.mark.parametrize(
    "text",
    [
        b"v=DMARC1",
        b"v=DMARC1; p=block",
        b"v=DMARC1; p=reject; sp=bogus",
        b"v=DMARC1; rua=not a uri",
        b"v=DMARC1; pct=100; rua=",
    ],
)
def test_no_valid_policy_and_no_rua_is_an_error(text: bytes) -> None:
    with pytest.raises(ValueError):
        parse_record(text)


@pytest.mark.parametrize(
    ("text", "is_record"),
    [
        (b"v=DMARC1; p=none", True),
        (b"v=DMARC1;p=none", True),
        (b"v = DMARC1 ; p=none", True),
        (b"V=DMARC1; p=none", True),
        (b"v=DMARC1", True),
        (b"v=dmarc1; p=none", False),  # the version value is case-sensitive (ABNF %x)
        (b"p=none; v=DMARC1", False),  # v= must come first
        (b"v=DMARC10; p=none", False),
        (b"v=spf1 -all", False),
        (b" v=DMARC1; p=none", False),
        (b"", False),
    ],
)
def test_is_dmarc_record(text: bytes, is_record: bool) -> None:
    assert is_dmarc_record(text) is is_record


# --------------------------------------------------------------------- discovery

ZONE: dict[tuple[str, str], object] = {
    ("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject; sp=quarantine"],
    ("_dmarc.own.example.com", "TXT"): ["v=DMARC1; p=none; sp=reject"],
    ("_dmarc.example.co.uk", "TXT"): ["v=DMARC1; p=quarantine"],
    ("_dmarc.co.uk", "TXT"): ["v=DMARC1; p=reject"],  # must never be consulted
}


def test_record_at_the_from_domain() -> None:
    result, lookups = run(ZONE, "example.com", spf("pass", "example.com"))
    assert (result.result, result.record_domain, result.policy) == ("pass", "example.com", "reject")
    assert lookups.queries == [("_dmarc.example.com", "TXT")]


def test_record_at_the_organizational_domain() -> None:
    result, lookups = run(ZONE, "a.b.example.com")
    assert (result.result, result.record_domain) == ("fail", "example.com")
    assert lookups.queries == [("_dmarc.a.b.example.com", "TXT"), ("_dmarc.example.com", "TXT")]


def test_multi_level_public_suffix_is_never_the_policy_domain() -> None:
    result, lookups = run(ZONE, "mail.example.co.uk")
    assert (result.result, result.record_domain, result.policy) == (
        "fail",
        "example.co.uk",
        "quarantine",
    )
    assert ("_dmarc.co.uk", "TXT") not in lookups.queries
    result, lookups = run(ZONE, "other.co.uk")
    assert (result.result, result.record_domain) == ("none", "")
    assert lookups.queries == [("_dmarc.other.co.uk", "TXT")]  # it is its own org domain


def test_no_record_is_none() -> None:
    result, lookups = run(ZONE, "mail.example.org", spf("pass", "mail.example.org"))
    assert (result.result, result.policy, result.disposition) == ("none", "none", "none")
    assert lookups.queries == [("_dmarc.mail.example.org", "TXT"), ("_dmarc.example.org", "TXT")]


def test_other_txt_records_are_ignored() -> None:
    zone = {("_dmarc.example.com", "TXT"): ["v=spf1 -all", "hello", "v=DMARC1; p=reject"]}
    result, _ = run(zone, "example.com")
    assert (result.result, result.policy) == ("fail", "reject")


def test_several_records_mean_no_dmarc() -> None:
    zone = {
        ("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject", "v=DMARC1; p=none"],
        ("_dmarc.sub.example.com", "TXT"): ["v=DMARC1; p=reject", "v=DMARC1; p=reject"],
    }
    result, _ = run(zone, "example.com")
    assert (result.result, result.disposition, result.record_domain) == (
        "none",
        "none",
        "example.com",
    )
    assert "2 DMARC records" in result.detail
    # several at the From domain end discovery there: no fallback to the org domain
    result, lookups = run(zone, "sub.example.com")
    assert result.result == "none"
    assert lookups.queries == [("_dmarc.sub.example.com", "TXT")]


def test_an_invalid_record_is_permerror_and_stops_discovery() -> None:
    zone = {
        ("_dmarc.sub.example.com", "TXT"): ["v=DMARC1; p=bogus"],
        ("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject"],
    }
    result, lookups = run(zone, "sub.example.com")
    assert (result.result, result.disposition, result.record_domain) == (
        "permerror",
        "none",
        "sub.example.com",
    )
    assert lookups.queries == [("_dmarc.sub.example.com", "TXT")]


def test_a_record_without_p_but_with_rua_is_p_none() -> None:
    zone = {("_dmarc.example.com", "TXT"): ["v=DMARC1; rua=mailto:d@example.com"]}
    result, _ = run(zone, "example.com")
    assert (result.result, result.policy, result.disposition) == ("fail", "none", "none")


def test_no_single_from_domain_is_permerror() -> None:
    result, lookups = run(ZONE, None)
    assert (result.result, result.from_domain, result.disposition) == ("permerror", "", "none")
    assert lookups.queries == []


@pytest.mark.parametrize(
    "zone",
    [
        {("_dmarc.sub.example.com", "TXT"): "TIMEOUT"},
        {("_dmarc.example.com", "TXT"): "TIMEOUT"},
    ],
)
def test_dns_trouble_is_temperror(zone: dict[tuple[str, str], object]) -> None:
    result, _ = run(zone, "sub.example.com", spf("pass", "sub.example.com"))
    assert (result.result, result.disposition) == ("temperror", "none")
    assert "timeout" in result.detail


def test_nxdomain_at_both_is_none() -> None:
    zone = {("_dmarc.sub.example.com", "TXT"): "NXDOMAIN"}
    result, lookups = run(zone, "sub.example.com")
    assert result.result == "none"
    assert len(lookups.queries) == 2


# --------------------------------------------------------------------- alignment


def zone_with(record: str) -> dict[tuple[str, str], object]:
    return {("_dmarc.example.com", "TXT"): [record]}


@pytest.mark.parametrize(
    ("record", "author", "spf_result", "dkim_results", "expected"),
    [
        # SPF, relaxed: same organizational domain
        ("v=DMARC1; p=reject", "example.com", spf("pass", "bounce.example.com"), (), (True, False)),
        ("v=DMARC1; p=reject", "news.example.com", spf("pass", "example.com"), (), (True, False)),
        # SPF, strict: equal names only
        (
            "v=DMARC1; p=reject; aspf=s",
            "example.com",
            spf("pass", "example.com"),
            (),
            (True, False),
        ),
        (
            "v=DMARC1; p=reject; aspf=s",
            "example.com",
            spf("pass", "b.example.com"),
            (),
            (False, False),
        ),
        # SPF that did not pass, or for another organization, does not count
        ("v=DMARC1; p=reject", "example.com", spf("softfail", "example.com"), (), (False, False)),
        ("v=DMARC1; p=reject", "example.com", spf("neutral", "example.com"), (), (False, False)),
        ("v=DMARC1; p=reject", "example.com", spf("pass", "example.net"), (), (False, False)),
        (
            "v=DMARC1; p=reject",
            "example.com",
            spf("pass", "example.com.evil.test"),
            (),
            (False, False),
        ),
        # the null sender: SPF checked the HELO identity, which aligns like any other
        (
            "v=DMARC1; p=reject",
            "example.com",
            spf("pass", "mx.example.com", "helo"),
            (),
            (True, False),
        ),
        # DKIM, relaxed and strict
        (
            "v=DMARC1; p=reject",
            "example.com",
            None,
            (dkim("pass", "mail.example.com"),),
            (False, True),
        ),
        (
            "v=DMARC1; p=reject; adkim=s",
            "example.com",
            None,
            (dkim("pass", "mail.example.com"),),
            (False, False),
        ),
        (
            "v=DMARC1; p=reject; adkim=s",
            "example.com",
            None,
            (dkim("pass", "EXAMPLE.com"),),
            (False, True),
        ),
        # only a passing signature counts; any one of several is enough
        ("v=DMARC1; p=reject", "example.com", None, (dkim("fail", "example.com"),), (False, False)),
        (
            "v=DMARC1; p=reject",
            "example.com",
            None,
            (dkim("temperror", "example.com"),),
            (False, False),
        ),
        (
            "v=DMARC1; p=reject",
            "example.com",
            None,
            (
                dkim("pass", "mailer.example.net"),
                dkim("fail", "example.com"),
                dkim("pass", "example.com"),
            ),
            (False, True),
        ),
        # strict SPF but relaxed DKIM in one record
        (
            "v=DMARC1; p=reject; aspf=s",
            "example.com",
            spf("pass", "b.example.com"),
            (dkim("pass", "d.example.com"),),
            (False, True),
        ),
    ],
)
def test_alignment(
    record: str,
    author: str,
    spf_result: SpfResult | None,
    dkim_results: tuple[DkimResult, ...],
    expected: tuple[bool, bool],
) -> None:
    result, _ = run(zone_with(record), author, spf_result, dkim_results)
    assert (result.spf_aligned, result.dkim_aligned) == expected
    assert result.result == ("pass" if any(expected) else "fail")
    if result.result == "pass":
        assert result.disposition == "none"


def test_relaxed_alignment_across_a_multi_level_suffix() -> None:
    zone = {("_dmarc.example.co.uk", "TXT"): ["v=DMARC1; p=reject"]}
    result, _ = run(zone, "example.co.uk", spf("pass", "other.co.uk"))
    assert result.result == "fail"  # same public suffix is not the same organization
    result, _ = run(zone, "example.co.uk", spf("pass", "bounces.example.co.uk"))
    assert result.result == "pass"


# --------------------------------------------------------------------- sp and pct


@pytest.mark.parametrize(
    ("author", "policy"),
    [
        ("example.com", "reject"),  # the organizational domain: p
        ("sub.example.com", "quarantine"),  # a subdomain, record at the org domain: sp
        ("own.example.com", "none"),  # a subdomain with its own record: its p, not its sp
        ("x.own.example.com", "quarantine"),  # under it: the org domain's record, sp
    ],
)
def test_sp_applies_to_subdomains(author: str, policy: str) -> None:
    result, _ = run(ZONE, author)
    assert (result.result, result.policy, result.disposition) == ("fail", policy, policy)


def test_without_sp_subdomains_get_p() -> None:
    result, _ = run(zone_with("v=DMARC1; p=reject"), "sub.example.com")
    assert (result.policy, result.disposition) == ("reject", "reject")


@pytest.mark.parametrize(
    ("record", "draw", "disposition"),
    [
        ("v=DMARC1; p=reject; pct=50", 0.49, "reject"),
        ("v=DMARC1; p=reject; pct=50", 0.50, "quarantine"),  # not selected: one lower
        ("v=DMARC1; p=quarantine; pct=50", 0.99, "none"),
        ("v=DMARC1; p=quarantine; pct=50", 0.0, "quarantine"),
        ("v=DMARC1; p=reject; pct=0", 0.0, "quarantine"),  # pct=0 selects nothing
        ("v=DMARC1; p=reject", 0.999999, "reject"),  # pct=100 selects everything
        ("v=DMARC1; p=none; pct=10", 0.9, "none"),
    ],
)
def test_pct_sampling(record: str, draw: float, disposition: str) -> None:
    result, _ = run(zone_with(record), "example.com", rng=draw)
    assert result.result == "fail"
    assert result.policy == record.split("p=")[1].split(";")[0]
    assert result.disposition == disposition


def test_pct_sampling_is_a_fraction_of_messages() -> None:
    draws = iter([i / 100 for i in range(100)])
    zone = ZoneLookups(zone_with("v=DMARC1; p=reject; pct=30"))  # type: ignore[arg-type]

    async def all_of_them() -> list[str]:
        return [
            (await check_dmarc(zone, "example.com", None, (), rng=lambda: next(draws))).disposition
            for _ in range(100)
        ]

    dispositions = asyncio.run(all_of_them())
    assert dispositions.count("reject") == 30
    assert dispositions.count("quarantine") == 70


def test_a_pass_is_never_sampled() -> None:
    calls: list[int] = []

    def rng() -> float:
        calls.append(1)
        return 0.0

    zone = ZoneLookups(zone_with("v=DMARC1; p=reject; pct=50"))  # type: ignore[arg-type]
    result = asyncio.run(check_dmarc(zone, "example.com", spf("pass", "example.com"), (), rng=rng))
    assert (result.result, result.disposition, calls) == ("pass", "none", [])


@pytest.mark.parametrize(
    "record",
    [
        "v=DMARC1; p=reject; \x00\x01; adkim=\xff",
        "v=DMARC1; p=reject;;;;;",
        "v=DMARC1; p=reject; " + "x=" * 5000,
        "v=DMARC1; p=reject; rua=mailto:" + "a" * 10000,
    ],
)
def test_hostile_records_do_not_raise(record: str) -> None:
    result, _ = run(zone_with(record), "example.com")
    assert (result.result, result.policy) == ("fail", "reject")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_from_field_gives_a_host_name_or_none(value: bytes) -> None:
    domain = from_domain(b"From: " + value + b"\r\nSubject: x\r\n\r\nbody")
    assert domain is None or re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", domain)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_record_parses_or_is_refused(value: bytes) -> None:
    try:
        record = parse_record(b"v=DMARC1;" + value)
    except ValueError:
        return
    assert record.p in ("none", "quarantine", "reject") and 0 <= record.pct <= 100

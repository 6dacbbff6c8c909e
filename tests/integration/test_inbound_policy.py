"""The InboundChecker's decisions (what the SMTP session does with a message) on real DNS:
dnsmasq on a loopback port publishing SPF, DKIM, DMARC and ARC records, read through the
real resolver. The modes, the DMARC policy settings, SPF rejection at MAIL, temporary DNS
failures, forged Authentication-Results, ARC sealing of relayed mail, DMARC aggregate data."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnsserver import DnsRecords, DnsServer, running_dnsmasq
from tachymail.config import from_dict
from tachymail.dns import Records, Resolver
from tachymail.mailauth.arc import verify_arc
from tachymail.mailauth.dkim import DkimSigner, dns_record, keygen
from tachymail.mailauth.inbound import QUARANTINE_HEADER, InboundChecker, MessageVerdict
from tachymail.mailauth.reports import DmarcReports

T = TypeVar("T")

AUTHSERV = "mx.receiver.test"
GOOD_IP = "192.0.2.10"
STRANGER_IP = "203.0.113.5"


def message(sender: str, body: bytes = b"Hello.\r\n") -> bytes:
    return (
        f"From: {sender}\r\nTo: bob@receiver.test\r\nSubject: test\r\n"
        f"Message-ID: <{time.time_ns()}@x.test>\r\n\r\n"
    ).encode() + body


def txt_strings(record: str) -> str:
    return "".join(re.findall(r'"([^"]*)"', record))


@dataclass
class Setup:
    dns: DnsServer
    data: Path
    signer: DkimSigner


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("inbound")
    data = base / "data"
    keygen(data, "signed.test", "s1")
    keygen(data, "relay.test", "arc1")
    records = (
        DnsRecords()
        .txt("s1._domainkey.signed.test", txt_strings(dns_record(data, "signed.test", "s1")))
        .txt("arc1._domainkey.relay.test", txt_strings(dns_record(data, "relay.test", "arc1")))
        .txt("signed.test", "v=spf1 ip4:192.0.2.0/25 -all")
        .txt("_dmarc.signed.test", "v=DMARC1; p=reject")
        .txt("explained.test", "v=spf1 -all exp=why.explained.test")
        .txt("why.explained.test", "Mail from %{d} comes only from its own servers")
        .txt("bulk.test", "v=spf1 ip4:198.51.100.0/24 -all")
        .txt("_dmarc.bulk.test", "v=DMARC1; p=quarantine")
        .txt("sampled.test", "v=spf1 -all")
        .txt("_dmarc.sampled.test", "v=DMARC1; p=reject; pct=0")
        .txt("_dmarc.tmp.test", "v=DMARC1; p=reject")
        .unanswered("sub.tmp.test")
        .unanswered("slow.test")
    )
    with running_dnsmasq(base / "dns", records) as dns_server:
        yield Setup(dns_server, data, DkimSigner(data, {"signed.test": "s1"}))


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def checker(setup: Setup, **mailauth: Any) -> InboundChecker:
    config = from_dict(
        {
            "server": {"hostname": AUTHSERV, "data_dir": str(setup.data)},
            "mailauth": {"dmarc_reports": False, **mailauth},
        }
    )
    return InboundChecker(config, Resolver(setup.dns.address, timeout=1.0))


def evaluate(
    check: InboundChecker,
    content: bytes,
    *,
    ip: str = STRANGER_IP,
    helo: str = "client.test",
    mail_from: str,
    mode: str = "enforce",
    relay: bool = False,
) -> MessageVerdict:
    async def go() -> MessageVerdict:
        mail = await check.mail(ip, helo, mail_from)
        iprev = await check.iprev(ip)
        return await check.message(
            ip=ip,
            helo=helo,
            mail_from=mail_from,
            mail=mail,
            iprev=iprev,
            content=content,
            mode=mode,
            relay=relay,
        )

    return run(go())


def unfolded(headers: bytes) -> str:
    return re.sub(r"\r\n(?=[ \t])", "", headers.decode("ascii"))


# -- the modes and the DMARC policy settings --------------------------------------------------


def test_enforce_rejects_and_tag_only_tells(setup: Setup) -> None:
    check = checker(setup)
    forged = message("ceo@signed.test")
    enforced = evaluate(check, forged, mail_from="ceo@evil.test")
    assert enforced.action == "reject"
    assert enforced.reply is not None and enforced.reply.startswith(b"550 5.7.1 ")
    assert b"signed.test" in enforced.reply and enforced.reply.endswith(b"\r\n")
    tagged = evaluate(check, forged, mail_from="ceo@evil.test", mode="tag")
    assert (tagged.action, tagged.reply) == ("accept", None)
    assert "dmarc=fail (p=reject dis=reject) header.from=signed.test" in unfolded(tagged.headers)
    assert ("dmarc", "fail") in tagged.results
    assert "dmarc=fail" in tagged.summary


def test_a_signed_message_is_accepted_with_the_header_on_top(setup: Setup) -> None:
    content = message("alice@signed.test")
    signed = setup.signer.sign(content, "signed.test") + content
    verdict = evaluate(checker(setup), signed, mail_from="alice@signed.test")
    assert (verdict.action, verdict.reply) == ("accept", None)
    assert verdict.headers.startswith(f"Authentication-Results: {AUTHSERV};\r\n".encode())
    assert verdict.headers.count(b"\r\n\t") == 6  # one line per method, folded, CRLF
    assert verdict.content is signed
    assert verdict.results == (
        ("spf", "fail"),
        ("spf_helo", "none"),
        ("dkim", "pass"),
        ("dmarc", "pass"),
        ("arc", "none"),
        ("iprev", "permerror"),
    )
    assert verdict.summary == (
        "spf=fail spf_helo=none dkim=pass dmarc=pass arc=none iprev=permerror"
    )


@pytest.mark.parametrize(
    ("settings", "action", "quarantine_header"),
    [
        ({"dmarc_reject": "quarantine"}, "quarantine", False),
        ({"dmarc_reject": "quarantine", "dmarc_quarantine": "header"}, "accept", True),
        ({"dmarc_reject": "none"}, "accept", False),
    ],
)
def test_what_a_reject_policy_gets(
    setup: Setup, settings: dict[str, str], action: str, quarantine_header: bool
) -> None:
    verdict = evaluate(checker(setup, **settings), message("ceo@signed.test"), mail_from="")
    assert (verdict.action, verdict.reply) == (action, None)
    assert (QUARANTINE_HEADER in verdict.headers) is quarantine_header
    assert verdict.headers.startswith(b"Authentication-Results: ")


def test_quarantine_policy_holds_or_marks(setup: Setup) -> None:
    content = message("news@bulk.test")
    held = evaluate(checker(setup), content, mail_from="news@bulk.test")
    assert (held.action, held.reply) == ("quarantine", None)
    marked = evaluate(checker(setup, dmarc_quarantine="header"), content, mail_from="")
    assert marked.action == "accept"
    assert marked.headers.endswith(b"\r\n" + QUARANTINE_HEADER)
    passing = evaluate(checker(setup), content, ip="198.51.100.9", mail_from="news@bulk.test")
    assert passing.action == "accept" and QUARANTINE_HEADER not in passing.headers


def test_pct_sampling_lowers_reject_to_quarantine(setup: Setup) -> None:
    verdict = evaluate(checker(setup), message("x@sampled.test"), mail_from="x@sampled.test")
    assert verdict.action == "quarantine"
    assert 'reason="not selected by pct=0"' in unfolded(verdict.headers)


def test_checks_that_are_off_are_not_run_or_reported(setup: Setup) -> None:
    check = checker(setup, spf=False, dkim=False, dmarc=False, arc=False, iprev=False)
    verdict = evaluate(check, message("ceo@signed.test"), mail_from="ceo@evil.test")
    assert verdict.headers == f"Authentication-Results: {AUTHSERV}; none\r\n".encode()
    assert (verdict.action, verdict.results, verdict.summary) == ("accept", (), "")


# -- SPF at MAIL FROM ---------------------------------------------------------------------------


def test_spf_fail_is_refused_at_mail_only_when_configured(setup: Setup) -> None:
    default = run(checker(setup).mail(STRANGER_IP, "client.test", "alice@signed.test"))
    assert default.spf is not None and default.spf.result == "fail"
    assert default.reply is None, "DMARC decides by default (RFC 7489)"
    strict = checker(setup, spf_reject_fail=True)
    refused = run(strict.mail(STRANGER_IP, "client.test", "alice@signed.test"))
    assert refused.reply == (
        b"550 5.7.23 <alice@signed.test>: Sender address rejected: SPF check failed: "
        b"signed.test does not designate 203.0.113.5 as permitted sender\r\n"
    )
    explained = run(strict.mail(STRANGER_IP, "client.test", "bob@explained.test"))
    assert explained.reply == (
        b"550 5.7.23 <bob@explained.test>: Sender address rejected: SPF check failed: "
        b"Mail from explained.test comes only from its own servers\r\n"
    )
    allowed = run(strict.mail(GOOD_IP, "client.test", "<alice@signed.test>"))
    assert allowed.spf is not None and allowed.spf.result == "pass" and allowed.reply is None
    off = run(checker(setup, spf=False).mail(STRANGER_IP, "client.test", "alice@signed.test"))
    assert (off.spf, off.helo, off.reply) == (None, None, None)


# -- temporary DNS failures --------------------------------------------------------------------


def test_an_aligned_spf_temperror_defers_instead_of_rejecting(setup: Setup) -> None:
    verdict = evaluate(checker(setup), message("ceo@tmp.test"), mail_from="ceo@sub.tmp.test")
    assert ("spf", "temperror") in verdict.results
    assert verdict.action == "reject"
    assert verdict.reply is not None and verdict.reply.startswith(b"451 4.4.3 ")
    # a temperror for a domain that could never align changes nothing
    unaligned = evaluate(checker(setup), message("ceo@signed.test"), mail_from="ceo@slow.test")
    assert ("spf", "temperror") in unaligned.results
    assert unaligned.reply is not None and unaligned.reply.startswith(b"550 5.7.1 ")


class BrokenLookups:
    """A DNS client with a bug: every lookup raises (the checks must not let it escape)."""

    async def txt(self, name: str) -> Records:
        raise RuntimeError("resolver bug")

    a = aaaa = mx_records = txt

    async def ptr(self, address: str) -> Records:
        raise RuntimeError("resolver bug")


def test_a_check_that_crashes_is_a_temperror_not_an_exception(setup: Setup) -> None:
    config = from_dict({"server": {"hostname": AUTHSERV}, "mailauth": {"dmarc_reports": False}})
    check = InboundChecker(config, BrokenLookups())
    content = message("ceo@signed.test")
    signed = setup.signer.sign(content, "signed.test") + content
    verdict = evaluate(check, signed, mail_from="ceo@signed.test")
    assert verdict.action in ("accept", "reject")
    assert verdict.reply is None or verdict.reply.startswith(b"4"), "never refused for good"
    methods = dict(verdict.results)
    assert methods["iprev"] == "temperror" and methods["dkim"] == "temperror"
    assert verdict.headers.startswith(b"Authentication-Results: ")


@pytest.mark.parametrize(
    ("content", "dkim", "dmarc", "action"),
    [
        (b"", "none", "permerror", "accept"),
        (b"\x00\xff\xfe not a message at all", "none", "permerror", "accept"),
        (b"From: a@b.test\r\nFrom: b@other.test\r\n\r\nbody\r\n", "none", "permerror", "accept"),
        (b"Subject: no from\r\n\r\n" + b"x" * 300_000, "none", "permerror", "accept"),
        # a signature with syntax errors is neutral (RFC 8601 §2.7.1): DMARC fails, rejects
        (
            b"From: a@signed.test\r\nDKIM-Signature: v=1; a=rsa-sha256; d=signed.test; b=\r\n\r\nx",
            "neutral",
            "fail",
            "reject",
        ),
    ],
)
def test_malformed_messages_get_results_not_exceptions(
    setup: Setup, content: bytes, dkim: str, dmarc: str, action: str
) -> None:
    verdict = evaluate(checker(setup), content, mail_from="a@signed.test")
    assert verdict.headers.startswith(b"Authentication-Results: ")
    methods = dict(verdict.results)
    assert (methods["dkim"], methods["dmarc"], verdict.action) == (dkim, dmarc, action)


# -- forged fields, ARC sealing, aggregate data ------------------------------------------------


def test_forged_authentication_results_are_removed(setup: Setup) -> None:
    content = message("alice@signed.test")
    forged = (
        b"Authentication-Results: MX.RECEIVER.TEST; dmarc=pass header.from=signed.test\r\n"
        b"Authentication-Results: upstream.test; spf=pass\r\n" + content
    )
    verdict = evaluate(checker(setup), forged, ip=GOOD_IP, mail_from="alice@signed.test")
    assert verdict.content == b"Authentication-Results: upstream.test; spf=pass\r\n" + content
    assert verdict.headers.count(b"Authentication-Results:") == 1


def test_relayed_mail_is_sealed_and_the_seal_verifies(setup: Setup) -> None:
    check = checker(setup, arc_seal={"domain": "relay.test", "selector": "arc1"})
    content = message("alice@signed.test")
    signed = setup.signer.sign(content, "signed.test") + content
    relayed = evaluate(check, signed, ip=GOOD_IP, mail_from="alice@signed.test", relay=True)
    fields = re.split(rb"\r\n(?=\S)", relayed.headers.removesuffix(b"\r\n"))
    assert [f.split(b":")[0] for f in fields] == [
        b"ARC-Seal",
        b"ARC-Message-Signature",
        b"ARC-Authentication-Results",
        b"Authentication-Results",
    ]
    assert all(re.search(rb"[;:]\s*i=1;", f) for f in fields[:3])
    aar = re.search(rb"\r\nARC-Authentication-Results: i=1; (.*?)\r\n(?=\S)", relayed.headers, re.S)
    assert aar is not None and aar.group(1).startswith(AUTHSERV.encode())
    assert b"dkim=pass" in aar.group(1)
    out = relayed.headers + relayed.content
    chain = run(verify_arc(Resolver(setup.dns.address, timeout=1.0), out))
    assert (chain.result, chain.instance) == ("pass", 1)
    local = evaluate(check, signed, ip=GOOD_IP, mail_from="alice@signed.test", relay=False)
    assert b"ARC-Seal" not in local.headers


def test_dmarc_aggregate_data_is_recorded(setup: Setup, tmp_path: Path) -> None:
    config = from_dict(
        {
            "server": {"hostname": AUTHSERV, "data_dir": str(tmp_path)},
            "mailauth": {"dmarc_reports": True},
        }
    )
    check = InboundChecker(config, Resolver(setup.dns.address, timeout=1.0))
    start = time.time()
    evaluate(check, message("ceo@signed.test"), mail_from="ceo@evil.test")
    check.flush()
    xml = DmarcReports(tmp_path).report(
        "signed.test", start - 60, time.time() + 60, reporter=AUTHSERV, email="p@receiver.test"
    )
    assert f"<source_ip>{STRANGER_IP}</source_ip>".encode() in xml
    assert b"<disposition>reject</disposition>" in xml
    off = checker(setup)
    assert off.reports is None

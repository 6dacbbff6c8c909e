"""What the per-message shortcuts of the inbound checks must not change: the From domain
found without the stdlib parser, the DMARC aggregate rows whose keys are remembered, the
Authentication-Results words that are cached, and the tasks the checker starts."""

from __future__ import annotations

import asyncio
import time
import xml.etree.ElementTree as ET
from email.parser import HeaderParser
from email.policy import compat32
from pathlib import Path

import dkim as dkimpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakedns import ZoneLookups
from tachymail.config import Config
from tachymail.mailauth import dkim, dmarc
from tachymail.mailauth.arc import may_have_arc_sets
from tachymail.mailauth.dkim import DkimResult, read_header
from tachymail.mailauth.dmarc import DmarcRecord, DmarcResult, from_domain
from tachymail.mailauth.inbound import InboundChecker, MailVerdict, MessageVerdict
from tachymail.mailauth.iprev import IprevResult
from tachymail.mailauth.reports import DAY, DmarcReports
from tachymail.mailauth.results import authentication_results, remove_forged
from tachymail.mailauth.spf import SpfResult

# lines a header block is made of: plain fields, folded ones, odd ones the parser handles
# its own way (mbox From_, no colon, empty name, space before the colon, a lone CR), UTF-8
LINES = [
    b"From: News <news@a.example>\r\n",
    b"from:  <x@b.example>\r\n",
    b"FROM:\r\n",
    b" c@c.example\r\n",
    b"\tNamed <d@a.example>\n",
    b"To: z@e.example\r\n",
    b"From a@b.example Sat Jan  3 01:05:34 1996\r\n",
    b"Not a field\r\n",
    b":empty name\r\n",
    b"From : spaced@a.example\r\n",
    b"Sub\rject: x\r\n",
    b"From: \xc3\xa9l\xc3\xa8ve <e@\xc3\xa9cole.example>\r\n",
    b"From: bad \xff <f@a.example>\r\n",
    b"From: a@a.example, b@a.example\r\n",
    b"From: a@a.example, b@b.example\r\n",
    b"\r\n",
    b"\n",
    b"body line\r\n",
    b"From: no-break@a.example",
]


def reference(content: bytes) -> str | None:
    """from_domain as the stdlib parser alone gives it (the code before the shortcut)."""
    end = dmarc._header_end(content)
    text = content[:end].decode("utf-8", "replace")
    fields = HeaderParser(policy=compat32).parsestr(text).get_all("From") or []
    if len(fields) != 1:
        return None
    return dmarc._author_domain(str(fields[0]))


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from(LINES), max_size=9))
def test_from_domain_is_the_stdlib_parsers(lines: list[bytes]) -> None:
    content = b"".join(lines)
    assert from_domain(content) == reference(content)


def test_from_domain_of_plain_and_folded_headers() -> None:
    assert from_domain(b"To: x@y.example\r\nFrom: N <n@News.Example>\r\n\r\nbody") == (
        "news.example"
    )
    assert from_domain(b"From:\r\n N <n@a.example>,\r\n\tM <m@a.example>\r\n\r\n") == "a.example"
    assert from_domain(b"From: n@a.example\r\nFrom: n@a.example\r\n\r\n") is None
    assert from_domain(b"Subject: no author\r\n\r\nFrom: n@a.example\r\n") is None


# plain lines and the fields the checks look for, to build header blocks with
BLOCK_LINES = [
    *LINES,
    b"From-Address: x@z.example\r\n",
    b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=a.example; s=s; b=AAAA\r\n",
    b"arc-authentication-results: i=1; mx.a.example; spf=pass\r\n",
    b"Authentication-Results: mx.test; spf=pass\r\n",
    b"Authentication-Results: other.example; dkim=pass\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=a.example; s=s; h=from:to; bh=AAAA; b=BBBB\r\n",
    b"dkim-signature: v=1; a=rsa-sha256; d=a.example; s=s; h=subject; bh=AAAA;\r\n\tb=CC CC\r\n",
    b"DKIM-Signature: v=2\r\n",
    b"Received: from x (x [192.0.2.1])\r\n\tby mx.test; Tue, 1 Dec 2026 12:00:00 +0000\r\n",
]


@settings(max_examples=800, deadline=None)
@given(st.lists(st.sampled_from(BLOCK_LINES), max_size=10), st.sampled_from([b"", b"\r\nbody\r\n"]))
def test_a_header_read_once_tells_every_check_the_same(lines: list[bytes], end: bytes) -> None:
    """The header block read once (read_header, for the checks that need no wait) gives
    each check what it finds reading the message itself: the From domain, whether ARC
    fields may be there, the DKIM signatures and fields, and whether a forged
    Authentication-Results field is there to remove."""
    content = b"".join(lines) + end
    block = read_header(content)
    if block is None:
        return
    assert from_domain(content, block) == from_domain(content)
    assert may_have_arc_sets(content, block) == may_have_arc_sets(content)
    now = time.time()
    shared = dkim._parse_signatures(content, 5, now, block)
    alone = dkim._parse_signatures(content, 5, now)
    assert (shared.signatures, shared.body_at) == (alone.signatures, alone.body_at)
    if alone.signatures:  # the fields are read for the signatures alone
        assert (shared.headers, shared.lower) == (alone.headers, alone.lower)
    if b"authentication-results" not in block.lower:
        assert remove_forged(content, "mx.test") == (content, 0)


def test_only_a_plain_header_is_read_once() -> None:
    plain = b"From: n@a.example\r\nSubject: x\r\n y\r\n\r\nbody\r\n"
    block = read_header(plain)
    assert block is not None
    assert block.lower == [b"from", b"subject"]
    assert block.fields[1] == (b"Subject", b" x\r\n y\r\n")
    assert plain[block.body_at :] == b"body\r\n"
    for odd in (
        b"From: n@a.example\nSubject: x\n\nbody\n",  # LF line ends
        b"From a@b.example Sat Jan  3 01:05:34 1996\r\nFrom: n@a.example\r\n\r\n",
        b"From: n@a.example\r\nNot a field\r\n\r\n",
        b"From: n@a.example\r\nSubject: no body separator\r\n",
        b"\r\nbody only\r\n",
    ):
        assert read_header(odd) is None, odd


SIGNATURE = {
    b"v": b"1",
    b"a": b"rsa-sha256",
    b"c": b"relaxed/relaxed",
    b"d": b"a.example",
    b"s": b"s1",
    b"t": b"1796222618",
    b"h": b"from:to:subject",
    b"bh": b"27f60izVMUGWfssIHR/tB1gNnPNH9qENURSB+xbTb/4=",
    b"b": b"bYUBKV1ffMdmw47QunYW6R7p\r\n TQhWjHEYVVM/yWk+s1sSFkT+petGRz0De/jNYfTkhkXwf/==",
}
# values that dkimpy's checks treat in every way: fine, malformed, or left to dkimpy
TAG_VALUES = {
    b"v": [b"1", b"2", b""],
    b"a": [b"rsa-sha256", b"ed25519-sha256", b"rsa-sha1", b"rsa-md5", b"RSA-SHA256"],
    b"d": [b"a.example", b"a_b.example", b"a;b", b"\xc3\xa9.example", b"", b"-a.example"],
    b"t": [b"1796222618", b"99999999999", b"12a", b"", b"0"],
    b"q": [b"dns/txt", b"dns", b""],
    b"b": [b"AAAA", b"AAA", b"AA==", b"A A A A", b"AA!A", b"", b"=AAA"],
    b"bh": [b"AAAA", b"AAA", b"AA=A", b"****", b""],
    b"i": [b"@a.example", b"@b.example", b"a.example"],
    b"l": [b"10", b"x"],
    b"x": [b"1", b"99999999999"],
    b"cv": [b"none", b"bad"],
}


@settings(max_examples=1500, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(sorted(TAG_VALUES)),
        st.integers(min_value=0, max_value=6),
        max_size=4,
    ),
    st.sets(st.sampled_from(sorted(SIGNATURE)), max_size=2),
)
def test_plainly_valid_signatures_are_valid_to_dkimpy(
    changes: dict[bytes, int], dropped: set[bytes]
) -> None:
    """The quick tag check (_plainly_valid) only ever accepts what dkimpy accepts; anything
    else goes to dkimpy's own check, which words the error."""
    tags = {k: v for k, v in SIGNATURE.items() if k not in dropped}
    for tag, pick in changes.items():
        values = TAG_VALUES[tag]
        tags[tag] = values[pick % len(values)]
    if dkim._plainly_valid(tags):
        dkimpy.validate_signature_fields(tags)  # raises if the quick check was wrong


def test_the_common_signature_is_plainly_valid() -> None:
    assert dkim._plainly_valid(dict(SIGNATURE))
    with pytest.raises(dkimpy.ValidationError):
        dkimpy.validate_signature_fields({**SIGNATURE, b"t": b"99999999999"})
    assert not dkim._plainly_valid({**SIGNATURE, b"t": b"99999999999"})


RECORD = DmarcRecord(p="reject")
SPF = SpfResult("pass", "mailfrom", "a.example", "n@a.example")


def verdict(record: DmarcRecord = RECORD) -> DmarcResult:
    return DmarcResult("pass", "a.example", record.p, "none", True, False, "a.example", "", record)


def test_remembered_rows_still_count_apart(tmp_path: Path) -> None:
    day0 = (time.time() // DAY - 2) * DAY
    reports = DmarcReports(tmp_path)
    dkim_pass = (DkimResult("pass", "a.example", "s1", "rsa-sha256", "", "b1"),)
    dkim_fail = (DkimResult("fail", "a.example", "s1", "rsa-sha256", "", "b2"),)
    for _ in range(3):
        reports.add(verdict(), "192.0.2.1", "n@a.example", SPF, dkim_pass, when=day0 + 5)
    reports.add(verdict(), "192.0.2.1", "n@a.example", SPF, dkim_fail, when=day0 + 6)
    reports.add(verdict(), "192.0.2.2", "n@a.example", SPF, dkim_pass, when=day0 + 7)
    quarantine = DmarcRecord(p="quarantine")
    reports.add(verdict(quarantine), "192.0.2.1", "n@a.example", SPF, dkim_pass, when=day0 + DAY)
    reports.flush()
    kw = {"reporter": "mx.test", "email": "pm@mx.test"}
    first = ET.fromstring(reports.report("a.example", day0, day0 + DAY, **kw))
    rows = sorted(
        (
            r.findtext("row/source_ip"),
            r.findtext("auth_results/dkim/result"),
            r.findtext("row/count"),
        )
        for r in first.findall("record")
    )
    assert rows == [
        ("192.0.2.1", "fail", "1"),
        ("192.0.2.1", "pass", "3"),
        ("192.0.2.2", "pass", "1"),
    ]
    assert first.findtext("policy_published/p") == "reject"
    second = ET.fromstring(reports.report("a.example", day0 + DAY, day0 + 2 * DAY, **kw))
    assert second.findtext("policy_published/p") == "quarantine"
    assert [r.findtext("row/count") for r in second.findall("record")] == ["1"]


def test_cached_words_follow_the_results() -> None:
    iprev = IprevResult("pass", "mx.a.example", "", "192.0.2.1")
    other = SpfResult("fail", "mailfrom", "a.example", "n@a.example", detail="a.example: -all")
    first = authentication_results("mx.test", SPF, None, [], None, None, iprev)
    again = authentication_results("mx.test", SPF, None, [], None, None, iprev)
    failed = authentication_results("mx.test", other, None, [], None, None, None)
    assert first == again
    assert b"spf=pass smtp.mailfrom=n@a.example;\r\n\tiprev=pass" in first
    assert failed.endswith(b'\tspf=fail reason="a.example: -all" smtp.mailfrom=n@a.example\r\n')


ARC_MESSAGE = (
    b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=arc.example; s=s1; b=AAAA\r\n"
    b"From: n@a.example\r\nSubject: s\r\n\r\nbody\r\n"
)


def test_a_cancelled_check_leaves_no_task_running(tmp_path: Path) -> None:
    """ARC (a message with ARC fields) and the DMARC prefetch run in tasks of their own
    beside DKIM: cancelling the check (the client left) cancels them too."""
    config = Config()
    config.server.data_dir = str(tmp_path)
    zone = ZoneLookups({("s1._domainkey.arc.example", "TXT"): ["v=DKIM1; p="]}, delay=5.0)
    checker = InboundChecker(config, zone, record_reports=False)
    mail = MailVerdict(SPF, None, None)

    async def run() -> int:
        check = asyncio.ensure_future(
            checker.message(
                ip="192.0.2.1",
                helo="mx.a.example",
                mail_from="n@a.example",
                mail=mail,
                iprev=None,
                content=ARC_MESSAGE,
                mode="enforce",
                relay=False,
            )
        )
        await asyncio.sleep(0.2)
        assert zone.in_flight >= 2  # ARC's key and the DMARC record, side by side
        check.cancel()
        await asyncio.gather(check, return_exceptions=True)
        for _ in range(3):  # a cancelled task ends on its next turn
            await asyncio.sleep(0)
        return len(asyncio.all_tasks() - {asyncio.current_task()})

    assert asyncio.run(run()) == 0


class _CachedZone(ZoneLookups):
    """Lookups whose cache holds every record (the path without a task)."""

    def cached(self, kind: str, name: str) -> object:
        from tachymail.dns.resolver import Records

        values = self.records.get((name.rstrip(".").lower(), kind))
        return None if values is None else Records("ok", tuple(v.encode() for v in values))


def _checked_now(
    checker: InboundChecker, content: bytes, mail: MailVerdict, sender: str = "n@a.example"
) -> MessageVerdict:
    """The verdict message_now gives *content* from 192.0.2.1 (enforce mode, not relayed)."""
    verdict = checker.message_now(
        ip="192.0.2.1",
        helo="mx.a.example",
        mail_from=sender,
        mail=mail,
        iprev=None,
        content=content,
        mode="enforce",
        relay=False,
        crlf=True,
    )
    assert verdict is not None
    return verdict


@pytest.mark.parametrize("broken", ["verify_dkim_now", "check_dmarc_now"])
def test_a_check_that_raises_without_waiting_is_a_temperror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    """A bug in a check run in the event loop (message_now) is logged and reported as that
    method's temperror; the other checks still say what they found."""
    from tachymail.mailauth import inbound

    config = Config()
    config.server.data_dir = str(tmp_path)
    zone = _CachedZone({("_dmarc.a.example", "TXT"): ["v=DMARC1; p=none"]})
    checker = InboundChecker(config, zone, record_reports=False)
    content = b"From: News <n@a.example>\r\nSubject: x\r\n\r\nbody\r\n"

    def fault(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected fault")

    def check() -> str:
        return _checked_now(checker, content, MailVerdict(SPF, None, None)).summary

    assert "dkim=none dmarc=pass" in check()
    monkeypatch.setattr(inbound, broken, fault)
    if broken == "verify_dkim_now":
        assert "dkim=temperror dmarc=" in check()
    else:
        assert "dkim=none dmarc=temperror" in check()


def _signed(tmp_path: Path, domain: str) -> bytes:
    """A message signed with the key made for *domain* (selector s1) in *tmp_path*."""
    content = f"From: News <n@{domain}>\r\nTo: r@b.example\r\nSubject: quick\r\n\r\nHello.\r\n"
    signer = dkim.DkimSigner(tmp_path, {domain: "s1"})
    return signer.sign(content.encode(), domain, now=time.time()) + content.encode()


def _key_record(tmp_path: Path, domain: str) -> str:
    return "".join(dkim.dns_record(tmp_path, domain, "s1").split('"')[1::2])


def test_one_signers_shortcut_gives_what_the_full_check_gives(tmp_path: Path) -> None:
    """verify_dkim_now with the header read once takes the per-signer shortcut
    (_quick_results) for plain signatures with cached keys, and falls back to the full
    check for anything else: either way its results are those of the full check, which
    runs when no header block is given, and those of verify_dkim (with its lookups)."""
    dkim.keygen(tmp_path, "a.example", "s1", "rsa")
    dkim.keygen(tmp_path, "e.example", "s1", "ed25519")
    dkim.keygen(tmp_path, "r.example", "s1", "rsa")
    records: dict[tuple[str, str], list[str]] = {
        (f"s1._domainkey.{d}", "TXT"): [_key_record(tmp_path, d)]
        for d in ("a.example", "e.example")
    }
    records[("s1._domainkey.r.example", "TXT")] = ["v=DKIM1; k=rsa; p="]  # revoked
    zone = _CachedZone(records)
    good = _signed(tmp_path, "a.example")
    signature_end = good.index(b"From: ")
    signature, message = good[:signature_end], good[signature_end:]
    # content, whether the shortcut takes it, the results
    variants = {
        "rsa": (good, True, ["pass"]),
        "ed25519": (_signed(tmp_path, "e.example"), True, ["pass"]),
        "body changed": (good.replace(b"Hello.", b"Hullo."), True, ["fail"]),
        "header changed": (good.replace(b"Subject: quick", b"Subject: quack"), True, ["fail"]),
        "two signatures, one broken": (
            signature.replace(b"bh=", b"bh=AAAA") + good,
            True,
            ["fail", "pass"],
        ),
        "bh= not base64": (signature.replace(b"bh=", b"bh=*") + good, False, ["neutral", "pass"]),
        # a.example's signature over e.example's message: the From field it signed is gone
        "two signers": (signature + _signed(tmp_path, "e.example"), True, ["fail", "pass"]),
        "dated in the future": (good.replace(b"t=", b"t=9", 1), False, ["neutral"]),
        "expired (x=)": (good.replace(b"t=", b"x=1; t=", 1), False, ["neutral"]),
        "revoked key": (_signed(tmp_path, "r.example"), False, ["permerror"]),
        "no signature": (message, True, []),
    }
    for name, (content, quick, expected) in variants.items():
        block = read_header(content)
        assert block is not None, name
        full = dkim.verify_dkim_now(zone, content, crlf=True)
        assert full is not None and [r.result for r in full] == expected, (name, full)
        assert dkim.verify_dkim_now(zone, content, crlf=True, block=block) == full, name
        assert asyncio.run(dkim.verify_dkim(zone, content, crlf=True)) == full, name
        shortcut = dkim._quick_results(block, content, zone.cached, 5, time.time(), True)
        assert (shortcut is not None) == quick, name
        if quick:
            assert shortcut == full, name
    assert dkim.verify_dkim_now(zone, good, max_signatures=0, block=read_header(good)) == []
    uncached = _CachedZone({})
    assert dkim.verify_dkim_now(uncached, good, crlf=True, block=read_header(good)) is None


def test_a_senders_repeated_verdict_is_the_one_made_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender's messages share the verdict made for the first (InboundChecker._repeat):
    each one still gets what a checker that never saw the sender gives it (its own
    header.b, its own results), a changed DMARC record or a failing signature makes a
    verdict of its own, and each message counts once in the DMARC aggregate data, in the
    row of the day it came."""
    from tachymail.mailauth.reports import DmarcReports

    dkim.keygen(tmp_path, "a.example", "s1", "rsa")
    records = {
        ("s1._domainkey.a.example", "TXT"): [_key_record(tmp_path, "a.example")],
        ("_dmarc.a.example", "TXT"): ["v=DMARC1; p=reject"],
    }
    zone = _CachedZone(records)
    config = Config()
    config.server.data_dir = str(tmp_path)
    checker = InboundChecker(config, zone)
    mail = MailVerdict(SpfResult("none", "mailfrom", "b.example", "n@b.example"), None, None)

    def check(content: bytes, on: InboundChecker) -> tuple[object, ...]:
        verdict = _checked_now(on, content, mail, "n@b.example")
        return (verdict.action, verdict.reply, verdict.headers, verdict.summary, verdict.dkim)

    def afresh(content: bytes) -> tuple[object, ...]:
        return check(content, InboundChecker(config, zone, record_reports=False))

    signer = dkim.DkimSigner(tmp_path, {"a.example": "s1"})
    messages = []
    for n in range(3):
        content = f"From: <n@a.example>\r\nSubject: {n}\r\n\r\nHello.\r\n".encode()
        messages.append(signer.sign(content, "a.example") + content)
    seen = [check(content, checker) for content in messages]
    assert seen == [afresh(content) for content in messages]
    headers = [verdict[2] for verdict in seen]
    assert len(set(headers)) == 3  # each its own header.b
    assert all(b"dkim=pass" in h and b"dmarc=pass" in h for h in headers)
    assert len(checker._repeats) == 1

    broken = messages[0].replace(b"Hello.", b"Hullo.")
    action, reply, headers, summary, _dkim = check(broken, checker)
    assert (action, summary) == ("reject", "spf=none dkim=fail dmarc=fail arc=none")
    assert reply is not None and reply.startswith(b"550 5.7.1")
    assert check(broken, checker) == afresh(broken)

    zone.records[("_dmarc.a.example", "TXT")] = ["v=DMARC1; p=quarantine"]
    action, _reply, headers, _summary, _dkim = check(broken, checker)
    assert action == "quarantine" and b"(p=quarantine dis=quarantine)" in headers
    assert check(broken, checker) == afresh(broken)

    # the next UTC day: the sender's next message, whose verdict was made the day before,
    # counts in that day's row
    zone.records[("_dmarc.a.example", "TXT")] = ["v=DMARC1; p=reject"]
    repeats = len(checker._repeats)
    today = DmarcReports.today()
    monkeypatch.setattr(DmarcReports, "today", staticmethod(lambda: today + 1))
    check(messages[0], checker)
    assert len(checker._repeats) == repeats
    assert checker.reports is not None
    rows = {
        day: sorted(
            (r["disposition"], r["count"])
            for r in checker.reports.rows("a.example", day * DAY, (day + 1) * DAY)
        )
        for day in (today, today + 1)
    }
    assert rows == {
        today: [("none", 3), ("quarantine", 2), ("reject", 2)],
        today + 1: [("none", 1)],
    }


def test_report_data_that_cannot_be_made_does_not_refuse_the_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault in the DMARC aggregate data (the row a verdict counts in) is a log line:
    the message still gets its verdict, as before the row was kept with the verdict."""
    from tachymail.mailauth.reports import DmarcReports

    def fault(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(DmarcReports, "row", fault)
    config = Config()
    config.server.data_dir = str(tmp_path)
    zone = _CachedZone({("_dmarc.a.example", "TXT"): ["v=DMARC1; p=reject"]})
    checker = InboundChecker(config, zone)
    content = b"From: News <n@a.example>\r\nSubject: x\r\n\r\nbody\r\n"
    verdict = _checked_now(checker, content, MailVerdict(SPF, None, None))
    assert verdict.action == "accept"
    assert "dmarc=pass" in verdict.summary
    assert "DMARC aggregate data not recorded" in caplog.text


class _StableZone(_CachedZone):
    """Cached lookups that hand out the same answer object while a record stays the same,
    as the resolver's cache does until the answer's TTL runs out."""

    def __init__(self, records: dict[tuple[str, str], list[str]]) -> None:
        super().__init__(records)
        self.answers: dict[tuple[str, str, tuple[str, ...]], object] = {}

    def cached(self, kind: str, name: str) -> object:
        values = self.records.get((name.rstrip(".").lower(), kind))
        if values is None:
            return None
        key = (name, kind, tuple(values))
        if key not in self.answers:
            self.answers[key] = super().cached(kind, name)
        return self.answers[key]


def test_a_senders_lane_gives_what_the_full_check_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a session's sender has had a message with one plain signature pass, its next
    messages by that signer take the lane (InboundChecker._lane: no DMARC decision, no
    verdict lookup): each verdict is still the one a checker that never saw the sender
    gives, and anything the lane cannot vouch for goes the full way: a signature that
    fails, a key or DMARC record that changed in the cache, another session's
    transaction, a forged Authentication-Results field, a second signature. Every message
    counts once in the DMARC aggregate data."""
    from tachymail.mailauth import inbound

    dkim.keygen(tmp_path, "a.example", "s1", "rsa")
    dkim.keygen(tmp_path / "new", "a.example", "s1", "rsa")
    key_name = ("s1._domainkey.a.example", "TXT")
    zone = _StableZone(
        {
            key_name: [_key_record(tmp_path, "a.example")],
            ("_dmarc.a.example", "TXT"): ["v=DMARC1; p=reject"],
        }
    )
    config = Config()
    config.server.data_dir = str(tmp_path)
    checker = InboundChecker(config, zone)
    # SPF passes for a domain that does not align: DMARC hangs on DKIM
    spf = SpfResult("pass", "mailfrom", "b.example", "n@b.example")
    session = MailVerdict(spf, None, None)
    full_checks = []
    real_check = inbound.check_dmarc_now

    def counted(*args: object, **kwargs: object) -> object:
        full_checks.append(1)
        return real_check(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(inbound, "check_dmarc_now", counted)

    def check(content: bytes, mail: MailVerdict = session) -> tuple[MessageVerdict, bool]:
        """The verdict, equal to a fresh checker's, and whether it took the lane."""
        before = len(full_checks)
        verdict = _checked_now(checker, content, mail)
        took = len(full_checks) == before
        assert verdict == _checked_now(
            InboundChecker(config, zone, record_reports=False), content, mail
        )
        return verdict, took

    signer = dkim.DkimSigner(tmp_path, {"a.example": "s1"})

    def signed(n: int, by: dkim.DkimSigner = signer) -> bytes:
        content = f"From: <n@a.example>\r\nSubject: {n}\r\n\r\nHello {n}.\r\n".encode()
        return by.sign(content, "a.example") + content

    # the first pass is remembered, the second opens the lane
    laned = [check(signed(n)) for n in range(4)]
    assert [took for _seen, took in laned] == [False, False, True, True]
    assert all(b"dkim=pass" in v.headers and v.action == "accept" for v, _took in laned)
    assert len({v.headers for v, _took in laned}) == 4  # each its own header.b

    broken = signed(9).replace(b"Hello 9.", b"Hullo 9.")
    verdict, took = check(broken)
    assert (verdict.action, took) == ("reject", False)
    forged = b"Authentication-Results: " + checker.authserv_id.encode() + b"; dkim=pass\r\n"
    assert check(forged + signed(10))[1] is False
    assert check(signed(11))[1] is True
    twice = signed(12)
    assert check(twice[: twice.index(b"From:")] + signed(13))[1] is False
    other_session = MailVerdict(spf, None, None)
    assert [check(signed(n), other_session)[1] for n in (14, 15, 16)] == [False, False, True]

    zone.records[("_dmarc.a.example", "TXT")] = ["v=DMARC1; p=quarantine"]
    assert check(signed(17))[1] is False  # a new DMARC answer: decided again
    assert check(signed(18))[1] is True
    zone.records[key_name] = [_key_record(tmp_path / "new", "a.example")]
    verdict, took = check(signed(19))  # the old key's signature: no longer passes
    assert (verdict.action, took) == ("quarantine", False)
    new_signer = dkim.DkimSigner(tmp_path / "new", {"a.example": "s1"})
    assert check(signed(20, new_signer))[1] is False
    assert check(signed(21, new_signer))[1] is True

    def fault(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected fault")

    known_result = inbound.known_result
    monkeypatch.setattr(inbound, "known_result", fault)  # a bug in the lane: the full way
    assert check(signed(22, new_signer))[1] is False
    monkeypatch.setattr(inbound, "known_result", known_result)
    monkeypatch.setattr(inbound, "LANES_KEPT", 2)  # many sessions: the lanes start afresh
    for n in range(3):
        assert check(signed(23 + n, new_signer), MailVerdict(spf, None, None))[1] is False
        assert len(checker._lanes) <= 2

    assert checker.reports is not None
    today = DmarcReports.today()
    rows = checker.reports.rows("a.example", today * DAY, (today + 1) * DAY)
    assert sum(r["count"] for r in rows) == 20  # the messages above, each once

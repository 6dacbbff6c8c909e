"""The inbound checks on a warm resolver (dnsmasq on loopback): ``Resolver.cached`` answers
what the cache holds without a query or a coroutine, and SPF and DMARC answered from it
equal the results of a cold run, with dnsmasq asked nothing more (its own query log)."""

from __future__ import annotations

import asyncio
import json
import re
import smtplib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from email.utils import formatdate, make_msgid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnsserver import DnsRecords, running_dnsmasq
from server import Server, run_cli, running_server
from tachymail.config import from_dict
from tachymail.dns import Resolver
from tachymail.mailauth.dkim import DkimSigner, keygen
from tachymail.mailauth.dmarc import DmarcResult, check_dmarc
from tachymail.mailauth.inbound import InboundChecker
from tachymail.mailauth.spf import SpfResult, check_spf

RECORDS = (
    DnsRecords()
    .txt("warm.test", "v=spf1 ip4:127.0.0.0/8 -all")
    .txt("client.warm.test", "v=spf1 a -all")
    .a("client.warm.test", "127.0.0.1")
    .txt("_dmarc.warm.test", "v=DMARC1; p=reject")
)


def test_warm_checks_ask_the_dns_nothing(tmp_path: Path) -> None:
    with running_dnsmasq(tmp_path, RECORDS) as server:
        res = Resolver(server.address, timeout=2.0, min_ttl=600)

        async def checks() -> tuple[tuple[SpfResult, SpfResult], DmarcResult]:
            spf = await check_spf(res, "127.0.0.1", "news@warm.test", "client.warm.test")
            dmarc = await check_dmarc(res, "warm.test", spf[0], [])
            return spf, dmarc

        assert res.cached("TXT", "warm.test") is None  # nothing cached, nothing asked
        assert server.queries("warm.test", "TXT") == 0
        cold = asyncio.run(checks())
        asked = len(server.query_log())
        hits = res.cache_hits
        cached = res.cached("TXT", "WARM.test.")
        assert cached is not None and cached.values == (b"v=spf1 ip4:127.0.0.0/8 -all",)
        assert res.cache_hits == hits + 1  # a hit counts as a lookup answered from the cache
        warm = asyncio.run(checks())
        assert warm == cold
        spf, dmarc = warm
        assert [r.result for r in spf] == ["pass", "pass"]
        assert dmarc.result == "pass"
        assert len(server.query_log()) == asked  # the warm run asked dnsmasq nothing


SESSION_RECORDS = (
    DnsRecords()
    .txt("pass.warm.test", "v=spf1 ip4:127.0.0.0/8 -all")
    .txt("fail.warm.test", "v=spf1 ip4:192.0.2.1 -all")
)


def _content(author: str) -> bytes:
    return (
        f"From: {author}\r\nTo: r@dest.test\r\nSubject: cached\r\n"
        f"Date: {formatdate()}\r\nMessage-ID: {make_msgid(domain='warm.test')}\r\n\r\nHello.\r\n"
    ).encode()


def test_session_answers_mail_from_the_warm_cache(tmp_path: Path) -> None:
    """MAIL FROM's SPF verdict from the resolver's cache (no task) is the one the DNS gave:
    with spf_reject_fail, a fail is refused every time, a pass is queued with its
    Authentication-Results; dnsmasq is asked once per name."""
    with running_dnsmasq(tmp_path / "dns", SESSION_RECORDS) as dns_server:
        extra = (
            '[policy]\ntrusted_networks = []\nrelay_domains = ["dest.test"]\n'
            f'[delivery]\nresolver = "{dns_server.address}"\ndns_timeout = 2.0\n'
            "[mailauth]\nspf_reject_fail = true\niprev = false\n"
        )
        with running_server(tmp_path, extra, roles=("mx",)) as srv:
            port = srv.ports["mx"]
            with smtplib.SMTP("127.0.0.1", port, "client.warm.test", timeout=30) as client:
                client.ehlo("client.warm.test")
                for _ in range(3):  # the first from the DNS, the others from the cache
                    code, text = client.mail("eve@fail.warm.test")
                    assert code == 550 and text.startswith(b"5.7.23"), (code, text)
                    client.rset()
                replies = []
                for _ in range(3):
                    assert client.mail("news@pass.warm.test")[0] == 250
                    assert client.rcpt("r@dest.test")[0] == 250
                    replies.append(client.data(_content("news@pass.warm.test")))
            assert dns_server.queries("fail.warm.test", "TXT") == 1
            assert dns_server.queries("pass.warm.test", "TXT") == 1
            for code, text in replies:
                assert code == 250, (code, text)
                queue_id = text.decode().rsplit(" ", 1)[1]
                shown = json.loads(
                    run_cli("queue", "show", queue_id, "--json", data_dir=srv.data_dir)
                )
                headers = str(shown["headers"])
                assert "spf=pass smtp.mailfrom=news@pass.warm.test" in headers, headers
            assert "Traceback" not in srv.log()


def _signed_zone(tmp_path: Path) -> tuple[DnsRecords, DkimSigner]:
    keys = tmp_path / "keys"
    zone_line = keygen(keys, "signed.warm.test", "s1")
    key_text = "".join(re.findall(r'"([^"]*)"', zone_line))
    records = (
        DnsRecords()
        .txt("signed.warm.test", "v=spf1 ip4:192.0.2.1 -all")
        .txt("_dmarc.signed.warm.test", "v=DMARC1; p=reject")
        .txt("s1._domainkey.signed.warm.test", key_text)
        .txt("_dmarc.org.test", "v=DMARC1; p=quarantine")  # sub.org.test has none of its own
    )
    return records, DkimSigner(keys, {"signed.warm.test": "s1"})


def test_message_checks_without_waiting_equal_the_awaited_ones(tmp_path: Path) -> None:
    """``InboundChecker.message_now`` (the session's path when nothing needs the DNS) gives
    None while a record it needs is not cached (the first message of a domain), and once
    the awaited check has cached them, exactly the verdict the awaited check gives: pass,
    fail, reject, the organizational domain's policy. Messages with ARC sets, or too big to
    check in the loop, always go the awaited way."""
    records, signer = _signed_zone(tmp_path)
    base = _content("Alice <alice@signed.warm.test>").replace(b"Hello.", b"Signed body.")
    signed = signer.sign(base, "signed.warm.test") + base
    big = _content("Alice <alice@signed.warm.test>") + b"x" * 200_000 + b"\r\n"
    arc = b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=x.test; s=s; b=AAAA\r\n" + signed
    # name: (content, what message_now gives before the awaited check and after it)
    cases = {
        "pass": (signed, "none", "same"),  # nothing of signed.warm.test cached yet
        "broken": (signed.replace(b"Signed body.", b"Other body."), "same", "same"),
        "unsigned": (base, "same", "same"),
        "organizational": (_content("bob@sub.org.test"), "none", "same"),
        "arc": (arc, "none", "none"),
        "big": (signer.sign(big, "signed.warm.test") + big, "none", "none"),
    }
    config = from_dict({"server": {"hostname": "mx.warm.test", "data_dir": str(tmp_path / "data")}})
    with running_dnsmasq(tmp_path / "dns", records) as server:
        resolver = Resolver(server.address, timeout=2.0, min_ttl=600)
        checker = InboundChecker(config, resolver, record_reports=False)
        ip, helo, sender = "127.0.0.1", "client.warm.test", "alice@signed.warm.test"

        async def run() -> dict[str, tuple[object, object, object]]:
            mail = await checker.mail(ip, helo, sender)
            seen = {}
            for name, (content, _, _) in cases.items():
                kw = dict(
                    ip=ip,
                    helo=helo,
                    mail_from=sender,
                    mail=mail,
                    iprev=None,
                    content=content,
                    mode="enforce",
                    relay=False,
                    crlf=True,
                )
                cold = checker.message_now(**kw)  # type: ignore[arg-type]
                awaited = await checker.message(**kw)  # type: ignore[arg-type]
                seen[name] = (cold, awaited, checker.message_now(**kw))  # type: ignore[arg-type]
            return seen

        seen = asyncio.run(run())
    for name, (cold, awaited, warm) in seen.items():
        for got, expected in zip((cold, warm), cases[name][1:], strict=True):
            assert got == (None if expected == "none" else awaited), name
    assert seen["pass"][1].action == "accept" and "dkim=pass" in seen["pass"][1].summary
    assert seen["broken"][1].reply.startswith(b"550 5.7.1"), seen["broken"][1]
    assert seen["unsigned"][1].reply.startswith(b"550 5.7.1"), seen["unsigned"][1]
    assert seen["organizational"][1].action == "quarantine", seen["organizational"][1]


INJECTED_FAULT = """
from tachymail.mailauth.inbound import InboundChecker

def _broken(self, **kw):
    raise RuntimeError("injected fault in the checks")

async def _broken_async(self, **kw):
    raise RuntimeError("injected fault in the checks")

InboundChecker.message_now = _broken
InboundChecker.message = _broken_async
"""


def test_checks_that_fail_unexpectedly_get_451_and_the_session_goes_on(tmp_path: Path) -> None:
    """A bug in the checks (injected into the server through sitecustomize) is logged and
    answered 451 4.3.0, whichever path met it; nothing is queued and the session goes on."""
    with _injected_server(tmp_path, INJECTED_FAULT) as srv:
        with smtplib.SMTP("127.0.0.1", srv.ports["mx"], "client.warm.test", timeout=30) as c:
            c.ehlo("client.warm.test")
            for _ in range(2):
                assert c.mail("news@pass.warm.test")[0] == 250
                assert c.rcpt("r@dest.test")[0] == 250
                code, text = c.data(_content("news@pass.warm.test"))
                assert code == 451 and text.startswith(b"4.3.0"), (code, text)
                assert c.rset()[0] == 250
        listing = run_cli("queue", "list", "--json", data_dir=srv.data_dir)
        assert listing.strip() == "", listing
        assert "injected fault in the checks" in srv.log()


@contextmanager
def _injected_server(tmp_path: Path, sitecustomize: str) -> Iterator[Server]:
    """An mx server checking mail on dnsmasq's SESSION_RECORDS, with *sitecustomize* run in
    its processes (PYTHONPATH): how these tests reach inside the server."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(sitecustomize)
    with running_dnsmasq(tmp_path / "dns", SESSION_RECORDS) as dns_server:
        extra = (
            '[policy]\ntrusted_networks = []\nrelay_domains = ["dest.test"]\n'
            f'[delivery]\nresolver = "{dns_server.address}"\ndns_timeout = 2.0\n'
            "[mailauth]\niprev = false\n"
        )
        env = {"PYTHONPATH": str(inject)}
        with running_server(tmp_path, extra, roles=("mx",), env=env) as srv:
            yield srv


COUNTED_SPF = """
import logging
from tachymail.mailauth.inbound import InboundChecker

_mail_now = InboundChecker.mail_now

def _counted(self, ip, helo, mail_from):
    logging.getLogger("tachymail.test").warning("SPF asked: helo=%s from=%s", helo, mail_from)
    return _mail_now(self, ip, helo, mail_from)

InboundChecker.mail_now = _counted
"""


def test_a_session_checks_spf_once_per_helo_and_sender(tmp_path: Path) -> None:
    """Message after message from one sender in one session: SPF is worked out (from the
    resolver's cache) once, and every message still carries its spf=pass; a new sender
    or a new HELO name is checked anew. (The checker is counted through sitecustomize.)"""
    with _injected_server(tmp_path, COUNTED_SPF) as srv:
        with smtplib.SMTP("127.0.0.1", srv.ports["mx"], "client.warm.test", timeout=30) as client:
            client.ehlo("client.warm.test")
            senders = ["news@pass.warm.test"] * 4 + ["other@pass.warm.test"] * 2
            for sender in senders:
                assert client.mail(sender)[0] == 250
                assert client.rcpt("r@dest.test")[0] == 250
                assert client.data(_content(sender))[0] == 250
            client.ehlo("mx2.client.warm.test")
            assert client.mail("other@pass.warm.test")[0] == 250
            client.rset()
        asked = re.findall(r"SPF asked: helo=(\S+) from=(\S+)", srv.log())
        ids = [row["id"] for row in _queued(srv.data_dir)]
        contents = [run_cli("queue", "show", i, "--body", data_dir=srv.data_dir) for i in ids]
    # the first lookups go to the DNS (a task): asked again once they are cached
    assert asked == [
        ("client.warm.test", "news@pass.warm.test"),
        ("client.warm.test", "news@pass.warm.test"),
        ("client.warm.test", "other@pass.warm.test"),
        ("mx2.client.warm.test", "other@pass.warm.test"),
    ], asked
    assert len(contents) == 6
    for shown in contents:
        assert re.search(r"spf=pass[^;]*smtp\.mailfrom=\S+@pass\.warm\.test", shown), shown


def _queued(data_dir: Path) -> list[dict[str, object]]:
    listing = run_cli("queue", "list", "--json", data_dir=data_dir)
    return [json.loads(line) for line in listing.splitlines() if line.strip()]

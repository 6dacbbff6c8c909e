"""The inbound checks on a warm resolver (dnsmasq on loopback): ``Resolver.cached`` answers
what the cache holds without a query or a coroutine, and SPF and DMARC answered from it
equal the results of a cold run, with dnsmasq asked nothing more (its own query log)."""

from __future__ import annotations

import asyncio
import json
import smtplib
import sys
from email.utils import formatdate, make_msgid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnsserver import DnsRecords, running_dnsmasq
from server import run_cli, running_server
from tachymail.dns import Resolver
from tachymail.mailauth.dmarc import DmarcResult, check_dmarc
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

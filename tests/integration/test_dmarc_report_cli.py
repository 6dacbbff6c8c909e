"""DMARC aggregate data end to end: mail received by a real `tachymail serve` (its resolver
a dnsmasq on loopback, clients connecting from 127.0.0.x outside the trusted networks)
shows up in `tachymail dmarc report`, read back with xml.etree."""

from __future__ import annotations

import smtplib
import sys
import time
import xml.etree.ElementTree as ET
from email.utils import formatdate, make_msgid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnsserver import DnsRecords, running_dnsmasq
from server import run_cli, running_server

ALIGNED = "127.0.0.5"  # listed in pass.test's SPF record
STRANGER = "127.0.0.6"  # listed nowhere
RCPT = "bob@dest.test"


def send(port: int, source: str, mail_from: str, author: str) -> None:
    content = (
        f"From: {author}\r\nTo: {RCPT}\r\nSubject: report\r\nDate: {formatdate()}\r\n"
        f"Message-ID: {make_msgid(domain='test')}\r\n\r\nHello.\r\n"
    ).encode()
    with smtplib.SMTP(
        "127.0.0.1", port, "client.test", timeout=30, source_address=(source, 0)
    ) as c:
        c.sendmail(mail_from, [RCPT], content)


def test_received_mail_is_in_the_aggregate_report(tmp_path: Path) -> None:
    records = (
        DnsRecords()
        .txt("pass.test", "v=spf1 ip4:127.0.0.5 -all")
        .txt("_dmarc.pass.test", "v=DMARC1; p=none; aspf=s; rua=mailto:dmarc@pass.test")
        .exists("elsewhere.test")
    )
    start = time.time()
    with running_dnsmasq(tmp_path / "dns", records) as dns_server:
        extra = (
            '[policy]\ntrusted_networks = ["192.0.2.0/24"]\nrelay_domains = ["dest.test"]\n'
            f'[delivery]\nresolver = "{dns_server.address}"\ndns_timeout = 1.0\n'
            "[mailauth]\ndmarc_reports = true\n"  # (naming mailauth turns the checks on)
        )
        with running_server(tmp_path, extra, roles=("mx",)) as srv:
            for _ in range(2):
                send(srv.port, ALIGNED, "alice@pass.test", "Alice <alice@pass.test>")
            send(srv.port, STRANGER, "m@elsewhere.test", "Alice <alice@pass.test>")
            send(srv.port, STRANGER, "m@elsewhere.test", "x@nodmarc.test")  # no policy
        # the server stopped: its workers wrote what they had buffered
        data_dir = srv.data_dir
    out = run_cli(
        "dmarc", "report", "--domain", "pass.test", "--since", str(int(start)), data_dir=data_dir
    )
    root = ET.fromstring(out.encode())
    assert root.findtext("policy_published/domain") == "pass.test"
    assert root.findtext("policy_published/p") == "none"
    assert root.findtext("policy_published/aspf") == "s"
    rows = sorted(
        (
            r.findtext("row/source_ip"),
            r.findtext("row/count"),
            r.findtext("row/policy_evaluated/disposition"),
            r.findtext("row/policy_evaluated/spf"),
            r.findtext("row/policy_evaluated/dkim"),
            r.findtext("identifiers/envelope_from"),
            r.findtext("identifiers/header_from"),
            r.findtext("auth_results/spf/result"),
        )
        for r in root.findall("record")
    )
    assert rows == [
        (ALIGNED, "2", "none", "pass", "fail", "pass.test", "pass.test", "pass"),
        (STRANGER, "1", "none", "fail", "fail", "elsewhere.test", "pass.test", "none"),
    ]
    out = run_cli(
        "dmarc", "report", "--domain", "nodmarc.test", "--since", str(int(start)), data_dir=data_dir
    )
    assert ET.fromstring(out.encode()).findall("record") == []

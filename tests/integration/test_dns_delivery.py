"""Delivery through real DNS (dnsmasq on loopback): MX routing, null MX, NXDOMAIN, and
DKIM signatures verified with dkimpy against the key served as a TXT record."""

from __future__ import annotations

import re
import smtplib
import sys
from pathlib import Path

import dkim
import dns.resolver

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnsserver import DnsRecords, running_dnsmasq
from server import run_cli, running_server
from smtp_peer import SmtpPeer


def dns_config(dns_address: str, peer_port: int, extra: str = "") -> str:
    # MX delivery goes to the peer's port on 127.0.0.1 (the A record of every MX host).
    return (
        f'[delivery]\nresolver = "{dns_address}"\nport = {peer_port}\ntls = "none"\n'
        "retry_schedule = [1]\ndelay_warning = 0\n" + extra
    )


def records() -> DnsRecords:
    return (
        DnsRecords()
        .mx("dest.test", "mx1.dest.test", 10)
        .mx("dest.test", "mx2.dest.test", 20)
        .a("mx1.dest.test", "127.0.0.1")
        .a("mx2.dest.test", "127.0.0.1")
        .mx("sender.test", "mx1.dest.test", 10)
        .a("implicit.test", "127.0.0.1")
        .null_mx("nomail.test")
    )


def send(port: int, rcpt: str, sender: str = "alice@sender.test") -> None:
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.sendmail(
            sender, [rcpt], f"From: {sender}\r\nTo: {rcpt}\r\nSubject: dns\r\n\r\nbody\r\n".encode()
        )


def test_mx_and_implicit_mx_routing(tmp_path: Path) -> None:
    with (
        SmtpPeer() as peer,
        running_dnsmasq(tmp_path, records()) as dns_server,
        running_server(
            tmp_path, dns_config(dns_server.address, peer.port), hold=False, roles=("mx",)
        ) as srv,
    ):
        send(srv.port, "bob@dest.test")
        send(srv.port, "carol@implicit.test")
        got = peer.wait_for(2)
        assert sorted(m.recipients[0] for m in got) == ["bob@dest.test", "carol@implicit.test"]
        assert dns_server.queries("dest.test", "MX") >= 1
        assert dns_server.queries("implicit.test", "MX") >= 1


def test_null_mx_and_nxdomain_bounce(tmp_path: Path) -> None:
    with (
        SmtpPeer() as peer,
        running_dnsmasq(tmp_path, records()) as dns_server,
        running_server(
            tmp_path, dns_config(dns_server.address, peer.port), hold=False, roles=("mx",)
        ) as srv,
    ):
        send(srv.port, "x@nomail.test")
        send(srv.port, "y@no-such-domain.test")
        dsns = peer.wait_for(2)
        assert all(m.sender == "" and m.recipients == ["alice@sender.test"] for m in dsns)
        bodies = b"\n".join(m.content for m in dsns)
        assert b"Status: 5.1.10" in bodies and b"x@nomail.test" in bodies
        assert b"Status: 5.1.2" in bodies and b"y@no-such-domain.test" in bodies


def test_dkim_signature_verifies_against_the_published_key(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    record = run_cli(
        "dkim", "keygen", "--domain", "sender.test", "--selector", "s1", data_dir=data_dir
    )
    # The record as a zone file line: name IN TXT "part" "part" ...
    txt = "".join(re.findall(r'"([^"]*)"', record))
    dns_records = records().txt("s1._domainkey.sender.test", txt)
    extra = '[dkim]\ndomains = { "sender.test" = "s1" }\n'
    with (
        SmtpPeer() as peer,
        running_dnsmasq(tmp_path, dns_records) as dns_server,
        running_server(
            tmp_path,
            dns_config(dns_server.address, peer.port, extra),
            hold=False,
            roles=("mx",),
            data_dir=data_dir,
        ) as srv,
    ):
        send(srv.port, "bob@dest.test")
        [got] = peer.wait_for(1)
        assert got.content.startswith(b"DKIM-Signature:")
        assert b"d=sender.test" in got.content and b"s=s1" in got.content
        host, port = dns_server.address.split(":")
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port = [host], int(port)

        def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT")
            return b"".join(b"".join(r.strings) for r in answer)

        assert dkim.verify(got.content, dnsfunc=dnsfunc)
        tampered = got.content.replace(b"body\r\n", b"b0dy\r\n")
        assert not dkim.verify(tampered, dnsfunc=dnsfunc)

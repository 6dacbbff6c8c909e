"""Inbound authentication on the mx listener, end to end (issue 12).

A real `tachymail serve` whose resolver is a dnsmasq on loopback serving SPF, DKIM, DMARC,
DNSBL/DNSWL and PTR records; smtplib clients connect FROM different loopback addresses
(127.0.0.x, their socket bound there) with ``policy.trusted_networks`` narrowed, so the
server sees untrusted internet clients. Every verdict is read where an operator reads it:
the reply code, the queued message's header (`tachymail queue show --json`), its queue
state, the log and ``tachymail_auth_results_total`` on /metrics.

The last test puts a DNS server of its own in front of the server (answers from a dict
with dnspython's message API, one domain's answers 3 s late) and checks that only the
session waiting for that domain waits.
"""

from __future__ import annotations

import asyncio
import json
import re
import smtplib
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import cast

import dkim
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnsserver import DnsRecords, DnsServer, running_dnsmasq
from server import Server, free_port, metric, run_cli, running_server, wait_port, wait_until
from tachymail.mailauth.dkim import DkimSigner, keygen

AUTHSERV = "mx.test.example"  # write_config's server.hostname: our authserv-id
GOOD = "127.0.0.5"  # PTR and A agree: iprev pass; the SPF record of pass.test lists it
OTHER = "127.0.0.6"  # listed in no SPF record
TRUSTED = "127.0.0.7"  # the only trusted network
ALLOWED = "127.0.0.8"  # on the DNSWL zone
BLOCKED = "127.0.0.9"  # on the DNSBL zone
RCPT = "bob@dest.test"  # a relay domain: accepted from untrusted clients


@dataclass
class Env:
    server: Server
    dns: DnsServer
    tag_port: int  # a second mx listener in mode "tag"
    metrics_port: int
    signer: DkimSigner
    seal_record: str  # the TXT text of the ARC sealing key (arc1._domainkey.seal.test)

    @property
    def port(self) -> int:
        return self.server.port


def _dkim_txt(zone_line: str) -> str:
    """The TXT text of keygen's zone-file line (its quoted strings joined)."""
    return "".join(re.findall(r'"([^"]*)"', zone_line))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("inbound")
    keys = tmp / "keys"
    record = keygen(keys, "signed.test", "s1")
    # The server seals relayed mail (dest.test is a relay domain) with this key.
    seal_record = _dkim_txt(keygen(tmp / "data", "seal.test", "arc1"))
    records = (
        DnsRecords()
        .a("good-client.test", GOOD)  # dnsmasq serves the PTR of a host-record too
        .txt("pass.test", "v=spf1 ip4:127.0.0.5 -all")
        .txt("_dmarc.pass.test", "v=DMARC1; p=reject")
        .txt("fail.test", "v=spf1 ip4:192.0.2.1 -all")
        .txt("softfail.test", "v=spf1 ip4:192.0.2.1 ~all")
        .exists("none.test")  # a TXT record, but no SPF record
        .unanswered("timeout.test")
        .txt("reject.test", "v=spf1 ip4:192.0.2.1 -all")
        .txt("_dmarc.reject.test", "v=DMARC1; p=reject")
        .txt("quarantine.test", "v=spf1 ip4:192.0.2.1 -all")
        .txt("_dmarc.quarantine.test", "v=DMARC1; p=quarantine")
        .txt("signed.test", "v=spf1 -all")
        .txt("_dmarc.signed.test", "v=DMARC1; p=reject")
        .txt("s1._domainkey.signed.test", _dkim_txt(record))
        .txt("arc1._domainkey.seal.test", seal_record)
        .a("9.0.0.127.bl.test", "127.0.0.2")
        .txt("9.0.0.127.bl.test", "listed for testing")
        .a("8.0.0.127.wl.test", "127.0.0.2")
    )
    tag_port, metrics_port = free_port(), free_port()
    with running_dnsmasq(tmp / "dns", records) as dns_server:
        extra = (
            f'[[listener]]\naddress = "127.0.0.1:{tag_port}"\nrole = "mx"\nmailauth = "tag"\n\n'
            f'[policy]\ntrusted_networks = ["{TRUSTED}/32"]\nrelay_domains = ["dest.test"]\n'
            f'[delivery]\nresolver = "{dns_server.address}"\ndns_timeout = 1.0\n'
            f'[metrics]\naddress = "127.0.0.1:{metrics_port}"\n'
            '[auth]\nsenders = { alice = ["@reject.test"] }\n'
            '[mailauth]\ndnsbl_zones = ["bl.test"]\ndnswl_zones = ["wl.test"]\n'
            'arc_seal = { domain = "seal.test", selector = "arc1" }\n'
        )
        with running_server(tmp, extra, roles=("mx",)) as srv:
            wait_port(tag_port)
            signer = DkimSigner(keys, {"signed.test": "s1"})
            yield Env(srv, dns_server, tag_port, metrics_port, signer, seal_record)


def message(author: str, subject: str, body: str = "Hello.\r\n", headers: str = "") -> bytes:
    return (
        f"From: {author}\r\nTo: {RCPT}\r\nSubject: {subject}\r\n"
        f"Date: {formatdate()}\r\nMessage-ID: {make_msgid(domain='test')}\r\n"
        f"{headers}\r\n{body}"
    ).encode()


def send(
    port: int, source: str, mail_from: str, content: bytes, helo: str = "client.test"
) -> tuple[int, str]:
    """One transaction from *source*; the reply to the end of DATA."""
    with smtplib.SMTP("127.0.0.1", port, helo, timeout=30, source_address=(source, 0)) as client:
        client.ehlo(helo)
        code, text = client.mail(mail_from)
        assert code == 250, (code, text)
        code, text = client.rcpt(RCPT)
        assert code == 250, (code, text)
        code, text = client.data(content)
        return code, text.decode()


def queued(env: Env, reply: tuple[int, str]) -> dict[str, object]:
    """`queue show --json` of the message a 250 reply names."""
    code, text = reply
    assert code == 250, reply
    queue_id = text.rsplit(" ", 1)[1]
    shown: dict[str, object] = json.loads(
        run_cli("queue", "show", queue_id, "--json", data_dir=env.server.data_dir)
    )
    return shown


def fields(headers: str) -> list[tuple[str, str]]:
    """(name, unfolded value) of each field of a header section, top first."""
    unfolded = re.sub(r"\r\n[ \t]+", " ", headers)
    return [
        (name, value.strip())
        for name, _, value in (line.partition(":") for line in unfolded.split("\r\n") if line)
    ]


def our_results(headers: str) -> str:
    """The value of our Authentication-Results field, which must be the first field but
    for the ARC set sealing it, and be followed by our Received field."""
    found = [f for f in fields(headers) if not f[0].lower().startswith("arc-")]
    assert found[0][0].lower() == "authentication-results", headers
    assert found[1][0].lower() == "received" and "by mx.test.example" in found[1][1], headers
    value = found[0][1]
    assert value.startswith(f"{AUTHSERV};"), value
    return value


def results_metric(env: Env, method: str, result: str) -> float:
    return metric(env.metrics_port, "tachymail_auth_results_total", method=method, result=result)


def counted(env: Env, method: str, result: str, value: float) -> None:
    """Wait until the result counter shows *value* (workers add their tallies each second)."""
    wait_until(lambda: results_metric(env, method, result) == value, timeout=10)


def sender_queued(env: Env, sender: str) -> bool:
    listing = run_cli("queue", "list", "--json", data_dir=env.server.data_dir)
    return any(json.loads(line)["sender"] == sender for line in listing.splitlines() if line)


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("pass.test", "pass"),
        ("fail.test", "fail"),
        ("softfail.test", "softfail"),
        ("none.test", "none"),
        ("timeout.test", "temperror"),
    ],
)
def test_spf_result_in_the_queued_header(env: Env, domain: str, expected: str) -> None:
    before = results_metric(env, "spf", expected)
    reply = send(env.port, GOOD, f"alice@{domain}", message(f"alice@{domain}", f"spf {domain}"))
    shown = queued(env, reply)
    value = our_results(str(shown["headers"]))
    assert f"spf={expected} smtp.mailfrom={domain}" in value or (
        f"spf={expected}" in value and f"smtp.mailfrom=alice@{domain}" in value
    ), value
    assert "iprev=pass" in value, value  # PTR good-client.test, whose A is the client
    counted(env, "spf", expected, before + 1)


def test_dmarc_pass_is_recorded(env: Env) -> None:
    before = results_metric(env, "dmarc", "pass")
    reply = send(env.port, GOOD, "alice@pass.test", message("Alice <alice@pass.test>", "dmarc"))
    value = our_results(str(queued(env, reply)["headers"]))
    assert "dmarc=pass" in value and "header.from=pass.test" in value, value
    counted(env, "dmarc", "pass", before + 1)
    # The intake log line carries the results too.
    queue_id = reply[1].rsplit(" ", 1)[1]
    line = next(line for line in env.server.log().splitlines() if f"{queue_id} queued" in line)
    assert "spf=pass" in line and "dmarc=pass" in line, line
    # ...and `tachymail log` still finds the message by its Message-ID.
    message_id = line.rsplit("message-id ", 1)[1]
    story = run_cli("log", message_id, "--file", str(env.server.log_path))
    assert f"queue id {queue_id}: message-id {message_id}," in story, story


def test_dmarc_reject_refuses_after_data_and_queues_nothing(env: Env) -> None:
    before = results_metric(env, "dmarc", "fail")
    code, text = send(env.port, OTHER, "eve@reject.test", message("eve@reject.test", "forged"))
    assert code == 550 and text.startswith("5.7.1"), (code, text)
    assert "reject.test" in text
    assert not sender_queued(env, "eve@reject.test")
    counted(env, "dmarc", "fail", before + 1)


def test_one_session_alternates_accepted_and_rejected_messages(env: Env) -> None:
    """The records cached by a session's first messages answer its later ones without a
    wait (InboundChecker.message_now): each signed message is queued with its results,
    each forged one refused with 550 5.7.1 and never queued, and the session goes on
    normally after every refusal (pipelined BDAT/DATA state, RSET, NOOP)."""
    content = message("Alice <alice@signed.test>", "alternating", "Signed body.\r\n")
    signed = env.signer.sign(content, "signed.test") + content
    passed, failed = results_metric(env, "dkim", "pass"), results_metric(env, "dmarc", "fail")
    with smtplib.SMTP("127.0.0.1", env.port, "client.test", timeout=30) as client:
        client.ehlo("client.test")
        for round_ in range(3):
            assert client.mail("alice@signed.test")[0] == 250
            assert client.rcpt(RCPT)[0] == 250
            code, text = client.data(signed)
            value = our_results(str(queued(env, (code, text.decode()))["headers"]))
            assert "dkim=pass" in value and "dmarc=pass" in value, (round_, value)
            assert client.mail("eve@reject.test")[0] == 250
            assert client.rcpt(RCPT)[0] == 250
            code, text = client.data(message("eve@reject.test", f"forged {round_}"))
            assert code == 550 and text.startswith(b"5.7.1"), (round_, code, text)
            assert client.rset()[0] == 250 and client.noop()[0] == 250
    assert not sender_queued(env, "eve@reject.test")
    counted(env, "dkim", "pass", passed + 3)  # every verdict counted, whichever way it came
    counted(env, "dmarc", "fail", failed + 3)


def test_dmarc_quarantine_holds_the_message(env: Env) -> None:
    reply = send(env.port, OTHER, "eve@quarantine.test", message("eve@quarantine.test", "q"))
    shown = queued(env, reply)
    assert shown["state"] == "held", shown
    assert "dmarc=fail" in our_results(str(shown["headers"]))


def test_tag_mode_never_rejects(env: Env) -> None:
    reply = send(env.tag_port, OTHER, "eve@reject.test", message("eve@reject.test", "tagged"))
    shown = queued(env, reply)
    assert shown["state"] != "held"
    value = our_results(str(shown["headers"]))
    assert "spf=fail" in value and "dmarc=fail" in value, value


def test_dkim_signature_verifies_and_a_broken_one_fails(env: Env) -> None:
    before = results_metric(env, "dkim", "pass")
    content = message("Alice <alice@signed.test>", "signed", "Signed body.\r\n")
    signed = env.signer.sign(content, "signed.test") + content
    value = our_results(
        str(queued(env, send(env.port, OTHER, "alice@signed.test", signed))["headers"])
    )
    assert re.search(r"dkim=pass [^;]*header\.d=signed\.test", value), value
    assert "header.s=s1" in value and "dmarc=pass" in value, value  # aligned DKIM, SPF fails
    counted(env, "dkim", "pass", before + 1)
    broken = signed.replace(b"Signed body.", b"Altered body.")
    code, text = send(env.tag_port, OTHER, "alice@signed.test", broken)
    value = our_results(str(queued(env, (code, text))["headers"]))
    assert "dkim=fail" in value and "dmarc=fail" in value, value
    # The same broken message on the enforcing listener: p=reject applies.
    code, text = send(env.port, OTHER, "alice@signed.test", broken)
    assert code == 550 and text.startswith("5.7.1"), (code, text)


def test_pipelined_bdat_transaction_is_checked(env: Env) -> None:
    content = message("alice@pass.test", "chunked")
    address = ("127.0.0.1", env.port)
    with socket.create_connection(address, timeout=15, source_address=(GOOD, 0)) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220")
        sock.sendall(b"EHLO client.test\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        # One write: MAIL, RCPT, BDAT LAST with its data, QUIT (RFC 2920 / RFC 3030).
        sock.sendall(
            b"MAIL FROM:<alice@pass.test>\r\nRCPT TO:<" + RCPT.encode() + b">\r\n"
            b"BDAT %d LAST\r\n" % len(content) + content + b"QUIT\r\n"
        )
        replies = [reader.readline() for _ in range(4)]
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"221"], replies
    text = replies[2].decode().strip()
    value = our_results(str(queued(env, (250, text))["headers"]))
    assert "spf=pass" in value and "dmarc=pass" in value, value


def test_relayed_mail_is_arc_sealed(env: Env) -> None:
    reply = send(env.port, GOOD, "alice@pass.test", message("alice@pass.test", "sealed"))
    queue_id = reply[1].rsplit(" ", 1)[1]
    shown = json.loads(
        run_cli("queue", "show", queue_id, "--json", "--body", data_dir=env.server.data_dir)
    )
    found = fields(shown["headers"])
    names = [name.lower() for name, _ in found[:3]]
    assert sorted(names) == ["arc-authentication-results", "arc-message-signature", "arc-seal"]
    seal = dict(found)["ARC-Seal"]
    assert "i=1" in seal and "cv=none" in seal and "d=seal.test" in seal, seal
    aar = dict(found)["ARC-Authentication-Results"]
    assert aar.startswith(f"i=1; {AUTHSERV};") and "dmarc=pass" in aar, aar

    def txt(name: bytes | str, timeout: float = 5) -> bytes | None:
        wanted = name.decode() if isinstance(name, bytes) else name
        if wanted.rstrip(".") == "arc1._domainkey.seal.test":
            return env.seal_record.encode()
        return None

    # dkimpy, an independent verifier, validates the chain we started.
    cv, _, why = dkim.arc_verify(shown["content"].encode(), dnsfunc=txt)
    assert cv == dkim.CV_Pass, why


def test_forged_results_for_our_id_are_removed_others_kept(env: Env) -> None:
    forged = (
        f"Authentication-Results: {AUTHSERV.upper()}; dkim=pass header.d=pass.test\r\n"
        "Authentication-Results: other.example; spf=pass smtp.mailfrom=pass.test\r\n"
    )
    content = message("alice@pass.test", "forged results", headers=forged)
    headers = str(queued(env, send(env.port, GOOD, "alice@pass.test", content))["headers"])
    results = [v for n, v in fields(headers) if n.lower() == "authentication-results"]
    ours = [v for v in results if v.lower().startswith(AUTHSERV)]
    assert len(ours) == 1 and "header.d=pass.test" not in ours[0], results
    assert any(v.startswith("other.example;") for v in results), results
    our_results(headers)  # and ours is on top


def test_dnsbl_listed_client_gets_554_before_anything(env: Env) -> None:
    before = results_metric(env, "dnsbl", "fail")
    with socket.create_connection(
        ("127.0.0.1", env.port), timeout=15, source_address=(BLOCKED, 0)
    ) as sock:
        reader = sock.makefile("rb")
        greeting = reader.readline()
        assert greeting.startswith(b"554 5.7.1") and b"bl.test" in greeting, greeting
        sock.sendall(b"EHLO client.test\r\nMAIL FROM:<a@pass.test>\r\nQUIT\r\n")
        assert reader.readline().startswith(b"503 5.5.1")
        assert reader.readline().startswith(b"503 5.5.1")
        assert reader.readline().startswith(b"221")
    counted(env, "dnsbl", "fail", before + 1)


def test_dnswl_client_skips_the_checks(env: Env) -> None:
    reply = send(env.port, ALLOWED, "eve@reject.test", message("eve@reject.test", "allowed"))
    headers = str(queued(env, reply)["headers"])
    assert "Authentication-Results" not in headers, headers


def test_trusted_client_skips_the_checks(env: Env) -> None:
    reply = send(env.port, TRUSTED, "eve@reject.test", message("eve@reject.test", "trusted"))
    headers = str(queued(env, reply)["headers"])
    assert "Authentication-Results" not in headers, headers


def test_unchecked_mail_loses_results_forged_with_our_id(env: Env) -> None:
    """A trusted client is not checked, but may not pass results off as ours either."""
    forged = (
        f"Authentication-Results: {AUTHSERV}; dmarc=pass header.from=reject.test\r\n"
        "Authentication-Results: other.example; spf=pass smtp.mailfrom=reject.test\r\n"
    )
    content = message("eve@reject.test", "trusted, forged results", headers=forged)
    headers = str(queued(env, send(env.port, TRUSTED, "eve@reject.test", content))["headers"])
    results = [v for n, v in fields(headers) if n.lower() == "authentication-results"]
    assert results == ["other.example; spf=pass smtp.mailfrom=reject.test"], results


def test_authenticated_client_skips_the_checks(env: Env) -> None:
    run_cli(
        "user", "add", "alice", "--password-stdin", data_dir=env.server.data_dir, stdin="wonder\n"
    )
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", env.port, timeout=30, source_address=(OTHER, 0)) as client:
        client.starttls(context=context)
        client.login("alice", "wonder")
        client.mail("alice@reject.test")
        assert client.rcpt(RCPT)[0] == 250
        code, text = client.data(message("alice@reject.test", "authenticated"))
    headers = str(queued(env, (code, text.decode()))["headers"])
    assert "Authentication-Results" not in headers, headers


# --- nothing blocks: a DNS server that answers one domain 3 s late -------------------------

SLOW = 3.0


class DelayingDns(asyncio.DatagramProtocol):
    """A UDP DNS server answering from *zone* ``{(name, type): [rdata text]}`` (NXDOMAIN for
    names absent, NODATA for other types); names under *slow* are answered SLOW seconds
    late, without holding up the others."""

    def __init__(self, zone: dict[tuple[str, str], list[str]], slow: str) -> None:
        self.zone = zone
        self.slow = slow
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        kind = dns.rdatatype.to_text(question.rdtype)
        values = self.zone.get((name, kind))
        if values:
            response.answer.append(dns.rrset.from_text(question.name, 60, "IN", kind, *values))
        elif not any(key[0] == name for key in self.zone):
            response.set_rcode(dns.rcode.NXDOMAIN)
        response.flags |= dns.flags.AA
        wire = response.to_wire()
        assert self.transport is not None
        if name == self.slow or name.endswith("." + self.slow):
            asyncio.get_running_loop().call_later(SLOW, self.transport.sendto, wire, addr)
        else:
            self.transport.sendto(wire, addr)


@pytest.fixture
def delaying_dns() -> Iterator[int]:
    """The port of a DelayingDns on 127.0.0.1, run on an event loop in a thread."""
    zone = {
        ("slow.test", "TXT"): ['"v=spf1 ip4:127.0.0.5 -all"'],
        ("fast.test", "TXT"): ['"v=spf1 ip4:127.0.0.6 -all"'],
        ("fail.test", "TXT"): ['"v=spf1 -all"'],
    }
    loop = asyncio.new_event_loop()
    port = free_port()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(
            loop.create_datagram_endpoint(
                lambda: DelayingDns(zone, "slow.test"), local_addr=("127.0.0.1", port)
            )
        )
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_slow_dns_delays_only_its_own_session(tmp_path: Path, delaying_dns: int) -> None:
    # spf_reject_fail: MAIL's reply waits for SPF, so the SPF lookup's delay is visible there.
    extra = (
        '[policy]\ntrusted_networks = []\nrelay_domains = ["dest.test"]\n'
        f'[delivery]\nresolver = "127.0.0.1:{delaying_dns}"\ndns_timeout = 10.0\n'
        "[mailauth]\nspf_reject_fail = true\n"
    )
    with running_server(tmp_path, extra, roles=("mx",)) as srv:
        # An SPF fail is refused at MAIL when spf_reject_fail is on.
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=30, source_address=(OTHER, 0)) as c:
            c.ehlo("other.test")
            code, text = c.mail("eve@fail.test")
            assert code == 550 and text.startswith(b"5.7.23"), (code, text)
        slow_latency: list[float] = []

        def slow_session() -> None:
            with smtplib.SMTP(
                "127.0.0.1", srv.port, timeout=30, source_address=(GOOD, 0)
            ) as client:
                client.ehlo("good.test")
                started = time.monotonic()
                assert client.mail("alice@slow.test")[0] == 250
                slow_latency.append(time.monotonic() - started)

        # A client that leaves while its SPF lookup is pending leaves nothing behind.
        quitter = socket.create_connection(
            ("127.0.0.1", srv.port), timeout=10, source_address=(GOOD, 0)
        )
        quitter.makefile("rb").readline()
        quitter.sendall(b"EHLO quitter.test\r\nMAIL FROM:<q@slow.test>\r\n")
        time.sleep(0.2)
        quitter.close()
        slow = threading.Thread(target=slow_session)
        slow.start()
        time.sleep(0.3)  # the slow session is now waiting for its SPF answer
        latencies = []
        while slow.is_alive() and len(latencies) < 20:
            with smtplib.SMTP(
                "127.0.0.1", srv.port, timeout=30, source_address=(OTHER, 0)
            ) as client:
                client.ehlo("other.test")
                started = time.monotonic()
                assert client.mail(f"bob{len(latencies)}@fast.test")[0] == 250
                latencies.append(time.monotonic() - started)
        slow.join(30)
        assert slow_latency and slow_latency[0] >= SLOW * 0.8, slow_latency  # it did wait
        assert len(latencies) >= 3, latencies  # others were served meanwhile...
        assert max(latencies) < 1.0, latencies  # ...without waiting for the slow answer
        time.sleep(SLOW)  # the quitter's lookup is answered by now
        log = srv.log()
        for trouble in ("Traceback", "never retrieved", "was destroyed but it is pending"):
            assert trouble not in log, log

"""Recipient verification for relay domains (issue 17): a probe to the next hop at RCPT.

A relay domain is routed to a scripted peer that refuses one mailbox with 550 and
greylists another with 450; with ``policy.verify_recipients`` an untrusted client's RCPT
gets what the next hop would say (550 5.1.1, 450 4.1.1 or 250), each address is probed
once (the cache, shared by the workers), and pipelined RCPTs are answered in order.
"""

from __future__ import annotations

import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import RawClient
from dnsserver import DnsRecords, running_dnsmasq
from server import Server, free_port, metric, running_server, wait_until
from smtp_peer import Script, SmtpPeer

GOOD = "alice@relay.example"
GONE = "gone@relay.example"
GREY = "grey@relay.example"
REFUSED = "550 5.1.1 <gone@relay.example>: no such user"
GREYLISTED = "450 4.2.0 greylisted, try again later"


def verify_config(port: int, extra_policy: str = "", trusted: bool = False) -> str:
    return f"""
[policy]
relay_domains = ["relay.example"]
{"" if trusted else "trusted_networks = []"}
verify_recipients = true
verify_timeout = 5.0
{extra_policy}
[[route]]
domain = "relay.example"
host = "127.0.0.1:{port}"
tls = "none"
"""


@pytest.fixture
def peer() -> Iterator[SmtpPeer]:
    with SmtpPeer(Script(rcpt={GONE: REFUSED, GREY: GREYLISTED})) as running:
        yield running


@pytest.fixture
def verifying(tmp_path: Path, peer: SmtpPeer) -> Iterator[Server]:
    with running_server(tmp_path, verify_config(peer.port), roles=("mx",)) as srv:
        yield srv


def rcpt(server: Server, address: str) -> tuple[int, bytes]:
    """The reply to RCPT TO:<address> in a fresh session from an untrusted client."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.ehlo("client.example")
        assert client.mail("sender@elsewhere.example")[0] == 250
        return client.rcpt(address)


def test_rcpt_gets_what_the_next_hop_says_and_each_address_is_probed_once(
    verifying: Server, peer: SmtpPeer
) -> None:
    code, text = rcpt(verifying, GONE)
    assert code == 550, text
    assert text == (
        b"5.1.1 <gone@relay.example>: Recipient address rejected: undeliverable address: "
        b"host 127.0.0.1[127.0.0.1] said: " + REFUSED.encode() + b" (in reply to RCPT TO command)"
    )
    code, text = rcpt(verifying, GREY)
    assert code == 450, text
    assert text.startswith(b"4.1.1 <grey@relay.example>: Recipient address rejected: unverified")
    assert GREYLISTED.encode() in text
    assert rcpt(verifying, GOOD)[0] == 250
    assert peer.connections == 3  # one probe each
    # Asked again: the same answers, from the cache (the peer sees no new probe).
    assert rcpt(verifying, GONE)[0] == 550
    assert rcpt(verifying, GREY)[0] == 450
    assert rcpt(verifying, GOOD)[0] == 250
    assert rcpt(verifying, "Alice@RELAY.example")[0] == 250  # new local part: a probe
    assert peer.connections == 4
    assert peer.messages == []  # a probe never sends DATA
    log = verifying.log()
    assert "address probe <gone@relay.example>: undeliverable" in log
    assert "recipient <grey@relay.example> refused: unverified address" in log


def test_a_next_hop_without_pipelining_is_probed_step_by_step(
    tmp_path: Path, peer: SmtpPeer
) -> None:
    peer.script.extensions = ("8BITMIME", "ENHANCEDSTATUSCODES")
    with running_server(tmp_path, verify_config(peer.port), roles=("mx",)) as srv:
        assert rcpt(srv, GONE)[0] == 550
        assert rcpt(srv, GREY)[0] == 450
        assert rcpt(srv, GOOD)[0] == 250
    assert peer.connections == 3
    # One command per write: MAIL, RCPT and RSET in one would be 50 octets and more.
    assert max(peer.reads) < 40, peer.reads


def test_a_verified_recipient_is_queued(verifying: Server, peer: SmtpPeer) -> None:
    with smtplib.SMTP("127.0.0.1", verifying.port, timeout=30) as client:
        client.ehlo("client.example")
        refused = client.sendmail("s@elsewhere.example", [GOOD, GONE], b"Subject: t\r\n\r\nhi\r\n")
    assert list(refused) == [GONE]
    assert verifying.queue_count() == 1


def test_pipelined_rcpts_are_answered_in_order(verifying: Server, peer: SmtpPeer) -> None:
    client = RawClient(verifying.port)
    try:
        assert client.cmd(b"EHLO client.example").startswith(b"250-")
        client.send(
            b"MAIL FROM:<s@elsewhere.example>\r\n"
            + b"".join(b"RCPT TO:<%s>\r\n" % a.encode() for a in (GOOD, GONE, GREY, GOOD, GONE))
            + b"NOOP\r\nDATA\r\n"
        )
        codes = [reply[:9] for reply in client.replies(8)]
        assert codes == [
            b"250 2.1.0",
            b"250 2.1.5",
            b"550 5.1.1",
            b"450 4.1.1",
            b"250 2.1.5",
            b"550 5.1.1",
            b"250 2.0.0",
            b"354 End d",
        ]
        assert client.cmd(b"Subject: t\r\n\r\nhi\r\n.").startswith(b"250 2.0.0 Ok: queued")
    finally:
        client.close()
    assert peer.connections == 3


def test_the_cache_is_shared_by_the_workers(tmp_path: Path, peer: SmtpPeer) -> None:
    with running_server(tmp_path, verify_config(peer.port), workers=2, roles=("mx",)) as srv:
        wait_until(lambda: len(srv.worker_pids()) == 2)
        first, second = sessions_on_two_workers(srv)
        try:
            for client in (first, second):
                assert client.cmd(b"EHLO client.example").startswith(b"250")
                assert client.cmd(b"MAIL FROM:<s@elsewhere.example>").startswith(b"250")
            assert first.cmd(b"RCPT TO:<%s>" % GONE.encode()).startswith(b"550 5.1.1")
            assert second.cmd(b"RCPT TO:<%s>" % GONE.encode()).startswith(b"550 5.1.1")
            assert first.cmd(b"RCPT TO:<%s>" % GOOD.encode()).startswith(b"250")
            assert second.cmd(b"RCPT TO:<%s>" % GOOD.encode()).startswith(b"250")
        finally:
            first.close()
            second.close()
        assert peer.connections == 2


def test_a_slow_probe_defers_the_client_and_is_cached_for_its_retry(
    tmp_path: Path, peer: SmtpPeer
) -> None:
    peer.script.delay = 0.5  # each reply: the probe takes about 2.5 s, the client waits 1 s
    extra = verify_config(peer.port).replace("verify_timeout = 5.0", "verify_timeout = 1.0")
    with running_server(tmp_path, extra, roles=("mx",)) as srv:
        code, text = rcpt(srv, GOOD)
        assert code == 450, text
        assert text.endswith(b"unverified address: address verification in progress")
        wait_until(lambda: "address probe <alice@relay.example>: deliverable" in srv.log())
        peer.script.delay = 0.0
        assert rcpt(srv, GOOD)[0] == 250
    assert peer.connections == 1


def test_tempfail_accept_and_an_unreachable_next_hop(tmp_path: Path, peer: SmtpPeer) -> None:
    closed = free_port()  # nothing listens there
    extra = verify_config(peer.port, 'verify_tempfail = "accept"') + (
        f'[[route]]\ndomain = "down.example"\nhost = "127.0.0.1:{closed}"\ntls = "none"\n'
    )
    extra = extra.replace('["relay.example"]', '["relay.example", "down.example"]')
    with running_server(tmp_path, extra, roles=("mx",)) as srv:
        assert rcpt(srv, GREY)[0] == 250
        assert rcpt(srv, "x@down.example")[0] == 250
        assert rcpt(srv, GONE)[0] == 550  # a refusal is still a refusal
    extra = verify_config(peer.port).replace(str(peer.port), str(closed))
    (tmp_path / "defer").mkdir()
    with running_server(tmp_path / "defer", extra, roles=("mx",)) as srv:
        code, text = rcpt(srv, GOOD)
        assert code == 450, text
        assert b"unverified address: cannot connect to 127.0.0.1:" in text
    # A next hop that refuses the probe's sender says nothing about the address: 450.
    peer.script.mail = "553 5.7.1 <>: sender refused"
    (tmp_path / "sender").mkdir()
    with running_server(tmp_path / "sender", verify_config(peer.port), roles=("mx",)) as srv:
        code, text = rcpt(srv, GONE)
        assert code == 450, text
        assert text.endswith(b"said: 553 5.7.1 <>: sender refused (in reply to MAIL FROM command)")


def test_mx_routing_and_domains_without_mail_service(tmp_path: Path, peer: SmtpPeer) -> None:
    """The probe goes where delivery would: the MX host; a null MX or NXDOMAIN is a 550."""
    peer.script.rcpt["gone@mx.example"] = REFUSED
    records = (
        DnsRecords()
        .mx("mx.example", "mx1.mx.example", 10)
        .a("mx1.mx.example", "127.0.0.1")
        .null_mx("nomail.example")
    )
    with running_dnsmasq(tmp_path, records) as dns_server:
        extra = f"""
[policy]
relay_domains = ["mx.example", "nomail.example", "gone.example"]
trusted_networks = []
verify_recipients = true
[delivery]
resolver = "{dns_server.address}"
port = {peer.port}
tls = "none"
"""
        with running_server(tmp_path, extra, roles=("mx",)) as srv:
            assert rcpt(srv, "someone@mx.example")[0] == 250
            code, text = rcpt(srv, "gone@mx.example")
            assert code == 550 and b"host mx1.mx.example[127.0.0.1] said: 550 5.1.1" in text
            code, text = rcpt(srv, "a@nomail.example")
            assert code == 550 and text.startswith(b"5.1.10 <a@nomail.example>: Recipient")
            code, text = rcpt(srv, "a@gone.example")
            assert code == 550 and text.startswith(b"5.1.2 <a@gone.example>: Recipient"), text
    assert peer.connections == 2


def test_trusted_clients_and_other_domains_are_not_probed(tmp_path: Path, peer: SmtpPeer) -> None:
    with running_server(tmp_path, verify_config(peer.port, trusted=True), roles=("mx",)) as srv:
        assert rcpt(srv, GONE)[0] == 250  # 127.0.0.1 is trusted: its mail is not probed
        assert rcpt(srv, "someone@elsewhere.example")[0] == 250
    assert peer.connections == 0


def test_probes_and_refusals_are_counted_in_metrics(tmp_path: Path, peer: SmtpPeer) -> None:
    port = free_port()
    extra = verify_config(peer.port) + f'[metrics]\naddress = "127.0.0.1:{port}"\n'
    with running_server(tmp_path, extra, roles=("mx",)) as srv:
        for address in (GONE, GREY, GOOD, GONE):
            rcpt(srv, address)

        def counted() -> dict[str, float]:
            return {
                **{r: metric(port, "tachymail_address_probes_total", result=r) for r in RESULTS},
                "refused": metric(port, "tachymail_recipients_rejected_total", reason="unverified"),
            }

        expected = {"deliverable": 1, "undeliverable": 1, "unverified": 1, "refused": 3}
        wait_until(lambda: counted() == expected)


RESULTS = ("deliverable", "undeliverable", "unverified")


def sessions_on_two_workers(server: Server) -> tuple[RawClient, RawClient]:
    """Two greeted sessions served by different worker processes (found through /proc)."""
    by_worker: dict[int, RawClient] = {}
    extra: list[RawClient] = []
    deadline = time.monotonic() + 20
    while len(by_worker) < 2:
        assert time.monotonic() < deadline, "the kernel never picked the second worker"
        client = RawClient(server.port)
        worker = serving_worker(server, client.sock)
        if worker in by_worker:
            extra.append(client)
        else:
            by_worker[worker] = client
    for client in extra:
        client.close()
    first, second = by_worker.values()
    return first, second


def serving_worker(server: Server, sock: socket.socket) -> int:
    """The pid of the worker holding the server side of *sock*'s connection."""
    client_port = sock.getsockname()[1]
    wanted_local = f"0100007F:{server.port:04X}"
    wanted_remote = f"0100007F:{client_port:04X}"
    inode = ""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == wanted_local and fields[2] == wanted_remote:
            inode = fields[9]
    assert inode and inode != "0", "the server side of the connection is not in /proc/net/tcp"
    for pid in server.worker_pids():
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if fd.readlink().name == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError("no worker holds the connection")

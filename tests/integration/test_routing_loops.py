"""Mail loops end to end (issue 17, defect 1): a next hop that is ourselves bounces with
5.4.6 at once, and two servers relaying a domain to each other stop the message within
the hop limit instead of passing it back and forth for ever."""

from __future__ import annotations

import json
import signal
import smtplib
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnsserver import DnsRecords, running_dnsmasq
from server import Server, free_port, start, wait_until, write_config
from smtp_peer import SmtpPeer


@contextmanager
def server_on(tmp_path: Path, name: str, port: int, extra: str) -> Iterator[Server]:
    """A delivering tachymail on mx port *port* (known before its configuration is written,
    so that routes can point at it); stopped by PID afterwards."""
    home = tmp_path / name
    home.mkdir()
    config = home / "tachymail.toml"
    write_config(config, home / "data", {"mx": port}, extra, hold=False)
    srv = start(config, home / "data", {"mx": port}, 1, home / "server.log")
    try:
        yield srv
    finally:
        if srv.stop() != 0:
            srv.stop(signal.SIGKILL)


def route(domain: str, port: int) -> str:
    return f'[[route]]\ndomain = "{domain}"\nhost = "127.0.0.1:{port}"\ntls = "none"\n\n'


FAST = '[delivery]\nretry_schedule = [1]\ndelay_warning = 0\nresolver = "127.0.0.1:9"\n'


def send(port: int, rcpt: str, sender: str = "alice@sender.example") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("client.test")
        client.sendmail(sender, [rcpt], f"From: {sender}\r\nTo: {rcpt}\r\nSubject: x\r\n\r\nhi\r\n")


def attempts(srv: Server) -> list[dict[str, object]]:
    path = srv.data_dir / "delivery.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def accepted(srv: Server) -> int:
    return srv.log().count(" queued: from <")


def test_route_to_our_own_listener_bounces_with_5_4_6_instead_of_looping(tmp_path: Path) -> None:
    port = free_port()
    with (
        SmtpPeer() as peer,
        server_on(
            tmp_path,
            "self",
            port,
            route("loop.example", port) + route("sender.example", peer.port) + FAST,
        ) as srv,
    ):
        send(port, "bob@loop.example")
        (dsn,) = peer.wait_for(1)
        assert dsn.recipients == ["alice@sender.example"]
        assert b"Status: 5.4.6" in dsn.content
        assert b"mail for loop.example loops back to myself" in dsn.content
        wait_until(lambda: srv.queue_count() == 0)
        # The message was taken in once and never sent to ourselves.
        assert accepted(srv) == 1
        tries = [a for a in attempts(srv) if a["recipient"] == "bob@loop.example"]
        assert [(a["result"], a["code"]) for a in tries] == [("bounced", 554)]


def test_mx_that_resolves_to_our_listener_bounces_with_5_4_6(tmp_path: Path) -> None:
    port = free_port()
    records = DnsRecords().mx("mxloop.test", "mx.mxloop.test", 10).a("mx.mxloop.test", "127.0.0.1")
    with ExitStack() as stack:
        dns = stack.enter_context(running_dnsmasq(tmp_path, records))
        peer = stack.enter_context(SmtpPeer())
        extra = (
            route("sender.example", peer.port)
            + f'[delivery]\nretry_schedule = [1]\ndelay_warning = 0\nresolver = "{dns.address}"\n'
            + f"port = {port}\n"
        )
        srv = stack.enter_context(server_on(tmp_path, "mx", port, extra))
        send(port, "carol@mxloop.test")
        (dsn,) = peer.wait_for(1)
        assert b"Status: 5.4.6" in dsn.content
        assert b"mail for mxloop.test loops back to myself" in dsn.content
        assert accepted(srv) == 1


def test_another_server_on_another_port_of_our_address_is_not_us(tmp_path: Path) -> None:
    """No false positive: the peer listens on 127.0.0.1 as we do, on another port."""
    port = free_port()
    with (
        SmtpPeer() as peer,
        server_on(tmp_path, "ok", port, route("dest.example", peer.port) + FAST) as srv,
    ):
        send(port, "dan@dest.example")
        (got,) = peer.wait_for(1)
        assert got.recipients == ["dan@dest.example"]
        wait_until(lambda: srv.queue_count() == 0)


def test_two_servers_relaying_a_domain_to_each_other_stop_within_the_hop_limit(
    tmp_path: Path,
) -> None:
    port_a, port_b = free_port(), free_port()
    with SmtpPeer() as peer:
        senders = route("sender.example", peer.port)
        with (
            server_on(tmp_path, "a", port_a, route("ping.example", port_b) + senders + FAST) as a,
            server_on(tmp_path, "b", port_b, route("ping.example", port_a) + senders + FAST) as b,
        ):
            send(port_a, "eve@ping.example")
            # The server that would take the 51st hop refuses it; the other bounces.
            (dsn,) = peer.wait_for(1, timeout=120)
            assert b"Status: 5.4.6" in dsn.content
            assert b"Too many hops" in dsn.content
            wait_until(lambda: a.queue_count() == 0 and b.queue_count() == 0, timeout=60)
            # 1 from the client, then one per hop: at most 50 hops were taken in.
            assert accepted(a) + accepted(b) == 51
            refused = "too many hops (51 Received/Delivered-To, limit 50)"
            assert refused in a.log() + b.log()

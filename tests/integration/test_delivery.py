"""Outbound delivery end to end: tachymail relays to real SMTP peers over loopback.

The downstream is a scripted SMTP server (tests/smtp_peer.py) reached through a
configured route, so each test controls exactly what the next hop answers.
"""

from __future__ import annotations

import email
import json
import signal
import smtplib
import sys
import time
from email import policy
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import Server, run_cli, running_server, wait_until
from smtp_peer import Script, SmtpPeer


def relay_config(peer_port: int, extra: str = "") -> str:
    """Route the recipient and sender domains to the peer; fast retries for tests."""
    return (
        f'[[route]]\ndomain = "dest.example"\nhost = "127.0.0.1:{peer_port}"\ntls = "none"\n\n'
        f'[[route]]\ndomain = "sender.example"\nhost = "127.0.0.1:{peer_port}"\ntls = "none"\n\n'
        '[delivery]\nretry_schedule = [1]\ndelay_warning = 0\nresolver = "127.0.0.1:9"\n' + extra
    )


POOL_OF_TWO = "[pool]\ninitial_connections = 1\nmax_connections = 2\n"


def send(
    port: int,
    rcpts: list[str],
    body: str = "Hello.\r\n",
    sender: str = "alice@sender.example",
    mail_options: tuple[str, ...] = (),
    rcpt_options: tuple[str, ...] = (),
    headers: str = "",
) -> str:
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.test")
        client.mail(sender, list(mail_options))
        for rcpt in rcpts:
            code, _ = client.rcpt(rcpt, list(rcpt_options))
            assert code == 250
        head = f"From: {sender}\r\nTo: {', '.join(rcpts)}\r\nSubject: test\r\n{headers}"
        code, text = client.data(f"{head}\r\n{body}".encode())
        assert code == 250
        return text.decode().split()[-1]


def delivery_log(srv: Server) -> list[dict[str, object]]:
    path = srv.data_dir / "delivery.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_delivers_over_one_persistent_pipelined_connection(tmp_path: Path) -> None:
    with (
        SmtpPeer() as peer,
        running_server(
            tmp_path, relay_config(peer.port) + POOL_OF_TWO, hold=False, roles=("mx",)
        ) as srv,
    ):
        ids = [send(srv.port, [f"r{i}@dest.example", f"s{i}@dest.example"]) for i in range(20)]
        got = peer.wait_for(20)
        assert sorted(m.recipients for m in got) == sorted(
            [f"r{i}@dest.example", f"s{i}@dest.example"] for i in range(20)
        )
        assert all(m.sender == "alice@sender.example" for m in got)
        assert all(
            b"Subject: test" in m.content and b"Received: from client.test" in m.content
            for m in got
        )
        assert peer.connections <= 2, "connections are reused within the pool's limit"
        per_connection = [sum(m.connection == c for m in got) for c in range(1, 3)]
        assert max(per_connection) >= 10
        # PIPELINING: MAIL, both RCPTs and DATA arrive together, so reads < commands.
        assert len(peer.reads) < 20 * 5
        wait_until(lambda: srv.queue_count() == 0)
        entries = delivery_log(srv)
        assert {e["queue_id"] for e in entries} == set(ids)
        first = entries[0]
        assert first["result"] == "delivered" and first["code"] == 250
        assert first["remote_ip"] == "127.0.0.1" and first["attempt"] == 1
        assert 0 <= float(first["latency"]) < 10  # type: ignore[arg-type]


def test_temporary_failure_is_retried_then_delivered(tmp_path: Path) -> None:
    script = Script(rcpt={"later@dest.example": "450 4.2.0 mailbox busy"})
    with (
        SmtpPeer(script) as peer,
        running_server(tmp_path, relay_config(peer.port), hold=False, roles=("mx",)) as srv,
    ):
        queue_id = send(srv.port, ["now@dest.example", "later@dest.example"])
        peer.wait_for(1)
        wait_until(lambda: any(e["result"] == "deferred" for e in delivery_log(srv)))
        [entry] = [
            json.loads(x)
            for x in run_cli("queue", "list", "--json", data_dir=srv.data_dir).splitlines()
        ]
        states = {r["address"]: r["state"] for r in entry["recipients"]}
        assert states == {"now@dest.example": "delivered", "later@dest.example": "queued"}
        deferred = next(r for r in entry["recipients"] if r["state"] == "queued")
        assert deferred["last_reply"].startswith("450 4.2.0") and deferred["attempts"] == 1
        script.rcpt.clear()  # the mailbox is free again
        peer.wait_for(2)
        assert peer.messages[1].recipients == ["later@dest.example"]
        wait_until(lambda: srv.queue_count() == 0)
        results = [e["result"] for e in delivery_log(srv) if e["queue_id"] == queue_id]
        assert results.count("delivered") == 2 and "deferred" in results


def test_permanent_failure_bounces_with_an_rfc3464_report(tmp_path: Path) -> None:
    script = Script(rcpt={"nobody@dest.example": "550 5.1.1 no such user"})
    with (
        SmtpPeer(script) as peer,
        running_server(tmp_path, relay_config(peer.port), hold=False, roles=("mx",)) as srv,
    ):
        send(
            srv.port,
            ["nobody@dest.example"],
            mail_options=("RET=HDRS", "ENVID=env-42"),
            rcpt_options=("NOTIFY=FAILURE", "ORCPT=rfc822;nobody@dest.example"),
        )
        [dsn] = peer.wait_for(1)
        assert dsn.sender == "" and dsn.recipients == ["alice@sender.example"]
        report = email.message_from_bytes(dsn.content, policy=policy.default)
        assert report.get_content_type() == "multipart/report"
        assert report.get_param("report-type") == "delivery-status"
        parts = list(report.iter_parts())
        status = parts[1]
        assert status.get_content_type() == "message/delivery-status"
        text = status.as_string()
        assert "Reporting-MTA: dns; mx.test.example" in text
        assert "Original-Envelope-Id: env-42" in text
        assert "Final-Recipient: rfc822; nobody@dest.example" in text
        assert "Original-Recipient: rfc822;nobody@dest.example" in text.replace(
            "rfc822; ", "rfc822;"
        )
        assert "Action: failed" in text and "Status: 5.1.1" in text
        assert "Diagnostic-Code: smtp; 550 5.1.1 no such user" in text
        assert "Remote-MTA: dns; 127.0.0.1" in text
        assert parts[2].get_content_type() == "text/rfc822-headers"  # RET=HDRS
        wait_until(lambda: srv.queue_count() == 0)


def test_a_bounce_that_cannot_be_delivered_is_dropped_not_bounced(tmp_path: Path) -> None:
    script = Script(
        rcpt={
            "nobody@dest.example": "550 5.1.1 no such user",
            "alice@sender.example": "550 5.1.1 sender gone too",
        }
    )
    with (
        SmtpPeer(script) as peer,
        running_server(tmp_path, relay_config(peer.port), hold=False, roles=("mx",)) as srv,
    ):
        send(srv.port, ["nobody@dest.example"])
        wait_until(lambda: "dropping undeliverable DSN" in srv.log())
        wait_until(lambda: srv.queue_count() == 0)
        assert peer.messages == []


def test_421_and_cut_connections_defer_and_lower_concurrency(tmp_path: Path) -> None:
    script = Script(greeting="421 4.3.2 too busy, come back later")
    with (
        SmtpPeer(script) as peer,
        running_server(tmp_path, relay_config(peer.port), hold=False, roles=("mx",)) as srv,
    ):
        for i in range(3):
            send(srv.port, [f"r{i}@dest.example"])
        wait_until(lambda: len([e for e in delivery_log(srv) if e["result"] == "deferred"]) >= 3)
        assert all("421" in str(e["reply"]) for e in delivery_log(srv))
        script.greeting = "220 peer.test ESMTP"
        script.cut_at = "DATA"  # now it drops the connection mid-transaction
        wait_until(
            lambda: any(
                "connection" in str(e["reply"]) for e in delivery_log(srv) if e["attempt"] != 1
            )
        )
        script.cut_at = ""
        peer.wait_for(3)
        wait_until(lambda: srv.queue_count() == 0)
        assert "in trouble" in srv.log()


def test_8bit_message_is_downgraded_for_a_7bit_peer(tmp_path: Path) -> None:
    script = Script(extensions=("PIPELINING", "ENHANCEDSTATUSCODES"))
    with (
        SmtpPeer(script) as peer,
        running_server(tmp_path, relay_config(peer.port), hold=False, roles=("mx",)) as srv,
    ):
        body = "Grüße aus Köln\r\n".encode()
        with smtplib.SMTP("127.0.0.1", srv.port) as client:
            client.sendmail(
                "alice@sender.example",
                ["bob@dest.example"],
                b"Subject: umlauts\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body,
                mail_options=["BODY=8BITMIME"],
            )
        [got] = peer.wait_for(1)
        assert got.content.isascii()
        assert "BODY=8BITMIME" not in got.mail_args
        parsed = email.message_from_bytes(got.content, policy=policy.default)
        assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
        assert parsed.get_content() == body.decode()


def test_smtputf8_message_to_a_peer_without_it_bounces(tmp_path: Path) -> None:
    script = Script(extensions=("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"))
    with (
        SmtpPeer(script) as peer,
        running_server(tmp_path, relay_config(peer.port), hold=False, roles=("mx",)) as srv,
    ):
        with smtplib.SMTP("127.0.0.1", srv.port) as client:
            client.ehlo()
            client.mail("alice@sender.example", ["SMTPUTF8"])
            client.rcpt("jürgen@dest.example")
            client.data("Subject: ü\r\n\r\nx\r\n".encode())
        [dsn] = peer.wait_for(1)
        assert dsn.recipients == ["alice@sender.example"]
        assert b"Status: 5.6.7" in dsn.content


def test_dsn_parameters_are_passed_on_and_bdat_used(tmp_path: Path) -> None:
    script = Script(extensions=("PIPELINING", "8BITMIME", "DSN", "CHUNKING", "ENHANCEDSTATUSCODES"))
    with (
        SmtpPeer(script) as peer,
        running_server(tmp_path, relay_config(peer.port), hold=False, roles=("mx",)) as srv,
    ):
        send(
            srv.port,
            ["bob@dest.example"],
            mail_options=("RET=FULL", "ENVID=a+2Bb"),
            rcpt_options=("NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob+2Bx@dest.example"),
        )
        [relayed] = peer.wait_for(1)
        assert "RET=FULL" in relayed.mail_args and "ENVID=a+2Bb" in relayed.mail_args
        assert relayed.rcpt_args == ["NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+2Bx@dest.example"]
        wait_until(lambda: srv.queue_count() == 0)
        # The peer has DSN: the success report is its to send (tests/integration/test_dsn_relay.py).
        assert len(peer.messages) == 1


def test_queue_commands_hold_release_bounce_delete(tmp_path: Path) -> None:
    script = Script(rcpt={"slow@dest.example": "451 4.3.0 try again"})
    with (
        SmtpPeer(script) as peer,
        running_server(tmp_path, relay_config(peer.port), hold=False, roles=("mx",)) as srv,
    ):
        kept = send(srv.port, ["slow@dest.example"])
        gone = send(srv.port, ["slow@dest.example"])
        bounced = send(srv.port, ["slow@dest.example"])
        wait_until(lambda: len(delivery_log(srv)) >= 3)
        run_cli("queue", "hold", kept, data_dir=srv.data_dir)
        run_cli("queue", "delete", gone, data_dir=srv.data_dir)
        run_cli("queue", "bounce", bounced, data_dir=srv.data_dir)
        [dsn] = peer.wait_for(1)
        assert b"Status: 5.0.0" in dsn.content and b"slow@dest.example" in dsn.content
        listing = [
            json.loads(x)
            for x in run_cli("queue", "list", "--json", data_dir=srv.data_dir).splitlines()
        ]
        assert [(e["id"], e["state"]) for e in listing] == [(kept, "held")]
        script.rcpt.clear()
        time.sleep(1.5)
        assert len(peer.messages) == 1, "a held message is not delivered"
        run_cli("queue", "release", kept, data_dir=srv.data_dir)
        run_cli("queue", "flush", data_dir=srv.data_dir)
        peer.wait_for(2)
        wait_until(lambda: srv.queue_count() == 0)


@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_during_delivery_loses_nothing(tmp_path: Path, workers: int) -> None:
    script = Script(delay=0.002)
    with SmtpPeer(script) as peer:
        extra = relay_config(peer.port, f"workers = {workers}\n")
        with running_server(tmp_path, extra, hold=True, roles=("mx",)) as srv:
            ids = [send(srv.port, [f"k{i}@dest.example"]) for i in range(300)]
        # Restart delivering, kill -9 everything mid-flow, restart, and wait for all.
        config = srv.config_path.read_text().replace("hold = true", "hold = false")
        srv.config_path.write_text(config)
        from server import start

        srv = start(srv.config_path, srv.data_dir, srv.ports, 1, tmp_path / "again.log")
        wait_until(lambda: len(peer.messages) > 20)
        srv.kill()
        srv = start(srv.config_path, srv.data_dir, srv.ports, 1, tmp_path / "again2.log")
        try:
            wait_until(lambda: srv.queue_count() == 0, timeout=60)
        finally:
            srv.stop()
        got = {m.recipients[0] for m in peer.messages}
        assert got == {f"k{i}@dest.example" for i in range(300)}, "every message at least once"
        assert len(ids) == 300


def test_delay_warning_once_then_delivery(tmp_path: Path) -> None:
    script = Script(rcpt={"busy@dest.example": "451 4.2.1 mailbox busy"})
    with SmtpPeer(script) as peer:
        config = relay_config(peer.port).replace("delay_warning = 0", "delay_warning = 1")
        with running_server(tmp_path, config, hold=False, roles=("mx",)) as srv:
            send(srv.port, ["busy@dest.example"], rcpt_options=("NOTIFY=DELAY,FAILURE",))
            [warning] = peer.wait_for(1)
            assert warning.sender == "" and warning.recipients == ["alice@sender.example"]
            assert b"Action: delayed" in warning.content and b"Status: 4.2.1" in warning.content
            assert b"Will-Retry-Until:" in warning.content
            time.sleep(2.5)  # further retries happen, but the warning is sent only once
            assert len(peer.messages) == 1
            script.rcpt.clear()
            peer.wait_for(2)
            assert peer.messages[1].recipients == ["busy@dest.example"]


def test_a_peer_slower_than_the_timeout_defers(tmp_path: Path) -> None:
    script = Script(delay=0.0)
    with SmtpPeer(script) as peer:
        config = relay_config(peer.port, "command_timeout = 1.0\n")
        with running_server(tmp_path, config, hold=False, roles=("mx",)) as srv:
            script.delay = 1.5  # every reply now comes too late
            send(srv.port, ["slow@dest.example"])
            wait_until(lambda: any(e["result"] == "deferred" for e in delivery_log(srv)))
            entry = next(e for e in delivery_log(srv) if e["result"] == "deferred")
            assert entry["code"] == 451 and "timeout" in str(entry["reply"])
            script.delay = 0.0
            peer.wait_for(1)
            wait_until(lambda: srv.queue_count() == 0)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_during_delivery_sends_each_message_once(tmp_path: Path, workers: int) -> None:
    """SIGHUP starts a new delivery worker while the old one finishes what it holds: the
    new one must not take those messages too (with two workers, each shard's successor
    waits for its own predecessor while both deliver to the one destination)."""
    script = Script(delay=0.003)  # a slow peer: many messages are under way at the reload
    with SmtpPeer(script) as peer:
        config = relay_config(peer.port, f"workers = {workers}\n")
        with running_server(tmp_path, config, hold=True, roles=("mx",)) as srv:
            for i in range(150):
                send(srv.port, [f"h{i}@dest.example"])
        config = srv.config_path.read_text().replace("hold = true", "hold = false")
        srv.config_path.write_text(config)
        from server import start

        srv = start(srv.config_path, srv.data_dir, srv.ports, 1, tmp_path / "again.log")
        try:
            wait_until(lambda: len(peer.messages) > 10)
            srv.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "configuration reloaded" in srv.log())
            wait_until(lambda: srv.queue_count() == 0, timeout=60)
            time.sleep(0.5)
        finally:
            srv.stop()
        got = sorted(m.recipients[0] for m in peer.messages)
        assert got == sorted(f"h{i}@dest.example" for i in range(150)), "each exactly once"

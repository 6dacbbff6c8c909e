"""No backscatter (issue 16, finding 4): recipients in local domains are refused at RCPT.

Local delivery does not exist yet, so mail for a local domain can never be delivered; it
used to be accepted, deferred, and then answered with a delay DSN and a bounce to the
(usually forged) sender. Now it gets 550 5.1.1 at RCPT from every client on every
listener, and mail that still reaches the local hop (queued before a configuration
change) stays deferred without any DSN.
"""

from __future__ import annotations

import json
import smtplib
import ssl
import time
from pathlib import Path

import pytest

from conftest import RawClient
from server import Server, run_cli, running_server, wait_until
from tachymail.queue.envelope import Envelope, Recipient, new_queue_id
from tachymail.queue.store import QueueStore, put_message

# Delivery runs (hold = false); resolver 127.0.0.1:9 keeps every DNS lookup on loopback.
LOCAL = """
[policy]
local_domains = ["local.example"]
{trusted}
[[route]]
domain = "routed.example"
host = "local"
[delivery]
resolver = "127.0.0.1:9"
retry_schedule = [1]
delay_warning = 1
"""


def queued(server: Server) -> list[dict[str, object]]:
    out = run_cli("queue", "list", "--json", data_dir=server.data_dir)
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
def test_unknown_local_recipient_is_refused_at_rcpt(tmp_path: Path, trusted: bool) -> None:
    extra = LOCAL.format(trusted="" if trusted else "trusted_networks = []")
    with running_server(tmp_path, extra, roles=("mx",), hold=False) as srv:
        with smtplib.SMTP("127.0.0.1", srv.port) as client:
            client.ehlo()
            assert client.mail("forged@victim.example")[0] == 250
            for address in ("nobody@local.example", "Nobody@LOCAL.Example", "x@routed.example"):
                code, text = client.rcpt(address)
                assert code == 550, (address, code, text)
                assert text.startswith(b"5.1.1 <" + address.encode() + b">: Recipient address")
                assert b"User unknown in local recipient table" in text
            # The transaction has no valid recipient: DATA is refused, nothing is queued.
            assert client.docmd("DATA")[0] == 554
        time.sleep(1.5)  # a delay DSN would be due after 1 s; nothing may appear
        assert srv.queue_count() == 0
        log = srv.log()
        assert "unknown local recipient <nobody@local.example>" in log
        assert "unknown local recipient <x@routed.example>" in log


def test_local_domains_are_refused_on_submission_too(
    tmp_path: Path, client_tls: ssl.SSLContext
) -> None:
    with running_server(tmp_path, LOCAL.format(trusted=""), roles=("submission",)) as srv:
        run_cli(
            "user",
            "add",
            "alice@x.example",
            "--password-stdin",
            data_dir=srv.data_dir,
            stdin="pw\n",
        )
        with smtplib.SMTP("127.0.0.1", srv.ports["submission"]) as client:
            client.starttls(context=client_tls)
            client.login("alice@x.example", "pw")
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                client.sendmail(
                    "alice@x.example", ["bob@local.example"], b"Subject: s\r\n\r\nb\r\n"
                )
            assert refused.value.recipients["bob@local.example"][0] == 550
        assert srv.queue_count() == 0


def test_bare_postmaster_is_local_and_refused(tmp_path: Path) -> None:
    """<postmaster> without a domain means this host, which has no mailboxes yet."""
    with running_server(tmp_path, LOCAL.format(trusted=""), roles=("mx",)) as srv:
        client = RawClient(srv.port)
        client.cmd(b"EHLO x")
        client.cmd(b"MAIL FROM:<a@example.com>")
        assert client.cmd(b"RCPT TO:<Postmaster>").startswith(b"550 5.1.1 <Postmaster>:")
        assert client.cmd(b"RCPT TO:<b@relayed.example>") == b"250 2.1.5 Ok"  # trusted relay
        client.close()


def test_relay_domains_are_still_accepted(tmp_path: Path) -> None:
    extra = '[policy]\ntrusted_networks = []\nrelay_domains = ["relayed.example"]\n'
    with running_server(tmp_path, extra, roles=("mx",)) as srv:
        client = RawClient(srv.port)
        client.cmd(b"EHLO x")
        client.cmd(b"MAIL FROM:<a@example.com>")
        assert client.cmd(b"RCPT TO:<b@Relayed.example>") == b"250 2.1.5 Ok"
        # No domain is local by default (nothing is delivered here yet): localhost is not ours.
        assert client.cmd(b"RCPT TO:<b@localhost>").startswith(b"554 5.7.1")
        client.close()


def test_mail_queued_before_a_domain_became_local_waits_without_dsn(tmp_path: Path) -> None:
    """The scheduler's local hop never writes a DSN: no delay warning, no bounce."""
    data_dir = tmp_path / "data"
    first = tmp_path / "first"
    first.mkdir()
    # Queued while local.example was not local (relayed for a trusted client), held.
    with running_server(first, roles=("mx",), data_dir=data_dir) as srv:
        with smtplib.SMTP("127.0.0.1", srv.port) as client:
            client.sendmail("someone@victim.example", ["bob@local.example"], b"Subject: s\r\n\r\nb")
        assert srv.queue_count() == 1
    second = tmp_path / "second"
    second.mkdir()
    extra = LOCAL.format(trusted="")
    with running_server(second, extra, roles=("mx",), data_dir=data_dir, hold=False) as srv:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            entries = queued(srv)
            attempts = [r["attempts"] for e in entries for r in e["recipients"]]  # type: ignore[attr-defined]
            if len(entries) > 1 or (attempts and min(attempts) >= 2):
                break
            time.sleep(0.2)
        time.sleep(1.0)  # past delay_warning (1 s) after the second attempt
        entries = queued(srv)
        assert len(entries) == 1, f"a DSN was queued: {entries}"
        [entry] = entries
        assert entry["sender"] == "someone@victim.example"
        [rcpt] = entry["recipients"]  # type: ignore[misc]
        assert rcpt["attempts"] >= 2
        assert "local delivery is not available" in rcpt["last_reply"]


def test_expired_local_mail_is_dropped_without_a_bounce(tmp_path: Path) -> None:
    """At max_lifetime the local hop gives up silently: a bounce would be backscatter."""
    data_dir = tmp_path / "data"
    store = QueueStore(data_dir / "queue")
    try:
        envelope = Envelope(
            id=new_queue_id(),
            sender="forged@victim.example",
            recipients=[Recipient("nobody@local.example")],
            arrival=time.time() - 6 * 86400,  # older than max_lifetime (5 days)
            size=20,
        )
        store.apply([put_message(envelope, b"Subject: s\r\n\r\nbody\r\n")])
    finally:
        store.close()
    extra = LOCAL.format(trusted="")
    with running_server(tmp_path, extra, roles=("mx",), data_dir=data_dir, hold=False) as srv:
        wait_until(lambda: "dropped without a DSN" in srv.log())
        wait_until(lambda: srv.queue_count() == 0)
        time.sleep(0.5)  # a bounce would have been queued in the same commit
        assert srv.queue_count() == 0
    assert f"{envelope.id} to <nobody@local.example>: dropped without a DSN" in srv.log()

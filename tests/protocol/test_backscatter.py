"""No backscatter (issue 16, finding 4): unknown local recipients are refused at RCPT.

Mail for an unknown recipient of a local domain used to be accepted, deferred, and then
answered with a delay DSN and a bounce to the (usually forged) sender. Now it gets 550
5.1.1 at RCPT from every client on every listener, while the directory's users and aliases
are accepted (tests/protocol/test_local_recipients.py). What the local hop does with mail that
was accepted (delivery into the mailbox store, bounces only after a legitimate acceptance)
is tested in tests/integration/test_local_delivery.py.
"""

from __future__ import annotations

import smtplib
import ssl
import time
from pathlib import Path

import pytest

from conftest import RawClient
from server import run_cli, running_server

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


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
def test_unknown_local_recipient_is_refused_at_rcpt(tmp_path: Path, trusted: bool) -> None:
    extra = LOCAL.format(trusted="" if trusted else "trusted_networks = []")
    with running_server(tmp_path, extra, roles=("mx",), hold=False) as srv:
        run_cli(
            "user",
            "add",
            "known@local.example",
            "--password-stdin",
            "-c",
            str(srv.config_path),
            stdin="pw\n",
        )
        with smtplib.SMTP("127.0.0.1", srv.port) as client:
            client.ehlo()
            # A user of the directory is accepted (the transaction is then reset).
            assert client.mail("forged@victim.example")[0] == 250
            assert client.rcpt("Known@local.example") == (250, b"2.1.5 Ok")
            assert client.rset()[0] == 250
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
    """<postmaster> without a domain is postmaster@ a local domain: none here has one."""
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
        # No domain is local by default: localhost is not ours.
        assert client.cmd(b"RCPT TO:<b@localhost>").startswith(b"554 5.7.1")
        client.close()

"""Recipients in local domains at RCPT, against a real `tachymail serve` over smtplib.

Users and aliases come from the users and aliases files (`tachymail user` / `tachymail
alias`, run while the server runs); the queued envelope is read back from the queue store:
aliases are expanded at intake into final recipients, each with the ORCPT of the address
the client gave. Delivery is held, so what the test reads is what intake queued.
"""

from __future__ import annotations

import smtplib
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import RawClient
from server import Server, run_cli, running_server
from tachymail.mailbox import MailboxStore, deliver, prepare_delivery
from tachymail.queue.envelope import Envelope
from tachymail.queue.store import QueueStore

LOCAL = """
[policy]
local_domains = ["example.test", "second.test"]
{trusted}
"""
MESSAGE = b"Subject: local\r\n\r\nbody\r\n"


def cli(server: Server, *args: str, stdin: str | None = None) -> str:
    """`tachymail ARGS` with the server's configuration (its local domains, its data)."""
    return run_cli(*args, "-c", str(server.config_path), stdin=stdin)


def add_user(server: Server, name: str, *extra: str) -> None:
    cli(server, "user", "add", name, "--password-stdin", *extra, stdin="secret\n")


def envelopes(server: Server) -> list[Envelope]:
    store = QueueStore(server.data_dir / "queue", readonly=True)
    try:
        return sorted(store.iter_envelopes(), key=lambda e: e.arrival)
    finally:
        store.close()


def recipients(envelope: Envelope) -> list[tuple[str, str | None]]:
    """(address, ORCPT) of each queued recipient."""
    return [(r.address, r.params.get("ORCPT")) for r in envelope.recipients]


@pytest.fixture(params=[True, False], ids=["trusted", "untrusted"])
def local_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    trusted = "" if request.param else "trusted_networks = []"
    with running_server(tmp_path, LOCAL.format(trusted=trusted), roles=("mx",)) as srv:
        add_user(srv, "alice@example.test")
        add_user(srv, "Bob@Example.test")  # stored lower-cased: mailbox users are
        yield srv


def test_unknown_users_are_refused_and_known_ones_accepted(local_server: Server) -> None:
    with smtplib.SMTP("127.0.0.1", local_server.port) as client:
        client.ehlo()
        assert client.mail("someone@elsewhere.test")[0] == 250
        code, text = client.rcpt("nobody@example.test")
        assert (code, text) == (
            550,
            b"5.1.1 <nobody@example.test>: Recipient address rejected: "
            b"User unknown in local recipient table",
        )
        assert client.rcpt("Nobody@SECOND.test")[0] == 550
        assert client.rcpt("ALICE@example.test") == (250, b"2.1.5 Ok")
        assert client.rcpt("bob@example.test") == (250, b"2.1.5 Ok")
        assert client.data(MESSAGE)[0] == 250
    [envelope] = envelopes(local_server)
    assert recipients(envelope) == [("alice@example.test", None), ("bob@example.test", None)]
    assert "unknown local recipient <nobody@example.test>" in local_server.log()


def test_aliases_expand_at_intake_with_orcpt(tmp_path: Path) -> None:
    with running_server(tmp_path, LOCAL.format(trusted=""), roles=("mx",)) as srv:
        add_user(srv, "alice@example.test")
        add_user(srv, "bob@example.test")
        cli(
            srv,
            "alias",
            "add",
            "sales@example.test",
            "alice@example.test",
            "team@example.test",
            "partner@remote.test",
        )
        cli(srv, "alias", "add", "team@example.test", "bob@example.test", "alice@example.test")
        with smtplib.SMTP("127.0.0.1", srv.port) as client:
            client.ehlo()
            client.mail("someone@elsewhere.test")
            assert client.rcpt("Sales@Example.test")[0] == 250
            # Already a recipient through the alias: accepted, not added twice.
            assert client.rcpt("bob@example.test")[0] == 250
            # The client's own ORCPT is kept.
            assert client.rcpt("team@example.test", ["ORCPT=rfc822;list+40x.test"])[0] == 250
            assert client.data(MESSAGE)[0] == 250
            client.mail("someone@elsewhere.test")
            assert client.rcpt("team@example.test", ["NOTIFY=SUCCESS,FAILURE"])[0] == 250
            assert client.data(MESSAGE)[0] == 250
        first, second = envelopes(srv)
        orcpt = "rfc822;Sales@Example.test"
        assert recipients(first) == [
            ("alice@example.test", orcpt),
            ("bob@example.test", orcpt),
            ("partner@remote.test", orcpt),
        ]
        assert [r.params for r in second.recipients] == [
            {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;team@example.test"},
            {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;team@example.test"},
        ]
        assert recipients(second) == [
            ("bob@example.test", "rfc822;team@example.test"),
            ("alice@example.test", "rfc822;team@example.test"),
        ]
        assert "<Sales@Example.test> expands to <alice@example.test>" in srv.log()


def test_catch_all_sub_addresses_and_bare_postmaster(tmp_path: Path) -> None:
    with running_server(tmp_path, LOCAL.format(trusted="trusted_networks = []")) as srv:
        add_user(srv, "alice@example.test")
        add_user(srv, "carol@second.test")
        client = RawClient(srv.port)
        client.cmd(b"EHLO x")
        client.cmd(b"MAIL FROM:<someone@elsewhere.test>")
        # No postmaster yet: refused as any unknown user.
        assert client.cmd(b"RCPT TO:<Postmaster>").startswith(b"550 5.1.1 <Postmaster>:")
        cli(srv, "alias", "add", "postmaster@second.test", "carol@second.test")
        assert client.cmd(b"RCPT TO:<Postmaster>") == b"250 2.1.5 Ok"
        # From now on example.test (tried first) has a postmaster too: its catch-all.
        cli(srv, "alias", "add", "@example.test", "alice@example.test")
        assert client.cmd(b"RCPT TO:<Alice+Lists@example.test>") == b"250 2.1.5 Ok"
        assert client.cmd(b"RCPT TO:<whoever@example.test>") == b"250 2.1.5 Ok"
        assert client.cmd(b"RCPT TO:<whoever@second.test>").startswith(b"550 5.1.1")
        assert client.cmd(b"DATA").startswith(b"354")
        assert client.cmd(MESSAGE + b".").startswith(b"250 2.0.0")
        client.close()
        [envelope] = envelopes(srv)
        assert recipients(envelope) == [
            ("carol@second.test", "rfc822;Postmaster"),
            ("alice+Lists@example.test", None),
            ("alice@example.test", "rfc822;whoever@example.test"),
        ]


def test_full_mailbox_is_refused_with_452(tmp_path: Path) -> None:
    with running_server(tmp_path, LOCAL.format(trusted=""), roles=("mx",)) as srv:
        add_user(srv, "carol@example.test", "--quota", "4K")
        add_user(srv, "dave@example.test")
        cli(srv, "alias", "add", "both@example.test", "carol@example.test", "dave@example.test")
        cli(srv, "alias", "add", "only@example.test", "carol@example.test")
        with smtplib.SMTP("127.0.0.1", srv.port) as client:
            client.ehlo()
            client.mail("someone@elsewhere.test")
            assert client.rcpt("carol@example.test")[0] == 250  # empty: room
            client.rset()
            store = MailboxStore(srv.data_dir / "mailbox")
            try:
                filled = prepare_delivery(
                    "carol@example.test", b"Subject: big\r\n\r\n" + b"x" * 4100
                )
                store.apply([deliver(filled)])
                assert store.usage("carol@example.test")[0] >= 4096
            finally:
                store.close()
            client.mail("someone@elsewhere.test")
            code, text = client.rcpt("carol@example.test")
            assert (code, text) == (
                452,
                b"4.2.2 <carol@example.test>: Recipient address rejected: Mailbox full",
            )
            assert client.rcpt("carol+tag@example.test")[0] == 452
            assert client.rcpt("only@example.test")[0] == 452
            # An alias reaching a mailbox with room is taken (carol's copy waits at delivery).
            assert client.rcpt("both@example.test")[0] == 250
            assert client.rcpt("dave@example.test")[0] == 250
            # The operator raises the quota: accepted at once, no restart.
            cli(srv, "user", "quota", "carol@example.test", "1M")
            assert client.rcpt("carol@example.test")[0] == 250
        assert "recipient <carol@example.test> refused: mailbox full" in srv.log()


def test_users_and_aliases_change_without_a_restart(tmp_path: Path) -> None:
    with running_server(tmp_path, LOCAL.format(trusted=""), roles=("mx",)) as srv:
        pid = srv.pid
        with smtplib.SMTP("127.0.0.1", srv.port) as client:
            client.ehlo()
            client.mail("someone@elsewhere.test")
            assert client.rcpt("erin@example.test")[0] == 550
            add_user(srv, "erin@example.test")
            assert client.rcpt("erin@example.test")[0] == 250
            assert client.rcpt("info@example.test")[0] == 550
            cli(srv, "alias", "add", "info@example.test", "erin@example.test")
            assert client.rcpt("info@example.test")[0] == 250
            cli(srv, "alias", "del", "info@example.test")
            cli(srv, "user", "del", "erin@example.test")
            assert client.rcpt("info@example.test")[0] == 550
            assert client.rcpt("erin@example.test")[0] == 550
        assert srv.pid == pid and srv.proc.poll() is None


def test_expansion_respects_max_recipients(tmp_path: Path) -> None:
    extra = LOCAL.format(trusted="") + "[limits]\nmax_recipients = 100\n"
    with running_server(tmp_path, extra, roles=("mx",)) as srv:
        many = [f"member{i}@remote.test" for i in range(60)]
        cli(srv, "alias", "add", "big@example.test", *many)
        cli(srv, "alias", "add", "bigger@example.test", *many[:30], "extra@remote.test")
        with smtplib.SMTP("127.0.0.1", srv.port) as client:
            client.ehlo()
            client.mail("someone@elsewhere.test")
            assert client.rcpt("big@example.test")[0] == 250
            # 30 of the 31 are there already: 61 recipients, within the limit of 100.
            assert client.rcpt("bigger@example.test")[0] == 250
            cli(srv, "alias", "add", "huge@example.test", *[f"x{i}@remote.test" for i in range(40)])
            code, text = client.rcpt("huge@example.test")
            assert (code, text[:5]) == (452, b"4.5.3")
            assert client.data(MESSAGE)[0] == 250
        [envelope] = envelopes(srv)
        assert len(envelope.recipients) == 61


def test_known_users_are_accepted_on_submission(tmp_path: Path, client_tls: ssl.SSLContext) -> None:
    with running_server(tmp_path, LOCAL.format(trusted=""), roles=("submission",)) as srv:
        add_user(srv, "alice@example.test")
        add_user(srv, "bob@example.test")
        with smtplib.SMTP("127.0.0.1", srv.ports["submission"]) as client:
            client.starttls(context=client_tls)
            client.login("alice@example.test", "secret")
            refused = client.sendmail(
                "alice@example.test",
                ["bob@example.test", "ghost@example.test"],
                MESSAGE,
            )
            assert refused == {
                "ghost@example.test": (
                    550,
                    b"5.1.1 <ghost@example.test>: Recipient address rejected: "
                    b"User unknown in local recipient table",
                )
            }
        deadline = time.monotonic() + 10
        while not envelopes(srv) and time.monotonic() < deadline:
            time.sleep(0.05)
        [envelope] = envelopes(srv)
        assert recipients(envelope) == [("bob@example.test", None)]

"""`tachymail queue bounce` as an operator uses it, beside a running server.

The report it queues says what happened (the operator bounced the message: Status 5.0.0,
a Diagnostic-Code saying so, and the last delivery attempt's reply), carries the
sender's DSN parameters (ENVID, ORCPT, RET, NOTIFY) like the scheduler's reports, and is
queued with the MAIL parameters its content needs (SMTPUTF8 for a UTF-8 sender).
"""

from __future__ import annotations

import ast
import email
import smtplib
import sys
from email import policy
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_delivery import delivery_log, relay_config, send

from server import run_cli, running_server, wait_until
from smtp_peer import Script, SmtpPeer

SRC = Path(__file__).resolve().parents[2] / "src" / "tachymail"


def _status_part(content: bytes) -> str:
    report = email.message_from_bytes(content, policy=policy.default)
    assert report.get_content_type() == "multipart/report"
    return list(report.iter_parts())[1].as_string()


def test_queue_bounce_says_the_operator_bounced_it_with_the_dsn_parameters(
    tmp_path: Path,
) -> None:
    script = Script(
        rcpt={
            "slow@dest.example": "451 4.7.1 greylisted, try again later",
            "quiet@dest.example": "451 4.7.1 greylisted, try again later",
        }
    )
    with (
        SmtpPeer(script) as peer,
        running_server(tmp_path, relay_config(peer.port), hold=False, roles=("mx",)) as srv,
    ):
        with smtplib.SMTP("127.0.0.1", srv.port) as client:
            client.ehlo("client.test")
            client.mail("alice@sender.example", ["RET=HDRS", "ENVID=batch+2B42"])
            client.rcpt("slow@dest.example", ["NOTIFY=FAILURE", "ORCPT=rfc822;Slow@dest.example"])
            client.rcpt("quiet@dest.example", ["NOTIFY=NEVER"])
            code, text = client.data(b"Subject: stuck\r\n\r\nbody\r\n")
            assert code == 250
            queue_id = text.decode().split()[-1]
        wait_until(lambda: sum(e["result"] == "deferred" for e in delivery_log(srv)) >= 2)
        run_cli("queue", "bounce", queue_id, "-c", str(srv.config_path))  # as an operator would
        [dsn] = peer.wait_for(1)
        wait_until(lambda: srv.queue_count() == 0)
        assert dsn.sender == "" and dsn.recipients == ["alice@sender.example"]
        status = _status_part(dsn.content)
        assert "Reporting-MTA: dns; mx.test.example" in status
        assert "Original-Envelope-Id: batch+42" in status
        assert "Original-Recipient: rfc822;Slow@dest.example" in status
        assert "Final-Recipient: rfc822; slow@dest.example" in status
        assert "quiet@dest.example" not in status, "NOTIFY=NEVER: not reported"
        assert "Action: failed" in status and "Status: 5.0.0" in status
        unfolded = status.replace("\n ", " ")
        assert "Diagnostic-Code: X-Tachymail; bounced by the operator" in unfolded
        assert "451 4.7.1 greylisted" in unfolded, "the last attempt's reply is told too"
        assert "Last-Attempt-Date:" in status
        report = email.message_from_bytes(dsn.content, policy=policy.default)
        parts = list(report.iter_parts())
        assert parts[2].get_content_type() == "text/rfc822-headers"  # RET=HDRS
        assert "bounced by the operator" in parts[0].get_content()
        assert len(peer.messages) == 1


def test_queue_bounce_of_a_utf8_sender_queues_the_report_with_smtputf8(tmp_path: Path) -> None:
    script = Script(rcpt={"slow@dest.example": "451 4.7.1 greylisted, try again later"})
    with (
        SmtpPeer(script) as peer,
        running_server(tmp_path, relay_config(peer.port), hold=False, roles=("mx",)) as srv,
    ):
        queue_id = send(
            srv.port,
            ["slow@dest.example"],
            sender="jörg@sender.example",
            mail_options=("SMTPUTF8",),
        )
        wait_until(lambda: any(e["result"] == "deferred" for e in delivery_log(srv)))
        run_cli("queue", "bounce", queue_id, data_dir=srv.data_dir)
        [dsn] = peer.wait_for(1)
        assert dsn.recipients == ["jörg@sender.example"]
        assert "SMTPUTF8" in dsn.mail_args, "the report's own header block is UTF-8"
        assert "Status: 5.0.0" in _status_part(dsn.content)


def test_the_queue_package_knows_nothing_of_delivery() -> None:
    """DESIGN.md: lower packages never import higher ones; `queue bounce` gets its report
    builder from the CLI, which composes queue and delivery."""
    for path in sorted((SRC / "queue").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith(("tachymail.delivery", "tachymail.smtp")), (
                    f"{path.name} imports {name}"
                )

"""RFC 3461 §5.2 relay rules, end to end: who reports a successful relay.

A next hop that advertises DSN is handed NOTIFY, ORCPT, RET and ENVID and reports
success itself, so Tachymail sends nothing; a next hop without DSN cannot, so Tachymail
sends the ``relayed`` report NOTIFY=SUCCESS asked for (RFC 3461 §5.2.2).
"""

from __future__ import annotations

import email
import sys
from email import policy
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_delivery import delivery_log, relay_config, send

from server import running_server, wait_until
from smtp_peer import Script, SmtpPeer

DSN_OPTIONS = {
    "mail_options": ("RET=HDRS", "ENVID=env+2B7"),
    "rcpt_options": ("NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob@dest.example"),
}


def test_a_next_hop_with_dsn_gets_the_parameters_and_no_relayed_report(tmp_path: Path) -> None:
    script = Script(extensions=("PIPELINING", "8BITMIME", "DSN", "ENHANCEDSTATUSCODES"))
    with (
        SmtpPeer(script) as peer,
        running_server(tmp_path, relay_config(peer.port), hold=False, roles=("mx",)) as srv,
    ):
        send(srv.port, ["bob@dest.example"], **DSN_OPTIONS)  # type: ignore[arg-type]
        peer.wait_for(1)
        # A report would be queued in the same commit as the result: once the queue is
        # empty, any report has been delivered to the peer too.
        wait_until(lambda: srv.queue_count() == 0)
        wait_until(lambda: any(e["result"] == "delivered" for e in delivery_log(srv)))
        relayed = next(m for m in peer.messages if m.sender)
        assert "RET=HDRS" in relayed.mail_args and "ENVID=env+2B7" in relayed.mail_args
        assert relayed.rcpt_args == ["NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@dest.example"]
        assert [m.sender for m in peer.messages] == ["alice@sender.example"], (
            "the next hop reports success itself: no 'relayed' report from us"
        )


def test_a_next_hop_without_dsn_gets_a_relayed_report(tmp_path: Path) -> None:
    script = Script(extensions=("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"))
    with (
        SmtpPeer(script) as peer,
        running_server(tmp_path, relay_config(peer.port), hold=False, roles=("mx",)) as srv,
    ):
        send(srv.port, ["bob@dest.example"], **DSN_OPTIONS)  # type: ignore[arg-type]
        got = peer.wait_for(2)
        wait_until(lambda: srv.queue_count() == 0)
        relayed = next(m for m in got if m.sender)
        assert "ENVID" not in relayed.mail_args and "RET" not in relayed.mail_args
        assert relayed.rcpt_args == [""], "no DSN parameters to a peer without DSN"
        [report] = [m for m in got if not m.sender]
        assert report.recipients == ["alice@sender.example"]
        parsed = email.message_from_bytes(report.content, policy=policy.default)
        status = list(parsed.iter_parts())[1].as_string()
        assert "Action: relayed" in status and "Status: 2.0.0" in status
        assert "Original-Envelope-Id: env+7" in status  # xtext decoded (RFC 3461 §6.3)
        assert "Original-Recipient: rfc822;bob@dest.example" in status
        assert len(peer.messages) == 2


def test_without_notify_success_a_next_hop_without_dsn_causes_no_report(tmp_path: Path) -> None:
    script = Script(extensions=("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"))
    with (
        SmtpPeer(script) as peer,
        running_server(tmp_path, relay_config(peer.port), hold=False, roles=("mx",)) as srv,
    ):
        send(srv.port, ["bob@dest.example"], rcpt_options=("NOTIFY=FAILURE",))
        peer.wait_for(1)
        wait_until(lambda: srv.queue_count() == 0)
        assert len(peer.messages) == 1

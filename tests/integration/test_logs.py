"""Log targets (stderr, file, syslog) and `tachymail log ID`: a message's whole story.

Issue 17, "Logs": a real server relays to a scripted peer (tests/smtp_peer.py) while it
logs to a file or to a syslog socket; `tachymail log` then reads that file, as an
operator would, by Message-ID or by queue id, from the configuration, --file or stdin.
"""

from __future__ import annotations

import json
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import Server, running_server, tachymail_cmd, wait_until
from smtp_peer import Script, SmtpPeer


def relay_config(peer_port: int, log: str) -> str:
    return (
        f'[[route]]\ndomain = "dest.example"\nhost = "127.0.0.1:{peer_port}"\ntls = "none"\n\n'
        '[delivery]\nretry_schedule = [1]\ndelay_warning = 0\nresolver = "127.0.0.1:9"\n\n'
        f"[log]\n{log}"
    )


def tachymail_log(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*tachymail_cmd(), "log", *args], capture_output=True, text=True, input=stdin, timeout=60
    )


def deliver_a_message_in_two_attempts(srv: Server, peer: SmtpPeer, script: Script) -> str:
    """now@ is delivered at once, later@ deferred once (450) and then delivered."""
    with smtplib.SMTP("127.0.0.1", srv.port) as client:
        client.ehlo("client.test")
        client.mail("a@sender.example")
        for rcpt in ("now@dest.example", "later@dest.example"):
            assert client.rcpt(rcpt)[0] == 250
        head = b"From: a@sender.example\r\nSubject: s\r\nMessage-ID: <story@example.com>\r\n"
        code, text = client.data(head + b"\r\nHi.\r\n")
        assert code == 250
    queue_id = text.decode().split()[-1]
    peer.wait_for(1)
    wait_until(lambda: '"deferred"' in (srv.data_dir / "delivery.log").read_text())
    script.rcpt.clear()  # the mailbox is back: the retry (after 1 s) is delivered
    peer.wait_for(2)
    wait_until(lambda: srv.queue_count() == 0)
    return queue_id


@pytest.mark.parametrize("fmt", ["text", "json", "logfmt"])
def test_a_messages_whole_story_from_the_log_file(tmp_path: Path, fmt: str) -> None:
    log_file = tmp_path / "logs" / "tachymail.log"
    script = Script(rcpt={"later@dest.example": "450 4.2.0 mailbox busy"})
    log = f'target = "file"\npath = "{log_file}"\nformat = "{fmt}"\n'
    with (
        SmtpPeer(script) as peer,
        running_server(tmp_path, relay_config(peer.port, log), hold=False, roles=("mx",)) as srv,
    ):
        queue_id = deliver_a_message_in_two_attempts(srv, peer, script)
        config = str(srv.config_path)
        # The path is printed at start, where the operator started the server.
        assert f"logging to {log_file}" in srv.log()
        assert "ESMTP" not in srv.log() and "session" not in srv.log()

        by_message_id = tachymail_log("<story@example.com>", "-c", config)
        assert by_message_id.returncode == 0, by_message_id.stderr
        story = by_message_id.stdout
        assert queue_id in story
        summary = story[story.index(f"queue id {queue_id}") :]
        assert "message-id <story@example.com>" in summary
        assert "from <a@sender.example>, 2 recipient(s)" in summary
        assert "<now@dest.example>: delivered after 1 attempt" in summary
        assert "<later@dest.example>: delivered after 2 attempts" in summary
        assert "outcome: delivered" in summary
        raw = story[: story.index(f"queue id {queue_id}")].strip().splitlines()
        # The intake line and the three attempts, as they are in the file.
        file_lines = log_file.read_text().splitlines()
        assert all(line in file_lines for line in raw)
        assert len(raw) >= 4
        assert sum("mailbox busy" in line for line in raw) == 1

        # By queue id, from a file named on the command line, and from stdin.
        by_queue_id = tachymail_log(queue_id, "--file", str(log_file))
        assert by_queue_id.returncode == 0, by_queue_id.stderr
        assert by_queue_id.stdout == story
        piped = tachymail_log("story@example.com", stdin=log_file.read_text())
        assert piped.returncode == 0, piped.stderr
        assert piped.stdout == story

        unknown = tachymail_log("<nobody@example.com>", "-c", config)
        assert unknown.returncode == 1
        assert "no log line" in unknown.stderr


def test_the_log_file_is_reopened_after_logrotate_moves_it(tmp_path: Path) -> None:
    log_file = tmp_path / "tachymail.log"
    with SmtpPeer() as peer:
        log = f'target = "file"\npath = "{log_file}"\nformat = "json"\n'
        with running_server(
            tmp_path, relay_config(peer.port, log), hold=False, roles=("mx",)
        ) as srv:
            with smtplib.SMTP("127.0.0.1", srv.port) as client:
                client.sendmail("a@sender.example", ["x@dest.example"], b"Subject: 1\r\n\r\n1\r\n")
            wait_until(lambda: "smtp_session" in log_file.read_text())
            log_file.rename(tmp_path / "tachymail.log.1")  # what logrotate does (no copytruncate)
            with smtplib.SMTP("127.0.0.1", srv.port) as client:
                client.sendmail("a@sender.example", ["y@dest.example"], b"Subject: 2\r\n\r\n2\r\n")
            wait_until(lambda: log_file.exists() and "smtp_session" in log_file.read_text())
        events = [json.loads(line) for line in log_file.read_text().splitlines()]
        assert any(e.get("recipients") == ["y@dest.example"] for e in events)
        assert not any(e.get("recipients") == ["x@dest.example"] for e in events)


def test_logs_go_to_the_syslog_socket(tmp_path: Path) -> None:
    """A real datagram socket stands in for /dev/log (journald listens there too)."""
    path = tmp_path / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(str(path))
        syslog.settimeout(20)
        log = f'target = "syslog"\nsyslog_socket = "{path}"\nsyslog_facility = "mail"\n'
        with running_server(tmp_path, f"[log]\n{log}", roles=("mx",)) as srv:
            with smtplib.SMTP("127.0.0.1", srv.port) as client:
                client.sendmail("a@sender.example", ["x@far.example"], b"Subject: s\r\n\r\nb\r\n")
            seen: list[str] = []
            while not any(" queued: from <a@sender.example>" in d for d in seen):
                seen.append(syslog.recv(65536).decode())
            assert f"logging to syslog ({path}, facility mail)" in srv.log()
        # <PRI> = facility mail (2) * 8 + severity info (6), then the tag and pid.
        intake = next(d for d in seen if " queued: from " in d)
        assert intake.startswith("<22>tachymail[")
        assert "INFO tachymail.smtp.session:" in intake


def test_a_log_target_that_cannot_be_opened_stops_the_start(tmp_path: Path) -> None:
    config = tmp_path / "tachymail.toml"
    config.write_text(f'[log]\ntarget = "file"\npath = "{tmp_path}/missing/dir/x.log"\n')
    (tmp_path / "missing").write_text("a file, not a directory")
    out = subprocess.run(
        [*tachymail_cmd(), "serve", "-c", str(config), "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert f"cannot open the log file {tmp_path}/missing/dir/x.log" in out.stderr

"""The process model: worker restart, graceful stop, configuration reload, CLI tools."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import run_cli, running_server, tachymail_cmd


def send_one(port: int, subject: str = "x") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("a@example.com", ["b@example.net"], f"Subject: {subject}\r\n\r\nbody\r\n")


def wait_for(predicate, timeout: float = 15.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_workers_share_the_port_and_a_killed_worker_is_replaced(tmp_path: Path) -> None:
    with running_server(tmp_path, workers=2, roles=("mx",)) as srv:
        assert wait_for(lambda: len(srv.worker_pids()) == 2)
        victim = srv.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: len(srv.worker_pids()) == 2 and victim not in srv.worker_pids())
        assert "died (signal SIGKILL)" in srv.log()
        for i in range(10):  # every connection is served, whichever worker takes it
            send_one(srv.port, f"after-restart-{i}")
        assert srv.queue_count() == 10


def test_sigterm_lets_an_open_transaction_finish_and_exits_0(tmp_path: Path) -> None:
    with running_server(tmp_path, roles=("mx",)) as srv:
        client = smtplib.SMTP("127.0.0.1", srv.port, timeout=10)
        client.ehlo()
        client.mail("a@example.com")
        client.rcpt("b@example.net")
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        code, _ = client.data(b"Subject: during shutdown\r\n\r\nbody\r\n")
        assert code == 250
        client.close()
        assert srv.proc.wait(30) == 0
        assert srv.queue_count() == 1


def test_sighup_reloads_configuration_without_dropping_connections(tmp_path: Path) -> None:
    with running_server(tmp_path, roles=("mx",)) as srv:
        old = smtplib.SMTP("127.0.0.1", srv.port, timeout=10)
        old.ehlo()
        text = srv.config_path.read_text().replace("mx.test.example", "reloaded.example")
        srv.config_path.write_text(text)
        srv.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "configuration reloaded" in srv.log())

        def greeting() -> bytes:
            with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as fresh:
                return fresh.ehlo()[1]

        assert wait_for(lambda: greeting().startswith(b"reloaded.example"))
        # The connection opened before the reload still works and can send mail.
        old.sendmail("a@example.com", ["b@example.net"], b"Subject: old\r\n\r\nbody\r\n")
        old.quit()
        assert srv.queue_count() == 1


def test_config_check_reports_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[limits]\nmax_recipients = 10\nmax_message_size = "big"\n'
        '[[listener]]\naddress = "nowhere"\nrole = "relay"\n[colour]\nx = 1\n'
    )
    out = subprocess.run(
        [*tachymail_cmd(), "config", "check", str(bad)], capture_output=True, text=True
    )
    assert out.returncode == 1
    for expected in (
        "limits.max_recipients: RFC 5321",
        "limits.max_message_size: expected an integer",
        "listener[0].role: must be one of mx, submission, smtps",
        "listener[0].address:",
        "colour: unknown section",
    ):
        assert expected in out.stderr, (expected, out.stderr)
    good = tmp_path / "good.toml"
    good.write_text(run_cli("config", "defaults"))
    assert "ok" in run_cli("config", "check", str(good))


def test_users_add_list_delete(tmp_path: Path) -> None:
    run_cli("user", "add", "alice", "--password-stdin", data_dir=tmp_path, stdin="s3cret\n")
    run_cli("user", "add", "bob", "--password-stdin", data_dir=tmp_path, stdin="pw\n")
    assert run_cli("user", "list", data_dir=tmp_path).split() == ["alice", "bob"]
    stored = (tmp_path / "users").read_text()
    assert "s3cret" not in stored and "alice:$scrypt$" in stored
    run_cli("user", "del", "bob", data_dir=tmp_path)
    assert run_cli("user", "list", data_dir=tmp_path).split() == ["alice"]


def test_queue_commands_on_a_missing_queue_fail_clearly(tmp_path: Path) -> None:
    out = subprocess.run(
        [*tachymail_cmd(), "queue", "count", "--data-dir", str(tmp_path / "none")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "no queue at" in out.stderr

"""`tachymail sendmail` the way cron, PHP's mail() and monitoring scripts use it: piped to a
running server, straight into the queue when the server is down, SMTP on stdin (-bs), and
through a symlink named sendmail / mailq (issue 17, "What an operator expects").
"""

from __future__ import annotations

import email
import os
import subprocess
import sys
from email import policy
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import running_server, start, tachymail_cmd, wait_until, write_config
from smtp_peer import SmtpPeer


def relay(peer_port: int) -> str:
    return (
        f'[[route]]\ndomain = "dest.example"\nhost = "127.0.0.1:{peer_port}"\ntls = "none"\n\n'
        '[delivery]\nretry_schedule = [1]\ndelay_warning = 0\nresolver = "127.0.0.1:9"\n'
        "[limits]\nmax_message_size = 65536\n"
    )


def sendmail(
    config: Path, *args: str, stdin: bytes, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*tachymail_cmd(), "sendmail", "-c", str(config), *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        env=None if env is None else {**os.environ, **env},
    )


CRON_MAIL = (
    b"To: Ops <ops@dest.example>\n"
    b"Cc: dev@dest.example\n"
    b"Bcc: audit@dest.example,\n"
    b"  archive@dest.example\n"
    b"Subject: cron <root@host> /usr/local/bin/backup\n"
    b"\n"
    b"backup done\n"
    b".\n"
    b"this line is after the lone dot\n"
)


def test_cron_style_pipe_to_a_running_server(tmp_path: Path) -> None:
    """echo ... | tachymail sendmail -t: To, Cc and Bcc get it, Bcc is gone, a lone dot ends
    the input (no -i), From/Date/Message-ID are added."""
    with SmtpPeer() as peer, running_server(tmp_path, relay(peer.port), hold=False) as srv:
        out = sendmail(srv.config_path, "-t", stdin=CRON_MAIL)
        assert out.returncode == 0, out.stderr
        [got] = peer.wait_for(1)
        assert sorted(got.recipients) == [
            "archive@dest.example",
            "audit@dest.example",
            "dev@dest.example",
            "ops@dest.example",
        ]
        message = email.message_from_bytes(got.content, policy=policy.default)
        assert message["Bcc"] is None and b"audit@" not in got.content.split(b"\r\n\r\n")[1]
        assert message["Subject"] == "cron <root@host> /usr/local/bin/backup"
        assert message["Date"] and message["Message-ID"]
        assert message["From"].addresses[0].domain == "mx.test.example"
        assert got.sender == message["From"].addresses[0].addr_spec
        body = got.content.split(b"\r\n\r\n", 1)[1]
        assert body == b"backup done\r\n"  # the lone dot ended the message
        assert "(Tachymail)" in message["Received"]  # it went through the SMTP listener
        # A writer that ends with the lone dot and waits, its pipe still open, is not left
        # hanging: reading stops at the dot.
        proc = subprocess.Popen(
            [*tachymail_cmd(), "sendmail", "-c", str(srv.config_path), "ops@dest.example"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proc.stdin is not None
            proc.stdin.write(b"Subject: dot\n\nstill open\n.\n")
            proc.stdin.flush()
            assert proc.wait(timeout=30) == 0
        finally:
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        peer.wait_for(2)


def test_recipients_as_arguments_with_f_F_and_i(tmp_path: Path) -> None:
    with SmtpPeer() as peer, running_server(tmp_path, relay(peer.port), hold=False) as srv:
        out = sendmail(
            srv.config_path,
            "-oi",
            "-f",
            "nagios@monitor.example",
            "-FNagios Monitor",
            "a@dest.example, b@dest.example",
            "c@dest.example",
            stdin=b"Subject: PROBLEM\n\nline one\n.\n..two dots\nlast",
        )
        assert out.returncode == 0, out.stderr
        [got] = peer.wait_for(1)
        assert got.sender == "nagios@monitor.example"
        assert sorted(got.recipients) == ["a@dest.example", "b@dest.example", "c@dest.example"]
        message = email.message_from_bytes(got.content, policy=policy.default)
        assert str(message["From"]) == "Nagios Monitor <nagios@monitor.example>"
        body = got.content.split(b"\r\n\r\n", 1)[1]
        assert body == b"line one\r\n.\r\n..two dots\r\nlast\r\n"  # -oi: the dot is text


def test_server_down_then_started(tmp_path: Path) -> None:
    """With the server down the message goes straight into the queue, and is delivered once
    the server starts."""
    with SmtpPeer() as peer:
        with running_server(tmp_path, relay(peer.port), hold=False) as srv:
            pass  # made the data directory and the queue; now it is down
        out = sendmail(
            srv.config_path, "-i", "down@dest.example", stdin=b"Subject: while down\n\nhi\n"
        )
        assert out.returncode == 0, out.stderr
        assert b"queued as" in out.stderr
        listed = subprocess.run(
            [*tachymail_cmd(), "queue", "list", "-c", str(srv.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "down@dest.example" in listed.stdout and " active " in listed.stdout
        assert peer.messages == []
        again = start(srv.config_path, srv.data_dir, srv.ports, 1, tmp_path / "again.log")
        try:
            [got] = peer.wait_for(1)
            assert got.recipients == ["down@dest.example"]
            message = email.message_from_bytes(got.content, policy=policy.default)
            assert message["Subject"] == "while down"
            assert "Tachymail sendmail" in str(message["Received"])
            wait_until(lambda: again.queue_count() == 0)
        finally:
            again.stop()


def test_server_down_and_no_data_directory_is_a_temporary_failure(tmp_path: Path) -> None:
    config = tmp_path / "tachymail.toml"
    write_config(config, tmp_path / "missing", {"mx": 9})  # port 9: nothing listens
    out = sendmail(config, "x@dest.example", stdin=b"Subject: x\n\nx\n")
    assert out.returncode == 75  # EX_TEMPFAIL: cron keeps the mail and says so
    assert b"not running" in out.stderr and b"Traceback" not in out.stderr
    assert not (tmp_path / "missing").exists()


def test_exit_codes(tmp_path: Path) -> None:
    with SmtpPeer() as peer, running_server(tmp_path, relay(peer.port), hold=False) as srv:
        none = sendmail(srv.config_path, stdin=b"Subject: x\n\nx\n")
        assert none.returncode == 64 and b"no recipients" in none.stderr  # EX_USAGE
        mode = sendmail(srv.config_path, "-bd", stdin=b"")
        assert mode.returncode == 64
        big = sendmail(srv.config_path, "x@dest.example", stdin=b"Subject: x\n\n" + b"y" * 70000)
        assert big.returncode == 65 and b"552" in big.stderr  # EX_DATAERR
        # one recipient refused (5xx, a malformed address): the other still gets it
        some = sendmail(srv.config_path, "bad@", "ok@dest.example", stdin=b"Subject: y\n\ny\n")
        assert some.returncode == 67 and b"<bad@>: 5" in some.stderr  # EX_NOUSER
        [got] = peer.wait_for(1)
        assert got.recipients == ["ok@dest.example"]
        ignored = sendmail(
            srv.config_path,
            "-odb",
            "-oem",
            "-U",
            "z@dest.example",
            stdin="Subject: z\n\n8-bit: café\n".encode(),
        )
        assert ignored.returncode == 0, ignored.stderr
        got = peer.wait_for(2)[1]
        assert got.content.endswith("\r\n\r\n8-bit: café\r\n".encode())  # 8BITMIME, intact


def test_bs_speaks_smtp_on_stdin_and_stdout(tmp_path: Path) -> None:
    dialogue = (
        b"EHLO php.local\r\n"
        b"MAIL FROM:<www@sender.example>\r\n"
        b"RCPT TO:<php@dest.example>\r\n"
        b"DATA\r\n"
        b"Subject: from PHP\r\n\r\nhello\r\n.\r\n"
        b"QUIT\r\n"
    )
    with SmtpPeer() as peer, running_server(tmp_path, relay(peer.port), hold=False) as srv:
        out = sendmail(srv.config_path, "-bs", stdin=dialogue)
        assert out.returncode == 0, out.stderr
        replies = out.stdout.decode()
        assert replies.startswith("220 ") and "250 2.0.0 Ok: queued as" in replies
        assert "221 " in replies
        [got] = peer.wait_for(1)
        assert got.recipients == ["php@dest.example"] and got.sender == "www@sender.example"
    down = sendmail(srv.config_path, "-bs", stdin=b"QUIT\r\n")
    assert down.returncode == 75 and down.stdout.startswith(b"421 ")


def test_symlinks_named_sendmail_and_mailq(tmp_path: Path) -> None:
    """ln -s tachymail /usr/sbin/sendmail: the name picks the mode; the configuration comes
    from $TACHYMAIL_CONFIG when no -c is given."""
    script = Path(sys.executable).with_name("tachymail")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "sendmail").symlink_to(script)
    (tmp_path / "bin" / "mailq").symlink_to(script)
    with SmtpPeer() as peer, running_server(tmp_path, relay(peer.port)) as srv:  # held
        env = {**os.environ, "TACHYMAIL_CONFIG": str(srv.config_path)}
        out = subprocess.run(
            [str(tmp_path / "bin" / "sendmail"), "-t", "-i"],
            input=b"To: held@dest.example\nSubject: via symlink\n\nx\n",
            capture_output=True,
            timeout=60,
            env=env,
        )
        assert out.returncode == 0, out.stderr
        wait_until(lambda: srv.queue_count() == 1)
        listed = subprocess.run(
            [str(tmp_path / "bin" / "mailq")], capture_output=True, text=True, timeout=60, env=env
        )
        assert listed.returncode == 0, listed.stderr
        assert "held@dest.example" in listed.stdout
        assert listed.stdout.rstrip().endswith("in 1 Request.")
        bp = sendmail(srv.config_path, "-bp", stdin=b"")
        assert b"held@dest.example" in bp.stdout


def test_help_names_the_options(tmp_path: Path) -> None:
    out = subprocess.run(
        [*tachymail_cmd(), "sendmail", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    for option in ("-t", "-f SENDER", "-F NAME", "-i", "-bs", "-bp", "/usr/sbin/sendmail"):
        assert option in out.stdout, option
    top = subprocess.run([*tachymail_cmd(), "--help"], capture_output=True, text=True)
    assert "sendmail" in top.stdout and "mailq" in top.stdout

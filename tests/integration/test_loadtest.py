"""`tachymail bench` and `tachymail sink` against each other, smtp-sink and a real server.

Every process is real and talks over loopback: the sink and the server are
started here and stopped by PID; the summary the generator prints is checked
against the counters of whoever received the mail.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recording_sink import wait_listening
from server import free_port, run_cli, running_server, tachymail_cmd
from tachymail.loadtest.options import (
    check_address_template,
    parse_reply_mix,
    parse_size,
    parse_size_mix,
)

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
SUMMARY_KEYS = {
    "sent",
    "accepted",
    "deferred",
    "rejected",
    "errors",
    "replies",
    "rcpt_replies",
    "connections",
    "connection_errors",
    "connection_error_reasons",
    "elapsed_s",
    "msgs_per_s",
    "accepted_per_s",
    "octets",
    "latency_s",
}


@dataclass
class Sink:
    proc: subprocess.Popen[str]
    port: int
    counters: dict[str, int] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> dict[str, int]:
        """SIGTERM (by PID), then the counters it prints as JSON on exit."""
        if self.counters is None:
            self.proc.send_signal(signal.SIGTERM)
            out, err = self.proc.communicate(timeout=30)
            assert self.proc.returncode == 0, err
            self.counters = json.loads(out.strip().splitlines()[-1])
        return self.counters


@contextmanager
def sink(*args: str, procs: int = 1) -> Iterator[Sink]:
    port = free_port()
    proc = subprocess.Popen(
        [*tachymail_cmd(), "sink", f"127.0.0.1:{port}", "--procs", str(procs), "--json", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    running = Sink(proc, port)
    try:
        wait_listening(port)
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def bench(target: str, *args: str, expect_rc: int = 0) -> dict[str, Any]:
    """Run `tachymail bench TARGET ARGS --json`; its summary."""
    out = subprocess.run(
        [*tachymail_cmd(), "bench", target, "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == expect_rc, f"rc {out.returncode}: {out.stderr}"
    summary: dict[str, Any] = json.loads(out.stdout)
    return summary


# --- option syntax ---------------------------------------------------------------------------


def test_option_syntax_and_its_errors() -> None:
    assert parse_size("1k") == 1024 and parse_size("2M") == 2 * 1024 * 1024
    assert parse_size_mix("1k:70,10k:25,100k:5") == [(1024, 70.0), (10240, 25.0), (102400, 5.0)]
    assert parse_size_mix("64k") == [(65536, 1.0)]
    assert parse_reply_mix(["451:5%", "550:1"]) == [(451, 5.0), (550, 1.0)]
    assert check_address_template("user{n}-{r}@example.net") == "user{n}-{r}@example.net"
    for bad, why in [
        ("1k,2k", "weight"),
        ("1k:0", "positive"),
        ("ten", "not a size"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_size_mix(bad)
    with pytest.raises(ValueError, match="4xx or 5xx"):
        parse_reply_mix(["250:5%"])
    with pytest.raises(ValueError, match="more than 100"):
        parse_reply_mix(["451:60", "550:50"])
    with pytest.raises(ValueError, match="unknown placeholder"):
        check_address_template("user{id}@example.net")
    # The command line reports the same mistakes as usage errors (exit 2).
    out = subprocess.run(
        [*tachymail_cmd(), "bench", "127.0.0.1:1", "--size", "1k,2k"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "weight" in out.stderr


# --- bench against the sink ------------------------------------------------------------------


def test_bench_and_sink_counts_agree_across_processes() -> None:
    with sink(procs=2) as s:
        summary = bench(
            s.target,
            *("--messages", "3000", "--concurrency", "8", "--procs", "2"),
            *("--size", "1k:60,4k:40", "--rcpts", "2"),
        )
        counters = s.stop()
    assert set(summary) == SUMMARY_KEYS
    assert summary["sent"] == summary["accepted"] == 3000
    assert summary["replies"] == {"250": 3000}
    assert summary["errors"] == summary["connection_errors"] == 0
    assert summary["connections"] == 8
    assert summary["latency_s"]["count"] == 3000
    lat = summary["latency_s"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert summary["msgs_per_s"] > 0
    # What the sink received is what the generator says it sent, octet for octet.
    assert counters["messages"] == 3000
    assert counters["recipients"] == 6000
    assert counters["connections"] == 8
    assert counters["bytes"] == summary["octets"]
    # Both sizes of the mix were sent (1024 and 4096 octets as stored).
    assert 3000 * 1024 < summary["octets"] < 3000 * 4096


def test_reply_mix_shows_up_as_codes_in_the_summary() -> None:
    with sink("--rcpt-reply", "451:10%", "--data-reply", "550:5%", "--seed", "7") as s:
        summary = bench(s.target, "--messages", "2000", "--concurrency", "4")
        counters = s.stop()
    replies = summary["replies"]
    assert set(replies) == {"250", "451", "550"}
    # 10 % of 2000 RCPTs refused (sigma ~13), then 5 % of the rest at the end of data (~9).
    assert 140 <= replies["451"] <= 260, replies
    assert 45 <= replies["550"] <= 140, replies
    assert summary["deferred"] == replies["451"] and summary["rejected"] == replies["550"]
    assert summary["accepted"] == replies["250"] == 2000 - replies["451"] - replies["550"]
    # Exactly the sink's own tally of what it refused.
    assert counters["recipients_rejected"] == replies["451"]
    assert counters["messages_rejected"] == replies["550"]
    assert counters["messages"] == replies["250"]


def test_one_connection_per_message_with_per_conn_1() -> None:
    with sink() as s:
        summary = bench(s.target, "--messages", "40", "--per-conn", "1", "--concurrency", "4")
        again = bench(s.target, "--messages", "40", "--per-conn", "10", "--concurrency", "2")
        counters = s.stop()
    assert summary["accepted"] == 40 and summary["connections"] == 40
    # Messages go to whichever session is free, so one connection may end short of 10.
    assert again["accepted"] == 40 and 4 <= again["connections"] <= 5
    assert counters["connections"] == 40 + again["connections"]


def test_sink_store_writes_a_real_queue_with_unique_message_ids(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with sink("--store", str(store)) as s:
        summary = bench(
            s.target, "--messages", "120", "--concurrency", "6", "--from", "s{n}@ex.com"
        )
        counters = s.stop()
    assert summary["accepted"] == counters["messages"] == 120
    assert run_cli("queue", "count", data_dir=store).strip() == "120"
    entries = [
        json.loads(x) for x in run_cli("queue", "list", "--json", data_dir=store).splitlines()
    ]
    assert sorted(e["sender"] for e in entries) == sorted(f"s{n}@ex.com" for n in range(120))
    ids = set()
    for entry in entries[:10]:
        shown = run_cli("queue", "show", entry["id"], data_dir=store)
        ids.add(re.search(r"Message-ID: (<[^>]+>)", shown).group(1))  # type: ignore[union-attr]
    assert len(ids) == 10


def test_sink_metrics_endpoint_serves_the_counters() -> None:
    metrics = free_port()
    with sink("--metrics", f"127.0.0.1:{metrics}", procs=2) as s:
        summary = bench(s.target, "--messages", "300", "--concurrency", "4", "--rcpts", "3")
        time.sleep(0.5)  # the processes publish their counters every 0.2 s
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read()
        s.stop()
    values = dict(re.findall(r"^(tachymail_sink_\w+) (\S+)$", text.decode(), re.M))
    assert float(values["tachymail_sink_messages_total"]) == summary["accepted"] == 300
    assert float(values["tachymail_sink_recipients_total"]) == 900
    assert float(values["tachymail_sink_connections_total"]) == 4
    assert float(values["tachymail_sink_bytes_total"]) == summary["octets"]
    assert "tachymail_sink_messages_rejected_total" in values


def test_latency_options_add_latency() -> None:
    with sink("--latency", "80", "--command-latency", "20") as s:
        summary = bench(s.target, "--messages", "6", "--concurrency", "1")
        unpiped = bench(s.target, "--messages", "3", "--concurrency", "1", "--no-pipelining")
    # MAIL, RCPT and DATA each wait 20 ms, the end of data 80 ms (lower bounds only).
    assert summary["accepted"] == 6
    assert summary["latency_s"]["p50"] >= 0.14
    assert unpiped["accepted"] == 3 and unpiped["latency_s"]["p50"] >= 0.14


def test_connection_limit_answers_421_and_the_bench_reports_it() -> None:
    with sink("--max-connections", "2") as s:
        summary = bench(s.target, "--messages", "60", "--concurrency", "4")
        counters = s.stop()
    assert summary["accepted"] == 60
    assert summary["connection_error_reasons"].get("greeting 421", 0) >= 1
    assert counters["connections_refused"] == summary["connection_error_reasons"]["greeting 421"]


def test_eml_dir_is_replayed_round_robin_with_new_message_ids(tmp_path: Path) -> None:
    mails = tmp_path / "mails"
    mails.mkdir()
    for i in range(3):
        (mails / f"{i}.eml").write_bytes(
            f"From: a@example.com\nMessage-ID: <orig{i}@example.com>\nSubject: replay {i}\n"
            f"\n.line with a dot\nbody {i} caf\u00e9\n".encode()
        )
    store = tmp_path / "store"
    with sink("--store", str(store)) as s:
        summary = bench(s.target, "--eml-dir", str(mails), "--messages", "9", "--concurrency", "1")
        s.stop()
    assert summary["accepted"] == 9
    subjects: dict[str, int] = {}
    for line in run_cli("queue", "list", "--json", data_dir=store).split("\n"):
        if not line:
            continue
        entry = json.loads(line)
        body = run_cli("queue", "show", entry["id"], "--body", data_dir=store)
        assert "orig" not in body and "Message-ID: <" in body
        assert "\n.line with a dot" in body  # unstuffed again by the server
        assert entry["mail_params"].get("BODY") == "8BITMIME"  # the body has 8-bit octets
        subject = re.search(r"Subject: (replay \d)", body).group(1)  # type: ignore[union-attr]
        subjects[subject] = subjects.get(subject, 0) + 1
    assert subjects == {"replay 0": 3, "replay 1": 3, "replay 2": 3}


def test_sink_speaks_esmtp_and_chunking() -> None:
    with sink("--max-size", "100k") as s:
        with smtplib.SMTP("127.0.0.1", s.port, timeout=10) as client:
            client.ehlo("test.example")
            for ext in ("pipelining", "8bitmime", "smtputf8", "chunking", "size"):
                assert client.has_extn(ext), ext
            assert client.esmtp_features["size"] == str(100 * 1024)
            with pytest.raises(smtplib.SMTPSenderRefused):  # SIZE= over the limit, at MAIL
                client.sendmail("a@example.com", ["b@example.net"], b"x" * 200_000)
            client.rset()
            assert client.mail("a@example.com")[0] == 250  # no SIZE=: refused at the end
            assert client.rcpt("b@example.net")[0] == 250
            too_big = client.data(b"x" * 200_000 + b"\r\n")
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as raw:
            raw.recv(1000)
            raw.sendall(
                b"EHLO t\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
                b"BDAT 6\r\nHello\nBDAT 5 LAST\r\nWorldQUIT\r\n"
            )
            replies = b""
            while not replies.endswith(b"221 2.0.0 Bye\r\n"):
                chunk = raw.recv(4096)
                assert chunk, replies
                replies += chunk
        counters = s.stop()
    assert too_big[0] == 552
    assert b"250 2.0.0 6 octets received" in replies and b"250 2.0.0 Ok" in replies
    assert counters["messages"] == 1 and counters["bytes"] == 11
    assert counters["messages_rejected"] == 1


# --- bench against other servers -------------------------------------------------------------


def test_bench_against_smtp_sink() -> None:
    if not Path(SMTP_SINK).exists():
        pytest.skip("Postfix's smtp-sink is not installed (./dev test installs postfix as root)")
    port = free_port()
    user = ["-u", "postfix"] if os.geteuid() == 0 else []
    proc = subprocess.Popen(
        [SMTP_SINK, *user, "-c", f"127.0.0.1:{port}", "100"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_listening(port)
        summary = bench(f"127.0.0.1:{port}", "--messages", "2000", "--concurrency", "16")
        unpiped = bench(f"127.0.0.1:{port}", "--messages", "200", "--no-pipelining", "--rcpts", "3")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert summary["accepted"] == summary["sent"] == 2000 and summary["connections"] == 16
    assert unpiped["accepted"] == 200


def test_bench_against_tachymail_serve_plain_and_with_starttls_auth(tmp_path: Path) -> None:
    # bench sends as bench@example.com: alice must own it (the sender-login policy).
    extra = '[auth]\nsenders = { alice = ["@example.com"] }\n'
    with running_server(tmp_path, extra, workers=1, roles=("mx", "submission")) as srv:
        plain = bench(
            f"127.0.0.1:{srv.port}", "--messages", "600", "--concurrency", "10", "--rcpts", "2"
        )
        unpiped = bench(f"127.0.0.1:{srv.port}", "--messages", "30", "--no-pipelining")
        assert srv.queue_count() == plain["accepted"] + unpiped["accepted"] == 630
        run_cli("user", "add", "alice", "--password-stdin", data_dir=srv.data_dir, stdin="pw1\n")
        submission = f"127.0.0.1:{srv.ports['submission']}"
        authed = bench(submission, "--messages", "20", "--starttls", "--auth", "alice:pw1")
        wrong = bench(
            submission, "--messages", "5", "--starttls", "--auth", "alice:nope", expect_rc=1
        )
        no_tls = bench(submission, "--messages", "5", "--auth", "alice:pw1", expect_rc=1)
        entries = [
            json.loads(x)
            for x in run_cli("queue", "list", "--json", data_dir=srv.data_dir).splitlines()
        ]
    assert plain["replies"] == {"250": 600} and unpiped["replies"] == {"250": 30}
    assert authed["accepted"] == 20
    submitted = [e for e in entries if e["auth"] == "alice"]
    assert len(submitted) == 20 and all(e["tls"] for e in submitted)
    assert len(entries) == 650
    assert wrong["sent"] == 0 and "AUTH 535" in wrong["connection_error_reasons"]
    assert "AUTH 538" in no_tls["connection_error_reasons"]


def test_unreachable_server_exits_non_zero() -> None:
    summary = bench(f"127.0.0.1:{free_port()}", "--messages", "5", expect_rc=1)
    assert summary["sent"] == 0 and summary["connections"] == 0
    assert summary["connection_errors"] >= 1


def test_live_progress_on_a_terminal_only() -> None:
    with sink() as s:
        master, slave = pty.openpty()
        proc = subprocess.Popen(
            [*tachymail_cmd(), "bench", s.target, "--duration", "1.2", "--rate", "300"],
            stdout=slave,
            stderr=subprocess.PIPE,
        )
        os.close(slave)
        seen = b""
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            assert ready, seen
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        proc.wait(30)
        os.close(master)
        quiet = subprocess.run(
            [*tachymail_cmd(), "bench", s.target, "--duration", "0.6"],
            capture_output=True,
            text=True,
        )
    assert proc.returncode == 0
    text = seen.decode(errors="replace")
    assert text.count("msgs/s") >= 3, text  # refreshed a few times a second, then the summary
    assert "\r" in text and "[250:" in text
    assert "sent " in text and "accepted" in text
    # --rate 300 for 1.2 s: roughly 360 messages, never far more.
    sent = int(re.search(r"sent\s+([\d,]+) messages", text).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert 200 <= sent <= 420, sent
    assert "\r" not in quiet.stdout and quiet.stdout.startswith("sent")

"""The queue as an operator sees it: `queue list` states and filters, --json, `queue summary`,
`mailq`, `queue hold` twice, and `user add` with a piped password (issue 17).

The queue is written with the queue's own API (QueueStore + put_message, as the server does)
and read by the real `tachymail` command in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tachymail.queue.envelope import HELD, Envelope, Recipient, new_queue_id
from tachymail.queue.store import QueueStore, put_message

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import run_cli, tachymail_cmd

# The fixture sets it when it writes the queue, not at import: a long suite runs this module
# minutes after collecting it, and the ages would move to other qshape columns.
NOW = time.time()


def _message(
    sender: str,
    recipients: list[Recipient],
    *,
    age: float = 0.0,
    state: str = "active",
    size: int = 2048,
) -> Envelope:
    return Envelope(
        id=new_queue_id(),
        sender=sender,
        recipients=recipients,
        arrival=NOW - age,
        size=size,
        state=state,
    )


def _deferred(address: str, reason: str, in_seconds: float = 3600.0) -> Recipient:
    return Recipient(
        address,
        attempts=2,
        next_attempt=NOW + in_seconds,
        last_attempt=NOW - 60,
        last_reply=reason,
        status=reason.split()[1] if " " in reason else "",
    )


@pytest.fixture
def queue(tmp_path: Path) -> dict[str, Envelope]:
    """A queue of four messages: due now, deferred (two domains), held, old and deferred."""
    global NOW
    NOW = time.time()
    messages = {
        "due": _message("alice@example.org", [Recipient("bob@due.example")], age=30),
        "deferred": _message(
            "carol@example.org",
            [
                _deferred("dan@slow.example", "451 4.7.1 greylisted, try again later"),
                _deferred("erin@other.example", "421 4.4.2 connection timed out"),
            ],
            age=450,
        ),
        "held": _message("frank@example.net", [Recipient("gina@due.example")], age=60, state=HELD),
        "old": _message(
            "",
            [_deferred("henry@slow.example", "450 4.2.0 mailbox busy")],
            age=2 * 86400,
            size=100_000,
        ),
    }
    store = QueueStore(tmp_path / "data" / "queue")
    try:
        store.apply([put_message(e, b"Subject: x\r\n\r\nbody\r\n") for e in messages.values()])
    finally:
        store.close()
    return messages


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*tachymail_cmd(), *args, "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _listed(tmp_path: Path, *args: str) -> list[dict[str, object]]:
    out = run_cli("queue", "list", "--json", *args, data_dir=tmp_path / "data")
    return [json.loads(line) for line in out.splitlines()]


def test_queue_list_shows_the_real_state_next_attempt_and_reason(
    tmp_path: Path, queue: dict[str, Envelope]
) -> None:
    lines = run_cli("queue", "list", data_dir=tmp_path / "data").splitlines()
    by_id = {line.split()[0]: line for line in lines if line[:1].isalnum()}
    assert " deferred " in by_id[queue["deferred"].id]
    assert " active " in by_id[queue["due"].id]
    assert " held " in by_id[queue["held"].id]
    assert "451 4.7.1 greylisted" in "\n".join(lines)
    # the next attempt, as a time of day, is on the deferred message's line
    nxt = time.strftime("%H:%M", time.localtime(queue["deferred"].recipients[0].next_attempt))
    assert nxt in by_id[queue["deferred"].id]
    # the same states as the metrics: one function decides (queue.stats.message_state)
    states = {e["id"]: e["state"] for e in _listed(tmp_path)}
    assert states == {
        queue["due"].id: "active",
        queue["deferred"].id: "deferred",
        queue["held"].id: "held",
        queue["old"].id: "deferred",
    }


def test_queue_list_filters(tmp_path: Path, queue: dict[str, Envelope]) -> None:
    def ids(*args: str) -> set[object]:
        return {e["id"] for e in _listed(tmp_path, *args)}

    assert ids("--state", "deferred") == {queue["deferred"].id, queue["old"].id}
    assert ids("--state", "held") == {queue["held"].id}
    assert ids("--domain", "slow.example") == {queue["deferred"].id, queue["old"].id}
    assert ids("--domain", "SLOW.example", "--state", "active") == set()
    assert ids("--sender", "carol@example.org") == {queue["deferred"].id}
    assert ids("--sender", "example.net") == {queue["held"].id}
    assert ids("--sender", "<>") == {queue["old"].id}
    assert ids("--older-than", "1h") == {queue["old"].id}
    assert ids("--age", "5m") == {queue["deferred"].id, queue["old"].id}
    assert ids("--reason", "greylisted") == {queue["deferred"].id}
    assert ids("--reason", r"^45\d 4\.2") == {queue["old"].id}
    bad = _cli(tmp_path, "queue", "list", "--reason", "(")
    assert bad.returncode == 2 and "--reason" in bad.stderr and "Traceback" not in bad.stderr
    bad = _cli(tmp_path, "queue", "list", "--older-than", "soon")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_queue_list_on_an_empty_queue_says_so(tmp_path: Path) -> None:
    QueueStore(tmp_path / "data" / "queue").close()
    assert run_cli("queue", "list", data_dir=tmp_path / "data").strip() == "the queue is empty"
    assert run_cli("queue", "list", "--json", data_dir=tmp_path / "data") == ""


def test_queue_list_with_filters_matching_nothing_says_so(
    tmp_path: Path, queue: dict[str, Envelope]
) -> None:
    out = run_cli("queue", "list", "--domain", "nowhere.example", data_dir=tmp_path / "data")
    assert "no message matches" in out and "4 in the queue" in out


def test_queue_show_json(tmp_path: Path, queue: dict[str, Envelope]) -> None:
    out = run_cli("queue", "show", "--json", queue["deferred"].id, data_dir=tmp_path / "data")
    shown = json.loads(out)
    assert shown["id"] == queue["deferred"].id and shown["state"] == "deferred"
    assert shown["headers"].startswith("Subject: x")
    out = run_cli("queue", "show", "--json", "--body", queue["due"].id, data_dir=tmp_path / "data")
    assert json.loads(out)["content"].endswith("body\r\n")


def test_queue_count_json(tmp_path: Path, queue: dict[str, Envelope]) -> None:
    counted = json.loads(run_cli("queue", "count", "--json", data_dir=tmp_path / "data"))
    assert counted == {"total": 4, "active": 1, "deferred": 2, "held": 1}


def test_queue_admin_json(tmp_path: Path, queue: dict[str, Envelope]) -> None:
    out = run_cli("queue", "flush", "--json", data_dir=tmp_path / "data")
    assert json.loads(out) == {"action": "flush", "changed": 2}


def test_queue_hold_twice_says_already_held(tmp_path: Path, queue: dict[str, Envelope]) -> None:
    held = _cli(tmp_path, "queue", "hold", queue["held"].id)
    assert held.returncode == 0, held.stderr
    assert f"{queue['held'].id} is already held" in held.stdout
    released = _cli(tmp_path, "queue", "release", queue["due"].id)
    assert released.returncode == 0 and "is not held" in released.stdout
    missing = _cli(tmp_path, "queue", "hold", "0123456789abcdef0123")
    assert missing.returncode == 2 and "no message 0123456789abcdef0123" in missing.stderr


def test_queue_summary_by_domain_age_and_state(tmp_path: Path, queue: dict[str, Envelope]) -> None:
    out = run_cli("queue", "summary", data_dir=tmp_path / "data")
    header, *rows = out.splitlines()
    columns = header.split()
    assert columns[:4] == ["domain", "T", "5", "10"] and "1280+" in columns
    table = {row.split()[0]: row.split()[1:] for row in rows if row.split()}
    by_age = dict(zip(columns[1:], table["slow.example"], strict=False))
    assert by_age["T"] == "2" and by_age["10"] == "1" and by_age["1280+"] == "1"
    assert table["TOTAL"][0] == "5"  # recipients, as qshape counts them
    summary = json.loads(run_cli("queue", "summary", "--json", data_dir=tmp_path / "data"))
    slow = summary["domains"]["slow.example"]
    assert slow["total"] == 2 and slow["states"] == {"deferred": 2}
    assert summary["domains"]["due.example"]["states"] == {"active": 1, "held": 1}
    assert summary["states"] == {"active": 1, "deferred": 2, "held": 1}
    assert summary["oldest_age"] >= 2 * 86400 - 5


def test_mailq_prints_the_queue_like_postqueue(tmp_path: Path, queue: dict[str, Envelope]) -> None:
    out = run_cli("mailq", data_dir=tmp_path / "data")
    lines = out.splitlines()
    assert lines[0].startswith("-Queue ID-") and "Arrival Time" in lines[0]
    text = "\n".join(lines)
    # the deferred message: its id, size, sender, and per recipient the reason in parentheses
    assert queue["deferred"].id in text and "carol@example.org" in text
    assert "(451 4.7.1 greylisted, try again later)" in text
    assert "(421 4.4.2 connection timed out)" in text
    assert f"{queue['held'].id}!" in text  # held, marked as postqueue marks it
    assert "MAILER-DAEMON" in text  # the null sender
    assert lines[-1] == "-- 104 Kbytes in 4 Requests."


def test_mailq_on_an_empty_queue(tmp_path: Path) -> None:
    QueueStore(tmp_path / "data" / "queue").close()
    assert run_cli("mailq", data_dir=tmp_path / "data").strip() == "Mail queue is empty"


def test_user_add_reads_a_piped_password(tmp_path: Path) -> None:
    """`echo pw | tachymail user add alice` ended in an EOFError traceback."""
    out = subprocess.run(
        [*tachymail_cmd(), "user", "add", "alice", "--data-dir", str(tmp_path)],
        input="s3cret\n",
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,  # no controlling terminal, as under cron or a pipe in CI
    )
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert "alice:$scrypt$" in (tmp_path / "users").read_text()
    empty = subprocess.run(
        [*tachymail_cmd(), "user", "add", "bob", "--data-dir", str(tmp_path)],
        input="",
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )
    assert empty.returncode == 2 and "empty password" in empty.stderr
    assert "Traceback" not in empty.stderr
    helped = run_cli("user", "add", "--help")
    assert "standard input" in helped and "not a terminal" in helped


def test_a_deferred_message_is_deferred_in_the_list_and_in_the_metrics(tmp_path: Path) -> None:
    """Issue 17 defect 5: `queue list` said `active` for a deferred message while the
    metrics said `deferred`. On a live server, both now say deferred, with the next attempt
    and the reason on the line."""
    import smtplib
    import urllib.request

    from server import free_port, running_server, wait_until
    from smtp_peer import Script, SmtpPeer

    metrics = free_port()
    with SmtpPeer(Script(rcpt={"busy@dest.example": "451 4.7.1 greylisted"})) as peer:
        extra = (
            f'[[route]]\ndomain = "dest.example"\nhost = "127.0.0.1:{peer.port}"\n'
            'tls = "none"\n\n[delivery]\nretry_schedule = [3600]\ndelay_warning = 0\n'
            f'resolver = "127.0.0.1:9"\n\n[metrics]\naddress = "127.0.0.1:{metrics}"\n'
        )
        with running_server(tmp_path, extra, hold=False) as srv:
            with smtplib.SMTP("127.0.0.1", srv.port) as client:
                client.sendmail(
                    "a@sender.example", ["busy@dest.example"], b"Subject: x\r\n\r\nx\r\n"
                )

            def listed() -> list[dict[str, object]]:
                out = run_cli("queue", "list", "--json", data_dir=srv.data_dir)
                return [json.loads(line) for line in out.splitlines()]

            def tried() -> bool:
                return any(r["last_reply"] for e in listed() for r in e["recipients"])  # type: ignore[attr-defined]

            wait_until(tried)
            [entry] = listed()
            assert entry["state"] == "deferred"
            assert "451 4.7.1 greylisted" in str(entry["last_reason"])
            assert isinstance(entry["next_attempt"], float) and entry["next_attempt"] > NOW
            line = run_cli("queue", "list", data_dir=srv.data_dir)
            assert " deferred " in line and "(451 4.7.1 greylisted)" in line
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
                text = r.read().decode()
            assert 'tachymail_queue_messages{state="deferred"} 1.0' in text
            assert 'tachymail_queue_messages{state="active"} 0.0' in text

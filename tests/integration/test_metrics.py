"""Metrics, health endpoints and structured logs of a real `tachymail serve`.

Mail flows through a running server (two SMTP workers, one delivery worker) to a
scripted peer on loopback; the tests then read the supervisor's one /metrics endpoint,
which adds up every worker's multiprocess files, and the JSON log lines.
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import Server, free_port, running_server
from smtp_peer import SmtpPeer

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "grafana" / "dashboards" / "tachymail.json"
SENT = 4  # plain messages; one more goes over STARTTLS

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def config(peer_port: int, metrics_port: int) -> str:
    return (
        f'[[route]]\ndomain = "dest.example"\nhost = "127.0.0.1:{peer_port}"\ntls = "none"\n\n'
        '[delivery]\nretry_schedule = [1]\ndelay_warning = 0\nresolver = "127.0.0.1:9"\n\n'
        "[limits]\nmax_message_size = 65536\n\n"
        "[pool]\ninitial_connections = 1\nmax_connections = 1\n\n"
        f'[metrics]\naddress = "127.0.0.1:{metrics_port}"\n\n[log]\nformat = "json"\n'
    )


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> Samples:
    status, text = http_get(port, "/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of *name* whose labels include *labels*."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def message(size: int = 0) -> bytes:
    body = "x" * 70 + "\r\n"
    return (
        b"From: a@sender.example\r\nTo: b@dest.example\r\nSubject: m\r\n\r\n"
        + (body * (size // len(body) + 1)).encode()
    )


def send_mail(port: int) -> str:
    """SENT plain messages and one too big (refused) in one session, then one message after
    STARTTLS in another; returns the queue id of the last."""
    with smtplib.SMTP("127.0.0.1", port) as client:
        for _ in range(SENT):
            client.sendmail("a@sender.example", ["b@dest.example"], message())
        client.mail("a@sender.example")  # no SIZE=: refused only at the end of data
        client.rcpt("b@dest.example")
        assert client.data(message(70000))[0] == 552
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.starttls(context=ssl._create_unverified_context())
        client.ehlo("tls.test")
        client.mail("a@sender.example")
        client.rcpt("b@dest.example")
        code, text = client.data(message())
        assert code == 250
    return text.decode().split()[-1]


class Flow:
    def __init__(self, server: Server, peer: SmtpPeer, metrics_port: int, tls_id: str) -> None:
        self.server, self.peer, self.port, self.tls_id = server, peer, metrics_port, tls_id


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flow]:
    tmp = tmp_path_factory.mktemp("metrics")
    metrics_port = free_port()
    with (
        SmtpPeer() as peer,
        running_server(
            tmp, config(peer.port, metrics_port), workers=2, roles=("mx",), hold=False
        ) as srv,
    ):
        tls_id = send_mail(srv.port)
        peer.wait_for(SENT + 1)
        # Deliveries are recorded after the peer's 250; tallies reach the files within ~1 s.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            samples = scrape(metrics_port)
            done = value(samples, "tachymail_delivery_attempts_total", result="delivered")
            if done == SENT + 1 and value(samples, "tachymail_queue_messages") == 0:
                break
            time.sleep(0.2)
        time.sleep(1.2)
        yield Flow(srv, peer, metrics_port, tls_id)


def test_one_endpoint_counts_every_worker(flow: Flow) -> None:
    s = scrape(flow.port)
    assert value(s, "tachymail_messages_accepted_total", listener="mx") == SENT + 1
    assert value(s, "tachymail_messages_rejected_total", reason="too_big") == 1
    assert value(s, "tachymail_received_bytes_total") == value(
        s, "tachymail_message_size_bytes_sum"
    )
    assert value(s, "tachymail_message_size_bytes_count") == SENT + 1
    assert value(s, "tachymail_smtp_connections_total", listener="mx") >= 2  # + start-up probe
    assert value(s, "tachymail_smtp_connections_open") == 0
    assert value(s, "tachymail_tls_handshakes_total", listener="mx") == 1
    assert value(s, "tachymail_smtp_commands_total", verb="STARTTLS") == 1
    assert value(s, "tachymail_smtp_commands_total", verb="DATA") == SENT + 2
    assert value(s, "tachymail_smtp_replies_total", **{"class": "5xx"}) == 1
    assert value(s, "tachymail_smtp_replies_total", **{"class": "3xx"}) == SENT + 2
    # Intake commits plus delivery-result commits, each at least one operation.
    assert value(s, "tachymail_queue_commit_batch_size_sum") >= 2 * (SENT + 1)
    assert value(s, "tachymail_queue_commit_duration_seconds_count") >= 2
    delivered = value(s, "tachymail_delivery_attempts_total", result="delivered")
    assert delivered == SENT + 1
    destinations = {
        dict(ls)["destination"] for (n, ls) in s if n == "tachymail_delivery_attempts_total"
    }
    assert destinations == {"127.0.0.1"}
    assert value(s, "tachymail_delivery_latency_seconds_count") == SENT + 1
    # One connection at a time: every transaction after the first on it is a reuse.
    opened = value(s, "tachymail_outbound_connections_total")
    assert opened >= 1
    assert value(s, "tachymail_outbound_connections_reused_total") == delivered - opened
    assert value(s, "tachymail_outbound_connections_open") == opened
    assert value(s, "tachymail_workers_alive", kind="smtp") == 2
    assert value(s, "tachymail_workers_alive", kind="delivery") == 1
    assert value(s, "tachymail_queue_messages") == 0
    assert value(s, "tachymail_queue_oldest_message_age_seconds") == 0
    for kind, index in (("supervisor", "0"), ("smtp", "0"), ("smtp", "1"), ("delivery", "0")):
        assert value(s, "tachymail_process_cpu_seconds_total", kind=kind, index=index) > 0
        assert value(s, "tachymail_process_resident_memory_bytes", kind=kind, index=index) > 1e6


def test_no_label_carries_a_per_message_value(flow: Flow) -> None:
    s = scrape(flow.port)
    texts = " ".join(v for (_n, ls) in s for _k, v in ls)
    assert flow.tls_id not in texts
    assert "b@dest.example" not in texts and "dest.example" not in texts


def test_health_and_readiness(flow: Flow) -> None:
    assert http_get(flow.port, "/healthz") == (200, "ok\n")
    assert http_get(flow.port, "/readyz") == (200, "ok\n")
    assert http_get(flow.port, "/nothing")[0] == 404


def test_dashboard_queries_only_exported_metrics(flow: Flow) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = {name for name, _labels in scrape(flow.port)}
    queried: dict[str, str] = {}
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 15
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for name in re.findall(r"\btachymail_[a-z0-9_]+", target["expr"]):
                queried[name] = panel["title"]
    missing = {name: title for name, title in queried.items() if name not in exported}
    assert not missing, f"panels query metrics tachymail does not export: {missing}"
    for needed in (
        "tachymail_messages_accepted_total",
        "tachymail_delivery_attempts_total",
        "tachymail_queue_messages",
        "tachymail_queue_oldest_message_age_seconds",
        "tachymail_delivery_latency_seconds_bucket",
        "tachymail_tls_handshakes_total",
        "tachymail_messages_rejected_total",
        "tachymail_workers_alive",
    ):
        assert needed in queried


def test_json_logs_trace_a_message_from_intake_to_delivery(flow: Flow) -> None:
    events = []
    for line in flow.server.log().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    sessions = [e for e in events if e.get("event") == "smtp_session" and e["messages"]]
    attempts = [e for e in events if e.get("event") == "delivery_attempt"]
    assert len(sessions) == 2 and len(attempts) == SENT + 1
    session = next(e for e in sessions if flow.tls_id in e["queue_ids"])
    assert session["outcome"] == "quit" and session["tls"] and session["messages"] == 1
    attempt = next(e for e in attempts if e["queue_id"] == flow.tls_id)
    assert attempt["result"] == "delivered" and attempt["code"] == 250
    assert all({"time", "level", "logger", "pid", "msg"} <= e.keys() for e in events)


def test_restarts_counted_dead_gauges_dropped_draining_not_ready(tmp_path: Path) -> None:
    port = free_port()
    extra = f'[metrics]\naddress = "127.0.0.1:{port}"\n[log]\nformat = "logfmt"\n'
    with running_server(tmp_path, extra, workers=1, roles=("mx",)) as srv:
        from tachymail.cli.supervisor import default_metrics_dir

        directory = default_metrics_dir(srv.data_dir.resolve())
        assert directory.is_dir()
        client = smtplib.SMTP("127.0.0.1", srv.port)
        client.ehlo("x.test")
        time.sleep(1.2)
        assert value(scrape(port), "tachymail_smtp_connections_open") == 1
        [worker] = srv.worker_pids()
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            s = scrape(port)
            if value(s, "tachymail_worker_restarts_total", kind="smtp") == 1 and value(
                s, "tachymail_workers_alive", kind="smtp"
            ):
                break
            time.sleep(0.1)
        assert value(s, "tachymail_worker_restarts_total", kind="smtp") == 1
        # The dead worker's session no longer counts as open (mark_process_dead).
        assert value(s, "tachymail_smtp_connections_open") == 0
        assert not list(directory.glob(f"gauge_livesum_{worker}.db"))
        client.close()
        deadline = time.monotonic() + 10  # the new worker is listening when /readyz says so
        while http_get(port, "/readyz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        # A session inside a transaction keeps the server draining after SIGTERM.
        with smtplib.SMTP("127.0.0.1", srv.port) as busy:
            busy.ehlo("x.test")
            busy.mail("a@sender.example")
            srv.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while http_get(port, "/readyz")[0] == 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert http_get(port, "/readyz") == (503, "draining\n")
        assert srv.stop() == 0
        assert not directory.exists()
        assert re.search(r"^time=\S+ level=info .*event=smtp_session", srv.log(), re.MULTILINE)

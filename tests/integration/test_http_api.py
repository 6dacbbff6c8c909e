"""The HTTP API of a real `tachymail serve` (listener role http): bearer tokens made with the
real `tachymail token` command, the queue admin endpoints against mail queued by smtplib,
the JSON errors of bad requests, the throttle of wrong tokens, and HTTPS (issue 13).

Clients: curl (as an operator would type it) and aiohttp's client.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tachymail.queue.envelope import Envelope, Recipient, new_queue_id
from tachymail.queue.store import QueueStore, put_message

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import (
    Server,
    free_port,
    metric,
    run_cli,
    running_server,
    tachymail_cmd,
    wait_port,
    wait_until,
)

# Wrong tokens cost little here (the tarpit's delay is what the throttle test measures).
FAST_TARPIT = "[auth]\nfailure_delay = 0.01\nmax_failure_delay = 0.05\n"
#: a small body limit, so that "too large" costs the test little
BODY_LIMIT = 65536


@pytest.fixture(scope="module")
def curl() -> str:
    path = shutil.which("curl")
    if path is None:
        pytest.skip("curl is not installed")
    return path


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server holding its queue, with an http listener, a deferred message written into
    its queue before it starts, and tokens "adm" (admin) and "inj" (inject)."""
    tmp = tmp_path_factory.mktemp("http")
    data = tmp / "data"
    _queue_deferred(data)
    extra = FAST_TARPIT + f"[http]\nmax_body_bytes = {BODY_LIMIT}\n"
    with running_server(tmp, extra, roles=("mx", "http"), data_dir=data) as server:
        server.extra["adm"] = run_cli("token", "add", "adm", "--scope", "admin", data_dir=data)
        server.extra["inj"] = run_cli("token", "add", "inj", "--scope", "inject", data_dir=data)
        server.extra["adm"] = server.extra["adm"].strip()
        server.extra["inj"] = server.extra["inj"].strip()
        yield server


def _queue_deferred(data: Path) -> None:
    """One message whose recipient waits an hour for its third attempt (the queue's own
    API, as delivery leaves it: a held server never defers anything itself)."""
    store = QueueStore(data / "queue")
    try:
        rcpt = Recipient(
            "late@deferred.test",
            attempts=2,
            next_attempt=time.time() + 3600,
            last_reply="451 4.3.0 try later",
        )
        envelope = Envelope(
            new_queue_id(), "sender@deferred.test", [rcpt], arrival=time.time() - 600
        )
        store.apply([put_message(envelope, b"Subject: deferred\r\n\r\nlater\r\n")])
    finally:
        store.close()


def _base(server: Server) -> str:
    return f"http://127.0.0.1:{server.ports['http']}"


def call(
    server: Server,
    method: str,
    path: str,
    token: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One request with aiohttp's client: (status, headers, parsed JSON body)."""

    async def run() -> tuple[int, dict[str, str], Any]:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, _base(server) + path, data=body, headers=sent) as reply,
        ):
            raw = await reply.read()
            return reply.status, dict(reply.headers), json.loads(raw) if raw else None

    return asyncio.run(run())


def run_curl(curl: str, *args: str) -> tuple[int, str]:
    """curl ARGS: (HTTP status, body)."""
    out = subprocess.run(
        [curl, "-sS", "-o", "-", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    body, _, code = out.stdout.rpartition("\n")
    return int(code), body


def send(server: Server, sender: str, recipients: list[str], subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["mx"], timeout=30) as client:
        message = f"From: <{sender}>\r\nSubject: {subject}\r\n\r\nhello\r\n"
        client.sendmail(sender, recipients, message.encode())


def queue_ids(server: Server, query: str = "") -> list[str]:
    status, _, body = call(server, "GET", f"/api/v1/queue{query}", server.extra["adm"])
    assert status == 200, body
    return [message["id"] for message in body["messages"]]


def cli_queue(server: Server) -> dict[str, dict[str, Any]]:
    """The queue as `tachymail queue list --json` shows it, by id."""
    out = run_cli("queue", "list", "--json", data_dir=server.data_dir)
    return {m["id"]: m for m in map(json.loads, out.splitlines())}


# --- tokens -----------------------------------------------------------------------------------


def test_tokens_by_the_command_line_and_their_scopes(curl: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    with running_server(tmp_path, FAST_TARPIT, roles=("mx", "http"), data_dir=data) as server:
        base = _base(server)
        token = run_cli("token", "add", "ops", "--scope", "admin", data_dir=data).strip()
        inject = run_cli("token", "add", "app", "--scope", "inject", data_dir=data).strip()
        assert token.startswith("tm_") and token != inject
        listed = run_cli("token", "list", data_dir=data)
        assert [line.split("\t")[:2] for line in listed.splitlines()] == [
            ["ops", "admin"],
            ["app", "inject"],
        ]
        stored = data / "http-tokens"
        assert stat.S_IMODE(stored.stat().st_mode) == 0o600
        assert token not in stored.read_text() and inject not in stored.read_text()
        # a name in use is refused, and the first token is left as it was
        again = subprocess.run(
            [*tachymail_cmd(), "token", "add", "ops", "--data-dir", str(data)],
            capture_output=True,
            text=True,
        )
        assert again.returncode == 2 and "exists already" in again.stderr

        code, body = run_curl(curl, f"{base}/api/v1/queue")
        assert code == 401 and json.loads(body)["error"]["code"] == "unauthorized"
        headers = subprocess.run(
            [curl, "-sS", "-D", "-", "-o", "/dev/null", f"{base}/api/v1/queue"],
            capture_output=True,
            text=True,
        ).stdout
        assert "www-authenticate: bearer" in headers.lower()
        code, body = run_curl(
            curl, "-H", "Authorization: Bearer tm_not-a-token", f"{base}/api/v1/queue"
        )
        assert code == 401 and json.loads(body)["error"]["code"] == "unauthorized"
        code, body = run_curl(curl, "-H", f"Authorization: Bearer {token}", f"{base}/api/v1/queue")
        assert code == 200 and json.loads(body)["messages"] == []
        # an inject token may not read the queue
        code, body = run_curl(curl, "-H", f"Authorization: Bearer {inject}", f"{base}/api/v1/queue")
        assert code == 403 and json.loads(body)["error"]["code"] == "forbidden"
        # the document needs no token
        code, body = run_curl(curl, f"{base}/api/v1/openapi.json")
        assert code == 200 and json.loads(body)["openapi"].startswith("3.1")

        # deleting a token takes effect at the next request, without a reload
        assert run_cli("token", "del", "ops", data_dir=data) == ""
        code, _ = run_curl(curl, "-H", f"Authorization: Bearer {token}", f"{base}/api/v1/queue")
        assert code == 401
        gone = subprocess.run(
            [*tachymail_cmd(), "token", "del", "ops", "--data-dir", str(data)],
            capture_output=True,
            text=True,
        )
        assert gone.returncode == 1
        assert "token=-" in server.log() and "GET /api/v1/queue 200 token=ops" in server.log()
        assert server.stop() == 0


def test_wrong_tokens_are_slowed_then_locked_out(tmp_path: Path) -> None:
    metrics_port = free_port()
    extra = (
        "[auth]\nfailure_delay = 0.2\nmax_failure_delay = 1.0\nmax_failures_per_ip = 3\n"
        f'lockout = 120\n[metrics]\naddress = "127.0.0.1:{metrics_port}"\n'
    )
    data = tmp_path / "data"
    with running_server(tmp_path, extra, roles=("mx", "http"), data_dir=data) as server:
        good = run_cli("token", "add", "ops", "--scope", "all", data_dir=data).strip()
        taken = []
        for _ in range(3):
            started = time.monotonic()
            status, headers, body = call(server, "GET", "/api/v1/queue", "tm_guess")
            taken.append(time.monotonic() - started)
            assert status == 401 and body["error"]["code"] == "unauthorized"
            assert "invalid_token" in headers["WWW-Authenticate"]
        # the tarpit: each reply waited failure_delay times the failures counted
        assert taken[0] >= 0.2 and taken[2] >= 0.4
        status, headers, body = call(server, "GET", "/api/v1/queue", "tm_guess")
        assert status == 429 and body["error"]["code"] == "too_many_failures"
        assert 0 < int(headers["Retry-After"]) <= 120
        status, _, _ = call(server, "GET", "/api/v1/queue", "tm_another")
        assert status == 429
        # a valid token is still served: the lockout stops guessing, not the API
        status, _, _ = call(server, "GET", "/api/v1/queue", good)
        assert status == 200
        assert server.log().count("with a wrong bearer token") == 3
        assert "AUTH lockout for 120 seconds: client 127.0.0.1" in server.log()

        def counted() -> bool:
            return (
                metric(metrics_port, "tachymail_http_auth_failures_total") == 3
                and metric(
                    metrics_port,
                    "tachymail_http_requests_total",
                    route="/api/v1/queue",
                    status="429",
                )
                == 2
            )

        deadline = time.monotonic() + 10
        while not counted():
            assert time.monotonic() < deadline, "metrics not counted"
            time.sleep(0.2)


# --- the queue endpoints ----------------------------------------------------------------------


def test_queue_listing_filters_and_pages(api: Server) -> None:
    send(api, "alice@one.test", ["x@dest-a.test"], "first")
    send(api, "bob@two.test", ["y@dest-b.test", "z@dest-a.test"], "second")
    send(api, "alice@one.test", ["w@dest-c.test"], "third")
    everything = queue_ids(api)
    assert len(everything) >= 4 and everything == sorted(everything)  # oldest first
    assert set(everything) == set(cli_queue(api))  # what the CLI sees

    assert len(queue_ids(api, "?sender=alice@one.test")) == 2
    assert len(queue_ids(api, "?sender=two.test")) == 1
    assert len(queue_ids(api, "?domain=dest-a.test")) == 2
    assert len(queue_ids(api, "?recipient=Z@DEST-A.TEST")) == 1
    assert len(queue_ids(api, "?state=deferred")) == 1
    assert len(queue_ids(api, "?older_than=5m")) == 1  # the deferred one arrived 10 min ago

    # paging: one at a time, each page's cursor leads to the next, and the end says so
    seen: list[str] = []
    cursor = ""
    for _ in range(len(everything) + 2):
        query = f"?limit=1&cursor={cursor}" if cursor else "?limit=1"
        status, _, body = call(api, "GET", f"/api/v1/queue{query}", api.extra["adm"])
        assert status == 200 and body["total"] == len(everything)
        seen += [message["id"] for message in body["messages"]]
        if body["next_cursor"] is None:
            break
        cursor = body["next_cursor"]
    assert seen == everything

    for query, field in (
        ("?state=lost", "state"),
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?older_than=soon", "older_than"),
        ("?cursor=not-a-cursor", "cursor"),
        ("?colour=blue", "colour"),
    ):
        status, _, body = call(api, "GET", f"/api/v1/queue{query}", api.extra["adm"])
        assert status == 400, query
        assert body["error"]["code"] == "invalid_query"
        assert body["error"]["details"][0]["field"] == field


def test_hold_release_flush_bounce_delete(api: Server, curl: str) -> None:
    send(api, "carol@three.test", ["v@dest-d.test"], "to act on")
    [queue_id] = queue_ids(api, "?sender=carol@three.test")
    adm = api.extra["adm"]
    base = f"{_base(api)}/api/v1/queue/{queue_id}"

    status, _, shown = call(api, "GET", f"/api/v1/queue/{queue_id}", adm)
    assert status == 200 and shown["sender"] == "carol@three.test"
    assert "Subject: to act on\r\n" in shown["headers"] and shown["state"] == "active"

    code, body = run_curl(curl, "-X", "POST", "-H", f"Authorization: Bearer {adm}", f"{base}/hold")
    assert code == 200
    assert json.loads(body) == {"id": queue_id, "action": "hold", "changed": True, "note": None}
    assert cli_queue(api)[queue_id]["state"] == "held"
    code, body = run_curl(curl, "-X", "POST", "-H", f"Authorization: Bearer {adm}", f"{base}/hold")
    assert code == 200 and json.loads(body)["note"] == "is already held"
    assert queue_ids(api, "?state=held") == [queue_id]

    status, _, body = call(api, "POST", f"/api/v1/queue/{queue_id}/release", adm)
    assert status == 200 and body["changed"] is True
    assert cli_queue(api)[queue_id]["state"] == "active"

    # bounce: the message leaves the queue, a failure report to its sender takes its place
    status, _, body = call(api, "POST", f"/api/v1/queue/{queue_id}/bounce", adm)
    assert status == 200 and body["changed"] is True
    queue = cli_queue(api)
    assert queue_id not in queue
    [report] = [m for m in queue.values() if m["recipients"][0]["address"] == "carol@three.test"]
    assert report["sender"] == ""
    status, _, body = call(api, "GET", f"/api/v1/queue/{report['id']}", adm)
    assert "multipart/report" in body["headers"]

    authorization = f"Authorization: Bearer {adm}"
    where = f"{_base(api)}/api/v1/queue/{report['id']}"
    code, body = run_curl(curl, "-X", "DELETE", "-H", authorization, where)
    assert code == 200 and json.loads(body)["changed"] is True
    assert report["id"] not in cli_queue(api)
    for method, path in (
        ("GET", f"/api/v1/queue/{report['id']}"),
        ("DELETE", f"/api/v1/queue/{report['id']}"),
        ("POST", f"/api/v1/queue/{report['id']}/hold"),
        ("POST", f"/api/v1/queue/{queue_id}/flush"),
    ):
        status, _, body = call(api, method, path, adm)
        assert status == 404 and body["error"]["code"] == "not_found", (method, path)


def test_flush_makes_deferred_mail_due(api: Server) -> None:
    adm = api.extra["adm"]
    [deferred] = queue_ids(api, "?state=deferred")
    assert cli_queue(api)[deferred]["next_attempt"] > time.time() + 3000
    status, _, body = call(api, "POST", f"/api/v1/queue/{deferred}/flush", adm)
    assert status == 200 and body["changed"] is True
    assert cli_queue(api)[deferred]["state"] == "active"
    status, _, body = call(api, "POST", f"/api/v1/queue/{deferred}/flush", adm)
    assert body == {"id": deferred, "action": "flush", "changed": False, "note": "is not deferred"}
    # nothing deferred is left: flushing the whole queue changes nothing
    status, _, body = call(api, "POST", "/api/v1/queue/flush", adm)
    assert status == 200 and body == {"action": "flush", "changed": 0}


# --- bad requests: always a 4xx with a JSON error ------------------------------------------


def test_bad_requests_get_json_errors(api: Server, curl: str) -> None:
    inj, adm = api.extra["inj"], api.extra["adm"]
    json_type = {"Content-Type": "application/json"}
    status, _, body = call(api, "POST", "/api/v1/messages", inj, b'{"recipients": [', json_type)
    assert status == 400 and body["error"]["code"] == "bad_json"
    unknown = b'{"envelope_sender": "a@b.test", "recipients": [], "content": "x", "colour": 1}'
    status, _, body = call(api, "POST", "/api/v1/messages", inj, unknown, json_type)
    assert status == 422 and body["error"]["code"] == "invalid_body"
    assert "colour" in json.dumps(body["error"]["details"])
    status, _, body = call(
        api, "POST", "/api/v1/messages", inj, b"x=1", {"Content-Type": "text/plain"}
    )
    assert status == 415 and body["error"]["code"] == "unsupported_media_type"

    # too large: declared by Content-Length (curl), and streamed without one (chunked)
    huge = api.data_dir.parent / "huge.json"
    huge.write_bytes(b'{"content": "' + b"x" * (BODY_LIMIT + 10) + b'"}')
    code, body = run_curl(
        curl,
        *("-X", "POST", "-H", f"Authorization: Bearer {inj}"),
        *("-H", "Content-Type: application/json", "--data-binary", f"@{huge}"),
        f"{_base(api)}/api/v1/messages",
    )
    assert code == 413 and json.loads(body)["error"]["code"] == "too_large"

    async def chunked() -> tuple[int, Any]:
        async def pieces() -> Any:
            for _ in range(BODY_LIMIT // 4096 + 4):
                yield b" " * 4096

        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{_base(api)}/api/v1/messages",
                data=pieces(),
                headers={"Authorization": f"Bearer {inj}", **json_type},
            ) as reply,
        ):
            return reply.status, await reply.json()

    status, body = asyncio.run(chunked())
    assert status == 413 and body["error"]["code"] == "too_large"

    status, _, body = call(api, "GET", "/api/v1/no-such-thing", adm)
    assert status == 404 and body["error"]["code"] == "not_found"
    status, _, body = call(api, "GET", "/nowhere")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, headers, body = call(api, "PUT", "/api/v1/queue", adm)
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    assert "GET" in headers["Allow"]
    status, _, body = call(api, "POST", "/api/v1/queue/zz-not-hex/hold", adm)
    assert status == 404 and body["error"]["code"] == "not_found"
    # a request line over aiohttp's limit (8190 octets) is refused before routing: a 400 and
    # one log line naming the reason, no traceback (schemathesis found the traceback)
    host, _, port = _base(api).removeprefix("http://").partition(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"GET /api/v1/queue?sender=" + b"x" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n")
        assert raw.recv(100).split(b" ")[1] == b"400"
    wait_until(lambda: "request refused before routing" in api.log())
    assert "internal" not in api.log() and "Traceback" not in api.log()


def test_https_listener(tmp_path: Path, curl: str) -> None:
    port = free_port()
    extra = f'[[listener]]\naddress = "127.0.0.1:{port}"\nrole = "http"\ntls = true\n'
    with running_server(tmp_path, extra, roles=("mx",)):
        wait_port(port)
        code, body = run_curl(curl, "-k", f"https://127.0.0.1:{port}/api/v1/openapi.json")
        assert code == 200 and json.loads(body)["openapi"].startswith("3.1")
        plain = subprocess.run(
            [curl, "-sS", f"http://127.0.0.1:{port}/api/v1/openapi.json"],
            capture_output=True,
            text=True,
        )
        assert '"openapi"' not in plain.stdout  # no plain HTTP on a TLS listener


def test_tls_is_an_option_of_http_listeners_only(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[listener]]\naddress = "127.0.0.1:2525"\nrole = "mx"\ntls = true\n')
    out = subprocess.run(
        [*tachymail_cmd(), "config", "check", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 1 and "listener[0].tls: only for role http" in out.stderr
    defaults = subprocess.run(
        [*tachymail_cmd(), "config", "check"], capture_output=True, text=True, env=os.environ
    )
    assert "127.0.0.1:2080 (http)" in defaults.stdout


def test_the_api_keeps_answering_across_a_reload(tmp_path: Path) -> None:
    """SIGHUP: the new workers serve the API on the same sockets, the old ones finish."""
    data = tmp_path / "data"
    with running_server(tmp_path, FAST_TARPIT, roles=("mx", "http"), data_dir=data) as server:
        token = run_cli("token", "add", "ops", data_dir=data).strip()
        assert call(server, "GET", "/api/v1/queue", token)[0] == 200
        old = set(server.worker_pids())
        server.proc.send_signal(signal.SIGHUP)
        statuses = []
        deadline = time.monotonic() + 30
        while old & set(server.worker_pids()) or "configuration reloaded" not in server.log():
            assert time.monotonic() < deadline, "the reload did not finish"
            statuses.append(call(server, "GET", "/api/v1/queue", token)[0])
        statuses.append(call(server, "GET", "/api/v1/queue", token)[0])
        assert set(statuses) == {200}
        assert server.stop() == 0

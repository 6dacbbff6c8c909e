"""Suspending and resuming destinations, end to end: a real `tachymail serve` relaying to a
real SMTP peer on loopback (a route sends dest.example there), driven by the CLI
(`tachymail queue suspend|resume|destinations`) and by the HTTP API
(`/api/v1/destinations`). The peer counts its sessions: a suspended destination gets none.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import (
    Server,
    free_port,
    metric,
    run_cli,
    running_server,
    tachymail_cmd,
    wait_until,
)
from smtp_peer import SmtpPeer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_delivery import delivery_log, relay_config, send


@contextmanager
def relay(tmp_path: Path) -> Iterator[tuple[Server, SmtpPeer, str, int]]:
    """A server with mx and http listeners and a metrics endpoint, relaying dest.example to
    a scripted peer; yields it, the peer, an admin token and the metrics port."""
    data_dir = tmp_path / "data"
    token = run_cli("token", "add", "ops", "--scope", "admin", data_dir=data_dir).strip()
    metrics_port = free_port()
    with SmtpPeer() as peer:
        extra = relay_config(peer.port) + f'\n[metrics]\naddress = "127.0.0.1:{metrics_port}"\n'
        with running_server(
            tmp_path, extra, hold=False, roles=("mx", "http"), data_dir=data_dir
        ) as srv:
            yield srv, peer, token, metrics_port


def api(
    srv: Server, method: str, path: str, token: str, body: Any = None
) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of one request to the server's HTTP API."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{srv.ports['http']}{path}", data=data, method=method
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def entry(srv: Server, token: str, name: str) -> dict[str, Any] | None:
    status, listing = api(srv, "GET", "/api/v1/destinations", token)
    assert status == 200, listing
    return next((e for e in listing["destinations"] if e["destination"] == name), None)


def cli_entry(srv: Server, name: str) -> dict[str, Any] | None:
    lines = run_cli("queue", "destinations", "--json", data_dir=srv.data_dir).splitlines()
    return next((e for e in map(json.loads, lines) if e["destination"] == name), None)


def held_back(srv: Server, ids: list[str]) -> None:
    """Wait until the delivery worker has looked at *ids* and held them back: each one's
    next attempt is in the future, and no attempt was counted."""

    def looked_at() -> bool:
        lines = run_cli("queue", "list", "--json", data_dir=srv.data_dir).splitlines()
        messages = {m["id"]: m for m in map(json.loads, lines)}
        now = time.time()
        return all(
            i in messages
            and all(
                r["attempts"] == 0 and r["next_attempt"] > now for r in messages[i]["recipients"]
            )
            for i in ids
        )

    wait_until(looked_at)


def test_cli_suspend_holds_mail_back_until_resume(tmp_path: Path) -> None:
    with relay(tmp_path) as (srv, peer, token, metrics_port):
        out = run_cli(
            "queue", "suspend", "dest.example", "--reason", "their maintenance",
            data_dir=srv.data_dir,
        )  # fmt: skip
        assert "suspended: dest.example until resumed" in out
        # The delivery worker has seen it once its gauge says so.
        wait_until(
            lambda: metric(metrics_port, "tachymail_destination_suspended",
                           destination="dest.example") == 1
        )  # fmt: skip
        ids = [send(srv.port, [f"r{i}@dest.example"]) for i in range(3)]
        held_back(srv, ids)
        assert peer.connections == 0 and peer.messages == []
        assert delivery_log(srv) == []  # no attempt, no DSN
        assert srv.queue_count() == 3
        assert "deliveries to dest.example suspended until resumed (their maintenance)" in (
            srv.log()
        )
        shown = cli_entry(srv, "dest.example")
        assert shown is not None
        assert shown["queued"] == 3
        assert shown["suspension"]["reason"] == "their maintenance"
        assert shown["suspension"]["until"] == 0
        listed = entry(srv, token, "dest.example")
        assert listed is not None and listed["queued"] == 3
        assert listed["suspension"]["destination"] == "dest.example"
        table = run_cli("queue", "destinations", data_dir=srv.data_dir)
        assert "until resumed: their maintenance" in table

        assert run_cli("queue", "resume", "dest.example", data_dir=srv.data_dir).strip() == (
            "resumed: dest.example"
        )
        # Released at once, not at the one-minute recheck (the generous timeout only
        # catches a hang; the recheck would come after it).
        got = peer.wait_for(3, timeout=30)
        assert sorted(r for m in got for r in m.recipients) == [
            f"r{i}@dest.example" for i in range(3)
        ]
        assert peer.connections >= 1
        wait_until(lambda: srv.queue_count() == 0 and len(delivery_log(srv)) == 3)
        attempts = [r for r in delivery_log(srv) if r["recipient"].endswith("@dest.example")]
        assert sorted(r["attempt"] for r in attempts) == [1, 1, 1]  # nothing counted before
        wait_until(
            lambda: metric(metrics_port, "tachymail_destination_suspended",
                           destination="dest.example") == 0
        )  # fmt: skip
        assert "deliveries to dest.example resumed" in srv.log()
        # Resuming what is not suspended says so, with exit status 1.
        again = subprocess.run(
            [*tachymail_cmd(), "queue", "resume", "dest.example", "--data-dir",
             str(srv.data_dir)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert again.returncode == 1 and "was not suspended" in again.stderr


def test_api_suspend_status_and_resume(tmp_path: Path) -> None:
    with relay(tmp_path) as (srv, peer, token, metrics_port):
        status, body = api(
            srv, "POST", "/api/v1/destinations/DEST.example./suspend", token,
            {"reason": "blocked us"},
        )  # fmt: skip
        assert status == 200, body
        assert body["suspension"]["destination"] == "dest.example"
        assert body["suspension"]["until"] == 0
        wait_until(
            lambda: metric(metrics_port, "tachymail_destination_suspended",
                           destination="dest.example") == 1
        )  # fmt: skip
        ids = [send(srv.port, ["a@dest.example", "b@dest.example"]) for _ in range(2)]
        held_back(srv, ids)
        assert peer.connections == 0
        listed = entry(srv, token, "dest.example")
        assert listed is not None
        assert listed["queued"] == 4
        assert listed["in_flight"] == 0
        assert listed["suspension"]["reason"] == "blocked us"
        # Paging: one entry per page, the cursor leads on, and ends with null.
        status, whole = api(srv, "GET", "/api/v1/destinations", token)
        assert status == 200 and whole["next_cursor"] is None
        names, cursor = [], ""
        while True:
            query = "?limit=1" + (f"&cursor={cursor}" if cursor else "")
            status, one = api(srv, "GET", "/api/v1/destinations" + query, token)
            assert status == 200 and len(one["destinations"]) == 1
            names.append(one["destinations"][0]["destination"])
            if one["next_cursor"] is None:
                break
            cursor = one["next_cursor"]
        assert names == [e["destination"] for e in whole["destinations"]]
        assert "dest.example" in names

        # Refusals: a name that is no destination, an unknown field, a past time, no token.
        status, body = api(srv, "POST", "/api/v1/destinations/not%20a%20name/suspend", token)
        assert status == 400 and body["error"]["code"] == "invalid_destination"
        status, body = api(
            srv, "POST", "/api/v1/destinations/x.example/suspend", token, {"for": "1h"}
        )
        assert status == 422 and body["error"]["details"][0]["field"] == "for"
        status, body = api(
            srv, "POST", "/api/v1/destinations/x.example/suspend", token, {"until": 1000}
        )
        assert status == 422 and body["error"]["details"][0]["field"] == "until"
        status, body = api(srv, "GET", "/api/v1/destinations?cursor=%%%", token)
        assert status == 400
        status, body = api(srv, "GET", "/api/v1/destinations", "")
        assert status == 401

        status, body = api(srv, "POST", "/api/v1/destinations/dest.example/resume", token)
        assert status == 200 and body == {"destination": "dest.example", "resumed": True}
        got = peer.wait_for(2, timeout=30)
        assert sorted(r for m in got for r in m.recipients) == [
            "a@dest.example", "a@dest.example", "b@dest.example", "b@dest.example"
        ]  # fmt: skip
        status, body = api(srv, "POST", "/api/v1/destinations/dest.example/resume", token)
        assert status == 404 and body["error"]["code"] == "not_found"

        # The worker's status: the attempts, the next hop, and no suspension any more.
        def delivered_status() -> bool:
            shown = entry(srv, token, "dest.example")
            return (
                shown is not None
                and shown["queued"] == 0
                and shown["suspension"] is None
                and shown["next_hop"] == f"route:127.0.0.1:{peer.port}"
                and shown["attempts_per_second"] > 0
            )

        wait_until(delivered_status)


def test_suspension_with_an_expiry_lifts_by_itself(tmp_path: Path) -> None:
    with relay(tmp_path) as (srv, peer, token, metrics_port):
        # Held back by an open-ended suspension first, so that the test does not race the
        # expiry; then the suspension is replaced by one that ends in two seconds.
        run_cli("queue", "suspend", "dest.example", data_dir=srv.data_dir)
        wait_until(
            lambda: metric(metrics_port, "tachymail_destination_suspended",
                           destination="dest.example") == 1
        )  # fmt: skip
        queue_id = send(srv.port, ["late@dest.example"])
        held_back(srv, [queue_id])
        status, body = api(
            srv, "POST", "/api/v1/destinations/dest.example/suspend", token, {"until": "2s"}
        )
        assert status == 200, body
        until = body["suspension"]["until"]
        assert until > time.time()
        got = peer.wait_for(1, timeout=30)  # no resume: it lifts by itself
        assert got[0].recipients == ["late@dest.example"]
        wait_until(lambda: any(r["queue_id"] == queue_id for r in delivery_log(srv)))
        attempts = [r for r in delivery_log(srv) if r["queue_id"] == queue_id]
        assert len(attempts) == 1 and attempts[0]["attempt"] == 1
        assert float(attempts[0]["time"]) >= until  # not before the suspension's end
        wait_until(
            lambda: metric(metrics_port, "tachymail_destination_suspended",
                           destination="dest.example") == 0
        )  # fmt: skip
        status, listing = api(srv, "GET", "/api/v1/destinations", token)
        assert status == 200
        assert all(e["suspension"] is None for e in listing["destinations"])


def test_suspending_the_next_hop_host_holds_its_domains(tmp_path: Path) -> None:
    with relay(tmp_path) as (srv, peer, _token, metrics_port):
        # dest.example's route goes to 127.0.0.1: suspending that host stops the domain.
        run_cli("queue", "suspend", "127.0.0.1", "--for", "1h", data_dir=srv.data_dir)
        wait_until(
            lambda: metric(metrics_port, "tachymail_destination_suspended",
                           destination="127.0.0.1") == 1
        )  # fmt: skip
        queue_id = send(srv.port, ["host@dest.example"])
        held_back(srv, [queue_id])
        assert peer.connections == 0
        # the next hop is known once the delivery worker has published its status (each second)
        wait_until(lambda: (cli_entry(srv, "dest.example") or {}).get("suspension") is not None)
        shown = cli_entry(srv, "dest.example")
        assert shown is not None and shown["queued"] == 1
        assert shown["suspension"]["destination"] == "127.0.0.1"  # through its next hop
        assert shown["next_hop"] == f"route:127.0.0.1:{peer.port}"
        run_cli("queue", "resume", "127.0.0.1", data_dir=srv.data_dir)
        assert peer.wait_for(1, timeout=30)[0].recipients == ["host@dest.example"]

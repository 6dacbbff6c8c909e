"""The suppression list on a real `tachymail serve`: a hard bounce from a real SMTP peer puts
the address on the list (the CLI shows it, the DSN and the metrics carry its class), the
next message to it is refused at RCPT with 550 5.7.1, and the CLI and the HTTP API edit
the list live (issue 13)."""

from __future__ import annotations

import asyncio
import json
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_delivery import delivery_log, relay_config, send
from test_webhooks import Receiver, check_shape
from test_webhooks import config as webhook_config

from server import Server, free_port, metric, run_cli, running_server, tachymail_cmd, wait_until
from smtp_peer import Script, SmtpPeer

GONE = "gone@dest.example"
BOUNCE_CLASS = {"class": "invalid_recipient"}
USER_UNKNOWN = f"550 5.1.1 <{GONE}>: Recipient address rejected: User unknown"


def rcpt_reply(port: int, sender: str, rcpt: str) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail(sender)
        code, text = client.rcpt(rcpt)
        return code, text.decode()


def listed(server: Server, *args: str) -> list[dict[str, Any]]:
    out = run_cli("suppression", "list", "--json", *args, data_dir=server.data_dir)
    return [json.loads(line) for line in out.splitlines()]


def test_hard_bounce_suppresses_and_rcpt_refuses(tmp_path: Path) -> None:
    metrics_port = free_port()
    script = Script(rcpt={GONE: USER_UNKNOWN})
    with SmtpPeer(script) as peer:
        extra = relay_config(peer.port) + f'[metrics]\naddress = "127.0.0.1:{metrics_port}"\n'
        with running_server(tmp_path, extra, hold=False, roles=("mx",)) as srv:
            send(srv.port, [GONE, "ok@dest.example"])
            # the message to ok@ and the failure report to the sender both reach the peer
            got = peer.wait_for(2)
            wait_until(lambda: any(r.get("result") == "bounced" for r in delivery_log(srv)))
            bounced = next(r for r in delivery_log(srv) if r.get("result") == "bounced")
            assert bounced["recipient"] == GONE
            assert bounced["bounce_class"] == "invalid_recipient"
            report = next(m for m in got if m.recipients == ["alice@sender.example"])
            assert b"X-Tachymail-Bounce-Class: invalid_recipient" in report.content

            entries = listed(srv)
            assert [(e["address"], e["scope"], e["source"]) for e in entries] == [
                (GONE, "global", "bounce")
            ]
            assert entries[0]["reason"] == f"invalid_recipient: {USER_UNKNOWN}"

            # the next message to it is refused in the session, by any sender
            code, text = rcpt_reply(srv.port, "bob@other.example", "Gone@Dest.Example")
            assert code == 550
            assert text.startswith("5.7.1 <Gone@Dest.Example>: Recipient address rejected: ")
            assert "suppressed (invalid_recipient: 550 5.1.1" in text
            # the others still go
            assert rcpt_reply(srv.port, "bob@other.example", "ok@dest.example")[0] == 250

            def counted() -> bool:
                return (
                    metric(
                        metrics_port, "tachymail_bounces_total", **{"class": "invalid_recipient"}
                    )
                    >= 1
                    and metric(
                        metrics_port, "tachymail_recipients_rejected_total", reason="suppressed"
                    )
                    >= 1
                )

            wait_until(counted)
            # a deleted entry lets the address through again
            run_cli("suppression", "del", GONE, data_dir=srv.data_dir)
            assert rcpt_reply(srv.port, "bob@other.example", GONE)[0] == 250


def test_cli_add_del_import_beside_a_running_server(tmp_path: Path) -> None:
    with running_server(tmp_path, roles=("mx",)) as srv:
        data = srv.data_dir
        # a list that is empty costs nothing and refuses nothing
        assert rcpt_reply(srv.port, "a@shop.example", "x@dest.example")[0] == 250
        out = run_cli(
            "suppression",
            "add",
            "X@Dest.Example",
            "--scope",
            "shop.example",
            "--reason",
            "unsubscribed",
            data_dir=data,
        )
        assert out.startswith("added: x@dest.example\tshop.example\tcli")
        code, text = rcpt_reply(srv.port, "a@shop.example", "x@dest.example")
        assert (code, text) == (
            550,
            "5.7.1 <x@dest.example>: Recipient address rejected: suppressed (unsubscribed)",
        )
        # the scope is the sender's domain: another sender may still mail it
        assert rcpt_reply(srv.port, "a@news.example", "x@dest.example")[0] == 250
        run_cli("suppression", "del", "x@dest.example", "--scope", "shop.example", data_dir=data)
        assert rcpt_reply(srv.port, "a@shop.example", "x@dest.example")[0] == 250

        csv_file = tmp_path / "list.csv"
        csv_file.write_text(
            "address,scope,reason,expires\n"
            "one@dest.example,,bounced elsewhere,\n"
            "two@dest.example,shop.example,complaint,30d\n"
        )
        assert run_cli("suppression", "import", str(csv_file), data_dir=data) == (
            "imported 2 entries\n"
        )
        assert rcpt_reply(srv.port, "a@any.example", "one@dest.example")[0] == 550
        assert rcpt_reply(srv.port, "a@shop.example", "two@dest.example")[0] == 550
        assert [e["address"] for e in listed(srv, "--scope", "shop.example")] == [
            "two@dest.example"
        ]
        # a bad file names its line and adds nothing
        csv_file.write_text("address,scope,reason,expires\nthree@dest.example,,,\nnope,,,\n")
        bad = subprocess.run(
            [*tachymail_cmd(), "suppression", "import", str(csv_file), "--data-dir", str(data)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 2
        assert "line 3: not an address: 'nope'" in bad.stderr
        assert rcpt_reply(srv.port, "a@any.example", "three@dest.example")[0] == 250


def test_refuse_at_rcpt_off(tmp_path: Path) -> None:
    extra = "[suppression]\nrefuse_at_rcpt = false\n"
    with running_server(tmp_path, extra, roles=("mx",)) as srv:
        run_cli("suppression", "add", "x@dest.example", data_dir=srv.data_dir)
        assert rcpt_reply(srv.port, "a@shop.example", "x@dest.example")[0] == 250


# --- the HTTP API -----------------------------------------------------------------------------


def call(
    srv: Server,
    method: str,
    path: str,
    token: str,
    body: Any = None,
    raw: bytes | None = None,
    content_type: str = "application/json",
) -> tuple[int, Any]:
    async def run() -> tuple[int, Any]:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {token}"}
        if data is not None:
            headers["Content-Type"] = content_type
        url = f"http://127.0.0.1:{srv.ports['http']}{path}"
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, url, data=data, headers=headers) as reply,
        ):
            text = await reply.read()
            return reply.status, json.loads(text) if text else None

    return asyncio.run(run())


def test_api_crud_and_injection(tmp_path: Path) -> None:
    data = tmp_path / "data"
    token = run_cli("token", "add", "ops", "--scope", "all", data_dir=data).strip()
    with running_server(tmp_path, roles=("mx", "http"), data_dir=data) as srv:
        status, body = call(
            srv,
            "POST",
            "/api/v1/suppressions",
            token,
            {"address": "One@Dest.Example", "reason": "complaint", "expires": "30d"},
        )
        assert status == 200, body
        assert body["added"] == 1
        (entry,) = body["suppressions"]
        assert (entry["address"], entry["scope"], entry["source"]) == (
            "one@dest.example",
            "global",
            "api",
        )
        assert entry["expires"] > time.time() + 29 * 86400
        status, body = call(
            srv,
            "POST",
            "/api/v1/suppressions",
            token,
            [{"address": f"u{i}@dest.example", "scope": "shop.example"} for i in range(5)],
        )
        assert (status, body["added"]) == (200, 5)
        # at once refused by SMTP in every worker
        assert rcpt_reply(srv.port, "a@any.example", "one@dest.example")[0] == 550
        assert rcpt_reply(srv.port, "a@shop.example", "u3@dest.example")[0] == 550

        # paging walks every entry once
        seen: list[str] = []
        cursor = None
        while True:
            query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
            status, body = call(srv, "GET", f"/api/v1/suppressions{query}", token)
            assert status == 200, body
            seen += [e["address"] for e in body["suppressions"]]
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == sorted(
            ["one@dest.example"] + [f"u{i}@dest.example" for i in range(5)]
        )
        status, body = call(srv, "GET", "/api/v1/suppressions?scope=global", token)
        assert [e["address"] for e in body["suppressions"]] == ["one@dest.example"]

        # bad requests: named, never a 500
        status, body = call(srv, "POST", "/api/v1/suppressions", token, {"address": "nope"})
        assert status == 422 and body["error"]["code"] == "invalid_body"
        assert body["error"]["details"][0]["field"] == "address"
        status, body = call(
            srv, "POST", "/api/v1/suppressions", token, {"address": "a@b.example", "colour": 1}
        )
        assert status == 422 and "colour" in json.dumps(body["error"]["details"])
        status, body = call(srv, "GET", "/api/v1/suppressions?limit=5000", token)
        assert status == 400 and body["error"]["code"] == "invalid_query"
        status, body = call(srv, "GET", "/api/v1/suppressions?cursor=zzz", token)
        assert status == 400 and body["error"]["code"] == "invalid_query"

        # delete, then delete again
        status, body = call(srv, "DELETE", "/api/v1/suppressions/ONE@dest.example", token)
        assert (status, body) == (
            200,
            {"removed": True, "address": "one@dest.example", "scope": "global"},
        )
        status, body = call(srv, "DELETE", "/api/v1/suppressions/one@dest.example", token)
        assert status == 404 and body["error"]["code"] == "not_found"
        assert rcpt_reply(srv.port, "a@any.example", "one@dest.example")[0] == 250
        status, _ = call(
            srv, "DELETE", "/api/v1/suppressions/u1@dest.example?scope=shop.example", token
        )
        assert status == 200

        # CSV import
        csv_body = b"address,scope,reason,expires\nc1@dest.example,,imported,\n"
        status, body = call(
            srv,
            "POST",
            "/api/v1/suppressions/import",
            token,
            raw=csv_body,
            content_type="text/csv",
        )
        assert (status, body) == (200, {"imported": 1})
        status, body = call(
            srv,
            "POST",
            "/api/v1/suppressions/import",
            token,
            raw=b"address,scope,reason,expires\nc2@dest.example,,,\nbad,,,\n",
            content_type="text/csv",
        )
        assert status == 400 and body["error"]["code"] == "invalid_csv"
        assert body["error"]["message"] == "line 3: not an address: 'bad'"
        status, body = call(
            srv,
            "POST",
            "/api/v1/suppressions/import",
            token,
            raw=b"{}",
        )
        assert status == 415
        assert rcpt_reply(srv.port, "a@any.example", "c1@dest.example")[0] == 550
        assert rcpt_reply(srv.port, "a@any.example", "c2@dest.example")[0] == 250
        assert "imported" in listed(srv, "--scope", "global")[0]["reason"]

        # HTTP injection refuses a suppressed recipient and takes the others
        status, body = call(
            srv,
            "POST",
            "/api/v1/messages",
            token,
            {
                "envelope_sender": "news@shop.example",
                "recipients": [{"email": "u2@dest.example"}, {"email": "fine@dest.example"}],
                "content": "From: news@shop.example\r\nSubject: hi\r\n\r\nhello\r\n",
            },
        )
        assert status == 200, body
        assert body["success_count"] == 1 and body["fail_count"] == 1
        assert "suppressed" in body["failed_recipients"]["u2@dest.example"]


def test_suppression_events_reach_the_webhook(tmp_path: Path) -> None:
    """A suppression added by a hard bounce, and one added by the API, each arrive as a
    "suppression" event, with the bounce's class and reply."""
    data = tmp_path / "data"
    token = run_cli("token", "add", "ops", "--scope", "admin", data_dir=data).strip()
    hook = Receiver(free_port())
    hook.start()
    try:
        with SmtpPeer(Script(rcpt={GONE: USER_UNKNOWN})) as peer:
            extra = webhook_config(peer.port, hook.port, events=["suppression"])
            with running_server(
                tmp_path, extra, hold=False, roles=("mx", "http"), data_dir=data
            ) as srv:
                queue_id = send(srv.port, [GONE])
                wait_until(lambda: len(hook.got()) >= 1)
                (event,) = hook.got()
                assert (event["type"], event["recipient"], event["queue_id"]) == (
                    "suppression",
                    GONE,
                    queue_id,
                )
                assert (event["code"], event["enhanced_code"], event["bounce_class"]) == (
                    550,
                    "5.1.1",
                    "invalid_recipient",
                )
                assert event["reply"] == USER_UNKNOWN
                status, _ = call(
                    srv,
                    "POST",
                    "/api/v1/suppressions",
                    token,
                    {"address": "api@dest.example", "reason": "asked us"},
                )
                assert status == 200
                wait_until(lambda: len(hook.got()) >= 2)
                events = hook.got()
                check_shape(events)
                assert [(e["type"], e["recipient"], e["reply"]) for e in events[1:]] == [
                    ("suppression", "api@dest.example", "asked us")
                ]
    finally:
        hook.close()

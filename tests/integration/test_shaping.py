"""Traffic shaping and egress sources on one node, measured by a recording sink.

A real `tachymail serve` delivers over loopback to `tachymail sink --record`
(tests/recording_sink.py), which records each connection's peer address and EHLO
name, each message's headers and arrival time, and the connections open at once. Egress
sources are 127.0.0.2 and 127.0.0.3 (all of 127/8 is local on Linux), so the sink sees
which source each message left from.
"""

from __future__ import annotations

import itertools
import json
import signal
import smtplib
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recording_sink import recording_sink
from server import free_port, metric, run_cli, running_server, tachymail_cmd, wait_until

SOURCES = (
    '[[egress_source]]\nname = "ip2"\naddress = "127.0.0.2"\nehlo_name = "ip2.example.test"\n\n'
    '[[egress_source]]\nname = "ip3"\naddress = "127.0.0.3"\nehlo_name = "ip3.example.test"\n\n'
)


def config(sink_port: int, extra: str = "", delivery: str = "") -> str:
    return (
        f'[[route]]\ndomain = "dest.test"\nhost = "127.0.0.1:{sink_port}"\ntls = "none"\n\n'
        f"{SOURCES}{extra}\n"
        "[delivery]\nretry_schedule = [1]\ndelay_warning = 0\n"
        f'resolver = "127.0.0.1:9"\n{delivery}\n'
    )


def send(
    port: int, count: int, headers: str = "", sender: str = "alice@sender.test", tag: str = "shaped"
) -> None:
    with smtplib.SMTP("127.0.0.1", port) as client:
        for i in range(count):
            client.sendmail(
                sender,
                [f"u{i}@dest.test"],
                f"Subject: {tag} {i}\r\n{headers}\r\nMessage {i}.\r\n",
            )


def test_a_pool_header_sends_from_its_source_and_is_removed(tmp_path: Path) -> None:
    pools = (
        '[[egress_pool]]\nname = "warm"\nsources = [{ name = "ip2", weight = 1 }]\n\n'
        '[[egress_pool]]\nname = "mixed"\n'
        'sources = [{ name = "ip2", weight = 3 }, { name = "ip3", weight = 1 }]\n\n'
        '[[egress_pool]]\nname = "bulk"\nsources = [{ name = "ip3", weight = 1 }]\n'
        'sender_domains = ["bulk.test"]\n\n'
    )
    with (
        recording_sink(tmp_path) as sink,
        running_server(tmp_path, config(sink.port, pools), hold=False, roles=("mx",)) as srv,
    ):
        send(srv.port, 1, "X-Tachymail-Pool: warm\r\n", tag="warm")
        send(srv.port, 40, "X-Tachymail-Pool: mixed\r\n", tag="mixed")
        send(srv.port, 2, "", sender="news@bulk.test", tag="bulk")
        send(srv.port, 2, "X-Tachymail-Pool: no-such-pool\r\n", tag="unknown")
        sink.wait_for_messages(45, timeout=60)
        log = srv.log()
    messages = sink.messages()

    def tagged(tag: str) -> list[dict[str, str]]:
        return [m for m in messages if f"Subject: {tag} " in m["headers"]]

    (first,) = tagged("warm")
    assert first["peer"] == "127.0.0.2"
    assert first["ehlo"] == "ip2.example.test"
    assert "x-tachymail-pool" not in first["headers"].lower()
    assert all("x-tachymail-pool" not in m["headers"].lower() for m in messages)
    mixed = tagged("mixed")
    by_peer = Counter(m["peer"] for m in mixed)
    # 3:1 by weight, exactly, over 40 messages (smooth weighted round robin)
    assert by_peer == {"127.0.0.2": 30, "127.0.0.3": 10}, by_peer
    assert {m["ehlo"] for m in mixed if m["peer"] == "127.0.0.3"} == {"ip3.example.test"}
    assert [m["peer"] for m in tagged("bulk")] == ["127.0.0.3", "127.0.0.3"]
    # An unknown pool: the default source (the host's own address), and one warning.
    assert [m["peer"] for m in tagged("unknown")] == ["127.0.0.1", "127.0.0.1"]
    assert log.count("egress pool 'no-such-pool' is not configured") == 1


def test_a_rule_rate_is_smooth_and_its_connection_limit_holds(tmp_path: Path) -> None:
    shaping = tmp_path / "shaping.toml"
    shaping.write_text(
        '[[rule]]\ndomain = "dest.test"\nrate = "20/s"\nconnection_limit = 2\n'
        "messages_per_connection = 5\n"
    )
    extra = f'[shaping]\nfiles = ["{shaping}"]\n\n[pool]\ninitial_connections = 5\n'
    with (
        recording_sink(tmp_path) as sink,
        running_server(tmp_path, config(sink.port, extra), hold=True, roles=("mx",)) as srv,
    ):
        send(srv.port, 60)
        hold_off = srv.config_path.read_text().replace("hold = true", "hold = false")
        srv.config_path.write_text(hold_off)
        srv.proc.send_signal(signal.SIGHUP)  # release the backlog at once
        sink.wait_for_messages(60, timeout=60)
    arrivals = sorted(sink.arrivals())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # Evenly spaced at 1/20 s, not 20 at once at each second boundary.
    assert 0.035 < statistics.median(gaps) < 0.08, statistics.median(gaps)
    for start in arrivals:
        in_window = sum(1 for t in arrivals if start <= t < start + 1.0)
        assert in_window <= 22, (start, in_window)
    assert sink.max_concurrent() <= 2
    # messages_per_connection = 5: at least 12 connections for 60 messages
    assert len(sink.connections()) >= 12


def api(port: int, method: str, path: str, token: str) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_421_4_7_28_suspends_that_source_and_the_others_carry_on(tmp_path: Path) -> None:
    metrics_port = free_port()
    extra = (
        '[[egress_pool]]\nname = "mixed"\n'
        'sources = [{ name = "ip2", weight = 1 }, { name = "ip3", weight = 1 }]\n'
        'sender_domains = ["sender.test"]\n\n'
        f'[metrics]\naddress = "127.0.0.1:{metrics_port}"\n'
    )
    data_dir = tmp_path / "data"
    token = run_cli("token", "add", "ops", "--scope", "admin", data_dir=data_dir).strip()
    reply = "127.0.0.2=421 4.7.28 Our system has detected an unusual rate of mail"
    with (
        recording_sink(tmp_path, "--reply-for", reply) as sink,
        running_server(
            tmp_path, config(sink.port, extra), hold=False, roles=("mx", "http"), data_dir=data_dir
        ) as srv,
    ):
        send(srv.port, 20)
        sink.wait_for_messages(20, timeout=60)
        wait_until(lambda: srv.queue_count() == 0, timeout=30)
        reactions = metric(metrics_port, "tachymail_shaping_reactions_total")
        suspended = metric(
            metrics_port, "tachymail_source_suspended", source="ip2", destination="dest.test"
        )
        listing = subprocess.run(
            [*tachymail_cmd(), "queue", "destinations", "--json", "-c", str(srv.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        http = srv.ports["http"]
        status, shaping = api(http, "GET", "/api/v1/shaping", token)
        path = "/api/v1/destinations/dest.test/resume?source=ip2"
        resumed, _ = api(http, "POST", path, token)
        again, _ = api(http, "POST", path, token)
        log = srv.log()
    # Every message arrived, all from the source that was not told to slow down.
    assert {m["peer"] for m in sink.messages()} == {"127.0.0.3"}
    assert len({m["headers"] for m in sink.messages()}) == 20
    refused = [e for e in sink.refusals() if "4.7.28" in e.get("reply", "")]
    assert refused, "the sink never answered 421 4.7.28"
    # One reaction per source and rule while it is in force, not one per reply.
    assert reactions == 1
    assert suspended == 1
    assert "shaping reaction gmail-rate-4.7.28: suspending source ip2 towards dest.test" in log
    assert listing.returncode == 0, listing.stderr
    entries = {e["destination"]: e for e in map(json.loads, listing.stdout.splitlines())}
    held = entries["dest.test"]["source_suspensions"]
    assert [s["source"] for s in held] == ["ip2"], held
    assert "4.7.28" in held[0]["reason"]
    assert entries["dest.test"]["suspension"] is None  # the destination itself is not
    # The admin API shows it with the rules in force, and resumes it.
    assert status == 200
    assert [s["source"] for s in shaping["source_suspensions"]] == ["ip2"]
    assert "gmail-rate-4.7.28" in [r["name"] for r in shaping["reactions"]]
    assert "gmail" in [r["name"] for r in shaping["rules"]]
    assert shaping["workers"] and "limits" in shaping["workers"][0]
    assert (resumed, again) == (200, 404)


def test_a_warm_up_cap_holds_mail_for_the_next_day(tmp_path: Path) -> None:
    today = time.strftime("%Y-%m-%d", time.gmtime())
    extra = (
        '[[egress_source]]\nname = "cold"\naddress = "127.0.0.2"\nehlo_name = "cold.example.test"\n'
        f'warmup_start = "{today}"\nwarmup_daily = [5, 50]\n\n'
        '[[egress_pool]]\nname = "new"\nsources = [{ name = "cold", weight = 1 }]\n'
        'sender_domains = ["sender.test"]\n\n'
    )
    with (
        recording_sink(tmp_path) as sink,
        running_server(tmp_path, config(sink.port, extra), hold=False, roles=("mx",)) as srv,
    ):
        send(srv.port, 8)
        sink.wait_for_messages(5, timeout=60)
        time.sleep(2)  # retries come due every second: none may get through
        queued = srv.queue_count()
        log = srv.log()
    assert len(sink.messages()) == 5
    assert queued == 3
    assert "reached its warm-up cap for today" in log


def test_config_check_names_every_shaping_mistake_and_a_reload_keeps_the_rules(
    tmp_path: Path,
) -> None:
    shaping = tmp_path / "shaping.toml"
    shaping.write_text(
        '[[rule]]\ndomain = "dest.test"\nrate = "20/sec0"\nconection_limit = 4\n\n'
        '[[rule]]\nprovider = "nope"\nsource = "ip9"\n\n'
        '[[reaction]]\naction = "explode"\nduration = "1h"\n'
    )
    conf = tmp_path / "check.toml"
    conf.write_text(f'{SOURCES}[shaping]\nfiles = ["{shaping}"]\n')
    out = subprocess.run(
        [*tachymail_cmd(), "config", "check", str(conf)], capture_output=True, text=True
    )
    assert out.returncode == 1
    for problem in (
        "rule[0] (dest.test).rate: bad rate '20/sec0'",
        "rule[0] (dest.test).conection_limit: unknown key",
        "rule[1].provider: 'nope' is not a [[provider]]",
        "rule[1].source: 'ip9' is not an egress_source (ip2, ip3)",
        "reaction[0].action:",
    ):
        assert problem in out.stderr, (problem, out.stderr)
    # A running server given a broken file on SIGHUP keeps its rules and says why.
    shaping.write_text('[[rule]]\ndomain = "dest.test"\nrate = "20/s"\n')
    with recording_sink(tmp_path) as sink:
        extra = f'[shaping]\nfiles = ["{shaping}"]\n'
        with running_server(tmp_path, config(sink.port, extra), hold=False, roles=("mx",)) as srv:
            shaping.write_text('[[rule]]\ndomain = "dest.test"\nrate = "fast"\n')
            srv.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "cannot use the new configuration" in srv.log(), timeout=20)
            send(srv.port, 3)
            sink.wait_for_messages(3, timeout=30)
            assert srv.proc.poll() is None
            assert "bad rate 'fast'" in srv.log()


def test_a_throttle_reaction_slows_one_source_and_lifts_by_itself(tmp_path: Path) -> None:
    metrics_port = free_port()
    shaping = tmp_path / "shaping.toml"
    shaping.write_text(
        '[[rule]]\nname = "dest"\ndomain = "dest.test"\nrate = "50/s"\n\n'
        '[[reaction]]\nname = "slow-down"\ntext = "slow down"\naction = "throttle"\n'
        'rate_factor = 0.2\nduration = "4s"\n'
    )
    extra = (
        f'[shaping]\nfiles = ["{shaping}"]\n\n'
        '[[egress_pool]]\nname = "mixed"\n'
        'sources = [{ name = "ip2", weight = 1 }, { name = "ip3", weight = 1 }]\n'
        'sender_domains = ["sender.test"]\n\n'
        f'[metrics]\naddress = "127.0.0.1:{metrics_port}"\n'
    )

    def factor(source: str) -> float:
        return metric(metrics_port, "tachymail_shaping_rate_factor", rule="dest", source=source)

    reply = "127.0.0.2@rcpt=451 4.7.0 please slow down"
    with (
        recording_sink(tmp_path, "--reply-for", reply) as sink,
        running_server(tmp_path, config(sink.port, extra), hold=False, roles=("mx",)) as srv,
    ):
        send(srv.port, 6)
        wait_until(lambda: factor("ip2") == 0.2, timeout=30)
        assert "shaping reaction slow-down: rate of dest from ip2 x0.20 for 4s" in srv.log()
        # ip3's budget is its own: untouched
        assert factor("ip3") in (0.0, 1.0)
        wait_until(lambda: factor("ip2") == 1.0, timeout=30)
        wait_until(lambda: "shaping reaction slow-down lifted" in srv.log(), timeout=10)
        sink.wait_for_messages(3, timeout=30)
    assert {m["peer"] for m in sink.messages()} == {"127.0.0.3"}

"""The suppression list and destination suspensions shared through a real redis-server
(tachymail.cluster.replication, issue 14): first the replicator alone over two nodes' stores
in one process, then two real `tachymail serve` nodes with [cluster] redis set to the same
Redis: a change made on one node (HTTP API, CLI) holds on the other within seconds, also
when Redis was away while it was made."""

from __future__ import annotations

import asyncio
import json
import logging
import smtplib
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.redisserver import RedisServer, running_redis
from tests.server import Server, free_port, metric, run_cli, running_server, wait_until
from tests.smtp_peer import SmtpPeer

from tachymail.cluster.client import Cluster
from tachymail.cluster.replication import Replicator
from tachymail.config import Config
from tachymail.queue import changes
from tachymail.queue.suppression import SuppressionList, make_entry
from tachymail.queue.suspensions import Suspensions

# --- the replicator alone ------------------------------------------------------------------


class Node:
    """One node's stores and replicator, in this process (its own data directory)."""

    def __init__(self, base: Path, name: str, redis_url: str) -> None:
        config = Config()
        config.cluster.redis = redis_url
        config.cluster.node = name
        config.cluster.retry_interval = 0.2
        self.suppressions = SuppressionList(base / name)
        self.suspensions = Suspensions(base / name)
        self.cluster = Cluster(config)
        self.replicator = Replicator(
            self.cluster, {"suppression": self.suppressions, "suspensions": self.suspensions}
        )

    async def close(self) -> None:
        await self.cluster.close()
        self.suppressions.close()
        self.suspensions.close()


async def synced(*nodes: Node) -> None:
    """One complete round on each node, in order (a node whose pooled connection died with
    Redis fails one round, then reconnects after the retry interval)."""
    for node in nodes:
        deadline = time.monotonic() + 10
        while not await node.replicator.sync():
            assert time.monotonic() < deadline, "the replicator did not reach Redis"
            await asyncio.sleep(0.1)


def addresses(node: Node) -> set[str]:
    return {entry.address for entry in node.suppressions.list(limit=1000)[0]}


def test_replicator_shares_changes_newer_wins_and_refills_an_empty_redis(
    tmp_path: Path,
) -> None:
    with running_redis(tmp_path / "redis") as redis_server:

        async def scenario() -> None:
            a = Node(tmp_path, "node-a", redis_server.url)
            # Before it joined, node A had an entry: joining offers it to the cluster.
            a.suppressions.add("before@x.example", reason="old bounce")
            b = Node(tmp_path, "node-b", redis_server.url)
            try:
                assert await a.replicator.sync() and await b.replicator.sync()
                assert addresses(b) == {"before@x.example"}
                # A's later changes (add, remove, a suspension) reach B; none echo back.
                a.suppressions.add("one@x.example", reason="api")
                a.suppressions.add("two@x.example", scope="shop.example")
                a.suppressions.remove("before@x.example")
                a.suspensions.suspend("dest.example", reason="maintenance")
                with a.suppressions.env.begin() as txn:
                    assert changes.outbox_size(txn) == 3
                assert await a.replicator.sync() and await b.replicator.sync()
                with a.suppressions.env.begin() as txn:
                    assert changes.outbox_size(txn) == 0
                assert addresses(b) == {"one@x.example", "two@x.example"}
                entry = b.suppressions.get("two@x.example", "shop.example")
                assert entry is not None and entry.scope == "shop.example"
                assert b.suspensions.suspended("dest.example") is not None
                assert b.suspensions.active()["dest.example"].reason == "maintenance"
                with b.suppressions.env.begin() as txn:  # applied, not recorded again
                    assert changes.outbox_size(txn) == 0
                assert b.suppressions.count() == 2 and not b.suppressions.is_empty()

                # The newer change wins, whichever node pushes last.
                b.suppressions.add("one@x.example", reason="newer on b", now=time.time() + 5)
                a.suppressions.add("one@x.example", reason="older on a", now=time.time() - 5)
                assert await b.replicator.sync() and await a.replicator.sync()
                assert await b.replicator.sync()
                for node in (a, b):
                    got = node.suppressions.get("one@x.example")
                    assert got is not None and got.reason == "newer on b"

                # An older change of B's reaches A after A's own newer removal: A's removal
                # holds on both (A applies its own change from the stream as well).
                a.suppressions.add("three@x.example", now=time.time() - 10)
                await synced(a, b)
                b.suppressions.add("three@x.example", reason="on b", now=time.time() - 1)
                assert a.suppressions.remove("three@x.example")
                await synced(b, a, b)
                assert a.suppressions.get("three@x.example") is None
                assert b.suppressions.get("three@x.example") is None

                # B resumes the destination; A follows.
                assert b.suspensions.resume("dest.example")
                assert await b.replicator.sync() and await a.replicator.sync()
                assert a.suspensions.suspended("dest.example") is None

                # Redis away: changes wait in the outbox (counted), then drain.
                redis_server.stop()
                a.suppressions.add("offline@x.example")
                assert not await a.replicator.sync()
                with a.suppressions.env.begin() as txn:
                    assert changes.outbox_size(txn) == 1
                # Redis comes back EMPTY: the nodes offer their copies again.
                redis_server.start()
                await synced(a, b)
                assert "offline@x.example" in addresses(b)
                # A third node that joins now loads the whole list from the refilled Redis.
                c = Node(tmp_path, "node-c", redis_server.url)
                try:
                    await synced(c)
                    assert addresses(c) == addresses(a) == addresses(b)
                    assert c.suppressions.get("one@x.example").reason == "newer on b"  # type: ignore[union-attr]
                finally:
                    await c.close()
            finally:
                await a.close()
                await b.close()

        asyncio.run(scenario())


def test_a_node_behind_the_trimmed_stream_loads_the_hash(tmp_path: Path) -> None:
    import tachymail.cluster.replication as replication

    with running_redis(tmp_path / "redis") as redis_server:

        async def scenario() -> None:
            a = Node(tmp_path, "node-a", redis_server.url)
            b = Node(tmp_path, "node-b", redis_server.url)
            saved = replication.STREAM_MAX
            replication.STREAM_MAX = 10  # a short stream: B falls behind it
            try:
                assert await a.replicator.sync() and await b.replicator.sync()
                # 6 rounds of 100 additions and 1 removal: the stream keeps far fewer.
                for start in range(0, 600, 100):
                    a.suppressions.add_many(
                        make_entry(f"u{i}@bulk.example", source="import")
                        for i in range(start, start + 100)
                    )
                    a.suppressions.remove(f"u{start}@bulk.example")
                    assert await a.replicator.sync()
                stream = a.cluster.key("list", "suppression", "changes")
                assert int(redis_server.command("XLEN", stream)[1:].split(b"\r\n")[0]) < 606
                assert await b.replicator.sync()
                assert addresses(b) == addresses(a)
                assert len(addresses(b)) == 6 * 99
            finally:
                replication.STREAM_MAX = saved
                await a.close()
                await b.close()

        asyncio.run(scenario())


def test_a_node_that_was_down_catches_up_from_its_last_stream_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with running_redis(tmp_path / "redis") as redis_server:

        async def scenario() -> None:
            a = Node(tmp_path, "node-a", redis_server.url)
            b = Node(tmp_path, "node-b", redis_server.url)
            try:
                a.suppressions.add("early@x.example")
                await synced(a, b, a, b)
                await b.close()  # node B is down
                a.suppressions.add("late@x.example")
                a.suspensions.suspend("late.example", until=time.time() + 3600)
                await synced(a)
                caplog.clear()
                b = Node(tmp_path, "node-b", redis_server.url)  # and back, same data
                await synced(b)
                assert addresses(b) == {"early@x.example", "late@x.example"}
                assert b.suspensions.suspended("late.example") is not None
                # It went on from where it stood: no load of the whole list.
                assert "loaded the shared" not in caplog.text
            finally:
                await a.close()
                await b.close()

        with caplog.at_level(logging.INFO, logger="tachymail.cluster.replication"):
            asyncio.run(scenario())


def test_malformed_records_in_redis_are_skipped_not_fatal(tmp_path: Path) -> None:
    with running_redis(tmp_path / "redis") as redis_server:

        async def scenario() -> None:
            a = Node(tmp_path, "node-a", redis_server.url)
            b = Node(tmp_path, "node-b", redis_server.url)
            try:
                await synced(a, b)
                hash_key = a.cluster.key("list", "suppression")
                stream = a.cluster.key("list", "suppression", "changes")
                # Someone wrote by hand: a record that is no JSON, stream entries that are
                # no changes.
                redis_server.command("HSET", hash_key, "global\x00x@y.example", "not json")
                redis_server.command("XADD", stream, "*", "k", "global\x00z@y.example",
                                     "d", "{", "n", "elsewhere")  # fmt: skip
                redis_server.command("XADD", stream, "*", "junk", "1")
                a.suppressions.add("x@y.example", reason="real")
                await synced(a, b)
                got = b.suppressions.get("x@y.example")
                assert got is not None and got.reason == "real"
                assert b.suppressions.get("z@y.example") is None
                assert redis_server.command("HGET", hash_key, "global\x00x@y.example").count(
                    b"real"
                )
            finally:
                await a.close()
                await b.close()

        asyncio.run(scenario())


# --- two real nodes ---------------------------------------------------------------------------


def node_config(redis_url: str, node: str, metrics_port: int, peer_port: int) -> str:
    """A node of the cluster relaying dest.example to the test's SMTP peer."""
    return f"""
[cluster]
redis = "{redis_url}"
node = "{node}"
nodes = 2
retry_interval = 0.5

[metrics]
address = "127.0.0.1:{metrics_port}"

[[route]]
domain = "dest.example"
host = "127.0.0.1:{peer_port}"
tls = "none"

[delivery]
retry_schedule = [1]
delay_warning = 0
resolver = "127.0.0.1:9"
"""


@contextmanager
def two_nodes(
    tmp_path: Path,
) -> Iterator[tuple[RedisServer, SmtpPeer, Server, Server, dict[str, int]]]:
    """A Redis, an SMTP peer, and nodes A and B (own data directories and ports, mx and
    http listeners, metrics ports by node name) sharing that Redis; all stopped by PID."""
    metrics = {"node-a": free_port(), "node-b": free_port()}
    with ExitStack() as stack:
        redis_server = stack.enter_context(running_redis(tmp_path / "redis"))
        peer = stack.enter_context(SmtpPeer())
        peer_port = peer.port
        nodes = []
        for name in ("node-a", "node-b"):
            (tmp_path / name).mkdir()
            extra = node_config(redis_server.url, name, metrics[name], peer_port)
            nodes.append(
                stack.enter_context(
                    running_server(tmp_path / name, extra, roles=("mx", "http"), hold=False)
                )
            )
        yield redis_server, peer, nodes[0], nodes[1], metrics


def rcpt_code(port: int, rcpt_to: str) -> int:
    """The reply code to RCPT TO:<rcpt_to> in a fresh session."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("alice@sender.example")
        code, _ = client.rcpt(rcpt_to)
        return code


def api(srv: Server, method: str, path: str, bearer: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{srv.ports['http']}{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def send(port: int, rcpt_to: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(
            "alice@sender.example", [rcpt_to], f"Subject: to {rcpt_to}\r\n\r\nHello.\r\n"
        )


def test_two_nodes_share_suppressions_and_suspensions(tmp_path: Path) -> None:
    with two_nodes(tmp_path) as (_, peer, a, b, metrics):
        token = run_cli("token", "add", "ops", "--scope", "admin", data_dir=a.data_dir)
        assert rcpt_code(b.port, "gone@dest.example") == 250

        # Added through A's HTTP API: B refuses the recipient at RCPT within seconds.
        body = {"address": "Gone@dest.example", "reason": "complained"}
        added = api(a, "POST", "/api/v1/suppressions", token.strip(), body)
        assert added["added"] == 1
        wait_until(lambda: rcpt_code(b.port, "gone@dest.example") == 550, timeout=10)
        listed = json.loads(
            run_cli("suppression", "list", "--json", data_dir=b.data_dir).splitlines()[0]
        )
        assert (listed["address"], listed["reason"]) == ("gone@dest.example", "complained")

        # Removed with the CLI on B: A accepts it again.
        assert rcpt_code(a.port, "gone@dest.example") == 550
        run_cli("suppression", "del", "gone@dest.example", data_dir=b.data_dir)
        wait_until(lambda: rcpt_code(a.port, "gone@dest.example") == 250, timeout=10)

        # `queue suspend` on A holds B's deliveries to the destination.
        run_cli("queue", "suspend", "dest.example", "--reason", "test", data_dir=a.data_dir)
        suspended = {"destination": "dest.example"}
        gauge = "tachymail_destination_suspended"
        wait_until(lambda: metric(metrics["node-b"], gauge, **suspended) == 1, timeout=10)
        send(b.port, "held@dest.example")
        time.sleep(2)  # B's delivery worker has looked at it (retry_schedule is 1 s)
        assert peer.messages == []
        assert "deliveries to dest.example suspended" in b.log()
        # Resumed on A: B delivers.
        run_cli("queue", "resume", "dest.example", data_dir=a.data_dir)
        got = peer.wait_for(1)
        assert got[0].recipients == ["held@dest.example"]


def test_a_change_made_while_redis_is_down_reaches_the_other_node(tmp_path: Path) -> None:
    with two_nodes(tmp_path) as (redis_server, _, a, b, metrics):
        # Both replicators are up: a first change goes round.
        run_cli("suppression", "add", "first@dest.example", data_dir=a.data_dir)
        wait_until(lambda: rcpt_code(b.port, "first@dest.example") == 550, timeout=10)

        redis_server.stop()
        run_cli("suppression", "add", "offline@dest.example", data_dir=a.data_dir)
        # A works on: its own list refuses at once; the change waits (and is counted).
        assert rcpt_code(a.port, "offline@dest.example") == 550
        fallbacks = "tachymail_cluster_fallbacks_total"
        wait_until(lambda: metric(metrics["node-a"], fallbacks, what="replication") >= 1)
        assert rcpt_code(b.port, "offline@dest.example") == 250

        # Redis comes back (empty, as after a restart without persistence): B gets it,
        # and what both had before is still shared.
        redis_server.start()
        wait_until(lambda: rcpt_code(b.port, "offline@dest.example") == 550, timeout=15)
        assert rcpt_code(b.port, "first@dest.example") == 550
        assert "Redis lost the shared suppression list" in a.log()


def test_a_held_node_still_takes_the_clusters_suppressions(tmp_path: Path) -> None:
    """`hold` runs no delivery worker: SMTP worker 0 shares the suppression list instead."""
    with running_redis(tmp_path / "redis") as redis_server, SmtpPeer() as peer:
        (tmp_path / "held").mkdir()
        extra = node_config(redis_server.url, "held", free_port(), peer.port)
        with running_server(tmp_path / "held", extra, roles=("mx",), hold=True) as held:

            async def elsewhere() -> None:
                other = Node(tmp_path, "other", redis_server.url)
                try:
                    other.suppressions.add("far@dest.example", reason="added elsewhere")
                    await synced(other)
                finally:
                    await other.close()

            assert rcpt_code(held.port, "far@dest.example") == 250
            asyncio.run(elsewhere())
            wait_until(lambda: rcpt_code(held.port, "far@dest.example") == 550, timeout=10)

"""Delivery events and their durable outbox (tachymail.queue.events), on a real LMDB queue,
and the pieces of the webhook sender that need no network (signature, back-off), and the
``[[webhook]]`` settings."""

from __future__ import annotations

import hashlib
import hmac
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tachymail import config as cfg
from tachymail.delivery.webhooks import BACKOFF_MAX, backoff, signature
from tachymail.queue import events as ev
from tachymail.queue.envelope import Envelope, Recipient, new_queue_id
from tachymail.queue.store import QueueIdTaken, QueueStore, put_message


@pytest.fixture
def store(tmp_path: Path) -> Iterator[QueueStore]:
    opened = QueueStore(tmp_path / "queue", map_size=16 * 1024 * 1024)
    yield opened
    opened.close()


def envelope(tags: list[str] | None = None, metadata: dict[str, Any] | None = None) -> Envelope:
    return Envelope(
        new_queue_id(),
        "alice@sender.example",
        [Recipient("bob@dest.example"), Recipient("carol@dest.example")],
        arrival=time.time(),
        client_ip="192.0.2.7",
        tags=tags or [],
        metadata=metadata or {},
    )


def hooks(*specs: tuple[str, list[str]]) -> cfg.Config:
    text = "".join(
        f'[[webhook]]\nname = "{name}"\nurl = "http://127.0.0.1:9/{name}"\n'
        f"events = {orjson.dumps(wanted).decode()}\n"
        for name, wanted in specs
    )
    return cfg.from_dict(tomllib.loads(text))


def routes(config: cfg.Config) -> dict[str, frozenset[str]]:
    return {hook.key: hook.wanted for hook in config.webhooks}


def types_of(entries: list[tuple[bytes, bytes]]) -> list[str]:
    return [orjson.loads(value)["type"] for _, value in entries]


def test_an_event_has_every_field_and_takes_the_envelopes_tags_and_metadata() -> None:
    env = envelope(tags=["newsletter"], metadata={"campaign": 7})
    event = ev.make_event(
        "bounce",
        envelope=env,
        recipient="bob@dest.example",
        destination="mx.dest.example",
        remote_ip="192.0.2.9",
        code=550,
        enhanced_code="5.1.1",
        reply="550 5.1.1 no such user",
        bounce_class="invalid_recipient",
        attempt=1,
        when=1700000000.12345,
    )
    assert tuple(event) == ev.EVENT_FIELDS
    assert event["queue_id"] == env.id and event["sender"] == "alice@sender.example"
    assert event["tags"] == ["newsletter"] and event["metadata"] == {"campaign": 7}
    assert event["time"] == 1700000000.123 and event["code"] == 550
    bare = ev.make_event("suppression", recipient="x@y.example", sender="a@b.example")
    assert bare["queue_id"] == "" and bare["tags"] == [] and bare["metadata"] == {}
    assert bare["sender"] == "a@b.example"


def test_event_ids_are_unique_and_sort_by_creation() -> None:
    ids = [ev.make_event("delivery")["id"] for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)


def test_events_are_wanted_only_when_a_webhook_subscribes() -> None:
    assert not ev.events_wanted(cfg.Config(), "reception")
    config = hooks(("a", ["bounce"]), ("b", ["delivery", "bounce"]))
    assert ev.events_wanted(config, "bounce") and ev.events_wanted(config, "delivery")
    assert not ev.events_wanted(config, "reception")
    everything = hooks(("all", []))
    assert all(ev.events_wanted(everything, kind) for kind in ev.EVENT_TYPES)


def test_recorded_events_fan_out_in_order_to_the_webhooks_that_want_them(
    store: QueueStore,
) -> None:
    config = hooks(("all", []), ("bounces", ["bounce"]))
    env = envelope()
    kinds = ["reception", "transient_failure", "bounce", "delivery", "bounce"]
    store.apply([ev.record_events([ev.make_event(kind, envelope=env) for kind in kinds[:2]])])
    store.apply([ev.record_events([ev.make_event(kind, envelope=env) for kind in kinds[2:]])])
    incoming = ev.incoming(store)
    assert types_of(incoming) == kinds
    store.apply([ev.fan_out(incoming, routes(config))])
    assert ev.incoming(store) == []
    assert types_of(ev.pending(store, "all", 100)) == kinds
    assert types_of(ev.pending(store, "bounces", 100)) == ["bounce", "bounce"]
    assert ev.depth(store, "all") == 5 and ev.depth(store, "bounces") == 2
    # fanning the same page out again (a predecessor did it already) adds nothing
    store.apply([ev.fan_out(incoming, routes(config))])
    assert ev.depth(store, "all") == 5 and len(ev.pending(store, "all", 100)) == 5


def test_removal_is_per_webhook_and_pages_keep_their_order(store: QueueStore) -> None:
    config = hooks(("a", []), ("b", []))
    env = envelope()
    made = [ev.make_event("delivery", envelope=env, attempt=n) for n in range(10)]
    store.apply([ev.record_events(made)])
    store.apply([ev.fan_out(ev.incoming(store), routes(config))])
    first = ev.pending(store, "a", 4)
    assert [orjson.loads(v)["attempt"] for _, v in first] == [0, 1, 2, 3]
    store.apply([ev.remove("a", [key for key, _ in first])])
    assert [orjson.loads(v)["attempt"] for _, v in ev.pending(store, "a", 100)] == list(
        range(4, 10)
    )
    assert ev.depth(store, "a") == 6 and ev.depth(store, "b") == 10
    assert ev.outboxes(store) == {"a": 6, "b": 10}
    # removing again (a second sender during a reload) changes nothing
    store.apply([ev.remove("a", [key for key, _ in first])])
    assert ev.depth(store, "a") == 6


def test_sequence_numbers_never_go_back_even_when_the_outbox_ran_empty(
    store: QueueStore,
) -> None:
    config = hooks(("a", []))
    seen: list[bytes] = []
    for _ in range(3):
        store.apply([ev.record_events([ev.make_event("delivery") for _ in range(3)])])
        store.apply([ev.fan_out(ev.incoming(store), routes(config))])
        page = ev.pending(store, "a", 100)
        seen += [key for key, _ in page]
        store.apply([ev.remove("a", [key for key, _ in page])])
        assert ev.depth(store, "a") == 0
    assert seen == sorted(seen) and len(set(seen)) == 9


def test_events_commit_with_the_message_or_not_at_all(store: QueueStore) -> None:
    env = envelope()
    [outcome] = store.apply([ev.put_message_reported(env, b"Subject: x\r\n\r\nhi\r\n")])
    assert outcome is None
    received = [orjson.loads(v) for _, v in ev.incoming(store)]
    assert [e["recipient"] for e in received] == ["bob@dest.example", "carol@dest.example"]
    assert all(
        e["type"] == "reception" and e["queue_id"] == env.id and e["remote_ip"] == "192.0.2.7"
        for e in received
    )
    # the same queue id again: refused, and no event reports it
    [refused] = store.apply([ev.put_message_reported(env, b"other")])
    assert isinstance(refused, QueueIdTaken)
    assert len(ev.incoming(store)) == 2
    # a failing transaction takes its events with it
    with pytest.raises(RuntimeError):

        def broken(_store: QueueStore, _txn: Any) -> None:
            raise RuntimeError("boom")

        store.apply([ev.record_events([ev.make_event("delivery")]), broken])
    assert len(ev.incoming(store)) == 2
    # and a plain put_message records nothing
    store.apply([put_message(envelope(), b"x")])
    assert len(ev.incoming(store)) == 2


def test_the_signature_is_the_hmac_sha256_of_the_exact_body() -> None:
    body = b'[{"id":"1","type":"delivery"}]'
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert signature("s3cret", body) == "sha256=" + expected
    assert signature("s3cret", body + b" ") != signature("s3cret", body)


def test_backoff_doubles_from_one_second_to_five_minutes_with_jitter() -> None:
    for failures, base in [(1, 1), (2, 2), (3, 4), (6, 32)]:
        delays = [backoff(failures) for _ in range(200)]
        assert all(0.8 * base <= d <= 1.2 * base for d in delays)
        assert len(set(delays)) > 1
    assert all(backoff(n) <= BACKOFF_MAX for n in (9, 10, 50, 10_000))
    assert backoff(50) >= 0.8 * BACKOFF_MAX


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ('url = "ftp://hooks.example/x"', "webhook[0].url: must be an http:// or https://"),
        ('url = "hooks.example/x"', "webhook[0].url"),
        ('url = "http://h.example/"\nevents = ["bounce", "opened"]', "unknown event type 'opened'"),
        ('url = "http://h.example/"\nbatch_size = 0', "webhook[0].batch_size"),
        ('url = "http://h.example/"\ntimeout = 0', "webhook[0].timeout"),
        ('url = "http://h.example/"\nname = "no spaces"', "webhook[0].name"),
        ('url = "http://h.example/"\nsecret = 5', "webhook[0].secret: expected a string"),
    ],
)
def test_config_check_names_webhook_mistakes(table: str, problem: str) -> None:
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.from_dict(tomllib.loads(f"[[webhook]]\n{table}\n"))
    assert problem in str(caught.value)


def test_webhook_defaults_and_names() -> None:
    config = cfg.from_dict(
        tomllib.loads(
            '[[webhook]]\nurl = "https://hooks.example/tachymail"\nsecret = "k"\n'
            '[[webhook]]\nurl = "http://127.0.0.1:8080/"\nname = "local"\nevents = ["bounce"]\n'
        )
    )
    first, second = config.webhooks
    assert (first.batch_size, first.batch_ms, first.timeout) == (100, 1000, 10.0)
    assert first.wanted == frozenset(ev.EVENT_TYPES)
    assert first.key.startswith("webhook-") and len(first.key) == len("webhook-") + 8
    assert second.key == "local" and second.wanted == frozenset({"bounce"})
    with pytest.raises(cfg.ConfigError, match="a second webhook named"):
        cfg.from_dict(
            tomllib.loads('[[webhook]]\nurl = "http://a.example/"\n' * 2)  # same URL twice
        )
    # `config diff` never shows the HMAC key
    assert '"k"' not in cfg.changed_toml(config) and cfg.REDACTED in cfg.changed_toml(config)

"""Configuration: defaults, validation messages, and the reference page keeping up."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tachymail.config import (
    Config,
    ConfigError,
    ListenerConfig,
    PoolOverride,
    RouteConfig,
    defaults_toml,
    from_dict,
    load,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_defaults_give_the_loopback_listeners() -> None:
    config = load(None)
    assert [(x.address, x.role) for x in config.listeners] == [
        ("127.0.0.1:2525", "mx"),
        ("127.0.0.1:2587", "submission"),
        ("127.0.0.1:2465", "smtps"),
        ("127.0.0.1:2110", "pop3"),
        ("127.0.0.1:2995", "pop3s"),
        ("127.0.0.1:2143", "imap"),
        ("127.0.0.1:2993", "imaps"),
        ("127.0.0.1:2080", "http"),
    ]
    assert config.server.data_dir == "./tachymail-data"
    assert config.limits.max_command_line == 512


def test_defaults_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "defaults.toml"
    path.write_text(defaults_toml())
    assert load(path) == Config(source=str(path))


def test_every_mistake_is_reported_with_its_setting() -> None:
    with pytest.raises(ConfigError) as caught:
        from_dict(
            {
                "limits": {"max_recipients": 5, "command_timeout": -1, "nope": 1},
                "policy": {"bare_newline": "maybe", "trusted_networks": ["10.0.0.0/33"]},
                "listener": [
                    {"address": "127.0.0.1:2525", "role": "mx"},
                    {"address": "127.0.0.1:2525", "role": "mx"},
                ],
            }
        )
    text = "\n".join(caught.value.problems)
    assert "limits.max_recipients" in text
    assert "limits.command_timeout: must not be negative" in text
    assert "limits.nope: unknown setting" in text
    assert "policy.bare_newline" in text
    assert "policy.trusted_networks[0]" in text
    assert "listener[1].address: 127.0.0.1:2525 is listed twice" in text


def test_commit_modes_are_checked() -> None:
    assert Config().mailbox.commit == "thread"  # holds up under load: docs, [mailbox]
    assert Config().queue.commit == "inline"
    for section in ("queue", "mailbox"):
        for mode in ("inline", "thread"):
            assert getattr(from_dict({section: {"commit": mode}}), section).commit == mode
    assert from_dict({"queue": {"commit": "journal"}}).queue.commit == "journal"
    with pytest.raises(ConfigError) as caught:
        from_dict({"mailbox": {"commit": "journal"}})  # the queue's intake only
    with pytest.raises(ConfigError) as caught:
        from_dict({"queue": {"commit": "later"}, "mailbox": {"commit": "Thread"}})
    text = "\n".join(caught.value.problems)
    assert "queue.commit: 'later' is not inline, thread or journal" in text
    assert "mailbox.commit: 'Thread' is not inline or thread" in text


def test_every_setting_is_documented() -> None:
    docs = DOCS.read_text()
    config = Config()
    for section in (
        "server",
        "tls",
        "limits",
        "policy",
        "auth",
        "queue",
        "delivery",
        "pool",
        "dkim",
        "mailauth",
        "suppression",
        "bounce",
    ):
        assert f"## [{section}]" in docs
        for item in dataclasses.fields(getattr(config, section)):
            assert f"| `{item.name}` |" in docs, f"{section}.{item.name} is not documented"
    for table, cls in (
        ("listener", ListenerConfig),
        ("route", RouteConfig),
        ("pool_override", PoolOverride),
    ):
        assert f"## [[{table}]]" in docs
        for item in dataclasses.fields(cls):
            assert f"| `{item.name}` |" in docs, f"{table}.{item.name} is not documented"


def test_smtp_workers_default_to_the_cores_delivery_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert from_dict({}).worker_count == 7
    assert from_dict({"delivery": {"workers": 3}}).worker_count == 5
    assert from_dict({"server": {"hold": True}}).worker_count == 8, "nothing to deliver"
    assert from_dict({"server": {"workers": 4}}).worker_count == 4, "as configured"
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert from_dict({"delivery": {"workers": 2}}).worker_count == 1, "never fewer than one"


@pytest.mark.parametrize(
    ("table", "setting"),
    [
        ({"delivery": {"max_active": 0}}, "delivery.max_active"),
        ({"delivery": {"connect_timeout": 0}}, "delivery.connect_timeout"),
        ({"pool": {"initial_connections": 30, "max_connections": 20}}, "pool.initial_connections"),
        ({"pool": {"initial_connections": 0}}, "pool.initial_connections"),
        ({"pool": {"rate": -1}}, "pool.rate"),
        ({"pool": {"idle_timeout": 0}}, "pool.idle_timeout"),
        (
            {"pool_override": [{"match": "example.com", "max_connections": 2}]},
            "pool_override[0].initial_connections",
        ),
    ],
)
def test_settings_that_would_stall_delivery_are_refused(
    table: dict[str, object], setting: str
) -> None:
    """max_active = 0 used to stop delivery silently; initial above max was accepted."""
    with pytest.raises(ConfigError) as caught:
        from_dict(table)
    assert any(problem.startswith(setting) for problem in caught.value.problems), caught.value

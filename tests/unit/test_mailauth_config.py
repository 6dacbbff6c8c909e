"""The [mailauth] settings and listener.mailauth: defaults, modes, and every mistake named."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tachymail.config import (
    ConfigError,
    ListenerConfig,
    changed_toml,
    defaults_toml,
    from_dict,
)
from tachymail.mailauth.dkim import keygen


def problems(data: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as caught:
        from_dict(data)
    return "\n".join(caught.value.problems)


def test_defaults() -> None:
    settings = from_dict({}).mailauth
    assert (settings.authserv_id, settings.spf, settings.spf_reject_fail) == ("", True, False)
    assert (settings.dkim, settings.dkim_max_signatures) == (True, 5)
    assert (settings.dmarc, settings.dmarc_reject, settings.dmarc_quarantine) == (
        True,
        "reject",
        "hold",
    )
    assert (settings.dmarc_reports, settings.arc, settings.arc_seal, settings.iprev) == (
        True,
        True,
        {},
        True,
    )
    assert (settings.dnsbl_zones, settings.dnswl_zones) == ([], [])


@pytest.mark.parametrize(
    ("role", "setting", "mode"),
    [
        ("mx", "", "enforce"),
        ("submission", "", "off"),
        ("smtps", "", "off"),
        ("lmtp", "", "off"),
        ("mx", "tag", "tag"),
        ("mx", "off", "off"),
        ("submission", "enforce", "enforce"),
    ],
)
def test_listener_modes(role: str, setting: str, mode: str) -> None:
    assert ListenerConfig("127.0.0.1:2525", role, setting).mailauth_mode == mode
    config = from_dict(
        {"listener": [{"address": "127.0.0.1:2525", "role": role, "mailauth": setting}]}
    )
    assert config.listeners[0].mailauth_mode == mode


def test_every_mistake_is_named() -> None:
    text = problems(
        {
            "listener": [
                {"mailauth": "strict"},
                {"address": "127.0.0.1:2024", "role": "lmtp", "mailauth": "enforce"},
            ],
            "mailauth": {
                "authserv_id": "mx example;net",
                "dkim_max_signatures": 0,
                "dmarc_reject": "bounce",
                "dmarc_quarantine": "junk",
                "arc_seal": {"domain": "example.com", "key": "x"},
                "dnsbl_zones": ["zen.spamhaus.org", "bad..zone"],
                "dnswl_zones": [""],
            },
        }
    )
    assert (
        "listener[0].mailauth: must be \"\" (by role) or one of enforce, tag, off, got 'strict'"
        in text
    )
    assert (
        "listener[1].mailauth: the inbound checks run on SMTP listeners only "
        "(mx, submission, smtps), not on lmtp" in text
    )
    assert "mailauth.authserv_id: must be a host name or other token, got 'mx example;net'" in text
    assert "mailauth.dkim_max_signatures: must be between 1 and 50" in text
    assert 'mailauth.dmarc_reject: must be "reject", "quarantine" or "none", got \'bounce\'' in text
    assert 'mailauth.dmarc_quarantine: must be "hold" or "header", got \'junk\'' in text
    assert "mailauth.arc_seal: unknown key key (known: domain, selector)" in text
    assert "mailauth.arc_seal: needs both domain and selector" in text
    assert "mailauth.dnsbl_zones[1]: 'bad..zone' is not a DNS zone name" in text
    assert "mailauth.dnswl_zones[0]: '' is not a DNS zone name" in text
    assert "zen.spamhaus.org" not in text
    assert "mailauth.dnsbl_zones: expected" in problems({"mailauth": {"dnsbl_zones": "zen.test"}})


def test_arc_seal_key_must_exist_at_load_time(tmp_path: Path) -> None:
    data = {
        "server": {"data_dir": str(tmp_path)},
        "mailauth": {"arc_seal": {"domain": "Relay.Example", "selector": "arc1"}},
    }
    text = problems(data)
    key = tmp_path.resolve() / "dkim" / "relay.example" / "arc1.key"
    assert f"mailauth.arc_seal: key {key} does not exist" in text
    assert "tachymail dkim keygen --domain relay.example --selector arc1" in text
    keygen(tmp_path, "relay.example", "arc1")
    assert from_dict(data).mailauth.arc_seal == {"domain": "Relay.Example", "selector": "arc1"}


def test_defaults_and_diff_read_back() -> None:
    parsed = tomllib.loads(defaults_toml())
    assert parsed["mailauth"]["arc_seal"] == {}
    assert from_dict(parsed).mailauth == from_dict({}).mailauth
    changed = from_dict({"mailauth": {"dnsbl_zones": ["zen.test"], "spf_reject_fail": True}})
    diff = changed_toml(changed)
    assert "[mailauth]" in diff
    assert from_dict(tomllib.loads(diff)).mailauth == changed.mailauth

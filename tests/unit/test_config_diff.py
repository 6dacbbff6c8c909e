"""Honest defaults and `tachymail config diff` (issue 17, "Configuration")."""

from __future__ import annotations

import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tachymail.config import (
    Config,
    ServerConfig,
    changed_toml,
    default_hostname,
    from_dict,
    load,
)


def config_diff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tachymail", "config", "diff", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_default_hostname_is_fully_qualified() -> None:
    """Where getfqdn() says "localhost" (a host without a domain), the greeting must not."""
    name = ServerConfig().hostname
    assert "." in name
    assert name.split(".")[0] != "localhost"


@pytest.mark.parametrize(
    ("fqdn", "hostname", "expected"),
    [
        ("mx1.example.com", "mx1", "mx1.example.com"),
        ("localhost", "vm", "vm.localdomain"),
        ("localhost.localdomain", "mail.example.org", "mail.example.org"),
        ("vm", "vm", "vm.localdomain"),
        ("localhost", "", "localhost.localdomain"),
    ],
)
def test_the_default_hostname_falls_back_as_postfix_does(
    monkeypatch: pytest.MonkeyPatch, fqdn: str, hostname: str, expected: str
) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda name="": fqdn)
    monkeypatch.setattr(socket, "gethostname", lambda: hostname)
    assert default_hostname() == expected


def test_no_local_domain_by_default() -> None:
    """There is no local delivery yet: the default claims no domain as ours."""
    assert Config().policy.local_domains == []
    assert Config().local_delivery_domains == frozenset()


def test_diff_of_the_defaults_is_empty(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    for args in ((), ("-c", str(empty))):
        out = config_diff(*args)
        assert out.returncode == 0, out.stderr
        assert tomllib.loads(out.stdout) == {}


def test_diff_prints_only_what_differs_and_reads_back_the_same(tmp_path: Path) -> None:
    path = tmp_path / "tachymail.toml"
    path.write_text(
        "[server]\n"
        'hostname = "mx.example.com"\n'
        "workers = 0\n"  # the default, written out: not a difference
        "[limits]\n"
        "max_recipients = 500\n"
        "[policy]\n"
        'local_domains = ["example.com"]\n'
        "[delivery]\n"
        "retry_schedule = [60, 600]\n"
        'smarthost_tls = "opportunistic"\n'  # the default again
        "[auth]\n"
        'senders = { alice = ["@example.com"] }\n'
        "[[listener]]\n"
        'address = "0.0.0.0:25"\n'
        "[[route]]\n"
        'domain = "example.net"\n'
        'host = "10.0.0.5:25"\n'
        "[metrics]\n"
        'address = ""\n'
    )
    out = config_diff("-c", str(path))
    assert out.returncode == 0, out.stderr
    shown = tomllib.loads(out.stdout)
    assert shown == {
        "server": {"hostname": "mx.example.com"},
        "limits": {"max_recipients": 500},
        "policy": {"local_domains": ["example.com"]},
        "delivery": {"retry_schedule": [60, 600]},
        "auth": {"senders": {"alice": ["@example.com"]}},
        "metrics": {"address": ""},
        "listener": [{"address": "0.0.0.0:25"}],
        "route": [{"domain": "example.net", "host": "10.0.0.5:25"}],
    }
    # The diff is a configuration file of its own that means the same as the original.
    again = tmp_path / "diff.toml"
    again.write_text(out.stdout)
    original, copy = load(path), load(again)
    original.source = copy.source = ""
    assert original == copy


def test_diff_of_a_bad_file_names_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nmax_recipients = 5\n")
    out = config_diff("-c", str(bad))
    assert out.returncode == 1
    assert "limits.max_recipients" in out.stderr


def test_config_diff_hides_the_passwords_of_credentials() -> None:
    """Output that operators paste into tickets must not publish the relay's password."""
    config = from_dict(
        {
            "delivery": {"smarthost": "relay.example:587", "smarthost_auth": "bob:s3cret"},
            "route": [{"domain": "a.example", "host": "mx.a.example:25", "auth": "al:pw2"}],
        }
    )
    text = changed_toml(config)
    assert "s3cret" not in text and "pw2" not in text
    assert 'smarthost_auth = "bob:<redacted>"' in text and 'auth = "al:<redacted>"' in text

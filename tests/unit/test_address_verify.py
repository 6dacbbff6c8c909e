"""The address-verification cache, its settings and its replies (issue 17)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tachymail.config import ConfigError, from_dict
from tachymail.protocol import replies as R
from tachymail.smtp.verify import (
    DELIVERABLE,
    UNDELIVERABLE,
    UNVERIFIED,
    ProbeResult,
    VerifyCache,
)

TTLS = {DELIVERABLE: 100.0, UNDELIVERABLE: 10.0, UNVERIFIED: 0.0}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def cache(tmp_path: Path) -> VerifyCache:
    return VerifyCache(tmp_path / "verify", TTLS, clock=Clock())


def test_results_expire_after_their_kind_s_ttl(cache: VerifyCache) -> None:
    clock = cache.clock
    assert isinstance(clock, Clock)
    refused = ProbeResult(UNDELIVERABLE, "5.1.1", "host x said: 550 5.1.1 no")
    assert cache.put("a@example.net", ProbeResult(DELIVERABLE, "", "ok"))
    assert cache.put("b@example.net", refused)
    assert cache.put("c@example.net", ProbeResult(UNVERIFIED, "", "450"))  # TTL 0: not kept
    assert cache.get("b@example.net") == refused
    assert cache.get("c@example.net") is None
    clock.now += 11
    assert cache.get("b@example.net") is None
    assert cache.get("a@example.net") == ProbeResult(DELIVERABLE, "", "ok")
    assert cache.sweep() == 1  # b expired; a is kept
    clock.now += 100
    assert cache.get("a@example.net") is None
    assert cache.sweep() == 1


def test_the_domain_is_case_insensitive_the_local_part_is_not(cache: VerifyCache) -> None:
    cache.put("Bob@Example.NET", ProbeResult(DELIVERABLE, "", "ok"))
    assert cache.get("Bob@example.net") is not None
    assert cache.get("bob@example.net") is None


def test_defaults_are_valid_and_off() -> None:
    policy = from_dict({}).policy
    assert policy.verify_recipients is False
    assert policy.verify_tempfail == "defer"
    assert policy.verify_sender == ""
    assert policy.verify_positive_ttl > policy.verify_negative_ttl > policy.verify_tempfail_ttl


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("verify_timeout", 0),
        ("verify_timeout", 1000),
        ("verify_tempfail", "maybe"),
        ("verify_sender", "no-at-sign"),
        ("verify_sender", "<a@b.example>"),
        ("verify_negative_ttl", -1),
    ],
)
def test_bad_settings_are_refused(setting: str, value: object) -> None:
    with pytest.raises(ConfigError) as refused:
        from_dict({"policy": {setting: value}})
    assert any(p.startswith(f"policy.{setting}:") for p in refused.value.problems)


def test_refusals_keep_within_one_reply_line() -> None:
    detail = "host h said: 550 " + "x" * 2000
    for line in (
        R.undeliverable_recipient("a" * 64 + "@" + "d" * 200, "5.1.1", detail),
        R.unverified_recipient("someone@example.net", detail),
    ):
        assert len(line) <= 512 and line.endswith(b"\r\n") and line.count(b"\r\n") == 1
    assert R.unverified_recipient("a@b.example", "in progress") == (
        b"450 4.1.1 <a@b.example>: Recipient address rejected: unverified address: in progress\r\n"
    )

"""Shaping rules (matching, specificity, budgets, reactions) and egress choice (the pool
header, weights, warm-up caps), without a server: tests/integration/test_shaping.py runs
them against a recording sink."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from tachymail.config import from_dict
from tachymail.delivery import shaping
from tachymail.delivery.egress import DEFAULT_SOURCE, Egress, Source, pool_header

SOURCES = [
    {"name": "ip2", "address": "127.0.0.2", "ehlo_name": "ip2.example.test"},
    {"name": "ip3", "address": "127.0.0.3", "ehlo_name": "ip3.example.test"},
]


def load(tmp_path: Path, text: str, **extra: object) -> shaping.Shaping:
    path = tmp_path / "shaping.toml"
    path.write_text(text)
    config = from_dict({"shaping": {"files": [str(path)]}, "egress_source": SOURCES, **extra})
    return shaping.load(config)


def test_an_mx_suffix_makes_any_domain_hosted_there_one_budget(tmp_path: Path) -> None:
    rules = load(tmp_path, '[[rule]]\nname = "google"\nmx_suffix = ".google.com"\nrate = "10/s"\n')
    defaults = from_dict({}).pool
    hosted = rules.shape("company.test", "mx:a", ("aspmx.l.google.com",), "ip2", defaults)
    gmail = rules.shape("gmail.com", "mx:b", ("gmail-smtp-in.l.google.com",), "ip2", defaults)
    other = rules.shape("other.test", "mx:c", ("mx.other.test",), "ip2", defaults)
    # one budget for both Google destinations, per source; none for the other
    assert hosted.rate_budget == gmail.rate_budget
    assert hosted.rate_budget is not None and hosted.rate_budget.key == "google|ip2"
    assert hosted.rate == 10.0 and hosted.provider == "gmail"  # the built-in provider
    assert other.rate_budget is None and other.rate == 0.0
    from_ip3 = rules.shape("gmail.com", "mx:b", ("gmail-smtp-in.l.google.com",), "ip3", defaults)
    assert from_ip3.rate_budget is not None and from_ip3.rate_budget.key == "google|ip3"
    assert hosted.suspend_targets == ("*.google.com",)


def test_the_most_specific_rule_wins_setting_by_setting(tmp_path: Path) -> None:
    rules = load(
        tmp_path,
        "[[rule]]\nconnection_limit = 50\nretry_schedule = [600]\n\n"
        '[[rule]]\nprovider = "gmail"\nrate = "100/min"\nburst = 5\ntls = "required"\n\n'
        '[[rule]]\ndomain = "gmail.com"\nconnection_limit = 3\n\n'
        '[[rule]]\ndomain = "gmail.com"\nsource = "ip2"\nmessages_per_connection = 7\n',
    )
    defaults = from_dict({}).pool
    hosts = ("gmail-smtp-in.l.google.com",)
    from_ip2 = rules.shape("gmail.com", "mx:g", hosts, "ip2", defaults)
    from_ip3 = rules.shape("gmail.com", "mx:g", hosts, "ip3", defaults)
    # domain over provider over the built-in gmail rule (20) over the catch-all (50)
    assert from_ip2.connection_limit == from_ip3.connection_limit == 3
    assert from_ip2.limits.max_connections == 3
    assert from_ip2.rate == pytest.approx(100 / 60) and from_ip2.burst == 5
    assert from_ip2.tls == "required" and from_ip2.retry_schedule == (600,)
    assert from_ip2.limits.max_messages_per_connection == 7
    assert from_ip3.limits.max_messages_per_connection == 100  # the built-in gmail rule's
    # a catch-all rule limits each destination on its own
    a = rules.shape("a.test", "mx:a", ("mx.a.test",), "ip2", defaults)
    b = rules.shape("b.test", "mx:b", ("mx.b.test",), "ip2", defaults)
    assert a.connection_limit == b.connection_limit == 50
    assert a.connection_budget != b.connection_budget


def test_reactions_match_code_enhanced_prefix_text_and_provider(tmp_path: Path) -> None:
    rules = load(
        tmp_path,
        '[[reaction]]\nname = "mine"\ncode = 451\ntext = "slow ?down"\nprovider = "yahoo"\n'
        'action = "throttle"\nrate_factor = 0.25\nduration = "10m"\n\n'
        '[[reaction]]\nname = "any-4.7"\nenhanced = "4.7"\naction = "suspend_destination"\n'
        "duration = 60\n",
    )
    found = rules.reaction(451, "4.3.0", "please Slow Down", "yahoo")
    assert found is not None and found.name == "mine" and found.seconds == 600
    assert rules.reaction(451, "4.3.0", "please slow down", "gmail") is None
    # the operator's reactions come before the built-in ones (which also match 4.7.28)
    assert rules.reaction(421, "4.7.28", "unusual rate", "gmail").name == "any-4.7"
    assert rules.reaction(421, "4.70.1", "x", "") is None  # a prefix of parts, not of text
    builtin = load(tmp_path, "")
    assert builtin.reaction(421, "4.7.28", "x", "").action == "suspend_source"
    tss = builtin.reaction(421, "4.7.0", "[TSS04] Messages from 192.0.2.1 deferred", "yahoo")
    assert tss is not None and tss.action == "suspend_source"


def test_every_mistake_is_named_with_its_file_and_table(tmp_path: Path) -> None:
    with pytest.raises(shaping.ShapingError) as caught:
        load(
            tmp_path,
            '[[rule]]\ndomain = "a.test"\nmx_suffix = ".b.test"\n\n'
            '[[rule]]\nrate = "5/fortnight"\nburst = 0\n\n'
            '[[reaction]]\ncode = 200\naction = "throttle"\nduration = "1h"\n\n'
            '[[reaction]]\naction = "suspend_source"\nduration = "2h"\nrate_factor = 0.5\n\n'
            "[[shape]]\n",
        )
    text = str(caught.value)
    for fragment in (
        "rule[0]: give one of domain, mx_suffix and provider",
        "rule[1].rate: bad rate '5/fortnight'",
        "rule[1].burst:",
        "reaction[0].code:",
        "reaction[1]: give at least one of code, enhanced and text",
        'reaction[1].rate_factor: only for action = "throttle"',
        "shape: unknown table",
    ):
        assert fragment in text, (fragment, text)
    assert all(str(tmp_path) in line for line in caught.value.problems)


def test_pool_header_is_removed_with_its_folded_lines_and_only_from_the_header() -> None:
    message = (
        b"From: a@sender.test\r\nx-TACHYMAIL-pool: warm\r\n\tcontinued\r\n"
        b"Subject: hi\r\n\r\nX-Tachymail-Pool: stays in the body\r\n"
    )
    name, stripped = pool_header(message)
    assert name == "warm"
    assert stripped == (
        b"From: a@sender.test\r\nSubject: hi\r\n\r\nX-Tachymail-Pool: stays in the body\r\n"
    )
    plain = b"Subject: x\r\nX-Other-Pool: no\r\n\r\nbody\r\n"
    assert pool_header(plain) == ("", plain)


def _egress(tmp_path: Path, **source: object) -> Egress:
    config = from_dict(
        {
            "server": {"data_dir": str(tmp_path)},
            "egress_source": [SOURCES[0], {**SOURCES[1], **source}],
            "egress_pool": [
                {
                    "name": "mixed",
                    "sources": [{"name": "ip2", "weight": 3}, {"name": "ip3", "weight": 1}],
                    "sender_domains": ["news.test"],
                }
            ],
        }
    )
    return Egress(config, index=0, workers=2)


def test_weights_interleave_and_unusable_sources_are_skipped(tmp_path: Path) -> None:
    egress = _egress(tmp_path)
    picks = [egress.pick("mixed", lambda s: True) for _ in range(8)]
    names = [p.name for p in picks if p is not None]
    assert names.count("ip2") == 6 and names.count("ip3") == 2
    assert "ip2ip2ip2ip2" not in "".join(names)  # smooth: never four in a row at 3:1
    assert {egress.pick("mixed", lambda s: s.name != "ip2").name for _ in range(3)} == {"ip3"}
    assert egress.pick("mixed", lambda s: False) is None
    assert egress.pick("default", lambda s: True) is DEFAULT_SOURCE
    assert egress.pool_of("", "Someone@NEWS.test") == "mixed"
    assert egress.pool_of("", "someone@other.test") == "default"
    assert egress.pool_of("nope", "someone@news.test") == "default"


def test_a_warm_up_cap_is_shared_by_the_workers_and_survives_a_restart(tmp_path: Path) -> None:
    today = datetime.datetime.now(datetime.UTC).date()
    start = (today - datetime.timedelta(days=1)).isoformat()
    egress = _egress(tmp_path, warmup_start=start, warmup_daily=[2, 10, 1000])
    ip3 = egress.sources["ip3"]
    assert ip3.daily_cap(today) == 10  # day 2 of the schedule
    assert ip3.daily_cap(today + datetime.timedelta(days=5)) == 0  # warm: no cap
    for _ in range(5):  # this worker's share: 10 / 2 workers
        assert not egress.capped(ip3)
        egress.sent(ip3)
    assert egress.capped(ip3)
    names = {egress.pick("mixed", lambda s: True).name for _ in range(6)}
    assert names == {"ip2"}
    egress.save()
    again = _egress(tmp_path, warmup_start=start, warmup_daily=[2, 10, 1000])
    assert again.capped(again.sources["ip3"])
    assert not Source("x").daily_cap(today)

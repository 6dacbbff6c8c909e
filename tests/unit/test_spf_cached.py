"""SPF answered from the lookups' own cache (``DnsLookups.cached``, as ``Resolver`` has):
the same results as the ordinary run, on every case of the openspf suites.

``check_spf`` first tries to evaluate both identities from the cache without waiting
(``_run_now``) and starts over on the event loop when a lookup is not cached. These tests
run every suite case three ways and ask for identical results: plain lookups (no cache),
lookups whose cache holds the whole zone (everything from the cache), and lookups whose
cache holds what was already looked up (a warming resolver: cold, then warm).
"""

from __future__ import annotations

import asyncio
import types
from typing import Any

import pytest
import yaml
from test_spf_suites import ABSENT, SUITES, zone_from_suite

from fakedns import ZoneLookups, reverse_name
from tachymail.dns import Records
from tachymail.mailauth import spf
from tachymail.mailauth.spf import check_spf

NOW = 1_700_000_000.0  # %{t} in explanations: one clock for all three runs


class WholeZoneCache(ZoneLookups):
    """Lookups whose cache answers every TXT, A, AAAA and MX question of the zone."""

    peeks = 0

    def cached(self, kind: str, name: str) -> Records | None:
        self.peeks += 1
        return self._answer(name.rstrip(".").lower(), kind)


class WarmingCache(ZoneLookups):
    """Lookups whose cache holds the answers already looked up, as a resolver's does."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: set[tuple[str, str]] = set()

    async def _lookup(self, name: str, kind: str) -> Records:
        answer = await super()._lookup(name, kind)
        self.seen.add((name.rstrip(".").lower(), kind))
        return answer

    def cached(self, kind: str, name: str) -> Records | None:
        key = (name.rstrip(".").lower(), kind)
        return self._answer(*key) if key in self.seen else None


def _scenarios() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    cases = []
    for filename in ("rfc7208-tests.yml", "rfc4408-tests.yml"):
        with (SUITES / filename).open("rb") as stream:
            for scenario in yaml.safe_load_all(stream):
                if scenario:
                    cases += [(scenario["zonedata"], t) for t in scenario["tests"].values()]
    return cases


def _check(zone: ZoneLookups, test: dict[str, Any]) -> Any:
    return asyncio.run(check_spf(zone, test["host"], test["mailfrom"], test["helo"]))


@pytest.mark.skipif(not (SUITES / "rfc7208-tests.yml").is_file(), reason=ABSENT)
def test_suites_give_the_same_results_from_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spf, "time", types.SimpleNamespace(time=lambda: NOW))
    differences = []
    from_cache = 0
    for zonedata, test in _scenarios():
        plain = _check(zone_from_suite(zonedata), test)
        whole = WholeZoneCache(zone_from_suite(zonedata).records)
        warming = WarmingCache(zone_from_suite(zonedata).records)
        cold, warm = _check(warming, test), _check(warming, test)
        for name, got in (("whole", _check(whole, test)), ("cold", cold), ("warm", warm)):
            if got != plain:
                differences.append((test.get("description"), name, got, plain))
        if whole.peeks and whole.lookups == 0:
            from_cache += 1
    assert differences == []
    assert from_cache > 100  # most cases really were answered without an await


def _bench_zone(cls: type[ZoneLookups]) -> ZoneLookups:
    return cls(
        {
            ("sender.example", "TXT"): ["v=spf1 ip4:192.0.2.0/24 mx a:%{h} -all"],
            ("sender.example", "MX"): [(10, "mx.sender.example")],
            ("mx.sender.example", "A"): ["198.51.100.7"],
            ("client.sender.example", "TXT"): ["v=spf1 a -all"],
            ("client.sender.example", "A"): ["198.51.100.7"],
            (reverse_name("198.51.100.7"), "PTR"): ["client.sender.example"],
        }
    )


def test_a_cached_check_makes_no_lookup_and_no_task() -> None:
    zone = _bench_zone(WholeZoneCache)

    async def check() -> tuple[Any, Any, int]:
        before = len(asyncio.all_tasks())
        mail, helo = await check_spf(
            zone, "198.51.100.7", "a@sender.example", "client.sender.example"
        )
        return mail, helo, len(asyncio.all_tasks()) - before

    mail, helo, tasks = asyncio.run(check())
    assert (mail.result, mail.mechanism, helo.result) == ("pass", "mx", "pass")
    assert zone.lookups == 0 and tasks == 0
    plain_mail, plain_helo = asyncio.run(
        check_spf(
            _bench_zone(ZoneLookups), "198.51.100.7", "a@sender.example", "client.sender.example"
        )
    )
    assert (mail, helo) == (plain_mail, plain_helo)


def test_an_uncached_lookup_falls_back_to_the_loop_with_the_same_result() -> None:
    zone = _bench_zone(WarmingCache)
    ip, sender, helo_name = "203.0.113.9", "a@sender.example", "client.sender.example"
    first = asyncio.run(check_spf(zone, ip, sender, helo_name))
    looked_up = zone.lookups
    again = asyncio.run(check_spf(zone, ip, sender, helo_name))
    assert first == again
    assert first[0].result == "fail" and first[0].mechanism == "-all"
    assert looked_up > 0 and zone.lookups == looked_up  # the second run: all from the cache


def test_a_bad_record_from_the_cache_is_permerror_once_parsed() -> None:
    zone = WholeZoneCache({("bad.example", "TXT"): ["v=spf1 ip4:300.1.1.1 -all"]})
    for _ in range(2):  # the second time the parsed (failed) record comes from memory
        mail, _helo = asyncio.run(check_spf(zone, "192.0.2.1", "x@bad.example", "[192.0.2.1]"))
        assert mail.result == "permerror" and "ip4" in mail.detail


class StableCache(WholeZoneCache):
    """A cache that hands out the same answer object for a name until it is refreshed, as
    the resolver's does until the answer's TTL runs out: what SPF's memo relies on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answers: dict[tuple[str, str], Records | None] = {}

    def cached(self, kind: str, name: str) -> Records | None:
        key = (kind, name.rstrip(".").lower())
        if key not in self.answers:
            self.answers[key] = super().cached(kind, name)
        return self.answers[key]

    def refresh(self, name: str, kind: str, values: list[str]) -> None:
        """New records for *name* (what a lookup after the TTL would bring)."""
        self.records[(name, kind)] = values
        self.answers.pop((kind, name), None)


@pytest.mark.skipif(not (SUITES / "rfc7208-tests.yml").is_file(), reason=ABSENT)
def test_remembered_outcomes_are_the_suites_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every case of a scenario on one cache, twice: the second round (and any case of the
    first that repeats a client and domain with another sender, HELO name or macro) is
    answered from the memo where it still holds, with the suite's results throughout."""
    monkeypatch.setattr(spf, "time", types.SimpleNamespace(time=lambda: NOW))
    differences = []
    for filename in ("rfc7208-tests.yml", "rfc4408-tests.yml"):
        with (SUITES / filename).open("rb") as stream:
            scenarios = [s for s in yaml.safe_load_all(stream) if s]
        for scenario in scenarios:
            stable = StableCache(zone_from_suite(scenario["zonedata"]).records)
            tests = list(scenario["tests"].values())
            for test in tests + tests:
                plain = _check(zone_from_suite(scenario["zonedata"]), test)
                got = _check(stable, test)
                if got != plain:
                    differences.append((test.get("description"), got, plain))
    assert differences == []


def test_a_remembered_outcome_needs_no_evaluation_and_follows_a_changed_record() -> None:
    zone = _bench_zone(StableCache)
    ip, helo_name = "198.51.100.7", "client.sender.example"
    first = asyncio.run(check_spf(zone, ip, "a@sender.example", helo_name))
    assert first[0].result == "pass" and first[0].mechanism == "mx"
    evaluated = spf._Check.evaluate
    calls = []

    async def counting(self: Any, domain: str, *, want_exp: bool) -> Any:
        calls.append(domain)
        return await evaluated(self, domain, want_exp=want_exp)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(spf._Check, "evaluate", counting)
        # another local-part: the record uses no sender macro, so the memo holds
        again = asyncio.run(check_spf(zone, ip, "b@sender.example", helo_name))
        assert calls == []
        assert again[0].result == "pass" and again[0].sender == "b@sender.example"
        # the record changes (a new answer object): evaluated again, the new result
        zone.refresh("sender.example", "TXT", ["v=spf1 -all"])
        changed = asyncio.run(check_spf(zone, ip, "b@sender.example", helo_name))
        assert calls == ["sender.example"]
        assert changed[0].result == "fail" and changed[0].mechanism == "-all"
        assert changed[1] == first[1]  # the HELO identity's records did not change


def test_a_record_with_a_sender_macro_is_remembered_per_sender() -> None:
    zone = StableCache(
        {
            ("users.example", "TXT"): ["v=spf1 exists:%{l}.allowed.users.example -all"],
            ("alice.allowed.users.example", "A"): ["127.0.0.2"],
        }
    )
    ip, helo = "192.0.2.1", "[192.0.2.1]"
    results = [
        asyncio.run(check_spf(zone, ip, sender, helo))[0].result
        for sender in ("alice@users.example", "bob@users.example") * 2
    ]
    assert results == ["pass", "fail", "pass", "fail"]

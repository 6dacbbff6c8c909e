"""The openspf SPF test suites (../shared/corpus/spf/rfc7208-tests.yml and rfc4408-tests.yml,
from pyspf 2.0.14): every case through ``check_spf``, on the suite's own DNS data served by
an in-memory zone (no network). One pytest case per suite test id.

How the suites' zone data become DNS answers (the conventions the suites' comments and
their reference driver document):

- ``SPF`` entries are type-99 records. RFC 7208 §3.1 dropped that type and we only query
  TXT, so an SPF entry is served as a TXT record exactly when the name has no TXT entry of
  its own ("auto-magic duplication of SPF to TXT records (by test suite drivers)", the
  suites' header); ``TXT: NONE`` says the name has no TXT records and stops that.
- ``TIMEOUT`` in a name's list: a lookup of a type with no record listed before it times
  out (``temperror``); the duplicated TXT records count as listed after it.
- ``CNAME`` entries: the name answers with its target's records; a CNAME loop answers like
  a server that gives up on it (a temporary failure).
- A name in the data answers NODATA for types it does not list; other names NXDOMAIN.

Every rfc4408 case whose expected result depends on type-99 records lists the RFC 7208
outcome among its acceptable results, so no case needs an exception. Where a case gives a
list of results, any of them passes (the suites' rule); an ``explanation``, when given,
must be exactly ours (the suites' driver sets the default explanation to "DEFAULT").
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from fakedns import ZoneLookups
from tachymail.mailauth.spf import check_spf

SUITES = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "spf"
ABSENT = f"SPF test suites not found at {SUITES} (they live in ../shared/corpus/spf)"
TYPES = ("TXT", "A", "AAAA", "MX", "PTR")


def _name(text: str) -> str:
    return text.lower().rstrip(".")


def _own_records(entries: list[Any]) -> dict[str, Any]:
    """One name's answers by type, before CNAMEs are followed (see the module docstring)."""
    listed: dict[str, list[Any]] = {}
    spf: list[Any] = []
    has_txt = False
    timed_out: set[str] | None = None  # the types with records listed before TIMEOUT
    cname: str | None = None
    for entry in entries:
        if entry == "TIMEOUT":
            timed_out = {t for t, values in listed.items() if values}
            continue
        for kind, value in entry.items():
            if kind == "CNAME":
                cname = _name(value)
                continue
            if kind == "TXT":
                has_txt = True
            if value == "NONE":
                continue
            if kind == "SPF":
                spf.append(value)
                continue
            if timed_out is None:  # records listed after TIMEOUT are never reached
                listed.setdefault(kind, []).append(tuple(value) if kind == "MX" else value)
    if not has_txt and spf:
        listed["TXT"] = spf if timed_out is None else []
    answers: dict[str, Any] = {}
    for kind in TYPES:
        values = listed.get(kind, [])
        answers[kind] = "TIMEOUT" if timed_out is not None and kind not in timed_out else values
    if cname is not None:
        answers["CNAME"] = cname
    return answers


def zone_from_suite(zonedata: dict[str, list[Any]]) -> ZoneLookups:
    """A ZoneLookups serving one suite scenario's ``zonedata``."""
    own = {_name(name): _own_records(entries) for name, entries in zonedata.items()}
    records: dict[tuple[str, str], Any] = {}
    for name in own:
        target, seen = name, {name}
        while "CNAME" in own.get(target, {}):
            target = own[target]["CNAME"]
            if target in seen:
                break
            seen.add(target)
        loop = "CNAME" in own.get(target, {})
        for kind in TYPES:
            if loop:
                records[(name, kind)] = "TIMEOUT"
            elif target in own:
                records[(name, kind)] = own[target][kind]
            else:
                records[(name, kind)] = "NXDOMAIN"
    return ZoneLookups(records)


def _cases(filename: str) -> list[Any]:
    path = SUITES / filename
    if not path.is_file():
        return [pytest.param(None, None, id="suite-absent", marks=pytest.mark.skip(ABSENT))]
    with path.open("rb") as stream:
        scenarios = [doc for doc in yaml.safe_load_all(stream) if doc]
    return [
        pytest.param(scenario["zonedata"], test, id=test_id)
        for scenario in scenarios
        for test_id, test in scenario["tests"].items()
    ]


def _run(zonedata: dict[str, list[Any]], test: dict[str, Any]) -> None:
    zone = zone_from_suite(zonedata)
    mail, _helo = asyncio.run(check_spf(zone, test["host"], test["mailfrom"], test["helo"]))
    expected = test["result"]
    acceptable = [expected] if isinstance(expected, str) else list(expected)
    assert mail.result in acceptable, f"{mail} (expected {expected}: {test.get('description')})"
    if "explanation" in test:
        explanation = mail.explanation or ("DEFAULT" if mail.result == "fail" else "")
        assert explanation == test["explanation"], mail


@pytest.mark.parametrize(("zonedata", "test"), _cases("rfc7208-tests.yml"))
def test_rfc7208_suite(zonedata: dict[str, list[Any]], test: dict[str, Any]) -> None:
    _run(zonedata, test)


@pytest.mark.parametrize(("zonedata", "test"), _cases("rfc4408-tests.yml"))
def test_rfc4408_suite(zonedata: dict[str, list[Any]], test: dict[str, Any]) -> None:
    _run(zonedata, test)

"""A second, independent SPF suite: the mail-auth project's SPF cases
(../shared/corpus/auth/stalwart-mail-auth/resources/spf/*.yml), through ``check_host``.

Their files are not plain YAML (keys repeat): each document is a stream of lines read in
order. ``spf:``/``exp:`` (TXT), ``a:``, ``aaaa:``, ``mx:`` and ``ptr:`` set the records of
a name (``mx: NAME IP, IP`` means MX hosts with those addresses; ``ptr: IP NAME, NAME``);
``domain:`` sets the HELO name, ``sender:`` the MAIL FROM (empty: ``postmaster@`` the HELO
name), ``ip:`` the client, and each ``expect: RESULT [EXPLANATION]`` is one case, checked
against the records as they stand at that line. Names starting ``_dns_error`` fail to
answer (``temperror``), as in that project's test resolver.

Seven cases expect what RFC 7208 forbids (that project's checker predates some of its
rules, or judges both identities at once); for those, ``RFC7208`` holds the result RFC 7208
requires, the section, and the openspf rfc7208-tests.yml case that requires it too, and
the test asserts that result instead.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fakedns import ZoneLookups
from tachymail.dns import Records
from tachymail.mailauth.spf import check_host

FOLDER = (
    Path(__file__).resolve().parents[3]
    / "shared"
    / "corpus"
    / "auth"
    / "stalwart-mail-auth"
    / "resources"
    / "spf"
)
ABSENT = f"mail-auth SPF cases not found at {FOLDER} (they live in ../shared/corpus)"


#: case id -> (the RFC 7208 result, why the case's own expectation is not it)
RFC7208: dict[str, tuple[str, str]] = {
    "all-1-1": (
        "permerror",
        "'-all ip:10.0.0.1': a syntax error anywhere is permerror, even after a match "
        "(§4.6; openspf detect-errors-anywhere)",
    ),
    "basic-5-1": (
        "permerror",
        "ten a: lookups of names that do not exist exceed the void-lookup limit of 2 "
        "(§4.6.4; openspf void-over-limit)",
    ),
    "basic-5-6": (
        "permerror",
        "an mx with 11 MX records is permerror, not its first 10 (§4.6.4; openspf mx-limit)",
    ),
    "basic-7-1": (
        "pass",
        "the case expects the HELO identity's fail to decide; check_host checks the MAIL "
        "FROM identity sender@test.org, which says +all (check_spf reports both, §2.3)",
    ),
    "exists-1-2": (
        "fail",
        "exists looks up A records even for an IPv6 client, and the name has only AAAA "
        "(§5.7; openspf exists-ip6only)",
    ),
    "ip-2-4": (
        "fail",
        "an IPv4 client never matches ip6:, not even ip6:::ffff:10.1.2.3 "
        "(§5, §5.6; openspf cidr6-0-ip4)",
    ),
    "macro-2-2": (
        "fail",
        "exists looks up A records even for an IPv6 client, and the name has only AAAA "
        "(§5.7; openspf exists-ip6only)",
    ),
}


class ErrorZone(ZoneLookups):
    """ZoneLookups where every name starting "_dns_error" fails to answer."""

    def _answer(self, text: str, kind: str) -> Records:
        if text.startswith("_dns_error"):
            return Records("temporary", detail=f"{text} {kind}: no answer (test resolver error)")
        return super()._answer(text, kind)


@dataclass
class Case:
    records: dict[tuple[str, str], Any]
    helo: str
    sender: str
    ip: str
    result: str
    explanation: str | None


@dataclass
class _State:
    records: dict[tuple[str, str], Any] = field(default_factory=dict)
    helo: str = ""
    sender: str = ""
    ip: str = ""


def _set_record(state: _State, kind: str, rest: str) -> None:
    name, _, value = rest.partition(" ")
    name = name.lower().rstrip(".")
    items = [item.strip() for item in value.split(",") if item.strip()]
    if kind in ("spf", "exp"):
        state.records[(name, "TXT")] = [value.strip()]
    elif kind in ("a", "aaaa"):
        state.records[(name, kind.upper())] = items
    elif kind == "ptr":
        reverse = ipaddress.ip_address(name).reverse_pointer
        state.records[(reverse, "PTR")] = items
    else:  # mx: one made-up host per address
        hosts = []
        for n, address in enumerate(items):
            host = f"mx{n}.{name}"
            kind = "A" if ipaddress.ip_address(address).version == 4 else "AAAA"
            state.records[(host, kind)] = [address]
            hosts.append((n, host))
        state.records[(name, "MX")] = hosts


def _cases() -> list[Any]:
    params: list[Any] = []
    for path in sorted(FOLDER.glob("*.yml")):
        for number, document in enumerate(path.read_text().split("\n---"), 1):
            state = _State()
            count = 0
            for raw in document.splitlines():
                line = raw.strip().removeprefix("- ").strip()
                key, sep, value = line.partition(":")
                if not sep or line.startswith("#"):
                    continue
                value = value.strip()
                if key in ("spf", "exp", "a", "aaaa", "mx", "ptr"):
                    _set_record(state, key, value)
                elif key == "domain":
                    state.helo = value
                elif key == "sender":
                    state.sender = value
                elif key == "ip":
                    state.ip = value
                elif key == "expect":
                    result, _, explanation = value.partition(" ")
                    count += 1
                    case = Case(
                        dict(state.records),
                        state.helo,
                        state.sender,
                        state.ip,
                        result,
                        explanation or None,
                    )
                    case_id = f"{path.stem}-{number}-{count}"
                    params.append(pytest.param(case_id, case, id=case_id))
    absent = pytest.param("", None, id="suite-absent", marks=pytest.mark.skip(ABSENT))
    return params or [absent]


@pytest.mark.parametrize(("case_id", "case"), _cases())
def test_mail_auth_spf_case(case_id: str, case: Case) -> None:
    sender = case.sender or f"postmaster@{case.helo}"
    domain = sender.rpartition("@")[2]
    zone = ErrorZone(case.records)
    result = asyncio.run(check_host(zone, case.ip, domain, sender, case.helo))
    expected, why = RFC7208.get(case_id, (case.result, ""))
    assert result.result == expected, f"{result} {why}"
    if case.explanation is not None and not why:
        assert result.explanation == case.explanation


def test_every_deviation_names_an_existing_case() -> None:
    ids = {param.values[0] for param in _cases()}
    if "" in ids:
        pytest.skip(ABSENT)
    assert set(RFC7208) <= ids

"""The ARC test suite (ValiMail arc_test_suite, ../shared/corpus/auth/arc_test_suite):
every validation case through ``verify_arc`` and every signing case through ``ArcSealer``,
with the suite's own key records served by an in-memory zone (no network).

Validation: the expected cv is the suite's ("Pass", "Fail", "None"); four cases expect an
empty cv, the suite's way of saying an earlier ARC-Seal already carries cv=fail: RFC 8617
§5.2 makes that chain "fail", which is what ``verify_arc`` says (its ``detail`` names the
seal). Signing: the suite's README fixes a standardized form of the fields, so the ARC-Seal
and ARC-Message-Signature we produce must carry exactly the expected tags, b= included
(RSA PKCS#1 v1.5 signatures are deterministic), and the ARC-Authentication-Results the
expected results; the sealed message must then validate.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import dkim
import pytest
import yaml
from dkim.util import parse_tag_value

from fakedns import ZoneLookups
from tachymail.mailauth.arc import MAX_INSTANCE, ArcSealer, verify_arc
from tachymail.mailauth.dkim import keygen

SUITE = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "auth" / "arc_test_suite"
ABSENT = f"ARC test suite not found at {SUITE} (it lives in ../shared/corpus)"


def _scenarios(name: str) -> list[dict[str, Any]]:
    path = SUITE / name
    if not path.is_file():
        return []
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _cases(name: str) -> list[Any]:
    cases = [
        pytest.param(scenario, test, id=test_id)
        for scenario in _scenarios(name)
        for test_id, test in scenario["tests"].items()
    ]
    return cases or [pytest.param(None, None, id="suite-absent", marks=pytest.mark.skip(ABSENT))]


def _zone(scenario: dict[str, Any]) -> ZoneLookups:
    records = scenario.get("txt-records") or scenario.get("txt_records") or {}
    return ZoneLookups({(name, "TXT"): [value] for name, value in records.items()})


def _crlf(text: str) -> bytes:
    return text.encode().replace(b"\n", b"\r\n")


VALIDATION = _cases("arc-draft-validation-tests.yml")
SIGNING = _cases("arc-draft-sign-tests.yml")


def test_suite_is_complete() -> None:
    """The snapshot holds what SOURCES.md says: 171 validation and 17 signing cases."""
    if not SUITE.is_dir():
        pytest.skip(ABSENT)
    assert len(VALIDATION) == 171
    assert len(SIGNING) == 17


@pytest.mark.parametrize(("scenario", "test"), VALIDATION)
def test_validation(scenario: dict[str, Any], test: dict[str, Any]) -> None:
    expected = {"Pass": "pass", "Fail": "fail", "None": "none", "": "fail"}[test["cv"]]
    result = asyncio.run(verify_arc(_zone(scenario), _crlf(test["message"])))
    assert result.result == expected, result.detail
    if test["cv"] == "":
        assert "reported failure" in result.detail  # failed by an earlier seal's cv=fail
    if expected == "none":
        assert result.instance == 0


def _consolidated(message: bytes, srv_id: str) -> tuple[bytes, str]:
    """The suite README's AR consolidation: every result of the Authentication-Results
    fields with our authserv-id, in order, one a line; and the arc= result stamped there
    (the chain status the suite says to use), "none" without one."""
    results: list[bytes] = []
    for name, value in dkim.rfc822_parse(message)[0]:
        if name.lower() != b"authentication-results":
            continue
        parts = [part.strip() for part in re.sub(rb"\s+", b" ", value).split(b";")]
        if parts[0].decode() == srv_id:
            results.extend(part for part in parts[1:] if part)
    arc = [r[4:].decode() for r in results if r.lower().startswith(b"arc=")]
    return srv_id.encode() + b"".join(b";\r\n " + r for r in results), (arc or ["none"])[0]


def _tags(value: bytes) -> dict[bytes, bytes]:
    value = re.sub(rb"\s+", b" ", value).strip()
    if not value:
        return {}
    return {k: re.sub(rb"\s+", b"", v) for k, v in parse_tag_value(value).items()}


def _fields(block: bytes) -> dict[bytes, bytes]:
    fields = {}
    for field in re.split(rb"\r\n(?![ \t])", block):
        if field:
            name, value = field.split(b":", 1)
            assert name.lower() not in fields, f"{name!r} twice"
            fields[name.lower()] = value
    return fields


@pytest.mark.parametrize(("scenario", "test"), SIGNING)
def test_signing(scenario: dict[str, Any], test: dict[str, Any], tmp_path: Path) -> None:
    key = tmp_path / "dkim" / scenario["domain"] / f"{scenario['sel']}.key"
    key.parent.mkdir(parents=True)
    key.write_text(scenario["privatekey"])
    sealer = ArcSealer(tmp_path, scenario["domain"], scenario["sel"])
    message = _crlf(test["message"])
    auth_results, chain = _consolidated(message, test["srv-id"])

    sealed = sealer.seal(
        message,
        test["srv-id"],
        auth_results,
        chain,
        now=test["t"],
        headers=test["sig-headers"].split(":"),
    )

    assert sealed.endswith(b"\r\n") or sealed == b""
    assert [line for line in sealed.split(b"\r\n") if len(line) > 998] == []
    fields = _fields(sealed)
    assert _tags(fields.get(b"arc-seal", b"")) == _tags(test["AS"].encode())
    assert _tags(fields.get(b"arc-message-signature", b"")) == _tags(test["AMS"].encode())
    aar = re.sub(rb"\s+", b" ", fields.get(b"arc-authentication-results", b"")).strip()
    assert aar == re.sub(rb"\s+", b" ", test["AAR"].encode()).strip()
    if sealed:
        assert list(fields) == [
            b"arc-seal",
            b"arc-message-signature",
            b"arc-authentication-results",
        ]
        result = asyncio.run(verify_arc(_zone(scenario), sealed + message))
        assert result.instance == int(_tags(fields[b"arc-seal"])[b"i"])
        # a seal saying cv=fail ends the chain; any other seal of ours must validate
        assert result.result == ("fail" if chain == "fail" else "pass"), result.detail


def _sealer(tmp_path: Path) -> tuple[ArcSealer, ZoneLookups]:
    scenario = next(iter(_scenarios("arc-draft-sign-tests.yml")), None)
    if scenario is None:
        pytest.skip(ABSENT)
    key = tmp_path / "dkim" / scenario["domain"] / f"{scenario['sel']}.key"
    key.parent.mkdir(parents=True)
    key.write_text(scenario["privatekey"])
    return ArcSealer(tmp_path, scenario["domain"], scenario["sel"]), _zone(scenario)


MESSAGE = (
    b"From: Alice <alice@d1.example>\r\nTo: bob@example.org\r\nSubject: hop\r\n"
    b"Date: Thu, 14 Jan 2015 15:00:01 -0800\r\nMessage-ID: <hop@d1.example>\r\n\r\nHello.\r\n"
)


def test_default_headers_chain_of_hops(tmp_path: Path) -> None:
    """Sealing hop after hop (default header choice, our folding) keeps a passing chain,
    each hop one instance higher, and a modified body breaks it."""
    sealer, zone = _sealer(tmp_path)
    message = MESSAGE
    for hop in range(1, 4):
        result = asyncio.run(verify_arc(zone, message))
        assert (result.result, result.instance) == ("none" if hop == 1 else "pass", hop - 1)
        ar = (
            b"lists.example.org; arc=%s; spf=pass smtp.mailfrom=d1.example" % result.result.encode()
        )
        sealed = sealer.seal(message, "lists.example.org", ar, result.result, now=1_700_000_000)
        assert sealed.startswith(b"ARC-Seal: ")
        assert all(len(line) <= 998 for line in sealed.split(b"\r\n"))
        message = sealed + message
    assert asyncio.run(verify_arc(zone, message)).result == "pass"
    tampered = message.replace(b"Hello.", b"Hello!")
    assert asyncio.run(verify_arc(zone, tampered)).result == "fail"


def test_no_seal_past_fifty_or_when_undecided(tmp_path: Path) -> None:
    sealer = _sealer(tmp_path)[0]
    ar = b"lists.example.org; arc=pass"
    fake_sets = b"".join(
        b"ARC-Seal: i=%d; cv=pass; a=rsa-sha256; d=x.example; s=s; b=AAAA\r\n"
        b"ARC-Message-Signature: i=%d; a=rsa-sha256; d=x.example; s=s; h=from; bh=AAAA; b=AAAA\r\n"
        b"ARC-Authentication-Results: i=%d; x.example; none\r\n" % (i, i, i)
        for i in range(MAX_INSTANCE, 0, -1)
    )
    assert sealer.seal(fake_sets + MESSAGE, "lists.example.org", ar, "pass") == b""
    assert sealer.seal(MESSAGE, "lists.example.org", ar, "temperror") == b""


def test_ed25519_key_is_refused(tmp_path: Path) -> None:
    keygen(tmp_path, "example.org", "ed", "ed25519")
    with pytest.raises(ValueError, match="rsa-sha256 only"):
        ArcSealer(tmp_path, "example.org", "ed")


def test_temporary_key_failure_is_temperror(tmp_path: Path) -> None:
    sealer = _sealer(tmp_path)[0]
    sealed = sealer.seal(MESSAGE, "lists.example.org", b"lists.example.org; arc=none", "none")
    slow = ZoneLookups({("dummy._domainkey.example.org", "TXT"): "TIMEOUT"})
    result = asyncio.run(verify_arc(slow, sealed + MESSAGE))
    assert (result.result, result.instance) == ("temperror", 1)
    gone = ZoneLookups({})
    assert asyncio.run(verify_arc(gone, sealed + MESSAGE)).result == "fail"


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\r\n\r\n",
        b"ARC-Seal: garbage\r\n\r\nbody\r\n",
        b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=; s=; b=\r\n\r\n",
        b"ARC-Seal i=1\r\n\r\n",  # no colon: an unreadable header block
        b"ARC-Authentication-Results: i=99999999999999999999; x\r\n\r\n",
    ],
)
def test_malformed_input_is_a_result(content: bytes) -> None:
    result = asyncio.run(verify_arc(ZoneLookups({}), content))
    assert result.result in ("none", "fail")


def test_arc_words_outside_field_names_are_no_chain(tmp_path: Path) -> None:
    """ "arc-" in a value (not a field name) is no ARC set: none, nothing looked up; an
    ARC field in any case, on the first line or below, is read."""
    lookups = ZoneLookups({})
    content = b"Subject: about ARC-Seal\r\nX-Note: x arc-seal\r\n" + MESSAGE
    result = asyncio.run(verify_arc(lookups, content))
    assert (result.result, result.instance, lookups.lookups) == ("none", 0, 0)
    sealer, zone = _sealer(tmp_path)
    sealed = sealer.seal(MESSAGE, "lists.example.org", b"lists.example.org; arc=none", "none")
    for variant in (sealed, sealed.replace(b"ARC-Seal:", b"arc-SEAL:")):
        for content in (variant + MESSAGE, b"Received: x\r\n" + variant + MESSAGE):
            assert asyncio.run(verify_arc(zone, content)).result == "pass"


STALWART = SUITE.parent / "stalwart-mail-auth" / "resources" / "arc"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("001.txt", "pass"),  # a real chain of one set (an IETF list via Stalwart)
        # a chain sealed with ed25519-sha256: dkimpy (RFC 8617's rsa-sha256 only) refuses it
        ("002.txt", "fail"),
    ],
)
def test_stalwart_chains(name: str, expected: str) -> None:
    path = STALWART / name
    if not path.is_file():
        pytest.skip(f"{path} not found (the corpus lives in ../shared/corpus)")
    records, _, message = path.read_bytes().partition(b"\n\n")
    zone: dict[tuple[str, str], list[str]] = {}
    for line in records.decode().splitlines():
        owner, value = line.split(" ", 1)
        zone.setdefault((owner, "TXT"), []).append(value)
    content = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    result = asyncio.run(verify_arc(ZoneLookups(zone), content))
    assert result.result == expected, result.detail
    if name == "002.txt":
        assert "ed25519-sha256" in result.detail


def test_lf_message_seals_and_validates(tmp_path: Path) -> None:
    """A message read from a file (bare LF line ends) is sealed as a verifier reads it."""
    sealer, zone = _sealer(tmp_path)
    message = MESSAGE.replace(b"\r\n", b"\n") + b"trailing  white\t space \n\n\n"
    sealed = sealer.seal(message, "lists.example.org", b"lists.example.org; arc=none", "none")
    assert asyncio.run(verify_arc(zone, sealed + message)).result == "pass"
    crlf = sealed + message.replace(b"\n", b"\r\n")
    assert asyncio.run(verify_arc(zone, crlf)).result == "pass"

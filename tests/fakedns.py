"""An in-memory zone with the five lookups of ``tachymail.mailauth.dnsapi.DnsLookups``.

For tests that run the checks on published test-suite data (no network, no dnsmasq)::

    zone = ZoneLookups({
        ("example.com", "TXT"): ["v=spf1 mx -all"],
        ("example.com", "MX"): [(10, "mail.example.com")],
        ("mail.example.com", "A"): ["192.0.2.1"],
        ("1.2.0.192.in-addr.arpa", "PTR"): ["mail.example.com"],
        ("slow.example.com", "TXT"): "TIMEOUT",
        ("gone.example.com", "A"): "NXDOMAIN",
    })
    result = await check_host(zone, "192.0.2.1", "example.com", ...)
    assert zone.lookups == 3

What it answers, so tests can rely on it:

- Keys are ``(name, type)`` with ``type`` one of ``TXT``, ``A``, ``AAAA``, ``MX``, ``PTR``;
  names are matched case-insensitively and without a final dot. PTR keys are reverse names
  (``...in-addr.arpa`` / ``...ip6.arpa``); ``ptr(address)`` computes the reverse name.
- A value list gives status ``ok`` with those values (an empty list: NODATA). TXT values
  may be ``str``, ``bytes`` or a list of strings (one record of several character-strings,
  joined, as a resolver returns them); a ``str`` is encoded as Latin-1 when it can be (so
  ``"\\x80"`` is the byte 0x80, as the SPF suites mean it), as UTF-8 otherwise. MX values
  are ``(preference, host)``.
- ``"TIMEOUT"`` gives status ``temporary`` (the DNS did not answer), ``"NXDOMAIN"`` gives
  ``nxdomain`` for that type; a name with a ``"NXDOMAIN"`` entry is NXDOMAIN for every type
  it has no entry for.
- A name present with other types only gives NODATA; an absent name gives NXDOMAIN; a name
  the DNS cannot carry (empty label, label over 63 octets, over 253 octets) gives NXDOMAIN,
  as :class:`tachymail.dns.Resolver` does.
- ``lookups`` counts every call, ``queries`` lists them as ``(name, type)`` in order;
  ``delay`` (seconds) makes each lookup sleep first, ``max_in_flight`` records how many
  ran at once (for tests that check parallel lookups).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from tachymail.dns import Records

TYPES = ("TXT", "A", "AAAA", "MX", "PTR")

ZoneValue = Sequence[Any] | str


def _key_name(name: str) -> str:
    return name.rstrip(".").lower()


def _txt_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        try:
            return value.encode("latin-1")
        except UnicodeEncodeError:
            return value.encode("utf-8")
    return b"".join(_txt_bytes(part) for part in value)


def reverse_name(address: str) -> str:
    """The reverse-zone name of an IPv4 or IPv6 address (``4.3.2.1.in-addr.arpa``)."""
    return ipaddress.ip_address(address).reverse_pointer


def _valid(name: str) -> bool:
    if not name or len(name) > 253:
        return False
    return all(0 < len(label.encode("utf-8", "surrogateescape")) <= 63 for label in name.split("."))


class ZoneLookups:
    """A DnsLookups answering from a dict (see the module docstring)."""

    def __init__(self, records: Mapping[tuple[str, str], ZoneValue], *, delay: float = 0.0) -> None:
        self.records: dict[tuple[str, str], ZoneValue] = {}
        self.names: set[str] = set()
        for (name, kind), values in records.items():
            kind = kind.upper()
            if kind not in TYPES:
                raise ValueError(f"unsupported record type {kind!r} for {name!r}")
            key = (_key_name(name), kind)
            self.records[key] = values
            self.names.add(key[0])
        self.delay = delay
        self.lookups = 0
        self.queries: list[tuple[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def txt(self, name: str) -> Records:
        return await self._lookup(name, "TXT")

    async def a(self, name: str) -> Records:
        return await self._lookup(name, "A")

    async def aaaa(self, name: str) -> Records:
        return await self._lookup(name, "AAAA")

    async def mx_records(self, name: str) -> Records:
        return await self._lookup(name, "MX")

    async def ptr(self, address: str) -> Records:
        try:
            name = reverse_name(address)
        except ValueError:
            self.lookups += 1
            self.queries.append((address, "PTR"))
            return Records("nxdomain", detail=f"{address!r} is not an IP address")
        return await self._lookup(name, "PTR")

    def count(self, name: str, kind: str) -> int:
        """How many lookups of ``name`` / ``kind`` were served."""
        return self.queries.count((_key_name(name), kind.upper()))

    async def _lookup(self, name: str, kind: str) -> Records:
        text = _key_name(name)
        self.lookups += 1
        self.queries.append((text, kind))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            else:
                await asyncio.sleep(0)  # a real lookup always yields to the loop
        finally:
            self.in_flight -= 1
        return self._answer(text, kind)

    def _answer(self, text: str, kind: str) -> Records:
        if not _valid(text):
            return Records("nxdomain", detail=f"{text!r} is not a valid domain name")
        values = self.records.get((text, kind))
        if values is None:
            if text not in self.names:
                return Records("nxdomain", detail=f"{text}: no such domain (NXDOMAIN)")
            if any(self.records.get((text, t)) == "NXDOMAIN" for t in TYPES):
                return Records("nxdomain", detail=f"{text}: no such domain (NXDOMAIN)")
            return Records("ok")
        if values == "TIMEOUT":
            return Records("temporary", detail=f"{text} {kind}: no answer (timeout)")
        if values == "NXDOMAIN":
            return Records("nxdomain", detail=f"{text}: no such domain (NXDOMAIN)")
        if isinstance(values, str):
            raise ValueError(f"{text} {kind}: expected a list, TIMEOUT or NXDOMAIN: {values!r}")
        if kind == "TXT":
            return Records("ok", tuple(_txt_bytes(v) for v in values))
        if kind == "MX":
            return Records("ok", tuple((int(p), _key_name(h)) for p, h in values))
        if kind == "PTR":
            return Records("ok", tuple(_key_name(v) for v in values))
        return Records("ok", tuple(str(v) for v in values))

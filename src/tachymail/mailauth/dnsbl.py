"""DNS block and allow lists (RFC 5782) of client addresses.

The address is looked up as ``<reversed address>.<zone>`` (octets for IPv4, nibbles for
IPv6, RFC 5782 §2.1 and §2.4) in every zone at once; a zone lists the client when it
answers an A record in ``127.0.0.0/8`` that is not one of the lists' own error codes
(:func:`is_listing`). The TXT record of the same name, when there is one, gives the reason
shown to the client and the operator.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from tachymail.mailauth.dnsapi import DnsLookups
from tachymail.mailauth.iprev import normal_ip

__all__ = ["Listing", "dnsbl", "is_listing", "query_name"]

log = logging.getLogger(__name__)

#: Spamhaus' (and others') answers that report a problem with the query, not a listing:
#: 127.255.255.252 typo in the zone, .254 query through a public resolver, .255 too many
#: queries; 127.0.0.255 is DNSWL's "over the limit"; 127.0.0.1 must never be an entry
#: (RFC 5782 §5) and is what some lists answer to blocked resolvers
_ERRORS = (
    ipaddress.IPv4Network("127.255.255.0/24"),
    ipaddress.IPv4Network("127.0.0.255/32"),
    ipaddress.IPv4Network("127.0.0.1/32"),
)
_LISTED = ipaddress.IPv4Network("127.0.0.0/8")
#: longest TXT text kept (it ends up in an SMTP reply line)
_TEXT_MAX = 200


@dataclass(frozen=True, slots=True)
class Listing:
    """The client is on ``zone``: ``codes`` are the A answers (``"127.0.0.2"``), sorted;
    ``text`` the TXT reason (printable ASCII, may be empty)."""

    zone: str
    codes: tuple[str, ...]
    text: str


def is_listing(code: str) -> bool:
    """True when an A answer means "listed" (RFC 5782 §2.3: 127.0.0.0/8), not an error code."""
    try:
        address = ipaddress.ip_address(code)
    except ValueError:
        return False
    if not isinstance(address, ipaddress.IPv4Address) or address not in _LISTED:
        return False  # a wildcarding resolver's answer, not the list's
    return not any(address in network for network in _ERRORS)


def query_name(ip: str, zone: str) -> str:
    """The name to look up for *ip* in *zone*: ``2.0.0.127.zen.example`` (IPv4, octets
    reversed), 32 reversed nibbles for IPv6; ValueError when *ip* is not an address."""
    address = normal_ip(ip)
    reverse = address.reverse_pointer.rsplit(".", 2)[0]  # less "in-addr.arpa" / "ip6.arpa"
    return f"{reverse}.{zone.strip().rstrip('.').lower()}"


async def dnsbl(dns: DnsLookups, ip: str, zones: Sequence[str]) -> list[Listing]:
    """The *zones* that list *ip*, in the order given; all looked up in parallel.

    A zone that does not answer (temporary failure), or answers nonsense, counts as not
    listing the client and is logged: a broken list must not stop mail. Never raises for
    DNS trouble; an *ip* that is not an address is listed nowhere.
    """
    try:
        names = [query_name(ip, zone) for zone in zones]
    except ValueError:
        log.warning("DNSBL: %r is not an IP address; not checked", ip)
        return []
    found = await asyncio.gather(
        *(_one(dns, name, zone) for name, zone in zip(names, zones, strict=True))
    )
    return [listing for listing in found if listing is not None]


async def _one(dns: DnsLookups, name: str, zone: str) -> Listing | None:
    answer = await dns.a(name)
    if answer.status == "temporary":
        log.warning("DNSBL %s: lookup of %s failed (%s): not listed", zone, name, answer.detail)
        return None
    codes = sorted({str(v) for v in answer.values if is_listing(str(v))})
    others = sorted({str(v) for v in answer.values} - set(codes))
    if others:
        log.warning("DNSBL %s: %s answered %s: error codes, not a listing", zone, name, others)
    if answer.status != "ok" or not codes:
        return None
    reason = await dns.txt(name)
    text = ""
    if reason.status == "ok" and reason.values:
        raw = b" ".join(bytes(v) for v in reason.values).decode("utf-8", "replace")
        text = " ".join("".join(ch if " " <= ch <= "~" else " " for ch in raw).split())
        text = text[:_TEXT_MAX]
    return Listing(zone.strip().rstrip(".").lower(), tuple(codes), text)

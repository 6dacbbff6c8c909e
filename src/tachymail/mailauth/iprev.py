"""iprev (RFC 8601 §3): the client's reverse DNS name, confirmed by a forward lookup.

The PTR names of the address are looked up, then the addresses of each name (at most
:data:`MAX_NAMES`, in parallel, A for an IPv4 client and AAAA for IPv6); the check passes
when one of them is the client's address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass

from tachymail.mailauth.dnsapi import DnsLookups, Records

__all__ = ["MAX_NAMES", "IprevResult", "check_iprev", "normal_ip"]

log = logging.getLogger(__name__)

#: PTR names whose forward lookups are made (RFC 8601 §3 leaves it to the receiver; the
#: limit keeps a hostile reverse zone from making us do a hundred lookups)
MAX_NAMES = 10


@dataclass(frozen=True, slots=True)
class IprevResult:
    """The outcome of :func:`check_iprev`.

    ``result`` is an RFC 8601 §3 keyword: ``pass`` (a PTR name maps back to the address;
    ``name`` is that name), ``fail`` (names exist, none maps back; ``name`` is the first),
    ``permerror`` (no PTR record, or not an address), ``temperror`` (the DNS did not
    answer). ``detail`` says why for the last three; ``ip`` is the address checked, in its
    normal text form (``policy.iprev`` of the Authentication-Results field).
    """

    result: str
    name: str
    detail: str = ""
    ip: str = ""


def normal_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """*ip* parsed; an IPv4-mapped IPv6 address (a dual-stack socket's peer) as IPv4.
    ValueError when it is not an address."""
    address = ipaddress.ip_address(ip.strip().removeprefix("[").removesuffix("]"))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    # a zone index ("fe80::1%eth0") says nothing to the DNS
    return ipaddress.ip_address(str(address).partition("%")[0])


async def check_iprev(dns: DnsLookups, ip: str) -> IprevResult:
    """The iprev result of the client address *ip*; never raises for DNS trouble or a
    malformed address (permerror), and makes at most ``1 + MAX_NAMES`` lookups."""
    try:
        address = normal_ip(ip)
    except ValueError:
        return IprevResult("permerror", "", f"{ip!r} is not an IP address")
    text = str(address)
    reverse = await dns.ptr(text)
    if reverse.status == "temporary":
        return IprevResult("temperror", "", f"PTR lookup of {text}: {reverse.detail}", text)
    names = [str(n).rstrip(".").lower() for n in reverse.values if n]
    if reverse.status != "ok" or not names:
        return IprevResult("permerror", "", f"no PTR record for {text}", text)
    names = list(dict.fromkeys(names))[:MAX_NAMES]
    forward = dns.a if address.version == 4 else dns.aaaa
    if len(names) == 1:  # the usual case: no task for a single lookup
        answers: list[Records] = [await forward(names[0])]
    else:
        answers = await asyncio.gather(*(forward(name) for name in names))
    for name, answer in zip(names, answers, strict=True):
        if answer.status == "ok" and any(_same(value, address) for value in answer.values):
            return IprevResult("pass", name, "", text)
    temporary = [n for n, a in zip(names, answers, strict=True) if a.status == "temporary"]
    if temporary:
        # one of the names might have mapped back: say so rather than fail
        detail = f"forward lookup of {temporary[0]} failed temporarily"
        return IprevResult("temperror", names[0], detail, text)
    kind = "A" if address.version == 4 else "AAAA"
    detail = f"no {kind} record of {', '.join(names)} is {text}"
    return IprevResult("fail", names[0], detail, text)


def _same(value: object, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return normal_ip(str(value)) == address
    except ValueError:
        return False

"""The DNS lookups every message-authentication check uses, as a Protocol.

:class:`tachymail.dns.Resolver` satisfies it (cached, async, one DNS server for the whole
process); tests give the checks an in-memory zone with the same five methods
(``tests/fakedns.py``). Each method returns a :class:`tachymail.dns.Records` and never
raises for DNS trouble: ``status`` ``"temporary"`` says the DNS could not answer now,
``"nxdomain"`` that the name does not (or cannot) exist, ``"ok"`` with empty ``values``
that the name exists without records of that type (NODATA).

An implementation may also offer ``cached(kind, name) -> Records | None`` (``kind`` "TXT",
"A", "AAAA" or "MX"): the answer its cache holds now, without a coroutine, or None. It is
not part of the protocol (in-memory zones need not have it); SPF, DMARC and the inbound
checker use it when present to skip awaits (:meth:`tachymail.dns.Resolver.cached`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from tachymail.dns import Records

__all__ = ["DnsLookups", "Peek", "Records", "peek_cache"]

#: ``DnsLookups.cached(kind, name)``, when the lookups have it: the answer from the cache
#: without a coroutine, or None (see :meth:`tachymail.dns.Resolver.cached`)
Peek = Callable[[str, str], Records | None]


class DnsLookups(Protocol):
    """Asynchronous record lookups; what SPF, DKIM, DMARC, ARC, iprev and DNSBL need.

    Names are taken as given (lower-cased, a final dot ignored); values by type: TXT, each
    record's character-strings joined, as ``bytes``; A and AAAA, address text; MX,
    ``(preference, host)``; PTR, host names without the final dot.
    """

    async def txt(self, name: str) -> Records:
        """The TXT records of *name*."""
        ...

    async def a(self, name: str) -> Records:
        """The IPv4 addresses of *name*."""
        ...

    async def aaaa(self, name: str) -> Records:
        """The IPv6 addresses of *name*."""
        ...

    async def mx_records(self, name: str) -> Records:
        """The MX records of *name* as published: no implicit MX."""
        ...

    async def ptr(self, address: str) -> Records:
        """The names of the IPv4 or IPv6 *address*, from its reverse zone."""
        ...


def peek_cache(dns: DnsLookups) -> Peek | None:
    """The lookups' own ``cached(kind, name)``, or None when they have none."""
    cached = getattr(dns, "cached", None)
    return cached if callable(cached) else None

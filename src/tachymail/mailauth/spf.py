"""SPF (RFC 7208): may this client IP send mail for this domain? On the async resolver.

:func:`check_spf` checks both identities of an SMTP session (MAIL FROM and HELO);
:func:`check_host` is the RFC's ``check_host()`` function. Both return a
:class:`SpfResult` and never raise for anything a sender or a DNS server can do: a bad
record is ``permerror``, DNS trouble ``temperror``, as the RFC says.

What callers may rely on (RFC 7208 sections in brackets):

- Only TXT records are read (type 99 "SPF" records were dropped by RFC 7208 §3.1).
  Exactly one record starting ``v=spf1`` (case-insensitive, then a space or the end)
  must exist, or the result is ``permerror``; none gives ``none`` (§4.5). TXT records
  that are not SPF records may hold anything; an SPF record with a byte outside
  printable ASCII is a syntax error (§3.1).
- The whole record is parsed before anything is evaluated: a syntax error anywhere is
  ``permerror`` even if an earlier mechanism would have matched (§4.6). Mechanism and
  modifier names are case-insensitive; unknown modifiers are ignored once their value is
  a valid macro-string; ``redirect=`` and ``exp=`` may appear once each (§6).
- Limits (§4.6.4): at most ``max_lookups`` (10) terms that query the DNS (include, a, mx,
  ptr, exists, redirect) over the whole check including included records, at most
  ``max_void_lookups`` (2) lookups answering NXDOMAIN or no records; exceeding either is
  ``permerror``. An ``mx`` whose name has more than 10 MX records is ``permerror``; ``ptr``
  and ``%{p}`` look at the first 10 PTR names only. ``exp=`` lookups count against
  nothing. The whole check is abandoned with ``temperror`` after 20 seconds (§4.6.4).
- The A/AAAA lookups of an ``mx``'s hosts, and of the names a ``ptr`` or ``%{p}``
  validates, run in parallel; results are still taken in the order the DNS gave them,
  so the outcome is the one the RFC's sequential description gives.
- An IPv4-mapped IPv6 client (``::ffff:192.0.2.1``) is an IPv4 client (§5).
- Names the DNS cannot carry (empty label, label over 63 octets) make a mechanism not
  match without a query; a macro expansion over 253 characters loses labels on the left
  until it fits (§7.3). The checked <domain> itself must be a multi-label name with a
  valid top label, else the result is ``none`` (§4.3).
- ``explanation`` is set for ``fail`` only, from the ``exp=`` of the record that failed
  (not from included records; a redirect's target's own exp=), with its macros expanded;
  a missing, ambiguous or malformed explanation is ignored (§6.2).
- ``%{i}`` of an IPv6 client is the dot-separated nibbles with upper-case hex digits, the
  form the openspf test suites expect in explanations (the DNS does not care about case).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import dns.exception
import dns.name

from tachymail.dns import Records
from tachymail.mailauth.dnsapi import DnsLookups, Peek, peek_cache

__all__ = ["RESULTS", "SpfResult", "check_host", "check_spf", "check_spf_now"]

log = logging.getLogger(__name__)

#: every result check_host can return (RFC 7208 §2.6), as RFC 8601 keywords
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")

#: how long one check may take before it gives up with temperror (RFC 7208 §4.6.4: >= 20 s)
MAX_ELAPSED = 20.0

#: the most MX or PTR names one mechanism looks at (RFC 7208 §4.6.4)
MAX_NAMES = 10

_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MECHANISMS = frozenset(("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"))
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.\-]*)=(.*)", re.DOTALL)
_MECHANISM = re.compile(r"([A-Za-z][A-Za-z0-9]*)(.*)", re.DOTALL)
_DUAL_CIDR = re.compile(r"(?:/([0-9]+))?(?://([0-9]+))?")
_DOMAIN_AND_CIDR = re.compile(r"(.*?)(?:/([0-9]+))?(?://([0-9]+))?", re.DOTALL)
_IP4_NETWORK = re.compile(r"([0-9.]+)(?:/([0-9]+))?")
_IP6_NETWORK = re.compile(r"([0-9A-Fa-f:.]+)(?:/([0-9]+))?")
_QNUM = re.compile(r"0|[1-9][0-9]{0,2}")
_CIDR = re.compile(r"0|[1-9][0-9]*")
_TOPLABEL = re.compile(r"[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9\-]*[A-Za-z0-9]")
_MACRO_BODY = re.compile(r"([A-Za-z])([0-9]*)([rR]?)([.\-+,/_=]*)")
_DOMAIN_LETTERS = frozenset("slodiphv")
_EXP_LETTERS = _DOMAIN_LETTERS | frozenset("crt")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class SpfResult:
    """The outcome of one SPF check.

    ``result`` is one of :data:`RESULTS`; ``identity`` ``"mailfrom"`` or ``"helo"``;
    ``domain`` the domain checked (lower case, no final dot); ``sender`` the identity's
    address (``postmaster@<helo>`` when MAIL FROM is ``<>``); ``explanation`` the
    ``exp=`` text for ``fail``; ``mechanism`` the term that matched as written in the
    record (``"ip4:192.0.2.0/24"``, ``"-all"``), ``""`` when none did; ``detail`` says
    why in words (for the log and the Authentication-Results comment).
    """

    result: str
    identity: str
    domain: str
    sender: str
    explanation: str = ""
    mechanism: str = ""
    detail: str = ""


# -- errors that end a check -------------------------------------------------------------


class _PermError(Exception):
    """The published records are broken: the check's result is permerror."""


class _TempError(Exception):
    """The DNS could not answer now: the check's result is temperror."""


class _WouldWait(BaseException):
    """A lookup of a run that may not wait (:func:`_run_now`) is not in the cache.

    A BaseException, so that no ``except Exception`` on the way turns it into a result."""


# -- parsed records ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Macro:
    """One ``%{...}`` macro-expand: letter (as written), digits, reverse, delimiters."""

    letter: str
    digits: int
    reverse: bool
    delimiters: str


_Token = str | _Macro


@dataclass(frozen=True, slots=True)
class _Mechanism:
    text: str  # as written, with its qualifier
    qualifier: str
    kind: str
    domain: tuple[_Token, ...] | None  # the domain-spec, None: the current <domain>
    cidr4: int
    cidr6: int
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    # ip4/ip6 as integers (matching compares ints, not ipaddress objects): the
    # version (0 for other mechanisms), the network address and its prefix length
    version: int = 0
    net: int = 0
    prefix: int = 0


@dataclass(frozen=True, slots=True)
class _Record:
    mechanisms: tuple[_Mechanism, ...]
    redirect: tuple[_Token, ...] | None
    redirect_text: str
    exp: tuple[_Token, ...] | None


@dataclass(frozen=True, slots=True)
class _Outcome:
    result: str
    domain: str
    mechanism: str = ""
    explanation: str = ""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class _Memo:
    """An outcome computed from the lookups' cache alone, and what it was computed from:
    every answer read (kind, name, the very answer object) and the value of every macro
    that depends on more than the client and the domain (letter, value)."""

    outcome: _Outcome
    answers: tuple[tuple[str, str, Records], ...]
    macros: tuple[tuple[str, str], ...]


#: outcomes of checks made from the cache, by (lookups, client, domain, limits): a bulk
#: sender's mail comes from a few addresses with one envelope domain, and evaluating the
#: same records again costs more than checking they are still the ones in the cache
_MEMOS: OrderedDict[tuple[int, str, str, int, int], _Memo] = OrderedDict()
MEMO_SIZE = 10_000


def _is_spf_record(value: bytes) -> bool:
    """RFC 7208 §4.5: "v=spf1" (any case), then a space or the end."""
    return value[:6].lower() == b"v=spf1" and (len(value) == 6 or value[6:7] == b" ")


def _tokenize(text: str, letters: frozenset[str], *, spaces: bool = False) -> list[_Token]:
    """A macro-string (RFC 7208 §7.1) as literal strings and macros; ``_PermError`` on a
    syntax error: a "%" not starting a macro, an unknown or forbidden letter, a zero digit
    transformer, a character outside printable ASCII (and space, unless ``spaces``)."""
    return _scan(text, letters, spaces)[0]


def _scan(text: str, letters: frozenset[str], spaces: bool) -> tuple[list[_Token], int]:
    """The tokens, and where the source's last run of literal characters starts."""
    tokens: list[_Token] = []
    literal: list[str] = []
    literal_start = 0
    i = 0
    n = len(text)
    while i < n:
        char = text[i]
        if char != "%":
            if not ("!" <= char <= "~" or (spaces and char == " ")):
                raise _PermError(f"invalid character {char!r} in {text!r}")
            literal.append(char)
            i += 1
            continue
        follower = text[i + 1 : i + 2]
        if follower in ("%", "_", "-"):
            literal.append({"%": "%", "_": " ", "-": "%20"}[follower])
            i += 2
            literal_start = i
            continue
        if follower != "{":
            raise _PermError(f"'%' must start a macro in {text!r}")
        end = text.find("}", i + 2)
        match = _MACRO_BODY.fullmatch(text, i + 2, end) if end >= 0 else None
        if match is None:
            raise _PermError(f"invalid macro in {text!r}")
        letter, digits, reverse, delimiters = match.groups()
        if letter.lower() not in letters:
            raise _PermError(f"macro letter {letter!r} not allowed here: {text!r}")
        significant = digits.lstrip("0")
        if digits and not significant:
            raise _PermError(f"macro digit transformer 0 in {text!r}")
        # more parts than any name has means all of them (and int() of 5000 digits fails)
        count = 0 if not digits else int(significant) if len(significant) < 5 else 9999
        if literal:
            tokens.append("".join(literal))
            literal = []
        tokens.append(_Macro(letter, count, bool(reverse), delimiters))
        i = literal_start = end + 1
    if literal:
        tokens.append("".join(literal))
    return tokens, literal_start


def _domain_spec(text: str, term: str) -> tuple[_Token, ...]:
    """A domain-spec: a macro-string ending in a macro-expand or "." toplabel ["."]."""
    if not text:
        raise _PermError(f"empty domain in {term!r}")
    tokens, literal_start = _scan(text, _DOMAIN_LETTERS, False)
    tail = text[literal_start:]
    if tail:  # not ending in a macro-expand: the literal end must be "." toplabel ["."]
        body = tail[:-1] if tail.endswith(".") else tail
        _head, dot, top = body.rpartition(".")
        if not dot or not _TOPLABEL.fullmatch(top):
            raise _PermError(f"invalid domain {text!r} in {term!r}")
    return tuple(tokens)


def _cidr(text: str | None, limit: int, term: str) -> int:
    if text is None:
        return limit
    if not _CIDR.fullmatch(text) or int(text) > limit:
        raise _PermError(f"invalid CIDR length /{text} in {term!r}")
    return int(text)


def _parse_mechanism(term: str) -> _Mechanism:
    qualifier = "+"
    body = term
    if term[0] in _QUALIFIERS:
        qualifier, body = term[0], term[1:]
    match = _MECHANISM.fullmatch(body)
    if match is None or match[1].lower() not in _MECHANISMS:
        raise _PermError(f"unknown mechanism {term!r}")
    kind, rest = match[1].lower(), match[2]
    domain: tuple[_Token, ...] | None = None
    cidr4, cidr6 = 32, 128
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    if kind == "all":
        if rest:
            raise _PermError(f"'all' takes no argument: {term!r}")
    elif kind in ("include", "exists"):
        if not rest.startswith(":"):
            raise _PermError(f"{kind!r} needs ':domain': {term!r}")
        domain = _domain_spec(rest[1:], term)
    elif kind == "ptr":
        if rest:
            if not rest.startswith(":"):
                raise _PermError(f"invalid 'ptr' argument: {term!r}")
            domain = _domain_spec(rest[1:], term)
    elif kind in ("a", "mx"):
        if rest.startswith(":"):
            split = _DOMAIN_AND_CIDR.fullmatch(rest, 1)
            assert split is not None  # the pattern matches any text
            domain = _domain_spec(split[1], term)
            cidr4, cidr6 = _cidr(split[2], 32, term), _cidr(split[3], 128, term)
        else:
            cidrs = _DUAL_CIDR.fullmatch(rest)
            if cidrs is None:
                raise _PermError(f"invalid {kind!r} argument: {term!r}")
            cidr4, cidr6 = _cidr(cidrs[1], 32, term), _cidr(cidrs[2], 128, term)
    elif kind == "ip4":
        found = _IP4_NETWORK.fullmatch(rest, 1) if rest.startswith(":") else None
        quads = found[1].split(".") if found else []
        if found is None or len(quads) != 4 or not all(_QNUM.fullmatch(q) for q in quads):
            raise _PermError(f"invalid ip4 network: {term!r}")
        if any(int(q) > 255 for q in quads):
            raise _PermError(f"invalid ip4 network: {term!r}")
        network = ipaddress.IPv4Network(f"{found[1]}/{_cidr(found[2], 32, term)}", strict=False)
    else:  # ip6
        found = _IP6_NETWORK.fullmatch(rest, 1) if rest.startswith(":") else None
        try:
            address = ipaddress.IPv6Address(found[1]) if found else None
        except ValueError:
            address = None
        if found is None or address is None:
            raise _PermError(f"invalid ip6 network: {term!r}")
        network = ipaddress.IPv6Network(f"{address}/{_cidr(found[2], 128, term)}", strict=False)
    if network is None:
        return _Mechanism(term, qualifier, kind, domain, cidr4, cidr6, None)
    return _Mechanism(
        term,
        qualifier,
        kind,
        domain,
        cidr4,
        cidr6,
        network,
        network.version,
        int(network.network_address),
        network.prefixlen,
    )


@functools.lru_cache(maxsize=4096)
def _parsed_record(raw: bytes) -> _Record | str:
    """:func:`_parse_record` once per distinct record text: the record (immutable, so
    shared by every check), or its permerror's message."""
    try:
        return _parse_record(raw)
    except _PermError as exc:
        return str(exc)


def _parse_record(raw: bytes) -> _Record:
    """The whole record, or ``_PermError`` for its first syntax error (RFC 7208 §4.6)."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise _PermError("the record has bytes outside ASCII") from None
    mechanisms: list[_Mechanism] = []
    redirect: tuple[_Token, ...] | None = None
    redirect_text = ""
    exp: tuple[_Token, ...] | None = None
    for term in text.split(" ")[1:]:
        if not term:
            continue  # terms are separated by one or more spaces; trailing spaces are fine
        modifier = _MODIFIER.fullmatch(term)
        if modifier is None:
            mechanisms.append(_parse_mechanism(term))
            continue
        name, value = modifier[1].lower(), modifier[2]
        if name == "redirect":
            if redirect is not None:
                raise _PermError("'redirect=' appears twice")
            redirect, redirect_text = _domain_spec(value, term), term
        elif name == "exp":
            if exp is not None:
                raise _PermError("'exp=' appears twice")
            exp = _domain_spec(value, term)
        else:
            _tokenize(value, _DOMAIN_LETTERS)  # unknown modifiers: ignored, but must parse
    return _Record(tuple(mechanisms), redirect, redirect_text, exp)


# -- names and addresses -----------------------------------------------------------------


def _query_name(expanded: str) -> str | None:
    """The name to look up for a target-name, or None when the DNS cannot carry it: final
    dot dropped, left labels removed while longer than 253 characters (RFC 7208 §7.3)."""
    name = expanded[:-1] if expanded.endswith(".") else expanded
    while len(name) > 253 and "." in name:
        name = name.partition(".")[2]
    if not name or len(name) > 253:
        return None
    if any(
        not 0 < len(label.encode("utf-8", "surrogateescape")) <= 63 for label in name.split(".")
    ):
        return None
    return name


@functools.lru_cache(maxsize=4096)
def _checked_domain(domain: str) -> str | None:
    """The <domain> check_host() may look up (RFC 7208 §4.3), lower case without the final
    dot; None when it is malformed, one label, or an address literal."""
    name = domain.strip()
    name = name[:-1] if name.endswith(".") else name
    if not name.isascii():
        try:  # to A-labels the way the resolver does (IDNA 2008 with the idna package)
            name = dns.name.from_text(name).to_text(omit_final_dot=True)
        except (dns.exception.DNSException, UnicodeError, ValueError):
            return None
    name = name.lower()
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(0 < len(lb) <= 63 for lb in labels):
        return None
    if any(not ("!" <= ch <= "~") for ch in name) or not _TOPLABEL.fullmatch(labels[-1]):
        return None
    return name


@functools.lru_cache(maxsize=4096)
def _client_address(ip: str) -> Address | None:
    """The client as IPv4 or IPv6 address; an IPv4-mapped IPv6 address is IPv4 (§5)."""
    try:
        address = ipaddress.ip_address(ip.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=4096)
def _address_text(client: Address) -> str:
    return str(client)


def _addresses(records: Records) -> list[tuple[int, int]]:
    """The answer's addresses as (version, integer); values that are none are skipped."""
    out: list[tuple[int, int]] = []
    for value in records.values:
        key = _address_key(value)
        if key is not None:
            out.append(key)
    return out


@functools.lru_cache(maxsize=8192)
def _address_key(value: Any) -> tuple[int, int] | None:
    """(version, integer) of an address text; None when it is none (a resolver never gives
    such a value; a test zone might)."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    return address.version, int(address)


# -- the check ---------------------------------------------------------------------------


class _Check:
    """The state of one check_host() run: the client, the macros' values, the counters."""

    def __init__(
        self,
        dns: DnsLookups,
        client: Address,
        sender: str,
        helo: str,
        receiver: str,
        max_lookups: int,
        max_void_lookups: int,
        now: float | None,
    ) -> None:
        self.dns = dns
        self.client = client
        self.client_text = _address_text(client)
        self.ipv4 = isinstance(client, ipaddress.IPv4Address)
        self.client_key = (client.version, int(client))
        self.bits = 32 if self.ipv4 else 128
        #: the lookups' synchronous cache (Resolver.cached), None when they have none
        self.peek: Peek | None = peek_cache(dns)
        #: a run that may not wait (_run_now): a lookup the cache cannot answer ends it
        self.no_wait = False
        local, _, sender_domain = sender.rpartition("@")
        self.local = local or "postmaster"
        self.sender_domain = sender_domain
        self.sender = f"{self.local}@{sender_domain}"
        self.helo = helo
        self.receiver = receiver
        self.max_lookups = max_lookups
        self.max_void = max_void_lookups
        self.now = now
        self.lookups = 0
        self.voids = 0
        self._validated: list[str] | None = None
        #: what a run from the cache read, for its memo (_run_now): the answers, the
        #: sender-dependent macros; ``volatile`` when it read anything else (%{t}, PTR)
        self.read: list[tuple[str, str, Records]] = []
        self.macros_read: list[tuple[str, str]] = []
        self.volatile = False

    # limits

    def count_term(self, term: str) -> None:
        self.lookups += 1
        if self.lookups > self.max_lookups:
            raise _PermError(f"more than {self.max_lookups} DNS-querying terms (at {term!r})")

    def check_dns(self, records: Records, name: str, term: str) -> None:
        """temperror on DNS trouble; counts a void lookup (RFC 7208 §4.6.4)."""
        if records.status == "temporary":
            raise _TempError(f"{term}: {records.detail or name + ': DNS failure'}")
        if records.void:
            self.voids += 1
            if self.voids > self.max_void:
                raise _PermError(
                    f"more than {self.max_void} void DNS lookups (at {term!r}: {name})"
                )

    # lookups: from the cache without a coroutine when the lookups offer that

    async def lookup(self, kind: str, name: str) -> Records:
        """The *kind* ("TXT", "A", "AAAA", "MX") records of *name*."""
        if self.peek is not None:
            hit = self.peek(kind, name)
            if hit is not None:
                if self.no_wait:
                    self.read.append((kind, name, hit))
                return hit
        if self.no_wait:
            raise _WouldWait
        if kind == "TXT":
            return await self.dns.txt(name)
        if kind == "A":
            return await self.dns.a(name)
        if kind == "AAAA":
            return await self.dns.aaaa(name)
        return await self.dns.mx_records(name)

    async def ptr(self) -> Records:
        """The client's PTR records (never from the peek: rare, and keyed differently)."""
        self.volatile = True
        if self.no_wait:
            raise _WouldWait
        return await self.dns.ptr(self.client_text)

    async def address_records(self, name: str) -> Records:
        return await self.lookup("A" if self.ipv4 else "AAAA", name)

    async def all_address_records(self, names: Sequence[str]) -> list[Records]:
        """The address records of each name: all at once, or one by one from the cache in
        a run that may not wait (the same answers, read in the same order)."""
        if self.no_wait:
            return [await self.address_records(name) for name in names]
        return list(await asyncio.gather(*(self.address_records(n) for n in names)))

    # macros

    async def expand(self, tokens: Sequence[_Token], domain: str) -> str:
        parts: list[str] = []
        for token in tokens:
            if isinstance(token, str):
                parts.append(token)
                continue
            value = await self.macro_value(token.letter.lower(), domain)
            if token.delimiters:
                pieces = re.split("[" + re.escape(token.delimiters) + "]", value)
            else:
                pieces = value.split(".")
            if token.reverse:
                pieces.reverse()
            if token.digits:
                pieces = pieces[-token.digits :]
            value = ".".join(pieces)
            if token.letter.isupper():
                value = urllib.parse.quote(value, safe="")  # RFC 7208 §7.3: URL-escaped
            parts.append(value)
        return "".join(parts)

    async def macro_value(self, letter: str, domain: str) -> str:
        if letter in "slohr":
            value = self.macro_now(letter)
            self.macros_read.append((letter, value))
            return value
        if letter == "d":
            return domain
        if letter == "i":
            if self.ipv4:
                return self.client_text
            return ".".join(self.client.packed.hex().upper())
        if letter == "c":
            return self.client_text
        if letter == "v":
            return "in-addr" if self.ipv4 else "ip6"
        self.volatile = True
        if letter == "t":
            return str(int(time.time() if self.now is None else self.now))
        return await self.validated_name(domain)  # "p"

    def macro_now(self, letter: str) -> str:
        """The value of a macro (one of "slohr") that depends on the sender, the HELO name
        or the receiver, not on the client and the domain alone."""
        return _sender_macro(letter, self.sender, self.helo, self.receiver)

    async def validated_name(self, domain: str) -> str:
        """%{p} (RFC 7208 §7.3): the client's validated name, <domain> itself or one of its
        subdomains preferred; "unknown" when there is none or the DNS fails."""
        names = await self.validated_names()
        domain = domain.lower().rstrip(".")
        for name in names:
            if name == domain:
                return name
        for name in names:
            if name.endswith("." + domain):
                return name
        return names[0] if names else "unknown"

    async def validated_names(self) -> list[str]:
        """The client's validated names for %{p}, looked up once per check."""
        if self._validated is None:
            self._validated = await self.validate(await self.ptr(), None)
        return self._validated

    async def validate(self, ptr: Records, wanted: str | None) -> list[str]:
        """The names among the first 10 of ``ptr`` whose addresses include the client; with
        ``wanted``, only those that are it or under it are looked up (RFC 7208 §5.5)."""
        if ptr.status != "ok":
            return []
        names = [str(n).lower().rstrip(".") for n in ptr.values[:MAX_NAMES]]
        if wanted is not None:
            names = [n for n in names if n == wanted or n.endswith("." + wanted)]
        candidates = [n for n in names if _query_name(n) == n]
        # all at once; an address lookup that fails just skips that name (RFC 7208 §5.5)
        answers = await self.all_address_records(candidates)
        return [
            name
            for name, answer in zip(candidates, answers, strict=True)
            if answer.status == "ok" and self.client_key in _addresses(answer)
        ]

    async def target(self, tokens: Sequence[_Token] | None, domain: str) -> str | None:
        if tokens is None:
            return domain
        return _query_name(await self.expand(tokens, domain))

    # evaluation

    async def evaluate(self, domain: str, *, want_exp: bool) -> _Outcome:
        """check_host() for ``domain``; raises _PermError/_TempError, returns ``none``."""
        records = await self.lookup("TXT", domain)
        if records.status == "temporary":
            raise _TempError(f"{domain}: {records.detail or 'TXT lookup failed'}")
        if records.status == "nxdomain":
            return _Outcome("none", domain, detail=f"{domain}: no such domain")
        found = [v for v in records.values if _is_spf_record(v)]
        if not found:
            return _Outcome("none", domain, detail=f"{domain}: no SPF record")
        if len(found) > 1:
            raise _PermError(f"{domain}: {len(found)} SPF records")
        record = _parsed_record(bytes(found[0]))
        if isinstance(record, str):
            raise _PermError(f"{domain}: {record}")
        for mechanism in record.mechanisms:
            if await self.matches(mechanism, domain):
                result = _QUALIFIERS[mechanism.qualifier]
                explanation = ""
                if result == "fail" and want_exp and record.exp is not None:
                    explanation = await self.explain(record.exp, domain)
                detail = f"{domain}: {mechanism.text!r} matched {self.client_text}"
                return _Outcome(result, domain, mechanism.text, explanation, detail)
        if record.redirect is not None:
            self.count_term(record.redirect_text)
            target = await self.target(record.redirect, domain)
            if target is None:
                raise _PermError(f"{domain}: {record.redirect_text!r} names no valid domain")
            outcome = await self.evaluate(target, want_exp=want_exp)
            if outcome.result == "none":
                raise _PermError(f"{domain}: {record.redirect_text!r}: {outcome.detail}")
            return outcome
        return _Outcome(
            "neutral", domain, detail=f"{domain}: no mechanism matched {self.client_text}"
        )

    async def matches(self, mechanism: _Mechanism, domain: str) -> bool:
        kind = mechanism.kind
        if kind == "all":
            return True
        if kind in ("ip4", "ip6"):
            return mechanism.version == self.client_key[0] and self._within(
                mechanism.net, mechanism.prefix
            )
        self.count_term(mechanism.text)
        name = await self.target(mechanism.domain, domain)
        if name is None and kind == "include":
            # check_host() of a malformed domain is "none" (§4.3), which include turns into
            raise _PermError(f"{mechanism.text!r} names no valid domain")
        if name is None:
            return False  # a name no DNS query can carry matches nothing (RFC 7208 §4.8)
        if kind == "include":
            outcome = await self.evaluate(name, want_exp=False)
            if outcome.result == "none":
                raise _PermError(f"{mechanism.text!r}: {outcome.detail}")
            return outcome.result == "pass"
        if kind == "exists":
            answer = await self.lookup("A", name)
            self.check_dns(answer, name, mechanism.text)
            return bool(answer.values)
        if kind == "a":
            answer = await self.address_records(name)
            self.check_dns(answer, name, mechanism.text)
            return self.in_networks(_addresses(answer), mechanism)
        if kind == "mx":
            return await self.mx_matches(name, mechanism)
        # ptr: a PTR lookup that fails just does not match (RFC 7208 §5.5)
        ptr = await self.ptr()
        if ptr.void:
            self.check_dns(ptr, self.client_text, mechanism.text)
        return bool(await self.validate(ptr, name.lower()))

    async def mx_matches(self, name: str, mechanism: _Mechanism) -> bool:
        answer = await self.lookup("MX", name)
        self.check_dns(answer, name, mechanism.text)
        if len(answer.values) > MAX_NAMES:
            raise _PermError(f"{mechanism.text!r}: {name} has more than {MAX_NAMES} MX records")
        hosts = [host for _pref, host in answer.values if host and _query_name(host) == host]
        # all hosts at once; the answers are then read in MX order, as if one by one
        answers = await self.all_address_records(hosts)
        for host, records in zip(hosts, answers, strict=True):
            if records.status == "temporary":
                raise _TempError(f"{mechanism.text}: {records.detail or host}")
            if self.in_networks(_addresses(records), mechanism):
                return True
        return False

    def in_networks(self, addresses: list[tuple[int, int]], mechanism: _Mechanism) -> bool:
        prefix = mechanism.cidr4 if self.ipv4 else mechanism.cidr6
        version = self.client_key[0]
        return any(v == version and self._within(n, prefix) for v, n in addresses)

    def _within(self, network: int, prefix: int) -> bool:
        """Whether the client is in network/prefix (both of the client's version)."""
        shift = self.bits - prefix
        return (network >> shift) == (self.client_key[1] >> shift)

    async def explain(self, tokens: Sequence[_Token], domain: str) -> str:
        """The exp= text (RFC 7208 §6.2), or "" when there is none to give."""
        name = await self.target(tokens, domain)
        if name is None:
            return ""
        records = await self.lookup("TXT", name)
        if records.status != "ok" or len(records.values) != 1:
            return ""
        try:
            text = records.values[0].decode("ascii")
            return await self.expand(_tokenize(text, _EXP_LETTERS, spaces=True), domain)
        except (UnicodeDecodeError, _PermError):
            return ""


async def check_host(
    dns: DnsLookups,
    ip: str,
    domain: str,
    sender: str,
    helo: str,
    *,
    receiver: str = "unknown",
    identity: str = "mailfrom",
    max_lookups: int = 10,
    max_void_lookups: int = 2,
    now: float | None = None,
) -> SpfResult:
    """RFC 7208 check_host(): may ``ip`` send mail from ``sender`` for ``domain``?

    ``sender`` is the identity's address (a missing local-part becomes "postmaster");
    ``helo`` the HELO/EHLO name (for ``%{h}``); ``receiver`` this host's name (``%{r}``);
    ``now`` the time for ``%{t}`` (default: the clock). Never raises for DNS trouble or
    bad records; a ``domain`` that is malformed, single-label or an address literal, or
    an ``ip`` that is not an IP address, gives ``none``.
    """
    start = _start(
        dns, ip, domain, sender, helo, receiver, identity, max_lookups, max_void_lookups, now
    )
    if isinstance(start, SpfResult):
        return start
    return start.finish(_run_now(start.check, start.checked, ip) or await start.run())


class _Pending:
    """A check_host() whose evaluation is still to run: :meth:`run` it (or try
    :func:`_run_now` first), then :meth:`finish` its outcome into the result."""

    __slots__ = ("address_text", "check", "checked", "identity", "ip")

    def __init__(
        self, check: _Check, checked: str, identity: str, address_text: str, ip: str
    ) -> None:
        self.check = check
        self.checked = checked
        self.identity = identity
        self.address_text = address_text
        self.ip = ip

    def now(self) -> SpfResult | None:
        """The result when the lookups' cache answers every lookup, else None."""
        outcome = _run_now(self.check, self.checked, self.ip)
        return None if outcome is None else self.finish(outcome)

    async def run(self) -> _Outcome:
        return await _run(self.check, self.checked, self.ip)

    async def result(self) -> SpfResult:
        return self.finish(await self.run())

    def finish(self, outcome: _Outcome) -> SpfResult:
        return _result(outcome, self.identity, self.checked, self.address_text, self.ip)


def _result(
    outcome: _Outcome, identity: str, checked: str, address_text: str, ip: str
) -> SpfResult:
    """The SpfResult of the check of *identity* (*address_text*), domain *checked*."""
    log.debug("spf %s %s %s: %s (%s)", identity, address_text, ip, outcome.result, outcome.detail)
    return SpfResult(
        outcome.result,
        identity,
        checked,
        address_text,
        explanation=outcome.explanation,
        mechanism=outcome.mechanism,
        detail=outcome.detail,
    )


def _start(
    dns: DnsLookups,
    ip: str,
    domain: str,
    sender: str,
    helo: str,
    receiver: str,
    identity: str,
    max_lookups: int,
    max_void_lookups: int,
    now: float | None,
) -> SpfResult | _Pending:
    """check_host()'s result when no lookup is needed to know it (``none``), else the
    check to run."""
    checked = _checked_domain(domain)
    shown = checked or domain.strip().lower()
    local, at, sender_domain = sender.rpartition("@")
    address_text = f"{local or 'postmaster'}@{sender_domain}" if at else sender
    if checked is None:
        return SpfResult(
            "none", identity, shown, address_text, detail=f"{domain!r} is not a domain name"
        )
    client = _client_address(ip)
    if client is None:
        return SpfResult(
            "none", identity, checked, address_text, detail=f"{ip!r} is not an IP address"
        )
    if not at:
        sender = f"postmaster@{checked}"
        address_text = sender
    peek = peek_cache(dns)
    if peek is not None:
        key = (id(dns), _address_text(client), checked, max_lookups, max_void_lookups)
        known = _recall(peek, key, sender, helo, receiver)
        if known is not None:
            return _result(known, identity, checked, address_text, ip)
    check = _Check(dns, client, sender, helo, receiver, max_lookups, max_void_lookups, now)
    return _Pending(check, checked, identity, address_text, ip)


def _run_now(check: _Check, checked: str, ip: str) -> _Outcome | None:
    """The outcome when every lookup the check makes is answered by the lookups' cache
    (``Resolver.cached``), computed without the event loop (no coroutine is suspended, no
    task made); None when a lookup would have to wait (or there is no such cache), for
    :func:`_run` to do it all again with waiting allowed.

    The same outcome as :func:`_run`: the same evaluation reads the same answers in the same
    order (lookups :func:`_run` makes side by side are read one by one here, in the order it
    reads their answers), and nothing from the cache can take the 20 s that would end it.
    An outcome is remembered (:class:`_Memo`) and given again, without evaluating, while
    the cache still holds every answer it read and its sender-dependent macros are the same:
    the evaluation would read the same records and come to the same end.
    """
    if check.peek is None:
        return None
    key = (id(check.dns), check.client_text, checked, check.max_lookups, check.max_void)
    check.no_wait = True
    work = check.evaluate(checked, want_exp=True)
    try:
        work.send(None)
    except StopIteration as done:
        outcome: _Outcome = done.value
        if outcome.result != "temperror" and not check.volatile:
            _MEMOS[key] = _Memo(outcome, tuple(check.read), tuple(check.macros_read))
            _MEMOS.move_to_end(key)
            if len(_MEMOS) > MEMO_SIZE:
                _MEMOS.popitem(last=False)
        return outcome
    except _WouldWait:
        return None
    except Exception as exc:
        return _error_outcome(exc, checked, ip)
    else:  # it waited for something after all (not a lookup): start over on the loop
        work.close()
        return None
    finally:
        check.no_wait = check.volatile = False
        check.lookups = check.voids = 0
        check._validated = None
        check.read, check.macros_read = [], []


def _sender_macro(letter: str, sender: str, helo: str, receiver: str) -> str:
    """%{s}, %{l}, %{o}, %{h} or %{r} of a check of *sender* (its local-part "postmaster"
    when it has none)."""
    if letter == "h":
        return helo
    if letter == "r":
        return receiver
    local, _, domain = sender.rpartition("@")
    if letter == "o":
        return domain
    if letter == "l":
        return local or "postmaster"
    return f"{local or 'postmaster'}@{domain}"


def _recall(
    peek: Peek, key: tuple[int, str, str, int, int], sender: str, helo: str, receiver: str
) -> _Outcome | None:
    """The remembered outcome for *key* while it still holds: the cache gives the same
    answer objects (an answer refreshed after its TTL is a new object) and the macros it
    read have the same values."""
    memo = _MEMOS.get(key)
    if memo is None:
        return None
    for letter, value in memo.macros:
        if _sender_macro(letter, sender, helo, receiver) != value:
            return None
    for kind, name, answer in memo.answers:
        if peek(kind, name) is not answer:
            return None
    _MEMOS.move_to_end(key)
    return memo.outcome


async def _run(check: _Check, checked: str, ip: str) -> _Outcome:
    """The outcome of the check on the event loop, within :data:`MAX_ELAPSED`."""
    try:
        async with asyncio.timeout(MAX_ELAPSED):
            return await check.evaluate(checked, want_exp=True)
    except TimeoutError:
        detail = f"{checked}: no answer within {MAX_ELAPSED:g} s"
        return _Outcome("temperror", checked, detail=detail)
    except Exception as exc:
        return _error_outcome(exc, checked, ip)


def _error_outcome(exc: Exception, checked: str, ip: str) -> _Outcome:
    """The outcome of a check that ended with *exc*."""
    if isinstance(exc, _PermError):
        return _Outcome("permerror", checked, detail=str(exc))
    if isinstance(exc, _TempError):
        return _Outcome("temperror", checked, detail=str(exc))
    # a bug here must not cost the session: log it, and say "try later" (§2.6.6)
    log.error("SPF check of %s for %s failed", checked, ip, exc_info=exc)
    return _Outcome("temperror", checked, detail=f"internal error: {exc!r}")


@functools.lru_cache(maxsize=4096)
def _helo_domain(helo: str) -> str | None:
    """The HELO name when it is a domain SPF can check (not an address literal)."""
    name = helo.strip()
    if name.startswith("["):
        return None
    return _checked_domain(name)


def _identities(
    dns: DnsLookups, ip: str, mail_from: str, helo: str, receiver: str
) -> tuple[SpfResult | _Pending | None, SpfResult | _Pending]:
    """The checks of the MAIL FROM and HELO identities, each a result already or a check to
    run; the MAIL FROM one is None for the null reverse-path (it is the HELO check)."""
    address = mail_from.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    helo_name = helo.strip()
    helo_domain = _helo_domain(helo_name)
    postmaster = f"postmaster@{helo_domain or helo_name}"
    helo_check: SpfResult | _Pending
    if helo_domain is None:
        detail = f"HELO {helo_name!r} is not a domain name"
        helo_check = SpfResult("none", "helo", helo_name.lower(), postmaster, detail=detail)
    else:
        helo_check = _start(
            dns, ip, helo_domain, postmaster, helo_name, receiver, "helo", 10, 2, None
        )
    if not address:
        return None, helo_check
    domain = address.rpartition("@")[2]
    mail = _start(dns, ip, domain, address, helo_name, receiver, "mailfrom", 10, 2, None)
    return mail, helo_check


def check_spf_now(
    dns: DnsLookups, ip: str, mail_from: str, helo: str, *, receiver: str = "unknown"
) -> tuple[SpfResult, SpfResult] | None:
    """What :func:`check_spf` gives, computed without waiting, when the lookups' own cache
    (``dns.cached(kind, name)``, as :meth:`tachymail.dns.Resolver.cached`) answers every
    lookup both checks make; None when one would have to wait (or *dns* has no such
    cache): then await :func:`check_spf`. Never raises for DNS trouble or bad records."""
    mail, helo_check = _identities(dns, ip, mail_from, helo, receiver)
    helo_result = helo_check if isinstance(helo_check, SpfResult) else helo_check.now()
    if helo_result is None:
        return None
    if mail is None:
        return replace(helo_result, identity="mailfrom"), helo_result
    mail_result = mail if isinstance(mail, SpfResult) else mail.now()
    return None if mail_result is None else (mail_result, helo_result)


async def check_spf(
    dns: DnsLookups, ip: str, mail_from: str, helo: str, *, receiver: str = "unknown"
) -> tuple[SpfResult, SpfResult]:
    """Both SPF identities of an SMTP transaction: (MAIL FROM, HELO), checked in parallel.

    ``mail_from`` is the reverse-path without angle brackets (``""`` for the null
    reverse-path, which is then checked as ``postmaster@<helo>``, RFC 7208 §2.4). The HELO
    check is ``none`` when the HELO name is an address literal or not a domain name.
    A check whose every lookup the lookups' own cache answers (see :func:`check_spf_now`)
    is done without a task or a loop turn; the others run side by side on the loop.
    """
    mail, helo_check = _identities(dns, ip, mail_from, helo, receiver)
    helo_result = helo_check if isinstance(helo_check, SpfResult) else helo_check.now()
    if mail is None:
        if helo_result is None:
            assert isinstance(helo_check, _Pending)
            helo_result = await helo_check.result()
        return replace(helo_result, identity="mailfrom"), helo_result
    mail_result = mail if isinstance(mail, SpfResult) else mail.now()
    if mail_result is None and helo_result is None:
        # both wait for the DNS (neither is a SpfResult): side by side
        assert isinstance(mail, _Pending) and isinstance(helo_check, _Pending)
        mail_result, helo_result = await asyncio.gather(mail.result(), helo_check.result())
    if mail_result is None:
        assert isinstance(mail, _Pending)
        mail_result = await mail.result()
    if helo_result is None:
        assert isinstance(helo_check, _Pending)
        helo_result = await helo_check.result()
    return mail_result, helo_result

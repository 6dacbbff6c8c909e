"""DMARC (RFC 7489): the RFC5322.From domain, policy discovery, alignment and the policy.

What :func:`check_dmarc` does, so callers can rely on it:

- **Discovery** (§6.6.3): the TXT records at ``_dmarc.<From domain>``; only those that begin
  with ``v=DMARC1`` count. None there: the same at ``_dmarc.<organizational domain>``
  (when it differs). Several DMARC records at the name consulted: result ``none`` (no DMARC
  processing, §6.6.3 step 4). A temporary DNS failure at either step: ``temperror``.
- **Parsing** (§6.3): tags are ``name=value`` separated by ``;``, names case-insensitive,
  unknown tags ignored, an invalid value replaced by the tag's default. ``p`` missing or
  invalid (or an invalid ``sp``): with at least one valid ``rua`` URI the record is read as
  ``p=none``, otherwise ``permerror`` (§6.6.3 step 6, §11.2).
- **Alignment** (§3.1): SPF is aligned when SPF passed and its domain (the MAIL FROM domain,
  or the HELO's for ``<>``) matches the From domain; DKIM when any passing signature's
  ``d=`` matches. ``s`` (strict) means equal names, ``r`` (relaxed, the default) equal
  organizational domains. ``pass`` when either is aligned, else ``fail``.
- **Policy**: ``p``, or ``sp`` (when published; else ``p``) when the record came from the
  organizational domain and the From domain is a subdomain of it. The **disposition** of a
  failure is the policy for the ``pct`` per cent selected by the sampling (``rng() * 100 <
  pct``); the others get the next lower policy (reject -> quarantine -> none, §6.6.4).
  Anything but ``fail`` has disposition ``none``.
- No single From domain (no From field, several, several domains, or no domain in it):
  ``permerror`` with ``from_domain`` "" (§6.6.1: such messages are not what DMARC can judge).

Nothing here raises for bad input or DNS trouble: malformed records, headers and names come
back as ``none``, ``permerror`` or ``temperror`` results.
"""

from __future__ import annotations

import email.utils
import functools
import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.parser import HeaderParser
from email.policy import compat32
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tachymail.mailauth.dnsapi import DnsLookups, Records, peek_cache

if TYPE_CHECKING:
    from publicsuffixlist import PublicSuffixList

    from tachymail.mailauth.dkim import DkimResult, HeaderBlock
    from tachymail.mailauth.spf import SpfResult

log = logging.getLogger(__name__)

#: the DMARC policies (p=, sp=), strongest last
POLICIES = ("none", "quarantine", "reject")

# v=DMARC1 first: "v" *WSP "=" *WSP "DMARC1" (case-sensitive value, RFC 7489 §6.4 ABNF %x)
_VERSION = re.compile(rb"^[vV][ \t]*=[ \t]*DMARC1[ \t]*(?:;|$)")
# an LDH label as DNS carries it (underscore tolerated, as the resolver does)
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_TAG_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
# a Keyword URI with an optional "!size[kmgt]" limit (RFC 7489 §6.4 dmarc-uri)
_URI_SIZE = re.compile(r"!\d+[kmgtKMGT]?$")


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    """A parsed DMARC policy record, defaults filled in (RFC 7489 §6.3).

    ``sp`` is "" when the record has none (``p`` then applies to subdomains too);
    ``rua`` the valid aggregate-report URIs; ``fo`` as published ("0" by default).
    """

    p: str
    sp: str = ""
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()
    fo: str = "0"


@dataclass(frozen=True, slots=True)
class DmarcResult:
    """The DMARC verdict on one message (RFC 8601 ``dmarc=`` result keywords).

    ``result``: pass, fail, none (no record, or several), temperror (DNS), permerror (an
    invalid record, or no single From domain). ``policy``: the policy that applies (``p``,
    or ``sp`` for a subdomain; "none" when no record). ``disposition``: what the policy
    asks for this message after ``pct`` sampling ("none" unless ``result`` is fail).
    ``record_domain``: where the record was found (``_dmarc.<this>``), "" when none was.
    ``record``: the parsed record, None when none applied.
    """

    result: str
    from_domain: str
    policy: str
    disposition: str
    spf_aligned: bool
    dkim_aligned: bool
    record_domain: str = ""
    detail: str = ""
    record: DmarcRecord | None = None


@functools.cache
def _psl() -> PublicSuffixList:
    # Loading the list parses ~10k rules: once per process, on first use.
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList(accept_unknown=True)


@functools.lru_cache(maxsize=8192)
def normalize_domain(domain: str) -> str:
    """*domain* lower-case, as A-labels (IDNA), without the final dot; "" when it cannot be a
    host name (a label empty, over 63 octets or not letters, digits, hyphens; over 253
    octets in all; an address literal)."""
    text = domain.strip().rstrip(".").lower()
    if not text or text.startswith("["):
        return ""
    labels = []
    for label in text.split("."):
        if not label.isascii():
            try:
                label = label.encode("idna").decode("ascii")
            except UnicodeError:
                return ""
        if not _LABEL.fullmatch(label):
            return ""
        labels.append(label)
    name = ".".join(labels)
    return name if len(name) <= 253 else ""


@functools.lru_cache(maxsize=8192)
def organizational_domain(domain: str) -> str:
    """The Organizational Domain of *domain* (RFC 7489 §3.2): its public suffix (from the
    Public Suffix List, private section included; an unknown TLD counts as one) plus one
    label, lower-case, without the final dot. A public suffix itself, or a name that is
    not a valid domain, is returned as it is (lower-cased)."""
    name = domain.strip().rstrip(".").lower()
    if not name:
        return name
    try:
        org = _psl().privatesuffix(name)
    except (ValueError, TypeError, UnicodeError):
        return name
    return org if isinstance(org, str) and org else name


def from_domain(content: bytes, block: HeaderBlock | None = None) -> str | None:
    """The RFC5322.From domain of the message *content* (header block and body, or the
    header block alone), lower-case A-labels; None unless there is exactly one From field
    and every address in it has the same, valid domain (RFC 7489 §6.6.1). *block*: the
    header of *content*, already read (:func:`~tachymail.mailauth.dkim.read_header`)."""
    fields: list[str] | None
    try:
        if block is not None:
            # a plain block: its From field as _from_fields reads it, without a pass
            lower = block.lower
            if lower.count(b"from") != 1:
                return None
            return _field_domain(block.fields[lower.index(b"from")][1])
        else:
            end = _header_end(content)
            fields = _from_fields(content, end)
            if fields is None:
                # SMTPUTF8 headers are UTF-8; the text parser keeps them as text (bytes
                # would not)
                text = content[:end].decode("utf-8", "replace")
                fields = HeaderParser(policy=compat32).parsestr(text).get_all("From") or []
        if fields is None or len(fields) != 1:
            return None
        return _author_domain(str(fields[0]))
    except (ValueError, TypeError, IndexError, UnicodeError, AttributeError):
        return None  # the stdlib parser gives up on some malformed fields: no From domain


@functools.lru_cache(maxsize=4096)
def _field_domain(value: bytes) -> str | None:
    """:func:`_author_domain` of a From field's raw *value* (as a plain header block holds
    it: after the colon, with its line end); cached by the value, which bulk mail repeats."""
    return _author_domain(value.lstrip(b" \t").rstrip(b"\r\n").decode("utf-8", "replace"))


@functools.lru_cache(maxsize=4096)
def _author_domain(value: str) -> str | None:
    """The one domain of the From field *value* (see :func:`from_domain`); cached, as bulk
    mail repeats the same From field message after message."""
    try:
        addresses = email.utils.getaddresses([value])
    except (ValueError, TypeError, IndexError, UnicodeError, AttributeError):
        return None
    domains = set()
    for _name, address in addresses:
        if "@" not in address:
            return None
        domain = normalize_domain(address.rpartition("@")[2])
        if not domain:
            return None
        domains.add(domain)
    return domains.pop() if len(domains) == 1 else None


def _from_fields(content: bytes, end: int) -> list[str] | None:
    """The From field values of a plain header block, exactly as the stdlib parser
    (``HeaderParser``, compat32) would give them, without building a message: None when the
    block has anything the parser treats specially (an mbox "From " line, a line that is
    not a field or a continuation, a lone CR), for the caller to ask the parser itself."""
    head = content[:end]
    if not head.endswith(b"\n") or b"\r" in head.replace(b"\r\n", b""):
        return None  # no line break at the end; a lone CR (the parser breaks lines there)
    if _PLAIN_HEADER.fullmatch(head) is None:
        return None  # a continuation first, or a line that is not a field
    # compat32: the value after the colon without leading blanks, continuation lines with
    # their line breaks, the final line break removed
    return [
        found[1].lstrip(b" \t").rstrip(b"\r\n").decode("utf-8", "replace")
        for found in _FROM_FIELD.finditer(head)
    ]


# fields (a name of printable ASCII but the colon, the stdlib parser's rule) with their
# continuation lines, then the blank line; the alternatives cannot overlap (no backtracking)
_PLAIN_HEADER = re.compile(rb"(?:[\x21-\x39\x3b-\x7e]+:[^\n]*\n(?:[ \t][^\n]*\n)*)*(?:\r?\n)?")
_FROM_FIELD = re.compile(rb"^from:([^\n]*\n(?:[ \t][^\n]*\n)*)", re.IGNORECASE | re.MULTILINE)


def _header_end(content: bytes) -> int:
    """Where the header block of *content* ends (the blank line included)."""
    # The LF-only form is looked for only before the CRLF one: on a CRLF message (the usual
    # case) a search of the whole body for "\n\n" would read every octet of it.
    crlf = content.find(b"\r\n\r\n")
    lf = content.find(b"\n\n", 0, crlf + 2 if crlf >= 0 else len(content))
    ends = [i + n for i, n in ((crlf, 4), (lf, 2)) if i >= 0]
    return min(ends) if ends else len(content)


class _Invalid(Exception):
    """The record applies no DMARC processing (RFC 7489 §6.6.3 step 6): permerror."""


def is_dmarc_record(text: bytes) -> bool:
    """Whether a TXT record is a DMARC record: it begins with ``v=DMARC1``."""
    return _VERSION.match(text) is not None


def parse_record(text: bytes) -> DmarcRecord:
    """The DMARC record *text* (a TXT record that :func:`is_dmarc_record`) with defaults.

    Raises ValueError when the record gives no DMARC processing: ``p`` missing or invalid
    (or ``sp`` invalid) and no valid ``rua`` URI (RFC 7489 §6.6.3 step 6)."""
    tags: dict[str, str] = {}
    decoded = text.decode("utf-8", "replace")
    for part in decoded.split(";")[1:]:
        name, sep, value = part.partition("=")
        name = name.strip(" \t\r\n").lower()
        if not sep or not _TAG_NAME.match(name):
            continue  # a syntax error in the remainder is ignored (§6.6.3)
        tags.setdefault(name, value.strip(" \t\r\n"))  # the first of a repeated tag wins
    rua = _uris(tags.get("rua", ""))
    p = tags.get("p", "").lower()
    sp = tags.get("sp", "").lower()
    if p not in POLICIES or (sp and sp not in POLICIES):
        if not rua:
            raise ValueError("no valid p= (or an invalid sp=) and no valid rua=")
        p, sp = "none", ""  # act as if p=none was published (§6.6.3 step 6.1)
    return DmarcRecord(
        p=p,
        sp=sp,
        adkim=_alignment(tags.get("adkim", "")),
        aspf=_alignment(tags.get("aspf", "")),
        pct=_percent(tags.get("pct", "")),
        rua=rua,
        ruf=_uris(tags.get("ruf", "")),
        fo=tags.get("fo", "") or "0",
    )


@functools.lru_cache(maxsize=4096)
def _parsed_record(text: bytes) -> DmarcRecord | str:
    """:func:`parse_record` once per distinct record (the record is immutable, so shared),
    or the message of its ValueError."""
    try:
        return parse_record(text)
    except ValueError as exc:
        return str(exc)


def _alignment(value: str) -> str:
    return "s" if value.lower() == "s" else "r"


def _percent(value: str) -> int:
    if not value.isdigit():
        return 100  # absent or invalid: the default
    return min(int(value), 100)


def _uris(value: str) -> tuple[str, ...]:
    """The syntactically valid URIs of a rua=/ruf= list (a URI with a scheme and a rest)."""
    found = []
    for item in value.split(","):
        uri = _URI_SIZE.sub("", item.strip(" \t\r\n"))
        parts = urlsplit(uri)
        if (
            parts.scheme
            and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", parts.scheme)
            and (parts.path or parts.netloc)
        ):
            found.append(uri)
    return tuple(found)


@dataclass(frozen=True, slots=True)
class _Discovery:
    status: str  # "found" | "none" | "several" | "temperror"
    domain: str = ""
    text: bytes = b""
    detail: str = ""


async def _records_at(dns: DnsLookups, domain: str) -> _Discovery:
    """The DMARC record at ``_dmarc.<domain>``."""
    found = _records_now(dns, domain)  # a cache hit needs no coroutine
    if found is None:
        name = f"_dmarc.{domain}"
        found = _discovery(domain, name, await dns.txt(name))
    return found


def _records_now(dns: DnsLookups, domain: str) -> _Discovery | None:
    """:func:`_records_at` from the lookups' own cache; None when it does not hold them."""
    peek = peek_cache(dns)
    name = f"_dmarc.{domain}"
    answer = peek("TXT", name) if peek is not None else None
    return None if answer is None else _discovery(domain, name, answer)


@functools.lru_cache(maxsize=4096)
def _discovery(domain: str, name: str, answer: Records) -> _Discovery:
    """What the TXT *answer* for *name* (``_dmarc.<domain>``) says about a DMARC record.
    Cached: the resolver's cache hands out the same answer for every message of a sender
    while its TTL lasts (and a new one after)."""
    if answer.status == "temporary":
        return _Discovery("temperror", domain, detail=f"{name}: {answer.detail or 'no answer'}")
    if answer.status != "ok":
        return _Discovery("none", domain, detail=f"{name}: no DMARC record")
    found = [bytes(v) for v in answer.values if is_dmarc_record(bytes(v))]
    if not found:
        return _Discovery("none", domain, detail=f"{name}: no DMARC record")
    if len(found) > 1:
        return _Discovery("several", domain, detail=f"{name}: {len(found)} DMARC records")
    return _Discovery("found", domain, found[0])


async def _discover(dns: DnsLookups, domain: str) -> _Discovery:
    """RFC 7489 §6.6.3 steps 1-4: the record at the From domain, else at its
    organizational domain."""
    first = await _records_at(dns, domain)
    org = _fallback(first, domain)
    return first if org is None else await _records_at(dns, org)


def _discover_now(dns: DnsLookups, domain: str) -> _Discovery | None:
    """:func:`_discover` from the lookups' own cache; None when a lookup would wait."""
    found = _answers_now(dns, domain)
    return None if found is None else _discovery(*found[-1])


def policy_answers(
    dns: DnsLookups, content_from: str
) -> tuple[tuple[str, str, Records], ...] | None:
    """The cached answers :func:`check_dmarc_now` decides on for the From domain
    *content_from*: (domain, ``_dmarc.<domain>``, answer) in the order it reads them (the
    From domain's, then the organizational domain's when that has no record); None when
    one is not cached. What it decides stands as long as the cache gives the same answers."""
    author = normalize_domain(content_from)
    return _answers_now(dns, author) if author else None


def _answers_now(dns: DnsLookups, domain: str) -> tuple[tuple[str, str, Records], ...] | None:
    """:func:`policy_answers` of a normalized From *domain*."""
    peek = peek_cache(dns)
    if peek is None:
        return None
    name = f"_dmarc.{domain}"
    answer = peek("TXT", name)
    if answer is None:
        return None
    first = (domain, name, answer)
    org = _fallback(_discovery(*first), domain)
    if org is None:
        return (first,)
    org_name = f"_dmarc.{org}"
    org_answer = peek("TXT", org_name)
    return None if org_answer is None else (first, (org, org_name, org_answer))


def _fallback(first: _Discovery, domain: str) -> str | None:
    """The organizational domain to look at after *first*, what ``_dmarc.<domain>``
    gave; None when *first* decides (a record, several, a DNS failure, or *domain* is
    organizational already)."""
    if first.status != "none":
        return None
    org = organizational_domain(domain)
    return None if org == domain else org


@functools.lru_cache(maxsize=8192)
def aligned(identifier: str, author: str, mode: str) -> bool:
    """Whether the authenticated domain *identifier* aligns with the From domain *author*:
    equal names in strict mode ``s``, equal organizational domains in relaxed mode ``r``."""
    ident = normalize_domain(identifier)
    if not ident or not author:
        return False
    if mode == "s":
        return ident == author
    return organizational_domain(ident) == organizational_domain(author)


def _lower(policy: str) -> str:
    """The next lower policy (for messages that pct sampling did not select, §6.6.4)."""
    return POLICIES[max(POLICIES.index(policy) - 1, 0)]


async def check_dmarc(
    dns: DnsLookups,
    content_from: str | None,
    spf: SpfResult | None,
    dkim: Sequence[DkimResult],
    *,
    rng: Callable[[], float] = random.random,
) -> DmarcResult:
    """The DMARC result for a message whose From domain is *content_from* (from
    :func:`from_domain`; None: there is no single one), given the SPF result of the MAIL
    FROM identity (None: SPF not checked) and the DKIM results. See the module docstring
    for the rules; never raises for bad records or DNS trouble."""
    author = normalize_domain(content_from) if content_from else ""
    if not author:
        return _no_author()
    return _decide(author, await _discover(dns, author), spf, dkim, rng)


def check_dmarc_now(
    dns: DnsLookups,
    content_from: str | None,
    spf: SpfResult | None,
    dkim: Sequence[DkimResult],
    *,
    rng: Callable[[], float] = random.random,
) -> DmarcResult | None:
    """What :func:`check_dmarc` gives, computed without waiting, when the lookups' own
    cache (``dns.cached``, as :meth:`tachymail.dns.Resolver.cached`) holds the records it
    needs; None when a lookup would have to wait: then await :func:`check_dmarc`."""
    author = normalize_domain(content_from) if content_from else ""
    if not author:
        return _no_author()
    found = _discover_now(dns, author)
    return None if found is None else _decide(author, found, spf, dkim, rng)


def _no_author() -> DmarcResult:
    return _shared(
        "permerror", "", "none", "none", False, False, detail="no single RFC5322.From domain"
    )


#: a DmarcResult made once per distinct value and then shared (results are immutable): one
#: sender's messages get the same result object, so what is made from a result can be
#: kept with it (see InboundChecker._repeat)
_shared = functools.lru_cache(maxsize=4096)(DmarcResult)


def _decide(
    author: str,
    found: _Discovery,
    spf: SpfResult | None,
    dkim: Sequence[DkimResult],
    rng: Callable[[], float],
) -> DmarcResult:
    """The DMARC result for the From domain *author* once its record was looked for."""
    if found.status == "temperror":
        return _shared("temperror", author, "none", "none", False, False, detail=found.detail)
    if found.status != "found":
        # several records: say where; none at all: there is no record domain
        where = found.domain if found.status == "several" else ""
        return _shared("none", author, "none", "none", False, False, where, found.detail)
    record = _parsed_record(found.text)
    if isinstance(record, str):
        return _shared(
            "permerror",
            author,
            "none",
            "none",
            False,
            False,
            found.domain,
            f"_dmarc.{found.domain}: {record}",
        )
    # sp= is for subdomains: only when the record came from the organizational domain
    subdomain = found.domain != author
    policy = (record.sp or record.p) if subdomain else record.p
    spf_ok = spf is not None and spf.result == "pass" and aligned(spf.domain, author, record.aspf)
    dkim_ok = any(d.result == "pass" and aligned(d.domain, author, record.adkim) for d in dkim)
    if spf_ok or dkim_ok:
        return _shared("pass", author, policy, "none", spf_ok, dkim_ok, found.domain, record=record)
    selected = rng() * 100 < record.pct
    disposition = policy if selected else _lower(policy)
    detail = "" if selected else f"not selected by pct={record.pct}"
    return _shared("fail", author, policy, disposition, False, False, found.domain, detail, record)

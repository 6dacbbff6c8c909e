"""ARC (RFC 8617): verify the chain of a received message, and seal mail we relay.

Verification is dkimpy's (``dkim.ARC``), with its key lookups done beforehand by the
shared async resolver, as for DKIM (see :mod:`tachymail.mailauth.dkim`): the ARC header
fields are read, every ``s._domainkey.d`` they name is fetched in parallel, then dkimpy
runs with a ``dnsfunc`` that only serves those answers.

Sealing is done here: dkimpy's ``arc_sign`` needs the ``authres`` package to re-read our
own Authentication-Results (we already have them) and computes RSA in pure Python. The
set is built as the ARC test suite's "standardized" form (tags in alphabetical order,
lower-case values, one space after each ";"), which is a valid RFC 8617 form and lets the
suite's expected signatures be compared byte for byte. Seals are ``rsa-sha256``, the one
algorithm ARC validators accept today (dkimpy, the suite, OpenARC), so the sealing key
must be an RSA key from the DKIM key layout.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim  # type: ignore[import-untyped]
from cryptography.hazmat.primitives.asymmetric import rsa
from dkim.canonicalization import CanonicalizationPolicy  # type: ignore[import-untyped]

from tachymail.mailauth.dkim import (
    EXECUTOR_THRESHOLD,
    SIGNED_HEADERS,
    BodyHashFirst,
    DkimError,
    HeaderBlock,
    _load_key,
    _select,
    key_path,
    relaxed_body,
    split_message,
)
from tachymail.mailauth.dnsapi import DnsLookups
from tachymail.protocol.mime import blank_line

__all__ = [
    "MAX_INSTANCE",
    "NO_ARC_SETS",
    "ArcResult",
    "ArcSealer",
    "may_have_arc_sets",
    "verify_arc",
]

log = logging.getLogger(__name__)

#: RFC 8617 §4.2.1: at most 50 ARC sets; a longer chain fails, and is never sealed again.
MAX_INSTANCE = 50
#: Header fields the ARC-Message-Signature covers when present (besides From, always).
ARC_SIGNED_HEADERS = (*SIGNED_HEADERS, "dkim-signature")

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_ARC_FIELDS = (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")
_RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
_LINE = 76


@dataclass(frozen=True, slots=True)
class ArcResult:
    """The ARC chain validation status (RFC 8617 §5.2) of a message.

    ``result``: ``none`` (no ARC sets), ``pass``, ``fail`` (including a chain some earlier
    sealer already marked cv=fail, and more than 50 sets), or ``temperror`` (the chain did
    not validate and a key lookup failed for now: it may validate later). ``instance``: the
    highest i= seen (0 when none). ``oldest_pass``: for a passing chain, the lowest
    instance from which every ARC-Message-Signature up to the newest still validates, 0
    when all do (RFC 8617 §5.2 "oldest-pass"). ``detail`` says why, for the log.
    """

    result: str
    instance: int
    detail: str = ""
    oldest_pass: int = 0


#: the result for a message without ARC fields
NO_ARC_SETS = ArcResult("none", 0, "no ARC sets")


def may_have_arc_sets(content: bytes, block: HeaderBlock | None = None) -> bool:
    """Whether a field of the header block of *content* has a name starting ``ARC-``: when
    not, :func:`verify_arc` says ``none`` without a lookup (the usual message costs one
    search of its header block; *block*, the header already read, none)."""
    if block is not None:
        # one search of the names joined, not a call per field (field names hold no LF)
        return b"\narc-" in b"\n" + b"\n".join(block.lower)
    blank = blank_line(content)
    lowered = (content if blank is None else content[: blank[0] + 1]).lower()
    return lowered.startswith(b"arc-") or b"\narc-" in lowered


async def verify_arc(dns: DnsLookups, content: bytes, *, now: float | None = None) -> ArcResult:
    """Validate the ARC chain of *content* (RFC 8617 §5.2), never raising for bad input.

    The keys every ARC-Seal and ARC-Message-Signature names are fetched with *dns*, in
    parallel, before anything is verified; big messages (``EXECUTOR_THRESHOLD`` bytes
    and more) are verified in the default executor. *now* is accepted for symmetry with
    the other checks: ARC signatures carry no expiry, and dkimpy checks t= with the clock.
    """
    del now  # nothing in an ARC set expires
    if not may_have_arc_sets(content):
        return NO_ARC_SETS
    end = _HEADER_END.search(content)
    head = content if end is None else content[: end.start() + 2]
    try:
        names, instance = _key_names(head)
    except dkim.DKIMException as exc:
        return ArcResult("fail", 0, f"unreadable header block: {exc}")
    if instance == 0:
        return ArcResult("none", 0, "no ARC sets")
    if instance > MAX_INSTANCE:
        return ArcResult("fail", instance, f"more than {MAX_INSTANCE} ARC sets")
    answers = await asyncio.gather(*(dns.txt(name) for name in names))
    keys = dict(zip(names, answers, strict=True))
    if len(content) >= EXECUTOR_THRESHOLD:
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(None, _run_dkimpy, content, keys)
    else:
        result = _run_dkimpy(content, keys)
    log.debug("arc=%s i=%d %s", result.result, result.instance, result.detail)
    return result


def _key_names(head: bytes) -> tuple[list[str], int]:
    """The key record names the ARC fields of *head* refer to, and the highest instance."""
    headers = dkim.rfc822_parse(head)[0]
    names: set[str] = set()
    highest = 0
    for name, value in headers:
        kind = bytes(name).lower()
        if kind not in _ARC_FIELDS:
            continue
        match = re.search(rb"(?:^|;)\s*i\s*=\s*(\d+)", bytes(value))
        if match:
            highest = max(highest, int(match.group(1)))
        if kind == b"arc-authentication-results":
            continue
        try:
            tags = dkim.util.parse_tag_value(bytes(value))
        except dkim.util.InvalidTagValueList:
            continue  # dkimpy will call this set invalid; nothing to fetch
        selector, domain = tags.get(b"s", b"").strip(), tags.get(b"d", b"").strip()
        if selector and domain and (selector + domain).isascii():
            names.add(f"{selector.decode()}._domainkey.{domain.decode()}".lower())
    return sorted(names), highest


class _ArcVerifier(BodyHashFirst, dkim.ARC):  # type: ignore[misc]
    """dkimpy's ARC validator; the AMS body hashes are checked by :class:`BodyHashFirst`."""


def _run_dkimpy(content: bytes, keys: dict[str, Any]) -> ArcResult:
    """dkimpy's chain validation with the prefetched *keys* (CPU only)."""
    temporary: list[str] = []

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        text = name.decode("ascii", "replace").rstrip(".").lower()
        answer = keys.get(text)
        if answer is not None and answer.status == "temporary":
            temporary.append(text)
            raise dkim.DnsTimeoutError(answer.detail)  # dkimpy: this signature fails
        if answer is None or answer.status != "ok":
            return None
        usable = [bytes(v) for v in answer.values if b"p=" in bytes(v)]
        return usable[0] if usable else None  # several records: the first that holds a key

    try:
        verifier = _ArcVerifier(*split_message(content))
        _highest, _sets = verifier.sorted_arc_headers()
        cv, sets, reason = verifier.verify(dnsfunc=dnsfunc)
    except Exception as exc:  # dkimpy on input nobody foresaw: a result, not a crash
        log.info("dkimpy ARC validation failed: %r", exc)
        return ArcResult("fail", 0, f"cannot validate: {exc!r}")
    instance = int(_highest)
    if cv == dkim.CV_Pass:
        return ArcResult("pass", instance, str(reason), _oldest_pass(sets))
    if cv == dkim.CV_None:
        return ArcResult("none", instance, str(reason))
    if temporary:
        return ArcResult("temperror", instance, f"key lookup failed: {', '.join(temporary)}")
    # cv None: an ARC-Seal already says cv=fail; RFC 8617 §5.2 step 2: the chain fails
    return ArcResult("fail", instance, str(reason))


def _oldest_pass(sets: list[dict[str, Any]]) -> int:
    """The lowest instance from which every AMS up to the newest validates; 0 for all."""
    oldest = 0
    for entry in sets:  # newest first
        if not entry.get("ams-valid"):
            break
        oldest = int(entry["instance"])
    return 0 if oldest == 1 else oldest


class ArcSealer:
    """Adds an ARC set to relayed mail; safe to share between threads.

    The key is read once, here, from ``key_path(data_dir, domain, selector)`` (the DKIM
    key layout, ``tachymail dkim keygen --domain D --selector S``); ValueError when it is
    missing, unreadable or not an RSA key (ARC signs with rsa-sha256 only).
    """

    def __init__(self, data_dir: Path, domain: str, selector: str) -> None:
        path = key_path(data_dir, domain, selector)
        key = _load_key(path, domain, selector)
        if not isinstance(key.private, rsa.RSAPrivateKey):
            raise ValueError(
                f"ARC key {path} is an Ed25519 key: ARC seals with rsa-sha256 only, make one "
                f"with `tachymail dkim keygen --domain {domain} --selector {selector}`"
            )
        self._key = key
        self.domain = path.parent.name
        self.selector = key.selector

    def seal(
        self,
        content: bytes,
        authserv_id: str,
        auth_results: bytes,
        chain: str,
        *,
        now: float | None = None,
        headers: Sequence[str] | None = None,
    ) -> bytes:
        """The next ARC set for *content*: ARC-Seal, ARC-Message-Signature and
        ARC-Authentication-Results fields, in that order, folded, CRLF-terminated, to put
        on top of *content* (above any Authentication-Results we add).

        *auth_results* is the value of our Authentication-Results field (with or without
        the field name; it should start with *authserv_id*, which is put in front when it
        does not); *chain* is our validation of the existing chain (``verify_arc``):
        ``none``, ``pass`` or ``fail``. Nothing (``b""``) is returned, and nothing should
        be added, when the chain already has 50 sets, when the newest ARC-Seal already says
        cv=fail, when sets exist but *chain* says ``none``, or when *chain* is anything
        else (``temperror``: we cannot say). *headers* names the fields the
        ARC-Message-Signature covers (default: From and the ``ARC_SIGNED_HEADERS``
        present). *now* is t= (default: the clock). A pure function of its arguments and
        the key. DkimError (a ValueError) when the header block cannot be parsed.
        """
        head, body = split_message(content)  # line ends read as a verifier reads them
        try:
            fields = [(bytes(n), bytes(v)) for n, v in dkim.rfc822_parse(head)[0]]
        except dkim.MessageFormatError as exc:
            raise DkimError(f"cannot seal: {exc}") from None
        sets = _existing_sets(fields)
        instance = max(sets, default=0) + 1
        cv = chain.lower()
        if cv not in ("none", "pass", "fail") or instance > MAX_INSTANCE:
            return b""
        if instance == 1:
            cv = "none"  # nothing to vouch for (RFC 8617 §4.1.3: i=1 has cv=none)
        elif cv == "none" or _seal_cv(sets[instance - 1]) == b"fail":
            return b""  # inconsistent, or a chain that already ended (RFC 8617 §5.1)
        stamp = str(int(time.time() if now is None else now))
        domain, selector = self.domain.lower(), self.selector.lower()

        aar = _aar_value(instance, authserv_id, auth_results)
        present = {name.lower() for name, _ in fields}
        if headers is None:
            names = ["from"] + [
                h for h in ARC_SIGNED_HEADERS if h != "from" and h.encode() in present
            ]
        else:
            names = [h.strip().lower() for h in headers if h.strip()]
        signed = [(b"ARC-Authentication-Results", b" " + aar), *fields]
        body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest()).decode()
        ams_tags = [
            ("a", "rsa-sha256"),
            ("b", ""),
            ("bh", body_hash),
            ("c", "relaxed/relaxed"),
            ("d", domain),
            ("h", ":".join(names)),
            ("i", str(instance)),
            ("s", selector),
            ("t", stamp),
        ]
        chosen = _select(signed, [n.encode() for n in names])
        ams = self._sign("ARC-Message-Signature", ams_tags, chosen)

        seal_input: list[tuple[bytes, bytes]] = []
        if cv != "fail":  # a failed chain: the seal covers only its own set (RFC 8617 §5.1)
            for i in range(1, instance):
                seal_input.extend(sets[i][kind] for kind in _ARC_FIELDS[::-1])
        seal_input.append((b"ARC-Authentication-Results", b" " + aar))
        seal_input.append((b"ARC-Message-Signature", b" " + ams))
        as_tags = [
            ("a", "rsa-sha256"),
            ("b", ""),
            ("cv", cv),
            ("d", domain),
            ("i", str(instance)),
            ("s", selector),
            ("t", stamp),
        ]
        seal = self._sign("ARC-Seal", as_tags, seal_input)
        return (
            b"ARC-Seal: "
            + seal
            + b"ARC-Message-Signature: "
            + ams
            + b"ARC-Authentication-Results: "
            + aar
        )

    def _sign(
        self, field: str, tags: list[tuple[str, str]], covered: list[tuple[bytes, bytes]]
    ) -> bytes:
        """The folded, CRLF-terminated value of *field* with b= computed over *covered*."""
        unsigned = _fold(field, tags, "")
        hasher = hashlib.sha256()
        for name, value in _RELAXED.canonicalize_headers(covered):
            hasher.update(name + b":" + value)
        [(name, value)] = _RELAXED.canonicalize_headers([(field.encode(), b" " + unsigned)])
        hasher.update(name + b":" + value.rstrip(b"\r\n"))  # without its CRLF (RFC 6376 §3.7)
        signature = base64.b64encode(self._key.sign(hasher.digest())).decode("ascii")
        return _fold(field, tags, signature)


def _existing_sets(
    fields: list[tuple[bytes, bytes]],
) -> dict[int, dict[bytes, tuple[bytes, bytes]]]:
    """The ARC sets in the header, by instance; each field as (name, value) as written.
    A set missing a field, or with a field twice, is kept as far as it goes: sealing only
    needs the highest instance and its seal, and a broken chain is sealed cv=fail."""
    sets: dict[int, dict[bytes, tuple[bytes, bytes]]] = {}
    for name, value in fields:
        kind = name.lower()
        if kind not in _ARC_FIELDS:
            continue
        match = re.search(rb"(?:^|;)\s*i\s*=\s*(\d+)", value)
        if match:
            sets.setdefault(int(match.group(1)), {}).setdefault(kind, (name, value))
    return sets


def _seal_cv(arc_set: dict[bytes, tuple[bytes, bytes]]) -> bytes:
    _name, value = arc_set.get(b"arc-seal", (b"", b""))
    match = re.search(rb"(?:^|;)\s*cv\s*=\s*([A-Za-z]+)", value)
    return match.group(1).lower() if match else b""


def _aar_value(instance: int, authserv_id: str, auth_results: bytes) -> bytes:
    """The ARC-Authentication-Results value: i=, then our Authentication-Results value."""
    value = auth_results.strip()
    if value.lower().startswith(b"authentication-results:"):
        value = value[len(b"authentication-results:") :].strip()
    if not value.lower().startswith(authserv_id.lower().encode()):
        value = authserv_id.encode() + b"; " + value
    value = re.sub(rb"\r?\n(?=[ \t])", b"\r\n", value)  # keep the folding, as CRLF
    return b"i=%d; " % instance + value + b"\r\n"


def _fold(field: str, tags: list[tuple[str, str]], signature: str) -> bytes:
    """The tag list "a=...; b=...; ..." folded at the separators only. The b= value is
    never folded inside: the next hop's ARC-Seal signs this field with its b= (relaxed, so a
    fold inside b= would count as a space), and the ARC test suite's expected seals are
    computed over unfolded b= values; the line stays far below RFC 5322's 998 octets."""
    parts = [f"{key}={signature if key == 'b' else value}" for key, value in tags]
    lines: list[str] = []
    line = ""
    width = _LINE - len(field) - 2
    for index, part in enumerate(parts):
        token = part + (";" if index < len(parts) - 1 else "")
        if line and len(line) + 1 + len(token) > width:
            lines.append(line)
            line, width = token, _LINE - 1
        else:
            line = f"{line} {token}" if line else token
    lines.append(line)
    return ("\r\n ".join(lines) + "\r\n").encode("ascii")

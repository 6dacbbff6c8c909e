"""DKIM signing and verification (RFC 6376) with rsa-sha256 and ed25519-sha256 (RFC 8463),
and the signing keys.

Keys live in ``<data dir>/dkim/<domain>/<selector>.key`` (mode 0600), written by
``keygen`` (``tachymail dkim keygen``): RSA keys as PEM, Ed25519 keys as the base64 of the
32-byte seed, the format dkimpy's signer and its ``dknewkey`` tool use, so a key can move
between the two. A PEM Ed25519 key (PKCS#8) is read too, so keys made by OpenSSL work.

How messages are signed: header parsing and header canonicalization are dkimpy's
(``dkim.rfc822_parse``, ``dkim.canonicalization``); the body canonicalization, the
DKIM-Signature field and the choice of signed fields are done here, and the private-key
operation by ``cryptography`` (OpenSSL). dkimpy's own ``sign`` computes RSA in pure Python
(about 8 ms a message, holding the GIL in 4 ms stretches, against 0.4 ms here), needs PyNaCl
for Ed25519, and its body canonicalization runs regex passes over every body (about 3 ms
for 64 KiB, against 0.1 ms here when the body has no runs of white space, the usual case).
The tests check every signature with dkimpy's verifier and compare the body canonicalization
with dkimpy's.

How messages are verified (``verify_dkim``, on the mx listener): with dkimpy's rules, in
fewer steps. The header block is parsed once (``parse_header``: dkimpy's
``rfc822_parse``, field for field); each DKIM-Signature's tags are parsed and checked once
(dkimpy's ``validate_signature_fields``); the key records are fetched in parallel through
the shared async resolver (a ``DnsLookups``), never by dkimpy, whose lookups would block
the event loop; a key record is parsed once (dkimpy's ``evaluate_pk``, cached). Then, as
dkimpy's ``DKIM.verify`` does: the body hash (l= honoured), the fields h= names chosen
bottom-up, From once more (dkimpy's rule: a From added above the signed one breaks the
signature), only those canonicalized, the signature field with its b= value emptied, and
the signature checked by OpenSSL (RSA) or by PyNaCl (Ed25519, libsodium, which dkimpy uses
too; a runtime dependency). dkimpy canonicalizes every field, parses the header and
the tags twice and does the RSA arithmetic in Python: about 0.8 ms for a 1 KiB message,
against 0.1 ms here. A test compares our verdict with dkimpy's full verifier on the
vectors and on random signed and altered messages.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import functools
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, cast

import dkim  # type: ignore[import-untyped]
import nacl.exceptions
import nacl.signing
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from dkim.canonicalization import CanonicalizationPolicy  # type: ignore[import-untyped]

from tachymail.mailauth.dnsapi import DnsLookups, peek_cache
from tachymail.protocol.mime import (
    blank_line,
    canonical_body,
    dkim_header_input,
    dkim_plain_base64,
    dkim_plain_signature,
    dkim_tag_list,
    header_block,
    header_fields,
    header_value,
)

__all__ = [
    "ALGORITHMS",
    "SIGNED_HEADERS",
    "DkimError",
    "DkimResult",
    "DkimSigner",
    "HeaderBlock",
    "KnownSigner",
    "PlainSignature",
    "dns_record",
    "key_path",
    "keygen",
    "known_result",
    "known_signer",
    "parse_header",
    "plain_signature",
    "read_header",
    "relaxed_body",
    "verify_dkim",
]

log = logging.getLogger(__name__)

#: ``keygen`` algorithms and the signature algorithm (a= tag) each key type signs with.
ALGORITHMS = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}
#: Header fields signed when present, in this order; From is listed once more at the end
#: of h= so that a From field added in transit breaks the signature (RFC 6376 §8.15).
SIGNED_HEADERS = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-unsubscribe",
)

_RSA_BITS = 2048
_MIN_RSA_BITS = 1024  # RFC 8301 §3.2: verifiers reject smaller keys
_TXT_STRING = 255  # longest character-string in a TXT record (RFC 1035 §3.3)
_LINE = 76  # fold DKIM-Signature lines before this many characters
_B64_CHUNK = 70
_POLICY = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
_WSP_RUN = re.compile(rb"[\t ]{2,}|\t")


class DkimError(ValueError):
    """A message that cannot be signed (no From field, a malformed header block)."""


def _dns_name(name: str, what: str) -> str:
    """*name* lower-case, without a final dot, IDNA-encoded; ValueError unless it is a
    valid host name (which also keeps it safe as a file name)."""
    normal = name.strip().rstrip(".").lower()
    if not normal.isascii():
        try:
            normal = normal.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"invalid DKIM {what} {name!r}") from None
    if len(normal) > 253 or _NAME.fullmatch(normal) is None:
        raise ValueError(f"invalid DKIM {what} {name!r}")
    return normal


def key_path(data_dir: Path, domain: str, selector: str) -> Path:
    """Where the private key of *selector* for *domain* is kept (names normalised)."""
    domain = _dns_name(domain, "domain")
    selector = _dns_name(selector, "selector")
    return Path(data_dir) / "dkim" / domain / f"{selector}.key"


def keygen(
    data_dir: Path, domain: str, selector: str, algorithm: str = "rsa", *, force: bool = False
) -> str:
    """Make a key pair for *selector* of *domain* and return the DNS TXT record to publish.

    *algorithm* is "rsa" (2048 bits, rsa-sha256) or "ed25519" (ed25519-sha256). The private
    key goes to ``key_path(data_dir, domain, selector)`` with mode 0600 (its directories
    0700), written to a temporary file and moved into place. An existing key is kept and
    FileExistsError raised unless *force*. ValueError for an unknown algorithm or an invalid
    domain or selector. The record is one zone-file line:
    ``<selector>._domainkey.<domain>. IN TXT "v=DKIM1; k=rsa; p=..."``, the text cut into
    strings of at most 255 characters as DNS requires.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown DKIM algorithm {algorithm!r}: use rsa or ed25519")
    path = key_path(data_dir, domain, selector)
    if path.exists() and not force:
        raise FileExistsError(f"DKIM key {path} exists (use --force to replace it)")
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
        data = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        data = base64.b64encode(key.private_bytes_raw()) + b"\n"
    path.parent.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    _write_private(path, data, replace=force)
    log.info("DKIM %s key for %s selector %s written to %s", algorithm, domain, selector, path)
    return _txt_record(path, key)


def dns_record(data_dir: Path, domain: str, selector: str) -> str:
    """The DNS TXT record (as ``keygen`` returns it) of the key already kept for *selector*
    of *domain*; ValueError when there is none or it cannot be read as a key."""
    path = key_path(data_dir, domain, selector)
    return _txt_record(path, _load_key(path, domain, selector).private)


def _write_private(path: Path, data: bytes, replace: bool) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o600)  # whatever the umask or an old temporary file
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if another keygen got there first: never overwrite
    finally:
        tmp.unlink(missing_ok=True)


def _txt_record(path: Path, key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        kind = "rsa"
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        kind = "ed25519"
        public = key.public_key().public_bytes_raw()
    text = f"v=DKIM1; k={kind}; p={base64.b64encode(public).decode('ascii')}"
    strings = " ".join(f'"{text[i : i + _TXT_STRING]}"' for i in range(0, len(text), _TXT_STRING))
    selector = path.name.removesuffix(".key")
    return f"{selector}._domainkey.{path.parent.name}. IN TXT {strings}"


@dataclass(frozen=True, slots=True)
class _Key:
    selector: str
    algorithm: str  # the a= tag
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

    def sign(self, digest: bytes) -> bytes:
        if isinstance(self.private, rsa.RSAPrivateKey):
            return self.private.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        return self.private.sign(digest)  # RFC 8463 §3: Ed25519 over the SHA-256 hash


def _load_key(path: Path, domain: str, selector: str) -> _Key:
    """The key in *path*; ValueError naming the file (and, when missing, the command)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(
            f"DKIM key for {domain} (selector {selector}) not found at {path}: create it with "
            f"`tachymail dkim keygen --domain {domain} --selector {selector}`"
        ) from None
    except OSError as exc:
        raise ValueError(f"cannot read DKIM key {path}: {exc.strerror}") from None
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            private = serialization.load_pem_private_key(raw, password=None)
        else:
            seed = base64.b64decode(raw.strip(), validate=True)
            private = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    except (ValueError, TypeError, UnicodeError) as exc:
        raise ValueError(f"DKIM key {path} is not a usable private key: {exc}") from None
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < _MIN_RSA_BITS:
            raise ValueError(f"DKIM key {path} has {private.key_size} bits: at least 1024")
        return _Key(selector, "rsa-sha256", private)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return _Key(selector, "ed25519-sha256", private)
    raise ValueError(f"DKIM key {path} is neither an RSA nor an Ed25519 key")


class DkimSigner:
    """Signs outgoing messages for the configured domains; safe to share between threads.

    *domains* maps each signing domain to its selector (from the configuration); every key
    is loaded here, once, from ``key_path(data_dir, domain, selector)``. A missing or
    unusable key raises ValueError naming the file and the keygen command to run.
    """

    def __init__(self, data_dir: Path, domains: dict[str, str]) -> None:
        self._keys: dict[str, _Key] = {}
        for domain, selector in domains.items():
            name = _dns_name(domain, "domain")
            path = key_path(data_dir, name, selector)
            self._keys[name] = _load_key(path, name, _dns_name(selector, "selector"))

    @property
    def domains(self) -> dict[str, str]:
        """The signing domains (normalised) and their selectors."""
        return {domain: key.selector for domain, key in self._keys.items()}

    def signing_domain(self, sender: str, content: bytes) -> str | None:
        """The domain to sign *content* with: the domain of the (first) From address if it
        is configured, else the envelope *sender*'s domain if configured, else None.
        Domains compare case-insensitively and exactly (no parent-domain match)."""
        raw = header_value(content, b"from")
        if raw is not None:
            domain = _address_domain(raw.decode("utf-8", "replace"))
            if domain in self._keys:
                return domain
        if "@" in sender:
            domain = _normal_or_none(sender.rpartition("@")[2])
            if domain in self._keys:
                return domain
        return None

    def sign(self, content: bytes, domain: str, *, now: float | None = None) -> bytes:
        """The DKIM-Signature field to prepend to *content*, folded, CRLF-terminated.

        c=relaxed/relaxed, d=*domain*, s= its selector, t=*now* (default: the clock), and
        h= the ``SIGNED_HEADERS`` present, with From twice. The signature covers *content*
        as sent: its line ends must be CRLF, as they are in the queue (bare LFs are read as
        CRLF, as on the wire after dot-stuffing). A pure function of its arguments and the
        loaded key. ValueError when *domain* has no key, DkimError (a ValueError) when the
        message has no From field or its header block cannot be parsed.
        """
        name = _normal_or_none(domain)
        key = self._keys.get(name) if name else None
        if name is None or key is None:
            raise ValueError(f"no DKIM key for domain {domain!r}")
        crlf = content.count(b"\r\n")
        if content.count(b"\n") != crlf or content.count(b"\r") != crlf:
            content = re.sub(rb"\r\n|\r|\n", b"\r\n", content)
        end = content.find(b"\r\n\r\n")
        head, body = (content, b"") if end < 0 else (content[: end + 2], content[end + 4 :])
        try:
            headers = dkim.rfc822_parse(head)[0]
        except dkim.MessageFormatError as exc:
            raise DkimError(f"cannot sign: {exc}") from None
        present = {bytes(name).lower() for name, _ in headers}
        if b"from" not in present:
            raise DkimError("cannot sign a message without a From field")
        names = [name.encode() for name in SIGNED_HEADERS if name.encode() in present]
        names.append(b"from")

        body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())
        stamp = int(time.time() if now is None else now)
        tags = [
            "v=1;",
            f"a={key.algorithm};",
            "c=relaxed/relaxed;",
            f"d={name};",
            f"s={key.selector};",
            f"t={stamp};",
            *_h_tokens(names),
            f"bh={body_hash.decode('ascii')};",
        ]
        value = _fold(tags) + "\r\n b="  # b= on a line of its own, as the RFC's examples do

        hasher = hashlib.sha256()
        for field_name, field in _POLICY.canonicalize_headers(_select(headers, names)):
            hasher.update(field_name + b":" + field)
        # The signature field itself, b= empty and without its final CRLF (RFC 6376 §3.7).
        [(canonical, field)] = _POLICY.canonicalize_headers([(b"DKIM-Signature", value.encode())])
        hasher.update(canonical + b":" + field.rstrip(b"\r\n"))
        signature = base64.b64encode(key.sign(hasher.digest())).decode("ascii")
        chunks = [signature[i : i + _B64_CHUNK] for i in range(0, len(signature), _B64_CHUNK)]
        folded = "\r\n ".join(chunks)
        return f"DKIM-Signature: {value}{folded}\r\n".encode()


def relaxed_body(body: bytes) -> bytes:
    """The "relaxed" canonical form of a CRLF body (RFC 6376 §3.4.4): white space at line
    ends removed, other runs of spaces and tabs made one space, empty lines at the end
    removed, a CRLF at the end of a non-empty body. Same result as dkimpy's, but a clean
    body (the usual case) costs a few substring searches instead of regex passes."""
    if b"\t" in body or b"  " in body or b" \r\n" in body:
        body = _WSP_RUN.sub(b" ", _TRAILING_WSP.sub(b"\r\n", body))
    body = body.rstrip(b"\r\n")
    return body + b"\r\n" if body else b""


def _h_tokens(names: list[bytes]) -> list[str]:
    """The h= tag as tokens that may be folded after each colon: "h=from:", "to:", ..."""
    tokens = [name.decode("ascii") + ":" for name in names]
    tokens[0] = "h=" + tokens[0]
    tokens[-1] = tokens[-1][:-1] + ";"
    return tokens


def _fold(tokens: list[str]) -> str:
    """Tag tokens joined into lines shorter than 76 characters (the first one after
    "DKIM-Signature: "); a space separates tags, nothing the names inside h=."""
    lines: list[str] = []
    line = ""
    width = _LINE - len("DKIM-Signature: ")
    for token in tokens:
        sep = "" if not line or line.endswith(":") else " "
        if line and len(line) + len(sep) + len(token) > width:
            lines.append(line)
            line, width = token, _LINE - 1
        else:
            line += sep + token
    lines.append(line)
    return "\r\n ".join(lines)


def _select(headers: Sequence[Sequence[bytes]], names: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The fields h= names, each name taking the last instance not taken yet (RFC 6376
    §5.4.2); a name with none left (From listed twice) selects nothing."""
    chosen = []
    below: dict[bytes, int] = {}
    for name in names:
        i = below.get(name, len(headers))
        while i > 0:
            i -= 1
            if bytes(headers[i][0]).lower() == name:
                chosen.append((bytes(headers[i][0]), bytes(headers[i][1])))
                break
        below[name] = i
    return chosen


def _normal_or_none(domain: str) -> str | None:
    try:
        return _dns_name(domain, "domain")
    except ValueError:
        return None


def _address_domain(value: str) -> str | None:
    """The domain of the first address in a From field's value, normalised."""
    for _name, address in email.utils.getaddresses([value]):
        if "@" in address:
            return _normal_or_none(address.rpartition("@")[2])
    return None


# ---------------------------------------------------------------------------------------
# Verification (RFC 6376 §6), inbound

#: Messages at least this long are verified in the default executor, shorter ones inline:
#: a 1 KiB message costs about 0.1 ms to verify (ed25519, rsa-2048), 64 KiB about 0.35 ms,
#: and the hand-off to a thread costs more CPU than it saves below this size (64 KiB: 0.5 ms
#: of CPU through the executor, 0.34 ms inline: the GIL changes hands several times); big
#: bodies are hashed there (hashlib releases the GIL), off the event loop.
EXECUTOR_THRESHOLD = 128 * 1024

#: dkimpy logs every bad signature at ERROR; a stranger's broken mail is not our error, so
#: its logger is this one, which drops everything (our own log line says what happened).
_QUIET = logging.Logger("tachymail.mailauth.dkimpy", logging.CRITICAL + 1)
#: the empty line that ends the header, as dkimpy finds it (the MIME kernel's ``blank_line``
#: does the same in one pass; the regex tries every position of the header block, 8 µs for a
#: common one)
_BLANK_LINE = re.compile(rb"(?:\A|\n)(\r?\n)")
_FIELD_NAME = re.compile(rb"[\x21-\x7e]+?:")  # a field's first line, as dkim.rfc822_parse
_H_SPLIT = re.compile(rb"\s*:\s*")  # the names in h=, split as dkimpy splits them
#: _plainly_valid: the tags dkimpy requires, those it checks in ways left to it, a d= with
#: nothing it could object to (b= and bh=: the MIME kernel's dkim_plain_base64)
_MANDATORY = frozenset((b"v", b"a", b"b", b"bh", b"d", b"h", b"s"))
_UNPLAIN = frozenset((b"i", b"l", b"x", b"cv"))
_PLAIN_DOMAIN = re.compile(rb"[A-Za-z0-9][A-Za-z0-9.-]*")
_PKCS1 = padding.PKCS1v15()  # stateless: made once
_PREHASHED = {False: utils.Prehashed(hashes.SHA256()), True: utils.Prehashed(hashes.SHA1())}


# Not frozen: one is made per signature of every message, and a frozen dataclass costs
# four times as much to make (each field set through object.__setattr__). Hashable as a
# frozen one is (unsafe_hash: by its fields); nothing changes one after it is made.
@dataclass(slots=True, unsafe_hash=True)
class DkimResult:
    """The verification of one DKIM-Signature field (RFC 8601 §2.7.1 result keywords).

    ``result``: ``pass``; ``fail`` (the signature or the body hash does not match);
    ``policy`` (an rsa-sha1 signature that verifies: RFC 8301 forbids relying on it);
    ``neutral`` (the signature field cannot be used: a syntax error, a missing or invalid
    tag, an unsupported algorithm or canonicalization, From not signed, ``i=`` outside
    ``d=``, expired, or dated in the future); ``permerror`` (no key record, or a key record
    that is malformed, revoked, too small, not for email, of another type than ``a=``, or
    whose h= excludes the signature's hash); ``temperror`` (the key lookup failed for now).
    Only ``pass`` counts for DMARC. ``domain``, ``selector``, ``algorithm``, ``identity``
    are the d=, s=, a=, i= tags as written ("" when absent or unreadable); ``signature_b``
    is the b= value without white space; ``detail`` says why, for the log and the
    Authentication-Results comment.
    """

    result: str
    domain: str
    selector: str
    algorithm: str
    identity: str
    signature_b: str
    detail: str = ""


@dataclass(slots=True)
class _Signature:
    """One DKIM-Signature field, parsed; ``error`` set when it cannot be verified."""

    index: int  # among the message's DKIM-Signature fields, top first (dkimpy's idx)
    tags: dict[bytes, bytes]
    error: str = ""
    result: str = ""  # set when decided before the signature is checked
    key: bytes | None = None
    field: tuple[bytes, bytes] = (b"", b"")  # (name, value) as dkim.rfc822_parse reads it
    #: the fields signed: h=, lower case, split as dkimpy splits it, then "from" once more
    selected: tuple[bytes, ...] = ()
    relaxed_head: bool = False
    relaxed_body: bool = False

    def names(self) -> _Names:
        tags = self.tags
        return _names(
            tags.get(b"d", b""), tags.get(b"s", b""), tags.get(b"a", b""), tags.get(b"i", b"")
        )

    @property
    def key_name(self) -> str:
        return self.names().key_name

    def outcome(self, result: str, detail: str) -> DkimResult:
        names = self.names()
        return DkimResult(
            result,
            names.domain,
            names.selector,
            names.algorithm,
            names.identity,
            _b_text(self.tags.get(b"b", b"")),
            detail,
        )


def _b_text(b: bytes) -> str:
    """A b= value as a result carries it: without its white space."""
    return b"".join(b.split()).decode("ascii", "replace")


class _Names(NamedTuple):
    """A signature's d=, s=, a=, i= as its result words them, and its key record's name."""

    domain: str
    selector: str
    algorithm: str
    identity: str
    key_name: str


@functools.lru_cache(maxsize=1024)
def _names(d: bytes, s: bytes, a: bytes, i: bytes) -> _Names:
    """The :class:`_Names` of a signature's tags; cached, as one signer's messages repeat
    them (decoding four tags costs each message more than the lookup)."""
    domain, selector = _text(d), _text(s)
    return _Names(
        domain.lower(),
        selector,
        _text(a).lower(),
        _text(i),
        f"{selector}._domainkey.{domain}".lower(),
    )


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace").strip()


async def verify_dkim(
    dns: DnsLookups,
    content: bytes,
    *,
    max_signatures: int = 5,
    now: float | None = None,
    crlf: bool = False,
) -> list[DkimResult]:
    """Verify the DKIM-Signature fields of *content* (the message as received, CRLF or LF;
    *crlf* says its body has CRLF line ends only, as the SMTP session makes sure, which
    spares two passes over it).

    One result per signature, top first; ``[]`` when the message has none (the RFC 8601
    result "none"). Only the first *max_signatures* fields are checked: the others are
    neither checked nor listed (a flood of signatures must not cost a key lookup each).
    The keys (``<s>._domainkey.<d>`` TXT) are fetched with *dns*, all at once, before
    anything is verified; messages of ``EXECUTOR_THRESHOLD`` bytes or more are verified
    in the default executor, so the event loop is never held long. *now* (default: the
    clock) decides whether an ``x=`` has expired or a ``t=`` lies in the future (an hour's
    slack); dkimpy applies the same checks with the clock and ten hours' slack. Never
    raises for bad input or DNS trouble: those are results.
    """
    stamp = time.time() if now is None else now
    parsed = _parse_signatures(content, max_signatures, stamp)
    names = _key_names(parsed.signatures)
    found: dict[str, Any] = {}
    if len(names) == 1:  # the usual case: awaited directly, no task to schedule
        found[names[0]] = await dns.txt(names[0])
    elif names:
        answers = await asyncio.gather(*(dns.txt(name) for name in names))
        found = dict(zip(names, answers, strict=True))
    jobs = _keyed(parsed.signatures, found)
    if jobs and len(content) >= EXECUTOR_THRESHOLD:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _verify_signatures, parsed, content, jobs, crlf)
    elif jobs:
        _verify_signatures(parsed, content, jobs, crlf)
    return _outcomes(parsed.signatures)


def verify_dkim_now(
    dns: DnsLookups,
    content: bytes,
    *,
    max_signatures: int = 5,
    now: float | None = None,
    crlf: bool = False,
    block: HeaderBlock | None = None,
) -> list[DkimResult] | None:
    """What :func:`verify_dkim` gives, computed without waiting, when the lookups' own
    cache (``dns.cached(kind, name)``, as :meth:`tachymail.dns.Resolver.cached`) holds every
    key record and *content* is small enough to verify in the event loop (under
    ``EXECUTOR_THRESHOLD``); None otherwise: then await :func:`verify_dkim`. A busy MX
    has the keys of the senders it hears from cached, so its common message is checked
    without a coroutine. *block*: the header of *content*, already read
    (:func:`read_header`)."""
    peek = peek_cache(dns)
    if peek is None or len(content) >= EXECUTOR_THRESHOLD:
        return None
    stamp = time.time() if now is None else now
    if block is not None:
        quick = _quick_results(block, content, peek, max_signatures, stamp, crlf)
        if quick is not None:
            return quick
    parsed = _parse_signatures(content, max_signatures, stamp, block)
    found: dict[str, Any] = {}
    for name in _key_names(parsed.signatures):
        answer = peek("TXT", name)
        if answer is None:
            return None
        found[name] = answer
    jobs = _keyed(parsed.signatures, found)
    if jobs:
        _verify_signatures(parsed, content, jobs, crlf)
    return _outcomes(parsed.signatures)


def _quick_results(
    block: HeaderBlock,
    content: bytes,
    peek: Callable[[str, str], Any],
    limit: int,
    now: float,
    crlf: bool,
) -> list[DkimResult] | None:
    """The results :func:`verify_dkim_now` gives, for the common message: each of its
    first *limit* DKIM-Signature fields plain (see :func:`_plainly_valid`; b= and bh= plain
    base64, t= not in the future), and each key record cached (*peek*) and usable. What
    one signer's signatures share (every tag but b=, bh=, t=) is checked once, in its
    :class:`_Plan`, and so is its key record (:func:`_usable_record`): per message there
    are only its hashes and the key operation. None for anything else, and for input that
    makes a step raise: the full path then decides, and says why."""
    lower = block.lower
    if b"dkim-signature" not in lower:
        return []
    headers = block.fields
    body = _body_of(content, block.body_at, crlf)
    canonical: dict[bool, Body] = {}
    results: list[DkimResult] = []
    latest = _latest_t(now)
    index = -1
    try:
        for _ in range(min(lower.count(b"dkim-signature"), limit)):
            index = lower.index(b"dkim-signature", index + 1)
            field = headers[index]
            read = dkim_plain_signature(field[1], latest)
            if read is None:
                return None
            static, b, bh = read  # b= and bh= plain base64, without white space
            plan = _plan(static)
            if plan is None:
                return None
            answer = peek("TXT", plan.names.key_name)
            record = None if answer is None else _usable_record(answer, plan.algorithm)
            if record is None:
                return None
            result, detail = _check_planned(plan, b, bh, field, record, block, body, canonical)
            names = plan.names
            results.append(
                DkimResult(
                    result,
                    names.domain,
                    names.selector,
                    names.algorithm,
                    names.identity,
                    b.decode("ascii"),
                    detail,
                )
            )
    except Exception:  # input nobody foresaw: the full path words it as a result
        return None
    _log_results(results)
    return results


def _latest_t(now: float) -> float:
    """The latest t= a plain signature may carry at *now* (dkim_plain_signature holds it
    to that): dkimpy's ten hours, and the hour allowed here (see _signature_problem)."""
    return min(now + 3600, int(time.time()) + 36000)


@dataclass(frozen=True, slots=True)
class KnownSigner:
    """A DKIM signer whose plain signature passed (:func:`known_signer`): the tags its
    signatures share (all but b=, bh=, t=), what they say (its :class:`_Plan`), and the
    key record it verified with, as the cached *answer* it came from (a signer is only
    known while that answer is still the cached one: see :func:`known_result`)."""

    static: bytes
    plan: _Plan
    answer: Any
    record: bytes


class PlainSignature(NamedTuple):
    """A message's one DKIM-Signature field read plain (:func:`plain_signature`): the
    field, the tags its signer's signatures share (``dkim_plain_signature``'s key), and
    b= and bh= without white space."""

    field: tuple[bytes, bytes]
    static: bytes
    b: bytes
    bh: bytes


def plain_signature(block: HeaderBlock, now: float) -> PlainSignature | None:
    """The one DKIM-Signature field of a header *block*, when it has exactly one and it
    is plain (see :func:`_quick_results`); None otherwise."""
    lower = block.lower
    if lower.count(b"dkim-signature") != 1:
        return None
    field = block.fields[lower.index(b"dkim-signature")]
    read = dkim_plain_signature(field[1], _latest_t(now))
    return None if read is None else PlainSignature(field, *read)


def known_signer(signature: PlainSignature, peek: Callable[[str, str], Any]) -> KnownSigner | None:
    """The :class:`KnownSigner` of a message's plain *signature* whose key record the
    cache (*peek*) holds and can use; None otherwise."""
    plan = _plan(signature.static)
    if plan is None:
        return None
    answer = peek("TXT", plan.names.key_name)
    record = None if answer is None else _usable_record(answer, plan.algorithm)
    return None if record is None else KnownSigner(signature.static, plan, answer, record)


def known_result(
    signer: KnownSigner,
    signature: PlainSignature,
    block: HeaderBlock,
    content: bytes,
    crlf: bool,
    peek: Callable[[str, str], Any],
) -> DkimResult | None:
    """The pass of a message (*content*, its header *block*) whose plain *signature* is by
    the known *signer* (the same static tags), when its key record is still the cached one
    (*peek*) and the signature passes: the result :func:`verify_dkim_now` gives it. None
    otherwise (:func:`verify_dkim_now` then says what it is), and for a message to check
    off the event loop (``EXECUTOR_THRESHOLD``), as :func:`verify_dkim_now`."""
    plan = signer.plan
    names = plan.names
    if len(content) >= EXECUTOR_THRESHOLD or peek("TXT", names.key_name) is not signer.answer:
        return None  # big, or the key's answer expired or changed: the full path decides
    body = _body_of(content, block.body_at, crlf)
    field, _static, b, bh = signature
    result, _detail = _check_planned(plan, b, bh, field, signer.record, block, body, {})
    if result != "pass":
        return None
    passed = DkimResult(
        "pass", names.domain, names.selector, names.algorithm, names.identity, b.decode("ascii")
    )
    _log_results([passed])
    return passed


def _check_planned(
    plan: _Plan,
    b: bytes,
    bh: bytes,
    field: tuple[bytes, bytes],
    record: bytes,
    block: HeaderBlock,
    body: Body,
    canonical: dict[bool, Body],
) -> tuple[str, str]:
    """:func:`_check_signature` of a plain signature (no l=) as its signer's *plan* says,
    with the key *record*, over the message's header *block* and *body*."""
    return _check_signature(
        b,
        bh,
        None,
        field,
        plan.selected,
        plan.relaxed_head,
        plan.relaxed_body,
        plan.sha1,
        record,
        block.fields,
        block.lower,
        body,
        canonical,
    )


@dataclass(frozen=True, slots=True)
class _Plan:
    """What the plain signatures of one signer share (the same tags but b=, bh=, t=):
    the names its results give, its canonicalizations, the fields it signs, and whether
    it is rsa-sha1."""

    names: _Names
    relaxed_head: bool
    relaxed_body: bool
    selected: tuple[bytes, ...]
    sha1: bool
    algorithm: bytes  # a=, as written


@functools.lru_cache(maxsize=1024)
def _plan(static: bytes) -> _Plan | None:
    """The :class:`_Plan` of a signature whose tags but b=, bh=, t= are *static*, when
    :func:`_signature_problem` finds nothing wrong with them (b=, bh= and t= aside: they
    are checked per message); None otherwise."""
    tags = dkim_tag_list(static)  # as dkim_plain_signature wrote it: name=value;...
    if tags is None:
        return None
    tags[b"b"] = tags[b"bh"] = b"AAAA"  # any plain base64: the real ones are checked apart
    if not _plainly_valid(tags):
        return None
    shape = _signer_shape(tags.get(b"c", b"simple/simple"), tags[b"h"], tags[b"d"], tags[b"s"])
    if isinstance(shape, str):
        return None
    names = _names(tags[b"d"], tags[b"s"], tags[b"a"], tags.get(b"i", b""))
    return _Plan(names, *shape, tags[b"a"] == b"rsa-sha1", tags[b"a"])


@functools.lru_cache(maxsize=1024)
def _usable_record(answer: Any, a: bytes) -> bytes | None:
    """The key record :func:`_choose_key` takes from the TXT *answer* for a signature
    whose a= tag is *a*; None when it would find none (the full path then says why)."""
    if answer.status != "ok":
        return None
    for record in answer.values:
        if not _key_problem(a, bytes(record)):
            return bytes(record)
    return None


def _key_names(signatures: list[_Signature]) -> list[str]:
    """The key records the usable *signatures* need, each once."""
    return sorted({sig.key_name for sig in signatures if not sig.error})


def _keyed(signatures: list[_Signature], found: dict[str, Any]) -> list[_Signature]:
    """The usable *signatures* whose key record (in *found*, by name) has a usable key;
    the others get their result (no key, lookup failed, key unusable)."""
    jobs = []
    for sig in signatures:
        if not sig.error:
            _choose_key(sig, found[sig.key_name])
            if not sig.error:
                jobs.append(sig)
    return jobs


def _outcomes(signatures: list[_Signature]) -> list[DkimResult]:
    results = [sig.outcome(sig.result, sig.error) for sig in signatures]
    _log_results(results)
    return results


def _log_results(results: list[DkimResult]) -> None:
    if log.isEnabledFor(logging.DEBUG):
        for res in results:
            log.debug(
                "dkim=%s d=%s s=%s a=%s %s",
                res.result,
                res.domain,
                res.selector,
                res.algorithm,
                res.detail,
            )


@dataclass(slots=True)
class _Parsed:
    """A message's header fields (as ``parse_header`` gives them), their names in lower
    case, where its body starts, and its first DKIM-Signature fields."""

    headers: list[tuple[bytes, bytes]]
    lower: list[bytes]
    body_at: int
    signatures: list[_Signature]


@dataclass(slots=True)  # read-only, but not frozen: one is made per message
class HeaderBlock:
    """The header block of a message read once, for every check after DATA that looks at
    its fields (DKIM, the From domain of DMARC, ARC's first look, forged
    Authentication-Results): the fields as :func:`parse_header` gives them, their names in
    lower case, and where the body starts. Only made for a plain block (see
    :func:`read_header`), where every reader of the header sees the same fields."""

    fields: list[tuple[bytes, bytes]]
    lower: list[bytes]
    body_at: int


def read_header(content: bytes) -> HeaderBlock | None:
    """The :class:`HeaderBlock` of *content* when its header block is plain: at least one
    field, CRLF line ends only, every line a field (a name of printable ASCII, then a colon)
    or a continuation of one, and an empty line after it. None for anything else (an mbox
    "From " line, a stray line, bare CR or LF, no body separator): each check then reads
    the message its own way, as it always did. The last field's line end and the empty
    line must be CRLF too: the checks look for the end of the header in different ways
    (LF CR LF, CR LF CR LF, LF LF), and they agree on a block ended so."""
    found = header_block(content)
    return None if found is None else HeaderBlock(*found)


def _parse_signatures(
    content: bytes, limit: int, now: float, block: HeaderBlock | None = None
) -> _Parsed:
    """*content* parsed, with its first *limit* DKIM-Signature fields syntax-checked (no
    DNS); *block*: its header, already read (:func:`read_header`)."""
    if block is not None:
        headers, lower, body_at = block.fields, block.lower, block.body_at
        if b"dkim-signature" not in lower:
            return _Parsed([], [], body_at, [])
    else:
        blank = blank_line(content)
        text, body_at = _header_text(content, blank)
        if b"dkim-signature" not in text.lower():
            return _Parsed([], [], body_at, [])
        try:
            headers = _header_fields(text, blank is not None)
        except dkim.MessageFormatError as exc:
            # A header block dkimpy cannot read: nothing can be verified, say so once.
            unreadable = _Signature(0, {}, f"unreadable header block: {exc}", "neutral")
            return _Parsed([], [], body_at, [unreadable])
        lower = [name.lower() for name, _value in headers]
    fields = [headers[i] for i, name in enumerate(lower) if name == b"dkim-signature"]
    signatures = []
    for index, field in enumerate(fields[: max(limit, 0)]):
        sig = _Signature(index, {}, field=field)
        try:
            # the compiled reading; None where dkimpy raises: dkimpy then says why
            tags = dkim_tag_list(field[1])
            sig.tags = tags if tags is not None else dkim.util.parse_tag_value(field[1])
        except dkim.util.InvalidTagValueList as exc:
            sig.error, sig.result = f"malformed tag list: {exc}", "neutral"
            signatures.append(sig)
            continue
        problem = _signature_problem(sig, now)
        if problem:
            sig.error, sig.result = problem, "neutral"
        signatures.append(sig)
    return _Parsed(headers, lower, body_at, signatures)


def parse_header(content: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The header fields of *content* and its body, as ``dkim.rfc822_parse`` reads them:
    (name, value) pairs, each value with its folding and a CRLF after each of its lines;
    the body from the first empty line on (LF or CRLF), with CRLF line ends. Raises
    ``dkim.MessageFormatError`` where dkimpy does, and also for a continuation line before
    the first field (where dkimpy fails with IndexError). One pass over the header block:
    a line split and one small regex match per field, against dkimpy's regex per line."""
    blank = blank_line(content)
    text, body_at = _header_text(content, blank)
    return _header_fields(text, blank is not None), _crlf_body(content[body_at:])


def _header_text(content: bytes, blank: tuple[int, int] | None) -> tuple[bytes, int]:
    """The header block of *content* without its last line end, and where the body starts
    (*blank*: what ``blank_line`` found in *content*)."""
    if blank is None:
        return content, len(content)
    end, body_at = blank  # end: 0 (no header at all) or the LF that ends the last field line
    if end and content[end - 1] == 13:
        return content[: end - 1], body_at  # that LF's CR
    return content[:end], body_at


def _header_fields(text: bytes, ended: bool) -> list[tuple[bytes, bytes]]:
    """The fields of a header block from ``_header_text`` (*ended*: an empty line followed
    it), exactly as ``dkim.rfc822_parse`` reads them line by line. A block with CRLF line
    ends only (the usual case) is cut into whole fields with one split instead."""
    if not text:
        return []
    fields = header_fields(text)
    if fields is not None:
        return fields
    return _header_lines(text, ended)


def _header_lines(text: bytes, ended: bool) -> list[tuple[bytes, bytes]]:
    """``_header_fields`` for any line ends, line by line as ``dkim.rfc822_parse``."""
    if b"\r" in text:
        text = text.replace(b"\r\n", b"\n")  # a CR before an LF is part of the line end
    lines = text.split(b"\n")
    if not ended and not lines[-1]:
        lines.pop()  # the message is all header, with a final line end
    fields: list[list[bytes]] = []
    for line in lines:
        if line[0] in (9, 32):  # folded: part of the field above
            if not fields:
                raise dkim.MessageFormatError(f"continuation line before any field: {line!r}")
            fields[-1][1] += line + b"\r\n"
            continue
        match = _FIELD_NAME.match(line)
        if match is not None:
            colon = match.end()
            fields.append([line[: colon - 1], line[colon:] + b"\r\n"])
        elif not line.startswith(b"From "):  # an mbox "From " line is skipped, as dkimpy does
            raise dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {line!r}")
    return [(name, value) for name, value in fields]


#: a message's body: a view of its content (CRLF only: hashed where it is, not copied out
#: of a message of 64 KiB or more), or bytes of its own
Body = bytes | memoryview


def _body_of(content: bytes, body_at: int, crlf: bool) -> Body:
    """The body of *content* from *body_at* with CRLF line ends (*crlf*: it has only
    those, and the body is a view of it)."""
    if crlf:
        return memoryview(content)[body_at:]
    return _crlf_body(content[body_at:])


def _crlf_body(body: bytes) -> bytes:
    """*body* with CRLF line ends, bare LFs read as dkimpy reads them."""
    if body.count(b"\n") != body.count(b"\r\n"):
        body = re.sub(rb"\r?\n", b"\r\n", body)
    return body


@functools.lru_cache(maxsize=64)
def _canonicalization(c: bytes) -> tuple[bool, bool] | None:
    """(relaxed header, relaxed body) for a c= value, as dkimpy reads it; None if invalid."""
    try:
        policy = CanonicalizationPolicy.from_c_value(c)
    except dkim.canonicalization.InvalidCanonicalizationPolicyError:
        return None
    return policy.header_algorithm.name == b"relaxed", policy.body_algorithm.name == b"relaxed"


def _signature_problem(sig: _Signature, now: float) -> str:
    """Why the signature cannot be verified (RFC 6376 §6.1.1), or ""; sets the
    canonicalization and the signed names of *sig* on the way."""
    tags = sig.tags
    try:
        if not _plainly_valid(tags):
            dkim.validate_signature_fields(tags)
    except dkim.DKIMException as exc:
        return str(exc)
    except (IndexError, KeyError, ValueError) as exc:  # dkimpy on odd input (empty d=, ...)
        return f"invalid signature: {exc!r}"
    shape = _signer_shape(tags.get(b"c", b"simple/simple"), tags[b"h"], tags[b"d"], tags[b"s"])
    if isinstance(shape, str):
        return shape
    sig.relaxed_head, sig.relaxed_body, sig.selected = shape
    slack = 3600  # clocks disagree; dkimpy itself allows ten hours
    if b"x" in tags and int(tags[b"x"]) < now - slack:
        return f"signature expired (x={tags[b'x'].decode()})"
    if b"t" in tags and int(tags[b"t"]) > now + slack:
        return f"signature dated in the future (t={tags[b't'].decode()})"
    return ""


@functools.lru_cache(maxsize=1024)
def _signer_shape(
    c: bytes, h: bytes, d: bytes, s: bytes
) -> tuple[bool, bool, tuple[bytes, ...]] | str:
    """(relaxed header, relaxed body, the names of the fields it signs) of a signature with
    these c=, h=, d=, s= tags, or why it cannot be verified (RFC 6376 §6.1.1). The names:
    h= in lower case, split as dkimpy splits it, then From once more, as dkimpy selects
    them (so a From added above the signed one breaks the signature). Cached: one signer's
    messages repeat these tags, and only b=, bh= and the times differ."""
    canonicalization = _canonicalization(c)
    if canonicalization is None:
        return f"unknown canonicalization c={c.decode('ascii', 'replace')}"
    include = tuple(name.lower() for name in _H_SPLIT.split(h))
    if b"from" not in include:
        return "From field not signed"
    if not d.isascii() or not s.isascii():
        return "d= or s= is not ASCII"
    if not d.strip() or not s.strip():
        return "empty d= or s="
    return (*canonicalization, (*include, b"from"))


def _plainly_valid(tags: dict[bytes, bytes]) -> bool:
    """Whether dkimpy's ``validate_signature_fields`` is sure to accept *tags*: the common
    signature, checked in a fraction of its time (it compiles-and-caches a regex per tag).
    Stricter than dkimpy: False sends anything less plain (i=, l=, x=, cv=, an odd d=) to
    dkimpy itself, which then decides and words the error."""
    if not _MANDATORY.issubset(tags) or not _UNPLAIN.isdisjoint(tags):
        return False
    if tags[b"v"] != b"1" or tags[b"a"] not in dkim.HASH_ALGORITHMS:
        return False
    if tags.get(b"q", b"dns/txt") != b"dns/txt" or not _PLAIN_DOMAIN.fullmatch(tags[b"d"]):
        return False
    if not dkim_plain_base64(tags[b"b"]) or not dkim_plain_base64(tags[b"bh"]):
        return False
    stamp = tags.get(b"t")
    if stamp is not None:
        # dkimpy: digits, and not over ten hours ahead of its clock
        return stamp.isdigit() and int(stamp) <= int(time.time()) + 36000
    return True


def _choose_key(sig: _Signature, answer: Any) -> None:
    """Set ``sig.key`` from the TXT lookup, or its result when there is no usable key."""
    if answer.status == "temporary":
        sig.error, sig.result = f"key lookup failed: {answer.detail}", "temperror"
        return
    if answer.status != "ok" or not answer.values:
        # RFC 6376 §6.1.2: no key record is a permanent failure
        sig.error, sig.result = f"no key for signature ({sig.key_name})", "permerror"
        return
    problem = ""
    for record in answer.values:
        problem = _key_problem(sig.tags[b"a"], bytes(record))
        if not problem:
            sig.key = bytes(record)
            return
    sig.error, sig.result = problem, "permerror"


@dataclass(frozen=True, slots=True)
class _PublicKey:
    """A key record, parsed once (dkimpy's ``evaluate_pk``): an RSA key for OpenSSL, or
    the PyNaCl (libsodium) Ed25519 key dkimpy made, which dkimpy verifies with too (the
    same acceptance rules as dkimpy's, and half the time OpenSSL takes)."""

    tags: dict[bytes, bytes]
    size: int
    ktag: bytes | None
    tlsrpt: bool
    key: rsa.RSAPublicKey | nacl.signing.VerifyKey | None
    #: whether *key* is the RSA one: known once here, where an isinstance against
    #: cryptography's RSAPublicKey (an ABC) would cost every verification a Python-level
    #: __instancecheck__
    rsa: bool = False


@functools.lru_cache(maxsize=1024)
def _public_key(record: bytes) -> _PublicKey | str:
    """The parsed key *record*, or why it cannot be used. Cached by the record's bytes: a
    busy MX sees the same few hundred keys over and over, and parsing one (ASN.1 in pure
    Python) costs more than the rest of a verification."""
    try:
        tags = dkim.util.parse_tag_value(record)
    except dkim.util.InvalidTagValueList as exc:
        return f"malformed key record: {exc}"
    if b"p" in tags and not re.sub(rb"\s+", b"", tags[b"p"]):
        return "key revoked (empty p=)"
    try:
        pk, size, ktag, tlsrpt = dkim.evaluate_pk(b"key", record)
    except (dkim.DKIMException, binascii.Error, ValueError, TypeError) as exc:
        return f"unusable key record: {exc}"
    key: rsa.RSAPublicKey | nacl.signing.VerifyKey | None = None
    try:
        if ktag == b"rsa":
            key = rsa.RSAPublicNumbers(pk["publicExponent"], pk["modulus"]).public_key()
        elif ktag == b"ed25519" and isinstance(pk, nacl.signing.VerifyKey):
            key = pk
    except (ValueError, TypeError) as exc:
        return f"unusable key record: {exc}"
    return _PublicKey(tags, size or 0, ktag, bool(tlsrpt), key, isinstance(key, rsa.RSAPublicKey))


def _key_problem(a: bytes, record: bytes) -> str:
    """Why *record* cannot verify a signature whose a= tag is *a* (RFC 6376 §3.6.1,
    §6.1.2), or ""."""
    parsed = _public_key(record)
    if isinstance(parsed, str):
        return parsed
    tags, size, ktag, tlsrpt = parsed.tags, parsed.size, parsed.ktag, parsed.tlsrpt
    if ktag is None or tlsrpt:
        return "key record is not for email (s= tag)"
    algorithm, _, digest = a.partition(b"-")
    if ktag != algorithm:
        return f"key type {ktag.decode()} does not match a={a.decode()}"
    allowed = [h.strip() for h in tags.get(b"h", b"").split(b":") if h.strip()]
    if allowed and digest not in allowed:
        return f"key does not allow {digest.decode()} (h={tags[b'h'].decode()})"
    if ktag == b"rsa" and size < _MIN_RSA_BITS:
        return f"key too small ({size} bits)"
    return ""


class BodyHashFirst:
    """Mixin for dkimpy's verifiers (``dkim.ARC``, for ARC-Message-Signatures): the body
    hash (bh=) is checked here, then dkimpy checks the rest.

    dkimpy canonicalizes the body with regular-expression passes that cost about 3 ms for
    64 KiB, once per signature; here it is canonicalized once per method, by the compiled
    ``canonical_body`` of the MIME kernel, to the same bytes (RFC 6376 §3.4.3, §3.4.4, and
    l=; a property test compares them with dkimpy's). Everything else (tag checks, header
    selection and canonicalization, the key, the signature) stays dkimpy's: once the body
    hash matched, bh= is taken out of the parsed tags handed to dkimpy's ``verify_sig``,
    which then checks the header hash only. A mismatch raises dkimpy's ValidationError
    "body hash mismatch", as dkimpy would. Build with ``(head, body)`` from
    ``split_message``.
    """

    def __init__(self, head: bytes, body: bytes) -> None:
        super().__init__(head, logger=_QUIET, minkey=_MIN_RSA_BITS)  # type: ignore[call-arg]
        self._raw_body = body
        self._canonical: dict[bytes, Body] = {}

    def verify_sig(
        self, sig: dict[bytes, bytes], include_headers: list[bytes], sig_header: Any, dnsfunc: Any
    ) -> Any:
        if b"bh" in sig:
            self._check_body(sig)
            del sig[b"bh"]  # checked: dkimpy goes on with the header hash alone
        return super().verify_sig(sig, include_headers, sig_header, dnsfunc)  # type: ignore[misc]

    def _check_body(self, tags: dict[bytes, bytes]) -> None:
        try:
            method = CanonicalizationPolicy.from_c_value(tags.get(b"c")).body_algorithm.name
        except dkim.canonicalization.InvalidCanonicalizationPolicyError as exc:
            raise dkim.MessageFormatError(f"invalid c= value: {exc}") from None
        body = self._canonical.get(method)
        if body is None:
            body = self._canonical[method] = canonical_body(self._raw_body, method == b"relaxed")
        if b"l" in tags:
            body = body[: int(tags[b"l"])]
        digest = hashlib.sha1 if tags.get(b"a") == b"rsa-sha1" else hashlib.sha256
        try:
            expected = base64.b64decode(re.sub(rb"\s+", b"", tags[b"bh"]), validate=True)
        except binascii.Error:
            raise dkim.ValidationError("bh= value is not valid base64") from None
        if digest(body).digest() != expected:
            raise dkim.ValidationError("body hash mismatch")


def split_message(content: bytes) -> tuple[bytes, bytes]:
    """The header block (with its empty line) and the body with CRLF line ends, split
    where dkimpy splits them (at the first empty line, LF or CRLF)."""
    blank = blank_line(content)
    if blank is None:
        return content, b""
    head, body = content[: blank[1]], content[blank[1] :]
    if body.count(b"\n") != body.count(b"\r\n"):
        body = re.sub(rb"\r?\n", b"\r\n", body)  # bare LFs, as dkimpy reads them
    return head, body


def _verify_signatures(
    parsed: _Parsed, content: bytes, jobs: list[_Signature], crlf: bool = False
) -> None:
    """Check each prefetched signature of the message, setting its result (CPU only);
    *crlf*: the body has CRLF line ends only."""
    headers, lower, body_at = parsed.headers, parsed.lower, parsed.body_at
    body = _body_of(content, body_at, crlf)
    canonical: dict[bool, Body] = {}  # the body in each canonical form, made once
    for sig in jobs:
        try:
            _verify_signature(sig, headers, lower, body, canonical)
        except Exception as exc:  # input nobody foresaw (l= empty, ...): a result, not a crash
            log.info("DKIM signature %d cannot be verified: %r", sig.index, exc)
            sig.error, sig.result = f"cannot verify: {exc!r}", "neutral"


def _verify_signature(
    sig: _Signature,
    headers: list[tuple[bytes, bytes]],
    lower: list[bytes],
    body: Body,
    canonical: dict[bool, Body],
) -> None:
    """dkimpy's ``DKIM.verify`` for one signature whose tags and key were checked before
    (:func:`_check_signature`), setting its result."""
    tags = sig.tags
    result, detail = _check_signature(
        b"".join(tags[b"b"].split()),
        b"".join(tags[b"bh"].split()),
        tags.get(b"l"),
        sig.field,
        sig.selected,
        sig.relaxed_head,
        sig.relaxed_body,
        tags[b"a"] == b"rsa-sha1",
        sig.key,
        headers,
        lower,
        body,
        canonical,
    )
    sig.result, sig.error = result, detail


def _check_signature(
    b: bytes,
    bh: bytes,
    length: bytes | None,
    field: tuple[bytes, bytes],
    selected: tuple[bytes, ...],
    relaxed_head: bool,
    relaxed_body: bool,
    sha1: bool,
    key: bytes | None,
    headers: list[tuple[bytes, bytes]],
    lower: list[bytes],
    body: Body,
    canonical: dict[bool, Body],
) -> tuple[str, str]:
    """(result, detail) of one signature (its b= and bh= without white space, its l= if
    any, its *field* as (name, value), the names it signs, its canonicalizations, whether
    it is rsa-sha1, its key record): the body hash (with l=), then the header hash over
    the h= fields chosen bottom-up (From once more, as dkimpy does, so a From added above
    the signed one breaks it) and the signature field without its b= value, checked by
    OpenSSL with the cached key."""
    digest = hashlib.sha1 if sha1 else hashlib.sha256
    try:
        # base64.b64decode(..., validate=True) without its Python frame
        expected = binascii.a2b_base64(bh, strict_mode=True)
    except binascii.Error:
        return "neutral", "bh= value is not valid base64"
    if not _body_hash_matches(length, relaxed_body, body, canonical, digest, expected):
        return "fail", "body hash mismatch"

    parsed = _public_key(key) if key else "no key"
    if isinstance(parsed, str) or parsed.key is None:
        return "permerror", parsed if isinstance(parsed, str) else "no usable key"
    hashed = digest(dkim_header_input(headers, lower, selected, relaxed_head, field)).digest()
    try:
        signature = binascii.a2b_base64(b)
    except binascii.Error:
        return "fail", "signature did not verify"
    try:
        if parsed.rsa:
            cast(rsa.RSAPublicKey, parsed.key).verify(signature, hashed, _PKCS1, _PREHASHED[sha1])
        else:  # RFC 8463: Ed25519 over the hash
            cast(nacl.signing.VerifyKey, parsed.key).verify(hashed, signature)
    except (InvalidSignature, nacl.exceptions.BadSignatureError, ValueError):
        # ValueError: PyNaCl's for a signature that is not 64 bytes long
        return "fail", "signature did not verify"
    if sha1:
        # RFC 8301 §3.1: rsa-sha1 "MUST NOT be used for signing or verifying"
        return "policy", "rsa-sha1 is not accepted (RFC 8301)"
    return "pass", ""


def _body_hash_matches(
    length: bytes | None,
    relaxed: bool,
    body: Body,
    canonical: dict[bool, Body],
    digest: Callable[[Body], Any],
    expected: bytes,
) -> bool:
    """Whether the body hash of a signature (bh=, decoded: *expected*) is right for *body*
    in its canonical form (*relaxed* or simple, cut at the signature's l=, *length*),
    made once per form and message."""
    form = canonical.get(relaxed)
    if form is None:
        form = canonical[relaxed] = canonical_body(body, relaxed)
    if length is not None:
        form = form[: int(length)]
    return bool(digest(form).digest() == expected)

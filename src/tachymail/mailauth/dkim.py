"""DKIM signing (RFC 6376) with rsa-sha256 and ed25519-sha256 (RFC 8463), and its keys.

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
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import dkim  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from dkim.canonicalization import CanonicalizationPolicy  # type: ignore[import-untyped]

from tachymail.protocol.mime import header_value

__all__ = [
    "ALGORITHMS",
    "SIGNED_HEADERS",
    "DkimError",
    "DkimSigner",
    "dns_record",
    "key_path",
    "keygen",
    "relaxed_body",
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


def _select(headers: list[list[bytes]], names: list[bytes]) -> list[tuple[bytes, bytes]]:
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

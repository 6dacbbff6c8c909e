"""DKIM: key generation, signing, and verification of every signature with dkimpy's
verifier (the DNS answer comes from the record keygen printed)."""

from __future__ import annotations

import base64
import hashlib
import re
import stat
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dkim
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from dkim.canonicalization import CanonicalizationPolicy
from dkim.util import parse_tag_value
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server import run_cli, tachymail_cmd
from tachymail.mailauth.dkim import (
    DkimError,
    DkimSigner,
    dns_record,
    key_path,
    keygen,
    relaxed_body,
)

MESSAGE = (
    b"Received: from client.example ([192.0.2.7])\r\n"
    b"\tby mta.example.com (Tachymail) with ESMTPSA id 0123;\r\n"
    b"\tTue, 14 Nov 2023 22:13:20 -0000\r\n"
    b"From: Alice Example <alice@example.com>\r\n"
    b"To: bob@example.net\r\n"
    b"Cc: carol@example.org\r\n"
    b"Subject: Quarterly figures, with a subject long enough that it is folded\r\n"
    b"  onto a second line\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <figures-1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"X-Mailer: test\r\n"
    b"\r\n"
    b"Here are the figures.  Gr\xc3\xbc\xc3\x9fe,\r\n"
    b"\tAlice   \r\n"
    b"\r\n"
    b"\r\n"
)

ED25519_VERIFY = "dkimpy verifies ed25519-sha256 only with PyNaCl (pip install pynacl)"


def txt_of(record: str) -> bytes:
    """The TXT data of a keygen record: its quoted strings joined, as a resolver returns it."""
    strings = re.findall(r'"([^"]*)"', record)
    assert strings and all(len(s) <= 255 for s in strings)
    return "".join(strings).encode()


def dns_from(records: list[str]) -> Callable[..., bytes | None]:
    """A dkimpy dnsfunc answering from keygen records (the real-DNS check is elsewhere)."""
    zone = {}
    for record in records:
        name, rest = record.split(" IN TXT ", 1)
        zone[name.encode()] = txt_of(rest)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return zone.get(name)

    return dnsfunc


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """One data dir with an RSA key for example.com and an Ed25519 key for ed.example."""
    data = tmp_path_factory.mktemp("data")
    records = [
        keygen(data, "example.com", "sel1"),
        keygen(data, "ed.example", "ed1", "ed25519"),
    ]
    return data, records


@pytest.fixture(scope="module")
def signer(keys: tuple[Path, list[str]]) -> DkimSigner:
    return DkimSigner(keys[0], {"example.com": "sel1", "ed.example": "ed1"})


def verify(message: bytes, records: list[str]) -> bool:
    result: bool = dkim.verify(message, dnsfunc=dns_from(records))
    return result


def tags(signature: bytes) -> dict[bytes, bytes]:
    name, _, value = signature.partition(b":")
    assert name == b"DKIM-Signature"
    parsed: dict[bytes, bytes] = parse_tag_value(re.sub(rb"\r\n", b"", value))
    return parsed


# ---------------------------------------------------------------------------------------------
# keygen


def test_rsa_keygen_writes_a_private_key_and_returns_its_record(tmp_path: Path) -> None:
    record = keygen(tmp_path, "Example.COM.", "s2024")
    path = tmp_path / "dkim" / "example.com" / "s2024.key"
    assert key_path(tmp_path, "example.com", "s2024") == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary file left

    private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(private, rsa.RSAPrivateKey)
    assert private.key_size == 2048
    public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    name, _, strings = record.partition(" IN TXT ")
    assert name == "s2024._domainkey.example.com."
    assert re.fullmatch(r'"[^"]{1,255}"( "[^"]{1,255}")+', strings), "split into 255-char strings"
    assert txt_of(strings) == b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    assert dns_record(tmp_path, "example.com", "s2024") == record


def test_ed25519_keygen(tmp_path: Path) -> None:
    record = keygen(tmp_path, "ed.example", "e1", algorithm="ed25519")
    path = tmp_path / "dkim" / "ed.example" / "e1.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    seed = base64.b64decode(path.read_bytes().strip(), validate=True)
    assert len(seed) == 32
    public = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    p = base64.b64encode(public).decode()
    assert record == f'e1._domainkey.ed.example. IN TXT "v=DKIM1; k=ed25519; p={p}"'


def test_ed25519_key_file_is_the_format_dkimpy_signs_with(tmp_path: Path) -> None:
    pytest.importorskip("nacl", reason=ED25519_VERIFY)
    record = keygen(tmp_path, "ed.example", "e1", algorithm="ed25519")
    private = (tmp_path / "dkim" / "ed.example" / "e1.key").read_bytes().strip()
    signature = dkim.sign(
        MESSAGE, b"e1", b"ed.example", private, signature_algorithm=b"ed25519-sha256"
    )
    assert verify(signature + MESSAGE, [record])


def test_keygen_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    keygen(tmp_path, "example.com", "s1", "ed25519")
    path = key_path(tmp_path, "example.com", "s1")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        keygen(tmp_path, "example.com", "s1", "ed25519")
    assert path.read_bytes() == before
    keygen(tmp_path, "example.com", "s1", "ed25519", force=True)
    assert path.read_bytes() != before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("domain", "selector", "algorithm"),
    [
        ("../../etc", "s1", "rsa"),
        ("example.com", "../s1", "rsa"),
        ("example.com", "a/b", "rsa"),
        ("", "s1", "rsa"),
        ("example.com", "s1", "dsa"),
        ("exa mple.com", "s1", "rsa"),
    ],
)
def test_keygen_rejects_bad_names(
    tmp_path: Path, domain: str, selector: str, algorithm: str
) -> None:
    with pytest.raises(ValueError):
        keygen(tmp_path, domain, selector, algorithm)
    assert not (tmp_path / "dkim").exists() or not any((tmp_path / "dkim").rglob("*.key"))


# ---------------------------------------------------------------------------------------------
# Signing


@pytest.mark.parametrize(
    ("domain", "algorithm"),
    [("example.com", b"rsa-sha256"), ("ed.example", b"ed25519-sha256")],
)
def test_signature_verifies(
    signer: DkimSigner, keys: tuple[Path, list[str]], domain: str, algorithm: bytes
) -> None:
    if algorithm == b"ed25519-sha256":
        pytest.importorskip("nacl", reason=ED25519_VERIFY)
    signature = signer.sign(MESSAGE, domain, now=1_700_000_000)
    assert verify(signature + MESSAGE, keys[1])

    fields = tags(signature)
    assert fields[b"v"] == b"1"
    assert fields[b"a"] == algorithm
    assert fields[b"c"] == b"relaxed/relaxed"
    assert fields[b"d"] == domain.encode()
    assert fields[b"s"] == (b"sel1" if domain == "example.com" else b"ed1")
    assert fields[b"t"] == b"1700000000"
    signed = [name.strip() for name in re.sub(rb"\s", b"", fields[b"h"]).split(b":")]
    # The fields present, in SIGNED_HEADERS order, From once more; never Received or X-Mailer.
    assert signed == [
        b"from",
        b"to",
        b"cc",
        b"subject",
        b"date",
        b"message-id",
        b"mime-version",
        b"content-type",
        b"content-transfer-encoding",
        b"from",
    ]
    # One header field, folded: CRLF line ends, continuation lines, short lines.
    lines = signature.split(b"\r\n")
    assert signature.endswith(b"\r\n") and lines[-1] == b""
    assert all(line.startswith(b" ") for line in lines[1:-1])
    assert all(len(line) <= 78 for line in lines)
    assert signature.count(b"\n") == signature.count(b"\r\n")


def test_signature_breaks_when_the_message_changes(
    signer: DkimSigner, keys: tuple[Path, list[str]]
) -> None:
    signed = signer.sign(MESSAGE, "example.com") + MESSAGE
    assert verify(signed, keys[1])
    assert not verify(signed.replace(b"Here are the figures", b"Here are the fig0res"), keys[1])
    assert not verify(signed.replace(b"Subject: Quarterly", b"Subject: Monthly"), keys[1])
    assert not verify(signed.replace(b"To: bob@", b"To: eve@"), keys[1])


def strict_verify(message: bytes, record: str) -> bool:
    """RFC 6376 §6.1.3 to the letter, for the rsa-sha256 signature on top of *message*: the
    h= list exactly as written. (dkimpy's verify adds one more From to every h= list, which
    protects its users but would hide a signer that forgets to over-sign.)"""
    headers, body = dkim.rfc822_parse(message)
    name, value = headers[0]
    assert name.lower() == b"dkim-signature"
    sig = parse_tag_value(re.sub(rb"\r\n", b"", value))
    policy = CanonicalizationPolicy.from_c_value(sig[b"c"])
    body_hash = base64.b64encode(hashlib.sha256(policy.canonicalize_body(body)).digest())
    if body_hash != sig[b"bh"]:
        return False
    include = [n.lower() for n in re.split(rb"\s*:\s*", sig[b"h"].strip())]
    hasher = hashlib.sha256()
    dkim.hash_headers(
        hasher, policy, policy.canonicalize_headers(headers), include, (name, value), sig
    )
    p = dict(item.strip().split("=", 1) for item in txt_of(record).decode().split(";"))["p"]
    public = serialization.load_der_public_key(base64.b64decode(p))
    assert isinstance(public, rsa.RSAPublicKey)
    try:
        public.verify(
            base64.b64decode(re.sub(rb"\s+", b"", sig[b"b"])),
            hasher.digest(),
            padding.PKCS1v15(),
            utils.Prehashed(hashes.SHA256()),
        )
    except InvalidSignature:
        return False
    return True


def test_from_is_over_signed(signer: DkimSigner, keys: tuple[Path, list[str]]) -> None:
    record = keys[1][0]
    signed = signer.sign(MESSAGE, "example.com") + MESSAGE
    assert strict_verify(signed, record) and verify(signed, keys[1])
    # An unsigned field added in transit is fine...
    extra = signed.replace(b"X-Mailer: test\r\n", b"X-Mailer: test\r\nX-Spam: no\r\n")
    assert strict_verify(extra, record) and verify(extra, keys[1])
    # ...a second From is not, wherever it goes: above the signed one, a verifier that reads
    # h= literally only notices because From is listed twice.
    for forged in (
        signed.replace(b"Received:", b"From: eve@evil.example\r\nReceived:", 1),
        signed.replace(b"X-Mailer: test\r\n", b"X-Mailer: test\r\nFrom: eve@evil.example\r\n"),
    ):
        assert not strict_verify(forged, record)
        assert not verify(forged, keys[1])


def test_relaxed_canonicalization_survives_whitespace_changes(
    signer: DkimSigner, keys: tuple[Path, list[str]]
) -> None:
    signed = signer.sign(MESSAGE, "example.com") + MESSAGE
    rewritten = (
        signed.replace(b"Subject: Quarterly figures, with", b"subject:Quarterly   figures,\twith")
        .replace(b"\r\n  onto a second line", b" onto a second line")
        .replace(b"To: bob@example.net", b"TO:   bob@example.net   ")
        .replace(b"\tAlice   \r\n", b" Alice\r\n")
        .replace(b"figures.  Gr", b"figures. \t Gr")
        + b"\r\n\r\n"
    )
    assert rewritten != signed
    assert verify(rewritten, keys[1])


def test_large_message_signs_correctly(signer: DkimSigner, keys: tuple[Path, list[str]]) -> None:
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor \r\n"
    body = line * (10 * 1024 * 1024 // len(line) + 1)
    message = MESSAGE + body
    assert len(message) > 10 * 1024 * 1024
    started = time.perf_counter()
    signature = signer.sign(message, "example.com")
    elapsed = time.perf_counter() - started
    assert verify(signature + message, keys[1])
    assert not verify(signature + message[:-100] + b"x" + message[-99:], keys[1])
    assert elapsed < 10, f"signing 10 MiB took {elapsed:.1f} s"


def test_lf_only_content_is_signed_as_it_will_travel(
    signer: DkimSigner, keys: tuple[Path, list[str]]
) -> None:
    lf = MESSAGE.replace(b"\r\n", b"\n")
    signature = signer.sign(lf, "example.com")
    assert verify(signature + MESSAGE, keys[1])


def test_sign_is_safe_from_threads(signer: DkimSigner, keys: tuple[Path, list[str]]) -> None:
    messages = [MESSAGE.replace(b"figures.", f"figures {i}.".encode()) for i in range(24)]
    domains = ["example.com", "ed.example"] if _have_nacl() else ["example.com"]
    jobs = [(m, domains[i % len(domains)]) for i, m in enumerate(messages)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        signatures = list(pool.map(lambda job: signer.sign(*job), jobs))
    for (message, _), signature in zip(jobs, signatures, strict=True):
        assert verify(signature + message, keys[1])


def _have_nacl() -> bool:
    try:
        import nacl  # noqa: F401
    except ImportError:
        return False
    return True


def test_sign_errors(signer: DkimSigner) -> None:
    with pytest.raises(ValueError, match=r"no DKIM key for domain 'other\.example'"):
        signer.sign(MESSAGE, "other.example")
    with pytest.raises(DkimError, match="without a From"):
        signer.sign(b"To: bob@example.net\r\nSubject: x\r\n\r\nbody\r\n", "example.com")
    with pytest.raises(DkimError, match="cannot sign"):
        signer.sign(b"From: a@example.com\r\nnot a header line\r\n\r\nbody\r\n", "example.com")


def test_pem_ed25519_key_from_openssl_is_used(tmp_path: Path) -> None:
    pytest.importorskip("nacl", reason=ED25519_VERIFY)
    private = ed25519.Ed25519PrivateKey.generate()
    path = key_path(tmp_path, "pem.example", "p1")
    path.parent.mkdir(parents=True)
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    record = dns_record(tmp_path, "pem.example", "p1")
    signer = DkimSigner(tmp_path, {"pem.example": "p1"})
    assert verify(signer.sign(MESSAGE, "pem.example") + MESSAGE, [record])


def test_missing_or_bad_key_names_the_file_and_the_command(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as missing:
        DkimSigner(tmp_path, {"example.com": "sel9"})
    text = str(missing.value)
    assert str(tmp_path / "dkim" / "example.com" / "sel9.key") in text
    assert "tachymail dkim keygen --domain example.com --selector sel9" in text

    path = key_path(tmp_path, "example.com", "bad")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a key\n")
    with pytest.raises(ValueError, match="not a usable private key"):
        DkimSigner(tmp_path, {"example.com": "bad"})


# ---------------------------------------------------------------------------------------------
# Which domain signs


def test_signing_domain_rules(signer: DkimSigner) -> None:
    def content(from_: str) -> bytes:
        return f"From: {from_}\r\nSubject: x\r\n\r\nbody\r\n".encode()

    # The From domain wins when it is configured...
    assert signer.signing_domain("bounce@ed.example", MESSAGE) == "example.com"
    assert signer.signing_domain("x@other.example", content("A <a@Example.COM>")) == "example.com"
    assert signer.signing_domain("", content('"Q, R" <q@ed.example>')) == "ed.example"
    # ...else the envelope sender's domain...
    assert signer.signing_domain("bounces@ED.example", content("a@other.example")) == "ed.example"
    assert signer.signing_domain("x@example.com", b"Subject: no from\r\n\r\nbody\r\n") == (
        "example.com"
    )
    # ...else nothing: no parent-domain match, no null sender.
    assert signer.signing_domain("x@other.example", content("a@sub.example.com")) is None
    assert signer.signing_domain("", content("a@other.example")) is None
    assert signer.domains == {"example.com": "sel1", "ed.example": "ed1"}


# ---------------------------------------------------------------------------------------------
# Body canonicalization against dkimpy's


_POLICY = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from([b"a", b"b c", b" ", b"\t", b"  ", b"\r\n", b"\xc3\xa9"]), max_size=40)
)
def test_relaxed_body_matches_dkimpy(pieces: list[bytes]) -> None:
    body = b"".join(pieces)
    assert relaxed_body(body) == _POLICY.canonicalize_body(body)


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_keygen(tmp_path: Path) -> None:
    out = run_cli(
        "dkim", "keygen", "--domain", "cli.example", "--selector", "s1", data_dir=tmp_path
    )
    record = out.strip()
    assert record.startswith('s1._domainkey.cli.example. IN TXT "v=DKIM1; k=rsa; p=')
    assert record == dns_record(tmp_path, "cli.example", "s1")
    path = key_path(tmp_path, "cli.example", "s1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    command = [*tachymail_cmd(), "dkim", "keygen", "--domain", "cli.example", "--selector", "s1"]
    again = subprocess.run(
        [*command, "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 2
    assert "exists" in again.stderr and "--force" in again.stderr
    assert dns_record(tmp_path, "cli.example", "s1") == record

    out = run_cli(
        "dkim",
        "keygen",
        "--domain",
        "cli.example",
        "--selector",
        "s1",
        "--algorithm",
        "ed25519",
        "--force",
        data_dir=tmp_path,
    )
    assert out.startswith('s1._domainkey.cli.example. IN TXT "v=DKIM1; k=ed25519; p=')
    assert out.strip() == dns_record(tmp_path, "cli.example", "s1")

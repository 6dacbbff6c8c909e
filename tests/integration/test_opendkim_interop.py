"""DKIM interoperability with OpenDKIM (Debian's opendkim and opendkim-tools).

OpenDKIM signs, Tachymail verifies: ``opendkim -t`` (its milter-less test mode, with a
private configuration file this test writes) runs the milter's own callbacks on a message
file and, with ``-vvv``, prints the header fields the milter would insert; the
DKIM-Signature it prints is put on top of the message, exactly as the milter's "insert
header at index 0" would. Keys: RSA from ``opendkim-genkey`` (its zone-file record is what
we publish), Ed25519 from ``openssl genpkey`` (the PEM form OpenDKIM reads). The records are
served by dnsmasq on a loopback port and read through the real ``tachymail.dns.Resolver``.
``opendkim-testmsg`` signs too, but only with rsa-sha1, which RFC 8301 forbids relying on:
such a signature must come out "policy" (verified, not accepted), or "permerror" when the
key's record says h=sha256, as opendkim-genkey's does.

Tachymail signs, OpenDKIM verifies: ``opendkim -t`` verifies in test mode and reports the
Authentication-Results it would add. OpenDKIM's resolver only talks to port 53
(``Nameservers`` takes addresses, no port), so it reads the public keys from the file named
by ``TestPublicKeys``, which exists for this kind of testing.

``opendkim -t`` runs in the foreground and exits; ``subprocess.run`` kills it on timeout.
dnsmasq is stopped by its PID (tests/dnsserver.py).
"""

from __future__ import annotations

import asyncio
import base64
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from dnsserver import DnsRecords, running_dnsmasq
from fakedns import ZoneLookups
from tachymail.dns import Resolver
from tachymail.mailauth.dkim import DkimResult, DkimSigner, dns_record, keygen, verify_dkim

OPENDKIM = Path("/usr/sbin/opendkim")
TESTMSG = Path("/usr/sbin/opendkim-testmsg")
GENKEY = Path("/usr/sbin/opendkim-genkey")
OPENSSL = Path("/usr/bin/openssl")
DOMAIN = "interop.example"

MESSAGE = (
    b"From: Alice Example <alice@interop.example>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: Interop, with a subject long enough\r\n"
    b"  to be folded\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <interop-1@interop.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello there.   Three spaces, a tab\there, and trailing white space   \r\n"
    b"\r\n"
    b"Gr\xc3\xbc\xc3\x9fe\r\n"
    b"\r\n"
    b"\r\n"
)
BIG = MESSAGE + b"".join(
    b"line %05d of a long body, to cross the executor threshold\r\n" % i for i in range(1200)
)


def _require() -> None:
    for tool, package in (
        (OPENDKIM, "opendkim"),
        (TESTMSG, "opendkim-tools"),
        (GENKEY, "opendkim-tools"),
        (OPENSSL, "openssl"),
    ):
        if not tool.exists():
            pytest.skip(f"{tool} is not installed (Debian package {package})")


@dataclass
class Keys:
    """The OpenDKIM-side keys of this module and their published TXT values."""

    home: Path
    rsa_key: Path  # opendkim-genkey, selector "odrsa"
    ed_key: Path  # openssl genpkey PEM, selector "oded"
    records: dict[str, str]  # owner name -> TXT text


def _zone_text(zone_file: str) -> str:
    """The TXT text of an opendkim-genkey .txt file: its quoted strings joined."""
    return "".join(re.findall(r'"([^"]*)"', zone_file))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    _require()
    home = tmp_path_factory.mktemp("opendkim")
    home.chmod(0o700)
    subprocess.run(
        [str(GENKEY), "-D", str(home), "-d", DOMAIN, "-s", "odrsa", "-b", "2048"],
        check=True,
        timeout=120,
    )
    ed_key = home / "oded.pem"
    subprocess.run(
        [str(OPENSSL), "genpkey", "-algorithm", "ed25519", "-out", str(ed_key)],
        check=True,
        timeout=60,
    )
    private = serialization.load_pem_private_key(ed_key.read_bytes(), password=None)
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    ed_public = base64.b64encode(private.public_key().public_bytes_raw()).decode()
    records = {
        f"odrsa._domainkey.{DOMAIN}": _zone_text((home / "odrsa.txt").read_text()),
        f"oded._domainkey.{DOMAIN}": f"v=DKIM1; k=ed25519; p={ed_public}",
    }
    assert "h=sha256" in records[f"odrsa._domainkey.{DOMAIN}"]  # as opendkim-genkey writes it
    return Keys(home, home / "odrsa.private", ed_key, records)


@pytest.fixture(scope="module")
def resolver(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Resolver]:
    """The real resolver, asking a dnsmasq that serves the OpenDKIM keys' records."""
    records = DnsRecords()
    for owner, text in keys.records.items():
        records.txt(owner, text)
    with running_dnsmasq(tmp_path_factory.mktemp("dnsmasq"), records) as server:
        yield Resolver(server.address, timeout=2.0)


def _run_opendkim(home: Path, config: dict[str, str], message: bytes, name: str) -> str:
    """``opendkim -t`` on *message* with a private configuration; its report (-vvv)."""
    conf = home / f"{name}.conf"
    lines = {"Syslog": "no", "RequireSafeKeys": "no", **config}  # /tmp is world-writable
    conf.write_text("".join(f"{k} {v}\n" for k, v in lines.items()))
    path = home / f"{name}.eml"
    path.write_bytes(message)
    done = subprocess.run(
        [str(OPENDKIM), "-x", str(conf), "-vvv", "-t", str(path)],
        capture_output=True,
        timeout=60,
    )
    report = (done.stdout + done.stderr).decode("utf-8", "replace")
    assert done.returncode == 0, report
    return report


def opendkim_sign(keys: Keys, message: bytes, algorithm: str, canon: str) -> bytes:
    """*message* signed by OpenDKIM: the DKIM-Signature its milter would insert, on top."""
    key, selector = (keys.rsa_key, "odrsa") if algorithm == "rsa-sha256" else (keys.ed_key, "oded")
    config = {
        "Mode": "s",
        "Domain": DOMAIN,
        "Selector": selector,
        "KeyFile": str(key),
        "SignatureAlgorithm": algorithm,
        "Canonicalization": canon,
    }
    report = _run_opendkim(keys.home, config, message, f"sign-{selector}")
    found = re.search(r"### INSHEADER: idx=0 hname='DKIM-Signature' hvalue='([^']*)'", report)
    assert found, report
    value = found[1].replace("\r\n", "\n").replace("\n", "\r\n").encode()
    return b"DKIM-Signature: " + value + b"\r\n" + message


def verify(resolver: Resolver, content: bytes) -> list[DkimResult]:
    return asyncio.run(verify_dkim(resolver, content))


# OpenDKIM 2.11's Ed25519 signatures with "simple" header canonicalization do not verify,
# in OpenDKIM itself either (tried: its own -t verification says "signature verification
# failed", as we do), so Ed25519 is checked with relaxed header canonicalization only.
SIGNING = [
    ("rsa-sha256", "relaxed/relaxed"),
    ("rsa-sha256", "simple/simple"),
    ("rsa-sha256", "relaxed/simple"),
    ("ed25519-sha256", "relaxed/relaxed"),
    ("ed25519-sha256", "relaxed/simple"),
]


@pytest.mark.parametrize(("algorithm", "canon"), SIGNING)
@pytest.mark.parametrize("message", [MESSAGE, BIG], ids=["small", "big"])
def test_opendkim_signature_verifies_here(
    keys: Keys, resolver: Resolver, algorithm: str, canon: str, message: bytes
) -> None:
    signed = opendkim_sign(keys, message, algorithm, canon)
    assert f"a={algorithm}; c={canon}".encode() in signed
    [result] = verify(resolver, signed)
    assert (result.result, result.domain, result.algorithm) == ("pass", DOMAIN, algorithm), (
        result.detail
    )
    tampered = signed.replace(b"Hello there.", b"Hello there!")
    assert verify(resolver, tampered)[0].result == "fail"
    forged = signed.replace(b"Subject: Interop", b"Subject: Extortion")
    assert verify(resolver, forged)[0].result == "fail"


def test_opendkim_testmsg_rsa_sha1(keys: Keys, resolver: Resolver, tmp_path: Path) -> None:
    """opendkim-testmsg signs with rsa-sha1 only: verified but not accepted (RFC 8301)."""
    keygen(tmp_path, DOMAIN, "ours", "rsa")  # a key whose record has no h= restriction
    ours = tmp_path / "dkim" / DOMAIN / "ours.key"
    signed = {}
    for selector, key in (("ours", ours), ("odrsa", keys.rsa_key)):
        done = subprocess.run(
            [str(TESTMSG), "-C", "-d", DOMAIN, "-s", selector, "-k", str(key)],
            input=MESSAGE,
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert b"a=rsa-sha1;" in done.stdout
        signed[selector] = done.stdout.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    record = dns_record(tmp_path, DOMAIN, "ours")
    zone = ZoneLookups({(f"ours._domainkey.{DOMAIN}", "TXT"): [_zone_text(record)]})
    [result] = asyncio.run(verify_dkim(zone, signed["ours"]))
    assert (result.result, result.detail) == ("policy", "rsa-sha1 is not accepted (RFC 8301)")
    bad = signed["ours"].replace(b"Hello there.", b"Hello there!")
    assert asyncio.run(verify_dkim(zone, bad))[0].result == "fail"
    # opendkim-genkey's record says h=sha256: the key itself refuses sha1
    [result] = verify(resolver, signed["odrsa"])
    assert (result.result, result.detail) == ("permerror", "key does not allow sha1 (h=sha256)")


@pytest.fixture(scope="module")
def our_keys(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> tuple[Path, Path]:
    """Our signing keys (keygen RSA and Ed25519, and OpenDKIM's Ed25519 PEM in our layout)
    and the TestPublicKeys file OpenDKIM reads their records from."""
    data = tmp_path_factory.mktemp("ours")
    lines = []
    for selector, algorithm in (("tmrsa", "rsa"), ("tmed", "ed25519")):
        record = keygen(data, DOMAIN, selector, algorithm)
        lines.append(f"{selector}._domainkey.{DOMAIN} {_zone_text(record)}")
    shared = data / "dkim" / DOMAIN / "oded.key"
    shared.write_bytes(keys.ed_key.read_bytes())  # a key moves between the two as it is
    lines.append(f"oded._domainkey.{DOMAIN} {keys.records[f'oded._domainkey.{DOMAIN}']}")
    public = keys.home / "public-keys"
    public.write_text("\n".join(lines) + "\n")
    return data, public


def opendkim_verify(keys: Keys, public: Path, message: bytes) -> str:
    """The Authentication-Results value OpenDKIM's verifier would add to *message*."""
    config = {"Mode": "v", "TestPublicKeys": str(public), "AuthservID": "opendkim.test"}
    report = _run_opendkim(keys.home, config, message, "verify")
    found = re.search(r"hname='Authentication-Results' hvalue='([^']*)'", report)
    assert found, report
    return found[1]


@pytest.mark.parametrize("selector", ["tmrsa", "tmed", "oded"])
@pytest.mark.parametrize("message", [MESSAGE, BIG], ids=["small", "big"])
def test_our_signature_verifies_in_opendkim(
    keys: Keys, our_keys: tuple[Path, Path], selector: str, message: bytes
) -> None:
    data, public = our_keys
    signed = DkimSigner(data, {DOMAIN: selector}).sign(message, DOMAIN) + message
    results = opendkim_verify(keys, public, signed)
    assert re.search(
        rf"dkim=pass .*header\.d={re.escape(DOMAIN)} .*header\.s={selector} ", results
    ), results
    tampered = signed.replace(b"Hello there.", b"Hello there!")
    assert "dkim=fail" in opendkim_verify(keys, public, tampered)


def test_opendkim_reads_our_results_the_same(keys: Keys, our_keys: tuple[Path, Path]) -> None:
    """Two of our signatures and a broken third: OpenDKIM and verify_dkim agree on each."""
    data, public = our_keys
    rsa = DkimSigner(data, {DOMAIN: "tmrsa"}).sign(MESSAGE, DOMAIN)
    ed = DkimSigner(data, {DOMAIN: "tmed"}).sign(MESSAGE, DOMAIN)
    broken = re.sub(
        rb"b=[A-Za-z0-9+/]{8}",
        b"b=AAAAAAAA",
        DkimSigner(data, {DOMAIN: "oded"}).sign(MESSAGE, DOMAIN),
        count=1,
    )
    signed = rsa + ed + broken + MESSAGE
    theirs = opendkim_verify(keys, public, signed)
    zone = ZoneLookups(
        {
            (name, "TXT"): [text]
            for name, text in (line.split(" ", 1) for line in public.read_text().splitlines())
        }
    )
    ours = asyncio.run(verify_dkim(zone, signed))
    assert [(r.selector, r.result) for r in ours] == [
        ("tmrsa", "pass"),
        ("tmed", "pass"),
        ("oded", "fail"),
    ]
    for r in ours:
        assert re.search(rf"dkim={r.result}\b[^;]*header\.s={r.selector}\b", theirs), theirs

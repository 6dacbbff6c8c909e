"""`tachymail mailauth check` as an operator runs it, against a real DNS server (dnsmasq on
a loopback port) publishing SPF, DKIM and DMARC records: the Authentication-Results field
it prints, the JSON details, and its exit status."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnsserver import DnsRecords, DnsServer, running_dnsmasq
from server import tachymail_cmd
from tachymail.mailauth.dkim import DkimSigner, dns_record, keygen

AUTHSERV = "mx.receiver.test"
SIGNER_IP = "192.0.2.10"
STRANGER_IP = "203.0.113.5"

MESSAGE = (
    b"From: Alice <alice@signed.test>\r\n"
    b"To: bob@receiver.test\r\n"
    b"Subject: quarterly figures\r\n"
    b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
    b"Message-ID: <q4@signed.test>\r\n"
    b"\r\n"
    b"The figures are attached.\r\n"
)


def txt_strings(record: str) -> str:
    """The text of a zone-file TXT line (its quoted strings joined)."""
    return "".join(re.findall(r'"([^"]*)"', record))


@dataclass
class Setup:
    dns: DnsServer
    config: Path
    signer: DkimSigner


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("mailauth-cli")
    data = base / "data"
    keygen(data, "signed.test", "s1")
    records = (
        DnsRecords()
        .txt("s1._domainkey.signed.test", txt_strings(dns_record(data, "signed.test", "s1")))
        .txt("signed.test", "v=spf1 ip4:192.0.2.0/25 -all")
        .txt("_dmarc.signed.test", "v=DMARC1; p=reject; rua=mailto:dmarc@signed.test")
        .ptr(SIGNER_IP, "mail.signed.test")
        .a("mail.signed.test", SIGNER_IP)
        .txt("mail.signed.test", "v=spf1 a -all")
        .txt("bulk.test", "v=spf1 ip4:198.51.100.0/24 ~all")
        .txt("_dmarc.bulk.test", "v=DMARC1; p=quarantine")
    )
    config = base / "tachymail.toml"
    config.write_text(f'[server]\nhostname = "{AUTHSERV}"\ndata_dir = "{data}"\n')
    with running_dnsmasq(base / "dns", records) as dns_server:
        yield Setup(dns_server, config, DkimSigner(data, {"signed.test": "s1"}))


def check(
    setup: Setup, message: bytes, ip: str, helo: str, mail_from: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    path = setup.config.parent / "message.eml"
    path.write_bytes(message)
    return subprocess.run(
        [
            *tachymail_cmd(),
            "mailauth",
            "check",
            str(path),
            "--ip",
            ip,
            "--helo",
            helo,
            "--mail-from",
            mail_from,
            "--resolver",
            setup.dns.address,
            "-c",
            str(setup.config),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def details(setup: Setup, message: bytes, ip: str, helo: str, mail_from: str) -> dict[str, Any]:
    done = check(setup, message, ip, helo, mail_from, "--json")
    assert done.returncode == 0, done.stderr
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


def unfolded(header: str) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", header).strip()


def test_signed_message_from_its_own_server_passes_everything(setup: Setup) -> None:
    signed = setup.signer.sign(MESSAGE, "signed.test") + MESSAGE
    done = check(setup, signed, SIGNER_IP, "mail.signed.test", "alice@signed.test")
    assert done.returncode == 0, done.stderr
    header = unfolded(done.stdout)
    b = re.search(rb"\bb=([A-Za-z0-9+/]{8})", re.sub(rb"\s", b"", signed.split(b"\r\n\r\n")[0]))
    assert b is not None
    b8 = b.group(1).decode()
    b8 = f'"{b8}"' if "/" in b8 else b8  # "/" is not allowed in a token (RFC 2045)
    assert header == (
        f"Authentication-Results: {AUTHSERV};"
        "\tspf=pass smtp.mailfrom=alice@signed.test;"
        "\tspf=pass smtp.helo=mail.signed.test;"
        "\tdkim=pass header.d=signed.test header.s=s1 header.a=rsa-sha256 "
        f"header.b={b8};"
        "\tdmarc=pass (p=reject dis=none) header.from=signed.test;"
        "\tarc=none;"
        f"\tiprev=pass policy.iprev={SIGNER_IP} (mail.signed.test)"
    )
    assert all(len(line) <= 78 for line in done.stdout.splitlines())
    assert "action: accept at data" in done.stderr


def test_json_gives_every_result_with_its_details(setup: Setup) -> None:
    signed = setup.signer.sign(MESSAGE, "signed.test") + MESSAGE
    report = details(setup, signed, SIGNER_IP, "mail.signed.test", "alice@signed.test")
    assert report["authserv_id"] == AUTHSERV
    assert (report["action"], report["stage"], report["reply"]) == ("accept", "data", None)
    assert report["spf"]["result"] == "pass" and report["spf"]["domain"] == "signed.test"
    assert report["spf"]["mechanism"] == "ip4:192.0.2.0/25"
    assert report["helo"]["result"] == "pass"
    [dkim] = report["dkim"]
    assert (dkim["result"], dkim["domain"], dkim["selector"]) == ("pass", "signed.test", "s1")
    dmarc = report["dmarc"]
    assert (dmarc["result"], dmarc["policy"], dmarc["disposition"]) == ("pass", "reject", "none")
    assert dmarc["spf_aligned"] and dmarc["dkim_aligned"]
    assert report["arc"]["result"] == "none"
    assert report["iprev"] == {
        "result": "pass",
        "name": "mail.signed.test",
        "detail": "",
        "ip": SIGNER_IP,
    }
    assert report["summary"] == "spf=pass spf_helo=pass dkim=pass dmarc=pass arc=none iprev=pass"
    assert report["header"].startswith(f"Authentication-Results: {AUTHSERV};\r\n")


def test_spf_alone_makes_dmarc_pass_for_an_unsigned_message(setup: Setup) -> None:
    report = details(setup, MESSAGE, "192.0.2.77", "[192.0.2.77]", "bounces@signed.test")
    assert report["spf"]["result"] == "pass"
    assert report["helo"]["result"] == "none"  # an address literal is not a domain
    assert [d["result"] for d in report["dkim"]] == []
    header = unfolded(report["header"])
    assert "\tdkim=none;" in header
    assert "\tdmarc=pass (p=reject dis=none) header.from=signed.test;" in header
    assert report["iprev"]["result"] == "permerror"
    assert report["action"] == "accept"


def test_forged_mail_gets_the_dmarc_reject(setup: Setup) -> None:
    done = check(setup, MESSAGE, STRANGER_IP, "evil.example", "ceo@evil.example")
    assert done.returncode == 0, "the checks' verdict is not the command's failure"
    header = unfolded(done.stdout)
    assert "\tspf=none smtp.mailfrom=ceo@evil.example;" in header
    assert "\tdmarc=fail (p=reject dis=reject) header.from=signed.test;" in header
    assert "action: reject at data (550 5.7.1 " in done.stderr
    report = details(setup, MESSAGE, STRANGER_IP, "evil.example", "ceo@evil.example")
    assert report["action"] == "reject"
    assert report["reply"].startswith("550 5.7.1 ")
    assert "signed.test" in report["reply"]
    assert report["dmarc"]["disposition"] == "reject"
    assert not report["dmarc"]["spf_aligned"] and not report["dmarc"]["dkim_aligned"]


def test_spf_fail_from_the_wrong_address_with_an_altered_body(setup: Setup) -> None:
    signed = setup.signer.sign(MESSAGE, "signed.test") + MESSAGE
    altered = signed.replace(b"The figures are attached.", b"Pay invoice 42 today.")
    report = details(setup, altered, STRANGER_IP, "mail.signed.test", "alice@signed.test")
    assert report["spf"]["result"] == "fail"
    assert report["helo"]["result"] == "fail"
    [dkim] = report["dkim"]
    assert dkim["result"] == "fail"
    assert report["dmarc"]["result"] == "fail"
    assert report["action"] == "reject"
    header = unfolded(report["header"])
    assert re.search(r'\tspf=fail reason="[^"]+" smtp\.mailfrom=alice@signed\.test;', header)
    assert re.search(r'\tdkim=fail reason="[^"]+" header\.d=signed\.test ', header)


def test_quarantine_and_a_forged_authentication_results_field(setup: Setup) -> None:
    forged = (
        f"Authentication-Results: {AUTHSERV.upper()}; dkim=pass header.d=bulk.test\r\n".encode()
        + MESSAGE.replace(b"alice@signed.test", b"news@bulk.test")
    )
    report = details(setup, forged, STRANGER_IP, "out.bulk.test", "news@bulk.test")
    assert report["forged_removed"] == 1
    assert report["spf"]["result"] == "softfail"  # ~all: not a pass, so not aligned
    assert (report["dmarc"]["result"], report["dmarc"]["disposition"]) == ("fail", "quarantine")
    assert report["action"] == "quarantine"  # [mailauth] dmarc_quarantine = "hold"
    assert report["header"].count("Authentication-Results:") == 1
    listed = details(setup, forged, "198.51.100.9", "out.bulk.test", "news@bulk.test")
    assert listed["spf"]["result"] == "pass"
    assert listed["dmarc"]["result"] == "pass"
    assert listed["action"] == "accept"


def test_bad_arguments_exit_2_with_one_line(setup: Setup) -> None:
    done = check(setup, MESSAGE, "999.1.2.3", "x.test", "a@x.test")
    assert done.returncode == 2
    assert done.stderr.strip() == "tachymail: --ip: '999.1.2.3' is not an IP address"
    missing = subprocess.run(
        [
            *tachymail_cmd(),
            *("mailauth", "check", str(setup.config.parent / "nope.eml")),
            *("--ip", "192.0.2.1", "--helo", "x.test", "--mail-from", "a@x.test"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2
    assert "nope.eml: No such file or directory" in missing.stderr

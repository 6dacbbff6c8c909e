"""Tachymail's DMARC verdict equals OpenDMARC's on the same messages and DNS records.

OpenDMARC (Debian's ``opendmarc`` milter) asks the system resolver, which only talks to
port 53 of the address in /etc/resolv.conf. So it runs, with a dnsmasq serving the test's
records on 127.0.0.1:53, inside private namespaces made with ``unshare``: a network
namespace (its own loopback, nothing else), a mount namespace (a bind-mounted resolv.conf
pointing at that dnsmasq) and a PID namespace (stopping the ``unshare`` process by its PID
kills everything inside). A private Postfix outside the namespaces feeds it the messages
over a milter UNIX socket (file sockets cross network namespaces), and ``postcat`` reads
the Authentication-Results field it added to the queued message.

Tachymail's side looks the same records up with its own resolver, from a dnsmasq on a
loopback port. Both sides judge the same SPF and DKIM results: the messages carry an
Authentication-Results field from a trusted authserv-id (``upstream.test``) saying what SPF
and DKIM found, which OpenDMARC reads (TrustedAuthservIDs), and check_dmarc is given the
same results as SpfResult/DkimResult. What is compared is DMARC itself: discovery, the
organizational domain (both use the same public suffix list file), record parsing,
alignment, p/sp, and the disposition (pct is 0 or 100 here: OpenDMARC's sampling draws its
own random numbers).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dnsserver import DnsRecords, running_dnsmasq
from tachymail.dns import Resolver
from tachymail.mailauth.dkim import DkimResult
from tachymail.mailauth.dmarc import DmarcResult, check_dmarc, from_domain
from tachymail.mailauth.spf import SpfResult

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from peers import (
    POSTFIX,
    _stop_by_pid,
    free_port,
    postfix_available,
    wait_port,
    write_postfix_config,
)

OPENDMARC = "/usr/sbin/opendmarc"
DNSMASQ = "/usr/sbin/dnsmasq"
POSTCAT = "/usr/sbin/postcat"
UNSHARE = "/usr/bin/unshare"

# The DMARC records both sides see (also given to check_dmarc as an in-memory zone).
# Real public suffixes (.com, .co.uk ...): all DNS is private to the namespace, and
# OpenDMARC, unlike the Public Suffix List algorithm, finds no organizational domain
# under a TLD the list does not know (.test).
TXT: dict[str, list[str]] = {
    "_dmarc.example.com": ["v=DMARC1; p=reject"],
    "_dmarc.none.example.com": ["v=DMARC1; p=none"],
    "_dmarc.broken.example.com": ["v=DMARC1; pct=100"],
    "_dmarc.ruaonly.example.com": ["v=DMARC1; rua=mailto:dmarc@example.com"],
    "_dmarc.twice.example.com": ["v=DMARC1; p=reject", "v=DMARC1; p=none"],
    "_dmarc.example.net": ["v=DMARC1; p=reject; sp=quarantine"],
    "_dmarc.example.org": ["v=DMARC1; p=quarantine; pct=100"],
    "_dmarc.example.info": ["v=DMARC1; p=reject; adkim=s; aspf=s"],
    "_dmarc.example.co.uk": ["v=DMARC1; p=reject; sp=none"],
    "_dmarc.example.biz": ["v=DMARC1; p=reject; pct=0"],
    "_dmarc.example.io": ["v=spf1 -all"],  # a TXT record that is not DMARC
}


STRICT_BUG = (
    "strict alignment (adkim=s/aspf=s) means equal names (RFC 7489 §3.1.1, §3.1.2); "
    "OpenDMARC with a public suffix list matches organizational domains (its PR #268/#354)"
)


@dataclass(frozen=True)
class Case:
    """A message: its From domain, the MAIL FROM domain SPF judged, the DKIM d= values."""

    name: str
    author: str
    spf: tuple[str, str] | None  # (result, domain)
    dkim: tuple[tuple[str, str], ...] = ()  # ((result, d=), ...)
    #: where OpenDMARC 1.4.2 departs from RFC 7489: (its result, why); ours must then be
    #: ``rfc_result`` (a fixed OpenDMARC that agrees with us passes too)
    opendmarc_differs: tuple[str, str] | None = None
    rfc_result: str = ""


CASES = [
    Case("pass by spf", "example.com", ("pass", "example.com")),
    Case("pass by dkim", "example.com", ("fail", "elsewhere.net"), (("pass", "example.com"),)),
    Case("fail p=reject", "example.com", ("pass", "elsewhere.net"), (("pass", "other.net"),)),
    Case(
        "fail p=reject, dkim fails",
        "example.com",
        ("softfail", "example.com"),
        (("fail", "example.com"),),
    ),
    Case("fail p=quarantine", "example.org", ("fail", "example.org")),
    Case("fail p=none, own record", "none.example.com", ("fail", "none.example.com")),
    Case("no record", "example.io", ("fail", "example.io")),
    Case("no domain at all", "nowhere.example.us", ("pass", "nowhere.example.us")),
    Case("subdomain gets sp", "mail.example.net", ("fail", "mail.example.net")),
    Case("org domain gets p", "example.net", ("fail", "example.net")),
    Case("subdomain without sp gets p", "news.example.com", ("fail", "news.example.com")),
    Case("relaxed spf passes", "news.example.com", ("pass", "bounces.example.com")),
    Case("relaxed dkim passes", "example.com", None, (("pass", "news.example.com"),)),
    Case(
        "strict spf fails",
        "example.info",
        ("pass", "bounces.example.info"),
        opendmarc_differs=("pass", STRICT_BUG),
        rfc_result="fail",
    ),
    Case(
        "strict dkim fails",
        "example.info",
        None,
        (("pass", "news.example.info"),),
        opendmarc_differs=("pass", STRICT_BUG),
        rfc_result="fail",
    ),
    Case(
        "strict, subdomain author",
        "news.example.info",
        None,
        (("pass", "example.info"),),
        opendmarc_differs=("pass", STRICT_BUG),
        rfc_result="fail",
    ),
    Case("strict exact passes", "example.info", None, (("pass", "example.info"),)),
    Case("multi-level suffix, sp", "www.example.co.uk", ("fail", "www.example.co.uk")),
    Case("multi-level relaxed", "example.co.uk", ("pass", "bounce.example.co.uk")),
    Case("not the same org", "example.co.uk", ("pass", "other.co.uk")),
    Case("record without p", "broken.example.com", ("fail", "broken.example.com")),
    Case(
        "record without p, with rua",
        "ruaonly.example.com",
        ("fail", "ruaonly.example.com"),
        opendmarc_differs=(
            "permerror",
            "RFC 7489 §6.6.3 step 6.1: no valid p= but a valid rua= reads as p=none",
        ),
        rfc_result="fail",
    ),
    Case(
        "two records",
        "twice.example.com",
        ("fail", "twice.example.com"),
        opendmarc_differs=(
            "fail",
            "RFC 7489 §6.6.3 step 4: several DMARC records mean no DMARC processing "
            "(OpenDMARC uses one of them)",
        ),
        rfc_result="none",
    ),
    Case("pct=0", "example.biz", ("fail", "example.biz")),
]


def _why_not() -> str | None:
    for tool in (OPENDMARC, DNSMASQ, POSTCAT, UNSHARE):
        if not Path(tool).exists():
            return f"{tool} is not installed (Debian packages opendmarc, dnsmasq, postfix)"
    probe = subprocess.run(
        [UNSHARE, "--net", "--mount", "--pid", "--fork", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"cannot make private namespaces here (unshare: {probe.stderr.strip()})"
    return postfix_available()


@dataclass
class OpenDmarc:
    """OpenDMARC and its dnsmasq in their namespaces, and the Postfix that feeds them."""

    home: Path
    namespaces: subprocess.Popen[bytes]
    postfix_pid: int
    postfix_etc: Path
    port: int

    def judge(self, case: Case) -> tuple[str, str, str, str]:
        """Send *case*'s message through Postfix: OpenDMARC's (result, policy,
        disposition) and what it said: its Authentication-Results value, or the SMTP
        reply when it rejected the message (RejectFailures: p=reject failures are
        refused, p=quarantine failures held)."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
            client.ehlo("client.test")
            client.mail(f"bounce@{case.spf[1]}" if case.spf else "")
            client.rcpt("rcpt@destination.test")
            try:
                code, reply = client.data(message(case))
            except smtplib.SMTPDataError as exc:
                code, reply = exc.smtp_code, exc.smtp_error
        said = reply.decode(errors="replace")
        if code != 250:
            assert code == 550 and "5.7.1 rejected by DMARC policy" in said, (code, said)
            return "fail", "reject", "reject", said
        queue_id = re.search(r"queued as (\w+)", said)
        assert queue_id, said
        shown = subprocess.run(
            [POSTCAT, "-c", str(self.postfix_etc), "-hq", queue_id[1]],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert shown.returncode == 0, shown.stderr
        fields = re.findall(
            r"^Authentication-Results: opendmarc\.test;(.*(?:\n[ \t].*)*)", shown.stdout, re.M
        )
        assert len(fields) == 1, shown.stdout
        value = " ".join(fields[0].split())
        assert f"header.from={case.author}" in value, value
        found = re.search(r"dmarc=(\w+)(?: \(p=(\w+) dis=(\w+)\))?", value)
        assert found, value
        return found[1], (found[2] or "none").lower(), (found[3] or "none").lower(), value

    def stop(self) -> None:
        _stop_by_pid(self.postfix_pid)
        _stop_namespaces(self.namespaces)
        shutil.rmtree(self.home, ignore_errors=True)


def _stop_namespaces(unshare: subprocess.Popen[bytes]) -> None:
    """Kill ``unshare`` by its PID: with --kill-child its child, the PID namespace's first
    process, gets SIGKILL too, and the kernel then kills every process of the namespace
    (dnsmasq, opendmarc). (unshare --fork waits out a SIGTERM, hence SIGKILL.)"""
    if unshare.poll() is None:
        unshare.kill()
    unshare.wait(30)


def message(case: Case) -> bytes:
    """The message of *case*: the upstream Authentication-Results, From, the rest."""
    parts = []
    if case.spf:
        parts.append(f"spf={case.spf[0]} smtp.mailfrom={case.spf[1]}")
    for result, domain in case.dkim:
        parts.append(f"dkim={result} header.d={domain}")
    results = "; ".join(parts) if parts else "none"
    return (
        f"Authentication-Results: upstream.test; {results}\r\n"
        f"From: Author <author@{case.author}>\r\n"
        "To: rcpt@destination.test\r\n"
        f"Subject: {case.name}\r\n"
        f"Message-ID: <{abs(hash(case.name))}@{case.author}>\r\n"
        "Date: Tue, 01 Dec 2026 12:00:00 +0000\r\n"
        "\r\n"
        "body\r\n"
    ).encode()


def _public_suffix_list() -> Path:
    import publicsuffixlist

    return Path(publicsuffixlist.__file__).parent / "public_suffix_list.dat"


def _start(home: Path) -> OpenDmarc:
    records = dns_records()
    (home / "dnsmasq.conf").write_text(
        "\n".join(
            [
                "port=53",
                "listen-address=127.0.0.1",
                "bind-interfaces",
                "no-resolv",
                "no-hosts",
                "no-poll",
                "local=/#/",
                "cache-size=0",
                "keep-in-foreground",
                "log-queries",
                f"log-facility={home / 'dnsmasq.log'}",
                f"pid-file={home / 'dnsmasq.pid'}",
                "user=root",
                *records.config_lines(),
                "",
            ]
        )
    )
    (home / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:1\n")
    (home / "ignore.hosts").write_text("192.0.2.255\n")  # the default would skip 127.0.0.1
    socket_path = home / "opendmarc.sock"
    (home / "opendmarc.conf").write_text(
        f"""Socket local:{socket_path}
UMask 000
Background false
AuthservID opendmarc.test
TrustedAuthservIDs upstream.test
IgnoreHosts {home / "ignore.hosts"}
PublicSuffixList {_public_suffix_list()}
RejectFailures true
HoldQuarantinedMessages true
SPFSelfValidate false
Syslog false
PidFile {home / "opendmarc.pid"}
"""
    )
    script = f"""set -e
ip link set lo up
mount --bind {home / "resolv.conf"} /etc/resolv.conf
{DNSMASQ} --conf-file={home / "dnsmasq.conf"} &
while [ ! -s {home / "dnsmasq.pid"} ]; do sleep 0.05; done
exec {OPENDMARC} -c {home / "opendmarc.conf"}
"""
    log = (home / "namespaces.out").open("wb")
    namespaces = subprocess.Popen(
        [UNSHARE, "--net", "--mount", "--pid", "--fork", "--kill-child", "sh", "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    postfix_pid = 0
    try:
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            if namespaces.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "opendmarc did not start: " + (home / "namespaces.out").read_text()
                )
            time.sleep(0.05)
        port = free_port()
        postfix_home = home / "postfix"
        etc = write_postfix_config(postfix_home, port)
        with (etc / "main.cf").open("a") as main_cf:
            main_cf.write(
                f"smtpd_milters = unix:{socket_path}\n"
                "milter_default_action = tempfail\n"
                "milter_protocol = 6\n"
            )
        env = {**os.environ, "MAIL_CONFIG": str(etc)}
        started = subprocess.run(
            [POSTFIX, "-c", str(etc), "start"], capture_output=True, text=True, env=env, timeout=60
        )
        pid_file = postfix_home / "spool" / "pid" / "master.pid"
        if pid_file.exists():
            postfix_pid = int(pid_file.read_text().split()[0])
        if started.returncode != 0:
            raise RuntimeError(f"postfix did not start: {started.stderr}")
        wait_port(port)
        postfix_pid = int(pid_file.read_text().split()[0])
    except BaseException:
        if postfix_pid:
            _stop_by_pid(postfix_pid)
        _stop_namespaces(namespaces)
        raise
    return OpenDmarc(home, namespaces, postfix_pid, etc, port)


@pytest.fixture(scope="module")
def opendmarc() -> Iterator[OpenDmarc]:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    # Postfix's daemons (the postfix user) must reach its queue and the milter socket
    home = Path(tempfile.mkdtemp(prefix="tachymail-opendmarc-"))
    home.chmod(0o755)
    try:
        peer = _start(home)
    except BaseException:
        shutil.rmtree(home, ignore_errors=True)
        raise
    try:
        yield peer
    finally:
        peer.stop()


def dns_records() -> DnsRecords:
    records = DnsRecords()
    for name, texts in TXT.items():
        for text in texts:
            records.txt(name, text)
    return records


@pytest.fixture(scope="module")
def loopback_dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same records from a dnsmasq on a loopback port, for Tachymail's resolver."""
    with running_dnsmasq(tmp_path_factory.mktemp("dns"), dns_records()) as server:
        yield server.address


def tachymail_verdict(case: Case, nameserver: str) -> DmarcResult:
    """check_dmarc on *case*'s message, its records looked up by tachymail's resolver."""
    spf = (
        SpfResult(case.spf[0], "mailfrom", case.spf[1], f"bounce@{case.spf[1]}")
        if case.spf
        else None
    )
    dkim = [DkimResult(r, d, "sel", "rsa-sha256", "", "AAAAAAAAAAAA") for r, d in case.dkim]
    author = from_domain(message(case))
    assert author == case.author

    async def judge() -> DmarcResult:
        return await check_dmarc(Resolver(nameserver, timeout=5.0), author, spf, dkim)

    return asyncio.run(judge())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_same_verdict_as_opendmarc(opendmarc: OpenDmarc, loopback_dns: str, case: Case) -> None:
    result, policy, disposition, said = opendmarc.judge(case)
    ours = tachymail_verdict(case, loopback_dns)
    if case.opendmarc_differs:
        theirs, why = case.opendmarc_differs
        assert ours.result == case.rfc_result, why
        assert result in (theirs, case.rfc_result), said
        return
    assert ours.result == result, said
    if result not in ("pass", "fail"):
        return
    assert ours.policy == policy, said
    if ours.record is not None and ours.record.pct == 0:
        # pct=0 selects no message. OpenDMARC then does nothing (dis=none); RFC 7489
        # §6.6.4 asks for the next lower policy, which check_dmarc gives: quarantine.
        assert (disposition, ours.disposition) == ("none", "quarantine"), said
    else:
        assert ours.disposition == disposition, said

"""A real DNS server for tests: dnsmasq on a loopback port, serving the records a test declares.

Declare the records, start the server, point the code under test at ``server.address``::

    records = (
        DnsRecords()
        .mx("example.test", "mx1.example.test", 10)
        .a("mx1.example.test", "127.0.0.1")
        .null_mx("nomail.test")
        .exists("bare.test")          # exists, but no MX/A/AAAA: "no_host"
        .nxdomain("gone.test")        # (every undeclared name answers NXDOMAIN anyway)
    )
    with running_dnsmasq(tmp_path, records) as dns_server:
        resolver = Resolver(dns_server.address)          # "127.0.0.1:PORT"
        ...
        assert dns_server.queries("example.test", "MX") == 1   # from dnsmasq's query log

What the server does, so tests can rely on it:

- It answers every name itself and never forwards anywhere (``no-resolv``, no hosts file,
  no DHCP, ``local=/#/``): a declared name gets its records, a name with records of other
  types only gets an empty NOERROR answer (NODATA), and every undeclared name gets NXDOMAIN.
  It listens on 127.0.0.1 only, on a free high port (UDP and TCP), and runs as the current
  user. It has no cache of its own, so every query reaches it and is logged.
- Names may be given as U-labels; they are converted to A-labels (IDNA) like the resolver
  does, so ``.mx("bücher.test", ...)`` serves ``xn--bcher-kva.test``.
- TTLs: ``DnsRecords.ttl`` (default 300 s) is the TTL of every MX, TXT and raw record and of
  addresses without a TTL of their own; ``a()``/``aaaa()`` take ``ttl=`` per record.
  Negative answers (NXDOMAIN, NODATA) carry no SOA in this mode, as from a forwarder.
- Authoritative mode, ``DnsRecords(zone="test")``: dnsmasq serves the zone as its
  authoritative server. Negative answers then carry the zone's SOA, whose TTL and MINIMUM
  field are both ``ttl`` (RFC 2308 negative caching), and every record has TTL ``ttl``
  (dnsmasq has no per-record TTL there, so ``ttl=`` on a record is refused). Names outside
  the zone answer REFUSED; ``refused()`` and ``unanswered()`` are not available.
- Null MX (RFC 7505): dnsmasq serves it natively: ``mx-host=DOMAIN,.,0`` puts the root
  name on the wire as the target, which is exactly "MX 0 ." (checked by the tests). A "."
  target can also be mixed with real hosts, as a misconfigured domain would.
- Long TXT strings (DKIM keys): dnsmasq splits a string over 255 bytes into consecutive
  255-byte character-strings of one TXT record, as RFC 7208 §3.3 / RFC 6376 §3.6.2.2 expect
  (a reader joins them). ``DnsServer.query()`` uses EDNS and falls back to TCP, so
  records over 512 bytes come back whole.
- ``refused(domain)``: the domain and its subdomains answer REFUSED (dnsmasq has no
  upstream for them). ``unanswered(domain)``: queries for them are forwarded to a loopback
  UDP socket held open by this helper that never replies, so clients time out. dnsmasq
  itself cannot be made to answer SERVFAIL for local data; these two are the real
  temporary failures it can produce.

``running_dnsmasq`` skips the test (``pytest.skip``) when ``/usr/sbin/dnsmasq`` is missing,
and stops the server by its PID when the block ends.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rdatatype
import pytest

DNSMASQ = Path("/usr/sbin/dnsmasq")

# "query[MX] example.test from 127.0.0.1", or "auth[MX] ..." in authoritative mode
_QUERY_LINE = re.compile(r"\b(?:query|auth)\[([A-Za-z0-9]+)\] (\S+) from ")


def dns_name(name: str) -> str:
    """``name`` as dnsmasq and the resolver see it: lower-case A-labels, no final dot."""
    if name in (".", ""):
        return "."
    return dns.name.from_text(name).to_text(omit_final_dot=True).lower()


@dataclass
class DnsRecords:
    """The records a test DNS server serves; the builder methods return ``self`` to chain.

    ``ttl`` is the TTL of MX, TXT and raw records and the default for addresses; ``zone``
    makes the server authoritative for that zone (see the module docstring).
    """

    ttl: int = 300
    zone: str | None = None
    mx_records: list[tuple[str, str, int]] = field(default_factory=list)
    addresses: list[tuple[str, str, int | None]] = field(default_factory=list)
    txt_records: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    raw_records: list[tuple[str, int, bytes]] = field(default_factory=list)
    nxdomains: list[str] = field(default_factory=list)
    refused_domains: list[str] = field(default_factory=list)
    unanswered_domains: list[str] = field(default_factory=list)

    def mx(self, domain: str, host: str, preference: int = 10) -> DnsRecords:
        """An MX record ``domain MX preference host``; ``host`` "." is a null target."""
        self.mx_records.append((dns_name(domain), dns_name(host), preference))
        return self

    def null_mx(self, domain: str) -> DnsRecords:
        """RFC 7505 null MX: ``domain MX 0 .`` (the domain accepts no mail)."""
        return self.mx(domain, ".", 0)

    def a(self, name: str, *addresses: str, ttl: int | None = None) -> DnsRecords:
        """A records for ``name`` (with ``ttl``, or ``DnsRecords.ttl``)."""
        return self._addresses(name, addresses, ttl, ipaddress.IPv4Address)

    def aaaa(self, name: str, *addresses: str, ttl: int | None = None) -> DnsRecords:
        """AAAA records for ``name`` (with ``ttl``, or ``DnsRecords.ttl``)."""
        return self._addresses(name, addresses, ttl, ipaddress.IPv6Address)

    def txt(self, name: str, *strings: str) -> DnsRecords:
        """One TXT record made of ``strings``; any string over 255 bytes is split by dnsmasq
        into 255-byte pieces (a reader joins the pieces to get the string back)."""
        for text in strings:
            if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
                raise ValueError(f"TXT string with a control character: {text!r}")
        self.txt_records.append((dns_name(name), strings or ("",)))
        return self

    def raw(self, name: str, rrtype: int | str, rdata: bytes) -> DnsRecords:
        """Any record, given as its type and wire-format RDATA (dnsmasq ``dns-rr``)."""
        rrtype = dns.rdatatype.from_text(rrtype) if isinstance(rrtype, str) else rrtype
        self.raw_records.append((dns_name(name), int(rrtype), rdata))
        return self

    def ptr(self, address: str, *names: str) -> DnsRecords:
        """PTR records of an IPv4 or IPv6 ``address`` (at its in-addr.arpa / ip6.arpa name),
        one per name in ``names``: what reverse DNS (iprev, SPF ``ptr``) reads."""
        reverse = ipaddress.ip_address(address).reverse_pointer
        for name in names:
            self.raw(reverse, "PTR", dns.name.from_text(dns_name(name)).to_wire())
        return self

    def exists(self, name: str) -> DnsRecords:
        """``name`` exists but has no MX, A or AAAA: MX/A/AAAA queries get an empty NOERROR
        answer. Done with a TXT record, as a real name with only TXT/NS/SOA records is."""
        return self.txt(name, "v=none; exists without mail or address records")

    def nxdomain(self, name: str) -> DnsRecords:
        """``name`` must answer NXDOMAIN. Every undeclared name does; this documents the
        intent, and starting the server fails if some record is declared for ``name``."""
        self.nxdomains.append(dns_name(name))
        return self

    def refused(self, domain: str) -> DnsRecords:
        """``domain`` and its subdomains answer REFUSED (not in authoritative mode)."""
        self.refused_domains.append(dns_name(domain))
        return self

    def unanswered(self, domain: str) -> DnsRecords:
        """Queries for ``domain`` and its subdomains get no answer at all, so clients time
        out (not in authoritative mode)."""
        self.unanswered_domains.append(dns_name(domain))
        return self

    def names(self) -> set[str]:
        """Every name that has a record."""
        return {
            *(m[0] for m in self.mx_records),
            *(a[0] for a in self.addresses),
            *(t[0] for t in self.txt_records),
            *(r[0] for r in self.raw_records),
        }

    def config_lines(self, silent_port: int | None = None) -> list[str]:
        """The dnsmasq configuration lines for the records (no server settings)."""
        self._check()
        lines = [f"local-ttl={self.ttl}"]
        if self.zone is not None:
            zone = dns_name(self.zone)
            lines += [
                f"auth-server=ns.{zone},127.0.0.1",
                f"auth-zone={zone}",
                f"auth-soa=1,hostmaster.{zone},1200,120,604800",
                f"auth-ttl={self.ttl}",
            ]
        for domain, host, preference in self.mx_records:
            lines.append(f"mx-host={domain},{host},{preference}")
        for name, address, ttl in self.addresses:
            lines.append(f"host-record={name},{address}" + (f",{ttl}" if ttl is not None else ""))
        for name, strings in self.txt_records:
            lines.append(f"txt-record={name}," + ",".join(_quote(s) for s in strings))
        for name, rrtype, rdata in self.raw_records:
            lines.append(f"dns-rr={name},{rrtype},{rdata.hex()}")
        for domain in self.refused_domains:
            # "#": the default upstream servers, of which there are none, hence REFUSED
            lines.append(f"server=/{domain}/#")
        for domain in self.unanswered_domains:
            lines.append(f"server=/{domain}/127.0.0.1#{silent_port}")
        return lines

    def _addresses(
        self, name: str, addresses: tuple[str, ...], ttl: int | None, family: type
    ) -> DnsRecords:
        if not addresses:
            raise ValueError(f"no address given for {name}")
        for address in addresses:
            parsed = ipaddress.ip_address(address)
            if not isinstance(parsed, family):
                raise ValueError(f"{address} is not an {family.__name__}")
            self.addresses.append((dns_name(name), str(parsed), ttl))
        return self

    def _check(self) -> None:
        clash = set(self.nxdomains) & self.names()
        if clash:
            raise ValueError(f"declared NXDOMAIN but given records: {sorted(clash)}")
        if self.zone is None:
            return
        zone = dns_name(self.zone)
        outside = sorted(
            n
            for n in self.names() | set(self.nxdomains)
            if n != zone and not n.endswith("." + zone)
        )
        if outside:
            raise ValueError(f"names outside the authoritative zone {zone}: {outside}")
        if self.refused_domains or self.unanswered_domains:
            raise ValueError("refused()/unanswered() need the non-authoritative mode")
        if any(ttl is not None for _n, _a, ttl in self.addresses):
            raise ValueError("per-record TTLs do not exist in authoritative mode; set ttl")


@dataclass
class DnsServer:
    """A running dnsmasq. ``address`` is ``"127.0.0.1:PORT"``, what the resolver takes."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path
    config_path: Path
    _markers: int = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """dnsmasq's log so far: start-up lines, then one line per query and per answer."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def query_log(self) -> list[tuple[str, str]]:
        """Every query received so far, in order, as (type, name): ``("MX", "a.test")``.

        Complete up to the moment of the call: it first sends a marker query of its own
        (type TXT, under ``.invalid``) and waits until the marker is in the log, which dnsmasq
        writes in order.
        """
        self._markers += 1
        marker = f"tachymail-log-sync-{self._markers}.invalid"
        self.query(marker, "TXT")
        deadline = time.monotonic() + 5.0
        while True:
            entries = [(m[1].upper(), m[2].lower()) for m in _QUERY_LINE.finditer(self.log())]
            if ("TXT", marker) in entries or time.monotonic() > deadline:
                return [e for e in entries if not e[1].startswith("tachymail-log-sync-")]
            time.sleep(0.01)

    def queries(self, name: str, rrtype: str | None = None) -> int:
        """How many queries for ``name`` (of type ``rrtype``, or any) reached the server."""
        wanted = dns_name(name)
        return sum(
            1
            for kind, qname in self.query_log()
            if qname == wanted and (rrtype is None or kind == rrtype.upper())
        )

    def query(self, name: str, rrtype: str, timeout: float = 2.0) -> dns.message.Message:
        """Ask the server directly (EDNS, TCP when truncated) and return the raw response."""
        request = dns.message.make_query(name, rrtype, use_edns=0, payload=1232)
        response, _tcp = dns.query.udp_with_fallback(
            request, self.host, timeout=timeout, port=self.port
        )
        return response

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by PID, then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def running_dnsmasq(tmp_path: Path, records: DnsRecords) -> Iterator[DnsServer]:
    """Start dnsmasq serving ``records`` on 127.0.0.1, wait until it answers, yield it, stop it.

    Files go to ``tmp_path``: ``dnsmasq.conf``, ``dnsmasq.log`` (the query log),
    ``dnsmasq.pid``, ``dnsmasq.out`` (its stderr). Skips the test when dnsmasq is not
    installed; raises RuntimeError (with dnsmasq's own words) when it does not start.
    """
    if not DNSMASQ.exists():
        pytest.skip(f"dnsmasq is not installed ({DNSMASQ}; Debian package dnsmasq)")
    silent: socket.socket | None = None
    if records.unanswered_domains:
        # Bound and never read: dnsmasq's forwarded queries vanish here without an ICMP error.
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
    try:
        silent_port = silent.getsockname()[1] if silent is not None else None
        server = _start(tmp_path, records.config_lines(silent_port))
        try:
            yield server
        finally:
            server.stop()
    finally:
        if silent is not None:
            silent.close()


def _start(tmp_path: Path, record_lines: list[str], attempts: int = 3) -> DnsServer:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config_path = tmp_path / "dnsmasq.conf"
    log_path = tmp_path / "dnsmasq.log"
    out_path = tmp_path / "dnsmasq.out"
    user = pwd.getpwuid(os.geteuid()).pw_name
    for attempt in range(attempts):
        port = _free_port()
        config_path.write_text(
            "\n".join(
                [
                    f"port={port}",
                    "listen-address=127.0.0.1",
                    "bind-interfaces",
                    "no-resolv",
                    "no-hosts",
                    "no-poll",
                    "local=/#/",  # every name is ours: undeclared ones are NXDOMAIN
                    "cache-size=0",  # every query reaches the config, and the log
                    "keep-in-foreground",
                    "log-queries",
                    f"log-facility={log_path}",
                    f"pid-file={tmp_path / 'dnsmasq.pid'}",
                    f"user={user}",
                    *record_lines,
                    "",
                ]
            )
        )
        log_path.unlink(missing_ok=True)
        with out_path.open("wb") as out:
            # --conf-file alone: /etc/dnsmasq.conf and /etc/dnsmasq.d are not read
            proc = subprocess.Popen(
                [str(DNSMASQ), f"--conf-file={config_path}"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        server = DnsServer(proc, "127.0.0.1", port, log_path, config_path)
        if _wait_ready(server):
            return server
        server.stop()
        said = out_path.read_text(errors="replace") + server.log()
        if "in use" not in said or attempt == attempts - 1:
            raise RuntimeError(f"dnsmasq did not start (config {config_path}):\n{said}")
    raise AssertionError("unreachable")


def _wait_ready(server: DnsServer, timeout: float = 10.0) -> bool:
    """True once dnsmasq answers a query (any answer, even REFUSED); False if it exited."""
    deadline = time.monotonic() + timeout
    request = dns.message.make_query("tachymail-ready.invalid", "SOA")
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            return False
        with suppress(dns.exception.Timeout, OSError):
            dns.query.udp(request, server.host, timeout=0.2, port=server.port)
            return True
        time.sleep(0.02)
    return False


def _free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq binds both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


def _quote(text: str) -> str:
    """A TXT string in dnsmasq's configuration syntax: quoted, with \\ and " escaped."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

"""What the inbound checks cost: intake on the mx listener with every check on (SPF on MAIL
FROM and HELO, iprev, DKIM verification, ARC, DMARC with aggregate data, the
Authentication-Results header) against the same intake with the checks off, in the same run.

    .venv/bin/python benchmarks/mailauth_bench.py [--repeat 3] [--sessions 16] [--quick]

The messages are DKIM-signed (rsa-sha256, 2048 bits, relaxed/relaxed) by a sender domain whose
SPF, DKIM key and DMARC record (p=reject) a private dnsmasq on a loopback port serves, with a
PTR and A record for the client, so every check passes and every lookup is answered. dnsmasq
is warm: a warm-up round fills the server's resolver cache before the clock starts, as on a
busy MX where the big senders' records are always cached. The load is ``tachymail bench``
(16 pipelined sessions, ``--eml-dir``: 200 distinct signed messages replayed, each sent with a
fresh Message-ID line on top, which is not among the signed fields). The client comes from
127.0.0.1, which the configuration does not trust (``trusted_networks = []``), so the checks
run; recipients are in a relay domain and the server holds its queue (``server.hold``).

Cells: 1 KiB and 64 KiB messages; each run starts a fresh server, "off" and "on" alternate
which goes first; medians over --repeat runs. Printed: msgs/s both ways, the share of
throughput the checks keep, and the server CPU they add per message (the server's process
tree, from /proc). Writes benchmarks/results/mailauth.json. Needs dnsmasq.
"""

from __future__ import annotations

import argparse
import email.utils
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import peers
from dnsserver import DNSMASQ, DnsRecords, running_dnsmasq
from peers import SMTP_SOURCE
from tachymail.mailauth.dkim import DkimSigner, keygen

DOMAIN = "bench-sender.test"
SELECTOR = "bench"
CLIENT_NAME = "client.bench-sender.test"
SENDER = f"news@{DOMAIN}"
DISTINCT = 200


def records(dkim_txt: str) -> DnsRecords:
    import dns.name

    # the DKIM record as keygen prints it: 'name. IN TXT "part" "part"'; dnsmasq wants the text
    text = "".join(part for part in dkim_txt.split('"')[1::2])
    return (
        DnsRecords()
        .txt(DOMAIN, "v=spf1 ip4:127.0.0.0/8 -all")
        .txt(CLIENT_NAME, "v=spf1 a -all")
        .a(CLIENT_NAME, "127.0.0.1")
        .raw("1.0.0.127.in-addr.arpa", "PTR", dns.name.from_text(f"{CLIENT_NAME}.").to_wire())
        .txt(f"{SELECTOR}._domainkey.{DOMAIN}", text)
        .txt(f"_dmarc.{DOMAIN}", "v=DMARC1; p=reject; adkim=r; aspf=r")
    )


def signed_messages(directory: Path, keys: Path, size: int) -> None:
    """DISTINCT messages of about *size* octets, signed; no Message-ID (the load tool adds
    one to each send, so it must not be a signed field)."""
    signer = DkimSigner(keys, {DOMAIN: SELECTOR})
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    directory.mkdir(parents=True, exist_ok=True)
    for n in range(DISTINCT):
        head = (
            f"From: News <{SENDER}>\r\nTo: <reader@example.net>\r\n"
            f"Subject: bench message {n}\r\nDate: {email.utils.formatdate()}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        ).encode()
        body = line * max(1, (size - len(head)) // len(line))
        content = head + body
        signed = signer.sign(content, DOMAIN) + content
        (directory / f"{n:04d}.eml").write_bytes(signed)
        if n == 0:  # smtp-source sends one file as every message, lines ending in LF
            lf_file(directory).write_bytes(signed.replace(b"\r\n", b"\n"))


#: TOML appended to the server's configuration (--tachymail-toml), to try other settings
EXTRA_TOML = ""
#: SMTP worker processes (--workers); 0: the server's default
WORKERS = 0


def lf_file(eml_dir: Path) -> Path:
    """The first message with LF line ends, beside the directory (smtp-source's -F file)."""
    return eml_dir.with_name(eml_dir.name + "-lf.eml")


def config(resolver: str, checks: bool) -> str:
    return (
        EXTRA_TOML
        + f"""
[server]
hold = true
workers = {WORKERS}
[policy]
trusted_networks = []
relay_domains = ["example.net"]
[delivery]
resolver = "{resolver}"
[[listener]]
address = "127.0.0.1:{{port}}"
role = "mx"
mailauth = "{"enforce" if checks else "off"}"
"""
    )


def start(workdir: Path, resolver: str, checks: bool) -> peers.Peer:
    port = peers.free_port()
    (workdir / "tachymail.toml").write_text(config(resolver, checks).replace("{port}", str(port)))
    binary = Path(sys.executable).with_name("tachymail")
    log = open(workdir / "tachymail.log", "ab")  # noqa: SIM115 - kept open by the child
    proc = subprocess.Popen(
        [
            str(binary),
            "--log-level",
            "WARNING",
            "serve",
            "-c",
            str(workdir / "tachymail.toml"),
            "--data-dir",
            str(workdir / "data"),
            "--metrics",
            "",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    peers.wait_port(port)
    return peers.Peer("tachymail", port, proc.pid, proc=proc)


def bench(port: int, eml_dir: Path, messages: int, sessions: int) -> dict[str, float]:
    binary = Path(sys.executable).with_name("tachymail")
    done = subprocess.run(
        [
            str(binary),
            "bench",
            f"127.0.0.1:{port}",
            "--eml-dir",
            str(eml_dir),
            "--messages",
            str(messages),
            "--concurrency",
            str(sessions),
            "--from",
            SENDER,
            "--to",
            "reader{r}@example.net",
            "--helo",
            CLIENT_NAME,
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    summary = json.loads(done.stdout)
    return summary  # type: ignore[no-any-return]


def accepted(summary: dict[str, object]) -> int:
    return int(summary["accepted"])  # type: ignore[call-overload]


def smtp_source(port: int, eml: Path, messages: int, sessions: int) -> None:
    """Postfix's smtp-source, as the intake benchmark loads the server (-d: sessions kept),
    sending the signed file *eml* (LF line ends: smtp-source ends each line with CRLF and
    dot-stuffs) as every message, verbatim."""
    cmd = [SMTP_SOURCE, "-d", "-s", str(sessions), "-m", str(messages), "-F", str(eml)]
    cmd += ["-f", SENDER, "-t", "reader@example.net", "-M", CLIENT_NAME, f"127.0.0.1:{port}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0 or out.stderr.strip():
        raise RuntimeError(f"smtp-source failed: {out.stderr.strip()[:500]}")


def queued(workdir: Path) -> int:
    binary = Path(sys.executable).with_name("tachymail")
    out = subprocess.run(
        [str(binary), "queue", "count", "--data-dir", str(workdir / "data")],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[0])


def one_run(
    load: str, eml_dir: Path, resolver: str, checks: bool, messages: int, sessions: int
) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-mailauth-") as tmp:
        peer = start(Path(tmp), resolver, checks)
        try:
            # the warm-up fills the resolver's cache
            if load == "bench":
                warm = bench(peer.port, eml_dir, DISTINCT, sessions)
                if accepted(warm) != DISTINCT:
                    raise RuntimeError(f"warm-up not all accepted: {warm}")
            else:
                eml = lf_file(eml_dir)
                smtp_source(peer.port, eml, DISTINCT, sessions)
            cpu0 = peer.cpu()
            started = time.perf_counter()
            if load == "bench":
                summary = bench(peer.port, eml_dir, messages, sessions)
                ok = accepted(summary)
            else:
                smtp_source(peer.port, eml, messages, sessions)
            elapsed = time.perf_counter() - started
            cpu = peer.cpu() - cpu0
            if load != "bench":
                ok = queued(Path(tmp)) - DISTINCT
            header_checked = "Authentication-Results" in _one_queued(Path(tmp))
        finally:
            peer.stop()
    if ok != messages:
        raise RuntimeError(f"{ok} of {messages} messages accepted")
    return {
        "msgs_per_s": messages / elapsed,
        "server_cpu_us_per_msg": cpu / messages * 1e6,
        "authentication_results": header_checked,
    }


def _one_queued(workdir: Path) -> str:
    """The top of one queued message's content (to check the header is there)."""
    binary = Path(sys.executable).with_name("tachymail")
    data = workdir / "data"
    listing = subprocess.run(
        [str(binary), "queue", "list", "--data-dir", str(data), "--json"],
        capture_output=True,
        text=True,
    )
    try:
        first = json.loads(listing.stdout.splitlines()[0])
        queue_id = first["id"]
    except (IndexError, ValueError, KeyError):
        return ""
    shown = subprocess.run(
        [str(binary), "queue", "show", "--data-dir", str(data), "--body", queue_id],
        capture_output=True,
        text=True,
    )
    return shown.stdout[:4000]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="one run of fewer messages")
    parser.add_argument(
        "--workers", type=int, default=0, help="SMTP worker processes (default: the server's)"
    )
    parser.add_argument("--tachymail-toml", default="", help="TOML added to the configuration")
    parser.add_argument(
        "--load",
        choices=("smtp-source", "bench", "both"),
        default="both",
        help="smtp-source -d (as benchmarks/intake.py), tachymail bench (pipelined), or both",
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "mailauth.json"))
    args = parser.parse_args()
    global EXTRA_TOML, WORKERS
    EXTRA_TOML = args.tachymail_toml + "\n"
    WORKERS = args.workers
    if not DNSMASQ.exists():
        print("mailauth benchmark skipped: dnsmasq is not installed", file=sys.stderr)
        return 0
    loads = ["smtp-source", "bench"] if args.load == "both" else [args.load]
    cells = [(1024, 6000), (65536, 2000)]
    if args.quick:
        cells, args.repeat = [(1024, 1000), (65536, 300)], 1
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-mailauth-dns-") as tmp:
        keys = Path(tmp) / "keys"
        dkim_txt = keygen(keys, DOMAIN, SELECTOR, "rsa")
        with running_dnsmasq(Path(tmp), records(dkim_txt)) as dns_server:
            for load, (size, messages) in [(ld, c) for ld in loads for c in cells]:
                eml_dir = Path(tmp) / f"eml-{size}"
                if not eml_dir.exists():
                    signed_messages(eml_dir, keys, size)
                runs: dict[str, list[dict]] = {"off": [], "on": []}
                for n in range(args.repeat):
                    order = ("off", "on") if n % 2 == 0 else ("on", "off")
                    for mode in order:
                        row = one_run(
                            load, eml_dir, dns_server.address, mode == "on", messages, args.sessions
                        )
                        runs[mode].append(row)
                        print(f"{load} {size} {mode} #{n + 1}: {row}", file=sys.stderr)
                median = {
                    mode: {
                        key: statistics.median(r[key] for r in rows)
                        for key in ("msgs_per_s", "server_cpu_us_per_msg")
                    }
                    for mode, rows in runs.items()
                }
                results.append(
                    {
                        "load": load,
                        "size": size,
                        "messages": messages,
                        "sessions": args.sessions,
                        "off": median["off"],
                        "on": median["on"],
                        "kept": median["on"]["msgs_per_s"] / median["off"]["msgs_per_s"],
                        "added_cpu_us_per_msg": median["on"]["server_cpu_us_per_msg"]
                        - median["off"]["server_cpu_us_per_msg"],
                        "header_in_queued_message": all(
                            r["authentication_results"] for r in runs["on"]
                        ),
                        "runs": runs,
                    }
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu_count": os.cpu_count(), "cells": results}, indent=2))
    print(
        "| load | messages | checks off msgs/s | checks on msgs/s | throughput kept | "
        "server CPU/msg off | on | added |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        off, on = r["off"], r["on"]
        print(
            f"| {r['load']} | {r['size'] // 1024} KiB signed, {r['sessions']} sessions "
            f"| {off['msgs_per_s']:,.0f} | {on['msgs_per_s']:,.0f} | {r['kept']:.0%} "
            f"| {off['server_cpu_us_per_msg']:.0f} µs | {on['server_cpu_us_per_msg']:.0f} µs "
            f"| {r['added_cpu_us_per_msg']:.0f} µs |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

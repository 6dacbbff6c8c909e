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
which goes first; medians over --repeat runs. Printed: msgs/s both ways (the bench load's
by its own clock, from its first connection to its last reply), the share of
throughput the checks keep, and the server CPU they add per message (the server's process
tree, from /proc). Each run also records how the load's sessions were spread over the SMTP
workers (``sessions_per_worker``, from ``ss``): the kernel's SO_REUSEPORT hash decides it
anew every run. Writes benchmarks/results/mailauth.json. Needs dnsmasq.

``--rspamd`` adds Rspamd (Debian's rspamd, ``./dev bench`` installs it) side by side, in the
same run: the same signed messages, fed with ``rspamc -n <sessions>`` from the same client
address, MAIL FROM and HELO, to an Rspamd that runs only its SPF, DKIM, DMARC and ARC
checks and writes the Authentication-Results field (``milter_headers``), on the same
warm dnsmasq. Printed: Rspamd's msgs/s and CPU per message (its process tree) against the
CPU the checks add to Tachymail's intake. Every message's reply is checked for
R_SPF_ALLOW, R_DKIM_ALLOW and DMARC_POLICY_ALLOW. Rspamd's stock plugins know servers on
the internet, so with --rspamd the whole benchmark runs in a private network namespace
(``unshare --net``, loopback only): nothing it does can leave the machine.
"""

from __future__ import annotations

import argparse
import collections
import email.utils
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
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
        split: list[int] = []
        done = threading.Event()
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
            look = threading.Thread(
                target=_watch_split, args=(peer.port, sessions, split, done), daemon=True
            )
            look.start()
            started = time.perf_counter()
            if load == "bench":
                summary = bench(peer.port, eml_dir, messages, sessions)
                ok = accepted(summary)
            else:
                smtp_source(peer.port, eml, messages, sessions)
            elapsed = time.perf_counter() - started
            if load == "bench":
                # The load's own clock, from its first connection to its last reply: the
                # wall clock also holds the tool's start (Python, the messages read), about
                # 0.4 s that both modes paid alike and that made their ratio look closer
                # to 1 than it is (smtp-source starts in milliseconds)
                elapsed = float(summary["elapsed_s"])
            cpu = peer.cpu() - cpu0
            done.set()
            look.join()
            if load != "bench":
                ok = queued(Path(tmp)) - DISTINCT
            header_checked = "Authentication-Results" in _one_queued(Path(tmp))
        finally:
            done.set()  # a load that failed: the watcher stops too
            peer.stop()
    if ok != messages:
        raise RuntimeError(f"{ok} of {messages} messages accepted")
    return {
        "msgs_per_s": messages / elapsed,
        "server_cpu_us_per_msg": cpu / messages * 1e6,
        "authentication_results": header_checked,
        # e.g. "5/11": sessions per SMTP worker, fewest first ("?": none seen in time)
        "sessions_per_worker": "/".join(map(str, split)) or "?",
    }


def _watch_split(port: int, sessions: int, split: list[int], done: threading.Event) -> None:
    """Into *split*: :func:`sessions_per_worker` once all *sessions* are open (looked at
    every 20 ms until then, or until *done*: the most seen)."""
    while not done.is_set():
        seen = sessions_per_worker(port)
        if sum(seen) > sum(split):
            split[:] = seen
        if sum(split) >= sessions:
            return
        done.wait(0.02)


def sessions_per_worker(port: int) -> list[int]:
    """How the established connections to *port* are spread over the server's processes,
    fewest first. The kernel hashes each new connection to one worker's SO_REUSEPORT socket,
    so 16 sessions can split 8/8 in one run and 4/12 in the next: recorded with each run so
    that its figure can be read against it."""
    try:
        listing = subprocess.run(
            ["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
            capture_output=True,
            text=True,
        )
    except OSError:  # no ss (iproute2): the split is not known ("?")
        return []
    return sorted(collections.Counter(re.findall(r"pid=(\d+)", listing.stdout)).values())


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


RSPAMD, RSPAMC = shutil.which("rspamd"), shutil.which("rspamc")
#: the symbols every scanned message must get (the checks all passed)
RSPAMD_PASSES = ("R_SPF_ALLOW", "R_DKIM_ALLOW", "DMARC_POLICY_ALLOW")


def rspamd_config(home: Path, port: int, resolver: str) -> str:
    """A private Rspamd configuration: one normal worker process per core on *port*, the DNS
    on *resolver*, and only the checks Tachymail's listener makes (the C DKIM module, the
    spf, dmarc and arc plugins; every other plugin unconfigured, so off), for loopback
    clients too, with the Authentication-Results field in the reply. Logging at "error"
    (Tachymail's server runs at WARNING): no line per message."""
    host, _, dns_port = resolver.rpartition(":")
    return f"""
options {{
  pidfile = "{home}/rspamd.pid";
  filters = "dkim";
  dns {{ nameserver = ["{host}:{dns_port}"]; timeout = 1s; retransmits = 2; sockets = 16; }}
  url_tld = "/usr/share/rspamd/effective_tld_names.dat";
  hs_cache_dir = "{home}/";
  local_addrs = [];
  explicit_modules = [];
}}
logging {{ type = "file"; filename = "{home}/rspamd.log"; level = "error"; }}
worker "normal" {{ bind_socket = "127.0.0.1:{port}"; count = {os.cpu_count() or 1}; }}
modules {{ path = "/usr/share/rspamd/plugins"; }}
actions {{ reject = 15; add_header = 6; }}
dkim {{ check_local = true; check_authed = true; }}
spf {{ check_local = true; check_authed = true; }}
dmarc {{ check_local = true; check_authed = true; }}
arc {{ }}
milter_headers {{
  use = ["authentication-results"]; skip_local = false; skip_authenticated = false;
}}
"""


def start_rspamd(home: Path, resolver: str) -> peers.Peer:
    assert RSPAMD is not None
    port = peers.free_port()
    (home / "rspamd.conf").write_text(rspamd_config(home, port, resolver))
    log = open(home / "rspamd.out", "ab")  # noqa: SIM115 - kept open by the child
    places = [f"--var={name}={home}" for name in ("DBDIR", "RUNDIR", "LOGDIR")]
    proc = subprocess.Popen(
        [RSPAMD, "-f", "-i", "-u", "root", "-g", "root", "-c", str(home / "rspamd.conf"), *places],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    peers.wait_port(port, timeout=60)  # it compiles its regular expressions first
    return peers.Peer("rspamd", port, proc.pid, proc=proc)


def rspamc(port: int, files: list[Path], sessions: int) -> None:
    """Scan *files* through rspamc, *sessions* requests at a time, as the benchmark's SMTP
    client would come (address, MAIL FROM, HELO); fails unless every reply says SPF, DKIM
    and DMARC passed."""
    assert RSPAMC is not None
    cmd = [RSPAMC, "-h", f"127.0.0.1:{port}", "-n", str(sessions), "-i", "127.0.0.1"]
    cmd += ["-F", SENDER, "--helo", CLIENT_NAME, "--hostname", CLIENT_NAME, "-j", "--compact"]
    out = subprocess.run(cmd + [str(f) for f in files], capture_output=True, text=True)
    replies = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    passed = [
        r
        for r in replies
        if all(symbol in r.get("symbols", {}) for symbol in RSPAMD_PASSES)
        and "Authentication-Results" in r.get("milter", {}).get("add_headers", {})
    ]
    if len(passed) != len(files):
        raise RuntimeError(
            f"rspamd: {len(passed)} of {len(files)} replies with every check passed and "
            f"an Authentication-Results field: {out.stdout[:300]} {out.stderr[:300]}"
        )


def rspamd_run(eml_dir: Path, resolver: str, messages: int, sessions: int) -> dict[str, float]:
    files = sorted(eml_dir.glob("*.eml"))
    load = (files * math.ceil(messages / len(files)))[:messages]
    with tempfile.TemporaryDirectory(prefix="bench-rspamd-") as tmp:
        peer = start_rspamd(Path(tmp), resolver)
        try:
            rspamc(peer.port, files, sessions)  # the warm-up fills its caches
            cpu0 = peer.cpu()
            started = time.perf_counter()
            rspamc(peer.port, load, sessions)
            elapsed = time.perf_counter() - started
            cpu = peer.cpu() - cpu0
        finally:
            peer.stop()
    return {"msgs_per_s": messages / elapsed, "cpu_us_per_msg": cpu / messages * 1e6}


def in_private_network() -> int | None:
    """Run this benchmark again in a new network namespace with only loopback up (the
    exit code), unless it already runs in one (None)."""
    if os.environ.get("TACHYMAIL_BENCH_NETNS") == "1":
        return None
    env = {**os.environ, "TACHYMAIL_BENCH_NETNS": "1"}
    script = 'ip link set lo up && exec "$@"'
    return subprocess.call(
        ["unshare", "--net", "--", "sh", "-c", script, "sh", sys.executable, *sys.argv], env=env
    )


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
    parser.add_argument(
        "--rspamd",
        action="store_true",
        help="Rspamd (checks only, fed by rspamc) side by side, in a private network namespace",
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "mailauth.json"))
    args = parser.parse_args()
    if args.rspamd:
        if RSPAMD is None or RSPAMC is None:
            print("mailauth benchmark: --rspamd needs Debian's rspamd", file=sys.stderr)
            return 1
        code = in_private_network()
        if code is not None:
            return code
    global EXTRA_TOML, WORKERS
    EXTRA_TOML = args.tachymail_toml + "\n"
    WORKERS = args.workers
    if not DNSMASQ.exists():
        print("mailauth benchmark skipped: dnsmasq is not installed", file=sys.stderr)
        return 0
    loads = ["smtp-source", "bench"] if args.load == "both" else [args.load]
    # 6,000 messages each: 2,000 of 64 KiB took under half a second, and one hiccup of
    # this shared machine then swung a run by a fifth
    cells = [(1024, 6000), (65536, 6000)]
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
            rspamd_cells = []
            for size, messages in cells if args.rspamd else []:
                eml_dir = Path(tmp) / f"eml-{size}"
                if not eml_dir.exists():
                    signed_messages(eml_dir, keys, size)
                rows = []
                for n in range(args.repeat):
                    rows.append(rspamd_run(eml_dir, dns_server.address, messages, args.sessions))
                    print(f"rspamd {size} #{n + 1}: {rows[-1]}", file=sys.stderr)
                rspamd_cells.append(
                    {
                        "size": size,
                        "messages": messages,
                        "sessions": args.sessions,
                        **{key: statistics.median(r[key] for r in rows) for key in rows[0]},
                        "runs": rows,
                    }
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"cpu_count": os.cpu_count(), "cells": results, "rspamd": rspamd_cells}, indent=2
        )
    )
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
    if rspamd_cells:
        print_rspamd(rspamd_cells, results)
    return 0


def print_rspamd(rspamd_cells: list[dict], results: list[dict]) -> None:
    """Rspamd's figures beside the CPU the checks add to Tachymail's intake (the pipelined
    load when it ran: the closest to rspamc's parallel requests)."""
    print()
    print(
        "| messages | Rspamd msgs/s (rspamc) | Rspamd CPU/msg | Tachymail's checks, CPU/msg "
        "added to intake | Rspamd's CPU / Tachymail's |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for cell in rspamd_cells:
        ours = [r for r in results if r["size"] == cell["size"]]
        ours.sort(key=lambda r: r["load"] != "bench")
        added = ours[0]["added_cpu_us_per_msg"] if ours else math.nan
        print(
            f"| {cell['size'] // 1024} KiB signed, {cell['sessions']} at a time "
            f"| {cell['msgs_per_s']:,.0f} | {cell['cpu_us_per_msg']:.0f} µs "
            f"| {added:.0f} µs ({ours[0]['load'] if ours else '-'}) "
            f"| {cell['cpu_us_per_msg'] / added:.1f}x |"
        )


if __name__ == "__main__":
    sys.exit(main())

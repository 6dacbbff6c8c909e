"""Idle-connection flood: worker memory per idle connection, and how fast new clients are
greeted with N idle connections open, against the same server with none open (same run).

    .venv/bin/python benchmarks/flood.py [--connections 10000] [--probes 50]

Starts `tachymail serve --hold` with one SMTP worker and limits raised for the flood,
measures the greeting latency of --probes new clients (one at a time) on the quiet
server, opens --connections idle connections (each waits for its 220), measures the
worker's RSS growth per connection (VmRSS from /proc) and the probes' latency again.
Prints a Markdown table and writes benchmarks/results/flood.json. Needs an open-files
hard limit above the connection count (`ulimit -Hn`); this process raises its soft limit.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers

RESULTS = Path(__file__).resolve().parent / "results"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def worker_pid(supervisor: int) -> int:
    """The single SMTP worker: the supervisor's child that is listening (the one with the
    most open descriptors once the flood is open; at start, the first child)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise RuntimeError("no worker process")


def greet(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(512)
        if not chunk:
            raise RuntimeError(f"closed before the greeting: {data!r}")
        data += chunk
    if not data.startswith(b"220 "):
        raise RuntimeError(f"not greeted: {data!r}")
    return sock


def probe(port: int, count: int) -> list[float]:
    """Seconds from connect() to the whole 220 line, for *count* clients one after another."""
    latencies = []
    for _ in range(count):
        start = time.perf_counter()
        sock = greet(port)
        latencies.append(time.perf_counter() - start)
        sock.close()
        time.sleep(0.01)  # let the worker see the close before the next probe
    return latencies


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"median_ms": statistics.median(ordered) * 1000, "p99_ms": p99 * 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--probes", type=int, default=50)
    args = parser.parse_args()
    count = args.connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = count + args.probes + 200
    if hard != resource.RLIM_INFINITY and hard < need:
        print(f"need {need} open files; the hard limit is {hard} (ulimit -Hn)", file=sys.stderr)
        return 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    with tempfile.TemporaryDirectory(prefix="bench-flood-") as tmp:
        workdir = Path(tmp)
        # Twice the flood as the limit: no stress mode, no reserved-slot refusals.
        config = (
            f'[server]\nhold = true\ndata_dir = "{workdir / "data"}"\n'
            f'[metrics]\naddress = ""\n'
            f"[limits]\nmax_connections = {2 * count + 1000}\n"
        )
        server = peers.start_tachymail(workdir, workers=1, config=config)
        idle: list[socket.socket] = []
        try:
            worker = worker_pid(server.pid)
            warm = [greet(server.port) for _ in range(50)]  # allocator warm-up, not counted
            quiet = probe(server.port, args.probes)
            before = rss_kib(worker)
            start = time.monotonic()
            for _ in range(count):
                idle.append(greet(server.port))
            opened = time.monotonic() - start
            per_connection = (rss_kib(worker) - before) * 1024 / count
            flooded = probe(server.port, args.probes)
            for sock in warm:
                sock.close()
        finally:
            for sock in idle:
                sock.close()
            server.stop()
    result = {
        "connections": count,
        "probes": args.probes,
        "rss_bytes_per_connection": round(per_connection),
        "open_seconds": round(opened, 2),
        "quiet": summary(quiet),
        "flooded": summary(flooded),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "flood.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{count:,} idle connections opened in {opened:.1f}s (each waited for its 220)\n")
    print("| | worker RSS per idle connection | greeting median | greeting p99 |")
    print("| --- | ---: | ---: | ---: |")
    print(
        f"| no idle connections | | {result['quiet']['median_ms']:.2f} ms | "
        f"{result['quiet']['p99_ms']:.2f} ms |"
    )
    print(
        f"| {count:,} idle connections | {per_connection:,.0f} bytes | "
        f"{result['flooded']['median_ms']:.2f} ms | {result['flooded']['p99_ms']:.2f} ms |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

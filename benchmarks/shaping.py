"""The relay rate of one node with a cluster-wide shaping rule (Redis throttles on) against
the same node without shaping or Redis, in the same run (issue 14: at most 15% lower).

    flock /tmp/bench.lock .venv/bin/python benchmarks/shaping.py [--messages 5000] [--repeat 3]

`tachymail bench` → `tachymail serve` (route for dest.test) → `tachymail sink`. The shaped
node has ``[cluster] redis`` (a private redis-server on a loopback port) and a shaping rule
for dest.test with ``cluster = true``, a rate far above what the node reaches (so it does
not bind: what is measured is the cost of asking Redis, the GCRA batches and the leases)
and a connection limit equal to the pool's. msgs/s runs from the start of the load until
the sink has counted every message. The two set-ups alternate, ``--repeat`` times; the
table shows the medians and the median of the per-repetition ratios. Writes
benchmarks/results/shaping.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers

BINARY = Path(sys.executable).with_name("tachymail")
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
CONNECTIONS = 20


def start_redis(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = peers.free_port()
    conf = work / "redis.conf"
    conf.write_text(
        f'port {port}\nbind 127.0.0.1\ndir {work}\nsave ""\nappendonly no\n'
        f"logfile {work / 'redis.log'}\n"
    )
    proc = subprocess.Popen([REDIS_SERVER, str(conf)], stdout=subprocess.DEVNULL)
    peers.wait_port(port)
    return proc, port


def start_sink(work: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    port, metrics = peers.free_port(), peers.free_port()
    proc = subprocess.Popen(
        [str(BINARY), "sink", f"127.0.0.1:{port}", "--metrics", f"127.0.0.1:{metrics}"],
        stdout=subprocess.DEVNULL,
        stderr=open(work / "sink.err", "wb"),  # noqa: SIM115 - kept open by the child
        start_new_session=True,
    )
    peers.wait_port(port)
    peers.wait_port(metrics)
    return proc, port, metrics


def sink_messages(metrics: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("tachymail_sink_messages_total "):
                return int(float(line.split()[1]))
    return 0


def node_config(work: Path, sink_port: int, redis_port: int | None) -> str:
    config = (
        f'[[route]]\ndomain = "dest.test"\nhost = "127.0.0.1:{sink_port}"\ntls = "none"\n\n'
        f"[pool]\nmax_connections = {CONNECTIONS}\n\n"
    )
    if redis_port is not None:
        shaping = work / "shaping.toml"
        shaping.write_text(
            '[[rule]]\ndomain = "dest.test"\nrate = "100000/s"\n'
            f"connection_limit = {CONNECTIONS}\ncluster = true\n"
        )
        config += (
            f'[cluster]\nredis = "redis://127.0.0.1:{redis_port}/0"\nnode = "bench"\n\n'
            f'[shaping]\nfiles = ["{shaping}"]\n\n'
        )
    return config


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(shaped: bool, messages: int, concurrency: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="shaping-bench-") as tmp:
        work = Path(tmp)
        redis = None
        sink, sink_port, metrics = start_sink(work)
        try:
            redis_port = None
            if shaped:
                redis, redis_port = start_redis(work)
            server = peers.start_tachymail(work, config=node_config(work, sink_port, redis_port))
            try:
                started = time.perf_counter()
                subprocess.run(
                    [
                        str(BINARY),
                        "bench",
                        f"127.0.0.1:{server.port}",
                        "--messages",
                        str(messages),
                        "--concurrency",
                        str(concurrency),
                        "--to",
                        "u{n}@dest.test",
                        "--json",
                    ],
                    capture_output=True,
                    check=True,
                    timeout=900,
                )
                deadline = time.monotonic() + 600
                while (got := sink_messages(metrics)) < messages:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the sink got {got} of {messages} messages")
                    time.sleep(0.02)
                elapsed = time.perf_counter() - started
                cpu = server.cpu()
            finally:
                server.stop()
            return {"msgs_per_s": messages / elapsed, "cpu_s_per_1000": cpu / messages * 1000}
        finally:
            stop(sink)
            if redis is not None:
                stop(redis)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each set-up (medians)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "shaping.json"))
    args = parser.parse_args()
    if not Path(REDIS_SERVER).exists():
        print("shaping benchmark skipped: redis-server is not installed", file=sys.stderr)
        return 0
    runs: dict[str, list[dict[str, float]]] = {"plain": [], "shaped": []}
    for _ in range(max(1, args.repeat)):
        for name in ("plain", "shaped"):
            runs[name].append(run(name == "shaped", args.messages, args.concurrency))
            print(f"{name}: {runs[name][-1]}", file=sys.stderr)
    medians = {
        name: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        for name, rows in runs.items()
    }
    ratio = statistics.median(
        s["msgs_per_s"] / p["msgs_per_s"]
        for s, p in zip(runs["shaped"], runs["plain"], strict=True)
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"medians": medians, "ratio": ratio, "runs": runs}, indent=2))
    plain, shaped = medians["plain"], medians["shaped"]
    print(
        "| set-up | msgs/s | CPU-s per 1000 msgs |\n| --- | ---: | ---: |\n"
        f"| no shaping, no Redis | {plain['msgs_per_s']:,.0f} | {plain['cpu_s_per_1000']:.2f} |\n"
        f"| cluster rule via Redis | {shaped['msgs_per_s']:,.0f} "
        f"| {shaped['cpu_s_per_1000']:.2f} |\n\n"
        f"shaped / plain: {ratio:.2f} (median of {len(runs['plain'])}; issue target >= 0.85)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

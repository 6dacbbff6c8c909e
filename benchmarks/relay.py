"""End-to-end relay side by side: smtp-source → tachymail → smtp-sink, and
smtp-source → Postfix → smtp-sink, in the same run.

    .venv/bin/python benchmarks/relay.py [--messages 20000] [--repeat 3] [--quick]

For each case: msgs/s from the start of the load until the sink has every message,
the tachymail/Postfix ratio, accept-to-delivery latency p50/p99 from tachymail's delivery
log, and the connections the sink saw (sessions, counted after the relay is stopped).
With --repeat N each case runs N times, the two relays alternating, and the table shows
the medians (the ratio is the median of the per-repetition ratios).
Then tachymail alone at half its measured rate (`tachymail bench --rate`), for the
latency at a sustainable load: a first WARM_UP messages at that rate, delivered before the
measured ones are sent, take the server's start (its delivery worker starting while the
SMTP worker already answers) out of the figures. Writes benchmarks/results/relay.json and
prints a Markdown table. Needs root (Postfix) and the postfix package.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers

CASES = [(1024, 16), (1024, 100), (65536, 16), (65536, 100)]


#: tachymail's delivery worker processes (--delivery-workers)
DELIVERY_WORKERS = 1


def tachymail_config(sink_port: int) -> str:
    return (
        f'[delivery]\nsmarthost = "127.0.0.1:{sink_port}"\nsmarthost_tls = "none"\n'
        f"workers = {DELIVERY_WORKERS}\n"
        "[pool]\nmax_connections = 20\n"
    )


def wait_for_sink(counters: Path, messages: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if peers.sink_counters(counters).get("mesg", 0) >= messages:
            return time.perf_counter()
        time.sleep(0.02)
    raise TimeoutError(f"the sink got {peers.sink_counters(counters)} of {messages} messages")


#: messages sent at the paced rate, and delivered, before the measured ones
WARM_UP = 1000


def latencies(data_dir: Path, skip: int = 0) -> list[float]:
    """The accept-to-delivery latencies of the delivery log, sorted, but for the first
    *skip* deliveries logged."""
    log = data_dir / "delivery.log"
    if not log.exists():
        return []
    delivered = [line for line in log.read_text().splitlines() if '"delivered"' in line]
    return sorted(float(json.loads(line)["latency"]) for line in delivered[skip:])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def run_case(relay: str, size: int, sessions: int, messages: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix=f"relay-{relay}-") as tmp:
        work = Path(tmp)
        counters = work / "sink.counters"
        sink = peers.start_smtp_sink(work, counters)
        time.sleep(0.2)
        probes = peers.sink_counters(counters).get("sess", 0)  # start_smtp_sink's probe
        try:
            if relay == "tachymail":
                server = peers.start_tachymail(work, config=tachymail_config(sink.port))
            else:
                server = peers.start_postfix(work, relay_to=sink.port)
            try:
                started = time.perf_counter()
                peers.smtp_source(server.port, messages, sessions, size, reuse=True)
                done = wait_for_sink(counters, messages, timeout=900)
                cpu = server.cpu()
            finally:
                server.stop()
            time.sleep(1.0)  # the relay's cached connections close: the sink counts them
            row = {
                "msgs_per_s": messages / (done - started),
                "connections": float(peers.sink_counters(counters).get("sess", 0) - probes),
                "cpu_s_per_1000": cpu / messages * 1000,
            }
            lat = latencies(work / "tachymail-data")
            if lat:
                row["p50_ms"] = percentile(lat, 0.5) * 1000
                row["p99_ms"] = percentile(lat, 0.99) * 1000
            return row
        finally:
            sink.stop()


def run_paced(rate: float, messages: int) -> dict[str, float]:
    """tachymail alone at *rate* msgs/s: latency at a sustainable load."""
    with tempfile.TemporaryDirectory(prefix="relay-paced-") as tmp:
        work = Path(tmp)
        counters = work / "sink.counters"
        sink = peers.start_smtp_sink(work, counters)
        server = peers.start_tachymail(work, config=tachymail_config(sink.port))
        try:
            binary = Path(sys.executable).with_name("tachymail")
            for count, total in ((WARM_UP, WARM_UP), (messages, WARM_UP + messages)):
                subprocess.run(
                    [
                        str(binary),
                        "bench",
                        f"127.0.0.1:{server.port}",
                        "--messages",
                        str(count),
                        "--concurrency",
                        "16",
                        "--rate",
                        str(rate),
                        "--size",
                        "1024",
                        "--json",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=900,
                    check=True,
                )
                wait_for_sink(counters, total, timeout=300)
            lat = latencies(work / "tachymail-data", skip=WARM_UP)
        finally:
            server.stop()
            sink.stop()
    return {
        "rate": rate,
        "p50_ms": percentile(lat, 0.5) * 1000,
        "p99_ms": percentile(lat, 0.99) * 1000,
    }


def issue_table(results: list[dict[str, object]]) -> list[str]:
    """The relay rows of issue 15's table (the columns of benchmarks/intake.py's): msgs/s of
    Postfix and tachymail and their ratio, then CPU-seconds per 1000 messages of each relay,
    intake and delivery together. The sink column stays empty: the sink is the destination."""
    lines = [
        "| cell | smtp-sink (stores nothing) | Postfix | Tachymail | ratio to Postfix "
        "| ratio to sink |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        t, p = r["tachymail"], r["postfix"]
        case = f"{int(r['size']) // 1024} KiB, {r['sessions']} sessions"  # type: ignore[call-overload]
        lines.append(
            f"| relay {case} | | {p['msgs_per_s']:,.0f} | {t['msgs_per_s']:,.0f} "  # type: ignore[index]
            f"| {r['ratio']:.1f}x | |"
        )
    for r in results:
        t, p = r["tachymail"], r["postfix"]
        case = f"{int(r['size']) // 1024} KiB, {r['sessions']} sessions"  # type: ignore[call-overload]
        lines.append(
            f"| server CPU-s per 1000 msgs, relay {case} | | {p['cpu_s_per_1000']:.3f} "  # type: ignore[index]
            f"| {t['cpu_s_per_1000']:.3f} "  # type: ignore[index]
            f"| {t['cpu_s_per_1000'] / p['cpu_s_per_1000']:.2f}x | |"  # type: ignore[index]
        )
    return lines


def median_row(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the repetitions."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--quick", action="store_true", help="1 KiB and 16 sessions only")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (medians)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "relay.json"))
    parser.add_argument(
        "--delivery-workers",
        type=int,
        default=1,
        help="tachymail's [delivery] workers (the SMTP workers get the other cores)",
    )
    parser.add_argument(
        "--cases",
        default="",
        help="comma-separated SIZExSESSIONS to run, e.g. 1024x16,65536x16; default: all",
    )
    args = parser.parse_args()
    global DELIVERY_WORKERS
    DELIVERY_WORKERS = args.delivery_workers
    why = peers.postfix_available()
    if why:
        print(f"relay benchmark skipped: {why}", file=sys.stderr)
        return 0
    results = []
    cases = CASES[:1] if args.quick else CASES
    if args.cases:
        cases = [(int(a), int(b)) for a, _, b in (c.partition("x") for c in args.cases.split(","))]
    for size, sessions in cases:
        runs: dict[str, list[dict[str, float]]] = {"tachymail": [], "postfix": []}
        for _ in range(max(1, args.repeat)):
            for relay in ("tachymail", "postfix"):
                runs[relay].append(run_case(relay, size, sessions, args.messages))
                print(f"{size} {sessions} {relay}: {runs[relay][-1]}", file=sys.stderr)
        row: dict[str, object] = {
            "size": size,
            "sessions": sessions,
            "tachymail": median_row(runs["tachymail"]),
            "postfix": median_row(runs["postfix"]),
            "ratio": statistics.median(
                t["msgs_per_s"] / p["msgs_per_s"]
                for t, p in zip(runs["tachymail"], runs["postfix"], strict=True)
            ),
            "runs": runs,
        }
        results.append(row)
    best = max(r["tachymail"]["msgs_per_s"] for r in results if r["size"] == 1024)  # type: ignore[index]
    paced = run_paced(best / 2, min(args.messages, 10000))
    print(f"paced: {paced}", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cases": results, "paced": paced}, indent=2))
    lines = [
        "| case | tachymail msgs/s | Postfix msgs/s | ratio | p50 / p99 accept→delivery "
        "| sink connections tachymail / Postfix | CPU-s per 1000 msgs tachymail / Postfix |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        t, p = r["tachymail"], r["postfix"]
        lines.append(
            f"| {int(r['size']) // 1024} KiB, {r['sessions']} sessions "  # type: ignore[call-overload]
            f"| {t['msgs_per_s']:,.0f} | {p['msgs_per_s']:,.0f} "  # type: ignore[index]
            f"| {r['ratio']:.1f}x "
            f"| {t.get('p50_ms', 0):.0f} / {t.get('p99_ms', 0):.0f} ms "  # type: ignore[attr-defined]
            f"| {t['connections']:.0f} / {p['connections']:.0f} "  # type: ignore[index]
            f"| {t['cpu_s_per_1000']:.2f} / {p['cpu_s_per_1000']:.2f} |"  # type: ignore[index]
        )
    lines += ["", *issue_table(results)]
    lines.append("")
    lines.append(
        f"At half the maximum 1 KiB rate ({paced['rate']:,.0f} msgs/s, `tachymail bench "
        f"--rate`): accept→delivery p50 {paced['p50_ms']:.1f} ms, p99 {paced['p99_ms']:.1f} ms."
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

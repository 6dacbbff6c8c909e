"""Load generators side by side: `tachymail bench` and smtp-source, one smtp-sink, one run.

    .venv/bin/python benchmarks/loadgen.py [--repeat 3] [--messages 20000]

For 16 and 100 sessions with 1 KiB messages, each generator sends the same number of messages
to one smtp-sink, in turn, *repeat* times; the table gives the median msgs/s of each (wall
time of the whole command, start-up included), the ratio, and each generator's CPU seconds
per 1000 messages. `tachymail bench` runs with its defaults (one process, PIPELINING as
smtp-sink offers it) and once more with --no-pipelining, which talks the way smtp-source
does. Writes benchmarks/results/loadgen.json. Needs the postfix package (smtp-sink and
smtp-source).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """Run *cmd*; (wall seconds, its CPU seconds, stdout)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {err.read().decode()[-500:]}")
        return wall, usage.ru_utime + usage.ru_stime, out.read().decode()


def generators(port: int, messages: int, sessions: int) -> dict[str, list[str]]:
    target = f"127.0.0.1:{port}"
    bench = [sys.executable, "-m", "tachymail", "bench", target, "--json"]
    bench += ["--messages", str(messages), "--concurrency", str(sessions), "--size", "1k"]
    return {
        "smtp-source": [
            *(peers.SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", "1024", "-d"),
            *("-f", "bench@example.com", "-t", "sink@example.net", target),
        ],
        "tachymail bench": bench,
        "tachymail bench --no-pipelining": [*bench, "--no-pipelining"],
    }


def run(messages: int, repeat: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="loadgen-") as tmp:
        Path(tmp).chmod(0o755)
        sink = peers.start_smtp_sink(Path(tmp))
        try:
            for sessions in (16, 100):
                samples: dict[str, list[tuple[float, float]]] = {}
                for _ in range(repeat):
                    for name, cmd in generators(sink.port, messages, sessions).items():
                        wall, cpu, out = timed(cmd)
                        if name.startswith("tachymail"):
                            summary = json.loads(out)
                            assert summary["accepted"] == messages, summary
                        samples.setdefault(name, []).append((messages / wall, cpu))
                row: dict[str, object] = {"sessions": sessions, "messages": messages}
                for name, values in samples.items():
                    row[name] = {
                        "msgs_per_s": statistics.median(v[0] for v in values),
                        "cpu_s_per_1000": statistics.median(v[1] for v in values) / messages * 1000,
                    }
                    print(f"{sessions:>4} sessions  {name:<32} {row[name]}", file=sys.stderr)
                rows.append(row)
        finally:
            sink.stop()
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "| sessions | smtp-source msgs/s | bench msgs/s | ratio | bench --no-pipelining | ratio "
        "| CPU-s/1000 msgs smtp-source | bench | bench --no-pipelining |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        src, fast, slow = (
            row[n]  # type: ignore[index]
            for n in ("smtp-source", "tachymail bench", "tachymail bench --no-pipelining")
        )
        lines.append(
            f"| {row['sessions']} | {src['msgs_per_s']:,.0f} | {fast['msgs_per_s']:,.0f} | "  # type: ignore[index]
            f"{fast['msgs_per_s'] / src['msgs_per_s']:.2f}x | {slow['msgs_per_s']:,.0f} | "  # type: ignore[index]
            f"{slow['msgs_per_s'] / src['msgs_per_s']:.2f}x | {src['cpu_s_per_1000']:.3f} | "  # type: ignore[index]
            f"{fast['cpu_s_per_1000']:.3f} | {slow['cpu_s_per_1000']:.3f} |"  # type: ignore[index]
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell; medians are kept")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "loadgen.json"))
    args = parser.parse_args()
    if not (Path(peers.SMTP_SINK).exists() and Path(peers.SMTP_SOURCE).exists()):
        print("loadgen benchmark skipped: postfix (smtp-sink, smtp-source) is not installed")
        return 0
    rows = run(args.messages, args.repeat)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Durable intake side by side: tachymail --hold vs Postfix (deferring all delivery) vs
smtp-sink (no storage: the ceiling), all loaded by Postfix's smtp-source in the same run.

    .venv/bin/python benchmarks/intake.py [--repeat 3] [--quick] [--journal] [--cases TEXT]

Writes benchmarks/results/intake.json and prints a Markdown table: msgs/s of each server,
tachymail/Postfix and tachymail/smtp-sink ratios, and server CPU-seconds per 1000 messages.
Needs root (for the private Postfix instance) and the postfix package.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers


@dataclass
class Case:
    size: int
    sessions: int
    reuse: bool
    messages: int

    @property
    def label(self) -> str:
        size = f"{self.size // 1024} KiB"
        conn = "reuse" if self.reuse else "new conn/msg"
        return f"{size}, {self.sessions} sessions, {conn}"


FULL = [
    Case(1024, 1, True, 1500),
    Case(1024, 16, True, 6000),
    Case(1024, 100, True, 6000),
    Case(1024, 16, False, 4000),
    Case(65536, 1, True, 600),
    Case(65536, 16, True, 2000),
    Case(65536, 100, True, 2000),
    Case(65536, 16, False, 1500),
]
QUICK = [Case(1024, 16, True, 3000), Case(65536, 16, True, 1000), Case(1024, 16, False, 2000)]


def start_tachymail_journal(workdir: Path) -> peers.Peer:
    """tachymail holding delivery, with the journal commit mode ([queue] commit)."""
    return peers.start_tachymail(
        workdir, config='[server]\nhold = true\n\n[queue]\ncommit = "journal"\n'
    )


STARTERS = {
    "tachymail": peers.start_tachymail,
    "postfix": peers.start_postfix,
    "smtp-sink": peers.start_smtp_sink,
}
#: with --journal, measured in the same run beside the default commit mode
JOURNAL = "tachymail-journal"


def measure(name: str, case: Case) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        peer = STARTERS[name](Path(tmp))
        try:
            peers.smtp_source(peer.port, 50, min(case.sessions, 10), case.size)  # warm up
            cpu_before = peer.cpu()
            elapsed = peers.smtp_source(
                peer.port, case.messages, case.sessions, case.size, case.reuse
            )
            cpu = peer.cpu() - cpu_before
        finally:
            peer.stop()
    return {"msgs_per_s": case.messages / elapsed, "cpu_s_per_1000": cpu / case.messages * 1000}


def run(cases: list[Case], repeat: int) -> list[dict[str, object]]:
    results = []
    for case in cases:
        row: dict[str, object] = {"case": case.label, **asdict(case)}
        for name in STARTERS:
            runs = [measure(name, case) for _ in range(repeat)]
            row[name] = {
                key: statistics.median(r[key] for r in runs)
                for key in ("msgs_per_s", "cpu_s_per_1000")
            }
            print(f"{case.label:<36} {name:<10} {row[name]}", file=sys.stderr)  # type: ignore[index]
        results.append(row)
    return results


def markdown(results: list[dict[str, object]]) -> str:
    """The table of issue 15: msgs/s of smtp-sink, Postfix and tachymail, the ratios, then
    each server's CPU-seconds per 1000 messages, all from this run."""
    lines = [
        "| cell | smtp-sink (stores nothing) | Postfix | Tachymail | ratio to Postfix "
        "| ratio to sink |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results:
        t, p, s = (row[n] for n in ("tachymail", "postfix", "smtp-sink"))
        lines.append(
            f"| intake {row['case']} | {s['msgs_per_s']:,.0f} | {p['msgs_per_s']:,.0f} | "  # type: ignore[index]
            f"{t['msgs_per_s']:,.0f} | {t['msgs_per_s'] / p['msgs_per_s']:.1f}x | "  # type: ignore[index]
            f"{t['msgs_per_s'] / s['msgs_per_s']:.2f}x |"  # type: ignore[index]
        )
    for row in results:
        t, p, s = (row[n] for n in ("tachymail", "postfix", "smtp-sink"))
        lines.append(
            f"| server CPU-s per 1000 msgs, intake {row['case']} | "
            f"{s['cpu_s_per_1000']:.3f} | {p['cpu_s_per_1000']:.3f} | "  # type: ignore[index]
            f"{t['cpu_s_per_1000']:.3f} | "  # type: ignore[index]
            f"{t['cpu_s_per_1000'] / p['cpu_s_per_1000']:.2f}x | "  # type: ignore[index]
            f"{t['cpu_s_per_1000'] / s['cpu_s_per_1000']:.1f}x the sink |"  # type: ignore[index]
        )
    if results and JOURNAL in results[0]:
        lines += [
            "",
            '| case | commit = "journal" msgs/s | vs Postfix | of smtp-sink | vs inline '
            "| CPU-s/1000 msgs journal | inline | smtp-sink |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in results:
            j, t, p, s = (row[n] for n in (JOURNAL, "tachymail", "postfix", "smtp-sink"))
            lines.append(
                f"| {row['case']} | {j['msgs_per_s']:,.0f} | "  # type: ignore[index]
                f"{j['msgs_per_s'] / p['msgs_per_s']:.1f}x | "  # type: ignore[index]
                f"{j['msgs_per_s'] / s['msgs_per_s']:.0%} | "  # type: ignore[index]
                f"{j['msgs_per_s'] / t['msgs_per_s']:.2f}x | "  # type: ignore[index]
                f"{j['cpu_s_per_1000']:.3f} | {t['cpu_s_per_1000']:.3f} | "  # type: ignore[index]
                f"{s['cpu_s_per_1000']:.3f} |"  # type: ignore[index]
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs per cell; the median is kept")
    parser.add_argument("--quick", action="store_true", help="three cases only")
    parser.add_argument(
        "--journal",
        action="store_true",
        help='also measure [queue] commit = "journal" in the same run (a second table)',
    )
    parser.add_argument("--cases", help="only the cases whose label contains this text")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "intake.json"))
    args = parser.parse_args()
    why = peers.postfix_available()
    if why:
        print(f"intake benchmark skipped: {why}", file=sys.stderr)
        return 0
    if args.journal:
        STARTERS[JOURNAL] = start_tachymail_journal
    cases = QUICK if args.quick else FULL
    if args.cases:
        cases = [case for case in cases if args.cases in case.label]
    results = run(cases, args.repeat)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

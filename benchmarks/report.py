"""Turns a pytest-benchmark JSON file into the kernel table: MB/s (or items/s) and the
compiled/pure ratio per benchmark group, as Markdown on stdout.

    python benchmarks/report.py benchmarks/results/kernels.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def throughput(bench: dict[str, Any]) -> tuple[float, str]:
    """Median throughput of one benchmark: MB/s, or items/s for per-item kernels."""
    median = bench["stats"]["median"]
    extra = bench.get("extra_info", {})
    if "items" in extra:
        return extra["items"] / median, "items/s"
    return extra["bytes"] / median / 1e6, "MB/s"


def table(data: dict[str, Any]) -> str:
    rows: dict[str, dict[str, tuple[float, str]]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        impl = (bench.get("params") or {}).get("impl", "?")
        rows[bench["group"]][impl] = throughput(bench)
    lines = [
        "| benchmark | compiled | pure twin | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    for group in sorted(rows):
        impls = rows[group]
        comp, pure = impls.get("compiled"), impls.get("pure")
        unit = (comp or pure or (0.0, ""))[1]
        cells = [f"{v[0]:,.0f} {unit}" if v else "-" for v in (comp, pure)]
        ratio = f"{comp[0] / pure[0]:.1f}x" if comp and pure else "-"
        lines.append(f"| {group} | {cells[0]} | {cells[1]} | {ratio} |")
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw", "unknown CPU")
    lines.append("")
    lines.append(f"Medians; {cpu}, Python {machine.get('python_version', '?')}.")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    path = Path(argv[1] if len(argv) > 1 else "benchmarks/results/kernels.json")
    print(table(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

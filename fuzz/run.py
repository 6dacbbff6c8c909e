"""Runs the atheris fuzz targets one after another: ``./dev fuzz [--seconds N] [TARGET...]``.

Each target keeps a growing corpus in fuzz/corpus/<target>/ (not in git) on top of the seeds
in fuzz/seeds/<target>/ (in git); a crash, a disagreement between a compiled kernel and its
twin, a timeout (a loop) or running out of memory writes the reproducer to
fuzz/artifacts/<target>/ (not in git) and makes the command fail with its path.  Reproduce one
with ``.venv/bin/python fuzz/fuzz_<target>.py fuzz/artifacts/<target>/crash-...``.

``--runs N`` stops each target after N executions instead of after a time (the long run);
``--log-dir DIR`` writes each target's libFuzzer output to DIR/<target>.log.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: target -> (longest input, dictionary): commands and sessions are short dialogues; MIME
#: structure shows in a few KiB too, and longer inputs only slow each execution down
TARGETS: dict[str, tuple[int, str | None]] = {
    "commands": (4096, "smtp.dict"),
    "data": (4096, None),
    "imap": (4096, "imap.dict"),
    "mime": (16384, "mime.dict"),
    "session": (4096, "smtp.dict"),
}
ARTIFACT = re.compile(r"Test unit written to (\S+)")
STATS = re.compile(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+).*exec/s: (\d+)")


def command(target: str, seconds: int, runs: int | None, extra: list[str]) -> list[str]:
    max_len, dictionary = TARGETS[target]
    corpus = HERE / "corpus" / target
    artifacts = HERE / "artifacts" / target
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable,
        str(HERE / f"fuzz_{target}.py"),
        str(corpus),
        str(HERE / "seeds" / target),
        f"-max_len={max_len}",
        "-timeout=30",  # one input taking this long is a hang (the session waits up to 10 s)
        "-rss_limit_mb=2048",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
    ]
    args.append(f"-runs={runs}" if runs is not None else f"-max_total_time={seconds}")
    if dictionary:
        args.append(f"-dict={HERE / dictionary}")
    return args + extra


def run(
    target: str, seconds: int, runs: int | None, log_dir: Path | None, extra: list[str]
) -> bool:
    """Fuzz *target*; True when it found nothing."""
    started = time.monotonic()
    print(f"fuzz {target}: {f'{runs} runs' if runs else f'{seconds} s'}", flush=True)
    log = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log = (log_dir / f"{target}.log").open("w")
    tail: deque[str] = deque(maxlen=60)
    artifacts: list[str] = []
    stats = None
    with subprocess.Popen(
        command(target, seconds, runs, extra),
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as proc:
        assert proc.stdout is not None
        # Streamed, not collected: a long run's log can be followed while it grows.
        for line in proc.stdout:
            if log is not None:
                log.write(line)
                log.flush()
            tail.append(line.rstrip("\n"))
            artifacts += ARTIFACT.findall(line)
            stats = STATS.search(line) or stats
    if log is not None:
        log.close()
    elapsed = time.monotonic() - started
    if stats:
        execs, cov, ft, corp, size, rate = stats.groups()
        print(
            f"fuzz {target}: {execs} executions in {elapsed:.0f} s ({rate} exec/s), "
            f"coverage {cov} edges / {ft} features, corpus {corp} inputs ({size})",
            flush=True,
        )
    if proc.returncode == 0:
        return True
    print("\n".join(tail), file=sys.stderr)
    print(f"fuzz {target}: FAILED (exit {proc.returncode})", file=sys.stderr)
    for path in artifacts:
        print(f"fuzz {target}: reproducer {path}", file=sys.stderr)
        print(f"  replay: {sys.executable} {HERE / f'fuzz_{target}.py'} {path}", file=sys.stderr)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=", ".join(TARGETS))
    parser.add_argument("--seconds", type=int, default=20, help="per target (default 20)")
    parser.add_argument("--runs", type=int, help="executions per target instead of a time")
    parser.add_argument("--log-dir", type=Path, help="keep each target's output here")
    parser.add_argument(
        "--libfuzzer",
        action="append",
        default=[],
        metavar="ARG",
        help="extra libFuzzer argument, e.g. --libfuzzer=-jobs=2",
    )
    options = parser.parse_args()
    unknown = [t for t in options.targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    failed = [
        target
        for target in options.targets or list(TARGETS)
        if not run(target, options.seconds, options.runs, options.log_dir, options.libfuzzer)
    ]
    if failed:
        print(f"fuzzing found problems in: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

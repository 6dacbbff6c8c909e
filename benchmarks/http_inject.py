"""HTTP injection vs SMTP intake of the same messages, side by side in one run.

    flock /tmp/bench.lock .venv/bin/python benchmarks/http_inject.py [--repeat 3] [--quick]

One `tachymail serve` holding its queue (nothing is delivered) with an ``mx`` and an
``http`` listener, a fresh one per measurement, takes 100,000 recipients of a 1 KiB message:

- **shared content**: over HTTP, 100 requests of 1,000 recipients with ``"static"`` raw
  content (one queued message per request); over SMTP (``tachymail bench``), 100
  transactions of 1,000 RCPTs each. Same messages, same envelopes.
- **personal content**: over HTTP, 100 requests of 1,000 recipients whose raw content is
  a Jinja template with a per-recipient substitution (one queued message per recipient);
  over SMTP, 100,000 one-recipient transactions (what a sender that personalises every
  message does over SMTP).
- **personal, built MIME**: as the previous HTTP case, but the request gives the content
  object (from, subject, text and HTML bodies), so each recipient's message is built with
  the ``email`` package; compared with the same SMTP figure.

Recipients/s each way (wall time from the first request or connection to the last reply,
every reply checked: 200 with every recipient queued, or 250), the ratio HTTP/SMTP (the
issue's target: at least 1), and server CPU-seconds per 1,000 recipients. The clients run
on the same machine: the HTTP client sends pre-encoded bodies from 16 concurrent
connections (aiohttp, orjson), ``tachymail bench`` runs 16 pipelined sessions.
Writes benchmarks/results/http_inject.json and prints a Markdown table (medians).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers

RECIPIENTS = 100_000
PER_REQUEST = 1_000
HTTP_CLIENTS = 16
SMTP_SESSIONS = 16


@dataclass
class Case:
    name: str
    #: "static", "personal" (raw Jinja) or "built" (the content object, per recipient)
    http: str
    #: recipients per SMTP transaction
    smtp_rcpts: int


CASES = [
    Case("shared content, 1,000 recipients a message", "static", 1000),
    Case("personal content, 1 recipient a message", "personal", 1),
    Case("personal, built MIME (content object)", "built", 1),
]


def message_1k(personal: bool) -> str:
    """A 1 KiB message (1,024 octets with CRLF line ends, before Jinja renders it)."""
    head = "From: bench@example.com\r\nTo: {{ to }}\r\nSubject: bench\r\n\r\n"
    if not personal:
        head = head.replace("{{ to }}", "undisclosed-recipients:;")
    line = "x" * 62 + "\r\n"
    body = line * ((1024 - len(head)) // len(line))
    text = head + body
    return text + "y" * (1024 - len(text) - 2) + "\r\n"


def bodies(case: Case) -> list[bytes]:
    """The HTTP request bodies, encoded before the clock starts."""
    out = []
    for start in range(0, RECIPIENTS, PER_REQUEST):
        recipients: list[dict[str, Any]] = [
            {"email": f"user{n}@example.net"} for n in range(start, start + PER_REQUEST)
        ]
        body: dict[str, Any] = {"envelope_sender": "bench@example.com", "recipients": recipients}
        if case.http == "static":
            body["content"] = message_1k(personal=False)
        else:
            for rcpt in recipients:
                rcpt["substitutions"] = {"to": rcpt["email"]}
            body["template_dialect"] = "jinja"
            if case.http == "personal":
                body["content"] = message_1k(personal=True)
            else:
                body["content"] = {
                    "from": "Bench <bench@example.com>",
                    "subject": "bench for {{ to }}",
                    "text_body": "x" * 300 + "\n{{ to }}\n",
                    "html_body": "<p>" + "x" * 300 + "</p><p>{{ to }}</p>",
                }
        out.append(orjson.dumps(body))
    return out


class Server:
    """tachymail serve holding its queue, with mx and http listeners, and a token."""

    def __init__(self, workdir: Path, workers: int | None) -> None:
        self.smtp_port, self.http_port = peers.free_port(), peers.free_port()
        data = workdir / "data"
        config = workdir / "tachymail.toml"
        config.write_text(
            f'[server]\nhold = true\ndata_dir = "{data}"\n'
            f'[[listener]]\naddress = "127.0.0.1:{self.smtp_port}"\nrole = "mx"\n'
            'mailauth = "off"\n'
            f'[[listener]]\naddress = "127.0.0.1:{self.http_port}"\nrole = "http"\n'
            '[metrics]\naddress = ""\n'
        )
        binary = str(Path(sys.executable).with_name("tachymail"))
        self.token = subprocess.run(
            [binary, "token", "add", "bench", "--scope", "inject", "-c", str(config)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        log = open(workdir / "tachymail.log", "ab")  # noqa: SIM115 - kept open by the child
        workers_args = ["--workers", str(workers)] if workers else []
        self.proc = subprocess.Popen(
            [binary, "--log-level", "WARNING", "serve", "-c", str(config), *workers_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        peers.wait_port(self.smtp_port)
        peers.wait_port(self.http_port)

    def cpu(self) -> float:
        return peers.tree_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


async def _inject(port: int, token: str, payloads: list[bytes]) -> float:
    """POST every payload, HTTP_CLIENTS at a time; the wall time. Fails on any refusal."""
    url = f"http://127.0.0.1:{port}/api/v1/messages"
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    work = list(reversed(payloads))
    connector = aiohttp.TCPConnector(limit=HTTP_CLIENTS)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            while work:
                payload = work.pop()
                async with session.post(url, data=payload, headers=headers) as response:
                    reply = orjson.loads(await response.read())
                    if response.status != 200 or reply["fail_count"]:
                        raise RuntimeError(f"injection refused: {response.status} {reply}")

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(HTTP_CLIENTS)))
        return time.perf_counter() - started


def measure_http(case: Case, payloads: list[bytes], workers: int | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        server = Server(Path(tmp), workers)
        try:
            # One request per client at once, so that every worker (each accepts on its own
            # SO_REUSEPORT socket) has started and served one before the clock starts.
            asyncio.run(_inject(server.http_port, server.token, payloads[:HTTP_CLIENTS]))
            before = server.cpu()
            elapsed = asyncio.run(_inject(server.http_port, server.token, payloads))
            cpu = server.cpu() - before
        finally:
            server.stop()
    return {"rcpts_per_s": RECIPIENTS / elapsed, "cpu_s_per_1000": cpu / RECIPIENTS * 1000}


def measure_smtp(case: Case, workers: int | None) -> dict[str, float]:
    messages = RECIPIENTS // case.smtp_rcpts
    binary = str(Path(sys.executable).with_name("tachymail"))
    with tempfile.TemporaryDirectory(prefix="bench-smtp-") as tmp:
        server = Server(Path(tmp), workers)
        try:

            def bench(count: int) -> float:
                out = subprocess.run(
                    [
                        binary, "bench", f"127.0.0.1:{server.smtp_port}",
                        "--messages", str(count), "--concurrency", str(SMTP_SESSIONS),
                        "--size", "1k", "--rcpts", str(case.smtp_rcpts),
                        "--from", "bench@example.com", "--to", "user{n}.{r}@example.net",
                        "--json",
                    ],
                    capture_output=True, text=True, timeout=900, check=True,
                )  # fmt: skip
                summary = json.loads(out.stdout)
                if summary["accepted"] != count or summary["rcpt_replies"] or summary["errors"]:
                    raise RuntimeError(f"SMTP intake refused some: {summary}")
                return float(summary["elapsed_s"])

            bench(min(messages, 100))  # warm up
            before = server.cpu()
            elapsed = bench(messages)
            cpu = server.cpu() - before
        finally:
            server.stop()
    return {"rcpts_per_s": RECIPIENTS / elapsed, "cpu_s_per_1000": cpu / RECIPIENTS * 1000}


def run(cases: list[Case], repeat: int, workers: int | None) -> list[dict[str, Any]]:
    results = []
    for case in cases:
        payloads = bodies(case)
        runs: dict[str, list[dict[str, float]]] = {"http": [], "smtp": []}
        for _ in range(repeat):  # alternating, so a drift of the machine hits both
            runs["http"].append(measure_http(case, payloads, workers))
            runs["smtp"].append(measure_smtp(case, workers))
        row: dict[str, Any] = {"case": case.name}
        for way, samples in runs.items():
            row[way] = {
                key: statistics.median(sample[key] for sample in samples) for key in samples[0]
            }
            row[way]["runs"] = samples
        row["ratio"] = row["http"]["rcpts_per_s"] / row["smtp"]["rcpts_per_s"]
        results.append(row)
        print(f"{case.name}: ratio {row['ratio']:.2f}", file=sys.stderr)
    return results


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| 100,000 recipients, 1 KiB | HTTP rcpts/s | SMTP rcpts/s | HTTP/SMTP | "
        "server CPU-s/1000 rcpts: HTTP | SMTP |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results:
        http, smtp = row["http"], row["smtp"]
        lines.append(
            f"| {row['case']} | {http['rcpts_per_s']:,.0f} | {smtp['rcpts_per_s']:,.0f} | "
            f"**{row['ratio']:.2f}x** | {http['cpu_s_per_1000']:.3f} | "
            f"{smtp['cpu_s_per_1000']:.3f} |"
        )
    return "\n".join(lines)


def main() -> int:
    global RECIPIENTS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="20,000 recipients, one run")
    parser.add_argument("--workers", type=int, default=None, help="SMTP workers (default: auto)")
    parser.add_argument("--case", action="append", choices=[c.http for c in CASES])
    args = parser.parse_args()
    repeat = args.repeat
    if args.quick:
        RECIPIENTS, repeat = 20_000, 1
    cases = [c for c in CASES if not args.case or c.http in args.case]
    results = run(cases, repeat, args.workers)
    out = Path(__file__).resolve().parent / "results" / "http_inject.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

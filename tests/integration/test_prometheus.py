"""A real Prometheus (Debian's package) scrapes a running tachymail; the accepted-messages
counter is read back through Prometheus's HTTP query API.

Prometheus runs on a free loopback port with its own config and data in tmp_path and is
stopped by PID. If the binary is missing the test installs the package (as root, with
service starts denied so that no system Prometheus is left on :9090), and skips, naming
the reason, only if that is impossible.
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import free_port, running_server
from tachymail.metrics.endpoint import listening_ports

POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


def _listening(port: int) -> bool:
    return port in listening_ports()


def prometheus_binary() -> str:
    """The prometheus executable, installing Debian's package if needed (or skip)."""
    found = shutil.which("prometheus")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("prometheus is not installed and cannot be (needs root and apt-get)")
    was_listening = _listening(9090)
    # Deny service starts during the install: postinst would otherwise start a system
    # Prometheus on :9090. Only a policy file we create is removed again.
    created = not POLICY_RC_D.exists()
    if created:
        POLICY_RC_D.write_text("#!/bin/sh\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        command = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, timeout=600)
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot install Debian's prometheus package: {exc}")
    finally:
        if created:
            POLICY_RC_D.unlink(missing_ok=True)
    if done.returncode != 0:
        pytest.skip(f"cannot install Debian's prometheus package: {done.stderr.strip()[-300:]}")
    assert was_listening or not _listening(9090), "the package left a Prometheus on :9090"
    found = shutil.which("prometheus")
    if not found:
        pytest.skip("the prometheus package installed no prometheus binary")
    return found


@contextmanager
def running_prometheus(tmp_path: Path, target: str) -> Iterator[int]:
    binary = prometheus_binary()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: tachymail\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield port
    finally:
        proc.terminate()  # by PID, never by name
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def query(port: int, promql: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    result: list[dict[str, object]] = answer["data"]["result"]
    return result


def wait_for_value(port: int, promql: str, expected: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    seen: object = None
    while time.monotonic() < deadline:
        try:
            result = query(port, promql)
        except OSError:  # Prometheus still starting
            result = []
        if result:
            seen = float(result[0]["value"][1])  # type: ignore[index]
            if seen == expected:
                return
        time.sleep(0.25)
    raise AssertionError(f"{promql} is {seen}, expected {expected}")


def test_prometheus_scrapes_the_accepted_messages_counter(tmp_path: Path) -> None:
    metrics_port = free_port()
    extra = f'[metrics]\naddress = "127.0.0.1:{metrics_port}"\n'
    with (
        running_server(tmp_path, extra, workers=2, roles=("mx",)) as srv,
        running_prometheus(tmp_path, f"127.0.0.1:{metrics_port}") as prom,
    ):
        wait_for_value(prom, 'up{job="tachymail"}', 1.0)
        wait_for_value(prom, "sum(tachymail_messages_accepted_total)", 0.0)
        with smtplib.SMTP("127.0.0.1", srv.port) as client:
            for n in range(3):
                client.sendmail("a@sender.example", ["b@example.net"], f"Subject: {n}\r\n\r\nhi")
        wait_for_value(prom, "sum(tachymail_messages_accepted_total)", 3.0)
        wait_for_value(prom, 'tachymail_queue_messages{state="active"}', 3.0)

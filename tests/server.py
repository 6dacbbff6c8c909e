"""Running a real `tachymail serve` for tests: free loopback ports, a config file, stop by PID."""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path


def wait_until(predicate: Callable[[], object], timeout: float = 20.0) -> None:
    """Poll *predicate* until it holds; fail the test after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


#: the ports free_port() handed out last: the kernel may give a port that was just closed
#: out again, and the listeners of one configuration must not share one
_RECENT_PORTS: collections.deque[int] = collections.deque(maxlen=256)


def free_port() -> int:
    """A free port on 127.0.0.1, none of the last 256 this process handed out."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _RECENT_PORTS:
            _RECENT_PORTS.append(port)
            return port
    raise RuntimeError("no fresh free port in 100 tries")


def tachymail_cmd() -> list[str]:
    """How tests start tachymail: this interpreter, so the package under test is the one run."""
    return [sys.executable, "-m", "tachymail"]


def run_cli(*args: str, data_dir: Path | None = None, stdin: str | None = None) -> str:
    """Run `tachymail ARGS` and return its stdout (fails the test on a non-zero exit)."""
    cmd = [*tachymail_cmd(), *args]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, input=stdin, timeout=60)
    assert out.returncode == 0, f"{cmd} failed: {out.stderr}"
    return out.stdout


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


@dataclass
class Server:
    """A running tachymail: its supervisor process, ports by role, data directory."""

    proc: subprocess.Popen[bytes]
    data_dir: Path
    config_path: Path
    ports: dict[str, int]
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.ports["mx"]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            return [int(p) for p in children.read_text().split()]
        except FileNotFoundError:
            return []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def queue_count(self) -> int:
        return int(run_cli("queue", "count", data_dir=self.data_dir))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Stop by PID (never by name); returns the supervisor's exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.wait()

    def kill(self) -> None:
        """kill -9 the supervisor and every worker, as a power cut would."""
        pids = [*self.worker_pids(), self.pid]
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        for pid in pids:  # workers are reparented; wait until they are really gone
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                    break
                time.sleep(0.01)


def write_config(
    path: Path, data_dir: Path, ports: dict[str, int], extra: str = "", hold: bool = True
) -> None:
    if "[delivery]" not in extra:
        # Tests talk to nothing but loopback: a lookup a test did not arrange for goes to a
        # loopback port where no DNS server listens, and fails, instead of leaving the host.
        extra += '\n[delivery]\nresolver = "127.0.0.1:9"\n'
    if "[metrics]" not in extra:
        # A taken metrics port stops the start: tests that do not ask for the endpoint run
        # without one, so that parallel servers do not compete for the default 9525.
        extra += '\n[metrics]\naddress = ""\n'
    # The inbound checks (SPF, DMARC, iprev: issue 12) look up DNS for every message from an
    # untrusted mx client; a test that did not arrange DNS would wait for the unanswered
    # resolver's timeout on each. Tests of those checks say "mailauth" in their extra.
    mailauth = "" if "mailauth" in extra else 'mailauth = "off"\n'
    listeners = "".join(
        f'[[listener]]\naddress = "127.0.0.1:{port}"\nrole = "{role}"\n{mailauth}\n'
        for role, port in ports.items()
    )
    path.write_text(
        f'[server]\nhostname = "mx.test.example"\ndata_dir = "{data_dir}"\n'
        f"hold = {'true' if hold else 'false'}\n"
        f"drain_timeout = 10.0\n\n{listeners}{extra}\n"
    )


@contextmanager
def running_server(
    tmp_path: Path,
    extra: str = "",
    workers: int = 1,
    roles: tuple[str, ...] = ("mx", "submission", "smtps"),
    data_dir: Path | None = None,
    hold: bool = True,
    env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """Start `tachymail serve` with *extra* TOML appended; stop it (by PID) afterwards.

    *env*: extra environment variables for the server (e.g. LD_PRELOAD, PYTHONPATH).
    """
    data_dir = data_dir or tmp_path / "data"
    ports = {role: free_port() for role in roles}
    config_path = tmp_path / "tachymail.toml"
    write_config(config_path, data_dir, ports, extra, hold)
    server = start(config_path, data_dir, ports, workers, tmp_path / "server.log", env)
    try:
        yield server
    finally:
        server.stop()


def start(
    config_path: Path,
    data_dir: Path,
    ports: dict[str, int],
    workers: int,
    log_path: Path,
    env: dict[str, str] | None = None,
) -> Server:
    log = open(log_path, "ab")  # noqa: SIM115 - the server writes to it until stopped
    proc = subprocess.Popen(
        [*tachymail_cmd(), "serve", "-c", str(config_path), "--workers", str(workers)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=None if env is None else {**os.environ, **env},
    )
    log.close()
    server = Server(proc, data_dir, config_path, ports, log_path)
    try:
        for port in ports.values():
            wait_port(port)
    except TimeoutError:
        server.stop(signal.SIGKILL)
        raise AssertionError(f"tachymail did not start:\n{server.log()}") from None
    return server


def metric(port: int, name: str, **labels: str) -> float:
    """The sum of *name*'s samples whose labels include *labels*, on the /metrics of the
    endpoint at 127.0.0.1:*port*."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    wanted = set(labels.items())
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and wanted <= set(sample.labels.items())
    )

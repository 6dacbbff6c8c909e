"""A real Redis for tests: redis-server on a loopback high port, with a config file the
test writes, stopped by its PID (also when the test fails).

    with running_redis(tmp_path) as redis_server:
        config = {"cluster": {"redis": redis_server.url, ...}}
        ...
        redis_server.stop()      # Redis "goes away" mid-test
        redis_server.start()     # and comes back, on the same port, empty or not

``running_redis`` skips the test when redis-server is missing (a failure under
TACHYMAIL_REQUIRE_ALL=1: ./dev test installs the redis-server package).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.server import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@dataclass
class RedisServer:
    directory: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        """Start (or restart) the server on its port, with no persistence: a restart is
        an empty Redis, as after a failover to a fresh replica."""
        conf = self.directory / "redis.conf"
        conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            "protected-mode yes\n"
            f"dir {self.directory}\n"
            'save ""\n'
            "appendonly no\n"
            "daemonize no\n"
            f"logfile {self.directory / 'redis.log'}\n"
            "databases 4\n"
        )
        self.process = subprocess.Popen([REDIS_SERVER, str(conf)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server exited: {log[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING within 15 s")

    def stop(self) -> None:
        """Stop it by its PID (SIGKILL after 10 s)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)

    def command(self, *args: str) -> bytes:
        """One command over a raw socket (RESP), for tests to look at what nodes wrote."""
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"".join(parts))
            time.sleep(0.05)
            return sock.recv(1 << 20)


@contextmanager
def running_redis(directory: Path) -> Iterator[RedisServer]:
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server not installed (./dev test installs the redis-server package)")
    directory.mkdir(parents=True, exist_ok=True)
    server = RedisServer(directory, free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()

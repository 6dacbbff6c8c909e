"""Fixtures for tests that talk to a real `tachymail serve` over loopback."""

from __future__ import annotations

import socket
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import Server, running_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A tachymail with one worker, mx/submission/smtps listeners, holding delivery; the
    user alice (when a test adds her) may send as any address in example.com."""
    extra = '[auth]\nfailure_delay = 0.2\nsenders = { alice = ["@example.com"] }\n'
    with running_server(tmp_path, extra=extra) as srv:
        yield srv


@pytest.fixture
def client_tls() -> ssl.SSLContext:
    """A client context that accepts the server's self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class RawClient:
    """A line-level SMTP client over a plain socket, for bytes smtplib will not send."""

    def __init__(self, port: int, greet: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        if greet:
            assert self.reply().startswith(b"220 ")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; buffered {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def reply(self) -> bytes:
        """One whole (possibly multi-line) reply, lines joined by CRLF."""
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return b"\r\n".join(lines)

    def replies(self, n: int) -> list[bytes]:
        return [self.reply() for _ in range(n)]

    def cmd(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection (after any pending bytes)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(server: Server) -> Iterator[RawClient]:
    client = RawClient(server.port)
    yield client
    client.close()

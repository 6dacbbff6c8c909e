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


def unverified_tls() -> ssl.SSLContext:
    """A client context that accepts the server's self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@pytest.fixture
def client_tls() -> ssl.SSLContext:
    return unverified_tls()


class LineClient:
    """A line-level client over a socket to 127.0.0.1 (TLS from the start when *tls* is
    given), for bytes a protocol library will not send. Subclasses read the greeting."""

    def __init__(self, port: int, timeout: float = 10.0, tls: ssl.SSLContext | None = None):
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock: socket.socket = tls.wrap_socket(sock) if tls is not None else sock
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """The next line, without its CRLF."""
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; buffered {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def closed(self, timeout: float = 10.0) -> bool:
        """True when the server closes the connection (after any pending bytes)."""
        self.sock.settimeout(timeout)
        try:
            while chunk := self.sock.recv(65536):
                self.buffer += chunk
        except TimeoutError:
            return False
        except (ConnectionResetError, ssl.SSLError):
            return True
        return True

    def close(self) -> None:
        self.sock.close()


class RawClient(LineClient):
    """A line-level SMTP client over a plain socket, for bytes smtplib will not send."""

    def __init__(self, port: int, greet: bool = True) -> None:
        super().__init__(port)
        if greet:
            assert self.reply().startswith(b"220 ")

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


@pytest.fixture
def raw(server: Server) -> Iterator[RawClient]:
    client = RawClient(server.port)
    yield client
    client.close()

"""A minimal EventSource (``text/event-stream``) client for the JMAP push tests: one raw
HTTP/1.1 request, a reader thread collecting each ``data:`` line as JSON with the
monotonic time it arrived."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from types import TracebackType
from typing import Any


class EventStream:
    """``GET /jmap/eventsource?types=TYPES&closeafter=no&ping=0`` on 127.0.0.1:*port* with
    the *authorization* header; ``events`` fills with (time.monotonic(), event) pairs.
    Use it as a context manager: leaving it stops the reader."""

    def __init__(self, port: int, authorization: str, types: str = "*") -> None:
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(
            (
                f"GET /jmap/eventsource?types={types}&closeafter=no&ping=0 HTTP/1.1\r\n"
                f"Host: 127.0.0.1\r\nAuthorization: {authorization}\r\n"
                "Accept: text/event-stream\r\n\r\n"
            ).encode()
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buffer = b""
        while not self._stop.is_set():
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                for line in block.split(b"\n"):
                    if line.startswith(b"data: "):
                        self.events.append((time.monotonic(), json.loads(line[6:])))

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader's recv
        self.sock.close()
        self._thread.join(5)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

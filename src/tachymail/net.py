"""Network helpers several packages share: "host:port" parsing and SO_REUSEPORT sockets.

The configuration, delivery routing, the metrics endpoint and log shipping parse
addresses here; the SMTP supervisor and the load-test sink (`tachymail sink`) make
their listening sockets here, so neither imports the other. Nothing in this module
knows SMTP or the configuration.
"""

from __future__ import annotations

import socket

#: the listen() backlog of a reuseport socket; the kernel caps it at net.core.somaxconn
LISTEN_BACKLOG = 4096


def split_hostport(address: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" → (host, port), port 1-65535.

    Raises ValueError with a message fit for a configuration error report.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT")
    host = host.strip("[]")
    if not host:
        raise ValueError(f"{address!r} has no host")
    return host, int(port)


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A non-blocking socket listening on *host*:*port* with SO_REUSEPORT set.

    Several sockets (one per worker process, or per `tachymail sink` process) may
    listen on one address; the kernel gives each its own accept queue and spreads new
    connections across them. Raises OSError when the address cannot be bound.
    """
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(info[4])
        sock.listen(LISTEN_BACKLOG)  # a burst of connects must not overflow it
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock

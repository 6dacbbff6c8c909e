"""News of newly queued messages, from the SMTP workers to the delivery workers.

The queue is the truth; this is only a hint that lets a delivery worker start on a
message the moment its commit is synced, instead of finding it on its next look at
the schedule. Each delivery worker binds a Unix datagram socket in the abstract
namespace (no file to clean up, gone when the process dies), named after the data
directory and its shard. An SMTP worker sends the ids it committed, one datagram per
shard every ``GATHER`` seconds at most. Losing a datagram costs only latency: the
receiver is absent during a restart, or its buffer is full under overload, and the
scheduler's scan of the queue finds the message a moment later.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from tachymail.queue.envelope import Recipient

log = logging.getLogger(__name__)

#: ids per datagram: 2,000 ids of 21 octets stays well under the default datagram limits
MAX_IDS = 2000
#: seconds the sender gathers ids before sending them: each datagram may wake a sleeping
#: delivery worker, tens of microseconds of system time on a virtual machine, and a batch
#: lets the delivery worker pipeline several messages on one connection
GATHER = 0.002


def shard_of(queue_id: str, shards: int) -> int:
    """The delivery worker (of *shards*) that owns message *queue_id*: all its recipients,
    whatever their domains, so a hot destination's messages spread over every worker and
    no recipient is ever held by two. Stable for a given id and number of workers."""
    if shards == 1:
        return 0
    return zlib.crc32(queue_id.encode()) % shards


def channel_address(data_path: Path, shard: int) -> bytes:
    """The abstract socket name of delivery worker *shard* for the queue in *data_path*."""
    digest = hashlib.sha256(str(Path(data_path).resolve()).encode()).hexdigest()[:20]
    return f"\0tachymail-{digest}-delivery-{shard}".encode()


class Notifier:
    """The sending side, in an SMTP worker: gathers ids per shard for ``GATHER`` seconds."""

    def __init__(self, data_path: Path, shards: int) -> None:
        self.shards = shards
        self.addresses = [channel_address(data_path, k) for k in range(shards)]
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.pending: list[list[str]] = [[] for _ in range(shards)]
        self.scheduled = False
        #: datagrams that could not be sent (receiver absent or full), for tests
        self.dropped = 0
        #: asked first by :meth:`queued`; True: the message is not in LMDB yet, and the
        #: gate's owner (the journal committer) calls :meth:`send` once it is
        self.gate: Callable[[str, Sequence[Recipient]], bool] | None = None

    def queued(self, queue_id: str, recipients: Sequence[Recipient] = ()) -> None:
        """*queue_id* is committed; tell its shard, soon. *recipients* is not needed (a
        message belongs to one shard whatever its recipients) and kept for the callers."""
        if self.gate is not None and self.gate(queue_id, recipients):
            return
        self.send(queue_id, recipients)

    def send(self, queue_id: str, recipients: Sequence[Recipient] = ()) -> None:
        """*queue_id* is in LMDB; tell its shard, soon (:meth:`queued` without the gate)."""
        self.pending[shard_of(queue_id, self.shards)].append(queue_id)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_later(GATHER, self.flush)

    def flush(self) -> None:
        self.scheduled = False
        for shard, ids in enumerate(self.pending):
            if not ids:
                continue
            self.pending[shard] = []
            for start in range(0, len(ids), MAX_IDS):
                payload = " ".join(ids[start : start + MAX_IDS]).encode()
                try:
                    self.sock.sendto(payload, self.addresses[shard])
                except OSError:
                    self.dropped += 1

    def close(self) -> None:
        self.sock.close()


class Listener:
    """The receiving side, in delivery worker *shard*: calls *on_ids* with each batch."""

    def __init__(self, data_path: Path, shard: int, on_ids: Callable[[list[str]], None]) -> None:
        self.address = channel_address(data_path, shard)
        self.on_ids = on_ids
        self.sock: socket.socket | None = None

    def bind(self) -> bool:
        """Bind and start reading; False while another process holds the name.

        That is the worker this one replaces after a reload, until it lets go: the
        caller tries again later and meanwhile relies on its scans of the queue.
        """
        if self.sock is not None:
            return True
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(self.address)
        except OSError:
            sock.close()
            return False
        sock.setblocking(False)
        self.sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        return True

    def _readable(self) -> None:
        assert self.sock is not None
        ids: list[str] = []
        while True:
            try:
                payload = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as exc:  # not expected from a local datagram socket
                log.warning("delivery notification socket: %s", exc)
                break
            ids.extend(payload.decode("ascii", "replace").split())
        if ids:
            self.on_ids(ids)

    def close(self) -> None:
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

"""What the JMAP methods of one request share: the user, the store, the worker's
committer, the snapshot cache, the blob directory (:class:`Account`), and the per-process
state behind them (:class:`JmapContext`)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tachymail.jmap.core import Limits, MethodError
from tachymail.jmap.view import PropertyCache, Snapshot, Views
from tachymail.mailbox import MailboxStore, Operation

if TYPE_CHECKING:
    from tachymail.smtp.worker import WorkerContext

#: uploaded blobs older than this are removed (RFC 8620 §6.1: at least an hour)
BLOB_TTL = 24 * 3600


def account_id(user: str) -> str:
    """The user's JMAP account id: stable, opaque, and a valid Id."""
    return "a" + hashlib.blake2b(user.lower().encode(), digest_size=8).hexdigest()


class JmapContext:
    """Per worker process: the limits, the snapshot cache, where blobs and settings live,
    and the semaphore of maxConcurrentRequests."""

    def __init__(self, worker: WorkerContext, limits: Limits) -> None:
        self.worker = worker
        self.limits = limits
        self.views = Views(worker.mailbox)
        #: content-derived Email properties (see PropertyCache)
        self.properties = PropertyCache(worker.config.jmap.property_cache_mb << 20)
        #: user -> the state of the user's session object (``routes.session_state``)
        self.session_states: dict[str, str] = {}
        self.directory = Path(worker.config.data_path) / "jmap"
        self.blobs = self.directory / "blobs"
        self.running: dict[str, int] = {}
        self.uploads: dict[str, int] = {}
        #: the wake-up events of the open push streams; set with ``closing`` at shutdown,
        #: so that no stream holds the worker's drain for its whole timeout
        self.streams: set[asyncio.Event] = set()
        self.closing = False

    @property
    def store(self) -> MailboxStore:
        return self.worker.mailbox


class Account:
    """One request's user and what its methods use."""

    def __init__(self, jmap: JmapContext, user: str) -> None:
        self.jmap = jmap
        self.user = user.lower()
        self.id = account_id(self.user)
        self.worker = jmap.worker
        self.store = jmap.store
        self._snapshot: Snapshot | None = None
        #: the client's address (the Received field of what it sends)
        self.client_ip = ""

    def snapshot(self, fresh: bool = False) -> Snapshot:
        """The user's emails now (taken once per method call that asks ``fresh``)."""
        if fresh or self._snapshot is None:
            self._snapshot = self.jmap.views.snapshot(self.user)
        return self._snapshot

    def check_account(self, args: dict[str, Any]) -> None:
        if args.get("accountId") != self.id:
            raise MethodError("accountNotFound", "no such account")

    async def commit(self, operation: Operation) -> Any:
        """Run one store operation through the worker's group committer (synced when it
        returns); its outcome (an exception instance when refused)."""
        return await self.worker.mailbox_committer.submit_operation(operation)

    # --- blobs uploaded by this user ------------------------------------------------------

    def _blob_dir(self) -> Path:
        return self.jmap.blobs / self.id

    def blob_path(self, blob_id: str) -> Path | None:
        if not blob_id.startswith("U") or not blob_id[1:].isalnum() or len(blob_id) > 80:
            return None
        return self._blob_dir() / blob_id

    def read_blob(self, blob_id: str) -> bytes | None:
        """An uploaded blob's octets, or a message or message part of the user's
        (``B<content>`` / ``B<content>.<partId>``); None when the user has no such blob."""
        if blob_id.startswith("U"):
            path = self.blob_path(blob_id)
            if path is None:
                return None
            try:
                return path.read_bytes()
            except OSError:
                return None
        from tachymail.jmap.mail import message_blob  # the mail methods know the parts

        return message_blob(self, blob_id)

    async def save_blob(self, data: bytes) -> str:
        """Keep an upload; its blobId (the same octets give the same id)."""
        blob_id = "U" + hashlib.sha256(data).hexdigest()[:40]
        directory = self._blob_dir()
        path = directory / blob_id

        def write() -> None:
            directory.mkdir(parents=True, exist_ok=True)
            temporary = directory / f".{secrets.token_hex(8)}"
            with open(temporary, "wb") as out:
                out.write(data)
            os.replace(temporary, path)
            _sweep(directory)

        await asyncio.get_running_loop().run_in_executor(None, write)
        return blob_id


def _sweep(directory: Path) -> None:
    """Remove the directory's uploads older than BLOB_TTL (a few per upload)."""
    limit = time.time() - BLOB_TTL
    for count, entry in enumerate(os.scandir(directory)):
        if count > 64:
            return
        try:
            if entry.stat().st_mtime < limit:
                os.unlink(entry.path)
        except OSError:
            pass

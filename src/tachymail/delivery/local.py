"""Local delivery: the "local" next hop, putting a queued message into users' mailboxes.

Runs in each delivery worker beside the remote pools. The queue holds final recipients
only (aliases were expanded at intake), so a recipient needs nothing more than the
directory's ``user_of`` and the user's quota. Each delivery prepends ``Return-Path:`` and
``Delivered-To:`` and is one operation in a group commit of the mailbox store, keyed by
queue id and recipient: a crash between the mailbox commit and the queue update makes the
next attempt find the key and report success without a second copy (exactly once).

Replies, as the queue, the delivery log and any DSN show them:

- ``250 2.0.0 delivered to mailbox``: synced in the store (also when it already was);
- ``550 5.1.1 <addr>: no such user``: the user was deleted after the message was accepted;
- ``554 5.4.6 mail loop: Delivered-To already holds <addr>``: bounces;
- ``452 4.2.2 mailbox full``: deferred on the retry schedule, bounced only at max_lifetime;
- ``452 4.3.1 mailbox store full``: the store's map or disk is full; deferred;
- ``451 4.3.0 ...``: any other error (logged with its traceback); deferred.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tachymail.config import Config
from tachymail.delivery.pool import DEFERRED, DELIVERED, FAILED, Outcome
from tachymail.mailauth.dkim import DkimSigner
from tachymail.mailbox import (
    ChangeNotifier,
    Delivered,
    Directory,
    MailboxStore,
    OverQuota,
    deliver,
    delivered_to,
)
from tachymail.mailbox import StorageFull as MailboxFull
from tachymail.mailbox.notify import DIRECTORY as MAILBOX_NOTIFY_DIRECTORY
from tachymail.metrics import m
from tachymail.queue.autoreply import auto_reply_message, reply_signature
from tachymail.queue.commit import GroupCommitter
from tachymail.queue.envelope import Envelope, Recipient
from tachymail.queue.store import MiB
from tachymail.queue.store import StorageFull as QueueFull

log = logging.getLogger(__name__)

#: seconds between readings of the node's mailbox totals for the gauges when nothing was
#: delivered here (LMTP, POP3 and the CLI change the store too)
GAUGE_INTERVAL = 5.0
#: least seconds between two readings after deliveries (one read transaction each)
GAUGE_MIN_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class LocalOutcome(Outcome):
    """An :class:`Outcome` of local delivery; *duplicate*: an earlier attempt had already
    put this message in this recipient's mailbox (nothing was written this time)."""

    duplicate: bool = False


#: the mailbox store could not be opened: try again on the retry schedule
STORE_UNAVAILABLE = LocalOutcome(DEFERRED, 451, "4.3.0", "4.3.0 mailbox store unavailable")
OVER_QUOTA = LocalOutcome(DEFERRED, 452, "4.2.2", "4.2.2 mailbox full")
STORE_FULL = LocalOutcome(DEFERRED, 452, "4.3.1", "4.3.1 mailbox store full")
INTERNAL_ERROR = LocalOutcome(DEFERRED, 451, "4.3.0", "4.3.0 local delivery failed")
STORED = LocalOutcome(DELIVERED, 250, "2.0.0", "2.0.0 delivered to mailbox")
ALREADY_STORED = LocalOutcome(DELIVERED, 250, "2.0.0", "2.0.0 delivered to mailbox", True)


class LocalDelivery:
    """Delivers into the mailbox store, ``config.mailbox.local_concurrency`` at a time.

    Must be created inside the running event loop it serves. The store, its committer and
    the directory are opened by :meth:`open` (or the first delivery); a store that will
    not open defers the recipients with ``451 4.3.0`` and is tried again next time.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store: MailboxStore | None = None
        self.committer: GroupCommitter | None = None
        self.directory: Directory | None = None
        # Publishes the users each commit changed to the processes serving IMAP (no socket
        # of its own: nothing here subscribes, so no commit elsewhere needs to wake it).
        self.notifier = ChangeNotifier(config.data_path / MAILBOX_NOTIFY_DIRECTORY)
        self.notifier.start(asyncio.get_running_loop(), listen=False)
        self.slots = asyncio.Semaphore(max(1, config.mailbox.local_concurrency))
        self._gauges_read = 0.0
        self._dirty = False
        #: the queue's committer, for vacation replies (set by the delivery worker; None:
        #: a due reply is logged and dropped)
        self.queue: GroupCommitter | None = None
        #: signs vacation replies as the user's own mail is signed ([dkim]); None: unsigned
        self.signer: DkimSigner | None = None
        if config.dkim.domains:
            try:
                self.signer = DkimSigner(config.data_path, config.dkim.domains)
            except ValueError as exc:  # the SMTP workers refuse to start on this already
                log.error("vacation replies will not be DKIM-signed: %s", exc)

    def open(self) -> bool:
        """Open the store, its committer and the directory if not yet open; False (the
        error logged) when that fails."""
        if self.committer is not None:
            return True
        settings = self.config.mailbox
        try:
            if self.directory is None:
                self.directory = Directory(self.config)
            if self.store is None:
                self.store = MailboxStore(
                    self.config.mailbox_path,
                    map_size=settings.map_size_mb * MiB,
                    max_map_size=settings.max_map_size_mb * MiB,
                )
                self.store.on_commit = self.notifier.publish
        except Exception:
            log.exception("local delivery: the mailbox store does not open; deliveries wait")
            return False
        # Inline, deliveries wait a moment for company to share one synced transaction; a
        # commit thread needs no wait: what arrives during one sync joins the next.
        inline = settings.commit == "inline"
        self.committer = GroupCommitter(
            self.store,
            max_batch=settings.max_batch,
            linger=settings.commit_linger_ms / 1000 if inline else 0.0,
            inline=inline,
            observe=False,
        )
        self.update_gauges(force=True)
        return True

    async def deliver(
        self, envelope: Envelope, content: bytes, recipients: Sequence[Recipient]
    ) -> list[Outcome]:
        """One outcome per recipient, in order (see the module docstring for the replies).

        A DELIVERED outcome means the mailbox store's transaction holding the message is
        synced. Never raises for one recipient's trouble: that recipient is deferred.
        """
        if not self.open():
            return [STORE_UNAVAILABLE] * len(recipients)
        return list(
            await asyncio.gather(*(self._one(envelope, content, r.address) for r in recipients))
        )

    async def _one(self, envelope: Envelope, content: bytes, address: str) -> Outcome:
        async with self.slots:
            try:
                return await self._store(envelope, content, address)
            except Exception:
                log.exception("%s to <%s>: local delivery failed", envelope.id, address)
                return INTERNAL_ERROR

    async def _store(self, envelope: Envelope, content: bytes, address: str) -> Outcome:
        directory, committer = self.directory, self.committer
        assert directory is not None and committer is not None  # opened by deliver()
        delivery = directory.delivery(
            address, envelope.sender, content, f"{envelope.id}\0{address}".encode()
        )
        if delivery is None:
            return LocalOutcome(FAILED, 550, "5.1.1", f"5.1.1 <{address}>: no such user")
        if delivered_to(content, address):
            return LocalOutcome(
                FAILED, 554, "5.4.6", f"5.4.6 mail loop: Delivered-To already holds <{address}>"
            )
        user = delivery.user
        started = time.perf_counter()
        try:
            result = await committer.submit_operation(deliver(delivery))
        except OverQuota:
            log.info("%s to <%s>: mailbox of %s is full; deferred", envelope.id, address, user)
            return OVER_QUOTA
        except (MailboxFull, QueueFull) as exc:
            log.error("%s to <%s>: mailbox store full: %s", envelope.id, address, exc)
            return STORE_FULL
        m.local_delivery_seconds.observe(time.perf_counter() - started)
        self._dirty = True
        if isinstance(result, Delivered) and result.reply_due and delivery.reply is not None:
            await self._queue_reply(envelope.id, user, *delivery.reply)
        if isinstance(result, Delivered) and result.duplicate:
            log.info(
                "%s to <%s>: already in the mailbox of %s (uid %d): not stored again",
                envelope.id,
                address,
                user,
                result.uid,
            )
            return ALREADY_STORED
        return STORED

    async def _queue_reply(self, queue_id: str, user: str, recipient: str, reply: bytes) -> None:
        """Queue *user*'s vacation reply to *recipient* (the message it answers is stored
        already: a reply that cannot be queued is logged and dropped, never retried)."""
        if self.queue is None:
            log.warning(
                "%s: vacation reply of %s to <%s> dropped: no queue", queue_id, user, recipient
            )
            return
        # signing is RSA work: off the event loop
        signature = await asyncio.get_running_loop().run_in_executor(
            None, reply_signature, self.signer, reply
        )
        envelope, operation = auto_reply_message(
            recipient, reply, user=user, listener="vacation", signature=signature
        )
        try:
            refused = await self.queue.submit_operation(operation)
        except Exception as exc:  # the queue is full or failing: the delivery stands
            refused = exc
        if refused is not None:
            log.error(
                "%s: vacation reply of %s to <%s> dropped: %s", queue_id, user, recipient, refused
            )
            return
        log.info(
            "%s: vacation reply %s of %s queued to <%s>", queue_id, envelope.id, user, recipient
        )

    def update_gauges(self, force: bool = False) -> None:
        """Read the node's mailbox totals into the gauges: after deliveries (at most once a
        second) and every ``GAUGE_INTERVAL`` seconds. Called by the worker's timer.

        Without a store (no local domain) they read 0 until LMTP or the CLI makes one,
        which is then opened here."""
        now = time.monotonic()
        if self.store is None:
            if now - self._gauges_read < GAUGE_INTERVAL and not force:
                return
            self._gauges_read = now
            if not (self.config.mailbox_path / "data.mdb").exists() or not self.open():
                m.mailbox_bytes.set(0)
                m.mailbox_messages.set(0)
            return
        since = now - self._gauges_read
        if not force and since < (GAUGE_MIN_INTERVAL if self._dirty else GAUGE_INTERVAL):
            return
        self._gauges_read, self._dirty = now, False
        try:
            size, messages, _users = self.store.totals()
        except Exception as exc:  # metrics must never stop delivery
            log.warning("mailbox totals unavailable: %s", exc)
            return
        m.mailbox_bytes.set(size)
        m.mailbox_messages.set(messages)

    @property
    def idle(self) -> bool:
        return self.committer is None or self.committer.idle

    def close(self) -> None:
        """Close the committer and the store (call once :attr:`idle`)."""
        if self.committer is not None:
            self.committer.close()
            self.committer = None
        if self.store is not None:
            self.store.on_commit = None
            self.store.close()
            self.store = None
        self.notifier.close()

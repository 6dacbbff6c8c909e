"""One inbound LMTP connection (RFC 2033): SMTP with LHLO and one reply per recipient.

:class:`LmtpSession` is an :class:`~tachymail.smtp.session.SmtpSession`: the same
compiled command, DATA and BDAT readers, the same limits (line lengths, message size,
recipients, timeouts and deadlines, connection counts), the same smuggling guard and
header/body checks. What differs:

- LHLO instead of HELO/EHLO (those get ``500 5.5.1``); no AUTH; served only to clients
  in ``policy.trusted_networks`` (others get ``554 5.7.1`` and are disconnected), since
  what an LMTP client hands over skips every check of the mx listener.
- RCPT accepts only what :meth:`Directory.resolve` resolves: ``550 5.1.1`` for an
  unknown local address or a domain that is not local (LMTP never relays what the
  client asked for), ``452 4.2.2`` when a target mailbox is full.
- After the message (DATA's dot or BDAT LAST) there is one reply per accepted RCPT, in
  RCPT order, each sent only once the mailbox store's commit that holds it is synced:
  ``250 2.0.0`` (every local target delivered, and the remote alias targets queued),
  ``452 4.2.2`` (over quota), ``452 4.3.1`` (store or queue full), ``451 4.3.0``
  (another error), ``554 5.4.6`` (a target's Delivered-To is already in the message: a
  loop; nothing is delivered for that RCPT). A refusal of the whole message (size, a
  check) is repeated once per accepted RCPT, as RFC 2033 §4.2 asks.

All the deliveries of one message join one group commit of the mailbox store; remote
alias targets go into the queue as one message, through the intake's group commit.
A message held by a ``[[header_check]]`` goes into the queue, held, for all its
recipients, and is delivered locally once released. A target named by several RCPTs of one
message (alice@, and an alias of hers) gets one copy (idempotency key: transaction id and
target). An RCPT whose alias targets fail only in part gets the 4xx, so the client's retry
may give the targets already served a second copy: duplicates over loss. Every target's
outcome is logged (event ``lmtp_delivery``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from tachymail.mailbox import (
    Delivered,
    Delivery,
    OverQuota,
    Resolution,
    deliver,
    delivered_to,
)
from tachymail.mailbox import StorageFull as MailboxFull
from tachymail.metrics import m
from tachymail.protocol import replies as R
from tachymail.protocol.mime import header_value
from tachymail.queue.autoreply import auto_reply_message, reply_signature
from tachymail.queue.envelope import Envelope, Recipient
from tachymail.queue.store import StorageFull as QueueFull
from tachymail.smtp.session import SmtpSession, State

if TYPE_CHECKING:
    from tachymail.smtp.worker import WorkerContext

log = logging.getLogger(__name__)

HELO_REFUSED = R.reply(500, "5.5.1", "Error: this is an LMTP server, send LHLO (RFC 2033)")
AUTH_REFUSED = R.reply(502, "5.5.1", "Error: AUTH not available over LMTP")
LHLO_FIRST = R.reply(503, "5.5.1", "Error: send LHLO first")


#: a wait of an RCPT on the queue's commit (its remote alias targets, or a held message)
QUEUE = ""


@dataclass(slots=True)
class _Outcome:
    """One accepted RCPT of a finished message, and the commits its reply waits for."""

    rcpt: Recipient
    resolution: Resolution
    #: (index into the message's futures, the local target it delivers, or QUEUE)
    waits: list[tuple[int, str]] = field(default_factory=list)
    #: the target whose Delivered-To is already in the message (a loop), if any
    loop: str = ""


class LmtpSession(SmtpSession):
    """The server side of one LMTP connection (listener role ``lmtp``)."""

    def __init__(self, ctx: WorkerContext, role: str = "lmtp", implicit_tls: bool = False) -> None:
        super().__init__(ctx, role, implicit_tls)

    def _reset_transaction(self) -> None:
        super()._reset_transaction()
        #: what each accepted RCPT (self.rcpts, same order) resolved to
        self.resolutions: list[Resolution] = []

    # --- greeting and hello -----------------------------------------------------------------

    def _greet(self) -> None:
        if self.state != State.GREETING or self.transport is None:
            return
        if not self.trusted:
            log.warning(
                "refused LMTP connection from %s: not in policy.trusted_networks", self.peer_ip
            )
            self.outcome = "refused"
            self.out.append(
                R.reply(554, "5.7.1", f"Error: {self.peer_ip} may not use this LMTP service")
            )
            self.close_after_flush = True
            self._flush()
            return
        self.state = State.COMMAND
        m.REPLIES[2] += 1
        self.transport.write(R.reply(220, "", f"{self.ctx.hostname} LMTP Tachymail"))

    def cmd_unknown(self, args: bytes) -> None:
        # The command parser knows SMTP verbs only: LHLO arrives as an unknown line.
        verb, _, rest = args.partition(b" ")
        if verb.upper() == b"LHLO":
            self.cmd_lhlo(rest)
            return
        super().cmd_unknown(args)

    def cmd_lhlo(self, args: bytes) -> None:
        """LHLO (RFC 2033 §4.1): EHLO's reply with LMTP's extensions."""
        if not self._hello(args, "LHLO", True):
            return
        extensions = [
            "PIPELINING",
            f"SIZE {self.ctx.config.limits.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
        ]
        if self.tls is None and self.ctx.tls_context is not None:
            extensions.append("STARTTLS")
        self.out.append(R.multiline(250, [self.ctx.hostname, *extensions]))

    def cmd_helo(self, args: bytes) -> None:
        self._error(HELO_REFUSED, "HELO on LMTP")

    def cmd_ehlo(self, args: bytes) -> None:
        self._error(HELO_REFUSED, "EHLO on LMTP")

    def cmd_auth(self, args: bytes) -> None:
        self._error(AUTH_REFUSED, "AUTH on LMTP")

    def _protocol_name(self) -> str:
        return "LMTP"  # RFC 3848: LMTP, LMTPS (and UTF8LMTP, RFC 6531)

    # --- the envelope -----------------------------------------------------------------------

    def cmd_mail(self, args: bytes) -> None:
        if self.helo is None:
            self._error(LHLO_FIRST, "MAIL before LHLO")
            return
        if self.mail_from is not None:
            self._error(R.NESTED_MAIL, "nested MAIL")
            return
        self._mail(args)  # LHLO set esmtp; no AUTH, and sender_login covers no LMTP role

    def _recipient(self, address: str, params: dict[str, str]) -> None:
        """Accept a recipient that resolves to local users (or to remote alias targets).

        Replies: 250 2.1.5; 550 5.1.1 for an address outside the local domains or one
        that is no user or alias; 452 4.2.2 when a target user's mailboxes are full (or
        would be, by the SIZE given to MAIL); 452 4.5.3 past ``limits.max_recipients``
        (checked, with the syntax, by ``SmtpSession.cmd_rcpt``).
        """
        directory = self.ctx.directory
        _, at, domain = address.rpartition("@")
        if at and not directory.is_local_domain(domain):
            self.rcpt_refused += 1
            m.recipients_rejected["unknown_user"].inc()
            log.info("session %s: LMTP recipient <%s> is not local", self.peer_ip, address)
            self.out.append(
                R.reply(550, "5.1.1", f"<{address}>: Recipient address rejected: not local here")
            )
            return
        resolution = directory.resolve(address)
        if resolution is None:
            self.rcpt_refused += 1
            m.recipients_rejected["unknown_user"].inc()
            log.info("session %s: unknown local recipient <%s>", self.peer_ip, address)
            self.out.append(R.unknown_local_user(address))
            return
        full = self._full_target(resolution)
        if full is not None:
            self.rcpt_refused += 1
            m.recipients_rejected["over_quota"].inc()
            log.info(
                "session %s: recipient <%s> refused: mailbox of %s is full",
                self.peer_ip,
                address,
                full,
            )
            self.out.append(R.mailbox_full(address))
            return
        self.rcpts.append(Recipient(address, params))
        self.resolutions.append(resolution)
        self.out.append(R.reply(250, "2.1.5", "Ok"))

    def _full_target(self, resolution: Resolution) -> str | None:
        """The first local target's user whose mailboxes are full, or would be with the
        size MAIL announced; None when every target has room."""
        directory, store = self.ctx.directory, self.ctx.mailbox
        announced = int(self.mail_params.get("SIZE", "0") or "0")
        for target in resolution.local:
            user = directory.user_of(target)
            if user is None:
                continue  # resolution and users file raced; delivery sorts it out
            quota = directory.quota(user)
            if not quota:
                continue
            used = store.usage(user)[0]
            if used >= quota or used + announced > quota:
                return user
        return None

    # --- the end of the message -------------------------------------------------------------

    def _end_reply(self, reply: bytes) -> None:
        # RFC 2033 §4.2: a refusal of the message is the answer for every recipient.
        self.out.extend([reply] * max(len(self.rcpts), 1))
        self._reset_transaction()

    def _accept_message(self, queue_id: str, content: bytes, hold: bool) -> None:
        """Deliver the checked message: every local target into its mailbox (one group
        commit), the remote alias targets into the queue; one reply per RCPT once synced.
        *queue_id* names the transaction in the Received header, the idempotency keys and
        the log (and the queued message, for remote targets or a held message)."""
        now = time.time()
        content = self._received_header(queue_id, now) + content
        assert self.mail_from is not None and self.transport is not None
        sender, mail_params = self.mail_from, self.mail_params
        outcomes = [_Outcome(r, res) for r, res in zip(self.rcpts, self.resolutions, strict=True)]
        self._reset_transaction()
        self.state = State.WAIT
        self.transport.pause_reading()
        futures: list[asyncio.Future[object]] = []
        if not hold:
            self._deliver_locally(queue_id, sender, content, outcomes, futures)
        # A held message waits in the queue for every target; released, it is delivered
        # locally from there. Otherwise only remote alias targets are queued.
        queued: dict[str, Recipient] = {}
        for outcome in outcomes:
            targets = outcome.resolution.remote
            if hold:
                targets = (*outcome.resolution.local, *targets)
            if outcome.loop or not targets:
                continue
            for target in targets:
                queued.setdefault(target.lower(), _queue_recipient(outcome.rcpt, target))
            outcome.waits.append((len(futures), QUEUE))
        envelope = None
        if queued:
            envelope = self._envelope(
                queue_id, sender, list(queued.values()), mail_params, now, len(content), hold
            )
            queued_envelope = envelope
            futures.append(
                self._submit(lambda: self.ctx.committer.submit(queued_envelope, content))
            )
        found = header_value(content, b"Message-ID")
        message_id = found.decode("utf-8", "replace") if found else ""
        gathered = asyncio.gather(*futures, return_exceptions=True)
        count = len(futures)

        def answer(done: asyncio.Future[list[object]]) -> None:
            # Only a loop shutting down cancels: then no RCPT may read as delivered.
            stopped: list[object] = [RuntimeError("cancelled")] * count
            results = stopped if done.cancelled() else done.result()
            self._delivered(queue_id, sender, len(content), outcomes, results, envelope, message_id)

        gathered.add_done_callback(answer)

    def _reply(self, queue_id: str, delivery: Delivery, done: asyncio.Future[Any]) -> None:
        """Queue the vacation reply *delivery* carried when its commit says it is due (the
        message is stored already: a reply that cannot be queued is logged and dropped)."""
        if done.cancelled() or done.exception() is not None or delivery.reply is None:
            return
        result = done.result()
        if not isinstance(result, Delivered) or not result.reply_due:
            return
        recipient, reply = delivery.reply
        if self.ctx.dkim is None:
            self._queue_reply(queue_id, delivery.user, recipient, reply, b"")
            return

        def signed(work: asyncio.Future[bytes]) -> None:
            failed = work.cancelled() or work.exception() is not None
            signature = b"" if failed else work.result()
            self._queue_reply(queue_id, delivery.user, recipient, reply, signature)

        # DKIM-signed as the user's own mail is ([dkim]); RSA work: off the event loop
        work = self.ctx.loop.run_in_executor(None, reply_signature, self.ctx.dkim, reply)
        work.add_done_callback(signed)

    def _queue_reply(
        self, queue_id: str, user: str, recipient: str, reply: bytes, signature: bytes
    ) -> None:
        """Queue *user*'s vacation reply (logged and dropped when the queue refuses)."""
        envelope, operation = auto_reply_message(
            recipient, reply, user=user, listener="vacation", signature=signature
        )

        def queued(committed: asyncio.Future[Any]) -> None:
            failure = None if committed.cancelled() else committed.exception()
            refused = failure or (None if committed.cancelled() else committed.result())
            if committed.cancelled() or refused is not None:
                log.error(
                    "%s: vacation reply of %s to <%s> dropped: %s",
                    queue_id, user, recipient, refused or "cancelled",
                )  # fmt: skip
                return
            if self.ctx.notifier is not None:
                self.ctx.notifier.queued(envelope.id, envelope.recipients)
            log.info(
                "%s: vacation reply %s of %s queued to <%s>",
                queue_id, envelope.id, user, recipient,
            )  # fmt: skip

        try:
            self.ctx.committer.submit_operation(operation).add_done_callback(queued)
        except Exception as exc:  # the committer is closing: the delivery stands
            log.error("%s: vacation reply of %s dropped: %s", queue_id, user, exc)

    def _submit(self, submit: Callable[[], asyncio.Future[Any]]) -> asyncio.Future[object]:
        """*submit*'s future, or a failed one when submitting itself raised."""
        try:
            return submit()
        except Exception as exc:  # e.g. a user deleted since RCPT: this RCPT gets 451
            failed: asyncio.Future[object] = self.ctx.loop.create_future()
            failed.set_exception(exc)
            return failed

    def _deliver_locally(
        self,
        queue_id: str,
        sender: str,
        content: bytes,
        outcomes: list[_Outcome],
        futures: list[asyncio.Future[object]],
    ) -> None:
        """Submit one mailbox delivery per distinct local target to the mailbox store's
        committer (a target named by two RCPTs is delivered once, both wait for it)."""
        directory, committer = self.ctx.directory, self.ctx.mailbox_committer
        submitted: dict[str, int] = {}
        for outcome in outcomes:
            targets = outcome.resolution.local
            loop = next((t for t in targets if delivered_to(content, t)), "")
            if loop:
                outcome.loop = loop  # the whole RCPT bounces: no partial delivery
                continue
            for target in targets:
                key = target.lower()
                if key not in submitted:

                    def submit(target: str = target) -> asyncio.Future[Any]:
                        delivery = directory.delivery(
                            target, sender, content, f"{queue_id}\0{target.lower()}".encode()
                        )
                        if delivery is None:
                            raise LookupError(f"<{target}> is no local user any more")
                        stored = committer.submit_operation(deliver(delivery))
                        if delivery.reply is not None:
                            stored.add_done_callback(partial(self._reply, queue_id, delivery))
                        return stored

                    submitted[key] = len(futures)
                    futures.append(self._submit(submit))
                outcome.waits.append((submitted[key], target))

    def _delivered(
        self,
        queue_id: str,
        sender: str,
        size: int,
        outcomes: list[_Outcome],
        results: list[object],
        envelope: Envelope | None,
        message_id: str,
    ) -> None:
        """Every commit of the message is synced (or failed): log, count, reply per RCPT."""
        notifier = self.ctx.notifier
        queued_ok = envelope is not None and not isinstance(results[-1], BaseException)
        if queued_ok and envelope is not None and notifier is not None:
            notifier.queued(envelope.id, envelope.recipients)  # the queue's future is last
        replies: list[bytes] = []
        delivered = 0
        trace = _Trace(queue_id, sender, size, message_id, f"{self.peer_ip}:{self.peer_port}")
        for outcome in outcomes:
            reply, result = _answer(trace, outcome, results)
            m.lmtp_deliveries[result].inc()
            if result == "delivered":
                delivered += 1
            replies.append(reply)
        if delivered:
            self._count_accepted(queue_id, size)
        if self.transport is None:
            return  # the client left; what was synced stays delivered
        self.out.extend(replies[:-1])
        self._resume(replies[-1])


@dataclass(slots=True)
class _Trace:
    """What every log line of one LMTP message names."""

    queue_id: str
    sender: str
    size: int
    message_id: str
    client: str

    def log(self, level: int, rcpt: str, target: str, result: str, detail: str) -> None:
        """One line per recipient and target (event ``lmtp_delivery``)."""
        log.log(
            level,
            "%s LMTP <%s>%s: %s (%s); from <%s>; %d octets; client %s; message-id %s",
            self.queue_id,
            rcpt,
            f" to {target}" if target else "",
            result,
            detail,
            self.sender,
            self.size,
            self.client,
            self.message_id or "(none)",
            extra={
                "fields": {
                    "event": "lmtp_delivery",
                    "queue_id": self.queue_id,
                    "message_id": self.message_id or None,
                    "sender": self.sender,
                    "recipient": rcpt,
                    "target": target or None,
                    "result": result,
                    "detail": detail,
                    "size": self.size,
                    "client": self.client,
                }
            },
        )


def _answer(trace: _Trace, outcome: _Outcome, results: list[object]) -> tuple[bytes, str]:
    """The reply for one RCPT and its lmtp_deliveries result; logs each of its targets."""
    address = outcome.rcpt.address
    if outcome.loop:
        detail = f"Delivered-To: {outcome.loop} already in the message"
        trace.log(logging.WARNING, address, "", "refused: mail loop", detail)
        text = f"<{address}>: mail forwarding loop for {outcome.loop}"
        return R.reply(554, "5.4.6", text[: R.REPLY_TEXT_LIMIT]), "loop"
    failure: BaseException | None = None
    for index, target in outcome.waits:
        result = results[index]
        if isinstance(result, BaseException):  # a cancelled future counts as failed
            where = f"<{target}>" if target else "the queue"
            trace.log(logging.WARNING, address, where, "not delivered", str(result))
            if failure is None or isinstance(result, MailboxFull | QueueFull):
                failure = result
        elif target:
            trace.log(logging.INFO, address, f"<{target}>", "delivered", _described(result))
        else:
            queued = ", ".join(f"<{r}>" for r in outcome.resolution.remote) or "release (held)"
            trace.log(logging.INFO, address, "the queue", "queued", f"for {queued}")
    queue_id = trace.queue_id
    if failure is None:
        return R.reply(250, "2.0.0", f"<{address}> Ok: delivered as {queue_id}"), "delivered"
    if isinstance(failure, MailboxFull | QueueFull):
        storage = R.reply(452, "4.3.1", f"<{address}> Error: insufficient system storage")
        return storage, "storage_full"
    if isinstance(failure, OverQuota):
        return R.reply(452, "4.2.2", f"<{address}> Error: mailbox full"), "over_quota"
    return R.reply(451, "4.3.0", f"<{address}> Error: local error in processing"), "error"


def _described(result: object) -> str:
    """A delivery's outcome for the log: its UID, or that it was there already."""
    if isinstance(result, Delivered):
        if result.duplicate:
            return "already delivered"
        return f"uid {result.uid}, uidvalidity {result.uidvalidity}"
    return str(result)


def _queue_recipient(rcpt: Recipient, target: str) -> Recipient:
    """A queue recipient for *target*, an alias target of *rcpt*: the RCPT's parameters,
    with ORCPT=rfc822;<the RCPT's address> added when it had none (RFC 3461 §4.2)."""
    params = dict(rcpt.params)
    if "ORCPT" not in params and rcpt.address.isascii() and "@" in rcpt.address:
        params["ORCPT"] = f"rfc822;{rcpt.address}"
    return Recipient(target, params)

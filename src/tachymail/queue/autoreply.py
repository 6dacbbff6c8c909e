"""Messages the server writes itself and queues for delivery: automatic replies.

Local delivery (the delivery workers) and LMTP (the SMTP workers) both queue a user's
vacation reply (``tachymail.mailbox.vacation``) through :func:`auto_reply_message`, after
the delivery it answers is committed: the reply has the null envelope sender (RFC 3834
§3.3), so whatever becomes of it, it never bounces back to anybody.

A reply is DKIM-signed as mail the user sends is (``[dkim]``): :func:`reply_signature`
takes the worker's signer (``tachymail.mailauth.dkim.DkimSigner``, passed in: the queue
does not import message authentication) and signs with the key of the From domain, the
user's; the callers run it off the event loop and pass the field to
:func:`auto_reply_message`.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from tachymail.queue.envelope import ACTIVE, Envelope, Recipient, new_queue_id
from tachymail.queue.store import Operation, put_message

log = logging.getLogger(__name__)


class ReplySigner(Protocol):
    """What :func:`reply_signature` needs of a DKIM signer (DkimSigner has it)."""

    def signing_domain(self, sender: str, content: bytes) -> str | None: ...

    def sign(self, content: bytes, domain: str) -> bytes: ...


def reply_signature(signer: ReplySigner | None, content: bytes) -> bytes:
    """The DKIM-Signature field to put on top of the automatic reply *content*, signed
    with the key of its From domain; b"" when there is no signer or no key for that
    domain, or signing fails (logged: the reply goes out unsigned, as SMTP submission
    does). CPU work: call it in an executor."""
    if signer is None:
        return b""
    domain = signer.signing_domain("", content)
    if domain is None:
        return b""
    try:
        return signer.sign(content, domain)
    except ValueError as exc:
        log.error("vacation reply not DKIM-signed: %s", exc)
        return b""


def auto_reply_message(
    recipient: str, content: bytes, *, user: str, listener: str, signature: bytes = b""
) -> tuple[Envelope, Operation]:
    """The envelope of *user*'s automatic reply *content* to *recipient*, and the queue
    operation that stores it (commit it with the queue's committer). *signature*: the
    DKIM-Signature field (:func:`reply_signature`) put on top."""
    content = signature + content
    params = {} if content.isascii() else {"BODY": "8BITMIME"}
    if not recipient.isascii():
        params["SMTPUTF8"] = ""
    envelope = Envelope(
        id=new_queue_id(),
        sender="",
        recipients=[Recipient(recipient, {})],
        mail_params=params,
        arrival=time.time(),
        size=len(content),
        listener=listener,
        auth=user,
        state=ACTIVE,
    )
    return envelope, put_message(envelope, content)

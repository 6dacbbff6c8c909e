"""Messages the server writes itself and queues for delivery: automatic replies.

Local delivery (the delivery workers) and LMTP (the SMTP workers) both queue a user's
vacation reply (``tachymail.mailbox.vacation``) through :func:`auto_reply_message`, after
the delivery it answers is committed: the reply has the null envelope sender (RFC 3834
§3.3), so whatever becomes of it, it never bounces back to anybody.
"""

from __future__ import annotations

import time

from tachymail.queue.envelope import ACTIVE, Envelope, Recipient, new_queue_id
from tachymail.queue.store import Operation, put_message


def auto_reply_message(
    recipient: str, content: bytes, *, user: str, listener: str
) -> tuple[Envelope, Operation]:
    """The envelope of *user*'s automatic reply *content* to *recipient*, and the queue
    operation that stores it (commit it with the queue's committer)."""
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

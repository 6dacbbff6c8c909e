"""The mailbox store of local users: mailboxes, messages, flags, UIDs and the index IMAP
reads, in one group-committed LMDB environment (``store``), with the delivery trace fields
(``headers``), the POP3 maildrop lock (``lock``), Maildir export/import (``maildir``) and
the directory of users and aliases (``directory``), and the change notification every
process of the node shares (``notify``).

Front ends and delivery meet the store only through the names exported here.
"""

from tachymail.mailbox.directory import Directory, Resolution
from tachymail.mailbox.headers import delivered_to, delivery_headers
from tachymail.mailbox.lock import MaildropLock
from tachymail.mailbox.maildir import export_maildir, import_maildir
from tachymail.mailbox.notify import ChangeNotifier
from tachymail.mailbox.store import (
    ANSWERED,
    DELETED,
    DRAFT,
    FLAGGED,
    SEEN,
    CopyResult,
    Delivered,
    Delivery,
    InvalidMailboxName,
    MailboxExists,
    MailboxInfo,
    MailboxStore,
    MessageInfo,
    NoSuchMailbox,
    Operation,
    OverQuota,
    StorageFull,
    claim_recent,
    copy_messages,
    create_mailbox,
    create_user,
    delete_mailbox,
    delete_user,
    deliver,
    expunge,
    move_messages,
    prepare_delivery,
    rename_mailbox,
    set_flags,
    subscribe,
    sweep_delivered,
)

__all__ = [
    "ANSWERED",
    "DELETED",
    "DRAFT",
    "FLAGGED",
    "SEEN",
    "ChangeNotifier",
    "CopyResult",
    "Delivered",
    "Delivery",
    "Directory",
    "InvalidMailboxName",
    "MailboxExists",
    "MailboxInfo",
    "MailboxStore",
    "MaildropLock",
    "MessageInfo",
    "NoSuchMailbox",
    "Operation",
    "OverQuota",
    "Resolution",
    "StorageFull",
    "claim_recent",
    "copy_messages",
    "create_mailbox",
    "create_user",
    "delete_mailbox",
    "delete_user",
    "deliver",
    "delivered_to",
    "delivery_headers",
    "export_maildir",
    "expunge",
    "import_maildir",
    "move_messages",
    "prepare_delivery",
    "rename_mailbox",
    "set_flags",
    "subscribe",
    "sweep_delivered",
]

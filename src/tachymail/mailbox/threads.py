"""Conversation keys: which thread a delivered message belongs to (JMAP's threadId).

A message's thread is found once, at delivery, from its Message-ID, References and
In-Reply-To (RFC 5322 §3.6.4) and kept in the store (``threads`` database), so reading it
later costs one record, never a header parse:

- a parent already in the user's store (the first of References, then In-Reply-To, that
  has a record) gives its thread: a reply that kept only In-Reply-To joins its parent's
  conversation even when the parent's References were longer;
- otherwise the first of References (the root, which RFC 5322 asks every reply to keep),
  else In-Reply-To, else the message's own Message-ID: a reply that arrives before the
  original gets the key the original gets later;
- a message with none of them is a thread of its own.

Keys are a 64-bit hash of the casefolded root id with the top bit set, so they never look
like a content id (messages stored before this index existed keep ``t<content id>``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from tachymail.protocol.mime import header_value

#: a msg-id in a Message-ID / In-Reply-To / References field (RFC 5322 §3.6.4), leniently
MSG_ID = re.compile(rb"<[^<>\s]*>")
# keys from ids have this bit set: content ids (the fallback key) never reach it
_HASH_BIT = 1 << 63
# parents looked up per delivery: a References field of a long thread is bounded here
MAX_PARENTS = 32


def message_ids(value: bytes | None) -> list[bytes]:
    """The msg-ids of a field value, brackets kept, casefolded (ids compare case-blind
    here as IMAP THREAD's REFERENCES does)."""
    if not value:
        return []
    return [found.lower() for found in MSG_ID.findall(value) if len(found) > 2]


def id_key(msg_id: bytes) -> int:
    """The thread key of a root msg-id (stable across processes and versions)."""
    digest = hashlib.blake2b(msg_id, digest_size=8, person=b"tm-thread").digest()
    return int.from_bytes(digest, "big") | _HASH_BIT


@dataclass(slots=True, frozen=True)
class ThreadRefs:
    """What a delivery needs to place a message: the key of its own Message-ID (0: none)
    and the keys of its parents, the root first (References, then In-Reply-To)."""

    own: int
    parents: tuple[int, ...]

    @property
    def fallback(self) -> int:
        """The key when no parent is known yet: the root, else its own id (0: none)."""
        return self.parents[0] if self.parents else self.own


def thread_refs(content: bytes | memoryview) -> ThreadRefs:
    """The :class:`ThreadRefs` of a message's header block; never raises."""
    end = bytes(content[:262144])  # header blocks are small: never scan a whole body
    own = message_ids(header_value(end, b"message-id"))
    parents = message_ids(header_value(end, b"references"))
    for reply_to in message_ids(header_value(end, b"in-reply-to"))[:1]:
        if reply_to not in parents:
            parents.append(reply_to)
    if own:
        parents = [p for p in parents if p != own[0]]
    keys = dict.fromkeys(id_key(p) for p in parents[:1] + parents[-(MAX_PARENTS - 1) :])
    return ThreadRefs(id_key(own[0]) if own else 0, tuple(keys))

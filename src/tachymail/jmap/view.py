"""The JMAP view of one user's mailboxes in the store: ids, states and the email index.

Ids (stable, what clients keep):

- a Mailbox is ``m<id>`` (the store's mailbox id, hex: kept across renames);
- an Email is ``e<content id>`` (hex): the store's content id, which IMAP MOVE keeps and
  COPY shares, so a message copied to a second mailbox is one Email with two mailboxIds,
  as RFC 8621 models it; its whole-message blob is ``B<content id>``;
- a Thread is ``t<thread key>`` (hex), the key the store recorded at delivery
  (``tachymail.mailbox.threads``: from Message-ID / References / In-Reply-To, the same in
  every mailbox and every process); a message stored before the thread index existed is a
  thread of its own, ``t<content id>``.

States come from the store's per-mailbox MODSEQs (the counter IMAP CONDSTORE shows), so a
change over IMAP changes the JMAP state and the reverse. The Email state is the vector of
(mailbox id, highestmodseq, uidnext) of every mailbox, as a string; the Mailbox state adds
a digest of the mailboxes' names, roles and subscriptions. Both are read from the
mailbox records alone (no index walk): a push subscriber computes them cheaply.

:class:`Snapshot` is every email of the user (content id -> mailboxes, UIDs, keywords,
received date, size), built from the index columns of each mailbox; it is cached per
process and rebuilt only for the mailboxes whose modseq moved.
"""

from __future__ import annotations

import hashlib
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from tachymail.mailbox import MailboxInfo, MailboxStore
from tachymail.mailbox.store import IndexChanges, IndexColumns

#: IMAP system flags <-> JMAP keywords (RFC 8621 §4.1.1); \Deleted and \Recent have none
FLAG_KEYWORDS = {
    "\\seen": "$seen",
    "\\flagged": "$flagged",
    "\\answered": "$answered",
    "\\draft": "$draft",
}
KEYWORD_FLAGS = {
    "$seen": "\\Seen",
    "$flagged": "\\Flagged",
    "$answered": "\\Answered",
    "$draft": "\\Draft",
}
#: SPECIAL-USE attributes -> JMAP roles (RFC 8621 §2, the IANA mailbox roles)
ROLES = {
    "\\drafts": "drafts",
    "\\sent": "sent",
    "\\trash": "trash",
    "\\junk": "junk",
    "\\archive": "archive",
    "\\all": "all",
    "\\flagged": "flagged",
    "\\important": "important",
}
_SYSTEM_BITS = ("$seen", "$answered", "$flagged", None, "$draft")  # store bit order
#: thread keys a process keeps (about 100 bytes each)
_THREAD_CACHE = 1_000_000


def mailbox_id(info: MailboxInfo) -> str:
    return f"m{info.id:x}"


def email_id(content: int) -> str:
    return f"e{content:x}"


def thread_id(key: int) -> str:
    """The Thread id of a thread key (see :meth:`Views.threads_of`)."""
    return f"t{key:x}"


def parse_id(value: object, prefix: str) -> int | None:
    """The number of an id like ``e1f`` (None when it is not one of ours)."""
    if not isinstance(value, str) or not value.startswith(prefix) or len(value) > 20:
        return None
    try:
        return int(value[len(prefix) :], 16)
    except ValueError:
        return None


def role_of(info: MailboxInfo) -> str | None:
    if info.name == "INBOX":
        return "inbox"
    return ROLES.get(info.special_use.lower()) if info.special_use else None


#: the system keywords of each combination of the five system flag bits
_SYSTEM_KEYWORDS = tuple(
    {name: True for bit, name in enumerate(_SYSTEM_BITS) if name and bits & (1 << bit)}
    for bits in range(1 << len(_SYSTEM_BITS))
)


def keywords_of(bits: int, words: frozenset[str] | None) -> dict[str, bool]:
    """JMAP keywords (lower case, RFC 8621 §4.1.1) of an index entry's flags (a new dict
    each call: callers may change it)."""
    # a copy of a ready dict: this runs for every email of every page
    found = _SYSTEM_KEYWORDS[bits & ((1 << len(_SYSTEM_BITS)) - 1)].copy()
    if words:
        for word in words:
            found[word.lower()] = True
    return found


def email_state(infos: list[MailboxInfo]) -> str:
    """The Email (and Thread) state: every mailbox's id, modseq and uidnext."""
    return (
        "_".join(
            f"{i.id:x}.{i.highestmodseq:x}.{i.uidnext:x}" for i in sorted(infos, key=lambda i: i.id)
        )
        or "0"
    )


def mailbox_state(infos: list[MailboxInfo]) -> str:
    """The Mailbox state: a digest of names, roles and subscriptions, then the Email state."""
    digest = hashlib.blake2b(digest_size=6)
    for info in sorted(infos, key=lambda i: i.id):
        digest.update(f"{info.id}\0{info.name}\0{info.special_use}\0{info.subscribed}\n".encode())
    return f"{digest.hexdigest()}-{email_state(infos)}"


def parse_email_state(state: str) -> dict[int, tuple[int, int]] | None:
    """mailbox id -> (modseq, uidnext) of an Email state; None when it is not one."""
    if state == "0":
        return {}
    out: dict[int, tuple[int, int]] = {}
    try:
        for item in state.split("_"):
            box, modseq, uidnext = item.split(".")
            out[int(box, 16)] = (int(modseq, 16), int(uidnext, 16))
    except ValueError:
        return None
    return out


@dataclass(slots=True)
class Email:
    """One email of the snapshot: where it is (mailbox id -> UID) and its index data."""

    content: int
    places: dict[int, int]
    bits: int
    words: frozenset[str] | None
    received: float
    size: int

    def keywords(self) -> dict[str, bool]:
        return keywords_of(self.bits, self.words)


class EmailIndex(Mapping[int, Email]):
    """Content id -> :class:`Email` over the index columns of the user's mailboxes, made
    lazily: building it costs a dict of the content ids (no object per message), and an
    Email object is made when one is asked for."""

    def __init__(self, boxes: list[tuple[int, IndexColumns]]) -> None:
        self.boxes = boxes
        # content -> (box position, entry position) of its first place
        self.first: dict[int, tuple[int, int]] = {}
        # content -> its other places, for the few messages copied to several mailboxes
        self.more: dict[int, list[tuple[int, int]]] = {}
        for index, (_box, columns) in enumerate(boxes):
            contents = columns.contents
            if not self.first:
                self.first = {c: (index, pos) for pos, c in enumerate(contents)}
                continue
            shared = self.first.keys() & set(contents)
            for pos, content in enumerate(contents):
                if content in shared:
                    self.more.setdefault(content, []).append((index, pos))
                else:
                    self.first[content] = (index, pos)
                    shared.add(content)  # a later place of it in the same mailbox: more

    def __len__(self) -> int:
        return len(self.first)

    def __iter__(self) -> Iterator[int]:
        return iter(self.first)

    def __contains__(self, content: object) -> bool:
        return content in self.first

    def __getitem__(self, content: int) -> Email:
        index, pos = self.first[content]
        box, columns = self.boxes[index]
        uid = columns.uids[pos]
        email = Email(
            content,
            {box: uid},
            columns.bits[pos],
            columns.keywords.get(uid),
            columns.dates[pos],
            columns.sizes[pos],
        )
        for other_index, other_pos in self.more.get(content, ()):
            other_box, other = self.boxes[other_index]
            other_uid = other.uids[other_pos]
            email.places.setdefault(other_box, other_uid)
            email.bits |= other.bits[other_pos]
            words = other.keywords.get(other_uid)
            if words:
                email.words = words | (email.words or frozenset())
        return email

    def columns_of(self, box: int) -> IndexColumns | None:
        for found, columns in self.boxes:
            if found == box:
                return columns
        return None


@dataclass(slots=True)
class Snapshot:
    """Every email of one user at one state (see the module docstring)."""

    infos: list[MailboxInfo]
    state: str
    emails: EmailIndex
    by_id: dict[int, MailboxInfo]
    #: memo of derived orderings (query results), keyed by the query; dropped with the
    #: snapshot
    memo: dict[Any, Any] = field(default_factory=dict)


def _patch(columns: IndexColumns, changes: IndexChanges) -> IndexColumns:
    """*columns* brought up to date with *changes* (in place): expunged entries removed,
    changed ones rewritten, new ones added (UIDs only grow: at the end)."""
    uids = columns.uids
    for uid in changes.expunged:
        pos = bisect_left(uids, uid)
        if pos < len(uids) and uids[pos] == uid:
            del uids[pos], columns.sizes[pos], columns.modseqs[pos], columns.dates[pos]
            del columns.contents[pos], columns.bits[pos]
            columns.keywords.pop(uid, None)
    new = changes.changed
    for i, uid in enumerate(new.uids):
        pos = bisect_left(uids, uid)
        if pos < len(uids) and uids[pos] == uid:
            columns.sizes[pos] = new.sizes[i]
            columns.modseqs[pos] = new.modseqs[i]
            columns.dates[pos] = new.dates[i]
            columns.contents[pos] = new.contents[i]
            columns.bits[pos] = new.bits[i]
        else:
            uids.insert(pos, uid)
            columns.sizes.insert(pos, new.sizes[i])
            columns.modseqs.insert(pos, new.modseqs[i])
            columns.dates.insert(pos, new.dates[i])
            columns.contents.insert(pos, new.contents[i])
            columns.bits.insert(pos, new.bits[i])
        words = new.keywords.get(uid)
        if words:
            columns.keywords[uid] = words
        else:
            columns.keywords.pop(uid, None)
    columns.info = changes.info
    return columns


class PropertyCache:
    """Per process: content id -> the values of its Email properties that depend on the
    message's octets alone (``from``, ``subject``, ``preview``, ``hasAttachment``...),
    as Email/get last computed them. A content id is never reused and its octets never
    change, so an entry is never stale; entries are shared by every user whose mailboxes
    hold the content (Email/get checks the snapshot first). At most about *max_bytes*
    (estimated) are kept, least recently used out; 0 keeps nothing.

    Callers must not modify the values they get: the same objects go into every response.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[int, tuple[dict[str, Any], int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, content: int) -> dict[str, Any] | None:
        """The values kept for *content* (a dict of property -> value), or None."""
        found = self._entries.get(content)
        if found is None:
            return None
        self._entries.move_to_end(content)
        return found[0]

    def add(self, content: int, values: dict[str, Any]) -> None:
        """Keep *values* for *content*, beside those already kept for it."""
        if not self.max_bytes:
            return
        old = self._entries.pop(content, None)
        if old is not None:
            self.size -= old[1]
            values = old[0] | values
        # what the objects cost in memory: about twice their JSON, plus the dict
        cost = 2 * len(orjson.dumps(values)) + 200
        if cost > self.max_bytes:
            return
        self._entries[content] = (values, cost)
        self.size += cost
        while self.size > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.size -= dropped


class Views:
    """The per-process cache of users' snapshots (a few users, least recently used out)."""

    def __init__(self, store: MailboxStore, capacity: int = 32) -> None:
        self.store = store
        self.capacity = capacity
        self._snapshots: OrderedDict[str, Snapshot] = OrderedDict()
        self._columns: dict[int, IndexColumns] = {}
        # content id -> thread key: a content's thread never changes, so this only grows
        # (up to _THREAD_CACHE entries, then starts again)
        self._threads: dict[int, int] = {}

    def threads_of(self, contents: Iterable[int]) -> dict[int, int]:
        """content id -> thread key of each of *contents* (the content id itself for one
        with no thread record): cached, the rest read from the store in one transaction."""
        cache = self._threads
        out: dict[int, int] = {}
        missing = []
        for content in contents:
            key = cache.get(content)
            if key is None:
                missing.append(content)
            else:
                out[content] = key
        if missing:
            if len(cache) + len(missing) > _THREAD_CACHE:
                cache.clear()
            found = self.store.threads_of(missing)
            for content in missing:
                out[content] = cache[content] = found.get(content, content)
        return out

    def thread_members(self, user: str, snap: Snapshot, key: int) -> list[int]:
        """The content ids of the thread *key* in *snap*, sorted by receivedAt (then id)."""
        members = [c for c in self.store.thread_members(user, key) if c in snap.emails]
        if not members and key in snap.emails and self.threads_of([key])[key] == key:
            members = [key]  # stored before the thread index, or a thread of one
        emails = snap.emails
        return sorted(members, key=lambda c: (emails[c].received, c))

    def _columns_now(self, user: str, info: MailboxInfo) -> IndexColumns | None:
        """The mailbox's columns now: the cached ones patched with what changed since
        (a walk of the modseqs), or read whole the first time."""
        cached = self._columns.get(info.id)
        if cached is not None:
            old = cached.info
            if (old.highestmodseq, old.uidnext) == (info.highestmodseq, info.uidnext):
                return cached
            changes = self.store.changes_since(user, info.name, old.highestmodseq)
            if changes is not None and changes.info.id == info.id:
                # the columns are shared with older snapshots: patch a copy
                copy = IndexColumns(
                    cached.info,
                    array("I", cached.uids),
                    array("Q", cached.sizes),
                    array("Q", cached.modseqs),
                    array("d", cached.dates),
                    bytearray(cached.bits),
                    array("Q", cached.contents),
                    dict(cached.keywords),
                )
                patched = self._columns[info.id] = _patch(copy, changes)
                return patched
        fresh = self.store.index_columns(user, info.name)
        if fresh is not None:
            self._columns[info.id] = fresh
        return fresh

    def snapshot(self, user: str) -> Snapshot:
        """The user's snapshot now (reads only the mailbox records when nothing changed)."""
        infos = self.store.mailboxes(user)
        state = email_state(infos)
        cached = self._snapshots.get(user)
        if cached is not None and cached.state == state:
            self._snapshots.move_to_end(user)
            cached.infos = infos  # names may have changed without a modseq
            cached.by_id = {info.id: info for info in infos}
            return cached
        boxes: list[tuple[int, IndexColumns]] = []
        for info in infos:
            columns = self._columns_now(user, info)
            if columns is not None:  # None: deleted meanwhile; the next request sees it gone
                boxes.append((info.id, columns))
        snap = Snapshot(infos, state, EmailIndex(boxes), {info.id: info for info in infos})
        self._snapshots[user] = snap
        self._snapshots.move_to_end(user)
        while len(self._snapshots) > self.capacity:
            _, dropped = self._snapshots.popitem(last=False)
            for info in dropped.infos:
                self._columns.pop(info.id, None)
        return snap

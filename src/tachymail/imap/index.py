"""The messages of a selected mailbox as columns, and one cache of them per worker process.

A session's view of its selected mailbox is a :class:`MessageList`: the store's index
entries as arrays (UIDs, sizes, modseqs, dates, flag bits, content ids; keywords only for
the messages that have any), not one object per message. Every session of a process that
selects the same mailbox starts from the same arrays (:class:`IndexCache`): a SELECT of a
mailbox the process has read before copies nothing and reads only the mailbox's record;
the arrays are copied the first time a session's view differs from them (copy on write).

What callers may rely on:

- :meth:`IndexCache.entry` answers on the event loop without reading the index when the
  cached columns are current (the mailbox's HIGHESTMODSEQ and id are those cached). A
  stale entry is brought up to date from the store's changes above its modseq
  (:meth:`IndexCache.refresh`: new messages, flag changes and expunges, in one read
  transaction), not read again; a missing one is read whole (:meth:`IndexCache.load`, for
  a thread off the loop: concurrent SELECTs of one mailbox share one read).
- :meth:`CacheEntry.changes_since` gives a session what changed between the modseq its
  view reflects and the entry's, as the store's ``changed_since`` / ``expunged_since``
  would, from the log of the entry's last refreshes; None when that log does not reach back
  so far (the caller reads the store then).
- Memory is bounded: the cache holds at most ``imap.index_cache_messages`` messages over
  all its mailboxes, evicting the least recently used mailbox first; a mailbox bigger
  than that alone is not cached (each SELECT reads it). The arrays take about 37 octets a
  message, keywords aside.
- Correctness across processes comes from the store: the cache is only ever a copy of a
  state the store had, tagged with that state's modseq; the change notifier only makes
  sessions look sooner.
"""

from __future__ import annotations

import asyncio
import struct
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

from tachymail.imap.fetch import format_flags
from tachymail.mailbox import MailboxInfo, MessageInfo
from tachymail.mailbox.store import SYSTEM_FLAGS, IndexColumns, encode_flags

__all__ = [
    "CacheEntry",
    "IndexCache",
    "MessageList",
    "RenderedCache",
    "caches_for",
    "flag_list",
]

_CONTENT = struct.Struct(">Q")
#: refreshes an entry remembers for sessions that are behind
LOG_LENGTH = 64
#: the system flags of each combination of flag bits
_FLAG_SETS: tuple[frozenset[str], ...] = tuple(
    frozenset(flag for bit, flag in enumerate(SYSTEM_FLAGS) if bits & (1 << bit))
    for bits in range(256)
)
#: their flag lists as FETCH sends them
_FLAG_LISTS: tuple[bytes, ...] = tuple(format_flags(flags) for flags in _FLAG_SETS)
_SEEN_BIT = 1
_RECENT = frozenset({"\\Recent"})
_RECENT_LISTS: tuple[bytes, ...] = tuple(format_flags(flags | _RECENT) for flags in _FLAG_SETS)
_DELETED_BIT = 1 << SYSTEM_FLAGS.index("\\Deleted")
# bits -> 1 where \Seen is set: the first 0 of the translation is the first unseen message
_SEEN_OF = bytes((bits & _SEEN_BIT) for bits in range(256))


def flag_list(bits: int, keywords: frozenset[str] | None) -> bytes:
    """The FETCH flag list ``(\\Seen $Junk)`` of a message's flag bits and keywords."""
    if not keywords:
        return _FLAG_LISTS[bits]
    return format_flags(_FLAG_SETS[bits] | keywords)


class MessageList(Sequence[MessageInfo]):
    """A session's messages of the selected mailbox (index = sequence number - 1), as
    columns. Reading an item builds its MessageInfo; the fast paths read the columns
    (:attr:`uids`, :attr:`sizes`, :attr:`modseqs`, :attr:`bits`...) directly and must not
    change them: changes go through :meth:`put`, :meth:`append` and :meth:`remove`, which
    copy arrays shared with the cache (or another view) first."""

    __slots__ = ("bits", "contents", "dates", "keywords", "modseqs", "shared", "sizes", "uids")

    def __init__(self, columns: IndexColumns, shared: bool = True) -> None:
        self.uids = columns.uids
        self.sizes = columns.sizes
        self.modseqs = columns.modseqs
        self.dates = columns.dates
        self.bits = columns.bits
        self.contents = columns.contents
        self.keywords = columns.keywords
        self.shared = shared

    @classmethod
    def of(cls, messages: Iterable[MessageInfo]) -> MessageList:
        """A private list of *messages* (UID order)."""
        view = cls(_empty(), shared=False)
        for message in messages:
            view.append(message)
        return view

    def snapshot(self) -> MessageList:
        """A list with the same messages that later changes of either do not affect."""
        self.shared = True
        copy = MessageList.__new__(MessageList)
        for name in MessageList.__slots__:
            setattr(copy, name, getattr(self, name))
        return copy

    def _own(self) -> None:
        if self.shared:
            self.uids = self.uids[:]
            self.sizes = self.sizes[:]
            self.modseqs = self.modseqs[:]
            self.dates = self.dates[:]
            self.bits = self.bits[:]
            self.contents = self.contents[:]
            self.keywords = dict(self.keywords)
            self.shared = False

    def __len__(self) -> int:
        return len(self.uids)

    @overload
    def __getitem__(self, index: int) -> MessageInfo: ...

    @overload
    def __getitem__(self, index: slice) -> list[MessageInfo]: ...

    def __getitem__(self, index: int | slice) -> MessageInfo | list[MessageInfo]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self.uids)))]
        uid = self.uids[index]
        flags = _FLAG_SETS[self.bits[index]]
        keywords = self.keywords.get(uid) if self.keywords else None
        if keywords:
            flags = flags | keywords
        return MessageInfo(
            uid,
            self.sizes[index],
            flags,
            self.dates[index],
            self.modseqs[index],
            _CONTENT.pack(self.contents[index]),
        )

    def __iter__(self) -> Iterator[MessageInfo]:
        for index in range(len(self.uids)):
            yield self[index]

    def index(self, uid: int, start: int = 0, stop: int | None = None) -> int:
        """The position of *uid*; ValueError when it is not there."""
        found = self.find(uid)
        if found is None:
            raise ValueError(f"no message with UID {uid}")
        return found

    def find(self, uid: int) -> int | None:
        """The position of *uid*, or None."""
        uids = self.uids
        i = bisect_left(uids, uid)
        return i if i < len(uids) and uids[i] == uid else None

    def flag_list(self, index: int) -> bytes:
        """The message's flag list as FETCH sends it."""
        keywords = self.keywords.get(self.uids[index]) if self.keywords else None
        return flag_list(self.bits[index], keywords)

    def flag_lists(self, lo: int, hi: int, recent: Sequence[tuple[int, int]] = ()) -> list[bytes]:
        """The flag lists of the messages lo <= index < hi as FETCH sends them, with
        \\Recent for the UIDs in the half-open ranges *recent*."""
        bits = self.bits
        out = [_FLAG_LISTS[b] for b in bits[lo:hi]]
        keywords, uids = self.keywords, self.uids
        if keywords:
            for k in range(hi - lo):
                words = keywords.get(uids[lo + k])
                if words:
                    out[k] = format_flags(_FLAG_SETS[bits[lo + k]] | words)
        for first, end in recent:
            a, b = max(bisect_left(uids, first), lo), min(bisect_left(uids, end), hi)
            if a >= b:
                continue
            out[a - lo : b - lo] = [_RECENT_LISTS[bit] for bit in bits[a:b]]
            if keywords:
                for i in range(a, b):
                    words = keywords.get(uids[i])
                    if words:
                        out[i - lo] = format_flags(_FLAG_SETS[bits[i]] | words | _RECENT)
        return out

    def has_flag(self, index: int, bit: int) -> bool:
        return bool(self.bits[index] & bit)

    def deleted_uids(self) -> list[int]:
        """UIDs of the messages flagged \\Deleted, ascending."""
        bits, uids = self.bits, self.uids
        return [uids[i] for i in range(len(uids)) if bits[i] & _DELETED_BIT]

    def first_unseen(self) -> int:
        """The sequence number of the first message without \\Seen; 0 when none."""
        return self.bits.translate(_SEEN_OF).find(b"\0") + 1

    def keyword_set(self) -> set[str]:
        """Every keyword some message has."""
        found: set[str] = set()
        for words in self.keywords.values():
            found.update(words)
        return found

    def put(self, index: int, info: MessageInfo) -> None:
        """Replace the message at *index* (same UID) with *info*'s state."""
        self._own()
        bits, keywords = _split(info.flags)
        self.sizes[index] = info.size
        self.modseqs[index] = info.modseq
        self.dates[index] = info.internaldate
        self.bits[index] = bits
        self.contents[index] = _CONTENT.unpack(info.content_id)[0]
        if keywords:
            self.keywords[info.uid] = keywords
        else:
            self.keywords.pop(info.uid, None)

    def append(self, info: MessageInfo) -> None:
        """Add *info* at the end (its UID is above every other)."""
        self._own()
        bits, keywords = _split(info.flags)
        self.uids.append(info.uid)
        self.sizes.append(info.size)
        self.modseqs.append(info.modseq)
        self.dates.append(info.internaldate)
        self.bits.append(bits)
        self.contents.append(_CONTENT.unpack(info.content_id)[0])
        if keywords:
            self.keywords[info.uid] = keywords

    def remove(self, indexes: Iterable[int]) -> None:
        """Drop the messages at *indexes*."""
        doomed = sorted(set(indexes), reverse=True)
        if not doomed:
            return
        self._own()
        for i in doomed:
            self.keywords.pop(self.uids[i], None)
        columns = (self.uids, self.sizes, self.modseqs, self.dates, self.bits, self.contents)
        if len(doomed) <= 64:  # a few: memmove in place beats rebuilding every column
            for i in doomed:
                for column in columns:
                    del column[i]
            return
        gone = set(doomed)
        keep = [i for i in range(len(self.uids)) if i not in gone]
        self.uids = array("I", [self.uids[i] for i in keep])
        self.sizes = array("Q", [self.sizes[i] for i in keep])
        self.modseqs = array("Q", [self.modseqs[i] for i in keep])
        self.dates = array("d", [self.dates[i] for i in keep])
        self.bits = bytearray(self.bits[i] for i in keep)
        self.contents = array("Q", [self.contents[i] for i in keep])


def _empty() -> IndexColumns:
    info = MailboxInfo("", "", 0, 0, 0, 0, 0, 0, 0, "", False)
    return IndexColumns(
        info, array("I"), array("Q"), array("Q"), array("d"), bytearray(), array("Q"), {}
    )


def _split(flags: frozenset[str]) -> tuple[int, frozenset[str]]:
    """Flag bits and keywords of a flag set (\\Recent is the session's, not stored)."""
    bits, words = encode_flags(flags)
    return bits, frozenset(words.decode().split("\0")) if words else frozenset()


#: one refresh of an entry: (from modseq, to modseq, UIDs changed, UIDs expunged)
_Step = tuple[int, int, frozenset[int], tuple[int, ...]]


class CacheEntry:
    """One mailbox's columns at one state of the store (never changed once made), with the
    log of the refreshes that led to it."""

    __slots__ = ("_first_unseen", "_keywords", "columns", "log")

    def __init__(self, columns: IndexColumns, log: tuple[_Step, ...]) -> None:
        self.columns = columns
        #: (from modseq, to modseq, UIDs changed, UIDs expunged) of each refresh, oldest first
        self.log = log
        self._first_unseen = -1
        self._keywords: set[str] | None = None

    @property
    def info(self) -> MailboxInfo:
        return self.columns.info

    @property
    def modseq(self) -> int:
        return self.columns.info.highestmodseq

    def view(self) -> MessageList:
        """A session's view starting at this state (shares the arrays until it changes)."""
        return MessageList(self.columns)

    def first_unseen(self) -> int:
        if self._first_unseen < 0:
            self._first_unseen = MessageList(self.columns).first_unseen()
        return self._first_unseen

    def keywords(self) -> set[str]:
        if self._keywords is None:
            self._keywords = MessageList(self.columns).keyword_set()
        return self._keywords

    def changes_since(self, modseq: int) -> tuple[list[MessageInfo], list[int]] | None:
        """(messages changed or new above *modseq*, as they are now, in UID order; UIDs
        expunged above it, ascending); None when the log does not reach back to *modseq*."""
        if modseq == self.modseq:
            return [], []
        start = next((k for k, step in enumerate(self.log) if step[0] == modseq), None)
        if start is None:
            return None
        changed: set[int] = set()
        gone: set[int] = set()
        for _from, _to, uids, expunged in self.log[start:]:
            changed.update(uids)
            gone.update(expunged)
        view = MessageList(self.columns)
        found = (view.find(uid) for uid in sorted(changed))
        return [view[i] for i in found if i is not None], sorted(gone)


def _apply(entry: CacheEntry, changes: Any) -> CacheEntry:
    """A new entry: *entry* with the store's IndexChanges applied (never changes *entry*)."""
    old = entry.columns
    changed: IndexColumns = changes.changed
    gone = set(changes.expunged)
    if not changed.uids and not gone and changes.info.highestmodseq == entry.modseq:
        # nothing changed (the record may have: a subscription): same arrays, same log
        same = IndexColumns(
            changes.info,
            old.uids,
            old.sizes,
            old.modseqs,
            old.dates,
            old.bits,
            old.contents,
            old.keywords,
        )
        return CacheEntry(same, entry.log)
    uids = old.uids
    positions: dict[int, int] = {}
    appended: list[int] = []
    last = uids[-1] if uids else 0
    for k, uid in enumerate(changed.uids):
        if uid > last:
            appended.append(k)
            continue
        i = bisect_left(uids, uid)
        if i < len(uids) and uids[i] == uid:
            positions[i] = k
    view = MessageList(old)
    view._own()
    for i, k in positions.items():
        view.modseqs[i] = changed.modseqs[k]
        view.bits[i] = changed.bits[k]
        uid = changed.uids[k]
        words = changed.keywords.get(uid)
        if words:
            view.keywords[uid] = words
        else:
            view.keywords.pop(uid, None)
    for k in appended:
        uid = changed.uids[k]
        if uid in gone:
            continue
        view.uids.append(uid)
        view.sizes.append(changed.sizes[k])
        view.modseqs.append(changed.modseqs[k])
        view.dates.append(changed.dates[k])
        view.bits.append(changed.bits[k])
        view.contents.append(changed.contents[k])
        words = changed.keywords.get(uid)
        if words:
            view.keywords[uid] = words
    if gone:
        view.remove(i for i in (view.find(uid) for uid in gone) if i is not None)
    columns = IndexColumns(
        changes.info,
        view.uids,
        view.sizes,
        view.modseqs,
        view.dates,
        view.bits,
        view.contents,
        view.keywords,
    )
    step = (entry.modseq, changes.info.highestmodseq, frozenset(changed.uids), tuple(sorted(gone)))
    return CacheEntry(columns, (*entry.log[-(LOG_LENGTH - 1) :], step))


class IndexCache:
    """The cached columns of the mailboxes this process's sessions selected (see the
    module docstring). Used from the event loop's thread; :meth:`load` and
    :meth:`refresh` compute without touching the cache and may run in any thread."""

    def __init__(self, store: Any, max_messages: int) -> None:
        self.store = store
        self.max_messages = max_messages
        self._entries: OrderedDict[tuple[str, str], CacheEntry] = OrderedDict()
        self._size = 0
        self._pending: dict[tuple[str, str], asyncio.Future[CacheEntry | None]] = {}

    @staticmethod
    def key(user: str, name: str) -> tuple[str, str]:
        return user.lower(), "INBOX" if name.upper() == "INBOX" else name

    @property
    def messages(self) -> int:
        """Messages held over all cached mailboxes."""
        return self._size

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, user: str, name: str, info: MailboxInfo) -> CacheEntry | None:
        """The cached entry of the mailbox whose record is *info* now, if it is current
        (same mailbox id and modseq); else None."""
        key = self.key(user, info.name)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.info.id != info.id:
            self._drop(key)
            return None
        if entry.modseq != info.highestmodseq:
            return None
        self._entries.move_to_end(key)
        return entry

    def cached(self, user: str, name: str) -> CacheEntry | None:
        """The entry of the mailbox, current or not."""
        return self._entries.get(self.key(user, name))

    def load(self, user: str, name: str, base: CacheEntry | None = None) -> CacheEntry | None:
        """The mailbox's entry now: *base* brought up to date, or read whole when there is
        no *base* (or it is another mailbox now). None when the mailbox does not exist.
        Touches no shared state: safe in a thread off the loop."""
        if base is not None:
            changes = self.store.changes_since(user, name, base.modseq)
            if changes is None:
                return None
            if changes.info.id == base.info.id:
                return _apply(base, changes)
        columns = self.store.index_columns(user, name)
        return None if columns is None else CacheEntry(columns, ())

    def refresh(self, user: str, name: str) -> CacheEntry | None:
        """On the loop: the mailbox's entry brought up to date now (from the cached entry,
        or read whole) and kept; None when the mailbox does not exist."""
        key = self.key(user, name)
        entry = self.load(user, name, self._entries.get(key))
        if entry is None:
            self._drop(key)
        else:
            self.install(entry)
        return entry

    def install(self, entry: CacheEntry) -> None:
        """Keep *entry* (on the loop), unless an entry as new is there; evicts the least
        recently used mailboxes beyond the cap."""
        key = self.key(entry.info.user, entry.info.name)
        old = self._entries.get(key)
        if old is not None and old.info.id == entry.info.id and old.modseq > entry.modseq:
            return
        self._drop(key)
        size = len(entry.columns.uids)
        if size > self.max_messages:
            return
        self._entries[key] = entry
        self._size += size
        while self._size > self.max_messages and len(self._entries) > 1:
            oldest = next(iter(self._entries))
            self._drop(oldest)

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._size -= len(entry.columns.uids)

    def load_later(
        self,
        loop: asyncio.AbstractEventLoop,
        user: str,
        name: str,
    ) -> asyncio.Future[CacheEntry | None]:
        """A future of the mailbox's current entry, read in the loop's executor (one read
        for concurrent callers of one mailbox); installed in the cache when done."""
        key = self.key(user, name)
        pending = self._pending.get(key)
        if pending is not None:
            return pending
        base = self._entries.get(key)
        future: asyncio.Future[CacheEntry | None] = loop.run_in_executor(
            None, self.load, user, name, base
        )
        self._pending[key] = future

        def done(finished: asyncio.Future[CacheEntry | None]) -> None:
            self._pending.pop(key, None)
            if not finished.cancelled() and finished.exception() is None:
                entry = finished.result()
                if entry is not None:
                    self.install(entry)

        future.add_done_callback(done)
        return future


class RenderedCache:
    """FETCH items rendered from the stored summaries (``BODYSTRUCTURE (...)``,
    ``BODY (...)``, ``ENVELOPE (...)``, item name included), per process, at most
    *max_bytes* octets of them: the oldest go first. The store keeps the same renderings
    (``keep_rendered``); this copy spares a store read per message of a FETCH 1:*.

    ``kinds[k]`` maps a content id to its rendering of kind k (0 BODYSTRUCTURE, 1 BODY,
    2 ENVELOPE). A rendering in ``plain_only[k]`` is valid only for sessions without
    UTF8=ACCEPT and IMAP4rev2 (8-bit header text, message/global parts)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.kinds: tuple[dict[int, bytes], ...] = ({}, {}, {})
        self.plain_only: tuple[set[int], ...] = (set(), set(), set())
        self.size = 0
        # insertion order over all kinds, for eviction
        self._order: OrderedDict[tuple[int, int], None] = OrderedDict()

    def put(self, kind: int, content: int, value: bytes, plain_only: bool) -> None:
        if len(value) > self.max_bytes:
            return
        items = self.kinds[kind]
        old = items.pop(content, None)
        if old is not None:
            self.size -= len(old)
            self._order.pop((kind, content), None)
        items[content] = value
        self._order[(kind, content)] = None
        self.size += len(value)
        if plain_only:
            self.plain_only[kind].add(content)
        else:
            self.plain_only[kind].discard(content)
        while self.size > self.max_bytes:
            (old_kind, old_content), _ = self._order.popitem(last=False)
            self.size -= len(self.kinds[old_kind].pop(old_content))
            self.plain_only[old_kind].discard(old_content)


#: the caches of each store (one per worker process)
_caches: dict[int, tuple[Any, IndexCache, RenderedCache]] = {}


def caches_for(store: Any, max_messages: int, max_bytes: int) -> tuple[IndexCache, RenderedCache]:
    """This process's caches for *store*: the mailboxes' columns (at most *max_messages*
    messages) and the rendered FETCH items (at most *max_bytes* octets)."""
    found = _caches.get(id(store))
    if found is None or found[0] is not store:
        found = (store, IndexCache(store, max_messages), RenderedCache(max_bytes))
        _caches[id(store)] = found
    found[1].max_messages = max_messages  # a reload may have changed the caps
    found[2].max_bytes = max_bytes
    return found[1], found[2]

"""One IMAP connection: an asyncio.Protocol with an explicit state machine (RFC 3501 IMAP4rev1,
RFC 9051 IMAP4rev2 by ENABLE).

States (RFC 9051 §3): not authenticated -> authenticated (LOGIN, AUTHENTICATE PLAIN) ->
selected (SELECT, EXAMINE) -> logout. Beside the state, a *mode* says what the session is
doing with its input: reading commands, waiting (a password check, a store read off the
loop, a group commit, a TLS handshake: reading is paused and later commands wait in the
reader), streaming FETCH responses, IDLE, or reading an AUTHENTICATE answer.

Bytes go into the compiled command tokenizer (``tachymail.protocol.imap.CommandReader``);
there is no StreamReader and no await per line. Responses to a pipelined batch go out in
one ``write``. FETCH streams the stored octets in pieces of 64 KiB and stops while the
client reads nothing (``pause_writing``): a big message is never built whole in memory.

The selected mailbox is a ``MessageList`` (``tachymail.imap.index``: the index entries as
arrays, sequence number = index + 1) and the last modseq seen. SELECT starts it from the
worker process's cached columns of the mailbox (read on the event loop when they are
current, else brought up to date or read off the loop, once for all the sessions that wait
for them). Before each tagged OK, when a command that reads flags (FETCH, STORE, SEARCH,
SORT, THREAD) begins, and at once during IDLE when the store's change notifier fires, the
session learns what changed since that modseq (one read of the mailbox's record when
nothing did; else from the cache's log of its refreshes, else from the store) and sends
untagged EXPUNGE (or VANISHED under QRESYNC), EXISTS and FETCH (FLAGS): a flag set over
JMAP, by another session or in another process is in the very next FETCH's answer. EXPUNGE
is held back during FETCH, STORE and SEARCH by sequence number (RFC 9051 §7.5.1). Writes go
through the mailbox store's group commit: a tagged OK means synced.

FETCH has two fast paths over runs of consecutive messages: ``UID FLAGS RFC822.SIZE
[MODSEQ]`` is one call of the compiled ``fetch_flags_lines`` per run; items made of those,
INTERNALDATE and the structures (BODYSTRUCTURE, BODY, ENVELOPE) are assembled column by
column, the structures rendered once per stored message (from its summary, by
``tachymail.imap.fetch``) and then kept in the store and in the process's
``RenderedCache``, and the lines written by the compiled ``fetch_item_lines``.

\\Recent (RFC 3501 §2.3.2) for sessions that did not ENABLE IMAP4rev2: a message is recent in
exactly one session. SELECT claims the mailbox's unclaimed messages in the store's group
commit (``claim_recent``), and so does the tagged OK of any later command that finds new
messages in the view (during IDLE they are claimed at DONE); EXAMINE and STATUS show the
unclaimed ones without claiming. IMAP4rev2 sessions neither see nor claim any.

Not offered: CATENATE, NOTIFY, CONTEXT=SEARCH/SORT. UNCHANGEDSINCE is checked against the
session's view of the mailbox, MULTIAPPEND's messages are committed one by one (a refusal of
one does not undo the others), and ``imap.max_sessions_per_user`` counts per worker process.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import calendar
import logging
import re
import struct
import time
import zlib
from bisect import bisect_left, bisect_right
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from tachymail.frontend import (
    is_trusted,
    log_locked_out,
    refusal_reason,
    tarpit_delay,
    tls_description,
    tls_handshake,
)
from tachymail.imap.binary import encode_binary_parts
from tachymail.imap.fetch import (
    ContentRange,
    FetchError,
    fetch_response,
    format_flags,
    format_internaldate,
    render_structures,
    sets_seen,
)
from tachymail.imap.index import CacheEntry, IndexCache, MessageList, RenderedCache, caches_for
from tachymail.imap.mailboxes import (
    STATUS_ITEMS,
    ListError,
    list_responses,
    parse_list,
    status_response,
)
from tachymail.imap.responses import (
    decode_name,
    decode_pattern,
    encode_name,
    number_list,
    tagged,
    untagged,
)
from tachymail.imap.search import (
    SearchError,
    parse_search,
    parse_sort,
    parse_thread,
    run_search,
    run_sort,
    run_thread,
    saved_uids,
    search_response,
    sort_response,
)
from tachymail.mailbox import (
    DELETED,
    SEEN,
    CopyResult,
    Delivered,
    InvalidMailboxName,
    MailboxExists,
    MailboxInfo,
    MessageInfo,
    NoSuchMailbox,
    OverQuota,
    StorageFull,
    claim_recent,
    copy_messages,
    create_mailbox,
    create_user,
    delete_mailbox,
    deliver,
    expunge,
    move_messages,
    prepare_delivery,
    rename_mailbox,
    set_flags,
    subscribe,
)
from tachymail.mailbox.store import SYSTEM_FLAGS, ContentReader, keep_rendered
from tachymail.mailbox.summary import build_summary
from tachymail.metrics import m
from tachymail.protocol.imap import (
    SEARCHRES,
    STAR,
    Bad,
    Binary,
    Command,
    CommandReader,
    Continuation,
    FetchAtt,
    Section,
    String,
    TooLarge,
    fetch_flags_lines,
    fetch_item_lines,
    parse_fetch_items,
    parse_sequence_set,
)

if TYPE_CHECKING:
    from tachymail.auth.throttle import Verdict
    from tachymail.smtp.worker import WorkerContext

log = logging.getLogger(__name__)

#: added to a message's flags where this session sees it as recent
_RECENT = frozenset({"\\Recent"})
_SEEN_BIT = 1 << SYSTEM_FLAGS.index(SEEN)
_CONTENT_KEY = struct.Struct(">Q")


class State(IntEnum):
    NOT_AUTHENTICATED = 0
    AUTHENTICATED = 1
    SELECTED = 2


class Mode(IntEnum):
    COMMAND = 0  # reading commands
    WAIT = 1  # reading paused: a check, a store job, a commit or a TLS handshake
    SENDING = 2  # streaming FETCH responses; later commands wait in the reader
    IDLE = 3  # IDLE: updates go out as they happen, until DONE
    SASL = 4  # expecting the client's AUTHENTICATE answer
    CLOSED = 5


#: output gathered before it is written mid-batch
FLUSH_BYTES = 256 * 1024
#: octets read from the store per piece of a literal
CHUNK = 64 * 1024
#: per turn of the event loop, a FETCH sends at most this many octets or messages, so
#: other clients get theirs
TURN_BYTES = 512 * 1024
TURN_MESSAGES = 1000
#: the largest literal before login (a password; an APPEND needs a login first)
PREAUTH_LITERAL = 8192
#: how often IDLE looks at the store besides the change notifier's wake-ups
IDLE_POLL = 30.0

_SYSTEM = {flag.lower(): flag for flag in SYSTEM_FLAGS}
_KEYWORD = re.compile(rb"[!#$&'+-.0-9:;<=>?@A-Z^-z|~]+")  # atom-chars without \ % * ] etc.
_MONTHS = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1
    )
}
_DATE_TIME = re.compile(
    rb"^ ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})$"
)
_EMPTY_SUMMARY = build_summary(b"")
_FLAGS_ITEM = FetchAtt(b"FLAGS")
#: ``BODY.PEEK[]``, the item a client downloads a message with (the whole-message path)
_WHOLE_PEEK = parse_fetch_items([Section(b"BODY.PEEK", [], None)])

#: what ENABLE turns on (RFC 5161), upper case
_ENABLE = frozenset({"CONDSTORE", "QRESYNC", "IMAP4REV2", "UTF8=ACCEPT"})
#: sessions open per user in this process (imap.max_sessions_per_user)
_user_sessions: Counter[str] = Counter()


class ArgumentError(ValueError):
    """A command's arguments do not parse: ``tag BAD`` with this text."""


class InvalidName(ValueError):
    """A mailbox name that is not valid modified UTF-7 (or UTF-8): ``tag NO [CANNOT]``, as
    for any name that cannot exist."""


@dataclass(slots=True)
class Selected:
    """The session's view of its selected mailbox."""

    name: str
    readonly: bool
    uidvalidity: int
    messages: MessageList  # index = sequence number - 1, as columns
    modseq: int  # the highest modseq the view reflects
    exists: int  # the EXISTS the client was last told
    pending_expunge: set[int] = field(default_factory=set)
    mailbox_id: int = 0
    #: UIDs \Recent in this session: half-open ranges (first, end), ascending
    recent: list[tuple[int, int]] = field(default_factory=list)
    #: UIDs from here on have not been claimed by (or for) this session yet; a huge value:
    #: the session never claims (EXAMINE, IMAP4rev2)
    claimed: int = 1 << 62

    @property
    def uids(self) -> Sequence[int]:
        """The messages' UIDs, ascending (the view's column: read, never change it)."""
        return self.messages.uids

    def index(self, uid: int) -> int | None:
        return self.messages.find(uid)

    def is_recent(self, uid: int) -> bool:
        return any(first <= uid < end for first, end in self.recent)

    def recent_count(self) -> int:
        """How many messages of the view are \\Recent (the RECENT response)."""
        uids = self.uids
        return sum(bisect_left(uids, end) - bisect_left(uids, first) for first, end in self.recent)


@dataclass(slots=True)
class FetchJob:
    """A FETCH being streamed: messages left, pieces of the current one, the stored octets
    of the literal under way."""

    tag: bytes
    name: str
    indexes: list[int]
    items: list[FetchAtt]
    uid: bool
    seen_set: set[int]  # UIDs whose \Seen this FETCH set: FLAGS goes with them
    position: int = 0
    pieces: deque[bytes | ContentRange] = field(default_factory=deque)
    content_id: bytes = b""
    offset: int = 0
    left: int = 0
    failed: str = ""
    failed_code: str = ""
    #: the fast paths: FAST_FLAGS (one kernel call per run of messages) or FAST_ITEMS
    #: (items from the columns and the kept renderings), with the item names in order
    fast: int = 0
    plan: tuple[bytes, ...] = ()
    #: renderings made by this FETCH, to keep in the store (content id, kind, octets), and
    #: the commit keeping the last ones
    keep: list[tuple[bytes, bytes, bytes]] = field(default_factory=list)
    keeping: asyncio.Future[Any] | None = None


#: FetchJob.fast: one fetch_flags_lines call per run / items assembled column by column
FAST_FLAGS = 1
FAST_ITEMS = 2
#: messages per call of the FETCH fast paths
FAST_RUN = 2048
#: items the FAST_ITEMS path answers besides the structures
_FAST_NAMES = frozenset({b"UID", b"FLAGS", b"RFC822.SIZE", b"MODSEQ", b"INTERNALDATE"})
#: the structures, by their number in the process's RenderedCache and in the stored record
_RENDERED = {b"BODYSTRUCTURE": 0, b"BODY": 1, b"ENVELOPE": 2}
_STRUCTURE_KEYS = (b"S", b"B", b"E")  # render_structures' keys, in that order
#: the kind of the store's record of a content's three structures (``keep_rendered``):
#: the mark octet, three >I lengths, then BODYSTRUCTURE, BODY and ENVELOPE
_STRUCTURES_KIND = b"I"
_LENGTHS = struct.Struct(">III")
#: the item sets of the FAST_FLAGS path (sent as UID FLAGS RFC822.SIZE [MODSEQ] in whatever
#: order they were asked, as fetch_response's fetch_flags_line path sends them)
_FLAGS_SETS = (
    frozenset({b"UID", b"FLAGS", b"RFC822.SIZE"}),
    frozenset({b"UID", b"FLAGS", b"RFC822.SIZE", b"MODSEQ"}),
)
#: the first octet of a kept rendering: valid for every session, or only for those without
#: UTF8=ACCEPT and IMAP4rev2 (8-bit header text, message/global parts)
_ANY_SESSION = b"\x01"
_PLAIN_SESSION = b"\x00"


def fast_plan(items: Sequence[FetchAtt], uid: bool, modseq: bool) -> tuple[int, tuple[bytes, ...]]:
    """Which fast path answers *items* (0: none) and the item names in the order they are
    sent, as ``fetch_response`` orders them (UID first when added, MODSEQ last)."""
    wanted = list(dict.fromkeys(items))
    names = [item.name for item in wanted]
    if uid and b"UID" not in names:
        names.insert(0, b"UID")
    if modseq and b"MODSEQ" not in names:
        names.append(b"MODSEQ")
    if len(set(names)) != len(names):
        return 0, ()
    if frozenset(names) in _FLAGS_SETS:
        return FAST_FLAGS, tuple(names)
    for item in wanted:
        if item.name in _FAST_NAMES:
            continue
        if item.name in _RENDERED and item.part is None:
            continue
        return 0, ()
    if not any(name in _RENDERED for name in names):
        return 0, ()
    return FAST_ITEMS, tuple(names)


def _unpack_structures(record: bytes) -> list[bytes] | None:
    """The three structures of a stored record (see _STRUCTURES_KIND); None when it does
    not parse (then they are rendered again)."""
    if len(record) < 1 + _LENGTHS.size:
        return None
    lengths = _LENGTHS.unpack_from(record, 1)
    texts: list[bytes] = []
    at = 1 + _LENGTHS.size
    for length in lengths:
        texts.append(record[at : at + length])
        at += length
    return texts if at == len(record) else None


def _same_for_all(summary: object) -> bool:
    """Whether the renderings of a summary are the same for every session: no 8-bit text
    (UTF8=ACCEPT sends it otherwise) and no message/global part (IMAP4rev2 does)."""
    if isinstance(summary, str):
        return summary.isascii()
    if isinstance(summary, dict):
        if summary.get("type") == "message" and summary.get("subtype") == "global":
            return False
        return all(_same_for_all(value) for value in summary.values())
    if isinstance(summary, list):
        return all(_same_for_all(value) for value in summary)
    return True


class _Opened(NamedTuple):
    """What SELECT found: the mailbox's current columns, QRESYNC's vanished UIDs, the first
    UID no session has claimed as \\Recent."""

    entry: CacheEntry
    vanished: list[int]
    first_recent: int = 0


class _Source:
    """What FETCH reads of the message being answered: its summary and stored octets
    (through the pump's read transaction)."""

    __slots__ = ("content_id", "reader", "store")

    def __init__(self, store: Any) -> None:
        self.store = store
        self.reader: ContentReader | None = None
        self.content_id = b""

    def summary(self) -> dict[str, Any]:
        found = self.store.summary(self.content_id)
        return cast(dict[str, Any], found if found is not None else _EMPTY_SUMMARY)

    def read(self, offset: int, length: int) -> bytes:
        assert self.reader is not None
        return self.reader.read(self.content_id, offset, length)


class _SearchView:
    """What B's SEARCH engine reads: a snapshot of the selected mailbox (used off the loop)."""

    def __init__(
        self,
        store: Any,
        messages: Sequence[MessageInfo],
        saved: Sequence[int],
        recent: Sequence[tuple[int, int]] = (),
    ) -> None:
        self._store = store
        self.messages = messages
        self.saved = saved
        self._recent = recent

    def is_recent(self, uid: int) -> bool:
        return any(first <= uid < end for first, end in self._recent)

    def content(self, info: MessageInfo) -> bytes:
        return cast(bytes, self._store.content(info.content_id) or b"")

    def summary(self, info: MessageInfo) -> dict[str, Any]:
        found = self._store.summary(info.content_id)
        return cast(dict[str, Any], found if found is not None else _EMPTY_SUMMARY)


def _astring(token: object, what: str) -> bytes:
    if not isinstance(token, bytes):
        raise ArgumentError(f"{what}: expected a string")
    return bytes(token)


def _number(token: object, what: str) -> int:
    if not isinstance(token, bytes) or isinstance(token, String) or not token.isdigit():
        raise ArgumentError(f"{what}: expected a number")
    if len(token) > 20:
        raise ArgumentError(f"{what}: number too large")
    return int(token)


def parse_flags(tokens: Iterable[object]) -> list[str]:
    """Flags of STORE / APPEND, system flags in their canonical case; ArgumentError for
    \\Recent, an unknown system flag or a malformed keyword."""
    flags: list[str] = []
    for token in tokens:
        if not isinstance(token, bytes) or isinstance(token, String):
            raise ArgumentError("flags must be atoms")
        if token.startswith(b"\\"):
            flag = _SYSTEM.get(token.decode("ascii", "replace").lower())
            if flag is None:
                raise ArgumentError(f"invalid system flag {token[:40].decode('ascii', 'replace')}")
            flags.append(flag)
        elif _KEYWORD.fullmatch(token):
            flags.append(token.decode("ascii"))
        else:
            raise ArgumentError("invalid keyword")
    return flags


def parse_date_time(raw: bytes) -> float:
    """APPEND's date-time ``"17-Jul-1996 02:44:25 -0700"`` as a timestamp; ValueError."""
    match = _DATE_TIME.match(raw)
    if match is None:
        raise ValueError("bad date-time")
    day, month, year, hour, minute, second, sign, zh, zm = match.groups()
    number = _MONTHS.get(month.decode().lower())
    if number is None:
        raise ValueError("bad month")
    stamp = calendar.timegm(
        (int(year), number, int(day), int(hour), int(minute), int(second), 0, 0, 0)
    )
    offset = (int(zh) * 60 + int(zm)) * 60
    return float(stamp - offset if sign == b"+" else stamp + offset)


class ImapSession(asyncio.Protocol):
    """The server side of one IMAP connection on an imap (STARTTLS) or imaps listener.

    Shares the SMTP worker's connection accounting: ``trusted``, ``role``, ``peer_ip``,
    ``idle``, ``shut_down``, ``close`` and ``rearm_timer`` are what the worker uses.
    """

    def __init__(self, ctx: WorkerContext, role: str, implicit_tls: bool = False) -> None:
        self.ctx = ctx
        self.role = role
        self.implicit_tls = implicit_tls
        self.config = ctx.config.imap
        self.reader = CommandReader(self.config.max_command_line, PREAUTH_LITERAL)
        self.grow_reader = False  # swap in the post-login reader once this one is empty
        self.state = State.NOT_AUTHENTICATED
        self.mode = Mode.COMMAND
        self.transport: asyncio.Transport | None = None
        self.peer_ip = ""
        self.peer_port = 0
        self.trusted = False
        self.tls: str | None = None
        self.out: list[bytes] = []
        self.out_size = 0
        self.close_after_flush = False
        self.errors = 0
        self.auth_failures = 0
        self.opened = False
        self.outcome = "disconnect"
        self.last_activity = time.monotonic()
        self.write_paused = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.user: str | None = None
        self.counted_user: str | None = None
        self.selected: Selected | None = None
        self.saved: list[int] = []  # UIDs of the saved search result ($)
        self.enabled: set[str] = set()
        self.condstore = False
        self.sasl_tag = b""
        self.idle_tag = b""
        self.idle_stop: Callable[[], None] | None = None
        self.idle_poll: asyncio.TimerHandle | None = None
        self.job: FetchJob | None = None
        self.pump_scheduled = False
        self.deflate: Any = None  # zlib compressor after COMPRESS DEFLATE
        self.inflate: Any = None
        self.inflate_tail = b""
        self.inflate_full = False  # the last inflate filled its buffer: more may be pending
        self.commands = 0

    # --- connection life cycle -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("", 0)
        self.peer_ip, self.peer_port = peer[0], peer[1]
        m.imap_sessions[self.role].inc()
        if self.implicit_tls:
            self.tls = tls_description(transport)
        self.trusted = is_trusted(self.peer_ip, self.ctx.trusted)
        refused = self.ctx.admit(self)
        if refused is not None:
            why = refusal_reason(refused, self.peer_ip)
            log.warning("refused IMAP connection from %s: %s", self.peer_ip, why)
            self.outcome = "refused"
            m.smtp_connections_refused[refused].inc()
            transport.write(untagged("BYE", f"{why}, try again later", "UNAVAILABLE"))
            self.mode = Mode.CLOSED
            transport.close()
            return
        self.opened = True
        m.imap_sessions_open[self.role].inc()
        transport.write(
            untagged("OK", "Tachymail IMAP server ready", "CAPABILITY " + self._capabilities())
        )
        self.rearm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.outcome == "disconnect":
            self.outcome = "error"
        self.mode = Mode.CLOSED
        self.transport = None
        self.job = None
        self._stop_idle()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.counted_user is not None:
            _user_sessions[self.counted_user] -= 1
            if _user_sessions[self.counted_user] <= 0:
                del _user_sessions[self.counted_user]
            self.counted_user = None
        log.info(
            "imap session %s:%s closed (%s): user %s, %d command(s), %d error(s)%s",
            self.peer_ip,
            self.peer_port,
            self.outcome,
            self.user or "-",
            self.commands,
            self.errors,
            f" ({exc})" if exc else "",
            extra={
                "fields": {
                    "event": "imap_session",
                    "outcome": self.outcome,
                    "client": f"{self.peer_ip}:{self.peer_port}",
                    "listener": self.role,
                    "tls": self.tls,
                    "user": self.user,
                    "commands": self.commands,
                    "errors": self.errors,
                }
            },
        )
        if self.opened:
            self.opened = False
            m.imap_sessions_open[self.role].dec()
        self.ctx.release(self)

    # --- timers ----------------------------------------------------------------------------

    def rearm_timer(self) -> None:
        """Work out when the session times out again (also when stress mode begins)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is None or self.mode == Mode.CLOSED:
            return
        due, _ = self._due(time.monotonic())
        self.timer = self.ctx.loop.call_later(
            max(due - time.monotonic(), 0.05), self._check_timeout
        )

    def _due(self, now: float) -> tuple[float, str]:
        """When the session's idle limit runs out, and why ("" while it is our turn)."""
        idle = self.config.idle_timeout
        if self.write_paused:
            return self.write_paused + min(idle, 600.0), "write_stalled"
        if self.mode in (Mode.WAIT, Mode.SENDING):
            return max(self.last_activity + idle, now + 1.0), ""
        stress = self.ctx.stress_timeout
        if self.state == State.NOT_AUTHENTICATED:
            # Before login a client has the SMTP command timeout, as POP3 and SMTP do.
            limit = min(idle, max(self.ctx.config.limits.command_timeout, 60.0))
            if self.ctx.stress and 0 < stress < limit:
                return self.last_activity + stress, "stress_timeout"
            return self.last_activity + limit, "idle_timeout"
        return self.last_activity + idle, "idle_timeout"

    def _check_timeout(self) -> None:
        self.timer = None
        transport = self.transport
        if transport is None:
            return
        now = time.monotonic()
        due, why = self._due(now)
        if self.mode == Mode.CLOSED:
            transport.abort()  # our last words were never read
            return
        if why and now >= due:
            log.info("imap session %s:%s cut off: %s", self.peer_ip, self.peer_port, why)
            self.outcome = why
            if why == "write_stalled":
                self.mode = Mode.CLOSED
                transport.abort()
                return
            self._stop_idle()
            self.out.append(untagged("BYE", "Autologout: idle for too long"))
            self.close_after_flush = True
            self._flush()
            self.timer = self.ctx.loop.call_later(10.0, self._check_timeout)
            return
        self.rearm_timer()

    # --- write side ------------------------------------------------------------------------

    def pause_writing(self) -> None:
        """The client is not reading: stop sending and reading commands."""
        self.write_paused = time.monotonic()
        if self.transport is not None and self.mode != Mode.WAIT:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """Output drained: go on with the FETCH under way, then with pipelined commands."""
        self.write_paused = 0.0
        self.last_activity = time.monotonic()
        if self.transport is None or self.mode in (Mode.WAIT, Mode.CLOSED):
            return
        if self.mode == Mode.SENDING:
            self._pump()
        if cast(Mode, self.mode) not in (Mode.SENDING, Mode.WAIT):  # the pump may be done
            self.transport.resume_reading()
            self._drain_input()
        self._flush()

    def shut_down(self, reply: bytes) -> None:
        """The server is going away: ``* BYE`` (IMAP's words, not SMTP's *reply*)."""
        self.outcome = "shutdown"
        self._stop_idle()
        self.out.append(untagged("BYE", "Server shutting down, try again later", "UNAVAILABLE"))
        self.close_after_flush = True
        self._flush()

    def close(self) -> None:
        """Close at once (shutdown, after the drain period)."""
        if self.transport is not None:
            self.transport.close()

    @property
    def idle(self) -> bool:
        """Waiting for the client: safe to close when draining (a commit or a FETCH under
        way is not)."""
        return self.mode in (Mode.COMMAND, Mode.IDLE, Mode.SASL)

    def _queue(self, data: bytes) -> None:
        self.out.append(data)
        self.out_size += len(data)
        if self.out_size >= FLUSH_BYTES:
            self._write_out()

    def _write_out(self) -> None:
        transport = self.transport
        if transport is None:
            self.out.clear()
        elif self.out:
            data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
            self.out.clear()
            if self.deflate is not None:
                data = self.deflate.compress(data) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
            transport.write(data)  # may call pause_writing at once
        self.out_size = 0

    def _flush(self) -> None:
        self._write_out()
        if self.close_after_flush and self.transport is not None:
            self.mode = Mode.CLOSED
            self._stop_idle()
            self.transport.close()

    # --- input -----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        if self.inflate is not None:
            self.inflate_tail += data
            self._inflate_more()
        else:
            self.reader.feed(data)
            self._process()
        self._flush()

    def _runnable(self) -> bool:
        return (
            self.mode in (Mode.COMMAND, Mode.IDLE, Mode.SASL)
            and not self.write_paused
            and not self.close_after_flush
        )

    def _inflate_more(self) -> None:
        """Decompress what the client sent (COMPRESS) a bounded piece at a time, only while
        commands are read: a small compressed input cannot fill the server's memory."""
        inflate = self.inflate
        while (self.inflate_tail or self.inflate_full) and self._runnable():
            try:
                plain = inflate.decompress(self.inflate_tail, CHUNK)
            except zlib.error as exc:
                log.info("imap session %s: bad compressed input: %s", self.peer_ip, exc)
                self.outcome = "bad_compression"
                self.out.append(untagged("BYE", "Bad compressed data"))
                self.close_after_flush = True
                return
            self.inflate_tail = inflate.unconsumed_tail
            self.inflate_full = len(plain) == CHUNK
            if plain:
                self.reader.feed(plain)
                self._process()
        if (self.inflate_tail or self.inflate_full) and self.transport is not None:
            self.transport.pause_reading()  # resumed when commands are read again

    def _process(self) -> None:
        """Handle what is buffered, as the mode says, until it needs more input or the
        session waits for something. The one loop over input: nothing calls it nested."""
        while not (self.write_paused or self.close_after_flush):
            mode = self.mode
            if mode == Mode.COMMAND:
                progressed = self._step()
            elif mode == Mode.IDLE:
                progressed = self._idle_input()
            elif mode == Mode.SASL:
                progressed = self._sasl_input()
            else:
                break
            if not progressed:
                break

    def _continue(self) -> None:
        """Back to reading commands after a wait: resume reading, run what was pipelined."""
        self.last_activity = time.monotonic()
        if self.transport is None or self.mode == Mode.CLOSED:
            return
        if not self.write_paused:
            self.transport.resume_reading()
        self._drain_input()
        self._flush()

    def _drain_input(self) -> None:
        """Handle what the client sent and is still buffered (compressed or not)."""
        # Commands already inflated into the reader come first: a pipelined batch is inflated
        # whole, and the inflater may have nothing left when the session comes back.
        self._process()
        if self.inflate is not None:
            self._inflate_more()

    def _step(self) -> bool:
        """Handle the next complete command (or reader event); False when there is none."""
        if self.grow_reader and self.reader.pending == 0:
            # After login the reader takes literals up to APPENDLIMIT (before: a password).
            self.grow_reader = False
            self.reader = CommandReader(self.config.max_command_line, self.config.max_literal)
        item = self.reader.next()
        if item is None:
            return False
        kind = type(item)
        if kind is Command:
            self._dispatch(cast(Command, item))
        elif kind is Continuation:
            self._queue(b"+ Ready for literal data\r\n")
            self._write_out()  # the client waits for it
        elif kind is TooLarge:
            too = cast(TooLarge, item)
            m.imap_commands["other"].inc()
            if self.state == State.NOT_AUTHENTICATED:
                self._bad(too.tag or b"*", "Literal too large before login")
            else:
                self._error(
                    tagged(
                        too.tag or b"*",
                        "NO",
                        f"Literal of {too.size} octets is over the limit of "
                        f"{self.config.max_literal}",
                        "TOOBIG",
                    ),
                    f"literal of {too.size} octets too big",
                )
        else:
            bad = cast(Bad, item)
            m.imap_commands["other"].inc()
            self._bad(bad.tag or b"*", bad.reason.capitalize())
        return True

    def _dispatch(self, command: Command) -> None:
        self.commands += 1
        name = command.name
        entry = _HANDLERS.get(name)
        counted = m.imap_commands.get(name.decode("ascii", "replace"))
        (counted if counted is not None else m.imap_commands["other"]).inc()
        tag = command.tag
        if entry is None:
            self._bad(tag, "Unknown command")
            return
        handler, needs = entry
        state = self.state
        if needs == _NOT_AUTH and state != State.NOT_AUTHENTICATED:
            self._bad(tag, "Already authenticated")
            return
        if needs >= _AUTH and state == State.NOT_AUTHENTICATED:
            self._bad(tag, "Log in first")
            return
        if needs == _SELECTED and state != State.SELECTED:
            self._bad(tag, "No mailbox selected")
            return
        try:
            handler(self, tag, command.args)
        except ArgumentError as exc:
            self._bad(tag, str(exc) or "Invalid arguments")
        except InvalidName as exc:
            self._no(tag, str(exc), "CANNOT")
        except Exception:
            log.exception("imap session %s: %s failed", self.peer_ip, name[:20].decode())
            self.out.append(tagged(tag, "NO", "Internal error, try again", "SERVERBUG"))

    def _bad(self, tag: bytes, text: str) -> None:
        self._error(tagged(tag, "BAD", text), text)

    def _error(self, reply: bytes, why: str) -> None:
        """A BAD (or NO for bad input); past limits.max_errors the session ends."""
        self.errors += 1
        log.info("imap session %s:%s: %s", self.peer_ip, self.peer_port, why[:200])
        self.out.append(reply)
        if self.errors > self.ctx.config.limits.max_errors:
            self.out.append(untagged("BYE", "Too many errors, closing connection"))
            self.outcome = "too_many_errors"
            self.close_after_flush = True

    def _no(self, tag: bytes, text: str, code: str = "") -> None:
        self.out.append(tagged(tag, "NO", text, code))

    def _ok(
        self, tag: bytes, text: str, code: str = "", expunge: bool = True, look: bool = True
    ) -> None:
        """The tagged OK, after the untagged updates the client is owed (and, when new
        messages came into the view, after claiming them as \\Recent: a group commit).
        *look* False: the command caught up with the store when it began; only what it
        held back is sent (see :meth:`_sync`)."""
        if self.state == State.SELECTED:
            self._sync(expunge, look)
            selected = self.selected
            if (
                selected is not None
                and selected.uids
                and selected.uids[-1] >= selected.claimed
                and self.mode == Mode.COMMAND
                and not self.close_after_flush
                and self.transport is not None
            ):
                self._claim_recent(tag, selected, tagged(tag, "OK", text, code))
                return
        self.out.append(tagged(tag, "OK", text, code))

    def _claim_recent(self, tag: bytes, selected: Selected, reply: bytes) -> None:
        """Claim the view's new messages as \\Recent, then send RECENT and *reply*."""
        assert self.user is not None

        def claimed(outcome: object) -> None:
            if isinstance(outcome, tuple) and outcome[1]:
                first, end = outcome
                if end > first:
                    selected.recent.append((first, end))
                selected.claimed = max(selected.claimed, end)
            else:  # the mailbox went (or is another one now): never again for this view
                selected.claimed = 1 << 62
            if self.selected is selected:
                self.out.append(b"* %d RECENT\r\n" % selected.recent_count())
            self.out.append(reply)

        operation = claim_recent(self.user, selected.name, selected.mailbox_id)
        self._commit(tag, operation, claimed)

    # --- waiting for work off the loop -----------------------------------------------------

    def _wait(self, tag: bytes, future: asyncio.Future[Any], then: Callable[[Any], None]) -> None:
        """Pause reading until *future* is done, then run *then* with its result and go on
        with the commands that were pipelined. A failure answers ``tag NO``."""
        self.mode = Mode.WAIT
        assert self.transport is not None
        self.transport.pause_reading()
        future.add_done_callback(lambda done: self._waited(tag, done, then))

    def _waited(self, tag: bytes, done: asyncio.Future[Any], then: Callable[[Any], None]) -> None:
        if self.transport is None or self.mode == Mode.CLOSED:
            return
        self.mode = Mode.COMMAND
        try:
            if done.cancelled():
                raise RuntimeError("cancelled")
            # The group committer hands an operation's refusal (NoSuchMailbox, OverQuota...)
            # over as the future's exception: the handlers tell them apart.
            error = done.exception()
            then(error if error is not None else done.result())
        except StorageFull as exc:
            log.error("imap session %s: %s", self.peer_ip, exc)
            self.mode = Mode.COMMAND
            self._no(tag, "Mail storage is full, try again later", "OVERQUOTA")
        except Exception as exc:
            log.error("imap session %s: command failed: %r", self.peer_ip, exc, exc_info=exc)
            self.mode = Mode.COMMAND
            self._no(tag, "Internal error, try again", "SERVERBUG")
        if self.mode == Mode.COMMAND:
            self._continue()
        else:
            self._flush()

    def _off_loop(self, tag: bytes, work: Callable[[], Any], then: Callable[[Any], None]) -> None:
        self._wait(tag, self.ctx.loop.run_in_executor(None, work), then)

    def _commit(self, tag: bytes, operation: Any, then: Callable[[Any], None]) -> None:
        self._wait(tag, self.ctx.mailbox_committer.submit_operation(operation), then)

    # --- any state -------------------------------------------------------------------------

    def _may_login(self) -> bool:
        """Passwords only under TLS, from trusted networks, or when imap.plaintext_auth."""
        return bool(self.tls) or self.trusted or self.config.plaintext_auth

    def _capabilities(self) -> str:
        caps = [
            "IMAP4rev1",
            "IMAP4rev2",
            "LITERAL+",
            "SASL-IR",
            "ID",
            "ENABLE",
            "IDLE",
            "NAMESPACE",
            "UNSELECT",
            "UIDPLUS",
            "MOVE",
            "SPECIAL-USE",
            "LIST-EXTENDED",
            "LIST-STATUS",
            "ESEARCH",
            "CONDSTORE",
            "QRESYNC",
            f"APPENDLIMIT={self.config.max_literal}",
            "QUOTA",
            "QUOTA=RES-STORAGE",
            "STATUS=SIZE",
            "SORT",
            "THREAD=ORDEREDSUBJECT",
            "THREAD=REFERENCES",
            "SEARCHRES",
            "CHILDREN",
            "MULTIAPPEND",
            "UTF8=ACCEPT",
            "BINARY",
        ]
        if self.state == State.NOT_AUTHENTICATED:
            if self.role == "imap" and not self.tls and self.ctx.tls_context is not None:
                caps.append("STARTTLS")
            caps.append("AUTH=PLAIN" if self._may_login() else "LOGINDISABLED")
        elif self.config.compress and self.deflate is None:
            caps.append("COMPRESS=DEFLATE")
        return " ".join(caps)

    def cmd_capability(self, tag: bytes, args: list[object]) -> None:
        if args:
            raise ArgumentError("CAPABILITY takes no arguments")
        self.out.append(b"* CAPABILITY " + self._capabilities().encode() + b"\r\n")
        self._ok(tag, "Capability completed")

    def cmd_noop(self, tag: bytes, args: list[object]) -> None:
        if args:
            raise ArgumentError(f"{'NOOP'} takes no arguments")
        self._ok(tag, "NOOP completed")

    def cmd_check(self, tag: bytes, args: list[object]) -> None:
        if args:
            raise ArgumentError("CHECK takes no arguments")
        self._ok(tag, "CHECK completed")

    def cmd_logout(self, tag: bytes, args: list[object]) -> None:
        self.outcome = "logout"
        self.out.append(untagged("BYE", "Logging out"))
        self.out.append(tagged(tag, "OK", "LOGOUT completed"))
        self.close_after_flush = True

    def cmd_id(self, tag: bytes, args: list[object]) -> None:
        if len(args) != 1 or not (args[0] == b"NIL" or isinstance(args[0], list)):
            raise ArgumentError("ID takes NIL or a list of fields")
        self.out.append(b'* ID ("name" "Tachymail" "vendor" "Tachymail")\r\n')
        self._ok(tag, "ID completed")

    # --- not authenticated -----------------------------------------------------------------

    def cmd_starttls(self, tag: bytes, args: list[object]) -> None:
        if args:
            raise ArgumentError("STARTTLS takes no arguments")
        if self.tls is not None:
            self._bad(tag, "TLS is already active")
            return
        if self.role != "imap" or self.ctx.tls_context is None:
            self._bad(tag, "STARTTLS not available")
            return
        self.out.append(tagged(tag, "OK", "Begin TLS negotiation now"))
        self._flush()
        self.mode = Mode.WAIT
        assert self.transport is not None
        self.transport.pause_reading()
        # CVE-2011-0411 / RFC 9051 §6.2.1: nothing pipelined behind STARTTLS may run inside
        # TLS: a new reader forgets it.
        if self.reader.pending:
            log.warning(
                "imap session %s: discarded %d bytes sent after STARTTLS",
                self.peer_ip,
                self.reader.pending,
            )
        self.reader = CommandReader(self.config.max_command_line, PREAUTH_LITERAL)
        self.ctx.loop.create_task(self._upgrade())

    async def _upgrade(self) -> None:
        transport = self.transport
        assert transport is not None and self.ctx.tls_context is not None
        who = f"imap session {self.peer_ip}"
        new = await tls_handshake(self.ctx.loop, transport, self, self.ctx.tls_context, log, who)
        if new is None:
            return
        self.transport = new
        self.tls = tls_description(new)
        self.mode = Mode.COMMAND
        self._continue()

    def cmd_login(self, tag: bytes, args: list[object]) -> None:
        if len(args) != 2:
            raise ArgumentError("LOGIN takes a user name and a password")
        name = _astring(args[0], "user name")
        password = _astring(args[1], "password")
        if not self._may_login():
            self._error(
                tagged(tag, "NO", "Plaintext authentication disallowed before STARTTLS",
                       "PRIVACYREQUIRED"),
                "LOGIN before TLS",
            )  # fmt: skip
            return
        self._login(tag, name.decode("utf-8", "replace"), password.decode("utf-8", "replace"))

    def cmd_authenticate(self, tag: bytes, args: list[object]) -> None:
        if not 1 <= len(args) <= 2 or not isinstance(args[0], bytes):
            raise ArgumentError("AUTHENTICATE takes a mechanism and an optional response")
        if args[0].upper() != b"PLAIN":
            self._no(tag, "Unsupported authentication mechanism", "CANNOT")
            return
        if not self._may_login():
            self._error(
                tagged(tag, "NO", "Plaintext authentication disallowed before STARTTLS",
                       "PRIVACYREQUIRED"),
                "AUTHENTICATE before TLS",
            )  # fmt: skip
            return
        if len(args) == 2:  # SASL-IR (RFC 4959)
            self._sasl_plain(tag, _astring(args[1], "initial response"))
            return
        self.out.append(b"+ \r\n")
        self.sasl_tag = tag
        self.mode = Mode.SASL

    def _sasl_input(self) -> bool:
        line = self.reader.next_line()
        if line is None:
            return False
        self.mode = Mode.COMMAND
        tag = self.sasl_tag
        if isinstance(line, Bad):
            self._bad(tag, "Authentication answer too long")
        elif line.strip() == b"*":
            self._bad(tag, "Authentication cancelled")  # RFC 9051 §6.2.2
        else:
            self._sasl_plain(tag, line.strip())
        return True

    def _sasl_plain(self, tag: bytes, response: bytes) -> None:
        """RFC 4616 PLAIN: authzid NUL authcid NUL password, base64 (``=``: empty)."""
        try:
            decoded = b"" if response == b"=" else base64.b64decode(response, validate=True)
        except (binascii.Error, ValueError):
            self._bad(tag, "Invalid base64 in the authentication answer")
            return
        parts = decoded.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            self._bad(tag, "Malformed PLAIN answer")
            return
        authzid, authcid, password = parts
        if authzid and authzid.lower() != authcid.lower():
            self._no(tag, "Logging in as another user is not supported", "AUTHORIZATIONFAILED")
            return
        self._login(tag, authcid.decode("utf-8", "replace"), password.decode("utf-8", "replace"))

    def _login(self, tag: bytes, name: str, password: str) -> None:
        """Check the password off the loop (through the cross-worker AuthThrottle); the
        reply comes from :meth:`_login_done`."""
        ctx = self.ctx
        user = name.strip().lower()
        _, at, domain = user.rpartition("@")
        # Only users of a local domain have mailboxes; others fail like a wrong password.
        local = bool(at) and domain in ctx.local_domains
        users, ip, store = ctx.users, self.peer_ip, ctx.mailbox

        def work() -> tuple[Verdict, bool]:
            verdict = ctx.auth_throttle.attempt(
                ip, user, lambda: users.check(user, password) and local
            )
            known = verdict.ok and store.mailbox(user, "INBOX") is not None
            return verdict, known

        self.mode = Mode.WAIT
        assert self.transport is not None
        self.transport.pause_reading()
        job = ctx.loop.run_in_executor(None, work)
        job.add_done_callback(lambda done: self._login_done(tag, user, done))

    def _login_done(self, tag: bytes, user: str, done: asyncio.Future[Any]) -> None:
        if self.transport is None:
            return
        if done.cancelled() or done.exception() is not None:
            log.error("imap session %s: login check failed: %s", self.peer_ip, done.exception())
            self.mode = Mode.COMMAND
            self._no(tag, "Login temporarily unavailable", "UNAVAILABLE")
            self._continue()
            return
        verdict, known = done.result()
        shown = user[:100]  # the name came from the client
        if verdict.ok:
            limit = self.config.max_sessions_per_user
            if limit and _user_sessions[user] >= limit:
                m.imap_logins["limit"].inc()
                log.warning("imap session %s: %s has too many sessions", self.peer_ip, shown)
                self.mode = Mode.COMMAND
                self._no(tag, "Too many sessions for this user", "LIMIT")
                self._continue()
                return
            m.imap_logins["success"].inc()
            _user_sessions[user] += 1
            self.counted_user = user
            self.user = user
            self.state = State.AUTHENTICATED
            self.grow_reader = True
            log.info("imap session %s: %s logged in", self.peer_ip, user)
            if known:
                self.mode = Mode.COMMAND
                self._logged_in(tag)
                self._continue()
            else:  # the first login makes the default mailboxes (SPECIAL-USE ones too)
                self._commit(tag, create_user(user), lambda _: self._logged_in(tag))
            return
        auth = self.ctx.config.auth
        self.auth_failures += 1
        if verdict.lockout is not None:
            m.imap_logins["locked_out"].inc()
            m.auth_locked_attempts.inc()
            log_locked_out(log, f"imap session {self.peer_ip}", "login", shown, verdict.lockout)
            reply = tagged(tag, "NO", "Too many failed logins, try again later", "UNAVAILABLE")
            self.ctx.loop.call_later(auth.failure_delay, self._login_failed, reply)
            return
        m.imap_logins["failure"].inc()
        log.warning("imap session %s: login failed for %r", self.peer_ip, shown)
        delay = tarpit_delay(verdict, auth, self.peer_ip, shown, log)
        reply = tagged(tag, "NO", "Authentication failed", "AUTHENTICATIONFAILED")
        self.ctx.loop.call_later(delay, self._login_failed, reply)

    def _logged_in(self, tag: bytes) -> None:
        self.out.append(tagged(tag, "OK", "Logged in", "CAPABILITY " + self._capabilities()))

    def _login_failed(self, reply: bytes) -> None:
        if self.transport is None:
            return
        self.mode = Mode.COMMAND
        self.out.append(reply)
        if self.auth_failures >= self.ctx.config.auth.max_failures:
            self.out.append(untagged("BYE", "Too many failed logins, closing connection"))
            self.outcome = "auth_failures"
            self.close_after_flush = True
            self._flush()
            return
        self._continue()

    # --- authenticated ---------------------------------------------------------------------

    def _enable_condstore(self) -> None:
        """A CONDSTORE-enabling command (RFC 7162 §3.1): from now on FETCH responses carry
        MODSEQ; with a mailbox selected the client learns its HIGHESTMODSEQ at once."""
        if self.condstore:
            return
        self.condstore = True
        if self.selected is not None:
            self.out.append(untagged("OK", "Highest", f"HIGHESTMODSEQ {self.selected.modseq}"))

    @property
    def utf8(self) -> bool:
        """Mailbox names and strings in UTF-8 (IMAP4rev2 or UTF8=ACCEPT enabled)."""
        return "IMAP4REV2" in self.enabled or "UTF8=ACCEPT" in self.enabled

    @property
    def rev2(self) -> bool:
        return "IMAP4REV2" in self.enabled

    @property
    def qresync(self) -> bool:
        return "QRESYNC" in self.enabled

    def _name(self, token: object) -> str:
        raw = _astring(token, "mailbox name")
        try:
            return decode_name(raw, self.utf8)
        except ValueError as exc:
            raise InvalidName(f"Invalid mailbox name: {exc}") from exc

    def cmd_enable(self, tag: bytes, args: list[object]) -> None:
        if not args:
            raise ArgumentError("ENABLE needs a capability")
        newly: list[str] = []
        for token in args:
            if not isinstance(token, bytes) or isinstance(token, String):
                raise ArgumentError("ENABLE takes atoms")
            name = token.decode("ascii", "replace").upper()
            names = [name]
            if name == "QRESYNC":
                names = ["CONDSTORE", "QRESYNC"]  # RFC 7162 §3.2.3: QRESYNC implies CONDSTORE
            for one in names:
                if one in _ENABLE and one not in self.enabled:
                    self.enabled.add(one)
                    newly.append("IMAP4rev2" if one == "IMAP4REV2" else one)
        if "CONDSTORE" in self.enabled:
            self.condstore = True
        self.out.append(("* ENABLED " + " ".join(newly)).rstrip().encode() + b"\r\n")
        self._ok(tag, "ENABLE completed")

    def cmd_namespace(self, tag: bytes, args: list[object]) -> None:
        if args:
            raise ArgumentError("NAMESPACE takes no arguments")
        self.out.append(b'* NAMESPACE (("" "/")) NIL NIL\r\n')
        self._ok(tag, "NAMESPACE completed")

    def cmd_compress(self, tag: bytes, args: list[object]) -> None:
        if len(args) != 1 or not isinstance(args[0], bytes) or args[0].upper() != b"DEFLATE":
            raise ArgumentError("COMPRESS takes DEFLATE")
        if not self.config.compress:
            self._no(tag, "Compression is not offered", "CANNOT")
            return
        if self.deflate is not None:
            self._no(tag, "Compression is already active", "COMPRESSIONACTIVE")
            return
        self._ok(tag, "DEFLATE active")
        self._write_out()  # the OK itself goes out uncompressed (RFC 4978 §3)
        self.deflate = zlib.compressobj(6, zlib.DEFLATED, -15, 8)
        self.inflate = zlib.decompressobj(-15)
        log.info("imap session %s: COMPRESS DEFLATE active", self.peer_ip)
        # Anything the client sent after COMPRESS is compressed: it must wait for the OK.

    # --- mailboxes ---------------------------------------------------------------------

    def cmd_create(self, tag: bytes, args: list[object]) -> None:
        if len(args) != 1:  # CREATE-SPECIAL-USE's (USE (...)) is not offered
            raise ArgumentError("CREATE takes a mailbox name")
        name = self._name(args[0])
        if name == "INBOX":
            self._no(tag, "INBOX already exists", "ALREADYEXISTS")
            return
        assert self.user is not None

        def created(outcome: object) -> None:
            if isinstance(outcome, MailboxExists):
                self._no(tag, "Mailbox already exists", "ALREADYEXISTS")
            elif isinstance(outcome, InvalidMailboxName):
                self._no(tag, "Invalid mailbox name", "CANNOT")
            elif isinstance(outcome, Exception):
                raise outcome
            else:
                self._ok(tag, "CREATE completed")

        # RFC 3501 §6.3.3: CREATE does not subscribe (the store subscribes what it makes
        # itself, the default mailboxes); a subscription kept for the name stays
        self._commit(tag, create_mailbox(self.user, name, subscribed=False), created)

    def cmd_delete(self, tag: bytes, args: list[object]) -> None:
        if len(args) != 1:
            raise ArgumentError("DELETE takes a mailbox name")
        name = self._name(args[0])
        if name == "INBOX":
            self._no(tag, "INBOX cannot be deleted", "CANNOT")
            return
        assert self.user is not None

        def deleted(outcome: object) -> None:
            if isinstance(outcome, NoSuchMailbox):
                self._no(tag, "No such mailbox", "NONEXISTENT")
            elif isinstance(outcome, InvalidMailboxName):
                self._no(tag, "Cannot delete that mailbox", "CANNOT")
            elif isinstance(outcome, Exception):
                raise outcome
            else:
                if self.selected is not None and self.selected.name == name:
                    self._unselect()
                self._ok(tag, "DELETE completed")

        self._commit(tag, delete_mailbox(self.user, name), deleted)

    def cmd_rename(self, tag: bytes, args: list[object]) -> None:
        if len(args) != 2:
            raise ArgumentError("RENAME takes two mailbox names")
        old, new = self._name(args[0]), self._name(args[1])
        assert self.user is not None

        def renamed(outcome: object) -> None:
            if isinstance(outcome, NoSuchMailbox):
                self._no(tag, "No such mailbox", "NONEXISTENT")
            elif isinstance(outcome, MailboxExists):
                self._no(tag, "Target mailbox already exists", "ALREADYEXISTS")
            elif isinstance(outcome, InvalidMailboxName):
                self._no(tag, "Cannot rename to that name", "CANNOT")
            elif isinstance(outcome, Exception):
                raise outcome
            else:
                selected = self.selected
                if selected is not None:
                    if selected.name == old and old != "INBOX":
                        selected.name = new
                    elif selected.name.startswith(old + "/") and old != "INBOX":
                        selected.name = new + selected.name[len(old) :]
                    elif old == "INBOX" and selected.name == "INBOX":
                        self._unselect()  # INBOX's messages moved away: a new empty INBOX
                self._ok(tag, "RENAME completed")

        self._commit(tag, rename_mailbox(self.user, old, new), renamed)

    def cmd_subscribe(self, tag: bytes, args: list[object], on: bool = True) -> None:
        if len(args) != 1:
            raise ArgumentError("(UN)SUBSCRIBE takes a mailbox name")
        name = self._name(args[0])
        assert self.user is not None

        def done(outcome: object) -> None:
            if isinstance(outcome, NoSuchMailbox):
                self._no(tag, "No such mailbox", "NONEXISTENT")
            elif isinstance(outcome, Exception):
                raise outcome
            else:
                self._ok(tag, "SUBSCRIBE completed" if on else "UNSUBSCRIBE completed")

        self._commit(tag, subscribe(self.user, name, on), done)

    def cmd_unsubscribe(self, tag: bytes, args: list[object]) -> None:
        self.cmd_subscribe(tag, args, on=False)

    def cmd_list(self, tag: bytes, args: list[object], lsub: bool = False) -> None:
        try:
            query = parse_list(args, lsub=lsub, decode=lambda raw: decode_pattern(raw, self.utf8))
        except ListError as exc:
            raise ArgumentError(str(exc)) from exc
        assert self.user is not None
        store = self.ctx.mailbox
        mailboxes = store.mailboxes(self.user)
        orphans = store.subscriptions(self.user)
        lines = list_responses(query, mailboxes, utf8=self.utf8, rev2=self.rev2, orphans=orphans)
        for line, info in lines:
            self.out.append(line)
            if query.status and info is not None:
                deleted = self._deleted_count(info) if b"DELETED" in query.status else 0
                recent = self._recent_count(info) if b"RECENT" in query.status else 0
                self.out.append(
                    status_response(
                        info.name, info, query.status, deleted, utf8=self.utf8, recent=recent
                    )
                )
        self._ok(tag, "LSUB completed" if lsub else "LIST completed")

    def cmd_lsub(self, tag: bytes, args: list[object]) -> None:
        self.cmd_list(tag, args, lsub=True)

    def _deleted_count(self, info: MailboxInfo) -> int:
        return sum(
            1 for message in self.ctx.mailbox.messages(info.user, info.name)
            if DELETED in message.flags
        )  # fmt: skip

    def cmd_status(self, tag: bytes, args: list[object]) -> None:
        if len(args) != 2 or not isinstance(args[1], list) or not args[1]:
            raise ArgumentError("STATUS takes a mailbox name and a list of items")
        name = self._name(args[0])
        items: list[bytes] = []
        for token in args[1]:
            if not isinstance(token, bytes) or token.upper() not in STATUS_ITEMS:
                raise ArgumentError("Unknown STATUS item")
            items.append(bytes(token).upper())
        assert self.user is not None
        info = self.ctx.mailbox.mailbox(self.user, name)
        if info is None:
            self._no(tag, "No such mailbox", "NONEXISTENT")
            return
        deleted = self._deleted_count(info) if b"DELETED" in items else 0
        recent = self._recent_count(info) if b"RECENT" in items else 0
        self.out.append(
            status_response(info.name, info, items, deleted, utf8=self.utf8, recent=recent)
        )
        self._ok(tag, "STATUS completed")

    def _recent_count(self, info: MailboxInfo) -> int:
        """STATUS RECENT: the selected mailbox's RECENT, else the unclaimed messages (0
        under IMAP4rev2, which has no \\Recent)."""
        if self.rev2:
            return 0
        selected = self.selected
        if selected is not None and selected.mailbox_id == info.id:
            return selected.recent_count()
        return self.ctx.mailbox.recent_count(info.user, info.name)

    def _quota(self) -> tuple[int, int]:
        """(used bytes, quota bytes) of the user; quota 0: none."""
        assert self.user is not None
        return self.ctx.mailbox.usage(self.user)[0], self.ctx.directory.quota(self.user)

    def _quota_line(self) -> bytes | None:
        used, quota = self._quota()
        if not quota:
            return None
        # RFC 9208 §5.1: STORAGE in units of 1024 octets
        return b'* QUOTA "" (STORAGE %d %d)\r\n' % ((used + 1023) // 1024, quota // 1024)

    def cmd_getquotaroot(self, tag: bytes, args: list[object]) -> None:
        if len(args) != 1:
            raise ArgumentError("GETQUOTAROOT takes a mailbox name")
        name = self._name(args[0])
        assert self.user is not None
        if self.ctx.mailbox.mailbox(self.user, name) is None:
            self._no(tag, "No such mailbox", "NONEXISTENT")
            return
        line = self._quota_line()
        wire = encode_name(name, self.utf8)
        self.out.append(b"* QUOTAROOT %s%s\r\n" % (wire, b' ""' if line else b""))
        if line:
            self.out.append(line)
        self._ok(tag, "GETQUOTAROOT completed")

    def cmd_getquota(self, tag: bytes, args: list[object]) -> None:
        if len(args) != 1 or not isinstance(args[0], bytes):
            raise ArgumentError("GETQUOTA takes a quota root")
        line = self._quota_line()
        if args[0] != b"" or line is None:
            self._no(tag, "No such quota root", "NONEXISTENT")
            return
        self.out.append(line)
        self._ok(tag, "GETQUOTA completed")

    def cmd_setquota(self, tag: bytes, args: list[object]) -> None:
        self._no(tag, "Quotas are set by the administrator", "NOPERM")

    # --- APPEND ------------------------------------------------------------------------

    def cmd_append(self, tag: bytes, args: list[object]) -> None:
        if len(args) < 2:
            raise ArgumentError("APPEND takes a mailbox name and a message")
        name = self._name(args[0])
        # flags, INTERNALDATE, the message, whether it came as a literal8 (BINARY)
        messages: list[tuple[list[str], float | None, bytes, bool]] = []
        rest = args[1:]
        i = 0
        while i < len(rest):
            flags: list[str] = []
            when: float | None = None
            if isinstance(rest[i], list):
                flags = parse_flags(cast(list[object], rest[i]))
                i += 1
            if (
                i + 1 < len(rest)
                and isinstance(rest[i], String)
                and isinstance(rest[i + 1], String)
            ):
                candidate = cast(bytes, rest[i])
                try:
                    when = parse_date_time(candidate)
                    i += 1
                except ValueError:
                    # Two strings in a row: a date-time and the message, or (MULTIAPPEND)
                    # two messages; a short one-line string can only be a bad date.
                    if len(candidate) < 64 and b"\n" not in candidate:
                        raise ArgumentError("Invalid date-time") from None
            token = rest[i] if i < len(rest) else None
            if (
                type(token) is bytes
                and token.upper() == b"UTF8"
                and i + 1 < len(rest)
                and isinstance(rest[i + 1], list)
                and len(cast(list[object], rest[i + 1])) == 1
            ):
                # RFC 6855 §4: APPEND mailbox UTF8 (~{n} message) after ENABLE UTF8=ACCEPT
                i += 1
                token = cast(list[object], rest[i])[0]
            if not isinstance(token, String):
                raise ArgumentError("APPEND expects a message literal")
            content = bytes(token)
            i += 1
            if not content:
                raise ArgumentError("Empty message")
            messages.append((flags, when, content, isinstance(token, Binary)))
        assert self.user is not None
        user = self.user
        quota = self.ctx.directory.quota(user)

        def prepare() -> list[Any] | InvalidMailboxName:
            try:
                # RFC 3516 §4.4: binary parts are stored base64-encoded (see imap.binary)
                return [
                    prepare_delivery(
                        user, encode_binary_parts(content) if binary else content,
                        mailbox=name, flags=flags, internaldate=when, quota=quota,
                        create=False,
                    )
                    for flags, when, content, binary in messages
                ]  # fmt: skip
            except InvalidMailboxName as exc:
                return exc

        def prepared(deliveries: list[Any] | InvalidMailboxName) -> None:
            if isinstance(deliveries, InvalidMailboxName):
                self._no(tag, "Invalid mailbox name", "CANNOT")
                return
            futures = [
                self.ctx.mailbox_committer.submit_operation(deliver(one)) for one in deliveries
            ]
            self._wait(tag, asyncio.gather(*futures, return_exceptions=True), appended)

        def appended(outcomes: list[object]) -> None:
            for outcome in outcomes:
                if isinstance(outcome, NoSuchMailbox):
                    self._no(tag, "No such mailbox", "TRYCREATE")
                    return
                if isinstance(outcome, OverQuota):
                    self._no(tag, "Quota exceeded", "OVERQUOTA")
                    return
                if isinstance(outcome, Exception):
                    raise outcome
            done = [cast(Delivered, outcome) for outcome in outcomes]
            uids = number_list(d.uid for d in done)
            code = f"APPENDUID {done[0].uidvalidity} {uids.decode()}"
            self._ok(tag, "APPEND completed", code)

        if not name:
            raise ArgumentError("Empty mailbox name")
        self._off_loop(tag, prepare, prepared)

    # --- IDLE --------------------------------------------------------------------------

    def cmd_idle(self, tag: bytes, args: list[object]) -> None:
        if args:
            raise ArgumentError("IDLE takes no arguments")
        self.mode = Mode.IDLE
        self.idle_tag = tag
        self.out.append(b"+ idling\r\n")
        if self.state == State.SELECTED:
            self._sync(True)
        assert self.user is not None
        # Woken within milliseconds of a commit in any process of the node (delivery, other
        # sessions); the slow poll only covers a notification lost to a full socket.
        self.idle_stop = self.ctx.mailbox_notifier.subscribe(self.user, self._idle_wake)
        self.idle_poll = self.ctx.loop.call_later(IDLE_POLL, self._idle_tick)

    def _idle_wake(self) -> None:
        if self.mode != Mode.IDLE or self.transport is None:
            return
        if self.state == State.SELECTED:
            try:
                self._sync(True)
            except Exception:
                log.exception("imap session %s: IDLE update failed", self.peer_ip)
        self._flush()

    def _idle_tick(self) -> None:
        self.idle_poll = None
        if self.mode != Mode.IDLE:
            return
        self._idle_wake()
        if self.mode == Mode.IDLE:
            self.idle_poll = self.ctx.loop.call_later(IDLE_POLL, self._idle_tick)

    def _stop_idle(self) -> None:
        if self.idle_stop is not None:
            self.idle_stop()
            self.idle_stop = None
        if self.idle_poll is not None:
            self.idle_poll.cancel()
            self.idle_poll = None

    def _idle_input(self) -> bool:
        line = self.reader.next_line()
        if line is None:
            return False
        self._stop_idle()
        self.mode = Mode.COMMAND
        tag = self.idle_tag
        if isinstance(line, Bad) or line.strip().upper() != b"DONE":
            self._bad(tag, "Expected DONE")
        else:
            self._ok(tag, "IDLE terminated")
        return True

    # --- SELECT / EXAMINE --------------------------------------------------------------

    def cmd_select(self, tag: bytes, args: list[object], readonly: bool = False) -> None:
        if not args or len(args) > 2:
            raise ArgumentError("SELECT takes a mailbox name and optional parameters")
        name = self._name(args[0])
        qresync: tuple[int, int, list[tuple[int, int]] | None] | None = None
        if len(args) == 2:
            params = args[1]
            if not isinstance(params, list) or not params:
                raise ArgumentError("bad SELECT parameters")
            j = 0
            while j < len(params):
                param = params[j]
                word = param.upper() if isinstance(param, bytes) else b""
                if word == b"CONDSTORE":
                    self.condstore = True
                    j += 1
                elif word == b"QRESYNC" and j + 1 < len(params):
                    if not self.qresync:
                        raise ArgumentError("QRESYNC is not enabled")
                    qresync = self._qresync_param(params[j + 1])
                    j += 2
                else:
                    raise ArgumentError("unknown SELECT parameter")
        if self.selected is not None:
            self._unselect()
            if self.qresync or self.rev2:
                self.out.append(untagged("OK", "Previous mailbox closed", "CLOSED"))
        assert self.user is not None
        user, store = self.user, self.ctx.mailbox

        rev1 = not self.rev2
        cache = self._index_cache()
        info = store.mailbox(user, name)
        if info is None:
            self._no(tag, "No such mailbox", "NONEXISTENT")
            return
        entry = cache.entry(user, name, info)
        if entry is not None:  # the process has the mailbox's columns as they are now
            self._open(tag, name, readonly, qresync, entry, rev1)
            return

        def loaded(entry: CacheEntry | None) -> None:
            if entry is None:
                self._no(tag, "No such mailbox", "NONEXISTENT")
            else:
                self._open(tag, name, readonly, qresync, entry, rev1)

        # Read off the loop: a first read of a big mailbox takes a while (one read for
        # every session of this process that selects it meanwhile).
        self._wait(tag, cache.load_later(self.ctx.loop, user, name), loaded)

    def _index_cache(self) -> IndexCache:
        config = self.config
        return caches_for(
            self.ctx.mailbox, config.index_cache_messages, config.rendered_cache_mb * 1024 * 1024
        )[0]

    def _rendered_cache(self) -> RenderedCache:
        config = self.config
        return caches_for(
            self.ctx.mailbox, config.index_cache_messages, config.rendered_cache_mb * 1024 * 1024
        )[1]

    def _open(
        self,
        tag: bytes,
        name: str,
        readonly: bool,
        qresync: tuple[int, int, list[tuple[int, int]] | None] | None,
        entry: CacheEntry,
        rev1: bool,
    ) -> None:
        """SELECT / EXAMINE of the mailbox whose current columns are *entry*: claim its
        new messages as \\Recent (IMAP4rev1 SELECT), then answer."""
        assert self.user is not None
        user, store, info = self.user, self.ctx.mailbox, entry.info
        vanished: list[int] = []
        if qresync is not None and qresync[0] == info.uidvalidity:
            vanished = store.expunged_since(user, name, qresync[1])
        first_recent = store.first_recent(info.id) if rev1 else 0
        found = _Opened(entry, vanished, first_recent)
        if not rev1:
            self._selected(tag, name, readonly, qresync, found, [], 1 << 62)
        elif readonly:  # EXAMINE shows what is recent and claims nothing
            recent = [(found.first_recent, info.uidnext)]
            self._selected(tag, name, readonly, qresync, found, recent, 1 << 62)
        elif found.first_recent >= info.uidnext:
            self._selected(tag, name, readonly, qresync, found, [], info.uidnext)
        else:

            def claimed(outcome: object) -> None:
                if isinstance(outcome, tuple) and outcome[1]:
                    first, end = outcome
                    recent = [(first, end)] if end > first else []
                    self._selected(tag, name, readonly, qresync, found, recent, end)
                elif isinstance(outcome, NoSuchMailbox | tuple):
                    self._no(tag, "No such mailbox", "NONEXISTENT")  # deleted meanwhile
                elif isinstance(outcome, Exception):
                    raise outcome

            self._commit(tag, claim_recent(user, name, info.id), claimed)

    def cmd_examine(self, tag: bytes, args: list[object]) -> None:
        self.cmd_select(tag, args, readonly=True)

    def _qresync_param(self, token: object) -> tuple[int, int, list[tuple[int, int]] | None]:
        if not isinstance(token, list) or len(token) < 2:
            raise ArgumentError("QRESYNC takes (uidvalidity modseq [known-uids])")
        uidvalidity = _number(token[0], "uidvalidity")
        modseq = _number(token[1], "modseq")
        known: list[tuple[int, int]] | None = None
        if len(token) >= 3 and isinstance(token[2], bytes):
            try:
                known = parse_sequence_set(bytes(token[2]))
            except ValueError as exc:
                raise ArgumentError("bad known-uids") from exc
        return uidvalidity, modseq, known

    def _selected(
        self,
        tag: bytes,
        name: str,
        readonly: bool,
        qresync: tuple[int, int, list[tuple[int, int]] | None] | None,
        found: _Opened,
        recent: list[tuple[int, int]],
        claimed: int,
    ) -> None:
        entry, vanished = found.entry, found.vanished
        info = entry.info
        messages = entry.view()
        selected = Selected(
            name=info.name,
            readonly=readonly,
            uidvalidity=info.uidvalidity,
            messages=messages,
            modseq=info.highestmodseq,
            exists=len(messages),
            mailbox_id=info.id,
            recent=recent,
            claimed=claimed,
        )
        self.selected = selected
        self.state = State.SELECTED
        self.saved = []
        first_unseen = entry.first_unseen()
        flags = format_flags([*SYSTEM_FLAGS, *sorted(entry.keywords())])
        out = self.out
        out.append(b"* FLAGS " + flags + b"\r\n")
        if readonly:
            out.append(untagged("OK", "No permanent flags permitted", "PERMANENTFLAGS ()"))
        else:
            permanent = flags[:-1] + b" \\*)"
            out.append(b"* OK [PERMANENTFLAGS " + permanent + b"] Flags permitted\r\n")
        out.append(b"* %d EXISTS\r\n" % len(messages))
        if not self.rev2:
            out.append(b"* %d RECENT\r\n" % selected.recent_count())
            if first_unseen:
                out.append(untagged("OK", "First unseen", f"UNSEEN {first_unseen}"))
        out.append(untagged("OK", "UIDs valid", f"UIDVALIDITY {info.uidvalidity}"))
        out.append(untagged("OK", "Predicted next UID", f"UIDNEXT {info.uidnext}"))
        out.append(untagged("OK", "Highest", f"HIGHESTMODSEQ {info.highestmodseq}"))
        if self.rev2:
            attrs = "\\HasNoChildren" + (f" {info.special_use}" if info.special_use else "")
            out.append(b'* LIST (%s) "/" %s\r\n' % (attrs.encode(), encode_name(name, True)))
        if qresync is not None and qresync[0] == info.uidvalidity:
            known = qresync[2]
            gone = vanished
            if known is not None:
                gone = [uid for uid in gone if _in_set(uid, known)]
            if gone:
                out.append(b"* VANISHED (EARLIER) %s\r\n" % number_list(gone))
            since = qresync[1]
            for index, modseq in enumerate(messages.modseqs):
                if modseq > since:
                    out.append(self._flags_line(index + 1, messages[index], uid=True))
        self.out.append(
            tagged(
                tag,
                "OK",
                "EXAMINE completed" if readonly else "SELECT completed",
                "READ-ONLY" if readonly else "READ-WRITE",
            )
        )

    def _unselect(self) -> None:
        self.selected = None
        self.saved = []
        self.state = State.AUTHENTICATED

    def cmd_unselect(self, tag: bytes, args: list[object]) -> None:
        if args:
            raise ArgumentError("UNSELECT takes no arguments")
        self._unselect()
        self.out.append(tagged(tag, "OK", "UNSELECT completed"))

    def cmd_close(self, tag: bytes, args: list[object]) -> None:
        if args:
            raise ArgumentError("CLOSE takes no arguments")
        selected = self.selected
        assert selected is not None and self.user is not None
        self._sync(False)  # \Deleted set by others counts too; CLOSE sends no EXPUNGE
        doomed = selected.messages.deleted_uids()
        self._unselect()
        if selected.readonly or not doomed:
            self.out.append(tagged(tag, "OK", "CLOSE completed"))
            return
        self._commit(
            tag,
            expunge(self.user, selected.name, doomed),
            lambda _: self.out.append(tagged(tag, "OK", "CLOSE completed")),
        )

    # --- the selected mailbox's view -------------------------------------------------------

    def _flags_line(
        self, seq: int, message: MessageInfo, *, uid: bool, modseq: bool | None = None
    ) -> bytes:
        flags = message.flags
        selected = self.selected
        if selected is not None and selected.recent and selected.is_recent(message.uid):
            flags = flags | _RECENT
        parts = [b"FLAGS " + format_flags(flags)]
        if uid:
            parts.insert(0, b"UID %d" % message.uid)
        if self.condstore if modseq is None else modseq:
            parts.append(b"MODSEQ (%d)" % message.modseq)
        return b"* %d FETCH (%s)\r\n" % (seq, b" ".join(parts))

    def _sync(self, expunge: bool, look: bool = True) -> None:
        """Send the untagged updates owed for the selected mailbox: what others (and our
        own writes) changed since the view's modseq. *expunge*: EXPUNGE may be sent.
        *look* False: the command caught the view up when it began (:meth:`_catch_up`), so
        the store is not read again; only the expunges it held back are sent (if allowed)."""
        if look:
            updates = self._catch_up(expunge)
            if updates:
                self._announce(updates)
            return
        selected = self.selected
        if selected is None:
            return
        if expunge and selected.pending_expunge:
            self._send_expunged(selected, selected.pending_expunge)
            selected.pending_expunge = set()
        if len(selected.messages) != selected.exists:
            selected.exists = len(selected.messages)
            self.out.append(b"* %d EXISTS\r\n" % selected.exists)

    def _catch_up(self, expunge: bool = False) -> list[int] | None:
        """Bring the view to the store's state now (one read of the mailbox's record when
        nothing changed): new messages join it (with EXISTS), flags and modseqs are the
        store's, expunges wait in ``pending_expunge`` unless *expunge* (RFC 9051 §7.5.1:
        then they are sent first). Returns the UIDs whose flags the client has not been told
        (:meth:`_announce` them, or answer them in the command's own FETCH responses); None
        when the mailbox is gone (a BYE is queued and the session ends)."""
        selected = self.selected
        if selected is None or self.user is None:
            return []
        store = self.ctx.mailbox
        info = store.mailbox(self.user, selected.name)
        if info is None or info.uidvalidity != selected.uidvalidity:
            self.out.append(untagged("BYE", "The selected mailbox was deleted or renamed"))
            self.outcome = "mailbox_gone"
            self.close_after_flush = True
            return None
        changed: list[MessageInfo] = []
        if info.highestmodseq != selected.modseq:
            found = self._changes(selected, info)
            if found is None:  # the process's columns cannot tell: ask the store
                changed = store.changed_since(self.user, selected.name, selected.modseq)
                gone = store.expunged_since(self.user, selected.name, selected.modseq)
                selected.modseq = info.highestmodseq  # read first: a change in between comes again
            else:
                selected.modseq, changed, gone = found
            selected.pending_expunge.update(gone)
        if expunge and selected.pending_expunge:
            self._send_expunged(selected, selected.pending_expunge)
            selected.pending_expunge = set()
        messages = selected.messages
        updates: list[int] = []
        if changed:
            last = messages.uids[-1] if messages.uids else 0
            for message in changed:
                if message.uid > last:
                    if message.uid not in selected.pending_expunge:
                        messages.append(message)
                        last = message.uid
                    continue
                index = messages.find(message.uid)
                if index is None:
                    continue
                old = messages[index]
                if old.flags != message.flags or (self.condstore and old.modseq != message.modseq):
                    updates.append(message.uid)
                    messages.put(index, message)
                elif old.modseq != message.modseq:
                    messages.put(index, message)
        if len(messages) != selected.exists:
            selected.exists = len(messages)
            self.out.append(b"* %d EXISTS\r\n" % selected.exists)
        return updates

    def _announce(self, uids: Iterable[int]) -> None:
        """Untagged FETCH (FLAGS) of the messages *uids* as the view has them now."""
        selected = self.selected
        if selected is None:
            return
        messages = selected.messages
        for uid in uids:
            index = messages.find(uid)
            if index is not None:
                self.out.append(self._flags_line(index + 1, messages[index], uid=self.qresync))

    def _reads_flags(self, tag: bytes, uid: bool) -> bool:
        """Before a command that answers from the view's flags (STORE, SEARCH, SORT,
        THREAD): catch the view up and announce what changed, so that the command sees what
        the store has now, whoever changed it (RFC 9051 §5.2); a UID command may send the
        EXPUNGEs held back first (§7.5.1). False when the mailbox is gone (answered: BYE,
        then ``tag NO``)."""
        updates = self._catch_up(expunge=uid)
        if updates is None:
            self._no(tag, "The mailbox is gone", "NONEXISTENT")
            return False
        if updates:
            self._announce(updates)
        return True

    def _changes(
        self, selected: Selected, info: MailboxInfo
    ) -> tuple[int, list[MessageInfo], list[int]] | None:
        """(modseq now, messages changed above the view's modseq, UIDs expunged above it)
        from the process's shared columns, brought up to date first; None when they cannot
        tell (not cached, or their log does not reach back to the view's modseq)."""
        assert self.user is not None
        cache = self._index_cache()
        entry = cache.cached(self.user, selected.name)
        if entry is None or entry.info.id != info.id:
            return None
        if entry.modseq != info.highestmodseq:
            entry = cache.refresh(self.user, selected.name)
            if entry is None or entry.info.id != info.id:
                return None
        found = entry.changes_since(selected.modseq)
        if found is None:
            return None
        return entry.modseq, found[0], found[1]

    def _send_expunged(self, selected: Selected, uids: Iterable[int]) -> None:
        """Drop *uids* from the view, with EXPUNGE responses (highest first) or VANISHED."""
        indexes = sorted(
            (i for i in (selected.index(uid) for uid in uids) if i is not None), reverse=True
        )
        if not indexes:
            return
        if self.qresync:
            self.out.append(b"* VANISHED %s\r\n" % number_list(selected.uids[i] for i in indexes))
        else:
            self.out.extend(b"* %d EXPUNGE\r\n" % (i + 1) for i in indexes)
        selected.messages.remove(indexes)
        selected.exists = len(selected.messages)

    def _resolve(self, token: object, uid: bool) -> list[int]:
        """Indexes (ascending) of the messages a sequence set names; ArgumentError for a bad
        set or a sequence number beyond the mailbox."""
        if not isinstance(token, bytes) or isinstance(token, String):
            raise ArgumentError("expected a sequence set")
        try:
            ranges = parse_sequence_set(bytes(token))
        except ValueError as exc:
            raise ArgumentError("Invalid sequence set") from exc
        selected = self.selected
        assert selected is not None
        if ranges == [(SEARCHRES, SEARCHRES)]:
            return sorted(
                i for i in (selected.index(u) for u in self.saved) if i is not None
            )  # fmt: skip
        count = len(selected.messages)
        if len(ranges) == 1 and not uid:  # "1:*", "5": the common case, no set to build
            low, high = ranges[0]
            if count == 0 and STAR in (low, high):
                return []
            low = count if low == STAR else low
            high = count if high == STAR else high
            if low > high:
                low, high = high, low
            if low < 1 or high > count:
                raise ArgumentError("Invalid sequence number: no such message")
            return list(range(low - 1, high))
        if uid and len(ranges) == 1 and ranges[0][0] == ranges[0][1] != STAR:
            # "UID FETCH 4711": one message or none, no set to build
            uids = selected.uids
            at = bisect_left(uids, ranges[0][0])
            return [at] if at < len(uids) and uids[at] == ranges[0][0] else []
        found: set[int] = set()
        if uid:
            uids = selected.uids
            top = uids[-1] if uids else 0
            for low, high in ranges:
                low = top if low == STAR else low
                high = top if high == STAR else high
                if low > high:
                    low, high = high, low
                found.update(range(bisect_left(uids, low), bisect_right(uids, high)))
            return sorted(found)
        for low, high in ranges:
            if count == 0 and (low == STAR or high == STAR):
                continue  # "1:*" of an empty mailbox: nothing
            low = count if low == STAR else low
            high = count if high == STAR else high
            if low > high:
                low, high = high, low
            if low < 1 or high > count:
                raise ArgumentError("Invalid sequence number: no such message")
            found.update(range(low - 1, high))
        return sorted(found)

    # --- FETCH -------------------------------------------------------------------------

    def cmd_fetch(self, tag: bytes, args: list[object], uid: bool = False) -> None:
        if len(args) not in (2, 3):
            raise ArgumentError("FETCH takes a sequence set, items and optional modifiers")
        selected = self.selected
        assert selected is not None and self.user is not None
        try:
            items = list(parse_fetch_items([args[1]]))
        except ValueError as exc:
            raise ArgumentError(f"Invalid FETCH items: {exc}") from exc
        changedsince: int | None = None
        vanished = False
        if len(args) == 3:
            modifiers = args[2]
            if not isinstance(modifiers, list) or not modifiers:
                raise ArgumentError("bad FETCH modifiers")
            j = 0
            while j < len(modifiers):
                word = modifiers[j]
                if isinstance(word, bytes) and word.upper() == b"CHANGEDSINCE":
                    if j + 1 >= len(modifiers):
                        raise ArgumentError("CHANGEDSINCE needs a modseq")
                    changedsince = _number(modifiers[j + 1], "CHANGEDSINCE")
                    j += 2
                elif isinstance(word, bytes) and word.upper() == b"VANISHED":
                    vanished = True
                    j += 1
                else:
                    raise ArgumentError("unknown FETCH modifier")
            if vanished and (not uid or not self.qresync or changedsince is None):
                raise ArgumentError("VANISHED needs UID FETCH, QRESYNC and CHANGEDSINCE")
        if changedsince is not None or any(item.name == b"MODSEQ" for item in items):
            self._enable_condstore()
        # The flags answered are the store's now, whoever changed them (RFC 9051 §5.2).
        updates = self._catch_up(expunge=uid)
        if updates is None:
            self._no(tag, "The mailbox is gone", "NONEXISTENT")
            return
        try:
            indexes = self._resolve(args[0], uid)
        except ArgumentError:
            self._announce(updates)
            raise
        if changedsince is not None:
            since = changedsince
            modseqs = selected.messages.modseqs
            indexes = [i for i in indexes if modseqs[i] > since]
            if vanished:
                gone = self.ctx.mailbox.expunged_since(self.user, selected.name, since)
                top = selected.uids[-1] if selected.uids else 0
                ranges = parse_sequence_set(bytes(cast(bytes, args[0])))
                gone = [u for u in gone if _in_set(u, ranges, top)]
                if gone:
                    self.out.append(b"* VANISHED (EARLIER) %s\r\n" % number_list(gone))
        if updates:
            if any(item.name == b"FLAGS" for item in items):
                # this FETCH's own responses carry those flags (and MODSEQ, UID as owed)
                fetched = {selected.uids[i] for i in indexes}
                updates = [u for u in updates if u not in fetched]
            self._announce(updates)
        if (
            len(indexes) == 1
            and items == _WHOLE_PEEK
            and not self.condstore  # no MODSEQ, no QRESYNC UID to add
            and self._fetch_whole(tag, indexes[0], uid)
        ):
            return
        job = FetchJob(tag, "UID FETCH" if uid else "FETCH", indexes, items, uid, set())
        job.fast, job.plan = fast_plan(items, uid or self.qresync, self.condstore)
        unseen = []
        if not selected.readonly and sets_seen(items):
            bits, uids = selected.messages.bits, selected.messages.uids
            unseen = [uids[i] for i in indexes if not bits[i] & _SEEN_BIT]
        if not unseen:
            self._start_fetch(job)
            return

        def seen(outcome: object) -> None:
            if isinstance(outcome, NoSuchMailbox):
                self._no(tag, "The mailbox is gone", "NONEXISTENT")
                return
            if isinstance(outcome, Exception):
                raise outcome
            current = self.selected
            if current is not selected:
                self._no(tag, "The mailbox is gone", "NONEXISTENT")
                return
            for message in cast(list[MessageInfo], outcome):
                index = selected.index(message.uid)
                if index is not None:
                    selected.messages.put(index, message)
                    job.seen_set.add(message.uid)
            self._start_fetch(job)

        self._commit(tag, set_flags(self.user, selected.name, unseen, [SEEN], "add"), seen)

    def _fetch_whole(self, tag: bytes, index: int, uid: bool) -> bool:
        """Answer ``[UID] FETCH n BODY.PEEK[]`` of one message of at most CHUNK octets at
        once: one read, the response and the tagged OK, byte for byte what the general
        path sends (no \\Seen to set, no structure to read). False (nothing sent): the
        general path answers (a bigger message, a damaged one, a client not reading)."""
        selected = self.selected
        if selected is None or self.write_paused or self.transport is None:
            return False
        info = selected.messages[index]
        if not 0 < info.size <= CHUNK:
            return False
        reader = self.ctx.mailbox.reader()
        try:
            data = reader.read(info.content_id, 0, info.size)
        finally:
            reader.close()
        if len(data) != info.size:
            return False  # the general path fills it and logs why
        if uid:
            head = b"* %d FETCH (UID %d BODY[] {%d}\r\n" % (index + 1, info.uid, info.size)
        else:
            head = b"* %d FETCH (BODY[] {%d}\r\n" % (index + 1, info.size)
        self._queue(b"".join((head, data, b")\r\n")))
        self._ok(tag, "UID FETCH completed" if uid else "FETCH completed", expunge=uid, look=False)
        return True

    def _start_fetch(self, job: FetchJob) -> None:
        self.job = job
        self.mode = Mode.SENDING
        self._pump()

    def _pump(self) -> None:
        """Write FETCH responses until done, the client stops reading, or this turn of the
        loop has had its share (then it goes on later)."""
        job = self.job
        selected = self.selected
        if job is None or selected is None or self.transport is None:
            return
        if job.keeping is not None:
            # The renderings of the last turn are being committed: read on once they are
            # (a commit that grows the store's map invalidates a read transaction of this
            # thread, so this session's own writes never overlap its reads).
            if not job.keeping.done():
                return  # its done callback pumps again
            job.keeping = None
        reader: ContentReader | None = None
        store = self.ctx.mailbox
        source = _Source(store)
        sent = messages = 0
        try:
            while True:
                if self.transport is None:
                    return
                if self.write_paused:
                    return  # resume_writing pumps again
                if sent >= TURN_BYTES or (messages >= TURN_MESSAGES and not job.fast):
                    self.transport.pause_reading()  # commands wait until the FETCH is out
                    if not self.pump_scheduled:
                        self.pump_scheduled = True
                        self.ctx.loop.call_soon(self._pump_later)
                    return
                if job.left:
                    if reader is None:
                        reader = store.reader()
                    want = min(job.left, CHUNK)
                    data = reader.read(job.content_id, job.offset, want)
                    if len(data) < want:
                        # The message went while we sent it: the literal's size was
                        # promised, so fill it (the client sees a damaged copy, not a hang).
                        log.error("imap: message content %r shorter than announced", job.content_id)
                        data += b" " * (want - len(data))
                    job.offset += want
                    job.left -= want
                    sent += want
                    self._queue(data)
                    continue
                if job.pieces:
                    piece = job.pieces.popleft()
                    if isinstance(piece, ContentRange):
                        job.offset, job.left = piece.start, piece.length
                    else:
                        sent += len(piece)
                        self._queue(piece)
                    continue
                if job.position >= len(job.indexes):
                    break
                if job.fast:
                    if reader is None:
                        reader = store.reader()
                    try:
                        data, count = self._fast_run(job, reader)
                    except Exception:
                        log.exception("imap: FETCH of %s failed", self.user)
                        job.failed = "Messages could not be served"
                        job.failed_code = "SERVERBUG"
                        break
                    job.position += count
                    messages += count
                    sent += len(data)
                    self._queue(data)
                    continue
                index = job.indexes[job.position]
                job.position += 1
                messages += 1
                if reader is None:
                    reader = store.reader()
                    source.reader = reader
                pieces = self._fetch_one(job, index, source)
                if len(pieces) == 1 and type(pieces[0]) is bytes:  # no stored octets: as is
                    sent += len(pieces[0])
                    self._queue(pieces[0])
                else:
                    job.pieces.extend(pieces)
        except Exception:  # the store failed under us (never a traceback into the loop)
            log.exception("imap session %s: FETCH failed", self.peer_ip)
            if job.left or job.pieces:  # inside a message's response: it cannot be ended
                self.outcome = "error"
                self.mode = Mode.CLOSED
                self.job = None
                if self.transport is not None:
                    self.transport.abort()
                return
            job.failed = "Messages could not be served"
            job.failed_code = "SERVERBUG"
        finally:
            if reader is not None:
                reader.close()
            if job.keep:
                self._keep_rendered(job)
        if job.keeping is not None:
            self.transport.pause_reading()  # commands wait until the FETCH is answered
            return  # answered once the renderings are kept
        self.job = None
        self.mode = Mode.COMMAND
        if job.failed:
            self._no(job.tag, job.failed, job.failed_code)
        else:
            self._ok(job.tag, f"{job.name} completed", expunge=job.uid, look=False)
        # The caller reads on: the command loop, _waited, resume_writing or _pump_later.

    def _fast_run(self, job: FetchJob, reader: ContentReader) -> tuple[bytes, int]:
        """The responses of the FETCH fast paths for the next run of consecutive messages
        (at most FAST_RUN) and how many messages they answer."""
        selected = self.selected
        assert selected is not None
        indexes, pos = job.indexes, job.position
        end = min(pos + FAST_RUN, len(indexes))
        lo = indexes[pos]
        if indexes[end - 1] - lo != end - 1 - pos:  # a gap: up to it
            k = pos + 1
            while k < end and indexes[k] == indexes[k - 1] + 1:
                k += 1
            end = k
        hi = lo + end - pos
        messages = selected.messages
        if job.fast == FAST_FLAGS:
            data = fetch_flags_lines(
                lo + 1,
                messages.uids[lo:hi],
                messages.flag_lists(lo, hi, selected.recent),
                messages.sizes[lo:hi],
                messages.modseqs[lo:hi] if b"MODSEQ" in job.plan else None,
            )
        else:
            data = self._fast_items(job, selected, lo, hi, reader)
        return data, end - pos

    def _fast_items(
        self, job: FetchJob, selected: Selected, lo: int, hi: int, reader: ContentReader
    ) -> bytes:
        """FETCH responses of messages lo <= index < hi, item by item over the run: from the
        columns, and from the renderings this process or the store kept (made, and queued
        to be kept, where missing)."""
        messages = selected.messages
        columns: list[list[bytes]] = []
        for name in job.plan:
            if name == b"UID":
                columns.append([b"UID %d" % uid for uid in messages.uids[lo:hi]])
            elif name == b"FLAGS":
                flags = messages.flag_lists(lo, hi, selected.recent)
                columns.append([b"FLAGS " + f for f in flags])
            elif name == b"RFC822.SIZE":
                columns.append([b"RFC822.SIZE %d" % size for size in messages.sizes[lo:hi]])
            elif name == b"MODSEQ":
                columns.append([b"MODSEQ (%d)" % modseq for modseq in messages.modseqs[lo:hi]])
            elif name == b"INTERNALDATE":
                columns.append(
                    [b"INTERNALDATE " + format_internaldate(d) for d in messages.dates[lo:hi]]
                )
            else:
                columns.append(self._rendered_column(job, name, messages.contents[lo:hi], reader))
        if len(columns) == 1:
            return fetch_item_lines(lo + 1, columns[0])
        return fetch_item_lines(lo + 1, [b" ".join(parts) for parts in zip(*columns, strict=True)])

    def _rendered_column(
        self, job: FetchJob, name: bytes, contents: Sequence[int], reader: ContentReader
    ) -> list[bytes]:
        """``NAME (...)`` of the structure item *name* for each content id of *contents*."""
        cache = self._rendered_cache()
        code = _RENDERED[name]
        found = list(map(cache.kinds[code].get, contents))
        plain = not (self.utf8 or self.rev2)
        if plain and None not in found:
            return cast(list[bytes], found)
        pack = _CONTENT_KEY.pack
        plain_only = cache.plain_only[code]
        for k, content in enumerate(contents):
            if found[k] is not None and (plain or content not in plain_only):
                continue
            content_key = pack(content)
            kept = reader.rendered(content_key, _STRUCTURES_KIND)
            texts = None if kept is None else _unpack_structures(kept)
            if kept is not None and texts is not None:
                same = kept[:1] == _ANY_SESSION
            else:
                made, same = self._render(job, content_key)
                if made is None:  # deleted meanwhile
                    session = render_structures(_EMPTY_SUMMARY, utf8=self.utf8, rev2=self.rev2)
                    found[k] = name + b" " + session[_STRUCTURE_KEYS[code]]
                    continue
                texts = [made[key] for key in _STRUCTURE_KEYS]
            for other, other_name in enumerate(_RENDERED):
                cache.put(other, content, other_name + b" " + texts[other], not same)
            if plain or same:
                found[k] = name + b" " + texts[code]
            else:  # 8-bit text or message/global for a UTF8=ACCEPT or IMAP4rev2 session
                summary = self.ctx.mailbox.summary(content_key) or _EMPTY_SUMMARY
                session = render_structures(summary, utf8=self.utf8, rev2=self.rev2)
                found[k] = name + b" " + session[_STRUCTURE_KEYS[code]]
        return cast(list[bytes], found)

    def _render(self, job: FetchJob, key: bytes) -> tuple[dict[bytes, bytes] | None, bool]:
        """BODYSTRUCTURE, BODY and ENVELOPE of the content *key* for sessions without
        UTF8=ACCEPT and IMAP4rev2, made from its summary and queued to be kept in the store,
        and whether they suit every session; (None, False) when the content is gone."""
        summary = self.ctx.mailbox.summary(key)
        if summary is None:
            return None, False
        made = render_structures(summary, utf8=False, rev2=False)
        same = _same_for_all(summary)
        texts = [made[kind] for kind in _STRUCTURE_KEYS]
        record = (_ANY_SESSION if same else _PLAIN_SESSION) + _LENGTHS.pack(
            *(len(text) for text in texts)
        )
        job.keep.append((key, _STRUCTURES_KIND, record + b"".join(texts)))
        return made, same

    def _keep_rendered(self, job: FetchJob) -> None:
        """Hand the renderings made by *job* to the group commit; the job goes on when they
        are committed (a failure is logged: they are rendered again next time)."""
        items, job.keep = job.keep, []
        future = self.ctx.mailbox_committer.submit_operation(keep_rendered(items))
        job.keeping = future

        def done(finished: asyncio.Future[Any]) -> None:
            if not finished.cancelled() and finished.exception() is not None:
                log.warning("imap: could not keep renderings: %r", finished.exception())
            if self.job is job and not self.pump_scheduled:
                self.pump_scheduled = True
                self.ctx.loop.call_soon(self._pump_later)

        future.add_done_callback(done)

    def _fetch_one(self, job: FetchJob, index: int, source: _Source) -> list[bytes | ContentRange]:
        """The pieces of one message's FETCH response ([] when it cannot be served: the
        job then ends with NO)."""
        selected = self.selected
        assert selected is not None
        info = selected.messages[index]
        if selected.recent and selected.is_recent(info.uid):
            info = MessageInfo(
                info.uid,
                info.size,
                info.flags | _RECENT,
                info.internaldate,
                info.modseq,
                info.content_id,
            )
        items = job.items
        if job.seen_set and info.uid in job.seen_set and _FLAGS_ITEM not in items:
            items = [*items, _FLAGS_ITEM]  # RFC 9051 §6.4.5: the \Seen just set is told
        source.content_id = job.content_id = info.content_id
        try:
            return fetch_response(
                index + 1,
                info,
                items,
                source.summary,
                source.read,
                uid=job.uid or self.qresync,
                modseq=self.condstore,
                utf8=self.utf8,
                rev2=self.rev2,
            )
        except FetchError as exc:
            job.failed = str(exc) or "FETCH failed"
            job.failed_code = exc.code or ""
        except Exception:
            log.exception("imap: FETCH of uid %d of %s failed", info.uid, self.user)
            job.failed = "Message could not be served"
            job.failed_code = "SERVERBUG"
        return []

    def _pump_later(self) -> None:
        self.pump_scheduled = False
        if self.mode != Mode.SENDING or self.transport is None:
            return
        self._pump()
        if cast(Mode, self.mode) == Mode.COMMAND:  # the FETCH is done
            self._continue()
        else:
            self._flush()

    # --- STORE -------------------------------------------------------------------------

    def cmd_store(self, tag: bytes, args: list[object], uid: bool = False) -> None:
        selected = self.selected
        assert selected is not None and self.user is not None
        if len(args) < 3:
            raise ArgumentError("STORE takes a sequence set, an item and flags")
        if not self._reads_flags(tag, uid):  # UNCHANGEDSINCE and the answer: the flags now
            return
        indexes = self._resolve(args[0], uid)
        rest = list(args[1:])
        unchangedsince: int | None = None
        if isinstance(rest[0], list):
            modifier = cast(list[object], rest.pop(0))
            if (
                len(modifier) != 2
                or not isinstance(modifier[0], bytes)
                or modifier[0].upper() != b"UNCHANGEDSINCE"
            ):
                raise ArgumentError("unknown STORE modifier")
            unchangedsince = _number(modifier[1], "UNCHANGEDSINCE")
            self._enable_condstore()
        if len(rest) < 2 or not isinstance(rest[0], bytes):
            raise ArgumentError("STORE takes an item and flags")
        item = rest[0].upper()
        silent = item.endswith(b".SILENT")
        if silent:
            item = item[:-7]
        modes = {b"FLAGS": "replace", b"+FLAGS": "add", b"-FLAGS": "remove"}
        mode = modes.get(item)
        if mode is None:
            raise ArgumentError("STORE item must be FLAGS, +FLAGS or -FLAGS (.SILENT)")
        tokens = rest[1] if len(rest) == 2 and isinstance(rest[1], list) else rest[1:]
        flags = parse_flags(cast(list[object], tokens))
        if selected.readonly:
            self._no(tag, "The mailbox is read-only", "READ-ONLY")
            return
        modified: list[int] = []
        if unchangedsince is not None:
            since = unchangedsince
            modseqs = selected.messages.modseqs
            modified = [i for i in indexes if modseqs[i] > since]
            indexes = [i for i in indexes if modseqs[i] <= since]
        uids = [selected.uids[i] for i in indexes]
        name = "UID STORE" if uid else "STORE"

        def stored(outcome: object) -> None:
            if isinstance(outcome, NoSuchMailbox):
                self._no(tag, "The mailbox is gone", "NONEXISTENT")
                return
            if isinstance(outcome, Exception):
                raise outcome
            if self.selected is not selected:
                self._no(tag, "The mailbox is gone", "NONEXISTENT")
                return
            changed = {message.uid for message in cast(list[MessageInfo], outcome)}
            for message in cast(list[MessageInfo], outcome):
                index = selected.index(message.uid)
                if index is not None:
                    selected.messages.put(index, message)
            for uid_ in uids:
                index = selected.index(uid_)
                if index is None:
                    continue
                message = selected.messages[index]
                if not silent:
                    self.out.append(self._flags_line(index + 1, message, uid=uid or self.qresync))
                elif self.condstore and uid_ in changed:
                    # RFC 7162 §3.1.3: MODSEQ of what changed, even with .SILENT
                    parts = (b"UID %d " % uid_ if uid else b"") + b"MODSEQ (%d)" % message.modseq
                    self.out.append(b"* %d FETCH (%s)\r\n" % (index + 1, parts))
            code = ""
            if modified:
                numbers = [selected.uids[i] for i in modified] if uid else [i + 1 for i in modified]
                code = "MODIFIED " + number_list(numbers).decode()
            self._ok(tag, f"{name} completed", code, expunge=uid)

        if not uids:
            stored([])
            return
        self._commit(tag, set_flags(self.user, selected.name, uids, flags, mode), stored)

    # --- SEARCH / SORT / THREAD ----------------------------------------------------------

    def _view(self) -> _SearchView:
        selected = self.selected
        assert selected is not None
        return _SearchView(
            self.ctx.mailbox,
            selected.messages.snapshot(),
            list(self.saved),
            list(selected.recent),
        )

    def cmd_search(self, tag: bytes, args: list[object], uid: bool = False) -> None:
        try:
            query = parse_search(args, rev2=self.rev2)
        except SearchError as exc:
            self._search_error(tag, exc)
            return
        if query.uses_modseq:
            self._enable_condstore()
        if not self._reads_flags(tag, uid):
            return
        view = self._view()

        def work() -> list[int]:
            return run_search(query, view)

        def found(seqs: list[int]) -> None:
            if self.selected is None:
                self._no(tag, "The mailbox is gone", "NONEXISTENT")
                return
            self.out.append(search_response(query, seqs, view, uid=uid, tag=tag))
            saved = saved_uids(query, seqs, view)
            if saved is not None:
                self.saved = saved
            self._ok(
                tag, "UID SEARCH completed" if uid else "SEARCH completed", expunge=uid, look=False
            )

        self._off_loop(tag, work, found)

    def _search_error(self, tag: bytes, exc: SearchError) -> None:
        if exc.bad or not exc.code:
            self._bad(tag, str(exc) or "Invalid search")
        else:
            self._no(tag, str(exc) or "Search failed", exc.code)

    def cmd_sort(self, tag: bytes, args: list[object], uid: bool = False) -> None:
        try:
            query = parse_sort(args, rev2=self.rev2)
        except SearchError as exc:
            self._search_error(tag, exc)
            return
        if not self._reads_flags(tag, uid):
            return
        view = self._view()

        def work() -> list[int]:
            return run_sort(query, view)

        def found(seqs: list[int]) -> None:
            self.out.append(sort_response(query, seqs, view, uid=uid))
            self._ok(
                tag, "UID SORT completed" if uid else "SORT completed", expunge=uid, look=False
            )

        self._off_loop(tag, work, found)

    def cmd_thread(self, tag: bytes, args: list[object], uid: bool = False) -> None:
        try:
            query = parse_thread(args, rev2=self.rev2)
        except SearchError as exc:
            self._search_error(tag, exc)
            return
        if not self._reads_flags(tag, uid):
            return
        view = self._view()

        def work() -> bytes:
            return run_thread(query, view, uid=uid)

        def found(result: bytes) -> None:
            self.out.append(result)
            self._ok(
                tag, "UID THREAD completed" if uid else "THREAD completed", expunge=uid, look=False
            )

        self._off_loop(tag, work, found)

    # --- COPY / MOVE / EXPUNGE -----------------------------------------------------------

    def cmd_copy(
        self, tag: bytes, args: list[object], uid: bool = False, move: bool = False
    ) -> None:
        selected = self.selected
        assert selected is not None and self.user is not None
        if len(args) != 2:
            raise ArgumentError("COPY / MOVE take a sequence set and a mailbox name")
        indexes = self._resolve(args[0], uid)
        dest = self._name(args[1])
        verb = ("UID " if uid else "") + ("MOVE" if move else "COPY")
        if move and selected.readonly:
            self._no(tag, "The mailbox is read-only", "READ-ONLY")
            return
        uids = [selected.uids[i] for i in indexes]
        if not uids:
            self._ok(tag, f"{verb} completed: nothing to do")
            return
        if move:
            operation = move_messages(self.user, selected.name, dest, uids)
        else:
            operation = copy_messages(
                self.user, selected.name, dest, uids, quota=self.ctx.directory.quota(self.user)
            )

        def copied(outcome: object) -> None:
            if isinstance(outcome, NoSuchMailbox):
                self._no(tag, "No such mailbox", "TRYCREATE")
                return
            if isinstance(outcome, OverQuota):
                self._no(tag, "Quota exceeded", "OVERQUOTA")
                return
            if isinstance(outcome, InvalidMailboxName):
                self._no(tag, "Invalid mailbox name", "CANNOT")
                return
            if isinstance(outcome, Exception):
                raise outcome
            result = cast(CopyResult, outcome)
            code = ""
            if result.source:
                code = (
                    f"COPYUID {result.uidvalidity} {number_list(result.source).decode()} "
                    f"{number_list(result.dest).decode()}"
                )
            if move:
                if code:
                    self.out.append(untagged("OK", "Moved", code))
                if self.selected is selected:
                    self._send_expunged(selected, result.source)
                self._ok(tag, f"{verb} completed")
            else:
                self._ok(tag, f"{verb} completed", code)

        self._commit(tag, operation, copied)

    def cmd_move(self, tag: bytes, args: list[object], uid: bool = False) -> None:
        self.cmd_copy(tag, args, uid=uid, move=True)

    def cmd_expunge(self, tag: bytes, args: list[object], uid: bool = False) -> None:
        selected = self.selected
        assert selected is not None and self.user is not None
        if uid:
            if len(args) != 1:
                raise ArgumentError("UID EXPUNGE takes a UID set")
            allowed = {selected.uids[i] for i in self._resolve(args[0], True)}
        elif args:
            raise ArgumentError("EXPUNGE takes no arguments")
        if selected.readonly:
            self._no(tag, "The mailbox is read-only", "READ-ONLY")
            return
        self._sync(True)  # \Deleted set by others counts too
        doomed = [u for u in selected.messages.deleted_uids() if not uid or u in allowed]
        name = "UID EXPUNGE" if uid else "EXPUNGE"
        if not doomed:
            self._ok(tag, f"{name} completed")
            return

        def expunged(outcome: object) -> None:
            if isinstance(outcome, NoSuchMailbox):
                self._no(tag, "The mailbox is gone", "NONEXISTENT")
                return
            if isinstance(outcome, Exception):
                raise outcome
            if self.selected is selected:
                self._send_expunged(selected, cast(list[int], outcome))
            self._ok(tag, f"{name} completed")

        self._commit(tag, expunge(self.user, selected.name, doomed), expunged)

    # --- UID prefixed ------------------------------------------------------------------

    def cmd_uid_fetch(self, tag: bytes, args: list[object]) -> None:
        self.cmd_fetch(tag, args, uid=True)

    def cmd_uid_store(self, tag: bytes, args: list[object]) -> None:
        self.cmd_store(tag, args, uid=True)

    def cmd_uid_search(self, tag: bytes, args: list[object]) -> None:
        self.cmd_search(tag, args, uid=True)

    def cmd_uid_copy(self, tag: bytes, args: list[object]) -> None:
        self.cmd_copy(tag, args, uid=True)

    def cmd_uid_move(self, tag: bytes, args: list[object]) -> None:
        self.cmd_copy(tag, args, uid=True, move=True)

    def cmd_uid_expunge(self, tag: bytes, args: list[object]) -> None:
        self.cmd_expunge(tag, args, uid=True)

    def cmd_uid_sort(self, tag: bytes, args: list[object]) -> None:
        self.cmd_sort(tag, args, uid=True)

    def cmd_uid_thread(self, tag: bytes, args: list[object]) -> None:
        self.cmd_thread(tag, args, uid=True)


def _in_set(number: int, ranges: list[tuple[int, int]], top: int = 0) -> bool:
    """Whether *number* is in the parsed sequence set *ranges* (``*`` is *top*)."""
    for low, high in ranges:
        low = top if low == STAR else low
        high = top if high == STAR else high
        if low > high:
            low, high = high, low
        if low <= number <= high:
            return True
    return False


# Which state a command needs.
_ANY, _NOT_AUTH, _AUTH, _SELECTED = 0, 1, 2, 3
_Handler = Callable[[ImapSession, bytes, list[object]], None]
_HANDLERS: dict[bytes, tuple[_Handler, int]] = {
    b"CAPABILITY": (ImapSession.cmd_capability, _ANY),
    b"NOOP": (ImapSession.cmd_noop, _ANY),
    b"LOGOUT": (ImapSession.cmd_logout, _ANY),
    b"ID": (ImapSession.cmd_id, _ANY),
    b"STARTTLS": (ImapSession.cmd_starttls, _NOT_AUTH),
    b"LOGIN": (ImapSession.cmd_login, _NOT_AUTH),
    b"AUTHENTICATE": (ImapSession.cmd_authenticate, _NOT_AUTH),
    b"ENABLE": (ImapSession.cmd_enable, _AUTH),
    b"SELECT": (ImapSession.cmd_select, _AUTH),
    b"EXAMINE": (ImapSession.cmd_examine, _AUTH),
    b"CREATE": (ImapSession.cmd_create, _AUTH),
    b"DELETE": (ImapSession.cmd_delete, _AUTH),
    b"RENAME": (ImapSession.cmd_rename, _AUTH),
    b"SUBSCRIBE": (ImapSession.cmd_subscribe, _AUTH),
    b"UNSUBSCRIBE": (ImapSession.cmd_unsubscribe, _AUTH),
    b"LIST": (ImapSession.cmd_list, _AUTH),
    b"LSUB": (ImapSession.cmd_lsub, _AUTH),
    b"NAMESPACE": (ImapSession.cmd_namespace, _AUTH),
    b"STATUS": (ImapSession.cmd_status, _AUTH),
    b"APPEND": (ImapSession.cmd_append, _AUTH),
    b"IDLE": (ImapSession.cmd_idle, _AUTH),
    b"COMPRESS": (ImapSession.cmd_compress, _AUTH),
    b"GETQUOTA": (ImapSession.cmd_getquota, _AUTH),
    b"GETQUOTAROOT": (ImapSession.cmd_getquotaroot, _AUTH),
    b"SETQUOTA": (ImapSession.cmd_setquota, _AUTH),
    b"CHECK": (ImapSession.cmd_check, _SELECTED),
    b"CLOSE": (ImapSession.cmd_close, _SELECTED),
    b"UNSELECT": (ImapSession.cmd_unselect, _SELECTED),
    b"EXPUNGE": (ImapSession.cmd_expunge, _SELECTED),
    b"SEARCH": (ImapSession.cmd_search, _SELECTED),
    b"FETCH": (ImapSession.cmd_fetch, _SELECTED),
    b"STORE": (ImapSession.cmd_store, _SELECTED),
    b"COPY": (ImapSession.cmd_copy, _SELECTED),
    b"MOVE": (ImapSession.cmd_move, _SELECTED),
    b"SORT": (ImapSession.cmd_sort, _SELECTED),
    b"THREAD": (ImapSession.cmd_thread, _SELECTED),
    b"UID FETCH": (ImapSession.cmd_uid_fetch, _SELECTED),
    b"UID STORE": (ImapSession.cmd_uid_store, _SELECTED),
    b"UID SEARCH": (ImapSession.cmd_uid_search, _SELECTED),
    b"UID COPY": (ImapSession.cmd_uid_copy, _SELECTED),
    b"UID MOVE": (ImapSession.cmd_uid_move, _SELECTED),
    b"UID EXPUNGE": (ImapSession.cmd_uid_expunge, _SELECTED),
    b"UID SORT": (ImapSession.cmd_uid_sort, _SELECTED),
    b"UID THREAD": (ImapSession.cmd_uid_thread, _SELECTED),
}

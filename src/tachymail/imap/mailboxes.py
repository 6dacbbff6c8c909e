"""The mailbox-level commands' logic, with no I/O: LIST / LSUB pattern matching and
responses (RFC 3501 §6.3.8, RFC 5258 LIST-EXTENDED, RFC 5819 LIST-STATUS, RFC 6154
SPECIAL-USE, RFC 3348 CHILDREN) and STATUS responses (RFC 9051 §6.3.11, RFC 7162, RFC 8438).

Names are the store's (str, "/" the separator); the session encodes them for the wire.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import cast

from tachymail.imap.responses import SEPARATOR, encode_name
from tachymail.mailbox import MailboxInfo

#: STATUS items we answer, upper case
STATUS_ITEMS = frozenset(
    {
        b"MESSAGES",
        b"UIDNEXT",
        b"UIDVALIDITY",
        b"UNSEEN",
        b"DELETED",
        b"SIZE",
        b"HIGHESTMODSEQ",
        b"RECENT",
    }
)
_SELECTION = frozenset({"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"})
_RETURN = frozenset({"SUBSCRIBED", "CHILDREN", "SPECIAL-USE", "STATUS", "MYRIGHTS"})


class ListError(ValueError):
    """A LIST command that gets ``BAD`` (the text says why)."""


@dataclass
class ListQuery:
    """A parsed LIST / LSUB: patterns already joined with the reference."""

    patterns: list[str]
    selection: set[str] = field(default_factory=set)
    returns: set[str] = field(default_factory=set)
    status: list[bytes] = field(default_factory=list)
    lsub: bool = False
    #: LIST "" "": the client asks for the separator only
    separator_only: bool = False


def _atom_text(token: object, what: str) -> str:
    if not isinstance(token, bytes):
        raise ListError(f"{what}: expected an atom")
    return token.decode("ascii", "replace").upper()


def parse_list(args: list[object], *, lsub: bool, decode: Callable[[bytes], str]) -> ListQuery:
    """Parse LIST's (or LSUB's) arguments; *decode* turns the client's mailbox bytes into a
    store name (it raises ValueError on a bad one). Raises ListError on bad syntax."""
    args = list(args)
    selection: set[str] = set()
    if not lsub and args and isinstance(args[0], list):
        selection = {_atom_text(t, "selection option") for t in cast(list[object], args.pop(0))}
        unknown = selection - _SELECTION
        if unknown:
            raise ListError(f"unknown selection option {sorted(unknown)[0]}")
    if len(args) < 2:
        raise ListError("expected a reference and a mailbox pattern")
    reference_raw, pattern_arg = args[0], args[1]
    rest = args[2:]
    returns: set[str] = set()
    status: list[bytes] = []
    if rest:
        if lsub or len(rest) != 2 or _atom_text(rest[0], "RETURN") != "RETURN":
            raise ListError("unexpected arguments after the pattern")
        options = rest[1]
        if not isinstance(options, list):
            raise ListError("RETURN needs a list")
        i = 0
        while i < len(options):
            option = _atom_text(options[i], "return option")
            if option not in _RETURN:
                raise ListError(f"unknown return option {option}")
            returns.add(option)
            if option == "STATUS":
                i += 1
                if i >= len(options) or not isinstance(options[i], list):
                    raise ListError("RETURN (STATUS) needs a list of items")
                for item in options[i]:
                    name = _atom_text(item, "status item").encode()
                    if name not in STATUS_ITEMS:
                        raise ListError(f"unknown status item {name.decode()}")
                    status.append(name)
            i += 1
    if not isinstance(reference_raw, bytes):
        raise ListError("bad reference")
    raw_patterns = pattern_arg if isinstance(pattern_arg, list) else [pattern_arg]
    if not raw_patterns or not all(isinstance(p, bytes) for p in raw_patterns):
        raise ListError("bad mailbox pattern")
    if len(raw_patterns) > 1 and lsub:
        raise ListError("LSUB takes one pattern")
    try:
        reference = decode(bytes(reference_raw)) if reference_raw else ""
        patterns = [decode(bytes(cast(bytes, p))) if p else "" for p in raw_patterns]
    except ValueError as exc:
        raise ListError(f"bad mailbox name: {exc}") from exc
    if "RECURSIVEMATCH" in selection and not selection - {"RECURSIVEMATCH", "REMOTE"}:
        raise ListError("RECURSIVEMATCH needs another selection option")
    if "SUBSCRIBED" in selection:
        returns.add("SUBSCRIBED")
    query = ListQuery([], selection, returns, status, lsub)
    if len(patterns) == 1 and not patterns[0] and not extended_selection(query):
        query.separator_only = True
        return query
    for pattern in patterns:
        if reference and not pattern.upper().startswith("INBOX"):
            joined = reference + pattern
        else:
            joined = pattern or reference
        query.patterns.append(joined)
    return query


def extended_selection(query: ListQuery) -> bool:
    return bool(query.selection - {"REMOTE"})


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    parts = []
    for char in pattern:
        if char == "*":
            parts.append(".*")
        elif char == "%":
            parts.append("[^/]*")
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts), re.DOTALL)


def matches(pattern: str, name: str) -> bool:
    """Whether *name* matches the LIST *pattern* (``*`` anything, ``%`` within one level);
    INBOX matches its name in any case."""
    if _regex(pattern).fullmatch(name):
        return True
    if name == "INBOX" or name.startswith("INBOX/"):
        head = pattern[:5]
        if head.upper() == "INBOX" and _regex("INBOX" + pattern[5:]).fullmatch(name):
            return True
    return False


def list_responses(
    query: ListQuery,
    mailboxes: Sequence[MailboxInfo],
    *,
    utf8: bool,
    rev2: bool,
    orphans: Sequence[str] = (),
) -> list[tuple[bytes, MailboxInfo | None]]:
    """The ``* LIST`` (or ``* LSUB``) lines for *query* over the user's *mailboxes*, each with
    the mailbox it names (None for a name that does not exist as a mailbox: no STATUS).
    *orphans*: subscribed names that are not mailboxes; LSUB and LIST (SUBSCRIBED) show
    them, LIST with ``\\NonExistent \\Subscribed`` (RFC 5258 §3)."""
    verb = b"LSUB" if query.lsub else b"LIST"
    sep = b'"' + SEPARATOR.encode() + b'"'
    if query.separator_only:
        return [(b'* %s (\\Noselect) %s ""\r\n' % (verb, sep), None)]
    by_name = {info.name: info for info in mailboxes}
    parents: set[str] = set()
    for name in by_name:
        levels = name.split(SEPARATOR)
        for depth in range(1, len(levels)):
            parents.add(SEPARATOR.join(levels[:depth]))
    want_subscribed = query.lsub or "SUBSCRIBED" in query.selection
    kept = set(orphans).difference(by_name) if want_subscribed else set()
    # parent -> its subscribed descendants that no pattern matches: CHILDINFO (RFC 5258
    # §3.5) and LSUB's \Noselect parent (RFC 3501 §6.3.9) are only for those (a descendant
    # listed itself needs no parent line)
    subscribed_parents: dict[str, int] = {}
    for subscribed in [info.name for info in mailboxes if info.subscribed] + sorted(kept):
        unlisted = not any(matches(p, subscribed) for p in query.patterns)
        levels = subscribed.split(SEPARATOR)
        for depth in range(1, len(levels)):
            parent = SEPARATOR.join(levels[:depth])
            subscribed_parents[parent] = subscribed_parents.get(parent, 0) + unlisted
    special_only = "SPECIAL-USE" in query.selection
    recursive = "RECURSIVEMATCH" in query.selection
    names = set(by_name) | parents
    if not special_only:
        names |= kept | set(subscribed_parents)
    candidates = sorted(names, key=lambda n: (n != "INBOX", n))
    lines: list[tuple[bytes, MailboxInfo | None]] = []
    for name in candidates:
        if not any(matches(p, name) for p in query.patterns):
            continue
        found = by_name.get(name)
        attributes: list[str] = []
        child_info = ""
        if found is None and name in kept:
            # Subscribed, not a mailbox (deleted, or never made): RFC 5258 §3.
            if query.lsub:
                if name in parents:
                    attributes.append("\\Noselect")
            else:
                attributes += ["\\NonExistent", "\\Subscribed"]
                if name in parents:
                    attributes.append("\\HasChildren")
        elif found is None and name not in parents:
            # Only the parent of a subscribed name: shown as implied parents are.
            if recursive and subscribed_parents.get(name):
                child_info = ' ("CHILDINFO" ("SUBSCRIBED"))'
                attributes.append("\\NonExistent" if rev2 else "\\Noselect")
            elif query.lsub and subscribed_parents.get(name):
                attributes.append("\\Noselect")
            else:
                continue
        elif found is None:
            # A parent only implied by its children ("a" of "a/b").
            if want_subscribed or special_only:
                if recursive and want_subscribed and subscribed_parents.get(name):
                    child_info = ' ("CHILDINFO" ("SUBSCRIBED"))'
                    attributes.append("\\NonExistent" if rev2 else "\\Noselect")
                elif query.lsub and subscribed_parents.get(name):
                    attributes.append("\\Noselect")
                else:
                    continue
            else:
                attributes.append("\\NonExistent" if rev2 else "\\Noselect")
            attributes.append("\\HasChildren")
        else:
            info = found
            if want_subscribed and not info.subscribed:
                if recursive and subscribed_parents.get(name):
                    child_info = ' ("CHILDINFO" ("SUBSCRIBED"))'
                elif query.lsub and subscribed_parents.get(name):
                    attributes.append("\\Noselect")  # RFC 3501 §6.3.9: "%" and a child
                else:
                    continue
            if special_only and not info.special_use:
                continue
            if not query.lsub:
                attributes.append("\\HasChildren" if name in parents else "\\HasNoChildren")
                if info.special_use:
                    attributes.append(info.special_use)
                if "SUBSCRIBED" in query.returns and info.subscribed:
                    attributes.append("\\Subscribed")
        line = b"* %s (%s) %s %s%s\r\n" % (
            verb,
            " ".join(attributes).encode(),
            sep,
            encode_name(name, utf8),
            child_info.encode(),
        )
        lines.append((line, found if found is not None and not child_info else None))
    return lines


def status_response(
    name: str,
    info: MailboxInfo,
    items: Sequence[bytes],
    deleted: int,
    *,
    utf8: bool,
    recent: int = 0,
) -> bytes:
    """``* STATUS name (MESSAGES 3 UIDNEXT 9 ...)`` for *items* (upper case, checked);
    *deleted*: the count of messages with \\Deleted (only read when DELETED is asked);
    *recent*: of messages no session has claimed as \\Recent (only read for RECENT)."""
    values = {
        b"MESSAGES": info.messages,
        b"UIDNEXT": info.uidnext,
        b"UIDVALIDITY": info.uidvalidity,
        b"UNSEEN": info.unseen,
        b"DELETED": deleted,
        b"SIZE": info.size,
        b"HIGHESTMODSEQ": info.highestmodseq,
        b"RECENT": recent,
    }
    body = b" ".join(b"%s %d" % (item, values[item]) for item in items)
    return b"* STATUS %s (%s)\r\n" % (encode_name(name, utf8), body)

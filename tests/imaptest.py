"""A runner for Dovecot's imaptest scripts (the format of ../shared/corpus/imaptest-docs/
scripted_test.md), so that the scripts in ../shared/corpus/imaptest-tests run against any
IMAP server over real sockets, with no imaptest binary::

    result = run_script(Path(".../imaptest-tests/fetch"), "127.0.0.1", 2143,
                        users=[("alice@example.test", "secret")])
    result.passed, result.skipped, result.reason

What callers may rely on:

- ``parse_script(path)`` reads one script (header, command groups, ``{{{``/``}}}`` literals,
  ``!ifenv``/``!else``/``!endif``, ``!ordered``, ``!sleep``, connection numbers, ``tagN``
  pipelining) and raises ``ScriptError`` for a script imaptest itself would refuse. The
  messages come from ``<name>.mbox`` beside it, else ``default.mbox`` in its folder.
- ``run_script`` sets the mailbox up as imaptest does: it logs every connection in with
  LOGIN, checks the post-login CAPABILITY for the script's ``capabilities:`` (missing ones
  skip the script), deletes (children first) and unsubscribes every mailbox matching
  ``<mailbox>*``; then, as the ``state:`` asks, CREATEs the mailbox, APPENDs ``messages:``
  messages of the mbox (each with the INTERNALDATE of its From_ line; "all", the default
  as scripted_test.md says, is every message; a number wraps around the file) and SELECTs
  it on every connection.
  Destructive for mailboxes whose names start with *mailbox*, never for others.
- The commands run as imaptest runs them: a group (one command, or a pipelined batch on one
  connection) is written in one send, only that connection is read until every tagged reply
  is in, and each untagged reply is matched against the group's expected ones with
  imaptest's rules: case-insensitive atoms and strings, ``$var`` captured on first use and
  compared afterwards, ``$`` for anything (a whole list too), ``$N`` for the current
  sequence of the message that was N when the group began (tracking EXPUNGE), ``$modseqN``
  ordering, ``${case:x}``, ``$!unordered[=n]``/``$!noextra``/``$!extra``/``$!ignore=x``/
  ``$!ban=x`` and the same defaults (FETCH items unordered in pairs, FLAGS unordered with
  ``\\Recent`` ignored, LIST flags and STATUS items unordered), ``*`` must, ``!`` must
  not, ``?`` may appear. Tagged replies match as a prefix ("ok [read-write]").
  ``append`` alone appends the next mbox message; ``append <box> (flags)`` adds the
  message as the literal. A script without LOGOUT ends with one that must answer OK.
- Strings compare as imaptest's C strings do: up to their first NUL (so a BINARY literal
  starting with NUL matches any other that does, as in imaptest).
- Like imaptest, it fails a script on replies imaptest drops the connection for, whatever
  the script expects: a tagged BAD the script did not ask for, a message count that drops
  without EXPUNGE, an EXPUNGE of a sequence that is not there, a UID or INTERNALDATE that
  changes under a sequence, FLAGS that are not flags, VANISHED without QRESYNC, an untagged
  reply that is not an atom first, a reply for a tag never sent.
- The result is the first mismatch: the script line, the command, what was expected and
  what arrived (``ScriptResult.reason``), or a skip with the missing capability.
  imaptest goes on after a failure and counts commands; this runner stops at the first.
- Differences from imaptest, on purpose: literals in commands are sent as LITERAL+ when the
  server offers it, else synchronizing (imaptest requires LITERAL+); a connection logged in
  as another user (``user 2: $user2``) gets the test mailbox CREATEd before its SELECT
  (imaptest assumes that user has one); imaptest's fuller model
  of the mailbox (which session got \\Recent, flags owned by one session, headers and
  BODYSTRUCTURE compared across fetches) is not kept: it mostly logs rather than fails;
  ``Matcher`` is the matching alone, usable without a server.

Nothing here starts a server; tests/integration/test_imaptest_scripts.py runs the corpus
against a private Dovecot and against ``tachymail serve``. From a shell, against any server:
``python tests/imaptest.py --port 2143 --user U --password P ../shared/corpus/imaptest-tests``.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: imaptest's limit on a script's connections
MAX_CONNECTIONS = 100
#: the mailbox imaptest tests in, unless told otherwise
DEFAULT_MAILBOX = "imaptest"

STATES = ("nonauth", "auth", "created", "appended", "selected")


class ScriptError(Exception):
    """A script imaptest would refuse to run (bad header, unbalanced replies, ...)."""


class ImapParseError(Exception):
    """Input that is not IMAP arguments."""


class Atom(str):
    """An IMAP atom (a directive like ``$!unordered`` and a ``$var`` are atoms too)."""

    __slots__ = ()


class Text(str):
    """A quoted string or a literal (their contents, latin-1 decoded)."""

    __slots__ = ()


class Nil:
    """IMAP NIL."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NIL"


NIL = Nil()

Arg = Atom | Text | Nil | list["Arg"]

_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _up(text: str) -> str:
    """ASCII-only upper case, as C's toupper (latin-1 letters stay as they are)."""
    return text.translate(_UPPER)


# ---------------------------------------------------------------------------------------------
# IMAP argument parsing (script lines and server responses, the same rules for both)


def parse_args(text: str, *, lenient_tail: bool = False) -> list[Arg]:
    """The IMAP arguments of *text* (one response or script line, literals inline as
    ``{n}\\r\\n`` + n characters). Atoms end at a space or CR/LF, and at ``)`` inside a
    list; ``NIL`` is Nil. *lenient_tail*: text that does not parse (a human-readable
    resp-text with an unbalanced quote or parenthesis) becomes space-separated atoms."""
    args, _ = _parse_list(text, 0, inside=False, lenient=lenient_tail)
    return args


def _parse_list(text: str, pos: int, *, inside: bool, lenient: bool) -> tuple[list[Arg], int]:
    args: list[Arg] = []
    n = len(text)
    while True:
        while pos < n and text[pos] == " ":
            pos += 1
        if pos >= n or text[pos] in "\r\n":
            if inside:
                if lenient:
                    return args, n
                raise ImapParseError("missing ')'")
            return args, n
        start = pos
        try:
            char = text[pos]
            if char == "(":
                sub, pos = _parse_list(text, pos + 1, inside=True, lenient=False)
                args.append(sub)
            elif char == ")":
                if inside:
                    return args, pos + 1
                # outside a list a ')' is part of an atom (imaptest parses with ATOM_ALLCHARS)
                pos = _atom_end(text, pos, inside)
                args.append(Atom(text[start:pos]))
            elif char == '"':
                value, pos = _parse_quoted(text, pos)
                args.append(Text(value))
            elif char == "{" or (char == "~" and text.startswith("{", pos + 1)):
                value, pos = _parse_literal(text, pos)
                args.append(Text(value))
            else:
                pos = _atom_end(text, pos, inside)
                atom = text[start:pos]
                args.append(NIL if _up(atom) == "NIL" else Atom(atom))
        except ImapParseError:
            if not lenient:
                raise
            args.extend(Atom(word) for word in text[start:].split() if word)
            return args, n


def _atom_end(text: str, pos: int, inside: bool) -> int:
    n = len(text)
    while pos < n:
        char = text[pos]
        if char in " \r\n" or (char == ")" and inside):
            break
        pos += 1
    return pos


def _parse_quoted(text: str, pos: int) -> tuple[str, int]:
    out = []
    pos += 1
    n = len(text)
    while pos < n:
        char = text[pos]
        if char == "\\" and pos + 1 < n:
            out.append(text[pos + 1])
            pos += 2
        elif char == '"':
            return "".join(out), pos + 1
        else:
            out.append(char)
            pos += 1
    raise ImapParseError("unterminated quoted string")


_LITERAL = re.compile(r"~?\{(\d+)\+?\}\r?\n")
#: a literal in a command: " {n}" or " ~{n}" (or {n+}) at the end of a line
_COMMAND_LITERAL = re.compile(rb" (~?)\{(\d+)(\+?)\}\r\n")


def _parse_literal(text: str, pos: int) -> tuple[str, int]:
    match = _LITERAL.match(text, pos)
    if match is None:
        raise ImapParseError("bad literal")
    size = int(match.group(1))
    start = match.end()
    if start + size > len(text):
        raise ImapParseError("literal shorter than its size")
    return text[start : start + size], start + size


def format_args(args: Sequence[Arg]) -> str:
    """*args* written back as IMAP-ish text for messages (literals as quoted strings)."""
    out = []
    for arg in args:
        if isinstance(arg, list):
            out.append("(" + format_args(arg) + ")")
        elif isinstance(arg, Nil):
            out.append("NIL")
        elif isinstance(arg, Text):
            out.append('"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"')
        else:
            out.append(str(arg))
    return _show(" ".join(out))


def _show(text: str, limit: int = 400) -> str:
    """*text* for a one-line message: control characters escaped, at most *limit* long."""
    shown = "".join(
        c
        if " " <= c != "\x7f"
        else {"\r": "\\r", "\n": "\\n", "\t": "\\t"}.get(c, f"\\x{ord(c):02x}")
        for c in text[: limit + 1]
    )
    return shown if len(shown) <= limit else shown[:limit] + "..."


# ---------------------------------------------------------------------------------------------
# the script format


MUST, MUST_NOT, MAY = "*", "!", "?"


@dataclass
class Untagged:
    """One expected untagged reply: its arguments (directives inserted) and *existence*
    (``*`` must arrive, ``!`` must not, ``?`` may)."""

    args: list[Arg]
    existence: str
    line: int


@dataclass
class Command:
    tag: int  # the script's tagN, 0 when none
    text: str  # the command after the tag/reply words, literals inline
    reply: list[Arg] | None  # the expected tagged reply from its status word on
    line: int


@dataclass
class Group:
    """Commands sent together on one connection, and the untagged replies they expect."""

    connection: int  # 0-based
    commands: list[Command] = field(default_factory=list)
    untagged: list[Untagged] = field(default_factory=list)
    ordered: bool = False
    bye: bool = False
    sleep: float = 0.0
    pending: int = 0


@dataclass
class Script:
    name: str
    path: Path
    mbox: Path
    capabilities: tuple[str, ...] = ()
    connections: int = 1
    users: dict[int, str] = field(default_factory=dict)  # 0-based connection -> template
    messages: int | None = None  # None: all of the mbox (the default, as documented)
    state: str = "selected"
    ignore_extra_untagged: bool = True
    banner_check: bool = False
    groups: list[Group] = field(default_factory=list)


_REPLY_WORDS = {"OK": "ok", "NO": "no", "BAD": "bad", '""': ""}


def _cmd_reply(line: str) -> tuple[list[Arg] | None, int, str]:
    """(expected reply or None, tag number, the rest) of a command or reply line."""
    tag = 0
    word, _, rest = line.partition(" ")
    if _up(word[:3]) == "TAG" and word[3:].isdigit() and int(word[3:]) > 0 and " " in line:
        tag = int(word[3:])
        line = rest
        word, _, rest = line.partition(" ")
    status = _REPLY_WORDS.get(_up(word))
    if status is None:
        return None, tag, line
    return [Atom(status)], tag, rest


class _ScriptParser:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.group: Group | None = None
        self.ifenv: list[tuple[int, bool, bool]] = []  # (line, skip before, else seen)
        self.skip = False

    def header(self, line: str) -> None:
        key, colon, value = line.partition(":")
        if not colon:
            raise ScriptError("missing ':' in a header line")
        key = key.strip().lower()
        value = value.strip()
        script = self.script
        if key == "capabilities":
            script.capabilities = tuple(value.split())
        elif key == "connections":
            count = int(value) if value.isdigit() else 0
            if not 0 < count <= MAX_CONNECTIONS:
                raise ScriptError("bad connection count")
            script.connections = count
        elif key == "ignore_extra_untagged":
            script.ignore_extra_untagged = value[:1] == "y"
        elif key.startswith("user ") and key[5:].isdigit() and int(key[5:]) > 0:
            script.users[int(key[5:]) - 1] = value
        elif key == "messages":
            script.messages = None if value == "all" else int(re.match(r"\d*", value)[0] or 0)  # type: ignore[index]
        elif key == "state":
            if value.lower() not in STATES:
                raise ScriptError(f"unknown state {value!r}")
            script.state = value.lower()
        else:
            raise ScriptError(f"unknown setting {key!r}")

    def command_line(self, number: int, line: str) -> None:
        for prefix, negate in (("!ifenv ", False), ("!ifnenv ", True)):
            if line.startswith(prefix):
                have = os.environ.get(line[len(prefix) :]) is not None
                self.ifenv.append((number, self.skip, False))
                if have == negate:
                    self.skip = True
                return
        if line == "!else":
            if not self.ifenv:
                raise ScriptError("!else without !ifenv")
            start, before, seen = self.ifenv[-1]
            if seen:
                raise ScriptError("!else already seen")
            self.ifenv[-1] = (start, before, True)
            if not before:
                self.skip = not self.skip
            return
        if line == "!endif":
            if not self.ifenv:
                raise ScriptError("!endif without !ifenv")
            self.skip = self.ifenv.pop()[1]
            return
        if self.skip:
            return
        script = self.script
        group = self.group
        if group is not None:
            if line.startswith("!sleep "):
                group.sleep = _interval(line[7:])
                return
            if line.startswith("!output "):
                return  # imaptest prints it; nothing to check
            if line == "!ordered":
                group.ordered = True
                return
            if line[:2] in ("* ", "! ", "? "):
                self.untagged(group, line[2:], line[0], number)
                return
            if group.pending > 0:
                reply_line, conn = line, 0
                if script.connections > 1:
                    word, _, rest = line.partition(" ")
                    if word.isdigit() and int(word) > 0:
                        conn, reply_line = int(word), rest
                reply, tag, _ = _cmd_reply(reply_line)
                if reply is not None:
                    if script.connections > 1:
                        if conn == 0:
                            raise ScriptError("missing connection number")
                        if conn - 1 != group.connection:
                            raise ScriptError("reply for the wrong connection")
                    self.finish(group, tag, reply_line)
                    return
        if group is None or group.pending == 0:
            group = Group(connection=0)
            self.group = group
            script.groups.append(group)
        if script.connections > 1:
            word, _, rest = line.partition(" ")
            if not word.isdigit() or int(word) == 0:
                raise ScriptError("missing connection number")
            conn = int(word)
            if conn > MAX_CONNECTIONS:
                raise ScriptError("too many connections")
            if group.commands and group.connection != conn - 1:
                raise ScriptError("all pipelined commands must use the same connection")
            group.connection = conn - 1
            script.connections = max(script.connections, conn)
            line = rest
        reply, tag, text = _cmd_reply(line)
        if tag == 0:
            if group.pending > 0:
                raise ScriptError("missing reply from the previous command group")
        elif any(c.tag == tag for c in group.commands):
            raise ScriptError("tag reused within a command group")
        if not group.commands and text[:2] in ("* ", "! ", "? "):
            script.banner_check = True
            self.untagged(group, text[2:], text[0], number)
            return
        if reply is None:
            group.pending += 1
        group.commands.append(Command(tag, text, reply, number))

    def finish(self, group: Group, tag: int, line: str) -> None:
        for command in group.commands:
            if command.tag == tag:
                break
        else:
            raise ScriptError("reply for an unknown tag")
        if command.reply is not None:
            raise ScriptError("command already has a reply")
        try:
            args = parse_args(line)
        except ImapParseError as exc:
            raise ScriptError(f"bad reply line: {exc}") from None
        command.reply = args[1:] if tag else args
        group.pending -= 1

    def untagged(self, group: Group, text: str, existence: str, number: int) -> None:
        try:
            args = parse_args(text)
        except ImapParseError as exc:
            raise ScriptError(f"bad untagged line: {exc}") from None
        name = ""
        if args and isinstance(args[0], Atom):
            name = args[0]
            if (name[:1] == "$" or name[:1].isdigit()) and len(args) > 1:
                name = args[1] if isinstance(args[1], Atom) else ""
        _directives(args, _ListContext(name.lower(), None, None, 0))
        if _up(name).startswith("BYE"):
            if existence == MUST:
                group.bye = True
            elif existence == MAY:
                raise ScriptError("? BYE is not supported")
        group.untagged.append(Untagged(args, existence, number))


def _interval(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+)\s*(ms|msecs?|s|secs?)?\s*", text)
    if not match:
        raise ScriptError(f"bad !sleep value {text!r}")
    value = int(match.group(1))
    return value / 1000 if (match.group(2) or "").startswith("m") else float(value)


@dataclass
class _ListContext:
    reply: str  # the untagged reply's name, lower case
    parent: _ListContext | None
    prev_atom: str | None
    chain_index: int
    chain: int = 1
    directives: bool = False


_DIRECTIVE = re.compile(r"\$!(unordered(=\d+)?|ordered|noextra|extra|ignore=.*|ban=.*)$")


def _directives(args: list[Arg], ctx: _ListContext) -> None:
    """Check a list's ``$!`` directives and insert imaptest's defaults where it has none."""
    for arg in args:
        if not (isinstance(arg, Atom) and arg.startswith("$!")):
            break
        if not _DIRECTIVE.match(arg):
            raise ScriptError(f"unknown directive {arg}")
        ctx.directives = True
        if arg.startswith("$!unordered="):
            ctx.chain = int(arg[12:])
    if not ctx.directives:
        _default_directives(args, ctx)
    count = sum(1 for a in args if not (isinstance(a, Atom) and a.startswith("$!")))
    if ctx.chain == 0 or count % ctx.chain:
        raise ScriptError(f"list argument count is not a multiple of the chain {ctx.chain}")
    prev: str | None = None
    for i, arg in enumerate(args):
        if isinstance(arg, Atom):
            prev = arg.lower()
        if isinstance(arg, list):
            index = i if ctx.chain == 1 else i % ctx.chain
            _directives(arg, _ListContext(ctx.reply, ctx, prev, index))


def _default_directives(args: list[Arg], ctx: _ListContext) -> None:
    parent = ctx.parent
    if parent is None:
        return
    top_child = parent.parent is None and parent.chain_index == 0
    inserted: list[str] = []
    if ctx.reply in ("list", "lsub"):
        if top_child and ctx.chain_index == 1:
            inserted = ["$!unordered"]  # LIST (flags) sep name
    elif ctx.reply == "status":
        if top_child and ctx.chain_index == 2:
            inserted = ["$!unordered=2"]  # STATUS name (items)
    elif ctx.reply == "fetch":
        if top_child and ctx.chain_index == 2:
            inserted = ["$!unordered=2"]  # seq FETCH (items)
        elif (
            parent.parent is not None
            and parent.parent.parent is None
            and parent.parent.chain_index == 0
            and parent.chain_index == 2
            and ctx.prev_atom == "flags"
        ):
            inserted = [
                "$!unordered",
                "$!noextra",
                "$!ignore=\\recent",
                "$!ignore=$HasAttachment",
                "$!ignore=$HasNoAttachment",
            ]
    if inserted:
        args[0:0] = [Atom(d) for d in inserted]
        if inserted[0].startswith("$!unordered="):
            ctx.chain = int(inserted[0][12:])


def _script_lines(data: bytes) -> Iterable[tuple[int, str]]:
    """(line number, logical line) with ``{{{ ... }}}`` blocks turned into literals."""
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    elif raw_lines:
        raise ScriptError("the last line does not end with LF")
    multiline = ""
    start_pos = last_end = 0
    binary = continues = False
    start_line = 0
    for number, raw in enumerate(raw_lines, 1):
        # a CR before the LF stays part of the line, as imaptest reads scripts: inside a
        # ~{{{ binary block that is how a CRLF is written, elsewhere lines end in LF
        line = raw.decode("latin-1")
        if continues:
            if not line.startswith("}}}"):
                multiline += line
                last_end = len(multiline)
                multiline += "\n" if binary else "\r\n"
                continue
            multiline = multiline[:last_end]
            rest = line[3:]
            size = len(multiline) - start_pos
            multiline = (
                multiline[:start_pos]
                + ("~" if binary else "")
                + f"{{{size}}}\r\n"
                + multiline[start_pos:]
            )
            if rest.endswith("{{{"):
                binary = rest.endswith("~{{{")
                multiline += rest[: -4 if binary else -3]
                start_pos = last_end = len(multiline)
                continue
            line = multiline + rest
            continues = False
            yield start_line, line
            continue
        start_line = number
        if line.endswith("{{{") and not line.startswith("#"):
            binary = line.endswith("~{{{")
            multiline = line[: -4 if binary else -3]
            start_pos = last_end = len(multiline)
            continues = True
            continue
        yield number, line
    if continues:
        raise ScriptError(f"multiline literal at line {start_line} not ended")


def parse_script(path: Path, default_mbox: Path | None = None) -> Script:
    """The script at *path* (see the module docstring); ScriptError if imaptest would
    refuse it. Its messages: <path>.mbox, else *default_mbox*, else default.mbox beside
    it."""
    mbox = path.with_name(path.name + ".mbox")
    if not mbox.exists():
        mbox = default_mbox or path.with_name("default.mbox")
    if not mbox.is_file():
        raise ScriptError(f"{path.name}: no {mbox} to take its messages from")
    script = Script(name=path.name, path=path, mbox=mbox)
    parser = _ScriptParser(script)
    header = True
    try:
        for number, line in _script_lines(path.read_bytes()):
            if line == "":
                header = False
                continue
            if line.startswith("#"):
                continue
            if header:
                parser.header(line)
            else:
                parser.command_line(number, line)
    except ScriptError as exc:
        raise ScriptError(f"{path.name} line {number}: {exc}") from None
    if not script.groups:
        raise ScriptError(f"{path.name}: no commands")
    if script.groups[-1].pending:
        raise ScriptError(f"{path.name}: missing reply at the end")
    if parser.ifenv:
        raise ScriptError(f"{path.name}: !ifenv at line {parser.ifenv[0][0]} not closed")
    has_logout = any(
        g.bye or any(c.text.lower() == "logout" for c in g.commands) for g in script.groups
    )
    if not has_logout:
        script.groups.append(Group(0, [Command(0, "logout", [Atom("ok")], 0)]))
    return script


# ---------------------------------------------------------------------------------------------
# the mbox a script appends from


_FROM_LINE = re.compile(
    rb"From \S+\s+[A-Za-z]{3}\s+([A-Za-z]{3})\s+(\d{1,2})\s+(\d{1,2}):(\d{2})(?::(\d{2}))?"
    rb"(?:\s+([+-]\d{4}|[A-Z]{3,4}))?\s+(\d{4})(?:\s+([+-]\d{4}))?\s*$"
)


@dataclass
class MboxMessage:
    content: bytes  # CRLF line ends
    internaldate: str  # "22-Feb-2008 17:06:23 +0000"


def read_mbox(path: Path) -> list[MboxMessage]:
    """The messages of an mbox as imaptest reads them: everything between valid From_
    lines (the blank line before the next From_ included), LF turned into CRLF, the
    date of the From_ line as INTERNALDATE."""
    messages: list[MboxMessage] = []
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    date = ""
    body: list[bytes] | None = None
    for line in lines:
        match = _FROM_LINE.match(line.rstrip(b"\r"))
        if match and (body is None or body):
            if body is not None:
                messages.append(MboxMessage(_crlf(body), date))
            month, day, hour, minute, second, tz1, year, tz2 = (
                (g or b"").decode() for g in match.groups()
            )
            zone = tz2 or (tz1 if tz1[:1] in "+-" else "") or "+0000"
            date = (
                f"{int(day):02d}-{month.capitalize()}-{year} "
                f"{int(hour):02d}:{minute}:{second or '00'} {zone}"
            )
            body = []
            continue
        if body is None:
            raise ScriptError(f"{path} is not an mbox (no From_ line first)")
        body.append(line)
    if body:
        messages.append(MboxMessage(_crlf(body), date))
    if not messages:
        raise ScriptError(f"{path} has no messages")
    return messages


def _crlf(lines: list[bytes]) -> bytes:
    return b"".join(line + (b"\n" if line.endswith(b"\r") else b"\r\n") for line in lines)


class _Source:
    """The mbox's messages in order, wrapping around, shared by a script's connections."""

    def __init__(self, path: Path) -> None:
        self.messages = read_mbox(path)
        self.next = 0

    def take(self) -> MboxMessage:
        message = self.messages[self.next % len(self.messages)]
        self.next += 1
        return message


# ---------------------------------------------------------------------------------------------
# running a script


class ScriptFailed(Exception):
    """The first mismatch of a script (the text is the result's reason)."""


class _Skip(Exception):
    pass


@dataclass
class ScriptResult:
    """How one script went: passed, skipped (reason: the missing capability), or failed
    (reason: the script line, the command, what was expected and what came)."""

    name: str
    passed: bool
    skipped: bool = False
    reason: str = ""

    @property
    def outcome(self) -> str:
        return "skip" if self.skipped else "pass" if self.passed else "FAIL"


@dataclass
class _Response:
    kind: str  # "untagged", "tagged", "continuation"
    tag: str
    args: list[Arg]  # after the tag ("OK ..." / "1 FETCH (...)")
    raw: str


class _Connection:
    """One IMAP connection: raw socket writes, responses read whole (literals included)."""

    def __init__(
        self,
        index: int,
        host: str,
        port: int,
        timeout: float,
        tls: ssl.SSLContext | None,
    ) -> None:
        self.index = index
        self.sock = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname=host)
        self.buffer = b""
        self.tag_counter = 0
        self.uids: list[int] = []  # the selected mailbox's messages by sequence, 0: UID unknown
        self.dates: dict[int, str] = {}  # INTERNALDATE seen for a UID
        self.qresync = False
        self.capabilities: set[str] = set()
        self.closed = False
        self.saw_bye = False
        self.banner: _Response | None = None

    def new_tag(self) -> str:
        self.tag_counter += 1
        return f"{self.index + 1}.{self.tag_counter}"

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise ScriptFailed(
                f"connection {self.index + 1}: no reply within {self.sock.gettimeout()} s"
            ) from None
        except OSError as exc:
            data = b""
            if not self.saw_bye:
                raise ScriptFailed(f"connection {self.index + 1}: {exc}") from None
        if not data:
            self.closed = True
            raise ConnectionClosed(self.index)
        self.buffer += data

    def read_line_raw(self) -> bytes:
        while b"\n" not in self.buffer:
            self._fill()
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def read(self) -> _Response:
        """The next response, with its literals."""
        data = self.read_line_raw()
        while True:
            match = re.search(rb"~?\{(\d+)\+?\}\r?\n$", data)
            if not match:
                break
            size = int(match.group(1))
            while len(self.buffer) < size:
                self._fill()
            data += self.buffer[:size]
            self.buffer = self.buffer[size:]
            data += self.read_line_raw()
        text = data.decode("latin-1")
        # only the final line end goes: a literal at the very end keeps its own CRLFs
        line = text[:-2] if text.endswith("\r\n") else text[:-1]
        tag, _, rest = line.partition(" ")
        if tag == "+":
            return _Response("continuation", "+", [Atom(rest)], line)
        # resp-text after OK/NO/BAD/BYE/PREAUTH is free text: parse it leniently
        lenient = bool(re.match(r"(\d+ )?(OK|NO|BAD|BYE|PREAUTH)\b", rest[:12], re.IGNORECASE))
        try:
            args = parse_args(rest, lenient_tail=lenient)
        except ImapParseError as exc:
            raise ScriptFailed(f"unparseable response ({exc}): {line[:300]}") from None
        kind = "untagged" if tag == "*" else "tagged"
        return _Response(kind, tag, args, line)

    def close(self) -> None:
        """LOGOUT without waiting for the answer (as imaptest does for a skipped script),
        then close."""
        with contextlib.suppress(OSError):
            if not self.closed:
                self.sock.sendall(b"Z LOGOUT\r\n")
        with contextlib.suppress(OSError):
            self.sock.close()


class ConnectionClosed(Exception):
    def __init__(self, index: int) -> None:
        super().__init__(f"connection {index + 1} closed by the server")
        self.index = index


def _astring(arg: Arg) -> str | None:
    return arg if isinstance(arg, str) else None


class Matcher:
    """imaptest's matching of server replies against a script's expectations: the
    variables captured so far (``variables``), the sequence map behind ``$N``
    (``seqmap``: initial sequence - 1 -> current one, 0 once expunged) and the ``$modseqN``
    bookkeeping."""

    def __init__(self) -> None:
        self.variables: dict[str, str] = {}
        self.added: list[str] = []
        self.seqmap: list[int] = []
        self.modseq_index = 0
        self.modseq_value = 0

    # -- variables and matching ---------------------------------------------------------

    def _relative(self, seq: int) -> str:
        if seq == 0:
            return "<zero seq>"
        if seq > len(self.seqmap):
            return "<out of range>"
        if self.seqmap[seq - 1] == 0:
            return "<expunged>"
        return str(self.seqmap[seq - 1])

    def expand(self, text: str) -> str:
        """A command line with its ``$variables`` replaced (ScriptFailed for an unset one)."""
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            char = text[i]
            if char != "$" or i + 1 == n:
                out.append(char)
                i += 1
                continue
            i += 1
            if text[i] == "$":
                out.append("$")
                i += 1
                continue
            if text[i] == "!":
                while i + 1 < n and text[i + 1] != " ":
                    i += 1
                i += 1
                continue
            if text[i] == "{":
                end = text.find("}", i)
                if end < 0:
                    raise ScriptFailed("missing '}' in a variable")
                name, i = text[i + 1 : end], end + 1
            else:
                start = i
                while i < n and (text[i].isalnum() or text[i] == "_"):
                    i += 1
                name = text[start:i]
            if name.isdigit():
                out.append(self._relative(int(name)))
            elif name in self.variables:
                out.append(self.variables[name])
            else:
                raise ScriptFailed(f"uninitialized variable ${name}")
        return "".join(out)

    def _new_modseq(self, index: int, value: str) -> str:
        if not value.isdigit():
            return "$modseq-not-number"
        number = int(value)
        if self.modseq_index > index:
            return "$modseq-order-mismatch"
        least = self.modseq_value + (index - self.modseq_index)
        result = value
        if number < least:
            result = f"$modseq-at-least-{least}"
            number = least
        self.modseq_index, self.modseq_value = index, number
        return result

    def expand_input(self, pattern: str, data: str) -> tuple[str | None, bool]:
        """(*pattern* with its variables expanded against *data*, or None when a fixed
        character already differs; case-insensitive?). Unset variables take their value
        from *data*: up to the next fixed character of the pattern."""
        icase = True
        out: list[str] = []
        i, n = 0, len(pattern)
        pos = 0
        while i < n:
            char = pattern[i]
            if char != "$" or pattern[i + 1 : i + 2] == "$":
                if char == "$":
                    i += 1
                    char = pattern[i]
                if pos >= len(data) or _up(char) != _up(data[pos]):
                    return None, icase
                pos += 1
                out.append(char)
                i += 1
                continue
            i += 1
            if i < n and pattern[i] == "{":
                end = pattern.find("}", i + 1)
                if end < 0:
                    return "", icase
                name, i = pattern[i + 1 : end], end + 1
            else:
                start = i
                while i < n and (pattern[i].isalnum() or pattern[i] == "_"):
                    i += 1
                name = pattern[start:i]
            rest = pattern[i:]
            if name.isdigit():
                value = self._relative(int(name))
            elif name.startswith("case:"):
                icase = False
                value = name[5:]
            else:
                found = self.variables.get(name) if name else None
                if found is None:
                    # capture up to the next fixed character of the pattern
                    stop_text = rest
                    stop_icase = True
                    if rest.startswith("$") and not rest.startswith("$$"):
                        expanded, stop_icase = self.expand_input(rest, data[pos:])
                        stop_text = expanded or ""
                    elif rest.startswith("$$"):
                        stop_text = rest[1:]
                    stop = stop_text[:1]
                    end = pos
                    while end < len(data) and (
                        (_up(data[end]) != _up(stop)) if stop_icase else (data[end] != stop)
                    ):
                        end += 1
                    if not stop:
                        end = len(data)
                    captured = data[pos:end]
                    if not name:
                        value = captured
                    elif name.startswith("modseq") and name[6:].isdigit():
                        value = self._new_modseq(int(name[6:]), captured)
                        self.variables[name] = value
                    else:
                        value = captured
                        self.variables[name] = value
                        self.added.append(name)
                else:
                    value = found
            out.append(value)
            if data[pos : pos + len(value)] != value:
                return None, icase
            pos += len(value)
        return "".join(out), icase

    def match_args(
        self, match: Sequence[Arg], args: Sequence[Arg], limit: int | None, prefix: bool
    ) -> int | None:
        """None when *args* match *match* (imaptest's rules); else how many matched."""
        count = 0
        mi = ai = 0
        while mi < len(match) and (limit is None or count < limit):
            m = match[mi]
            a = args[ai] if ai < len(args) else None
            if isinstance(m, Nil):
                if not isinstance(a, Nil):
                    return count
            elif isinstance(m, list):
                if not isinstance(a, list):
                    return count
                sub = self.match_list(m, a)
                if sub is not None:
                    return count + sub
            else:
                if m == "$" and isinstance(a, list):
                    pass  # "$" skips a whole list
                elif m == "$]":
                    # skip atoms until one with "]" (e.g. "OK [CAPABILITY $] text")
                    while isinstance(a, Atom) and "]" not in a:
                        ai += 1
                        a = args[ai] if ai < len(args) else None
                else:
                    value = _astring(a) if a is not None else None
                    if value is None:
                        return count
                    # imaptest holds strings as C strings: both sides end at a NUL
                    value = value.split("\0", 1)[0]
                    expanded, icase = self.expand_input(m.split("\0", 1)[0], value)
                    if expanded is None:
                        return count
                    if prefix and mi == len(match) - 1:
                        same = (
                            _up(value).startswith(_up(expanded))
                            if icase
                            else value.startswith(expanded)
                        )
                    else:
                        same = _up(value) == _up(expanded) if icase else value == expanded
                    if not same:
                        return count
            count += 1
            mi += 1
            ai += 1
        if prefix or ai >= len(args) or (limit is not None and count >= limit):
            return None
        return count

    def match_list(self, match: Sequence[Arg], args: Sequence[Arg]) -> int | None:
        unordered = False
        chain = 1
        noextra: bool | None = None
        ignores: list[str] = []
        bans: list[str] = []
        start = 0
        for m in match:
            if not (isinstance(m, Atom) and m.startswith("$!")):
                break
            start += 1
            word = m[2:]
            if word.startswith("unordered"):
                unordered = True
                if noextra is None:
                    noextra = False
                if word.startswith("unordered="):
                    chain = int(word[10:])
            elif word == "ordered":
                unordered = False
            elif word == "extra":
                noextra = False
            elif word == "noextra":
                noextra = True
            elif word.startswith("ignore="):
                ignores.append(_up(word[7:]))
            elif word.startswith("ban="):
                bans.append(_up(word[4:]))
        if noextra is None:
            noextra = True
        match = match[start:]
        if not unordered:
            return self.match_args(match, args, None, False)
        if len(args) % chain:
            return 0
        matched = [False] * len(args)
        found = 0
        for mi in range(0, len(match), chain):
            for ai in range(0, len(args), chain):
                if self.match_args(match[mi : mi + chain], args[ai:], chain, False) is None:
                    matched[ai] = True
                    break
            else:
                return found
            found += 1
        if noextra:
            for ai in range(0, len(args), chain):
                value = _astring(args[ai])
                if not matched[ai] and value is not None and _up(value) not in ignores:
                    return found
        elif bans:
            for ai in range(0, len(args), chain):
                value = _astring(args[ai])
                if not matched[ai] and value is not None and _up(value) in bans:
                    return found
        return None


class _Run(Matcher):
    """The state of one script's run: connections, variables, the current group."""

    def __init__(
        self,
        script: Script,
        host: str,
        port: int,
        users: Sequence[tuple[str, str]],
        mailbox: str,
        timeout: float,
        tls: ssl.SSLContext | None,
        literal_plus: bool = True,
    ) -> None:
        super().__init__()
        self.literal_plus = literal_plus
        self.script = script
        self.host, self.port, self.timeout, self.tls = host, port, timeout, tls
        self.users = users
        self.mailbox = mailbox
        self.source = _Source(script.mbox)
        self.connections: list[_Connection] = []
        self.group: Group | None = None
        self.tag_of: dict[int, str] = {}  # id() of a script command -> the tag it was sent with
        # the current group's matching state
        self.received: list[bool] = []
        self.best: dict[int, tuple[int, str]] = {}
        self.extra_count = 0
        self.first_extra: str | None = None

    # -- connections ----------------------------------------------------------------------

    def connect(self) -> None:
        for index in range(self.script.connections):
            conn = _Connection(index, self.host, self.port, self.timeout, self.tls)
            self.connections.append(conn)

    def command(self, conn: _Connection, text: str, *, literal: bytes | None = None) -> _Response:
        """Send one setup command (and *literal* as its last argument); its tagged reply,
        untagged replies noted (EXISTS, CAPABILITY) and otherwise ignored."""
        tag = conn.new_tag()
        try:
            refused = self._send(
                conn, tag, text.encode("latin-1"), literal, lambda r: self._note(conn, r)
            )
            if refused is not None:
                return refused
            while True:
                response = conn.read()
                self._note(conn, response)
                if response.kind == "tagged" and response.tag == tag:
                    return response
        except ScriptFailed as exc:
            raise ScriptFailed(f"setup: `{text[:100]}`: {exc}") from None

    def _send(
        self,
        conn: _Connection,
        tag: str,
        line: bytes,
        literal: bytes | None,
        on_response: Callable[[_Response], None],
    ) -> _Response | None:
        """Write ``tag line`` (+ *literal*), turning every ``{n}`` literal into LITERAL+
        when the server has it, else waiting for the "+" continuation. The command's own
        tagged reply when it came instead of a continuation (the rest is not sent), else
        None; other responses meanwhile go to *on_response*."""
        data = tag.encode() + b" " + line
        if literal is not None:
            data += b" {%d}\r\n" % len(literal) + literal
        data += b"\r\n"
        plus = self.literal_plus and "LITERAL+" in conn.capabilities
        out = b""
        pos = 0
        for marker in _COMMAND_LITERAL.finditer(data):
            if marker.start() < pos:
                continue  # inside the previous literal's octets
            size = int(marker.group(2))
            sync = marker.group(3) == b""
            out += data[pos : marker.start()] + b" " + marker.group(1) + b"{" + marker.group(2)
            if sync and plus:
                sync = False
            out += (b"}" if sync else b"+}") + b"\r\n"
            if sync:
                conn.send(out)
                out = b""
                refused = self._wait_continuation(conn, tag, on_response)
                if refused is not None:
                    return refused
            out += data[marker.end() : marker.end() + size]
            pos = marker.end() + size
        conn.send(out + data[pos:])
        return None

    def _wait_continuation(
        self, conn: _Connection, tag: str, on_response: Callable[[_Response], None]
    ) -> _Response | None:
        while True:
            response = conn.read()
            if response.kind == "continuation":
                return None
            on_response(response)
            if response.kind == "tagged" and response.tag == tag:
                return response

    def _note(self, conn: _Connection, response: _Response) -> None:
        """Track what the connection knows (message count, UIDs, INTERNALDATEs,
        capabilities) and fail on what makes imaptest drop the connection as broken
        input: a message count that drops, an EXPUNGE of a message that is not there, a
        UID or INTERNALDATE that changes, FLAGS that are not flags, VANISHED without
        QRESYNC, an untagged reply that does not start with an atom."""
        args = response.args
        if response.kind != "untagged":
            if response.kind == "tagged":
                self._capability_code(conn, args)
            return
        if not args or not isinstance(args[0], Atom):
            raise ScriptFailed(f"invalid untagged reply: {_show(response.raw)}")
        first = _up(args[0])
        if first.isdigit():
            if len(args) < 2 or not isinstance(args[1], Atom):
                raise ScriptFailed(f"invalid untagged reply: {_show(response.raw)}")
            self._numbered(conn, int(first), _up(args[1]), args[2:], response)
        elif first == "CAPABILITY":
            conn.capabilities = {_up(a) for a in args[1:] if isinstance(a, str)}
        elif first in ("OK", "PREAUTH"):
            self._capability_code(conn, args)
        elif first == "BYE":
            conn.saw_bye = True
        elif first == "FLAGS":
            if len(args) < 2 or not isinstance(args[1], list) or not _valid_flags(args[1]):
                raise ScriptFailed(f"broken FLAGS: {_show(response.raw)}")
        elif first == "ENABLED":
            if any(_up(a) == "QRESYNC" for a in args[1:] if isinstance(a, str)):
                conn.qresync = True
        elif first == "VANISHED":
            if not conn.qresync:
                raise ScriptFailed(f"VANISHED without QRESYNC enabled: {_show(response.raw)}")
            if not (len(args) > 2 and isinstance(args[1], list)):  # (EARLIER) changes nothing
                gone = _set_members(args[-1] if isinstance(args[-1], str) else "")
                kept = [u for u in conn.uids if not (u and u in gone)]
                # UIDs it never learnt: drop as many of the unknown messages, from the end
                unknown = len(gone) - (len(conn.uids) - len(kept))
                for _ in range(max(0, unknown)):
                    if 0 not in kept:
                        break
                    del kept[len(kept) - 1 - kept[::-1].index(0)]
                conn.uids = kept

    def _numbered(
        self, conn: _Connection, number: int, what: str, rest: Sequence[Arg], response: _Response
    ) -> None:
        count = len(conn.uids)
        if what == "EXISTS":
            if number < count:
                raise ScriptFailed(f"message count dropped {count} -> {number}")
            conn.uids.extend([0] * (number - count))
        elif what == "EXPUNGE":
            if not 0 < number <= count:
                raise ScriptFailed(f"EXPUNGE of sequence {number} with only {count} messages")
            del conn.uids[number - 1]
        elif what == "FETCH":
            if len(rest) != 1 or not isinstance(rest[0], list):
                raise ScriptFailed(f"FETCH without a list: {_show(response.raw)}")
            if not 0 < number <= count:
                return  # imaptest only warns about a sequence it does not know
            items = rest[0]
            uid = conn.uids[number - 1]
            for i in range(0, len(items) - 1, 2):
                item, value = items[i], items[i + 1]
                if not isinstance(item, Atom):
                    continue
                name = _up(item)
                if name == "UID" and isinstance(value, Atom) and value.isdigit():
                    if uid and uid != int(value):
                        raise ScriptFailed(f"UID changed for sequence {number}: {uid} -> {value}")
                    uid = conn.uids[number - 1] = int(value)
                elif name == "FLAGS":
                    if not isinstance(value, list) or not _valid_flags(value):
                        raise ScriptFailed(f"broken FETCH FLAGS: {_show(response.raw)}")
                elif name == "INTERNALDATE" and uid:
                    if not isinstance(value, str) or not _INTERNALDATE.match(value):
                        raise ScriptFailed(f"broken INTERNALDATE: {_show(response.raw)}")
                    old = conn.dates.setdefault(uid, value.strip())
                    if old != value.strip():
                        raise ScriptFailed(f"UID {uid} INTERNALDATE changed {old} -> {value}")

    def _capability_code(self, conn: _Connection, args: Sequence[Arg]) -> None:
        words = [a for a in args if isinstance(a, str)]
        if len(words) > 1 and _up(words[1]) == "[CAPABILITY":
            caps = []
            for word in words[2:]:
                caps.append(_up(word.split("]")[0]))
                if "]" in word:
                    break
            conn.capabilities = {c for c in caps if c}

    # -- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        script = self.script
        self.connect()
        first = self.connections[0]
        for conn in self.connections:
            banner = conn.read()
            self._note(conn, banner)
            conn.banner = banner  # a banner check in the script matches it in run()
        for index in range(len(self.connections)):
            user, password = self._user(index)
            key = "" if index == 0 else str(index + 1)
            self.variables["user" + key] = user
            self.variables["username" + key] = user.split("@")[0]
            self.variables["domain" + key] = user.split("@", 1)[1] if "@" in user else self.host
            self.variables["password" + key] = password
        self.variables["mailbox"] = self.mailbox
        self.variables["mailbox_url"] = urllib.parse.quote(self.mailbox, safe="/;:@&=+$,!~*'()")
        if script.state == "nonauth":
            if not first.capabilities:
                self.command(first, "CAPABILITY")
            self._check_capabilities(first)
            return
        for index, conn in enumerate(self.connections):
            user, password = self._user(index)
            reply = self.command(conn, f"LOGIN {_quote(user)} {_quote(password)}")
            if _status(reply) != "OK":
                raise ScriptFailed(f"setup: LOGIN {user} failed: {reply.raw}")
        self.command(first, "CAPABILITY")
        self._check_capabilities(first)
        for conn in self.connections[1:]:
            self.command(conn, "CAPABILITY")
        pattern = _quote(self.mailbox + "*")
        boxes: list[str] = []
        subscribed: list[str] = []
        for verb, into in (("LIST", boxes), ("LSUB", subscribed)):
            tag = first.new_tag()
            first.send(f'{tag} {verb} "" {pattern}\r\n'.encode("latin-1"))
            while True:
                response = first.read()
                if response.kind == "tagged" and response.tag == tag:
                    break
                args = response.args
                if (
                    len(args) >= 4
                    and isinstance(args[0], str)
                    and _up(args[0]) == verb
                    and isinstance(args[1], list)
                    and isinstance(args[3], str)
                ):
                    into.append(args[3])
                self._note(first, response)
            if _status(response) != "OK":
                raise ScriptFailed(f"setup: {verb} failed: {_show(response.raw)}")
        for verb, names in (("DELETE", boxes), ("UNSUBSCRIBE", subscribed)):
            for name in sorted(set(names), key=_up, reverse=True):
                reply = self.command(first, f"{verb} {_quote(name)}")
                if _status(reply) == "BAD":
                    raise ScriptFailed(f"setup: {verb} {name}: {reply.raw}")
        if script.state == "auth":
            return
        if _up(self.mailbox) != "INBOX":
            reply = self.command(first, f"CREATE {_quote(self.mailbox)}")
            if _status(reply) != "OK":
                raise ScriptFailed(f"setup: CREATE {self.mailbox} failed: {reply.raw}")
        if script.state == "created":
            return
        count = len(self.source.messages) if script.messages is None else script.messages
        for _ in range(count):
            message = self.source.take()
            reply = self.command(
                first,
                f'APPEND {_quote(self.mailbox)} "{message.internaldate}"',
                literal=message.content,
            )
            if _status(reply) != "OK":
                raise ScriptFailed(f"setup: APPEND failed: {reply.raw}")
        if script.state == "appended":
            return
        for index, conn in enumerate(self.connections):
            conn.uids = []
            if self._user(index)[0] != self._user(0)[0]:
                # another user ($user2) has no test mailbox of its own yet: imaptest
                # assumes one exists, this runner makes it (a NO if it is there is fine)
                self.command(conn, f"CREATE {_quote(self.mailbox)}")
            reply = self.command(conn, f"SELECT {_quote(self.mailbox)}")
            if _status(reply) != "OK":
                raise ScriptFailed(f"setup: SELECT {self.mailbox} failed: {reply.raw}")

    def _user(self, index: int) -> tuple[str, str]:
        template = self.script.users.get(index)
        if template in ("$user2", "${user2}"):
            if len(self.users) < 2:
                raise _Skip("needs a second user ($user2)")
            return self.users[1]
        if template:
            for name, password in self.users:
                if name == template:
                    return name, password
            return template, self.users[0][1]
        return self.users[0]

    def _check_capabilities(self, conn: _Connection) -> None:
        missing = [c for c in self.script.capabilities if _up(c) not in conn.capabilities]
        if missing:
            raise _Skip("server lacks " + " ".join(missing))

    # -- the command groups ---------------------------------------------------------------

    def run(self) -> None:
        groups = self.script.groups
        start = 0
        if self.script.banner_check and groups and not groups[0].commands:
            self.group = groups[0]
            self.seqmap = []
            banner = self.connections[0].banner
            self._begin_group()
            if banner is not None:
                self._untagged(banner, groups[0])
            self._end_group(groups[0])
            start = 1
        for group in groups[start:]:
            self.run_group(group)
            if group.sleep:
                time.sleep(group.sleep)

    def _begin_group(self) -> None:
        self.received = [False] * len(self.group.untagged if self.group else [])
        self.best = {}
        self.extra_count = 0
        self.first_extra = None

    def run_group(self, group: Group) -> None:
        try:
            self._run_group(group)
        except ScriptFailed as exc:
            if str(exc).startswith("connection "):  # a timeout or socket error: say where
                raise ScriptFailed(self._where(group) + str(exc)) from None
            raise

    def _run_group(self, group: Group) -> None:
        self.group = group
        conn = self.connections[group.connection]
        if conn.closed:
            raise ScriptFailed(f"connection {group.connection + 1} is already closed")
        self.seqmap = list(range(1, len(conn.uids) + 1))
        self._begin_group()
        pending: dict[str, Command] = {}
        for command in group.commands:
            tag = conn.new_tag()
            pending[tag] = command
            self.tag_of[id(command)] = tag
            try:
                self._send_command(conn, tag, command, group, pending)
            except ConnectionClosed:
                break
        try:
            while pending:
                response = conn.read()
                self._dispatch(conn, response, group, pending)
        except ConnectionClosed:
            if not (group.bye and conn.saw_bye):
                raise ScriptFailed(
                    self._where(group)
                    + "unexpected disconnection"
                    + (f" (waiting for {', '.join(pending)})" if pending else "")
                ) from None
            for command in group.commands:
                if command.reply != [Atom("")] and self.tag_of.get(id(command)) in pending:
                    raise ScriptFailed(
                        self._where(group) + f"expected tagged {format_args(command.reply or [])}, "
                        'but the server said BYE and closed (only "" allowed)'
                    ) from None
        self._end_group(group)
        if any(c.text.lower() == "logout" for c in group.commands) or group.bye:
            # the server closes after BYE; collect the close so the next group sees it
            conn.closed = conn.closed or conn.saw_bye

    def _send_command(
        self,
        conn: _Connection,
        tag: str,
        command: Command,
        group: Group,
        pending: dict[str, Command],
    ) -> None:
        text = self.expand(command.text)
        lower = text.lower()
        literal: bytes | None = None
        if lower == "append":
            message = self.source.take()
            text = f'APPEND {_quote(self.mailbox)} "{message.internaldate}"'
            literal = message.content
        elif lower.startswith("append ") and not _append_has_body(text[7:]):
            literal = self.source.take().content
        verb = lower.split(" ", 1)[0]
        if verb in ("select", "examine"):
            conn.uids = []
        self._send(
            conn,
            tag,
            text.encode("latin-1"),
            literal,
            lambda r: self._dispatch(conn, r, group, pending),
        )

    def _dispatch(
        self, conn: _Connection, response: _Response, group: Group, pending: dict[str, Command]
    ) -> None:
        if response.kind == "continuation":
            raise ScriptFailed(
                self._where(group) + f"unexpected continuation: {_show(response.raw)}"
            )
        if response.kind == "untagged":
            self._untagged(response, group)
            self._note(conn, response)
            args = response.args
            if (
                len(args) >= 2
                and isinstance(args[0], Atom)
                and args[0].isdigit()
                and isinstance(args[1], str)
                and _up(args[1]) == "EXPUNGE"
            ):
                self._expunged(int(args[0]))
            return
        command = pending.pop(response.tag, None)
        if command is None:
            raise ScriptFailed(
                self._where(group) + f"reply for an unknown tag: {_show(response.raw)}"
            )
        self._note(conn, response)
        expected = command.reply or [Atom("")]
        status = _status(response)
        if status == "BAD" and _up(str(expected[0])) != "BAD":
            raise ScriptFailed(
                self._where(group, command)
                + f"expected tagged '{format_args(expected)}', got BAD: {_show(response.raw)}"
            )
        self.variables["tag"] = response.tag
        try:
            mismatch = self.match_args(expected, response.args, None, True)
        finally:
            del self.variables["tag"]
        if mismatch is not None:
            raise ScriptFailed(
                self._where(group, command)
                + f"expected tagged '{format_args(expected)}', got '{_show(response.raw)}'"
            )

    def _expunged(self, seq: int) -> None:
        if seq > len(self.seqmap):
            return
        for i in range(seq - 1, len(self.seqmap)):
            if self.seqmap[i] == seq:
                self.seqmap[i] = 0
            elif self.seqmap[i] > seq:
                self.seqmap[i] -= 1

    def _untagged(self, response: _Response, group: Group) -> None:
        expected = group.untagged
        logout = any(c.text.lower() == "logout" for c in group.commands)
        if not expected and (self.script.ignore_extra_untagged or logout):
            return
        args = response.args
        first = _up(args[0]) if args and isinstance(args[0], str) else ""
        prefix = first in ("OK", "NO", "BAD", "BYE")
        tag = self.tag_of.get(id(group.commands[0])) if group.commands else None
        self.added = []
        found_some = False
        for i, want in enumerate(expected):
            if self.received[i]:
                continue
            if tag is not None:
                self.variables["tag"] = tag
            try:
                result = self.match_args(want.args, args, None, prefix)
            finally:
                self.variables.pop("tag", None)
            if result is None:
                if want.existence == MUST_NOT:
                    raise ScriptFailed(
                        self._where(group)
                        + f"unexpected untagged match: {format_args(want.args)}\n"
                        f"  reply: {_show(response.raw)}"
                    )
                self.received[i] = True
                found_some = True
                self.added = []
                if group.ordered:
                    break
                continue
            if self.best.get(i, (0, ""))[0] < result or i not in self.best:
                self.best[i] = (result, _show(response.raw))
            for name in self.added:
                self.variables.pop(name, None)
            self.added = []
            if group.ordered and want.existence == MUST:
                break
        if not found_some:
            self.extra_count += 1
            if not self.script.ignore_extra_untagged and self.first_extra is None:
                self.first_extra = _show(response.raw)

    def _end_group(self, group: Group) -> None:
        missing = [
            i
            for i, want in enumerate(group.untagged)
            if want.existence == MUST and not self.received[i]
        ]
        if missing:
            want = group.untagged[missing[0]]
            best = self.best.get(missing[0], (0, ""))[1]
            raise ScriptFailed(
                self._where(group)
                + f"missing {len(missing)} untagged replies ({self.extra_count} others came);"
                f" first: {format_args(want.args)} (line {want.line})"
                + (f"\n  closest reply: {best[:400]}" if best else "")
            )
        if self.first_extra is not None:
            raise ScriptFailed(
                self._where(group)
                + f"{self.extra_count} unexpected untagged replies, first: {self.first_extra}"
            )

    def _where(self, group: Group, command: Command | None = None) -> str:
        command = command or (group.commands[0] if group.commands else None)
        if command is None:
            return "banner: "
        line = f"line {command.line}" if command.line else "final LOGOUT"
        return f"{line} (connection {group.connection + 1}) `{_show(command.text, 200)}`: "

    def close(self) -> None:
        for conn in self.connections:
            conn.close()


def _set_members(text: str) -> set[int]:
    """The numbers of a sequence set without ``*`` ("1:3,7" -> {1, 2, 3, 7})."""
    members: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition(":")
        if low.isdigit() and (not high or high.isdigit()):
            a, b = sorted((int(low), int(high or low)))
            members.update(range(a, min(b, a + 100000) + 1))
    return members


_SYSTEM_FLAGS = {"\\ANSWERED", "\\FLAGGED", "\\DELETED", "\\SEEN", "\\DRAFT", "\\RECENT"}
_INTERNALDATE = re.compile(r"^[ \d]?\d-[A-Za-z]{3}-\d{4} \d\d:\d\d:\d\d [+-]\d{4}$")


def _valid_flags(flags: Sequence[Arg]) -> bool:
    """Atoms only, and no backslashed name but the system flags. A keyword spelled NIL
    parses as NIL and is let through: the nil script stores one, and imaptest versions
    differ on whether their flag tracking accepts it."""
    return all(
        isinstance(f, Nil)
        or (isinstance(f, Atom) and (not f.startswith("\\") or _up(f) in _SYSTEM_FLAGS))
        for f in flags
    )


def _append_has_body(args_text: str) -> bool:
    """Whether ``APPEND`` arguments already carry the message (a literal or CATENATE)."""
    try:
        args = parse_args(args_text)
    except ImapParseError:
        return False
    if not args:
        return False
    i = 0
    if i + 1 < len(args) and isinstance(args[i + 1], list):
        i += 1
    if i + 1 < len(args) and isinstance(args[i + 1], Text) and not _is_literal_at(args_text):
        i += 1
    if i + 1 >= len(args):
        return "{" in args_text
    nxt = args[i + 1]
    return isinstance(nxt, Text) or (isinstance(nxt, Atom) and _up(nxt) == "CATENATE")


def _is_literal_at(text: str) -> bool:
    return bool(re.search(r"~?\{\d+\+?\}\r\n", text))


def _status(response: _Response) -> str:
    args = response.args
    return _up(args[0]) if args and isinstance(args[0], str) else ""


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_script(
    path: Path,
    host: str,
    port: int,
    users: Sequence[tuple[str, str]],
    *,
    mailbox: str = DEFAULT_MAILBOX,
    timeout: float = 20.0,
    tls: ssl.SSLContext | None = None,
    default_mbox: Path | None = None,
    literal_plus: bool = True,
) -> ScriptResult:
    """Run the imaptest script at *path* against the IMAP server at host:port.

    *users*: (login, password) pairs; the first is every connection's user, the second is
    ``$user2`` (scripts that need one skip without it). *mailbox*: where to test (every
    mailbox whose name starts with it is deleted first). *timeout*: seconds to wait for any
    one reply (a hang fails the script, never the caller). *tls*: implicit TLS.
    *default_mbox*: the messages of a script without its own .mbox (default.mbox beside it).
    *literal_plus*: False sends every literal synchronizing, even to a LITERAL+ server.
    Never raises for what the server does; a script imaptest would refuse raises
    ScriptError."""
    script = parse_script(path, default_mbox)
    run = _Run(script, host, port, users, mailbox, timeout, tls, literal_plus)
    try:
        try:
            run.setup()
        except ConnectionClosed as exc:
            return ScriptResult(script.name, False, reason=f"setup: {exc}")
        except ScriptFailed as exc:
            return ScriptResult(script.name, False, reason=str(exc))
        run.run()
    except _Skip as exc:
        return ScriptResult(script.name, False, skipped=True, reason=str(exc))
    except ScriptFailed as exc:
        return ScriptResult(script.name, False, reason=str(exc))
    except ConnectionClosed as exc:
        return ScriptResult(script.name, False, reason=f"unexpected disconnection: {exc}")
    except OSError as exc:
        return ScriptResult(script.name, False, reason=f"connection failed: {exc}")
    finally:
        run.close()
    return ScriptResult(script.name, True)


def script_paths(folder: Path) -> list[Path]:
    """The scripts of a folder (not the .mbox files, not sub-folders), sorted by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".mbox")
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python tests/imaptest.py --port 2143 --user u@example.test --password pw SCRIPT...``
    (a script or a folder of them): one line per script; exit 1 if any failed."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("scripts", nargs="+", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=143)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--user2", help="USER:PASSWORD of the second user ($user2)")
    parser.add_argument("--mailbox", default=DEFAULT_MAILBOX)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--tls", action="store_true", help="implicit TLS, certificate unchecked")
    parser.add_argument("--default-mbox", type=Path, help="messages of scripts without an .mbox")
    args = parser.parse_args(argv)
    users = [(args.user, args.password)]
    if args.user2:
        name, _, password = args.user2.partition(":")
        users.append((name, password))
    context = None
    if args.tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    paths: list[Path] = []
    for path in args.scripts:
        paths.extend(script_paths(path) if path.is_dir() else [path])
    failed = 0
    for path in paths:
        try:
            result = run_script(
                path,
                args.host,
                args.port,
                users,
                mailbox=args.mailbox,
                timeout=args.timeout,
                tls=context,
                default_mbox=args.default_mbox,
            )
        except ScriptError as exc:
            result = ScriptResult(path.name, False, reason=f"script error: {exc}")
        failed += result.outcome == "FAIL"
        print(f"{result.outcome:5} {path.name:32} {result.reason}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Maildir export and import: a user's mailboxes to and from the layout mutt, Dovecot and
most mail tools read (Maildir with Maildir++ folders).

Layout: INBOX is ``DIR/{cur,new,tmp}``; another mailbox is ``DIR/.<name>/{cur,new,tmp}``
with the hierarchy separator "/" written as "." and each level in IMAP's modified UTF-7
(RFC 3501 §5.1.3), as Dovecot's Maildir++ layout has it. A "." inside a level cannot be
written in that layout and becomes "_".

Files: a message with no flag goes to ``new/`` without an info suffix; any other to
``cur/`` with ``:2,<flags>``: D Draft, F Flagged, P Passed ($Forwarded), R Replied
(\\Answered), S Seen, T Trashed (\\Deleted), in ASCII order; other keywords are written as
the letters a-z of ``dovecot-keywords`` (Dovecot's convention; read back on import). Names
are ``<date>.M<uid>V<uidvalidity>.<host>``, unique per message; contents have LF
line endings (what Maildir readers expect); the modification time is the internal date.
Every file is written in ``tmp/`` and renamed into place (the Maildir protocol).

Import reads ``new/`` and ``cur/`` of the root and of every ``.Folder`` in name order,
flags from the info suffix, the internal date from the file's modification time, line
endings made CRLF, and commits in batches through ``store.apply``. Each file is keyed by
folder and file name (the part before ":"), so importing the same Maildir again within
a week adds nothing twice.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from tachymail.mailbox.store import (
    ANSWERED,
    DELETED,
    DRAFT,
    FLAGGED,
    SEEN,
    Delivered,
    MailboxStore,
    Operation,
    deliver,
    prepare_delivery,
)

log = logging.getLogger(__name__)

#: the keyword a Maildir "P" (passed) flag stands for in IMAP (RFC 5788 registry)
FORWARDED = "$Forwarded"

# Maildir info letters, in the ASCII order they must be written in
_LETTERS = (
    ("D", DRAFT),
    ("F", FLAGGED),
    ("P", FORWARDED),
    ("R", ANSWERED),
    ("S", SEEN),
    ("T", DELETED),
)
_FLAG_OF = dict(_LETTERS)
_LETTER_OF = {flag.lower(): letter for letter, flag in _LETTERS}
KEYWORDS_FILE = "dovecot-keywords"

#: messages and bytes per import commit: small enough to keep the store's single writer
#: free for live deliveries between batches
IMPORT_BATCH = 200
IMPORT_BATCH_BYTES = 32 * 1024 * 1024


# --- folder names -----------------------------------------------------------------------------


def encode_mutf7(text: str) -> str:
    """*text* in IMAP's modified UTF-7 (RFC 3501 §5.1.3)."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for char in text:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


def decode_mutf7(text: str) -> str:
    """The inverse of :func:`encode_mutf7`; a malformed shift sequence is kept as it is."""
    out: list[str] = []
    position = 0
    while position < len(text):
        start = text.find("&", position)
        if start < 0:
            out.append(text[position:])
            break
        out.append(text[position:start])
        end = text.find("-", start)
        if end < 0:
            out.append(text[start:])
            break
        chunk = text[start + 1 : end]
        if not chunk:
            out.append("&")
        else:
            try:
                padded = chunk.replace(",", "/") + "=" * (-len(chunk) % 4)
                out.append(base64.b64decode(padded, validate=True).decode("utf-16-be"))
            except ValueError:
                out.append(text[start : end + 1])
        position = end + 1
    return "".join(out)


def folder_of(name: str) -> str:
    """The Maildir++ directory of mailbox *name* ("" for INBOX)."""
    if name == "INBOX":
        return ""
    return "." + ".".join(encode_mutf7(level.replace(".", "_")) for level in name.split("/"))


def mailbox_of(folder: str) -> str:
    """The mailbox name of a Maildir++ directory name (".A.B" -> "A/B"; "" -> INBOX)."""
    if not folder:
        return "INBOX"
    levels = [decode_mutf7(level) for level in folder.lstrip(".").split(".") if level]
    name = "/".join(levels) or "INBOX"
    return "INBOX" if name.upper() == "INBOX" else name


# --- export ------------------------------------------------------------------------------------


def _make_maildir(path: Path) -> None:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)


def _host() -> str:
    # "/" and ":" cannot be in a Maildir name (Maildir spec: write them as octal escapes)
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072")


def export_maildir(store: MailboxStore, user: str, directory: Path) -> int:
    """Write every mailbox of *user* under *directory* as a Maildir (see the module doc);
    how many messages were written. Other files are left alone; a file of an earlier
    export of the same message is replaced (its flags may differ), and the letters of an
    existing dovecot-keywords file keep their meaning."""
    directory = Path(directory)
    host = _host()
    written = 0
    known = _read_keywords(directory)
    keywords = [known[letter] for letter in sorted(known)]
    for info in store.mailboxes(user):
        root = directory / folder_of(info.name)
        _make_maildir(root)
        if info.name != "INBOX":
            (root / "maildirfolder").touch()  # Maildir++: marks a folder (Courier, Dovecot)
        earlier = {
            path.name.split(":", 1)[0]: path
            for sub in ("new", "cur")
            for path in (root / sub).iterdir()
        }
        for message in store.messages(user, info.name):
            content = store.content(message.content_id)
            if content is None:
                continue  # expunged while we listed
            base = f"{int(message.internaldate)}.M{message.uid}V{info.uidvalidity}.{host}"
            letters = _info_letters(message.flags, keywords)
            # no flag at all: "new" (never seen by a reader); else "cur" with the info
            target = root / "cur" / f"{base}:2,{letters}" if message.flags else root / "new" / base
            partial = root / "tmp" / base
            partial.write_bytes(content.replace(b"\r\n", b"\n"))
            os.utime(partial, (message.internaldate, message.internaldate))
            os.replace(partial, target)
            old = earlier.get(base)
            if old is not None and old != target:
                old.unlink(missing_ok=True)  # the same message, exported before
            written += 1
    if keywords:
        lines = "".join(f"{index} {word}\n" for index, word in enumerate(keywords))
        (directory / KEYWORDS_FILE).write_text(lines)
    return written


def _info_letters(flags: frozenset[str], keywords: list[str]) -> str:
    letters: list[str] = []
    for flag in flags:
        letter = _LETTER_OF.get(flag.lower())
        if letter is None and not flag.startswith("\\"):
            if flag not in keywords and len(keywords) < 26:
                keywords.append(flag)
            if flag in keywords:
                letter = chr(ord("a") + keywords.index(flag))
        if letter:
            letters.append(letter)
    return "".join(sorted(letters))


# --- import ------------------------------------------------------------------------------------


def _folders(directory: Path) -> Iterator[tuple[str, Path]]:
    """(mailbox name, path) of the root Maildir and each Maildir++ folder, in name order."""
    if (directory / "cur").is_dir() or (directory / "new").is_dir():
        yield "INBOX", directory
    for child in sorted(directory.iterdir()):
        if (
            child.name.startswith(".")
            and child.name not in (".", "..")
            and child.is_dir()
            and ((child / "cur").is_dir() or (child / "new").is_dir())
        ):
            yield mailbox_of(child.name), child


def _read_keywords(directory: Path) -> dict[str, str]:
    """Letter -> keyword from dovecot-keywords ("0 $Label1" is "a")."""
    found: dict[str, str] = {}
    try:
        text = (directory / KEYWORDS_FILE).read_text(errors="replace")
    except OSError:
        return found
    for line in text.splitlines():
        index, _, word = line.partition(" ")
        if index.isdigit() and int(index) < 26 and word.strip():
            found[chr(ord("a") + int(index))] = word.strip()
    return found


def flags_of(name: str, keywords: dict[str, str]) -> list[str]:
    """The flags of a Maildir file name's ``:2,`` info (none without one)."""
    _, sep, info = name.rpartition(":2,")
    if not sep:
        return []
    flags: list[str] = []
    for letter in info:
        flag = _FLAG_OF.get(letter) or keywords.get(letter)
        if flag and flag not in flags:
            flags.append(flag)
    return flags


def _date_of(path: Path, stat: os.stat_result) -> float:
    if stat.st_mtime > 0:
        return stat.st_mtime
    leading = path.name.split(".", 1)[0]
    return float(leading) if leading.isdigit() else time.time()


def to_crlf(content: bytes) -> bytes:
    """Line endings made CRLF (bare LF and CRLF alike)."""
    return content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def import_maildir(store: MailboxStore, user: str, directory: Path) -> int:
    """Add the messages of the Maildir *directory* (and its Maildir++ folders) to *user*'s
    mailboxes, in batches; how many were added (files imported before are skipped).
    Raises FileNotFoundError when *directory* is not a Maildir, StorageFull when the store
    is full (the batches before it stay imported)."""
    directory = Path(directory)
    folders = list(_folders(directory)) if directory.is_dir() else []
    if not folders:
        raise FileNotFoundError(f"{directory} is not a Maildir (no cur/ or new/)")
    keywords = _read_keywords(directory)
    added = 0
    batch: list[Operation] = []
    batch_bytes = 0

    def commit() -> int:
        outcomes = store.apply(batch)
        batch.clear()
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
        return sum(1 for o in outcomes if isinstance(o, Delivered) and not o.duplicate)

    for name, path in folders:
        files: list[tuple[float, str, Path, os.stat_result]] = []
        for sub in ("new", "cur"):
            try:
                entries = list(os.scandir(path / sub))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_file():
                    continue
                stat = entry.stat()
                files.append((_date_of(Path(entry.path), stat), entry.name, Path(entry.path), stat))
        files.sort(key=lambda item: (item[0], item[1]))  # arrival order: oldest first
        for date, filename, file_path, _stat in files:
            try:
                content = to_crlf(file_path.read_bytes())
            except OSError as exc:
                log.warning("maildir import: cannot read %s: %s", file_path, exc)
                continue
            base = filename.split(":", 1)[0]
            key = f"maildir\0{user.lower()}\0{name}\0{base}".encode()
            delivery = prepare_delivery(
                user,
                content,
                mailbox=name,
                flags=flags_of(filename, keywords),
                internaldate=date,
                key=key,
            )
            batch.append(deliver(delivery))
            batch_bytes += len(content)
            if len(batch) >= IMPORT_BATCH or batch_bytes >= IMPORT_BATCH_BYTES:
                added += commit()
                batch_bytes = 0
    if batch:
        added += commit()
    return added

"""Who lives here: local users (the users file), aliases and catch-alls, and resolution.

Intake (SMTP and LMTP RCPT) asks :meth:`Directory.resolve` what a recipient in a local
domain stands for, as Postfix's virtual_alias_maps and virtual_mailbox_maps do; the queue
then holds only final recipients, and local delivery needs only :meth:`Directory.user_of`.
Both files are re-read when they change on disk (one ``stat`` each per lookup), so
`tachymail user add` and `tachymail alias add` take effect without a restart.

The aliases file has one ``source: target, target`` line per alias; ``#`` starts a
comment line; ``@domain: target`` is the catch-all of a domain; several lines for one
source add up. Names compare without regard to case.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tachymail.auth.users import UserEntry, UsersFile, replace_file
from tachymail.config import Config
from tachymail.mailbox.headers import delivery_headers
from tachymail.mailbox.store import Delivery, prepare_delivery
from tachymail.mailbox.vacation import auto_reply, load_vacation, may_reply

log = logging.getLogger(__name__)

#: how deep aliases may nest (an alias of an alias ... of a user); deeper targets are dropped
MAX_ALIAS_DEPTH = 10
#: targets one recipient may expand into; the rest are dropped with a warning
MAX_EXPANSION = 1000

# local@domain with no white space, no brackets, no comma (an alias target or source).
_ADDRESS = re.compile(r"[^\s@<>,:;\"]+@[^\s@<>,:;\"\[\]]+")
_SEPARATORS = re.compile(r"[,\s]+")


def is_address(text: str) -> bool:
    """Whether *text* is a plain ``local@domain`` address as aliases name them."""
    return _ADDRESS.fullmatch(text) is not None


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


@dataclass(frozen=True, slots=True)
class Resolution:
    """What one recipient stands for: final local recipients and relayed ones."""

    #: final local recipients, as addresses to put in the envelope (lower-cased
    #: ``alice@example.test``; ``alice+tag@example.test`` keeps the tag as written)
    local: tuple[str, ...]
    #: alias targets outside the local domains: relayed
    remote: tuple[str, ...]


class AliasesFile:
    """The aliases file at *path*, re-read when it changes on disk; edits keep the rest of
    the file (comments, order) and are written atomically under an advisory lock."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fspath = os.fspath(self.path)  # os.stat on a str: checked on every lookup
        self._stamp: tuple[int, int, int] | None = None
        self._aliases: dict[str, tuple[str, ...]] = {}

    def aliases(self) -> dict[str, tuple[str, ...]]:
        """Targets by lower-cased source (``@domain`` for a catch-all); the same dict until
        the file changes. A line that is not ``source: targets`` is skipped with a warning."""
        try:
            info = os.stat(self._fspath)
        except FileNotFoundError:
            if self._stamp is not None or self._aliases:
                self._aliases, self._stamp = {}, None
            return self._aliases
        stamp = (info.st_mtime_ns, info.st_ino, info.st_size)
        if stamp != self._stamp:
            self._aliases = self._parse(self.path.read_text())
            self._stamp = stamp
        return self._aliases

    def _parse(self, text: str) -> dict[str, tuple[str, ...]]:
        merged: dict[str, list[str]] = {}
        for number, line in enumerate(text.splitlines(), 1):
            parsed = _parse_line(line)
            if parsed is None:
                continue
            source, targets = parsed
            good = [t for t in targets if is_address(t)]
            if not _valid_source(source) or not good or len(good) != len(targets):
                log.warning("%s:%d: not 'source: address, address': %r", self.path, number, line)
            if not _valid_source(source):
                continue
            known = merged.setdefault(source.lower(), [])
            seen = {t.lower() for t in known}
            known.extend(t for t in good if t.lower() not in seen)
        return {source: tuple(targets) for source, targets in merged.items() if targets}

    @contextmanager
    def _changing(self) -> Iterator[list[str]]:
        """The file's lines to edit, read under the lock and written back when changed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            try:
                lines = self.path.read_text().splitlines()
            except FileNotFoundError:
                lines = [
                    "# tachymail aliases: source: target, target (managed by `tachymail alias`)"
                ]
            before = list(lines)
            yield lines
            if lines != before:
                self._write(lines)

    def _write(self, lines: list[str]) -> None:
        replace_file(self.path, lines, 0o644)
        self._stamp = None

    def add(self, source: str, targets: list[str]) -> list[str]:
        """Add *targets* to *source* (a new alias, or more targets for an existing one);
        returns the targets that were new. Raises ValueError for a source that is neither
        an address nor ``@domain``, or a target that is not an address."""
        if not _valid_source(source):
            raise ValueError(f"{source!r} is neither an address nor an @domain")
        bad = [t for t in targets if not is_address(t)]
        if bad or not targets:
            raise ValueError(f"not an address: {', '.join(bad) or '(no target)'}")
        key = source.lower()
        with self._changing() as lines:
            first = None
            present: set[str] = set()
            for i, line in enumerate(lines):
                parsed = _parse_line(line)
                if parsed is not None and parsed[0].lower() == key:
                    first = i if first is None else first
                    present.update(t.lower() for t in parsed[1])
            added: list[str] = []
            for target in targets:
                if target.lower() not in present:
                    present.add(target.lower())
                    added.append(target)
            if added and first is None:
                lines.append(f"{key}: {', '.join(added)}")
            elif added and first is not None:
                parsed = _parse_line(lines[first])
                assert parsed is not None
                lines[first] = f"{parsed[0]}: {', '.join([*parsed[1], *added])}"
        return added

    def delete(self, source: str, target: str | None = None) -> bool:
        """Remove the alias *source*, or only its *target*; False when there was none."""
        key = source.lower()
        found = False
        with self._changing() as lines:
            kept: list[str] = []
            for line in lines:
                parsed = _parse_line(line)
                if parsed is None or parsed[0].lower() != key:
                    kept.append(line)
                    continue
                if target is None:
                    found = True
                    continue
                rest = [t for t in parsed[1] if t.lower() != target.lower()]
                found = found or len(rest) != len(parsed[1])
                if rest:
                    kept.append(
                        line if len(rest) == len(parsed[1]) else f"{parsed[0]}: {', '.join(rest)}"
                    )
            lines[:] = kept
        return found


def _parse_line(line: str) -> tuple[str, list[str]] | None:
    """(source, targets) of an alias line; None for a blank or comment line."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    source, colon, rest = text.partition(":")
    targets = [t for t in _SEPARATORS.split(rest) if t] if colon else []
    return source.strip(), targets


def _valid_source(source: str) -> bool:
    if source.startswith("@"):
        return is_address("x" + source)
    return is_address(source)


class Directory:
    """Local users, aliases and the local domains, for intake and local delivery.

    Safe to keep for a process's lifetime: each lookup sees the files as they are on disk.
    """

    def __init__(self, config: Config) -> None:
        self.users_file = UsersFile(config.users_path)
        self.aliases_file = AliasesFile(config.aliases_path)
        self.local_domains = config.local_delivery_domains
        self.delimiter = config.mailbox.recipient_delimiter
        # vacation replies: where the settings are, the From domain's host, the interval
        self.data_path = config.data_path
        self.hostname = config.server.hostname
        self.reply_days = config.mailbox.vacation_reply_days
        self._entries: dict[str, UserEntry] | None = None
        self._lowered: dict[str, UserEntry] = {}

    def is_local_domain(self, domain: str) -> bool:
        """Whether mail for *domain* is delivered here (``Config.local_delivery_domains``)."""
        return domain.lower() in self.local_domains

    def _users(self) -> dict[str, UserEntry]:
        """Users by lower-cased name (rebuilt only when the users file changed)."""
        entries = self.users_file.entries()
        if entries is not self._entries:
            self._lowered = {name.lower(): entry for name, entry in entries.items()}
            self._entries = entries
        return self._lowered

    def resolve(self, address: str) -> Resolution | None:
        """What *address* stands for; None when it is in a local domain and is neither a
        user nor an alias (550 5.1.1 at RCPT).

        In order: an exact alias, a user, the address without its sub-address
        (``alice+tag`` as alias or user ``alice``), the domain's catch-all ``@domain``.
        Aliases expand recursively up to :data:`MAX_ALIAS_DEPTH` levels; an alias that
        names itself (or an alias it came from) delivers to the user of that name; a local
        target that resolves to nothing is dropped with a warning; duplicates are dropped.
        A bare ``postmaster`` is ``postmaster@`` each local domain in turn (sorted), the
        first that resolves. An address outside the local domains resolves to itself,
        relayed.
        """
        if "@" not in address:
            if address.lower() != "postmaster":
                return None
            for domain in sorted(self.local_domains):
                found = self.resolve(f"postmaster@{domain}")
                if found is not None:
                    return found
            return None
        if not self.is_local_domain(_domain(address)):
            return Resolution((), (address,))
        local: list[str] = []
        remote: list[str] = []
        if not self._expand(address, 0, (), local, remote):
            return None
        if not local and not remote:
            return None
        return Resolution(tuple(local), tuple(remote))

    def _expand(
        self,
        address: str,
        depth: int,
        path: tuple[str, ...],
        local: list[str],
        remote: list[str],
    ) -> bool:
        """Add the final recipients of local *address* to *local* and *remote*; False when
        it resolves to nothing. *depth*: aliases expanded above it; *path*: their sources
        (an alias met again is not expanded again: it ends at the user of that name)."""
        key = address.lower()
        aliases = self.aliases_file.aliases()
        users = self._users()
        base = self._base(key)
        catch_all = "@" + _domain(key)
        source: str | None = None
        if key not in path and key in aliases:
            source = key
        elif key in users:
            _add_once(local, key)
            return True
        elif base is not None and base not in path and base in aliases:
            source = base
        elif base is not None and base in users:
            _add_once(local, self._tagged(address, base))
            return True
        elif catch_all not in path and catch_all in aliases:
            source = catch_all
        else:
            return False
        if depth >= MAX_ALIAS_DEPTH:
            log.warning("alias %s: nested deeper than %d levels; dropped", source, depth)
            return False
        found = False
        for target in aliases[source]:
            if len(local) + len(remote) >= MAX_EXPANSION:
                log.warning("alias %s: more than %d targets; the rest dropped", key, MAX_EXPANSION)
                break
            if not self.is_local_domain(_domain(target)):
                _add_once(remote, target)
                found = True
            elif self._expand(target, depth + 1, (*path, source), local, remote):
                found = True
            else:
                log.warning(
                    "alias %s: target <%s> is no local user or alias; dropped", source, target
                )
        return found

    def _base(self, key: str) -> str | None:
        """*key* without its sub-address (``alice+tag@d`` -> ``alice@d``), else None."""
        if not self.delimiter:
            return None
        local_part, _, domain = key.rpartition("@")
        user, delimiter, _ = local_part.partition(self.delimiter)
        if not delimiter or not user:
            return None
        return f"{user}@{domain}"

    def _tagged(self, address: str, base: str) -> str:
        """The envelope address of sub-address *address* of user *base*: the user part and
        domain lower-cased, the tag as written."""
        tag = address.rpartition("@")[0].partition(self.delimiter)[2]
        user_part, _, domain = base.rpartition("@")
        return f"{user_part}{self.delimiter}{tag}@{domain}"

    def user_of(self, address: str) -> str | None:
        """The mailbox user *address* delivers to: lower-cased, the sub-address removed, no
        alias expansion (done at intake); None when it is no user (any more)."""
        key = address.lower()
        users = self._users()
        if key in users:
            return key
        base = self._base(key)
        return base if base is not None and base in users else None

    def delivery(self, target: str, sender: str, content: bytes, key: bytes) -> Delivery | None:
        """The mailbox delivery of *content* from *sender* to local recipient *target*, with
        its Return-Path and Delivered-To, the user's quota and the idempotency *key*; None
        when *target* is no user (any more). The MIME scan runs here, not in the commit.
        When the user is on vacation and RFC 3834 allows an answer, it carries the reply
        (``Delivery.reply``): the caller queues it if the outcome says ``reply_due``."""
        user = self.user_of(target)
        if user is None:
            return None
        delivery = prepare_delivery(
            user, delivery_headers(sender, target) + content, key=key, quota=self.quota(user)
        )
        vacation = load_vacation(self.data_path, user)
        if vacation is not None:
            own = {user.lower(), target.lower()}
            address = sender.strip().strip("<>")
            if may_reply(content, address, own) and self.user_of(address) != user:
                reply = auto_reply(vacation, user, content, self.hostname)
                delivery.reply = (address.lower(), reply)
                delivery.reply_days = self.reply_days
        return delivery

    def quota(self, user: str) -> int:
        """*user*'s quota in bytes (any case); 0 for unlimited or an unknown user."""
        entry = self._users().get(user.lower())
        return entry.quota if entry is not None else 0

    def over_quota(self, user: str, used: int) -> bool:
        """Whether *user*, holding *used* bytes, is full (452 4.2.2 at RCPT): it has a
        quota and *used* reaches it."""
        quota = self.quota(user)
        return bool(quota) and used >= quota


def _add_once(into: list[str], address: str) -> None:
    lowered = address.lower()
    if all(item.lower() != lowered for item in into):
        into.append(address)

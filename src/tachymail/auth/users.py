"""The users file for SMTP AUTH, POP3 and IMAP: ``name:hash[:quota]`` lines, scrypt hashes.

The hash format is ``$scrypt$n=16384,r=8,p=1$<salt b64>$<key b64>``; checking
one costs tens of milliseconds on purpose, so the server runs it off the event
loop. The file is re-read when its modification time changes, so
`tachymail user add` takes effect without a restart.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

N, R, P = 16384, 8, 1
KEY_LEN = 32


def hash_password(password: str, *, n: int = N, r: int = R, p: int = P) -> str:
    salt = os.urandom(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=KEY_LEN)
    b64 = base64.b64encode
    return f"$scrypt$n={n},r={r},p={p}${b64(salt).decode()}${b64(key).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """True when *password* matches *encoded*; False for a wrong password or a broken hash."""
    try:
        _, scheme, settings, salt_b64, key_b64 = encoded.split("$")
        if scheme != "scrypt":
            return False
        params = dict(item.split("=") for item in settings.split(","))
        salt, key = base64.b64decode(salt_b64), base64.b64decode(key_b64)
        got = hashlib.scrypt(
            password.encode(),
            salt=salt,
            n=int(params["n"]),
            r=int(params["r"]),
            p=int(params["p"]),
            dklen=len(key),
            maxmem=256 * 1024 * 1024,
        )
    except (ValueError, KeyError):
        return False
    return hmac.compare_digest(got, key)


@dataclass(frozen=True, slots=True)
class UserEntry:
    """One line of the users file: the password hash and the mailbox quota (0: none)."""

    hash: str
    #: bytes the user's mailboxes may hold in all; 0: unlimited
    quota: int = 0


def replace_file(path: Path, lines: list[str], mode: int) -> None:
    """Replace the text file *path* with *lines* (each ended by a newline) and permission
    *mode*, atomically: synced under a temporary name in the same folder, then renamed
    over it, so a running server never reads half a file (the users and aliases files)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write("".join(f"{line}\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class UsersFile:
    """The users file at *path*; reading it again only when it changed on disk.

    One ``name:hash`` line per user, with an optional third field, the mailbox quota in
    bytes (``alice@example.test:$scrypt$...:524288000``); ``#`` starts a comment line.
    The same names log in over SMTP AUTH, POP3 and IMAP; the local-domain ones (lower-cased
    addresses) own mailboxes. Changes are written atomically (a temporary file renamed
    over the old one) under an advisory lock, so concurrent `tachymail user` commands do
    not lose each other's change and a running server never reads half a file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # os.stat on a str: looked up on every RCPT to a local domain, pathlib costs more
        self._fspath = os.fspath(self.path)
        self._stamp: tuple[int, int, int] | None = None
        self._entries: dict[str, UserEntry] = {}
        self._users: dict[str, str] = {}

    def entries(self) -> dict[str, UserEntry]:
        """Every user by name (as written in the file); the same dict until the file changes."""
        try:
            info = os.stat(self._fspath)
        except FileNotFoundError:
            if self._stamp is not None or self._entries:
                self._entries, self._users, self._stamp = {}, {}, None
            return self._entries
        # Inode and size too: two atomic rewrites within one mtime tick still differ.
        stamp = (info.st_mtime_ns, info.st_ino, info.st_size)
        if stamp != self._stamp:
            self._entries = self._parse(self.path.read_text(), self.path)
            self._users = {name: entry.hash for name, entry in self._entries.items()}
            self._stamp = stamp
        return self._entries

    def users(self) -> dict[str, str]:
        """Every user's password hash by name."""
        self.entries()
        return self._users

    def quota(self, name: str) -> int:
        """*name*'s mailbox quota in bytes; 0 for none or an unknown user."""
        entry = self.entries().get(name)
        return entry.quota if entry is not None else 0

    @staticmethod
    def _parse(text: str, path: Path) -> dict[str, UserEntry]:
        entries: dict[str, UserEntry] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#") or ":" not in line:
                continue
            name, _, rest = line.partition(":")
            encoded, _, quota_text = rest.partition(":")
            quota = 0
            if quota_text.strip():
                try:
                    quota = int(quota_text)
                except ValueError:
                    quota = -1
                if quota < 0:
                    # A typo must not lock a user out: the quota is dropped, the login kept.
                    log.warning(
                        "%s:%d: bad quota %r ignored for %s", path, number, quota_text, name
                    )
                    quota = 0
            entries[name] = UserEntry(encoded, quota)
        return entries

    def check(self, name: str, password: str) -> bool:
        """Whether *name* exists and *password* is right (slow: call it off the event loop)."""
        encoded = self.users().get(name)
        if encoded is None:
            # Spend the same time for an unknown user, so timing does not reveal names.
            verify_password(password, _DUMMY_HASH)
            return False
        return verify_password(password, encoded)

    @contextmanager
    def _changing(self) -> Iterator[dict[str, UserEntry]]:
        """The entries to change, read under the lock and written back when the block ends."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            self._stamp = None  # read afresh: another command may have just written it
            entries = dict(self.entries())
            before = dict(entries)
            yield entries
            if entries != before:
                self._write(entries)

    def _write(self, entries: dict[str, UserEntry]) -> None:
        lines = ["# tachymail users: name:scrypt-hash[:quota-bytes] (managed by `tachymail user`)"]
        for name in sorted(entries):
            entry = entries[name]
            quota = f":{entry.quota}" if entry.quota else ""
            lines.append(f"{name}:{entry.hash}{quota}")
        replace_file(self.path, lines, 0o600)
        self._stamp = None

    def add(self, name: str, password: str, *, quota: int | None = None) -> None:
        """Add *name*, or change its password; *quota* in bytes (0: unlimited; None: keep
        an existing user's quota, none for a new one). Raises ValueError for a name with
        ``:``, white space or nothing in it, or a negative quota."""
        if not name or ":" in name or any(c.isspace() for c in name):
            raise ValueError("a user name must be non-empty, without ':' or spaces")
        if quota is not None and quota < 0:
            raise ValueError("a quota must not be negative")
        encoded = hash_password(password)
        with self._changing() as entries:
            old = entries.get(name)
            kept = old.quota if old is not None else 0
            entries[name] = UserEntry(encoded, kept if quota is None else quota)

    def passwd(self, name: str, password: str) -> bool:
        """Change *name*'s password, keeping its quota; False when there is no such user."""
        encoded = hash_password(password)
        with self._changing() as entries:
            old = entries.get(name)
            if old is None:
                return False
            entries[name] = UserEntry(encoded, old.quota)
        return True

    def set_quota(self, name: str, quota: int) -> bool:
        """Set *name*'s quota in bytes (0: unlimited); False when there is no such user."""
        if quota < 0:
            raise ValueError("a quota must not be negative")
        with self._changing() as entries:
            old = entries.get(name)
            if old is None:
                return False
            entries[name] = UserEntry(old.hash, quota)
        return True

    def delete(self, name: str) -> bool:
        """Remove *name*; False when there is no such user."""
        with self._changing() as entries:
            if entries.pop(name, None) is None:
                return False
        return True


class SenderOwnership:
    """Which envelope senders each authenticated user owns, for the sender-login policy.

    A user owns its login name when that is an address (``alice@example.com``), and the
    addresses and ``@domain`` entries listed for it in ``auth.senders``. Addresses and
    domains compare without regard to case; a domain entry covers that domain only, not
    its subdomains. The null sender is owned by everyone when *null_sender* is true.
    """

    def __init__(self, senders: dict[str, list[str]], *, null_sender: bool) -> None:
        self.null_sender = null_sender
        self._addresses: dict[str, set[str]] = {}
        self._domains: dict[str, set[str]] = {}
        for user, owned in senders.items():
            for item in owned:
                if item.startswith("@"):
                    self._domains.setdefault(user, set()).add(item[1:].lower())
                else:
                    self._addresses.setdefault(user, set()).add(item.lower())

    def owns(self, user: str, sender: str) -> bool:
        """Whether *user* may use the envelope sender *sender* ("" for ``<>``)."""
        if not sender:
            return self.null_sender
        address = sender.lower()
        if "@" in user and address == user.lower():
            return True
        if address in self._addresses.get(user, ()):
            return True
        _, at, domain = address.rpartition("@")
        return bool(at) and domain in self._domains.get(user, ())


_DUMMY_HASH = hash_password("tachymail-dummy-password")

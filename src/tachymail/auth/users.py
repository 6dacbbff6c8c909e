"""The users file for SMTP AUTH: one ``name:hash`` line per user, scrypt hashes.

The hash format is ``$scrypt$n=16384,r=8,p=1$<salt b64>$<key b64>``; checking
one costs tens of milliseconds on purpose, so the server runs it off the event
loop. The file is re-read when its modification time changes, so
`tachymail user add` takes effect without a restart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import tempfile
from pathlib import Path

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


class UsersFile:
    """The users file at *path*; reading it again only when it changed on disk."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._mtime: float | None = None
        self._users: dict[str, str] = {}

    def users(self) -> dict[str, str]:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._users, self._mtime = {}, None
            return self._users
        if mtime != self._mtime:
            self._users = self._parse(self.path.read_text())
            self._mtime = mtime
        return self._users

    @staticmethod
    def _parse(text: str) -> dict[str, str]:
        users: dict[str, str] = {}
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#") and ":" in line:
                name, _, encoded = line.partition(":")
                users[name] = encoded
        return users

    def check(self, name: str, password: str) -> bool:
        """Whether *name* exists and *password* is right (slow: call it off the event loop)."""
        encoded = self.users().get(name)
        if encoded is None:
            # Spend the same time for an unknown user, so timing does not reveal names.
            verify_password(password, _DUMMY_HASH)
            return False
        return verify_password(password, encoded)

    def _write(self, users: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".users.")
        with os.fdopen(fd, "w") as handle:
            handle.write("# tachymail users: name:scrypt-hash (managed by `tachymail user`)\n")
            for name in sorted(users):
                handle.write(f"{name}:{users[name]}\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)  # atomic: a running server never reads half a file

    def add(self, name: str, password: str) -> None:
        if not name or ":" in name or any(c.isspace() for c in name):
            raise ValueError("a user name must be non-empty, without ':' or spaces")
        users = dict(self.users())
        users[name] = hash_password(password)
        self._write(users)

    def delete(self, name: str) -> bool:
        users = dict(self.users())
        if users.pop(name, None) is None:
            return False
        self._write(users)
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

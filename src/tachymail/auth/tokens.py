"""The HTTP API's bearer tokens: ``tachymail token add|list|del`` and the server's check.

A token is ``tm_`` followed by 43 characters of URL-safe base64: 32 random octets. Only its
SHA-256 digest is stored: the secret has 256 bits of entropy, so a digest cannot be
reversed by guessing and needs no salt or slow hash (a password would). The file (mode
0600, replaced atomically on each change) is JSON::

    {"version": 1, "tokens": [{"name", "scope", "sha256", "created"}, ...]}

Scopes: ``inject`` (``POST /api/v1/messages``), ``admin`` (every other ``/api/v1/``
route) and ``all`` (both).

The server checks a presented token in memory (:meth:`TokenStore.check`) and re-reads the
file when its modification time, size or inode changes, so a token added or deleted by the
command line takes effect at the next request, in every worker, without a reload.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

#: what a token may do
SCOPES = ("inject", "admin", "all")
#: the prefix of every token (lets secret scanners and people recognise one)
PREFIX = "tm_"
#: a token name: what the access log shows of the client
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")
MAX_NAME = 64
#: a presented token longer than this is not even hashed
MAX_TOKEN = 128


class TokenError(ValueError):
    """A token command cannot be done: a bad name or scope, a name already in use."""


@dataclass(frozen=True, slots=True)
class Token:
    """One stored token (never its secret)."""

    name: str
    scope: str
    created: float


#: the stored entries (the method TokenStore.list hides the builtin inside the class)
_Entries = list[dict[str, Any]]
_Tokens = list[Token]


def allows(scope: str, needed: str) -> bool:
    """Whether a token of *scope* may use a route that needs scope *needed*."""
    return scope == "all" or scope == needed


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


class TokenStore:
    """The tokens file at *path* (``Config.http_tokens_path``: ``data_dir/http-tokens``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        #: digest -> (that digest as stored, token), as last read
        self._by_digest: dict[str, tuple[str, Token]] = {}

    # --- the server's side -----------------------------------------------------------------

    def check(self, token: str) -> tuple[str, str] | None:
        """(name, scope) of *token*, or None when it is no current token.

        One ``stat`` of the file per call, and a re-read when it changed; an unreadable or
        broken file is logged and counts as no tokens (every request then gets 401)."""
        self._refresh()
        if not token.startswith(PREFIX) or len(token) > MAX_TOKEN:
            return None
        digest = _digest(token)
        found = self._by_digest.get(digest)
        # The dict lookup is keyed by a digest the client cannot steer, so its timing says
        # nothing of the secret; the comparison is constant-time all the same.
        if found is None or not hmac.compare_digest(digest, found[0]):
            return None
        return found[1].name, found[1].scope

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._by_digest = None, {}
            return
        except OSError as exc:
            log.error("http tokens: cannot read %s: %s", self.path, exc)
            self._stamp, self._by_digest = None, {}
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        try:
            entries = self._read()
        except (OSError, ValueError) as exc:
            log.error("http tokens: cannot read %s: %s", self.path, exc)
            entries = []
        self._by_digest = {entry["sha256"]: (entry["sha256"], _token(entry)) for entry in entries}
        self._stamp = stamp

    # --- the command line's side --------------------------------------------------------

    def add(self, name: str, scope: str = "all") -> str:
        """Store a new token named *name* with *scope*; returns the token (the only time it
        is seen: only its digest is kept). Raises TokenError for a bad name or scope, or a
        name in use."""
        if scope not in SCOPES:
            raise TokenError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
        if not name or len(name) > MAX_NAME or not set(name) <= NAME_CHARS:
            raise TokenError(
                f"a token name is 1 to {MAX_NAME} letters, digits and . _ - @, not {name!r}"
            )
        entries = self._read()
        if any(entry["name"] == name for entry in entries):
            raise TokenError(f"a token named {name!r} exists already (token del it first)")
        token = PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        entries.append(
            {"name": name, "scope": scope, "sha256": _digest(token), "created": time.time()}
        )
        self._write(entries)
        return token

    def list(self) -> _Tokens:
        """Every stored token, in the order they were added."""
        return [_token(entry) for entry in self._read()]

    def delete(self, name: str) -> bool:
        """Remove the token named *name*; False when there is none."""
        entries = self._read()
        kept = [entry for entry in entries if entry["name"] != name]
        if len(kept) == len(entries):
            return False
        self._write(kept)
        return True

    def _read(self) -> _Entries:
        """The stored entries; [] when there is no file. Raises ValueError for a broken one."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            data = orjson.loads(raw)
            entries = data["tokens"]
            for entry in entries:
                if entry["scope"] not in SCOPES or len(entry["sha256"]) != 64:
                    raise ValueError(f"bad entry {entry.get('name')!r}")
                str(entry["name"])
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.path} is not a tokens file: {exc}") from None
        return list(entries)

    def _write(self, entries: _Entries) -> None:
        """Replace the file atomically (a synced temporary file renamed over it), mode 0600."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        body = orjson.dumps({"version": 1, "tokens": entries}, option=orjson.OPT_INDENT_2)
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(body + b"\n")
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)


def _token(entry: dict[str, Any]) -> Token:
    return Token(str(entry["name"]), str(entry["scope"]), float(entry.get("created", 0.0)))

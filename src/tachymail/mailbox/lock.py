"""The maildrop lock: one POP3 session per user at a time, across every worker process.

RFC 1939 §8 asks for an exclusive lock on the maildrop for the whole session. An
``flock`` on ``<store>/locks/<sha256(user)>`` is per open file, so it excludes a second
session in the same process as well as in another one, and the kernel drops it when the
process dies: a crashed worker never leaves a maildrop locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path


class MaildropLock:
    """An exclusive, non-blocking lock on one user's maildrop."""

    def __init__(self, fd: int, user: str) -> None:
        self._fd = fd
        self.user = user

    @classmethod
    def acquire(cls, store_dir: Path, user: str) -> MaildropLock | None:
        """The lock, or None when another session holds it (POP3 ``-ERR [IN-USE]``).
        Raises OSError when the lock file cannot be made."""
        directory = Path(store_dir) / "locks"
        directory.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(user.lower().encode()).hexdigest()
        fd = os.open(directory / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, user)

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        """Give the maildrop back; calling it twice is harmless."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> MaildropLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

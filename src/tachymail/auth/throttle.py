"""Failed-AUTH accounting shared by every SMTP worker of a node: tarpit, then lockout.

Each failure counts 1 against the client address (an IPv4 address, or the /64 of an
IPv6 one, which one subscriber usually holds whole), against the user name tried, and
against that pair; every count halves each ``half_life`` seconds. When the address's count
reaches ``max_per_ip``, or the user's ``max_per_user``, AUTH from that address or for that
user is refused for ``lockout`` seconds without a password check (so the right password
does not work then either: that is the point), and the count starts again from 0 when the
lockout begins. Attempts during a lockout are not counted, so an attacker cannot keep a
user locked out beyond one period after each ``max_per_user`` guesses.

A success for a user from an address takes back what that address's failures added to
the user's count (a user who mistyped and then got it right is not left near a lockout),
but never touches the address's own count: an attacker who guesses many names from one
address and knows one password does not wipe the slate clean.

The counts live in a small LMDB environment in ``data_dir/auth-failures``, which every
worker process opens after the fork: a write transaction per failure (no fsync: the
counts are worth nothing after a power cut), lock-free reads. It is per node; a cluster
would share it through Redis, as it does its rates. Every method does blocking I/O and
is meant for the thread that runs the password check, never for the event loop.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import lmdb

from tachymail.lmdbenv import delete_where, open_side_store

log = logging.getLogger(__name__)

#: the environment's map (sparse on disk): about half a million counts
#: writes between sweeps of counts that have decayed to nothing
SWEEP_EVERY = 4096
#: a count below this, with no lockout running, is as good as none and is removed
FORGOTTEN = 0.05
# score, time of the score, end of the lockout (0: none)
_RECORD = struct.Struct("<ddd")
T = TypeVar("T")


#: the failure counts' environment, in data_dir
AUTH_FAILURES_DIR = "auth-failures"


@dataclass(frozen=True, slots=True)
class Lockout:
    """A lockout under way: ``scope`` is "ip" or "user"; it ends at ``until`` (epoch)."""

    scope: str
    until: float


@dataclass(frozen=True, slots=True)
class Failure:
    """What one failure left: the higher of the address's and the user's decayed counts
    (the tarpit grows with it), and the lockouts it began (none, "ip", "user" or both)."""

    count: float
    began: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one AUTH attempt: ``ok``; or refused unchecked by ``lockout``; or a
    wrong password, counted as ``failure``."""

    ok: bool
    lockout: Lockout | None = None
    failure: Failure | None = None


def address_key(ip: str) -> bytes:
    """The counted unit of a client address: itself for IPv4, its /64 for IPv6."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip.encode()[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped).encode()
        return str(ipaddress.IPv6Network((address, 64), strict=False)).encode()
    return str(address).encode()


def _digest(*parts: bytes) -> bytes:
    # A fixed-size key whatever the name's length (an AUTH line may carry 12 KB of it).
    return hashlib.blake2b(b"\x00".join(parts), digest_size=16).digest()


class AuthThrottle:
    """Failure counts and lockouts in the LMDB environment at *path* (created if missing).

    ``max_per_ip`` / ``max_per_user`` of 0 switch that limit off. *clock* returns epoch
    seconds (every process of a node must share it).
    """

    def __init__(
        self,
        path: Path,
        *,
        max_per_ip: int,
        max_per_user: int,
        lockout: float,
        half_life: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.env = open_side_store(path)
        self.max_per_ip = max_per_ip
        self.max_per_user = max_per_user
        self.lockout = lockout
        self.half_life = half_life
        self.clock = clock
        self._writes = 0

    def close(self) -> None:
        self.env.close()

    def _keys(self, ip: str, user: str) -> tuple[bytes, bytes, bytes]:
        name = user.encode("utf-8", "replace")
        ip_key = address_key(ip)
        return b"i" + ip_key, b"u" + _digest(name), b"p" + _digest(name, ip_key)

    def _decayed(self, raw: bytes | memoryview | None, now: float) -> tuple[float, float]:
        """(count decayed to *now*, end of lockout) of a stored record."""
        if raw is None:
            return 0.0, 0.0
        score, stamp, until = _RECORD.unpack(raw)
        age = max(now - stamp, 0.0)
        return score * 0.5 ** (age / self.half_life), until

    def attempt(self, ip: str, user: str, check: Callable[[], bool]) -> Verdict:
        """Run the password *check* for *user* from *ip* unless a lockout refuses it first,
        and count its result. Blocking (LMDB and the slow check): call it off the loop."""
        lockout = self.locked(ip, user)
        if lockout is not None:
            return Verdict(False, lockout=lockout)
        if check():
            self.succeeded(ip, user)
            return Verdict(True)
        return Verdict(False, failure=self.failed(ip, user))

    def locked(self, ip: str, user: str) -> Lockout | None:
        """The lockout that refuses AUTH from *ip* for *user* now, or None."""
        now = self.clock()
        ip_key, user_key, _ = self._keys(ip, user)
        with self.env.begin() as txn:
            for scope, key in (("ip", ip_key), ("user", user_key)):
                raw = txn.get(key)
                if raw is not None:
                    until = _RECORD.unpack(raw)[2]
                    if until > now:
                        return Lockout(scope, until)
        return None

    def failed(self, ip: str, user: str) -> Failure:
        """Count one failed AUTH from *ip* for *user*; begins any lockout now due."""
        try:
            return self._write(lambda txn, now: self._count_failure(txn, now, ip, user))
        except lmdb.Error as exc:
            # The password check already failed; not counting it only weakens the guard.
            log.error("AUTH failure accounting failed: %s", exc)
            return Failure(0.0, ())

    def succeeded(self, ip: str, user: str) -> None:
        """Take back what *ip*'s failures added to *user*'s count (see the module doc)."""
        try:
            self._write(lambda txn, now: self._forgive(txn, now, ip, user))
        except lmdb.Error as exc:
            log.error("AUTH success accounting failed: %s", exc)

    def _count_failure(self, txn: lmdb.Transaction, now: float, ip: str, user: str) -> Failure:
        ip_key, user_key, pair_key = self._keys(ip, user)
        counts: dict[str, float] = {}
        began: list[str] = []
        for scope, key, limit in (
            ("ip", ip_key, self.max_per_ip),
            ("user", user_key, self.max_per_user),
            ("pair", pair_key, 0),
        ):
            score, until = self._decayed(txn.get(key), now)
            if until > now:
                counts[scope] = score  # already locked out (a race with a parallel guess)
                continue
            score += 1.0
            counts[scope] = score
            # Rounded: failures seconds apart have decayed a little below whole numbers.
            if limit and score >= limit - 0.5:
                began.append(scope)
                score, until = 0.0, now + self.lockout  # a fresh count after the lockout
            txn.put(key, _RECORD.pack(score, now, until))
        return Failure(max(counts["ip"], counts["user"]), tuple(began))

    def _forgive(self, txn: lmdb.Transaction, now: float, ip: str, user: str) -> None:
        _, user_key, pair_key = self._keys(ip, user)
        pair, _ = self._decayed(txn.get(pair_key), now)
        if not pair:
            return
        txn.delete(pair_key)
        score, until = self._decayed(txn.get(user_key), now)
        txn.put(user_key, _RECORD.pack(max(score - pair, 0.0), now, until))

    def _write(self, work: Callable[[lmdb.Transaction, float], T]) -> T:
        self._writes += 1
        if self._writes % SWEEP_EVERY == 0:
            self.sweep()
        try:
            with self.env.begin(write=True) as txn:
                return work(txn, self.clock())
        except lmdb.MapFullError:
            # Under a flood of new names: forget every count below one failure, retry once.
            self.sweep(threshold=1.0)
            with self.env.begin(write=True) as txn:
                return work(txn, self.clock())

    def sweep(self, threshold: float = FORGOTTEN) -> int:
        """Remove counts decayed below *threshold* whose lockout is over; how many went."""
        now = self.clock()

        def forgotten(value: bytes) -> bool:
            score, until = self._decayed(value, now)
            return until <= now and score < threshold

        return delete_where(self.env, forgotten)

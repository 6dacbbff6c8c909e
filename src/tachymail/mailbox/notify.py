"""Change notification for the mailbox store, across every process of the node.

The store is the truth; a notification only says "look again": an IMAP session in IDLE
(or about to answer a command) learns that some user's mailboxes changed, in whatever
process the change was committed, and reads the store's state itself.

How it works: each process that serves sessions binds one Unix datagram socket,
``<directory>/<pid>-<random>.sock`` (:meth:`ChangeNotifier.start`). After a commit,
:meth:`ChangeNotifier.publish` (the store's ``on_commit``) hands the users it changed to
the event loop, which runs this process's subscribers directly and sends the names
(several commits gathered, at most :data:`MAX_DATAGRAM` octets a datagram) to every other
socket in the directory. The listing of the directory is cached and read again when the
directory changed (a new process bound its socket) or a send finds a socket gone; a socket
whose process died answers ECONNREFUSED and is unlinked then, by whoever sends to it
first. Processes that only write (delivery workers, the CLI) publish without a socket of
their own (``start(loop, listen=False)``, or no start at all).

What a subscriber may rely on (the guarantees):

- After a commit that changed user U's mailboxes is synced in any process, each
  subscriber for U of every process listening at that moment runs on its loop, once or
  more, typically within a few milliseconds; the commit is then visible to any read
  transaction it starts.
- Callbacks are coalesced and may be spurious: many commits may give one call, and a
  call may come without a change of its own (a lost datagram is replaced by a "maybe
  anything changed" that wakes every subscriber of the process). A subscriber compares
  the store's state with what it showed, never counts calls.
- A receiver whose queue is full (Linux keeps only ``net.unix.max_dgram_qlen``
  datagrams, 10 by default, per socket) makes the sender's ``sendto`` fail with EAGAIN:
  the sender then owes that receiver one "anything changed" datagram and tries again
  after :data:`RETRY_INTERVAL` seconds, waiting twice as long each time up to
  :data:`RETRY_MAX`, for as long as the receiver's process lives (one stuck for
  :data:`STUCK_AFTER` seconds is logged once).
- Not covered: a process that dies between its commit and its send (the others see the
  change on their next read of the store, or the next notification), and a process that
  publishes without an event loop (the CLI), which retries a full receiver only briefly.
- Notifications are hints between processes of one node that share the data directory;
  nothing is written to disk but the sockets, and nothing is kept for a process that is
  not listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

#: octets of user names per datagram (names are separated by a line feed)
MAX_DATAGRAM = 8192
#: the datagram that means "maybe any user's mailboxes changed"
ANYTHING = b"*"
#: seconds before the first new try to send an owed "anything changed" to a full receiver;
#: the wait doubles while it stays full, up to RETRY_MAX
RETRY_INTERVAL = 0.005
RETRY_MAX = 0.5
#: seconds a receiver may stay full before it is logged (it is still tried)
STUCK_AFTER = 10.0
#: seconds a publisher without an event loop (the CLI) retries a full receiver
BLOCKING_RETRY = 0.1
#: a listing younger than this after the directory's last change is read again: a socket
#: bound within the same tick of the file system's clock leaves the mtime unchanged
LISTING_GRACE = 1.0
#: the directory of the sockets, under the data directory
DIRECTORY = "mailbox-notify"
#: the longest socket path bind() and sendto() take (sun_path, with its NUL)
_SUN_PATH_MAX = 107
SUFFIX = ".sock"


def _batches(users: Iterable[str]) -> list[bytes]:
    """The datagrams carrying *users*, each at most MAX_DATAGRAM octets (a longer name,
    which no mail address is, travels alone)."""
    out: list[bytes] = []
    current: list[bytes] = []
    length = 0
    for user in sorted(users):
        name = user.encode()
        if current and length + len(name) + 1 > MAX_DATAGRAM:
            out.append(b"\n".join(current))
            current, length = [], 0
        current.append(name)
        length += len(name) + 1
    if current:
        out.append(b"\n".join(current))
    return out


class ChangeNotifier:
    """This process's end of the change notification (see the module docstring).

    Create it in the process that uses it (never across a fork). :meth:`publish` may be
    called from any thread (before :meth:`start`, or never started, it sends at once from
    the caller's thread); :meth:`subscribe` and :meth:`close` are for the loop's thread.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()  # pending names and the scheduled flag
        self._send_lock = threading.Lock()  # the socket, the peer list, the debts
        self._pending: set[str] = set()
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._sock: socket.socket | None = None
        self._listening = False
        self._closed = False
        self._dirfd = -1
        self.name = ""  # this process's socket file, once listening
        self._peers: list[str] = []
        self._listed: tuple[int, float] | None = None  # (directory mtime_ns, when listed)
        self._owed: dict[str, float] = {}  # peer -> since when it is owed ANYTHING
        self._retry: asyncio.TimerHandle | None = None
        self._retry_wait = RETRY_INTERVAL
        self._subscribers: dict[str, dict[object, Callable[[], None]]] = {}
        #: datagrams sent, receivers found full (each one then owed ANYTHING), stale
        #: sockets unlinked, datagrams received: for tests and the debug log
        self.sent = 0
        self.full = 0
        self.cleaned = 0
        self.received = 0

    # --- life cycle ---------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, *, listen: bool = True) -> None:
        """Serve *loop* (its thread runs the subscribers and all sending); with *listen*,
        bind this process's socket so that other processes' changes reach it. Raises
        OSError when the directory cannot be made or the socket cannot be bound."""
        if self._loop is not None:
            return
        self._loop = loop
        self._loop_thread = threading.get_ident()
        if listen:
            self._open_directory()
            self.name = f"{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.bind(self._path(self.name))
            except OSError:
                sock.close()
                raise
            sock.setblocking(False)
            with self._send_lock:
                if self._sock is not None:
                    self._sock.close()
                self._sock = sock
            self._listening = True
            loop.add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        """Stop listening and unlink this process's socket; later publishes do nothing."""
        with self._lock:
            self._closed = True
            self._pending.clear()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        with self._send_lock:
            if self._sock is not None:
                if self._listening and self._loop is not None and not self._loop.is_closed():
                    self._loop.remove_reader(self._sock.fileno())
                self._sock.close()
                self._sock = None
            if self.name and self._dirfd >= 0:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.name, dir_fd=self._dirfd)
            if self._dirfd >= 0:
                os.close(self._dirfd)
                self._dirfd = -1
        self._listening = False
        self._subscribers.clear()

    # --- subscribing ----------------------------------------------------------------------

    def subscribe(self, user: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Run *callback* on the loop after changes of *user*'s mailboxes (in any process;
        see the module docstring for what a call means). Returns the function that ends
        the subscription (calling it twice is harmless)."""
        key = user.lower()
        token = object()
        self._subscribers.setdefault(key, {})[token] = callback

        def unsubscribe() -> None:
            callbacks = self._subscribers.get(key)
            if callbacks is not None:
                callbacks.pop(token, None)
                if not callbacks:
                    del self._subscribers[key]

        return unsubscribe

    def _dispatch(self, users: Iterable[str] | None) -> None:
        """Run the subscribers of *users* (None: of every user)."""
        if not self._subscribers:
            return
        keys = list(self._subscribers) if users is None else {u.lower() for u in users}
        for key in keys:
            callbacks = self._subscribers.get(key)
            if not callbacks:
                continue
            for callback in list(callbacks.values()):
                try:
                    callback()
                except Exception:  # one broken subscriber must not starve the others
                    log.exception("mailbox change subscriber of %s failed", key)

    # --- publishing -----------------------------------------------------------------------

    def publish(self, users: Iterable[str]) -> None:
        """Tell every process (this one too) that *users*' mailboxes changed. Thread-safe
        and quick: the sending happens on the loop (soon after, several publishes
        gathered); without a loop (before :meth:`start`, or a CLI process), right here."""
        names = {user.lower() for user in users}
        if not names:
            return
        with self._lock:
            if self._closed:
                return
            self._pending |= names
        if self._loop is None:
            self._flush(blocking=True)
        else:
            self._schedule()

    def _schedule(self) -> None:
        loop = self._loop
        assert loop is not None
        with self._lock:
            if self._scheduled or self._closed:
                return
            self._scheduled = True
        if threading.get_ident() == self._loop_thread:
            loop.call_soon(self._flush)
        else:
            # a closed loop raises RuntimeError: the process is stopping, nobody to tell
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._flush)

    def _flush(self, blocking: bool = False) -> None:
        """Send what is pending to every other process, and run this one's subscribers."""
        with self._lock:
            users, self._pending, self._scheduled = self._pending, set(), False
            if self._closed or not users:
                return
        with self._send_lock:
            self._send(_batches(users), blocking)
        if self._loop is not None:
            self._dispatch(users)

    def _send(self, payloads: list[bytes], blocking: bool) -> None:
        """Send *payloads* to every peer (the send lock held); a full peer is owed
        ANYTHING instead."""
        if self._sock is None:
            if self._dirfd < 0:
                try:
                    self._open_directory()
                except OSError as exc:  # nobody listens yet, or the data dir is gone
                    log.debug("mailbox notification directory: %s", exc)
                    return
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            self._sock = sock
        self._refresh_peers()
        for peer in list(self._peers):
            if peer in self._owed:
                continue  # the ANYTHING it is owed covers these names
            for payload in payloads:
                outcome = self._send_one(peer, payload)
                if outcome == "full":
                    self._owe(peer)
                if outcome != "sent":
                    break
        if blocking and self._owed:
            self._pay_debts_blocking()

    def _send_one(self, peer: str, payload: bytes) -> str:
        """ "sent", "full" (its queue is), or "gone" (dropped from the peers, unlinked when
        its process is dead)."""
        assert self._sock is not None
        try:
            self._sock.sendto(payload, self._path(peer))
        except BlockingIOError:
            self.full += 1
            return "full"
        except ConnectionRefusedError:  # nobody is bound to it: its process died
            self._forget(peer, unlink=True)
            return "gone"
        except FileNotFoundError:
            self._forget(peer, unlink=False)
            return "gone"
        except OSError as exc:
            if exc.errno in (errno.ENOBUFS, errno.ENOMEM):
                self.full += 1
                return "full"
            log.warning("mailbox change notification to %s: %s", peer, exc)
            self._forget(peer, unlink=False)
            return "gone"
        self.sent += 1
        return "sent"

    def _owe(self, peer: str) -> None:
        self._owed.setdefault(peer, time.monotonic())
        loop = self._loop
        if loop is not None and self._retry is None:
            if threading.get_ident() == self._loop_thread:
                self._retry = loop.call_later(RETRY_INTERVAL, self._pay_debts)
            else:  # not expected (sending runs on the loop), but never block the caller
                loop.call_soon_threadsafe(self._owe_later)

    def _owe_later(self) -> None:
        with self._send_lock:
            if self._owed and self._retry is None and not self._closed:
                assert self._loop is not None
                self._retry = self._loop.call_later(RETRY_INTERVAL, self._pay_debts)

    def _pay_debts(self) -> None:
        """On the loop: try again to send ANYTHING to every full receiver."""
        self._retry = None
        if self._closed:
            return
        now = time.monotonic()
        with self._send_lock:
            for peer, since in list(self._owed.items()):
                if self._send_one(peer, ANYTHING) != "full":
                    self._owed.pop(peer, None)
                elif since <= now - STUCK_AFTER:
                    self._owed[peer] = math.inf  # logged once; still owed
                    log.warning(
                        "mailbox change notification: %s has not read its queue for %gs "
                        "(its process is stopped or overloaded); still trying",
                        peer,
                        STUCK_AFTER,
                    )
            if not self._owed:
                self._retry_wait = RETRY_INTERVAL
            elif self._loop is not None:
                self._retry_wait = min(self._retry_wait * 2, RETRY_MAX)
                self._retry = self._loop.call_later(self._retry_wait, self._pay_debts)

    def _pay_debts_blocking(self) -> None:
        """Without a loop: retry the full receivers for BLOCKING_RETRY seconds at most."""
        deadline = time.monotonic() + BLOCKING_RETRY
        while self._owed and time.monotonic() < deadline:
            time.sleep(RETRY_INTERVAL)
            for peer in list(self._owed):
                if self._send_one(peer, ANYTHING) != "full":
                    self._owed.pop(peer, None)
        if self._owed:
            log.info("mailbox change notification: %d receivers full", len(self._owed))
            self._owed.clear()

    # --- receiving ----------------------------------------------------------------------

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        users: set[str] = set()
        everything = False
        while True:
            try:
                payload = sock.recv(MAX_DATAGRAM + 1024)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # not expected from a local datagram socket
                log.warning("mailbox change notification socket: %s", exc)
                break
            self.received += 1
            if payload == ANYTHING:
                everything = True
            elif not everything:
                users.update(payload.decode("utf-8", "replace").split("\n"))
        if everything:
            self._dispatch(None)
        elif users:
            self._dispatch(users)

    # --- the directory of sockets -------------------------------------------------------

    def _open_directory(self) -> None:
        if self._dirfd >= 0:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        # Kept open: a socket path too long for sun_path is reached through it.
        self._dirfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)

    def _path(self, name: str) -> str:
        path = f"{self.directory}/{name}"
        if len(path.encode()) < _SUN_PATH_MAX:
            return path
        return f"/proc/self/fd/{self._dirfd}/{name}"

    def _refresh_peers(self) -> None:
        """Read the directory again when it changed since the cached listing."""
        try:
            mtime = os.stat(self._dirfd).st_mtime_ns
        except OSError:
            self._peers = []
            return
        listed = self._listed
        if listed is not None and listed[0] == mtime and listed[1] - mtime / 1e9 > LISTING_GRACE:
            return
        now = time.time()
        try:
            names = os.listdir(self._dirfd)
        except OSError:
            names = []
        self._peers = sorted(n for n in names if n.endswith(SUFFIX) and n != self.name)
        self._listed = (mtime, now)

    def _forget(self, peer: str, *, unlink: bool) -> None:
        if peer in self._peers:
            self._peers.remove(peer)
        self._owed.pop(peer, None)
        if unlink:
            try:
                os.unlink(peer, dir_fd=self._dirfd)
                self.cleaned += 1
                log.info("mailbox change notification: removed %s (its process is gone)", peer)
            except FileNotFoundError:
                pass  # another process cleaned it first
            except OSError as exc:
                log.warning("cannot remove the stale socket %s: %s", peer, exc)

    @property
    def peers(self) -> list[str]:
        """The other processes' sockets as last listed (for tests and logs)."""
        return list(self._peers)

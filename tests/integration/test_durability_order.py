"""Durability proven by order: no 250 after DATA leaves before the sync of its batch returns.

The kill -9 test in test_intake.py passes even without any sync, because the page cache
survives a killed process. This test watches the order instead. An LD_PRELOAD shim,
compiled here with gcc, wraps in every server process:

- the calls that make data durable: fdatasync, fsync, msync, sync_file_range, syncfs, and
  pwrite/pwrite64 on a descriptor opened with O_DSYNC (LMDB writes its meta page that way
  after the fdatasync of the data pages, unless the environment is opened without
  metasync); each is delayed by ``DELAY_MS`` (a slow disk) and logged with the
  CLOCK_MONOTONIC time of its entry and of its return, its process and its file;
- write, writev and send on a socket whose bytes contain ``queued as ``: logged with the
  time of entry, that is before any of those bytes can leave the process.

Clients over loopback record, on the same clock (Python's ``time.monotonic``), when they
sent each message's final dot and when its 250 arrived. For every acknowledged message the
check demands, in the process that wrote the 250, a data sync of the queue file and a
synchronous meta-page write that both started after the dot was sent and returned before
the 250 was written (and so before it arrived). The order is exact: the times come from
one clock, and causality gives dot sent < dot read and 250 written < 250 received.

Two mutation tests run the same check against a copy of the package (PYTHONPATH) with
the sync removed (LMDB opened with sync=False), and with the sync kept but not waited for
(the store's apply() returning before its transaction commits), and require it to report
violations, in both commit modes.

LMDB 0.9 as py-lmdb builds it, checked with ``strace -f -e trace=fsync,fdatasync,msync``
on a worker: each commit is one fdatasync of data.mdb, then a pwrite of the meta page
through a second descriptor opened with O_DSYNC; no msync (no writemap), no
sync_file_range or syncfs.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import running_server

DELAY_MS = 50
CLIENTS = 6
MESSAGES_PER_CLIENT = 4

SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define REAL(name) \
    static __typeof__(name) *real_##name; \
    if (!real_##name) real_##name = (__typeof__(name) *)dlsym(RTLD_NEXT, #name)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* One line per event, appended with one write: the log is opened per event, since a
   process may close descriptors it did not open. */
static void record(const char *kind, double start, double end, const char *detail) {
    const char *path = getenv("SYNCSHIM_LOG");
    if (!path) return;
    char line[1024];
    int n = snprintf(line, sizeof line, "%s\t%d\t%ld\t%.9f\t%.9f\t%s\n", kind, (int)getpid(),
                     (long)syscall(SYS_gettid), start, end, detail);
    if (n <= 0) return;
    if (n >= (int)sizeof line) n = sizeof line - 1;
    int fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC,
                          0644);
    if (fd < 0) return;
    syscall(SYS_write, fd, line, (size_t)n);
    syscall(SYS_close, fd);
}

static void slow_disk(void) {
    const char *ms = getenv("SYNCSHIM_DELAY_MS");
    long delay = ms ? atol(ms) : 50;
    struct timespec ts = {delay / 1000, (delay % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static void path_of(int fd, char *out, size_t size) {
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, out, size - 1);
    out[n < 0 ? 0 : n] = 0;
}

#define SYNC_CALL(kind, fd, call) \
    do { \
        double start = now(); \
        slow_disk(); \
        __typeof__(call) rc = call; \
        int saved = errno; \
        double end = now(); \
        char where[512]; \
        if ((fd) >= 0) path_of((fd), where, sizeof where); else strcpy(where, "-"); \
        record(kind, start, end, where); \
        errno = saved; \
        return rc; \
    } while (0)

int fdatasync(int fd) { REAL(fdatasync); SYNC_CALL("fdatasync", fd, real_fdatasync(fd)); }
int fsync(int fd) { REAL(fsync); SYNC_CALL("fsync", fd, real_fsync(fd)); }
int syncfs(int fd) { REAL(syncfs); SYNC_CALL("syncfs", fd, real_syncfs(fd)); }
int sync_file_range(int fd, off64_t offset, off64_t nbytes, unsigned int flags) {
    REAL(sync_file_range);
    SYNC_CALL("sync_file_range", fd, real_sync_file_range(fd, offset, nbytes, flags));
}
int msync(void *addr, size_t length, int flags) {
    REAL(msync);
    SYNC_CALL("msync", -1, real_msync(addr, length, flags));
}

static int dsync(int fd) {
    int flags = fcntl(fd, F_GETFL);
    return flags >= 0 && (flags & O_DSYNC);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    REAL(pwrite);
    if (!dsync(fd)) return real_pwrite(fd, buf, count, offset);
    SYNC_CALL("dsync-write", fd, real_pwrite(fd, buf, count, offset));
}
ssize_t pwrite64(int fd, const void *buf, size_t count, off64_t offset) {
    REAL(pwrite64);
    if (!dsync(fd)) return real_pwrite64(fd, buf, count, offset);
    SYNC_CALL("dsync-write", fd, real_pwrite64(fd, buf, count, offset));
}

/* A reply carrying "queued as ID" is about to be written to a socket: log the ids. */
static void note_replies(int fd, const void *buf, size_t count) {
    static const char marker[] = "queued as ";
    const size_t mlen = sizeof marker - 1;
    if (count < mlen || !memmem(buf, count, marker, mlen)) return;
    int type;
    socklen_t len = sizeof type;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0) return;
    double at = now();
    char ids[512];
    size_t used = 0;
    const char *p = buf, *end = (const char *)buf + count;
    while ((p = memmem(p, (size_t)(end - p), marker, mlen)) != NULL) {
        p += mlen;
        if (used && used < sizeof ids - 1) ids[used++] = ',';
        while (p < end && used < sizeof ids - 1 &&
               ((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')))
            ids[used++] = *p++;
    }
    ids[used] = 0;
    record("reply", at, at, ids);
}

ssize_t write(int fd, const void *buf, size_t count) {
    REAL(write);
    note_replies(fd, buf, count);
    return real_write(fd, buf, count);
}
ssize_t send(int fd, const void *buf, size_t count, int flags) {
    REAL(send);
    note_replies(fd, buf, count);
    return real_send(fd, buf, count, flags);
}
ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    REAL(writev);
    for (int i = 0; i < iovcnt; i++) note_replies(fd, iov[i].iov_base, iov[i].iov_len);
    return real_writev(fd, iov, iovcnt);
}
"""

#: calls that flush a file's data; the meta page's O_DSYNC write is logged as "dsync-write"
FLUSHES = {"fdatasync", "fsync", "msync", "sync_file_range", "syncfs"}


@dataclass(frozen=True)
class Event:
    """One line of the shim's log."""

    kind: str
    pid: int
    start: float
    end: float
    detail: str


@dataclass(frozen=True)
class Ack:
    """One acknowledged message as its client saw it (time.monotonic, CLOCK_MONOTONIC)."""

    queue_id: str
    dot_sent: float
    reply_received: float


def build_shim(tmp_path: Path) -> Path:
    """Compile the shim; gcc is a test requirement (./dev installs it), so its absence fails."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    assert gcc, "gcc is needed to build the LD_PRELOAD shim (Debian package gcc)"
    source = tmp_path / "syncshim.c"
    source.write_text(SHIM_SOURCE)
    shim = tmp_path / "syncshim.so"
    done = subprocess.run(
        [gcc, "-O2", "-Wall", "-shared", "-fPIC", "-o", str(shim), str(source), "-ldl"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"the shim does not build:\n{done.stderr}"
    return shim


def read_events(log: Path) -> list[Event]:
    events = []
    for line in log.read_text().splitlines():
        kind, pid, _tid, start, end, detail = line.split("\t")
        events.append(Event(kind, int(pid), float(start), float(end), detail))
    return events


def order_violations(events: list[Event], acks: list[Ack], queue_file: Path) -> list[str]:
    """Every acknowledged message whose 250 was not preceded by a completed sync of its batch.

    For each ack: the shim must have seen the 250 written (in process P), and P must have
    run a flush of *queue_file* (or an msync) that started after the dot was sent, and
    either a synchronous (O_DSYNC) write to it (LMDB's meta page with metasync) or a
    second flush that started after the first returned (the meta page written between
    them, without metasync), all returned before the 250 was written and received.
    """
    written: dict[str, Event] = {}
    for event in events:
        if event.kind == "reply":
            for queue_id in event.detail.split(","):
                written.setdefault(queue_id, event)
    target = str(queue_file.resolve())  # /proc/self/fd names the resolved path
    problems = []
    for ack in acks:
        reply = written.get(ack.queue_id)
        if reply is None:
            problems.append(f"{ack.queue_id}: the shim saw no write of its 250 (extend the shim)")
            continue
        deadline = min(reply.start, ack.reply_received)
        first = _first_synced(events, FLUSHES, reply.pid, target, ack.dot_sent, deadline)
        if first is None:
            problems.append(f"{ack.queue_id}: no data sync between its dot and its 250")
            continue
        # the meta page: written synchronously (metasync), or by plain write after that data
        # sync and made durable by another sync of the file (the inline chain)
        meta = _first_synced(events, {"dsync-write"}, reply.pid, target, ack.dot_sent, deadline)
        again = _first_synced(events, FLUSHES, reply.pid, target, first.end, deadline)
        if meta is None and again is None:
            problems.append(f"{ack.queue_id}: no synced meta-page write between its dot and 250")
    return problems


def _first_synced(
    events: list[Event], kinds: set[str], pid: int, target: str, after: float, before: float
) -> Event | None:
    """The first event of *kinds* that *pid* ran on *target* entirely within (after,
    before), or None."""
    return next(
        (
            e
            for e in events
            if e.kind in kinds
            and e.pid == pid
            and (e.detail == target or e.kind == "msync")  # msync names an address, not a file
            and after < e.start
            and e.end < before
        ),
        None,
    )


class Sender(threading.Thread):
    """One SMTP session sending *count* messages, timing each final dot and each 250."""

    def __init__(self, port: int, name: str, count: int) -> None:
        super().__init__(daemon=True)
        self.port, self.label, self.count = port, name, count
        self.acks: list[Ack] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc

    def _run(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=60) as sock:
            # The dot goes out at once, so its send time is when the server can first see it.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader = sock.makefile("rb")

            def reply() -> bytes:
                line = reader.readline()
                while line[3:4] == b"-":
                    line = reader.readline()
                if not line:
                    raise ConnectionError("the server closed the connection")
                return line

            assert reply().startswith(b"220")
            sock.sendall(b"EHLO order.test\r\n")
            assert reply().startswith(b"250")
            for n in range(self.count):
                sock.sendall(b"MAIL FROM:<d@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
                assert reply().startswith(b"250") and reply().startswith(b"250")
                assert reply().startswith(b"354")
                sock.sendall(f"Subject: {self.label}-{n}\r\n\r\n{'x' * 500}\r\n".encode())
                dot_sent = time.monotonic()
                sock.sendall(b".\r\n")
                final = reply()
                received = time.monotonic()
                match = re.match(rb"250 2\.0\.0 Ok: queued as (\w+)", final)
                assert match, f"DATA not acknowledged: {final!r}"
                self.acks.append(Ack(match.group(1).decode(), dot_sent, received))
            sock.sendall(b"QUIT\r\n")


def send_and_trace(
    tmp_path: Path, commit: str, pythonpath: Path | None = None
) -> tuple[list[str], list[Ack]]:
    """Run a server under the shim, send from concurrent clients; the order check's
    violations and the acknowledgements."""
    shim = build_shim(tmp_path)
    log = tmp_path / "sync.log"
    env = {"LD_PRELOAD": str(shim), "SYNCSHIM_LOG": str(log), "SYNCSHIM_DELAY_MS": str(DELAY_MS)}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    extra = f'[queue]\ncommit = "{commit}"\n'
    with running_server(tmp_path, extra=extra, roles=("mx",), env=env) as srv:
        senders = [Sender(srv.port, f"c{i}", MESSAGES_PER_CLIENT) for i in range(CLIENTS)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(300)  # only catches a hang
            assert not sender.is_alive(), "a client hung"
            assert sender.error is None, f"{sender.error!r}\n{srv.log()}"
        queue_file = srv.data_dir / "queue" / "data.mdb"
    acks = [ack for sender in senders for ack in sender.acks]
    assert len(acks) == CLIENTS * MESSAGES_PER_CLIENT
    return order_violations(read_events(log), acks, queue_file), acks


@pytest.mark.parametrize("commit", ["inline", "thread"])
def test_no_250_before_its_batch_is_synced(tmp_path: Path, commit: str) -> None:
    violations, acks = send_and_trace(tmp_path, commit)
    assert not violations, "\n".join(violations)
    # For good measure: every client waited at least one delayed sync for its 250.
    slow = [a for a in acks if a.reply_received - a.dot_sent < DELAY_MS / 1000]
    assert not slow, f"250s that did not wait for the slow disk: {slow}"


# --- mutations: the check above must be able to fail -----------------------------------------


def mutated_package(
    tmp_path: Path, path: str, old: str, new: str, *more: tuple[str, str, str]
) -> Path:
    """A copy of the package under test with *old* replaced by *new* in *path* (and each
    further (path, old, new) of *more*).

    Returns the directory to put on PYTHONPATH. Fails loudly if an *old* is not found once,
    so that the mutation cannot silently stop applying when the code moves.
    """
    import tachymail

    installed = Path(tachymail.__file__).resolve().parent
    root = tmp_path / "mutant"
    copy = root / "tachymail"
    shutil.copytree(installed, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for where, before, after in ((path, old, new), *more):
        target = copy / where
        text = target.read_text()
        assert text.count(before) == 1, f"mutation does not apply: {before!r} not once in {where}"
        target.write_text(text.replace(before, after))
    probe = subprocess.run(
        [sys.executable, "-c", "import tachymail; print(tachymail.__file__)"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=60,
    )
    assert probe.stdout.strip() == str(copy / "__init__.py"), probe.stdout + probe.stderr
    return root


@pytest.mark.parametrize("commit", ["inline", "thread"])
def test_order_check_catches_a_removed_sync(tmp_path: Path, commit: str) -> None:
    """With LMDB opened with sync=False, no ack is preceded by a sync: all are reported."""
    # lmdbenv.open_store opens the queue's (and the mailbox store's) environment; the
    # inline chain's own sync of a lone batch (env.sync(True) forces one even then) goes too
    root = mutated_package(
        tmp_path,
        "lmdbenv.py",
        "sync=True,",
        "sync=False,",
        ("queue/commit.py", "self.store.env.sync(True)", "self.store.env.sync(False)"),
    )
    violations, _ = send_and_trace(tmp_path, commit, pythonpath=root)
    reported = {v.split(":")[0] for v in violations}
    assert len(reported) == CLIENTS * MESSAGES_PER_CLIENT, "\n".join(violations)


#: appended to the copy's queue/store.py: apply() hands the transaction to a thread of its
#: own and returns at once, so the 250s go out while (or before) their batch syncs
EARLY_APPLY = """

import threading

_synced_apply = QueueStore.apply


def _early_apply(self, operations, **options):  # mutation: returns before the sync
    threading.Thread(
        target=_synced_apply, args=(self, operations), kwargs=options, daemon=True
    ).start()
    return [None] * len(operations)


QueueStore.apply = _early_apply
"""


@pytest.mark.parametrize("commit", ["inline", "thread"])
def test_order_check_catches_an_early_ack(tmp_path: Path, commit: str) -> None:
    """The sync still runs, but the 250s no longer wait for it: the check reports them."""
    anchor = "    def apply("
    root = mutated_package(tmp_path, "queue/store.py", anchor, anchor)
    store_py = root / "tachymail" / "queue" / "store.py"
    text = store_py.read_text()
    assert "class QueueStore" in text
    store_py.write_text(text + EARLY_APPLY)
    violations, _ = send_and_trace(tmp_path, commit, pythonpath=root)
    assert violations, "the order check missed 250s sent before their batch was synced"

"""Mailbox benchmarks side by side: Tachymail's LMTP listener, local delivery and POP3
against Dovecot and Postfix's virtual(8), in the same run, on the same message set.

    .venv/bin/python benchmarks/mailbox_bench.py [--messages 10000] [--maildrop 2000] [--repeat 3]
        [--sessions 16] [--size 1024] [--cells lmtp,smtp,pop3,...] [--workers N]
        [--tachymail-toml FILE] [--quick]

Cells (each run --repeat times, the two servers alternating which goes first, each run on
freshly started servers; medians, and the ratio is the median of the per-run ratios):

- lmtp: LMTP delivery of --messages 1 KiB messages over --sessions sessions, Dovecot's LMTP
  vs Tachymail's ``lmtp`` listener. The load is Postfix's ``smtp-source -L -d``, one process
  and one session per user (user0..user15@example.test), so both servers see the same
  recipients spread over 16 mailboxes. The clock stops when every message has its LMTP 250
  and is in the mailbox (files in Dovecot's Maildir, messages in Tachymail's store).
- smtp: SMTP to the mailbox, end to end: the same load as SMTP into Postfix delivering with
  virtual(8) into Maildir, and into Tachymail (the local domain's users, local delivery in the
  delivery workers). The clock stops when the last message is in a mailbox.
- pop3: one poplib session on a --maildrop message maildrop, filled beforehand through each
  server's LMTP: USER, PASS and STAT (timed apart: the password check differs, scrypt in
  Tachymail's users file, plaintext in this Dovecot), then RETR of every message --passes
  times over (20: one pass takes a fraction of a second) and QUIT: messages/s. Dovecot's
  pop3 vs Tachymail's ``pop3`` listener.
- pop3-lean, pop3-pipelined: the same with a minimal client instead of poplib, one RETR per
  round trip, then 64 RETRs in flight (RFC 2449 PIPELINING, which both servers offer). The
  pipelined cell carries the issue's 2x target: its client spends about 1 µs per message,
  so the rate is the server's. poplib spends more CPU per message than either server, so
  the pop3 cell shows what a simple client sees rather than what the server can do.

  The pop3 cells run client and server on one CPU (--pop3-cpu, the last by default): one
  RETR per round trip otherwise measures where the scheduler happens to place the two (on
  a VM a wake-up across CPUs costs more than either server's work for a 1 KiB RETR, and
  the rate jumped 2-3x between identical runs); pinned, it measures CPU per message.

Both sides start cold, get one warm-up message per session first (not timed), and run with
their defaults (Dovecot: mail_fsync = optimized, a saved message is fsynced before its 250;
Postfix: its queue file and the Maildir file are fsynced; Tachymail: one synced LMDB commit
per batch). For each figure the script records what may limit it: the server's CPU (in
cores, by kind of process: Dovecot's lmtp/pop3/auth, Postfix's smtpd/cleanup/qmgr/virtual,
Tachymail's smtp-worker/delivery-worker/supervisor; and its busiest single process), the
client's CPU (smtp-source or this script), and the flush requests completed by the disk
holding /tmp (from /proc/diskstats: the fsyncs that reached the device, whoever made them;
meaningful on a quiet machine only).

Prints a Markdown table and writes benchmarks/results/mailbox.json (the machine, the
parameters, each cell's medians and every run). Needs root (Dovecot and Postfix drop
privileges) and the Debian packages dovecot-core, -lmtpd, -pop3d and postfix; skipped with
a message otherwise. ``--tachymail-toml`` appends TOML to Tachymail's configuration (e.g.
``[mailbox] commit_linger_ms``) to try other settings in the same side-by-side run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import poplib
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import peers
from dovecot import dovecot_unavailable, start_dovecot

HERE = Path(__file__).resolve().parent

DOMAIN = "example.test"
PASSWORD = "bench-password"
SENDER = "bench@example.com"
#: the issue's targets (tachymail / anchor). POP3's is on the pipelined cell, the one whose
#: client costs least: with poplib (about 16 µs of client CPU per message on the shared CPU,
#: more than either server spends) or one RETR per round trip, the figure measures mostly the
#: client and the round trip; those two cells show what such clients see, without a target
TARGETS = {"lmtp": 3.0, "smtp": 3.0, "pop3": 0.0, "pop3-lean": 0.0, "pop3-pipelined": 2.0}
ANCHORS = {
    "lmtp": "Dovecot LMTP",
    "smtp": "Postfix virtual(8)",
    "pop3": "Dovecot POP3",
    "pop3-lean": "Dovecot POP3",
    "pop3-pipelined": "Dovecot POP3",
}
TITLES = {
    "lmtp": "LMTP delivery, {sessions} sessions, {size_k} KiB",
    "smtp": "SMTP → mailbox end to end, {sessions} sessions, {size_k} KiB",
    "pop3": "POP3 RETR of a {maildrop:,}-message maildrop, {size_k} KiB, {passes}x, poplib",
    "pop3-lean": "the same, one RETR per round trip, a minimal client",
    "pop3-pipelined": "the same, RETRs pipelined {window} at a time (RFC 2449): the server's rate",
}
#: RETR commands in flight at once in the pop3-pipelined cell
PIPELINE_WINDOW = 64


def bench_users(count: int) -> list[str]:
    return [f"user{i}@{DOMAIN}" for i in range(count)]


# --- what limits a figure: CPU per process, load generator CPU, device flushes -------------


def process_cpu(root: int) -> dict[int, tuple[str, float, float]]:
    """pid -> (name, own CPU seconds, CPU seconds of its reaped children) for *root*'s tree."""
    tree = peers._children()
    found: dict[int, tuple[str, float, float]] = {}
    stack = [root]
    while stack:
        pid = stack.pop()
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        own = (int(fields[11]) + int(fields[12])) / peers.CLK_TCK
        reaped = (int(fields[13]) + int(fields[14])) / peers.CLK_TCK
        found[pid] = (name, own, reaped)
        stack.extend(tree.get(pid, []))
    return found


def device_flushes(path: Path) -> int | None:
    """Flush requests completed by the block device holding *path* (None if not found)."""
    dev = os.stat(path).st_dev
    wanted = (os.major(dev), os.minor(dev))
    try:
        lines = Path("/proc/diskstats").read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        fields = line.split()
        # major minor name, then 17 counters on kernels >= 5.5; flushes completed is the 16th
        if (int(fields[0]), int(fields[1])) == wanted and len(fields) >= 19:
            return int(fields[18])
    return None


def listening_inodes(ports: set[int]) -> set[str]:
    """Socket inodes of the TCP listeners on 127.0.0.1 *ports* (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) in ports:  # 0A: LISTEN
            found.add(fields[9])
    return found


def tachymail_roles(root: int, ports: set[int]) -> dict[int, str]:
    """Tachymail's processes by role: the supervisor, the SMTP workers (they hold the
    listening sockets: LMTP and POP3 run there too), the delivery workers (they do not)."""
    listeners = listening_inodes(ports)
    roles = {root: "supervisor"}
    for pid in peers._children().get(root, []):
        sockets = set()
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        sockets.add(target[8:-1])
        except FileNotFoundError:
            continue
        roles[pid] = "smtp-worker" if sockets & listeners else "delivery-worker"
    return roles


@dataclass
class Meter:
    """CPU and flush counters around a measured interval, for the server whose processes
    descend from *root*; *roles* names some of them (else their command name counts)."""

    root: int
    roles: dict[int, str] = field(default_factory=dict)
    started: float = 0.0
    elapsed: float = 0.0
    cpu_before: dict[int, tuple[str, float, float]] = field(default_factory=dict)
    cpu_after: dict[int, tuple[str, float, float]] = field(default_factory=dict)
    children_cpu: float = 0.0
    self_cpu: float = 0.0
    flushes: int | None = None

    @contextmanager
    def measure(self) -> Iterator[None]:
        flush0 = device_flushes(Path(tempfile.gettempdir()))
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = time.process_time()
        self.cpu_before = process_cpu(self.root)
        self.started = time.perf_counter()
        yield
        self.elapsed = time.perf_counter() - self.started
        self.cpu_after = process_cpu(self.root)
        self.self_cpu = time.process_time() - own
        kids_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.children_cpu = (kids_after.ru_utime - kids.ru_utime) + (
            kids_after.ru_stime - kids.ru_stime
        )
        flush1 = device_flushes(Path(tempfile.gettempdir()))
        if flush0 is not None and flush1 is not None:
            self.flushes = flush1 - flush0

    def server_cpu(self) -> tuple[dict[str, float], str, float]:
        """CPU seconds in the interval by kind of process ("lmtp", "smtp-worker", ...; those
        that exited within it, a Dovecot pop3 at QUIT, count as "exited children of" their
        parent's kind, through its cutime/cstime), and the busiest single process with its
        CPU seconds."""
        by_kind: dict[str, float] = {}
        busiest, busiest_cpu = "", 0.0
        for pid, (name, own, reaped) in self.cpu_after.items():
            _, own0, reaped0 = self.cpu_before.get(pid, (name, 0.0, 0.0))
            kind = self.roles.get(pid, name)
            by_kind[kind] = by_kind.get(kind, 0.0) + own - own0
            if reaped > reaped0:
                exited = f"exited children of {kind}"
                by_kind[exited] = by_kind.get(exited, 0.0) + reaped - reaped0
            if own - own0 > busiest_cpu:
                busiest, busiest_cpu = f"{kind}[{pid}]", own - own0
        return by_kind, busiest, busiest_cpu

    def figures(self, messages: int) -> dict[str, object]:
        by_kind, busiest, busiest_cpu = self.server_cpu()
        total = sum(by_kind.values())
        wall = max(self.elapsed, 1e-9)
        row: dict[str, object] = {
            "msgs_per_s": messages / wall,
            "seconds": self.elapsed,
            "server_cores": total / wall,
            "server_cpu_s_per_1000": total / messages * 1000,
            "cores_by_process": {
                kind: round(cpu / wall, 3)
                for kind, cpu in sorted(by_kind.items(), key=lambda item: -item[1])
                if cpu > 0
            },
            "busiest_process": busiest,
            "busiest_process_cores": busiest_cpu / wall,
            "client_cpu_s_per_1000": (self.children_cpu + self.self_cpu) / messages * 1000,
        }
        if self.flushes is not None:
            row["device_flushes_per_1000"] = self.flushes / messages * 1000
        return row


# --- load ------------------------------------------------------------------------------------


def send_load(port: int, users: Sequence[str], messages: int, size: int, lmtp: bool) -> None:
    """*messages* spread over one ``smtp-source -d`` session per user (``-L``: LMTP); raises
    when any of them reports an error (a refused recipient, a lost connection)."""
    share, extra = divmod(messages, len(users))
    procs = []
    for i, user in enumerate(users):
        count = share + (1 if i < extra else 0)
        if count == 0:
            continue
        cmd = [peers.SMTP_SOURCE, *(["-L"] if lmtp else []), "-s", "1", "-d"]
        cmd += ["-m", str(count), "-l", str(size), "-f", SENDER, "-t", user]
        cmd.append(f"127.0.0.1:{port}")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    errors = []
    try:
        for proc in procs:
            try:
                _out, err = proc.communicate(timeout=1800)
            except subprocess.TimeoutExpired:
                proc.kill()
                _out, err = proc.communicate()
            if proc.returncode != 0 or err.strip():
                errors.append(err.decode(errors="replace").strip()[:300])
    finally:
        for proc in procs:  # interrupted: stop the rest by PID
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if errors:
        raise RuntimeError(f"smtp-source failed: {errors[0]}")


def wait_count(count: Callable[[], int], expected: int, timeout: float) -> None:
    """Poll *count* until it reaches *expected* (more is an error). Every 50 ms: counting
    files in 16 Maildirs costs a few ms of the benchmark's CPU, which the machine shares."""
    deadline = time.monotonic() + timeout
    while True:
        got = count()
        if got >= expected:
            if got > expected:
                raise RuntimeError(f"{got} messages in the mailboxes, expected {expected}")
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{got} of {expected} messages reached the mailboxes")
        time.sleep(0.05)


def maildir_count(dirs: Sequence[Path]) -> int:
    total = 0
    for d in dirs:
        for sub in ("new", "cur"):
            with suppress(FileNotFoundError):
                total += sum(1 for _ in os.scandir(d / sub))
    return total


def pop3_login(port: int, user: str, expected: int) -> poplib.POP3:
    """A POP3 session logged in with USER/PASS whose STAT shows *expected* messages."""
    pop = poplib.POP3("127.0.0.1", port, timeout=120)
    try:
        pop.user(user)
        pop.pass_(PASSWORD)
        count, _size = pop.stat()
        if count != expected:
            raise RuntimeError(f"the maildrop holds {count} messages, expected {expected}")
    except BaseException:
        pop.close()
        raise
    return pop


def pop3_retrieve_all(pop: poplib.POP3, numbers: Sequence[int]) -> int:
    """RETR of the messages *numbers* (no DELE), then QUIT; returns the octets retrieved."""
    try:
        octets = 0
        for number in numbers:
            _resp, _lines, size = pop.retr(number)
            octets += size
        pop.quit()
    except BaseException:
        pop.close()
        raise
    return octets


def pop3_retrieve_pipelined(
    pop: poplib.POP3, numbers: Sequence[int], window: int = PIPELINE_WINDOW
) -> int:
    """RETR of the messages *numbers* (no DELE) with up to *window* commands in flight (the
    servers advertise PIPELINING; 1: one per round trip), then QUIT; returns the octets of
    the multi-line responses. Costs the client little: each response is found whole, its end
    being the first CRLF "." CRLF after the status line (dot-stuffing keeps that sequence
    out of a message's own lines), by moving an offset through what was received, not read
    line by line as poplib does nor cut out of the buffer one response at a time."""
    sock = pop.sock
    buffer = b""
    pos = 0  # where the next response starts in buffer
    octets, sent, received, count = 0, 0, 0, len(numbers)
    try:
        while received < count:
            if sent < count and sent - received < window:
                upto = min(count, received + window)
                sock.sendall(b"".join(b"RETR %d\r\n" % n for n in numbers[sent:upto]))
                sent = upto
            status_end = buffer.find(b"\r\n", pos)
            end = buffer.find(b"\r\n.\r\n", status_end) if status_end >= 0 else -1
            if end < 0:
                if status_end >= 0 and not buffer.startswith(b"+OK", pos):
                    raise RuntimeError(f"RETR {received + 1}: {buffer[pos:status_end]!r}")
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("the server closed the connection")
                buffer = buffer[pos:] + chunk
                pos = 0
                continue
            if not buffer.startswith(b"+OK", pos):
                raise RuntimeError(f"RETR {received + 1}: {buffer[pos:status_end]!r}")
            octets += end - status_end  # the message lines with their CRLFs, stuffed
            pos = end + 5
            received += 1
        buffer = buffer[pos:]
        pop.sock.sendall(b"QUIT\r\n")
        while b"\r\n" not in buffer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            buffer += chunk
        if not buffer.startswith(b"+OK"):
            raise RuntimeError(f"QUIT: {buffer!r}")
    finally:
        pop.close()
    return octets


# --- Tachymail with local mailboxes --------------------------------------------------------


@dataclass
class Tachymail:
    peer: peers.Peer
    ports: dict[str, int]
    data_dir: Path

    def stored(self) -> int:
        """Messages in the mailbox store (0 before the first delivery creates it)."""
        from tachymail.mailbox.store import MailboxStore

        try:
            store = MailboxStore(self.data_dir / "mailbox", readonly=True)
        except FileNotFoundError:
            return 0
        try:
            return store.totals()[1]
        finally:
            store.close()


def make_users_file(workdir: Path, users: Sequence[str]) -> Path:
    """A users file with *users* (password PASSWORD), made once with `tachymail user add`."""
    path = workdir / "users"
    binary = Path(sys.executable).with_name("tachymail")
    config = workdir / "users.toml"
    config.write_text(
        f'[server]\ndata_dir = "{workdir / "users-data"}"\n'
        f'[policy]\nlocal_domains = ["{DOMAIN}"]\n[auth]\nusers_file = "{path}"\n'
    )
    for user in users:
        subprocess.run(
            [str(binary), "user", "add", "-c", str(config), "--password-stdin", user],
            input=PASSWORD + "\n",
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    return path


def start_tachymail(
    workdir: Path, users_file: Path, workers: int | None, extra: str = ""
) -> Tachymail:
    """tachymail serve with mx, lmtp and pop3 listeners and DOMAIN as its local domain,
    delivering (not --hold), everything else at its defaults; *extra* TOML is appended."""
    ports = {role: peers.free_port() for role in ("mx", "lmtp", "pop3")}
    data = workdir / "tachymail-data"
    listeners = "".join(
        f'[[listener]]\naddress = "127.0.0.1:{port}"\nrole = "{role}"\n\n'
        for role, port in ports.items()
    )
    config = workdir / "tachymail.toml"
    config.write_text(
        f'[server]\nhostname = "tachymail.bench.test"\ndata_dir = "{data}"\nhold = false\n\n'
        f"{listeners}"
        f'[policy]\nlocal_domains = ["{DOMAIN}"]\n\n'
        f'[auth]\nusers_file = "{users_file}"\n\n'
        # loopback is a trusted network anyway; said here so the cell does not depend on it
        "[pop3]\nplaintext_auth = true\n\n"
        # nothing leaves loopback: a lookup nobody arranged for fails at once
        '[delivery]\nresolver = "127.0.0.1:9"\n\n'
        '[metrics]\naddress = ""\n\n'
        f"{extra}\n"
    )
    binary = Path(sys.executable).with_name("tachymail")
    log = open(workdir / "tachymail.log", "ab")  # noqa: SIM115 - kept open by the child
    proc = subprocess.Popen(
        [
            str(binary),
            "--log-level",
            "WARNING",
            "serve",
            "-c",
            str(config),
            *(["--workers", str(workers)] if workers else []),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    peer = peers.Peer("tachymail", ports["mx"], proc.pid, proc=proc)
    try:
        for port in ports.values():
            peers.wait_port(port)
    except BaseException:
        peer.stop()
        raise RuntimeError(
            "tachymail did not start:\n" + (workdir / "tachymail.log").read_text()[-3000:]
        ) from None
    return Tachymail(peer, ports, data)


# --- the cells -----------------------------------------------------------------------------


@dataclass
class Params:
    messages: int
    maildrop: int
    sessions: int
    size: int
    workers: int | None
    users_file: Path
    #: TOML appended to tachymail's configuration (experiments: [mailbox] commit_linger_ms)
    extra: str = ""
    #: times the pop3 cells RETR the whole maildrop in their one session
    passes: int = 20
    #: the CPU the pop3 cells run on, client and server together; None: not pinned
    pop3_cpu: int | None = None


@dataclass
class Subject:
    """A server under test, whichever it is: where to send, how many messages its mailboxes
    hold, what to call its processes, how to stop it."""

    root: int
    lmtp_port: int
    smtp_port: int
    pop3_port: int
    count: Callable[[], int]
    stop: Callable[[], None]
    roles: Callable[[], dict[int, str]] = dict


@contextmanager
def subject(side: str, cell: str, users: list[str], p: Params) -> Iterator[Subject]:
    """Start the anchor of *cell* (Dovecot, or Postfix virtual(8) for "smtp") or Tachymail,
    with *users*; stopped by PID when the block ends."""
    with tempfile.TemporaryDirectory(prefix=f"mailbox-{cell}-{side}-") as tmp:
        if side == "tachymail":
            tachy = start_tachymail(Path(tmp), p.users_file, p.workers, p.extra)
            ports = set(tachy.ports.values())
            found = Subject(
                tachy.peer.pid,
                tachy.ports["lmtp"],
                tachy.ports["mx"],
                tachy.ports["pop3"],
                tachy.stored,
                tachy.peer.stop,
                lambda: tachymail_roles(tachy.peer.pid, ports),
            )
        elif cell == "smtp":
            postfix = peers.start_postfix(Path(tmp), virtual_users=users)
            dirs = [peers.postfix_maildir(postfix, u) for u in users]
            found = Subject(
                postfix.pid, 0, postfix.port, 0, lambda: maildir_count(dirs), postfix.stop
            )
        else:
            dovecot = start_dovecot(dict.fromkeys(users, PASSWORD))
            boxes = [dovecot.maildir(u) for u in users]
            found = Subject(
                dovecot.pid,
                dovecot.ports["lmtp"],
                0,
                dovecot.ports["pop3"],
                lambda: maildir_count(boxes),
                dovecot.stop,
            )
        try:
            yield found
        finally:
            found.stop()


def cell_delivery(cell: str, side: str, p: Params) -> dict[str, object]:
    """The lmtp and smtp cells: a warm-up message per session, then the timed load until
    every message is in a mailbox."""
    users = bench_users(p.sessions)
    lmtp = cell == "lmtp"
    with subject(side, cell, users, p) as server:
        port = server.lmtp_port if lmtp else server.smtp_port
        send_load(port, users, len(users), p.size, lmtp=lmtp)
        wait_count(server.count, len(users), 120)
        meter = Meter(server.root, server.roles())
        with meter.measure():
            send_load(port, users, p.messages, p.size, lmtp=lmtp)
            wait_count(server.count, len(users) + p.messages, 1800)
        return meter.figures(p.messages)


@contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """Run the block (and every process it starts) on *cpu* alone; None: where it was."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def cell_pop3(side: str, p: Params, window: int = 0) -> dict[str, object]:
    """The pop3 cell: the maildrop filled through LMTP (4 sessions, not timed), then one
    POP3 session: USER, PASS and STAT (timed apart), then RETR of every message, --passes
    times over (2,000 RETRs of 1 KiB take well under a second: too short to time alone),
    and QUIT (in the rate, as both servers write their \\Seen flags then). *window*: 0
    retrieves with poplib; N with :func:`pop3_retrieve_pipelined`, N RETRs in flight."""
    users = bench_users(1)
    with pinned(p.pop3_cpu), subject(side, "pop3", users, p) as server:
        send_load(server.lmtp_port, users * 4, p.maildrop, p.size, lmtp=True)
        wait_count(server.count, p.maildrop, 120)
        started = time.perf_counter()
        pop = pop3_login(server.pop3_port, users[0], p.maildrop)
        login = time.perf_counter() - started
        numbers = list(range(1, p.maildrop + 1)) * p.passes
        meter = Meter(server.root, server.roles())
        with meter.measure():
            if window:
                octets = pop3_retrieve_pipelined(pop, numbers, window)
            else:
                octets = pop3_retrieve_all(pop, numbers)
        row = meter.figures(len(numbers))
        row["octets"] = octets
        # not in the rate: each side's password check (scrypt for Tachymail's users file,
        # a plaintext passdb for Dovecot here) and the opening of the maildrop
        row["login_and_stat_seconds"] = login
        return row


CELLS: dict[str, Callable[[str, Params], dict[str, object]]] = {
    "lmtp": lambda side, p: cell_delivery("lmtp", side, p),
    "smtp": lambda side, p: cell_delivery("smtp", side, p),
    "pop3": cell_pop3,
    "pop3-lean": lambda side, p: cell_pop3(side, p, window=1),
    "pop3-pipelined": lambda side, p: cell_pop3(side, p, window=PIPELINE_WINDOW),
}


# --- report --------------------------------------------------------------------------------


def median_row(runs: list[dict[str, object]]) -> dict[str, object]:
    """Each numeric figure's median over the repetitions; text from the median-rate run."""
    rates = sorted(runs, key=lambda r: _num(r, "msgs_per_s"))
    row = dict(rates[len(rates) // 2])
    for key, value in runs[0].items():
        if isinstance(value, int | float):
            row[key] = statistics.median(_num(r, key) for r in runs)
    return row


def limits(row: dict[str, object]) -> str:
    """What the figure's side spent: server cores (the three busiest kinds of process, the
    busiest single process), load generator CPU, disk flushes."""
    kinds = row.get("cores_by_process") or {}
    assert isinstance(kinds, dict)
    top = ", ".join(f"{kind} {cores:.2f}" for kind, cores in list(kinds.items())[:3])
    # CPU-seconds per 1,000 messages are milliseconds per message: x 1000 gives µs
    text = (
        f"server {_num(row, 'server_cpu_s_per_1000') * 1000:.1f} µs CPU/msg, "
        f"{_num(row, 'server_cores'):.2f} cores ({top}; busiest process "
        f"{_num(row, 'busiest_process_cores'):.2f}), client "
        f"{_num(row, 'client_cpu_s_per_1000') * 1000:.1f} µs CPU/msg"
    )
    if "device_flushes_per_1000" in row:
        text += f", {_num(row, 'device_flushes_per_1000'):.0f} flushes/1000"
    return text


def _num(row: dict[str, object], key: str) -> float:
    value = row[key]
    assert isinstance(value, int | float)
    return float(value)


def table(results: list[dict[str, object]]) -> str:
    lines = [
        "| cell | anchor | anchor msgs/s | Tachymail msgs/s | ratio | target "
        "| what limits it: anchor | Tachymail |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in results:
        a, t = r["anchor_figures"], r["tachymail_figures"]
        assert isinstance(a, dict) and isinstance(t, dict)
        target = f"{_num(r, 'target'):.0f}x" if _num(r, "target") else "—"
        lines.append(
            f"| {r['title']} | {r['anchor']} | {_num(a, 'msgs_per_s'):,.0f} "
            f"| {_num(t, 'msgs_per_s'):,.0f} | **{_num(r, 'ratio'):.2f}x** "
            f"| {target} | {limits(a)} | {limits(t)} |"
        )
    return "\n".join(lines)


def machine() -> dict[str, object]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except FileNotFoundError:
        pass
    dovecot = subprocess.run(["/usr/sbin/dovecot", "--version"], capture_output=True, text=True)
    postconf = subprocess.run(  # -d: the built-in value, no main.cf needed
        ["/usr/sbin/postconf", "-d", "-h", "mail_version"], capture_output=True, text=True
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "dovecot": dovecot.stdout.strip(),
        "postfix": postconf.stdout.strip(),
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10000, help="per lmtp/smtp run")
    parser.add_argument("--maildrop", type=int, default=2000, help="messages in the POP3 cell")
    parser.add_argument(
        "--passes", type=int, default=20, help="RETRs of the whole maildrop per POP3 session"
    )
    parser.add_argument(
        "--pop3-cpu",
        type=int,
        default=(os.cpu_count() or 1) - 1,
        help="CPU that the pop3 cells' server and client share (default: the last; -1: not "
        "pinned). One RETR per round trip is otherwise timed by where the scheduler puts the "
        "two: on a VM a wake-up across CPUs costs more than the server's work per message",
    )
    parser.add_argument("--sessions", type=int, default=16, help="sessions (and users)")
    parser.add_argument("--size", type=int, default=1024, help="message body size (bytes)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell (medians)")
    parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated cells")
    parser.add_argument("--workers", type=int, help="tachymail SMTP workers (default: its own)")
    parser.add_argument(
        "--tachymail-toml",
        metavar="FILE",
        help="TOML appended to tachymail's configuration, e.g. a [mailbox] section to try "
        "other commit settings (not [policy], [auth], [pop3], [delivery], [metrics])",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="200 messages, a 200-message maildrop, --passes 1, --repeat 1",
    )
    parser.add_argument("--out", default=str(HERE / "results" / "mailbox.json"))
    args = parser.parse_args()
    if args.quick:
        args.messages, args.maildrop, args.repeat, args.passes = 200, 200, 1, 1
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        parser.error(f"unknown cells {unknown}; choose from {', '.join(CELLS)}")
    why = dovecot_unavailable() or peers.postfix_available()
    if why:
        print(f"mailbox benchmark skipped: {why}", file=sys.stderr)
        return 0
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # peers are stopped on SIGTERM too
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="mailbox-bench-") as tmp:
        users_file = make_users_file(Path(tmp), bench_users(args.sessions))
        extra = Path(args.tachymail_toml).read_text() if args.tachymail_toml else ""
        params = Params(
            args.messages,
            args.maildrop,
            args.sessions,
            args.size,
            args.workers,
            users_file,
            extra,
            max(1, args.passes),
            None if args.pop3_cpu < 0 else args.pop3_cpu,
        )
        for cell in cells:
            runs: dict[str, list[dict[str, object]]] = {"anchor": [], "tachymail": []}
            for rep in range(max(1, args.repeat)):
                # alternate which side goes first, so neither always runs on a warmer machine
                order = ("anchor", "tachymail") if rep % 2 == 0 else ("tachymail", "anchor")
                for side in order:
                    runs[side].append(CELLS[cell](side, params))
                    print(f"{cell} {side} #{rep + 1}: {runs[side][-1]}", file=sys.stderr)
            ratios = [
                _num(t, "msgs_per_s") / _num(a, "msgs_per_s")
                for t, a in zip(runs["tachymail"], runs["anchor"], strict=True)
            ]
            results.append(
                {
                    "cell": cell,
                    "title": TITLES[cell].format(
                        sessions=args.sessions,
                        size_k=max(1, args.size // 1024),
                        maildrop=args.maildrop,
                        window=PIPELINE_WINDOW,
                        passes=args.passes,
                    ),
                    "anchor": ANCHORS[cell],
                    "anchor_figures": median_row(runs["anchor"]),
                    "tachymail_figures": median_row(runs["tachymail"]),
                    "ratio": statistics.median(ratios),
                    "target": TARGETS[cell],
                    "runs": runs,
                }
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parameters = {k: v for k, v in vars(args).items() if k != "out"}
    out.write_text(
        json.dumps({"machine": machine(), "parameters": parameters, "cells": results}, indent=2)
    )
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The supervisor: forks the SMTP workers, restarts the ones that die, drains on SIGTERM.

It runs no event loop: a plain loop on ``sigtimedwait`` handles SIGCHLD,
SIGTERM/SIGINT and SIGHUP one at a time, which keeps the process model easy to
follow. SIGHUP re-reads the configuration and replaces the workers one
generation at a time without refusing a connection: the supervisor binds each
SMTP worker position's listening sockets (SO_REUSEPORT) once and hands them to
every generation, and the old workers stop accepting only after every new one
has reported that it is listening (see :meth:`Supervisor.reload`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import select
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from tachymail import metrics
from tachymail.config import RELOAD_READY_TIMEOUT, Config, ConfigError, load
from tachymail.delivery import shaping
from tachymail.lmdbenv import open_side_store
from tachymail.mailbox import MailboxStore
from tachymail.metrics import endpoint as metrics_endpoint
from tachymail.net import reuseport_socket, split_hostport
from tachymail.queue.journal import journal_directory, replay_journals
from tachymail.queue.store import MiB, QueueStore
from tachymail.smtp.tls import server_context

log = logging.getLogger(__name__)

HANDLED = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
# SIGUSR1 is what the supervisor sends a worker it replaces after a reload.

#: a worker that dies sooner than this after starting counts as a crash loop
STABLE_AFTER = 10.0
MAX_BACKOFF = 30.0
READY_TIMEOUT = RELOAD_READY_TIMEOUT  # see tachymail.config


@dataclass
class Slot:
    """One worker position: its process and its restart back-off."""

    index: int
    kind: str = "smtp"  # "smtp" or "delivery"
    pid: int = 0
    started: float = 0.0
    backoff: float = 0.0
    restart_at: float = 0.0


class Supervisor:
    def __init__(self, config: Config, overrides: dict[str, object] | None = None) -> None:
        self.config = config
        self.overrides = overrides or {}
        self.slots: list[Slot] = []
        self.retiring: dict[int, float] = {}  # pid of an old-generation worker → kill deadline
        self.stopping = False
        # (listener address, SMTP slot index) → the listening socket every generation of
        # that slot's worker accepts on (see _slot_sockets)
        self.sockets: dict[tuple[str, int], socket.socket] = {}

    def check_ports(self) -> None:
        """Refuse to start on an address another server already holds.

        SO_REUSEPORT would otherwise let a second instance silently share the port;
        a plain bind (without it) fails if anyone is listening there. The metrics address
        counts too: an instance without health checks would look dead to its monitoring.
        """
        endpoint = self.config.metrics.address
        wanted = [(lst.host, lst.port, lst.address) for lst in self.config.listeners]
        if endpoint:
            wanted.append((*split_hostport(endpoint), f"{endpoint} (metrics)"))
        for host, port, name in wanted:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            with socket.socket(info[0], socket.SOCK_STREAM) as probe:
                # SO_REUSEADDR so that TIME_WAIT leftovers of our own last run do not count.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(info[4])
                except OSError as exc:
                    raise OSError(f"cannot listen on {name}: {exc.strerror}") from exc

    def prepare(self) -> None:
        """Everything the workers would otherwise race for: directories, TLS pair, queue;
        and the shaping files, read and checked once (a broken one raises ShapingError,
        so a reload keeps the running rules) for the workers forked after."""
        rules = shaping.load(self.config)
        self.config.data_path.mkdir(parents=True, exist_ok=True)
        server_context(self.config)  # makes the self-signed pair once, before the fork
        store = QueueStore(
            self.config.data_path / "queue",
            map_size=self.config.queue.map_size_mb * MiB,
            max_map_size=self.config.queue.max_map_size_mb * MiB,
            reserve=self.config.queue.reserve_mb * MiB,
        )
        store.ensure_reserve()  # the room `tachymail queue delete` needs on a full disk
        # Journals left by a crash ([queue] commit = "journal"): into LMDB before any
        # delivery worker starts, so that nothing acknowledged waits for a later restart.
        replay_journals(store, journal_directory(self.config.data_path))
        store.close()
        # The mailbox store likewise: made, and its lock file allocated, before any fork.
        MailboxStore(
            self.config.mailbox_path,
            map_size=self.config.mailbox.map_size_mb * MiB,
            max_map_size=self.config.mailbox.max_map_size_mb * MiB,
        ).close()
        # The workers' side stores, with their lock files allocated (see tachymail.lmdbenv):
        # a worker (re)started on a full disk must not die of SIGBUS.
        side = (
            ["auth-failures", "verify"]
            if self.config.policy.verify_recipients
            else ["auth-failures"]
        )
        side.append("suspensions")  # read by the delivery workers (tachymail.queue.suspensions)
        side.append("suppression")  # read at RCPT and injection (tachymail.queue.suppression)
        for name in side:
            open_side_store(self.config.data_path / name).close()
        shaping.install(rules)  # last: a failure above keeps the running rules too

    def spawn(self, slot: Slot, report: bool = False) -> int | None:
        """Fork the worker of *slot*. With *report* (SMTP workers only), return the read
        end of a pipe on which the worker writes ``listening`` once it accepts on every
        listener (EOF if it dies first); else None. A listening socket that cannot be
        bound leaves the slot empty, to be tried again after its back-off."""
        sockets: list[socket.socket] = []
        if slot.kind == "smtp":
            try:
                sockets = self._slot_sockets(slot.index)
            except OSError as exc:
                slot.backoff = min(max(slot.backoff * 2, 1.0), MAX_BACKOFF)
                slot.restart_at = time.monotonic() + slot.backoff
                log.error(
                    "smtp worker %d not started: %s; trying again in %.0fs",
                    slot.index,
                    exc,
                    slot.backoff,
                )
                return None
        ready_r, ready_w = os.pipe() if report and slot.kind == "smtp" else (-1, -1)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
                for sig in HANDLED:
                    signal.signal(sig, signal.SIG_DFL)
                # Only the supervisor and the slot's own workers may hold a listening
                # socket: a copy elsewhere would keep a closed position's queue alive.
                for sock in self.sockets.values():
                    if sock not in sockets:
                        sock.close()
                if ready_r >= 0:
                    os.close(ready_r)
                if slot.kind == "delivery":
                    from tachymail.delivery.worker import run_delivery_worker

                    code = run_delivery_worker(self.config, slot.index, self.delivery_workers)
                else:
                    from tachymail.cli.commands import _bounce_reporter
                    from tachymail.smtp.worker import run_worker

                    code = run_worker(
                        self.config,
                        slot.index,
                        sockets,
                        ready_w if ready_w >= 0 else None,
                        # the HTTP API's queue bounce: delivery's reports, composed here
                        _bounce_reporter(self.config),
                    )
            except BaseException:
                log.exception("worker %d crashed", slot.index)
            finally:
                metrics.flush()
                logging.shutdown()
                os._exit(code)
        if ready_w >= 0:
            os.close(ready_w)  # the worker holds the only write end: EOF means it died
        slot.pid, slot.started = pid, time.monotonic()
        log.info("started %s worker %d as pid %d", slot.kind, slot.index, pid)
        return ready_r if ready_r >= 0 else None

    def _slot_sockets(self, index: int) -> list[socket.socket]:
        """The listening sockets of SMTP slot *index*, one per listener in configuration
        order: bound on first use, then kept, so every generation of the slot's worker
        (after a reload or a restart) accepts on the same sockets and no connection
        waiting in a socket's accept queue is reset. Raises OSError if one cannot be bound.
        """
        for listener in self.config.listeners:
            key = (listener.address, index)
            if key not in self.sockets:
                self.sockets[key] = reuseport_socket(listener.host, listener.port)
        return [self.sockets[(lst.address, index)] for lst in self.config.listeners]

    def _close_sockets(self, keep: set[tuple[str, int]] | None = None) -> None:
        """Close the supervisor's copy of every listening socket not in *keep* (all when
        None); a worker still holding one accepts on it until it retires."""
        for key in [k for k in self.sockets if keep is None or k not in keep]:
            self.sockets.pop(key).close()

    @property
    def delivery_workers(self) -> int:
        return 0 if self.config.server.hold else self.config.delivery.workers

    def new_slots(self) -> list[Slot]:
        smtp = [Slot(i) for i in range(self.config.worker_count)]
        return smtp + [Slot(i, "delivery") for i in range(self.delivery_workers)]

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            self.check_ports()
            self.prepare()
        except OSError as exc:
            log.error("%s", exc)
            return 1
        try:
            endpoint = self._start_metrics()
        except OSError as exc:
            log.error("cannot prepare the metrics directory: %s", exc)
            return 1
        try:
            return self._supervise()
        finally:
            self._close_sockets()
            if endpoint is not None:
                endpoint.close()
            metrics.disable()

    def _start_metrics(self) -> metrics_endpoint.MetricsEndpoint | None:
        """A fresh multiprocess directory (before any fork) and the HTTP endpoint."""
        settings = self.config.metrics
        directory = (
            Path(settings.directory)
            if settings.directory
            else default_metrics_dir(self.config.data_path)
        )
        metrics.m.DESTINATIONS = settings.destinations
        metrics.enable(directory)
        if not settings.address:
            return None
        return metrics_endpoint.start_endpoint(
            self,
            settings.address,
            directory,
            client_timeout=settings.client_timeout,
            max_clients=settings.max_clients,
        )

    def _supervise(self) -> int:
        self.slots = self.new_slots()
        for slot in self.slots:
            self.spawn(slot)
        log.info(
            "tachymail supervisor pid %d: %d SMTP and %d delivery workers, data in %s%s",
            os.getpid(),
            self.config.worker_count,
            self.delivery_workers,
            self.config.data_path,
            ", holding delivery" if self.config.server.hold else "",
        )
        deadline = 0.0
        while True:
            info = signal.sigtimedwait(HANDLED, 0.5)
            if info is not None:
                if info.si_signo in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
                    self.stopping = True
                    # New connections are refused from now on (the next MX is tried at
                    # once) instead of waiting in a queue that no worker will accept from.
                    self._close_sockets()
                    deadline = time.monotonic() + self.config.server.drain_timeout + 5
                    log.info(
                        "stopping: draining workers (up to %.0fs)", self.config.server.drain_timeout
                    )
                    self._signal_all(signal.SIGTERM)
                elif info.si_signo == signal.SIGHUP and not self.stopping:
                    self.reload()
            self._reap()
            now = time.monotonic()
            if self.stopping:
                if not self._alive():
                    log.info("all workers stopped")
                    return 0
                if now > deadline:
                    log.warning("drain timeout: killing the remaining workers")
                    self._signal_all(signal.SIGKILL)
                continue
            for pid, kill_at in list(self.retiring.items()):
                if now > kill_at:
                    _kill(pid, signal.SIGKILL)
            for slot in self.slots:
                if slot.pid == 0 and now >= slot.restart_at:
                    self.spawn(slot)

    def _alive(self) -> bool:
        return any(s.pid for s in self.slots) or bool(self.retiring)

    def _signal_all(self, sig: int) -> None:
        for slot in self.slots:
            if slot.pid:
                _kill(slot.pid, sig)
        for pid in self.retiring:
            _kill(pid, sig)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            metrics.mark_dead(pid)
            if self.retiring.pop(pid, None) is not None:
                continue
            for slot in self.slots:
                if slot.pid == pid:
                    self._worker_died(slot, status)

    def _worker_died(self, slot: Slot, status: int) -> None:
        pid, slot.pid = slot.pid, 0
        if self.stopping:
            return
        lived = time.monotonic() - slot.started
        # Back off only when the worker keeps dying young, so a crash loop does not spin.
        slot.backoff = 0.0 if lived > STABLE_AFTER else min(max(slot.backoff * 2, 0.1), MAX_BACKOFF)
        slot.restart_at = time.monotonic() + slot.backoff
        if slot.kind == "smtp" and slot.backoff:
            # A crash loop: its share of new connections goes to the live workers meanwhile
            # (bound again at the restart). A stable worker's successor starts at once and
            # serves what is waiting in its sockets' queues.
            self._close_sockets({k for k in self.sockets if k[1] != slot.index})
        metrics.m.worker_restarts[slot.kind].inc()
        log.error(
            "%s worker %d (pid %d) died (%s) after %.1fs; restarting in %.1fs",
            slot.kind,
            slot.index,
            pid,
            _describe(status),
            lived,
            slot.backoff,
        )

    def reload(self) -> None:
        """SIGHUP: re-read the configuration; on success replace the workers gracefully.

        No connection is refused or reset: the new SMTP workers accept on the sockets the
        old ones use (see :meth:`_slot_sockets`), and the old ones get SIGUSR1 (stop
        accepting, finish their sessions) only once every new one has reported that it is
        listening (or READY_TIMEOUT has passed: they are retired anyway). If a new SMTP
        worker dies before it listens, the reload is undone: the new workers are retired,
        and the old ones and the previous configuration stay. Signals wait meanwhile.
        """
        if not self.config.source:
            log.info("SIGHUP: no configuration file to re-read; restarting workers")
            new = self.config
        else:
            try:
                new = apply_overrides(load(self.config.source), self.overrides)
            except ConfigError as exc:
                log.error("SIGHUP: configuration not reloaded:\n%s", exc)
                return
        previous, previous_slots = self.config, self.slots
        self.config = new
        try:
            self.prepare()
        except Exception as exc:
            log.error("SIGHUP: cannot use the new configuration: %s", exc)
            self.config = previous  # a worker restarted later must get what is running
            return
        old = [s.pid for s in self.slots if s.pid]
        self.slots = self.new_slots()
        # Sockets of listeners or worker positions the new configuration dropped; the old
        # workers hold their own copies and accept on them until they retire.
        smtp = [s.index for s in self.slots if s.kind == "smtp"]
        self._close_sockets({(lst.address, i) for i in smtp for lst in new.listeners})
        reports: dict[int, Slot] = {}
        unbound: list[Slot] = []
        for slot in self.slots:
            fd = self.spawn(slot, report=True)
            if fd is not None:
                reports[fd] = slot
            elif slot.kind == "smtp":
                unbound.append(slot)  # a new listener could not be bound (address, port)
        died, late = _await_listening(reports, READY_TIMEOUT)
        died += unbound
        if died:
            # The new configuration kills its workers (a missing DKIM key, say): the old
            # generation goes on serving rather than leave the ports to a crash loop.
            log.error(
                "SIGHUP: new smtp workers %s could not listen; configuration not "
                "reloaded, the old workers keep serving",
                ", ".join(str(s.index) for s in died),
            )
            for slot in self.slots:
                if slot.pid:
                    _kill(slot.pid, signal.SIGUSR1)
                    self.retiring[slot.pid] = time.monotonic() + new.server.drain_timeout + 5
            self.config, self.slots = previous, previous_slots
            smtp = [s.index for s in self.slots if s.kind == "smtp"]
            self._close_sockets({(lst.address, i) for i in smtp for lst in previous.listeners})
            return
        if late:
            log.warning(
                "SIGHUP: new smtp workers %s did not report listening within %.0fs; "
                "retiring the old workers anyway",
                ", ".join(str(s.index) for s in late),
                READY_TIMEOUT,
            )
        for pid in old:
            _kill(pid, signal.SIGUSR1)  # retire: stop accepting, let sessions end
            self.retiring[pid] = time.monotonic() + new.server.drain_timeout + 5
        log.info("SIGHUP: configuration reloaded; %d old workers draining", len(old))


def default_metrics_dir(data_path: Path) -> Path:
    """Where the workers' metric files go when the configuration does not say.

    Shared memory (/dev/shm) when there is one: the files are rewritten on every counter
    update, and on the queue's disk their writeback would share the journal with the
    queue's fsyncs and slow every commit. One directory per data directory.
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        digest = hashlib.sha1(str(data_path).encode()).hexdigest()[:12]
        return shm / f"tachymail-metrics-{digest}"
    return data_path / "metrics"


def apply_overrides(config: Config, overrides: dict[str, object]) -> Config:
    """Command-line flags win over the file (kept across SIGHUP reloads)."""
    from tachymail.config import ListenerConfig, validate

    if "listen" in overrides:
        config.listeners = [ListenerConfig(str(a), "mx") for a in overrides["listen"]]  # type: ignore[attr-defined]
    for key in ("data_dir", "workers", "hold"):
        if key in overrides:
            setattr(config.server, key, overrides[key])
    for key in ("smarthost", "resolver"):
        if key in overrides:
            setattr(config.delivery, key, overrides[key])
    if "metrics" in overrides:
        config.metrics.address = str(overrides["metrics"])
    problems = validate(config)
    if problems:
        raise ConfigError(problems)
    return config


def _await_listening(reports: dict[int, Slot], timeout: float) -> tuple[list[Slot], list[Slot]]:
    """Wait until each pipe in *reports* (read end → slot) says ``listening``, at most
    *timeout* seconds; close every pipe and return the slots whose worker died before it
    listened, and those still starting at the timeout."""
    poller = select.poll()
    for fd in reports:
        poller.register(fd, select.POLLIN)
    waiting = dict(reports)
    failed: list[Slot] = []
    deadline = time.monotonic() + timeout
    try:
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for fd, _event in poller.poll(left * 1000):
                poller.unregister(fd)
                slot = waiting.pop(fd)
                if not os.read(fd, 64):  # EOF: the worker died before it listened
                    failed.append(slot)
    finally:
        for fd in reports:
            os.close(fd)
    return failed, list(waiting.values())


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"

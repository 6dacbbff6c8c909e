"""The supervisor: forks the SMTP workers, restarts the ones that die, drains on SIGTERM.

It runs no event loop: a plain loop on ``sigtimedwait`` handles SIGCHLD,
SIGTERM/SIGINT and SIGHUP one at a time, which keeps the process model easy to
follow. SIGHUP re-reads the configuration and replaces the workers one
generation at a time: new workers bind beside the old ones (SO_REUSEPORT),
then the old ones stop accepting and finish their sessions.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from tachymail import metrics
from tachymail.config import Config, ConfigError, load
from tachymail.metrics import endpoint as metrics_endpoint
from tachymail.queue.store import MiB, QueueStore
from tachymail.smtp.tls import server_context

log = logging.getLogger(__name__)

HANDLED = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
# SIGUSR1 is what the supervisor sends a worker it replaces after a reload.

#: a worker that dies sooner than this after starting counts as a crash loop
STABLE_AFTER = 10.0
MAX_BACKOFF = 30.0


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

    def check_ports(self) -> None:
        """Refuse to start on an address another server already holds.

        SO_REUSEPORT would otherwise let a second instance silently share the port;
        a plain bind (without it) fails if anyone is listening there.
        """
        for listener in self.config.listeners:
            info = socket.getaddrinfo(listener.host, listener.port, type=socket.SOCK_STREAM)[0]
            with socket.socket(info[0], socket.SOCK_STREAM) as probe:
                # SO_REUSEADDR so that TIME_WAIT leftovers of our own last run do not count.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(info[4])
                except OSError as exc:
                    raise OSError(f"cannot listen on {listener.address}: {exc.strerror}") from exc

    def prepare(self) -> None:
        """Everything the workers would otherwise race for: directories, TLS pair, queue."""
        self.config.data_path.mkdir(parents=True, exist_ok=True)
        server_context(self.config)  # makes the self-signed pair once, before the fork
        QueueStore(
            self.config.data_path / "queue",
            map_size=self.config.queue.map_size_mb * MiB,
            max_map_size=self.config.queue.max_map_size_mb * MiB,
        ).close()

    def spawn(self, slot: Slot) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
                for sig in HANDLED:
                    signal.signal(sig, signal.SIG_DFL)
                if slot.kind == "delivery":
                    from tachymail.delivery.worker import run_delivery_worker

                    code = run_delivery_worker(self.config, slot.index, self.delivery_workers)
                else:
                    from tachymail.smtp.worker import run_worker

                    code = run_worker(self.config, slot.index)
            except BaseException:
                log.exception("worker %d crashed", slot.index)
            finally:
                metrics.flush()
                logging.shutdown()
                os._exit(code)
        slot.pid, slot.started = pid, time.monotonic()
        log.info("started %s worker %d as pid %d", slot.kind, slot.index, pid)

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
        return metrics_endpoint.start_endpoint(self, settings.address, directory)

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
        """SIGHUP: re-read the configuration; on success replace the workers gracefully."""
        if not self.config.source:
            log.info("SIGHUP: no configuration file to re-read; restarting workers")
            new = self.config
        else:
            try:
                new = apply_overrides(load(self.config.source), self.overrides)
            except ConfigError as exc:
                log.error("SIGHUP: configuration not reloaded:\n%s", exc)
                return
        self.config = new
        try:
            self.prepare()
        except Exception as exc:
            log.error("SIGHUP: cannot use the new configuration: %s", exc)
            return
        old = [s.pid for s in self.slots if s.pid]
        self.slots = self.new_slots()
        for slot in self.slots:
            self.spawn(slot)
        # Give the new workers a moment to bind before the old ones stop accepting.
        time.sleep(0.2)
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


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"

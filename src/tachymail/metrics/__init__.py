"""Prometheus metrics from every process, served by the supervisor.

The instruments (:mod:`tachymail.metrics.instruments`, imported here as ``m``) are plain
prometheus-client metrics. Before it forks, the supervisor calls :func:`enable`, which
switches prometheus-client to multiprocess mode with a fresh directory: every worker then
writes its values to its own files there, and the supervisor's ``/metrics`` endpoint
(:mod:`tachymail.metrics.endpoint`) adds them up. A process that never calls
:func:`enable` (the CLI, unit tests) counts in memory and exports nothing.

Instrumentation sites use ``m.NAME`` attribute access (never ``from … import NAME``),
because :func:`enable` rebuilds the instruments with the multiprocess value class.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prometheus_client import multiprocess, values

from tachymail.metrics import instruments as m

__all__ = ["disable", "enable", "flush", "m", "mark_dead", "multiproc_dir"]

_directory: Path | None = None
_own_pid = os.getpid()


def _renew_pid() -> None:
    global _own_pid
    _own_pid = os.getpid()


os.register_at_fork(after_in_child=_renew_pid)


def _pid() -> int:
    return _own_pid


def enable(directory: Path) -> None:
    """Multiprocess mode with *directory* emptied and created afresh; rebuilds the instruments.

    Must run in the supervisor before any worker is forked; the workers inherit the setting.
    """
    global _directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, mode=0o750)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    # prometheus-client chooses its value class at import; choose again now the variable is
    # set. Its default process identifier is os.getpid, called on every increment: a system
    # call each time (glibc no longer caches the pid), a tenth of a delivery worker's CPU
    # under load. The pid kept here is renewed in every forked child, which is all the
    # value class needs to notice a fork and open that process's own files.
    values.ValueClass = values.MultiProcessValue(process_identifier=_pid)  # type: ignore[no-untyped-call]
    m.build()
    _directory = directory


def disable() -> None:
    """Back to in-memory values and remove the multiprocess directory (supervisor exit)."""
    global _directory
    directory, _directory = _directory, None
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    values.ValueClass = values.MutexValue
    m.build()
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


def multiproc_dir() -> Path | None:
    """The multiprocess directory in use, or None when metrics are in memory only."""
    return _directory


def mark_dead(pid: int) -> None:
    """Forget a dead worker's live gauges (open connections), keeping its counters."""
    if _directory is not None:
        multiprocess.mark_process_dead(pid, str(_directory))  # type: ignore[no-untyped-call]


def flush() -> None:
    """Move this process's hot-path tallies into the shared counters (about once a second)."""
    m.flush()

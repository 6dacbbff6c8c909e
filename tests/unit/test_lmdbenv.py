"""The side stores' LMDB helpers: lock files with real blocks, batched sweeps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tachymail.lmdbenv import delete_where, open_side_store


def test_the_lock_file_has_real_blocks_for_its_whole_length(tmp_path: Path) -> None:
    """A sparse lock file would make the first touch of a reader slot a SIGBUS on a full disk."""
    open_side_store(tmp_path / "side").close()
    stat = os.stat(tmp_path / "side" / "lock.mdb")
    assert stat.st_size > 0 and stat.st_blocks * 512 >= stat.st_size


@pytest.mark.parametrize("batch", [1, 7, 100, 5000])
def test_a_batched_sweep_deletes_exactly_what_it_picks(tmp_path: Path, batch: int) -> None:
    env = open_side_store(tmp_path / "side")
    with env.begin(write=True) as txn:
        for i in range(2500):
            txn.put(b"k%05d" % i, b"%d" % (i % 3))
    assert delete_where(env, lambda value: value == b"0", batch=batch) == 834
    with env.begin() as txn:
        left = [value for _, value in txn.cursor()]
    assert len(left) == 1666 and b"0" not in left
    assert delete_where(env, lambda value: True, batch=batch) == 1666
    assert env.stat()["entries"] == 0
    env.close()


def test_allocating_keeps_this_processs_locks_on_the_lock_file(tmp_path: Path) -> None:
    """POSIX drops a process's fcntl locks on any close of the file: an allocation through a
    second descriptor let the next process take itself for the first opener and reset the
    lock file (reader table and writer mutex) under the live processes; acknowledged
    messages were lost in the kill -9 test that way."""
    env = open_side_store(tmp_path / "side")
    reading = env.begin()  # a reader slot of this process, in the lock file
    try:
        probe = (
            "import lmdb, sys\n"
            "env = lmdb.open(sys.argv[1], max_readers=512)\n"
            "print(env.readers())\n"
        )
        seen = subprocess.run(
            [sys.executable, "-c", probe, str(tmp_path / "side")],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert f"{os.getpid()}" in seen, f"the lock file was reset: readers {seen!r}"
    finally:
        reading.abort()
        env.close()

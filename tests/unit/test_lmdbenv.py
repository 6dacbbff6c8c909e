"""The side stores' LMDB helpers: lock files with real blocks, batched sweeps."""

from __future__ import annotations

import os
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

"""A small range of a hit is read on the event loop only when the page cache has it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from cachenode import server
from cachenode.errors import StoreError


def uncached(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "blob"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # clean pages only can be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return path


def test_a_cold_range_is_not_read_on_the_loop_a_warm_one_is(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    path = uncached(tmp_path, data)
    with path.open("rb") as fobj:
        if server._read_cached(fobj.fileno(), 4096, 8192) is not None:
            pytest.skip("this filesystem serves RWF_NOWAIT reads of uncached pages")
        assert asyncio.run(server._read_small(fobj, 8192, 12288)) == data[8192:12288]
        # The thread's read brought the page into the page cache: now it is read on the loop.
        assert server._read_cached(fobj.fileno(), 4096, 8192) == data[8192:12288]


def test_ranges_over_the_inline_limit_and_short_blobs(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    path = uncached(tmp_path, data)
    with path.open("rb") as fobj:
        assert asyncio.run(server._read_small(fobj, 0, server.INLINE_BYTES + 1)) is None
        assert asyncio.run(server._read_small(fobj, 99_000, 100_000)) == data[99_000:]
        with pytest.raises(StoreError):  # cut short behind the sidecar's back
            asyncio.run(server._read_small(fobj, 99_000, 100_001))

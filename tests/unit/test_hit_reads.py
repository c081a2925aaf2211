"""A hit's bytes are read on the event loop only when the page cache has them: a small range
read there, a large one sent with sendfile."""

from __future__ import annotations

import asyncio
import errno
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import pytest

from cachenode import sendfile, server
from cachenode.errors import StoreError
from tests.support.pagecache import resident


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


class Transport:
    def __init__(self) -> None:
        self.aborted = False

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


class Request:
    def __init__(self) -> None:
        self.transport = Transport()


class Sendfile:
    """Stands in for ``loop.sendfile``: records each call's range and whether the page cache
    held all of it when the call came; the ``fail_at``-th call finds the caller gone."""

    def __init__(self, path: Path, fail_at: int = 0) -> None:
        self.path, self.fail_at = path, fail_at
        self.calls: list[tuple[int, int, bool]] = []

    async def __call__(self, transport: Any, fobj: IO[bytes], offset: int, count: int) -> int:
        self.calls.append((offset, count, resident(self.path, offset, count) >= count))
        if len(self.calls) == self.fail_at:
            raise ConnectionResetError("the caller went away")
        return count


def send(path: Path, fake: Sendfile, request: Request | None = None) -> None:
    """The whole of ``path`` through the server's sendfile, with ``fake`` as the loop's."""
    size = path.stat().st_size

    async def main() -> None:
        asyncio.get_running_loop().sendfile = fake  # type: ignore[method-assign]
        with path.open("rb", buffering=0) as fobj:
            await server._sendfile(request or Request(), fobj, 0, size)  # type: ignore[arg-type]

    asyncio.run(main())


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> ThreadPoolExecutor:
    """The read-ahead threads, in a pool of the test's own: it can wait for them to be done."""
    pool = ThreadPoolExecutor(4)
    monkeypatch.setattr(sendfile, "_READ_AHEAD", pool)
    return pool


def test_a_cold_blob_is_sent_only_once_a_thread_read_it_a_warm_one_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 64 << 20
    path = uncached(tmp_path, os.urandom(size))
    with path.open("rb") as fobj:
        if server._read_cached(fobj.fileno(), 4096, size - 4096) is not None:
            pytest.skip("this filesystem serves RWF_NOWAIT reads of uncached pages")
    cold = Sendfile(path)
    send(path, cold)
    assert sum(count for _, count, _ in cold.calls) == size
    assert all(held for _, _, held in cold.calls), cold.calls
    reads: list[int] = []
    real = sendfile._read_into_cache
    monkeypatch.setattr(
        sendfile, "_read_into_cache", lambda fd, *a: reads.append(fd) or real(fd, *a)
    )
    warm = Sendfile(path)
    send(path, warm)
    windows = range(0, size, sendfile.WINDOW)
    assert warm.calls == [(at, min(sendfile.WINDOW, size - at), True) for at in windows]
    assert reads == []


def test_a_caller_gone_midway_leaves_no_descriptor_open(
    tmp_path: Path, windows: ThreadPoolExecutor
) -> None:
    path = uncached(tmp_path, os.urandom(32 << 20))
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ConnectionResetError):
        send(path, Sendfile(path, fail_at=2))
    windows.shutdown(wait=True)  # a window still being read when the send ended
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_blob_the_thread_cannot_read_cuts_the_connection(
    tmp_path: Path, windows: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = uncached(tmp_path, os.urandom(1 << 20))

    def broken(fd: int, offset: int, length: int) -> None:
        os.close(fd)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(sendfile, "_read_into_cache", broken)
    fake, request = Sendfile(path), Request()
    with pytest.raises(ConnectionResetError):
        send(path, fake, request)
    assert request.transport.aborted
    assert fake.calls == []  # not one byte of what could not be read

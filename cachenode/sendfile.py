"""A blob's bytes to a caller with sendfile, without the event loop waiting for the disk.

sendfile reads the file in the thread that calls it, the event loop's: a blob the page cache does
not hold (a fill wrote it around the page cache, ``cachenode.direct``; the host's memory let it
go) would make each call wait for the disk, and every other caller of the sidecar with it. So a
send goes out in windows of WINDOW bytes, each given to sendfile once the page cache holds it:

- a window the page cache holds (one byte probed every PROBE with ``RWF_NOWAIT``) goes at once:
  a warm blob costs a few probes and no thread;
- a cold one is first read into the page cache by a thread (``_read_into_cache``), the next
  window while one goes out, so the disk and the socket work at once.

Windows bound the loop's time in one sendfile call too: the kernel goes on copying while the
socket takes bytes, and a whole warm image (1 GiB) given to one call held the loop up to 0.2 s on
loopback (``loop.sendfile`` asks the kernel for all the rest in every syscall).

At most one window per send is being read ahead, and its pages are the page cache's, not ours.
The thread reads on a descriptor of its own: the caller's may be closed while it still reads (a
caller gone, an error), and that descriptor's number given to another file.

Rejected: ``posix_fadvise(WILLNEED)`` or ``readahead(2)`` alone, on the loop: they may return
before the reads land (or block to queue them), and sendfile would wait for the rest.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO

log = logging.getLogger(__name__)

WINDOW = 8 << 20  # bytes one sendfile call is given, and a thread reads ahead of it
PROBE = 1 << 20  # a window is probed one byte every PROBE (the page cache keeps and drops in runs)
# Windows in a pool of their own: a cold whole-image hit must not queue a lazy boot's small cold
# reads (cachenode.server) behind its windows.
_READ_AHEAD = ThreadPoolExecutor(4, thread_name_prefix="read-ahead")
_PROBE = bytearray(1)  # probes only test whether a read would wait: the byte is thrown away


async def send(transport: asyncio.WriteTransport, fobj: IO[bytes], offset: int, count: int) -> None:
    """Bytes [offset, offset + count) of ``fobj`` to ``transport``; a caller gone raises
    ConnectionError, and a blob that ends early or cannot be read cuts the connection."""
    fd, end = fobj.fileno(), offset + count
    ahead = _ahead(fd, offset, end)
    try:
        while offset < end:
            length = min(WINDOW, end - offset)
            if ahead is not None:
                await _landed(transport, fobj, ahead)
            ahead = _ahead(fd, offset + length, end)
            await _sendfile(transport, fobj, offset, length)
            offset += length
    finally:
        if ahead is not None:
            ahead.abandon()


def _ahead(fd: int, offset: int, end: int) -> _ReadAhead | None:
    """A thread reading the window at ``offset`` into the page cache; None when the page cache
    holds it already, or no bytes are left."""
    length = min(WINDOW, end - offset)
    if length <= 0 or _cached(fd, offset, offset + length):
        return None
    return _ReadAhead(fd, offset, length)


async def _landed(transport: asyncio.WriteTransport, fobj: IO[bytes], ahead: _ReadAhead) -> None:
    """Wait for a window's read (sendfile finds out a blob that ended early)."""
    try:
        await asyncio.wrap_future(ahead.future)
    except OSError as exc:
        log.error("blob %s cannot be read: %s: connection cut", fobj.name, exc.strerror)
        transport.abort()
        raise ConnectionResetError("the blob cannot be read") from exc


async def _sendfile(
    transport: asyncio.WriteTransport, fobj: IO[bytes], offset: int, count: int
) -> None:
    if transport.is_closing():
        raise ConnectionResetError("the caller went away")
    sent = await asyncio.get_running_loop().sendfile(transport, fobj, offset, count)
    if sent < count:
        # The file ended early (cut short behind the sidecar's back after it was opened): the
        # caller must see a broken body, not wait for bytes that will never come.
        log.error("blob %s ends at byte %d, not %d: connection cut", fobj.name, offset + sent,
                  offset + count)  # fmt: skip
        transport.abort()
        raise ConnectionResetError("the blob ended early")


def _cached(fd: int, offset: int, end: int) -> bool:
    """Whether the page cache holds bytes [offset, end), as told by one byte every PROBE."""
    while offset < end:
        offset = min(offset + PROBE, end)
        try:
            if os.preadv(fd, [_PROBE], offset - 1, os.RWF_NOWAIT) != 1:
                return False  # past the end of the file: sendfile finds that out
        except OSError:
            # EAGAIN: not in the page cache. Anything else (a filesystem without RWF_NOWAIT, a
            # disk error) is taken as cold too: the thread's read waits, or reports the error.
            return False
    return True


class _ReadAhead:
    """One window of a blob being read into the page cache by a thread, on a ``dup`` of the
    blob's descriptor that the thread closes (or ``abandon``, when the thread never ran)."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self._fd = os.dup(fd)
        try:
            self.future: Future[None] = _READ_AHEAD.submit(
                _read_into_cache, self._fd, offset, length
            )
        except BaseException:
            os.close(self._fd)
            raise

    def abandon(self) -> None:
        """The send is over: a read not started never will be; a running one ends by itself."""
        if self.future.cancel():
            os.close(self._fd)


def _read_into_cache(fd: int, offset: int, length: int) -> None:
    """Read bytes [offset, offset + length) of ``fd`` into the page cache; close ``fd``.

    Sent to /dev/null with sendfile: the read waits for the disk as any read does, but hands
    the pages over without copying them (a read into a throwaway buffer cost a cold GiB 0.2
    CPU-seconds more). The kernel's own read-ahead sees one sequential
    reader; ``posix_fadvise(WILLNEED)`` of each window first doubled the CPU of a cold hit."""
    try:
        null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        try:
            while length:
                got = os.sendfile(null, fd, offset, length)
                if got == 0:
                    return  # the blob ended early: sendfile to the caller finds that out
                offset, length = offset + got, length - got
        finally:
            os.close(null)
    finally:
        os.close(fd)

"""Where a fill's bytes go: written at their offsets, hashed in image order, off the event loop.

Bytes may arrive out of order (parallel ranged requests) but each byte is put exactly once. Two
single-thread executors do the work, each in the order it is given: one writes (pwrite; given a
``direct`` descriptor, whole blocks of the bytes held in memory go around the page cache, see
``cachenode.direct``), one hashes. A chunk that continues the hashed prefix is hashed from memory
as it arrives. A chunk that arrives ahead of it (a parallel piece) is held in memory (``Ahead``,
up to the fill's ``ahead`` budget) and hashed when the prefix reaches it; one over the budget is
written through the page cache and read back from it for the hash once the written prefix
reaches it. ``landed`` is that written prefix: readers may send everything below it. The bytes
the hash last reached stay in memory (``recent``), for readers to send without reading them back.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from sortedcontainers import SortedDict

from cachenode.direct import Runs, Write
from cachenode.errors import StoreError
from cachenode.recent import LIMIT, Recent, pinned
from cachenode.spans import Spans

log = logging.getLogger(__name__)

READ_BACK = 1 << 20
IDLE = 0.05  # seconds a run's partial block may wait for the rest of its bytes


class Ahead:
    """Chunks put ahead of the hashed prefix, held until the prefix reaches them, ``limit``
    bytes at most (counted as the whole chunks they pin). Only immutable chunks are held: the
    bytes hashed are exactly the bytes written."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._chunks: SortedDict[int, memoryview] = SortedDict()

    def keep(self, view: memoryview, offset: int) -> bool:
        """Hold ``view``; False (nothing held) when it is not immutable or over the budget."""
        if (
            not isinstance(view.obj, bytes)
            or not view
            or offset in self._chunks
            or self.held + pinned(view) > self.limit
        ):
            return False
        self._chunks[offset] = view
        self.held += pinned(view)
        return True

    def pop(self, offset: int) -> memoryview | None:
        """The chunk held at exactly ``offset``, let go of."""
        view: memoryview | None = self._chunks.pop(offset, None)
        if view is not None:
            self.held -= pinned(view)
        return view

    def first(self) -> int | None:
        """The lowest offset held."""
        return self._chunks.peekitem(0)[0] if self._chunks else None

    def clear(self) -> None:
        self._chunks.clear()
        self.held = 0


class Sink:
    DEPTH = 8  # jobs waiting for the two threads; bounds the memory a fast tier can pin

    def __init__(
        self,
        fd: int,
        algorithm: str,
        write: Callable[[int, bytes | memoryview, int], None],
        on_landed: Callable[[int], None],
        on_written: Callable[[Spans, int], None] | None = None,
        direct: tuple[int, int] | None = None,
        ahead: int = 0,
    ) -> None:
        """``direct``: an O_DIRECT descriptor on the same file and the file's size. ``ahead``:
        the bytes put ahead of the hashed prefix that may be held in memory
        (``fetch.ahead_budget``). What is held ahead and what ``recent`` keeps for readers
        share one budget: LIMIT + ``ahead`` in all."""
        self.fd = fd
        self._room = LIMIT + ahead  # what ``recent`` and ``_ahead`` hold together, at most
        self.recent = Recent(self._room)
        self._ahead = Ahead(ahead)
        self._direct_fd = direct[0] if direct else None
        self._runs = Runs(direct[1]) if direct else None
        self._idle: asyncio.TimerHandle | None = None
        self._direct_refused = False  # a filesystem took O_DIRECT at open, refused it at write
        self.hasher: Any = hashlib.new(algorithm)
        self.landed = 0
        self._write = write
        self._on_landed = on_landed
        self._on_written = on_written
        self._written = Spans()
        self._hashed_to = 0  # every byte below is hashed, or queued to be, in order
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="fill-write")
        self._hashing = ThreadPoolExecutor(1, thread_name_prefix="fill-hash")
        self._jobs: deque[asyncio.Future[None]] = deque()
        self._error: BaseException | None = None

    async def put(self, data: bytes | memoryview, offset: int) -> None:
        """Write ``data`` at ``offset``; waits only when too many jobs are queued."""
        self._check()
        view = memoryview(data)
        prefix = offset == self._hashed_to
        held = prefix or (offset > self._hashed_to and self._hold(view, offset))
        if self._runs is not None and not self._direct_refused and held:
            for write in self._runs.put(view, offset):
                self._submit(write)
            self._watch()
        else:
            # Bytes not held in memory are read back for the hash once the prefix reaches them:
            # through the page cache, that read costs a copy, around it a disk read as well.
            self._submit(Write(offset, view, direct=False))
        if prefix:
            self._hash(view, offset)
            self._catch_up()
        while len(self._jobs) > self.DEPTH:
            await asyncio.wait([self._jobs[0]])
            self._settle()
        self._check()

    @property
    def held(self) -> int:
        """Bytes of chunks held in memory: kept for readers, and ahead of the hashed prefix."""
        return self.recent.held + self._ahead.held

    def _hold(self, view: memoryview, offset: int) -> bool:
        """Hold a chunk ahead of the hashed prefix, if the budget allows; ``recent`` gives up
        as much (one budget for both)."""
        if not self._ahead.keep(view, offset):
            return False
        self.recent.resize(self._room - self._ahead.held)
        return True

    def _hash(self, view: memoryview, offset: int) -> None:
        """Hash ``view``, which continues the hashed prefix; readers may be sent it from memory."""
        self.recent.keep(view, offset)
        loop = asyncio.get_running_loop()
        self._jobs.append(loop.run_in_executor(self._hashing, self.hasher.update, view))
        self._hashed_to += len(view)

    def _catch_up(self) -> None:
        """Hash, in image order, what follows the hashed prefix and is there: chunks held in
        memory as they are, other bytes read back from the file once written."""
        while True:
            if (held := self._ahead.pop(self._hashed_to)) is not None:
                self.recent.resize(self._room - self._ahead.held)
                self._hash(held, self._hashed_to)
                continue
            first = self._ahead.first()
            stop = self.landed if first is None else min(self.landed, first)
            if stop <= self._hashed_to:
                return
            loop = asyncio.get_running_loop()
            job = loop.run_in_executor(self._hashing, self._read_back, self._hashed_to, stop)
            self._jobs.append(job)
            self._hashed_to = stop

    def end(self, offset: int) -> None:
        """A run of puts (one request to a tier) stopped at ``offset``: write what it left."""
        if self._runs is not None:
            for write in self._runs.end(offset):
                self._submit(write)

    def _write_direct(self, view: memoryview, offset: int) -> None:
        """A direct write; where the filesystem refuses it at write time (some FUSE and stacked
        filesystems accept O_DIRECT at open, or want a larger alignment), the same bytes go
        through the page cache, and so does the rest of the fill."""
        if not self._direct_refused and self._direct_fd is not None:
            try:
                self._write(self._direct_fd, view, offset)
                return
            except StoreError as exc:
                cause = exc.__cause__
                if not isinstance(cause, OSError) or cause.errno != errno.EINVAL:
                    raise
                self._direct_refused = True
                log.warning("direct writes refused (%s): this fill goes through the page cache",
                            cause.strerror)  # fmt: skip
        self._write(self.fd, view, offset)

    def _watch(self) -> None:
        """While bytes wait for the rest of their block, look again in IDLE seconds: a run
        that did not grow meanwhile is written as it is (readers and the journal get it)."""
        if self._idle is None and self._runs is not None and self._runs.waiting:
            self._idle = asyncio.get_running_loop().call_later(IDLE, self._end_idle)

    def _end_idle(self) -> None:
        self._idle = None
        if self._runs is None or self._error is not None:
            return
        for write in self._runs.end_idle():
            self._submit(write)
        self._watch()

    def _submit(self, write: Write) -> None:
        loop = asyncio.get_running_loop()
        put = self._write_direct if write.direct else partial(self._write, self.fd)
        job = loop.run_in_executor(self._writer, put, write.view, write.offset)
        # What ``drain`` and ``_settle`` wait for: done once the write's landing is recorded. A
        # job's callback runs an iteration after the job is done, and a drain that returned in
        # between would leave bytes on disk that never landed (nor were read back for the hash).
        landing: asyncio.Future[None] = loop.create_future()
        job.add_done_callback(partial(self._wrote, write, landing))
        self._jobs.append(landing)

    async def drain(self) -> None:
        """Wait until every byte put so far is written and hashed; raise what failed."""
        if self._runs is not None:
            for write in self._runs.end_all():
                self._submit(write)
        while self._jobs:
            await asyncio.wait(list(self._jobs))
            self._settle()
        self._check()

    def hexdigest(self) -> str:
        return str(self.hasher.hexdigest())

    def _wrote(
        self, write: Write, landing: asyncio.Future[None], job: asyncio.Future[None]
    ) -> None:
        if job.cancelled():
            landing.cancel()
            return
        try:
            self._land(write, job)
        except Exception as exc:  # the journal's record, a reader's wake-up: the fill fails
            landing.set_exception(exc)
        else:
            landing.set_result(None)

    def _land(self, write: Write, future: asyncio.Future[None]) -> None:
        if self._error is not None:
            return
        if self._runs is not None:
            self._runs.release(write)
        start, end = write.offset, write.end
        if (exc := future.exception()) is not None:
            self._error = exc
            return
        self._written.add(start, end)
        if self._on_written is not None:
            self._on_written(self._written, end - start)
        self._advance()

    def resume(self, spans: Spans) -> None:
        """``spans`` of the file were written by a previous run: count them as landed, and hash
        the prefix they make from the file (the rest when the prefix reaches it)."""
        for start, end in spans:
            self._written.add(start, end)
        self._advance()

    def _advance(self) -> None:
        landed = self._written.end_of_run(0)
        if landed <= self.landed:
            return
        self.landed = landed
        self._catch_up()  # bytes not held that came ahead of the prefix (or a previous run's)
        self._on_landed(landed)

    def _read_back(self, start: int, end: int) -> None:
        while start < end:
            try:
                data = os.pread(self.fd, min(READ_BACK, end - start), start)
            except OSError as exc:
                raise StoreError(f"cannot read back what was written: {exc.strerror}") from exc
            if not data:
                raise StoreError(f"the partial file ends at {start}, before {end}")
            self.hasher.update(data)
            start += len(data)

    def _settle(self) -> None:
        while self._jobs and self._jobs[0].done():
            job = self._jobs.popleft()
            if not job.cancelled() and (exc := job.exception()) is not None:
                self._error = self._error or exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    async def aclose(self) -> None:
        """Stop both threads: jobs still queued (after a failure) are dropped, and this returns
        only once the job each thread is running has finished. Only then may the descriptor be
        closed: a write still in flight would land in whatever file reuses its number."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._ahead.clear()
        loop = asyncio.get_running_loop()
        for pool in (self._writer, self._hashing):
            await loop.run_in_executor(None, partial(pool.shutdown, wait=True, cancel_futures=True))
        # Every job is now done or cancelled; collect their outcomes so none is left unretrieved.
        await asyncio.gather(*self._jobs, return_exceptions=True)
        self._jobs.clear()

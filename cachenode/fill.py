"""The fill: one upstream fetch per image per host, written once, verified, then committed.

A ``Fill`` downloads an image from the tiers in order into its partial file, at the offsets the
bytes belong to, hashing them as they land. Any number of callers read the partial file as it grows
(see ``cachenode.server``); none receives the image's last byte before the whole image verified, so
a caller can never finish a clean body of bad bytes. When a tier fails mid-body the fill resumes at
the offset reached on the next tier (``Range``). At the end the size and hash are checked against
Glance's record and the file is renamed into L1, or discarded and the tiers that sent it are
skipped for that image for a while.

::

    RUNNING --all bytes, hash ok (verified: readers may send the last byte)--> COMMITTED
       |--tiers exhausted / disk error / bad hash--> FAILED

A fill is admitted by the tiers' limits (``cachenode.limits``) before it reserves disk space: a
caller's fill that no tier has a slot for is passed through at once, a warm waits for a slot.

A fill survives a restart: the spans it wrote are recorded in a journal next to its partial file
(``cachenode.journal``), and the next fill of the same image (same size and hash) resumes from them,
fetching only what is missing; the whole image is still hashed and verified before commit.

Readers get the last byte as soon as the hash matched, before the fsync and rename that make the
entry durable: durability is for the next caller, the bytes are already proven. A disk that then
fails the commit costs the cache an entry, not the caller its download.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import IO

from cachenode import crash, journal
from cachenode.catalog import Entry
from cachenode.errors import (
    CachenodeError,
    FillBroken,
    FillFailed,
    FillStopped,
    IntegrityError,
    NoRoom,
    StoreError,
    TiersBusy,
)
from cachenode.fetch import Fetch, Provenance, ahead_budget
from cachenode.glance import Credentials, ImageInfo
from cachenode.limits import Limits, Priority, Ticket
from cachenode.local import Local, Partial, finish
from cachenode.metrics import Metrics
from cachenode.recent import Recent
from cachenode.sink import Sink
from cachenode.spans import Spans
from cachenode.tiers import Tier, TierSet

log = logging.getLogger(__name__)


ANNOUNCE_BYTES = 4 << 20
ANNOUNCE_DELAY = 0.02


class State(enum.Enum):
    RUNNING = "running"
    COMMITTED = "committed"
    FAILED = "failed"


class Fill:
    """One image being filled; readers follow ``landed`` through ``wait``."""

    def __init__(
        self,
        image: ImageInfo,
        size: int,
        verifier: tuple[str, str],
        priority: Priority = Priority.CALLER,
    ) -> None:
        self.image = image
        self.size = size
        self.verifier = verifier
        self.ticket = Ticket(priority)
        self.landed = 0
        self.resumed = 0  # bytes taken from a previous run's partial file
        self.verified = False
        self.state = State.RUNNING
        self.error: CachenodeError | None = None
        self.stopped: str | None = None  # why its bytes must go (``Fills.stop``)
        self.ending = False  # in its cleanup: a stop no longer cancels it
        self.provenance = Provenance()
        self.readers = 0
        self._read_fd: int | None = None
        self.recent: Recent | None = None  # the last bytes received, for readers to send
        self._changed = asyncio.Event()
        self._announced = 0
        self._pending: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def done(self) -> bool:
        return self.state is not State.RUNNING

    @property
    def tier(self) -> str | None:
        """The tier that sent the first bytes."""
        return self.provenance.first

    @property
    def failed(self) -> bool:
        """Failed before its bytes verified, or stopped: a reader must not finish its body.

        A stopped fill's readers are cut even after the bytes verified: the image is gone from
        Glance. Only a reader that already had every byte handed over finishes (``spans``).
        """
        stopped = isinstance(self.error, FillStopped)
        return self.state is State.FAILED and (not self.verified or stopped)

    def readable(self) -> int:
        """Bytes a reader may send: all that landed, except the last byte until verified."""
        if self.verified:
            return self.size
        return min(self.landed, self.size - 1)

    async def wait(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds or the fill is over."""
        while not predicate() and not self.done:
            event = self._changed
            await event.wait()

    def advance(self, landed: int) -> None:
        """The first ``landed`` bytes are on disk. Readers hear of it in steps, not every chunk.

        Waking every reader for every 64 KiB that lands costs a herd of ten streams tens of
        thousands of wake-ups a second; readers are woken when ANNOUNCE_BYTES have gathered, or
        after at most ANNOUNCE_DELAY, and at once for the first bytes (time to first byte).
        """
        self.landed = landed
        if self._announced == 0 or self.landed - self._announced >= ANNOUNCE_BYTES:
            self._notify()
        elif self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(ANNOUNCE_DELAY, self._notify)

    def _notify(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self._announced = self.landed
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    @contextlib.asynccontextmanager
    async def reader(self) -> AsyncIterator[Callable[[], IO[bytes]]]:
        """Register a reader for as long as it streams; yields a function that opens the reader's
        own handle on the fill's file, to be called once ``ready`` returned.

        The fill keeps its file open while any reader is registered, so a reader still reads the
        same bytes after the commit, even after an eviction.
        """
        self.readers += 1
        opened: list[IO[bytes]] = []

        def open_handle() -> IO[bytes]:
            assert self._read_fd is not None, "a fill with sendable bytes has a file"
            opened.append(os.fdopen(os.dup(self._read_fd), "rb"))
            return opened[-1]

        try:
            yield open_handle
        finally:
            for fobj in opened:
                fobj.close()
            self.readers -= 1
            self._close_if_unused()

    async def ready(self, start: int) -> None:
        """Wait until byte ``start`` may be sent. Raises the fill's error if it failed first:
        the caller has received nothing yet and can still get a status (or a pass-through)."""
        await self.wait(lambda: self.readable() > start)
        if self.failed:
            assert self.error is not None
            raise self.error

    async def spans(self, start: int, end: int) -> AsyncIterator[tuple[int, int]]:
        """The bytes [start, end) as (offset, count) spans, in order, as each may be sent.

        This is the one rule of streaming from a fill: a byte goes out once it has landed, the
        image's last byte only once the whole image verified. If the fill fails before that,
        ``FillBroken`` is raised: headers are out, so the reader must cut its connection rather
        than finish a body the fill could not vouch for.
        """
        sent = start
        while sent < end:
            if self.failed:
                raise FillBroken(f"the fill of {self.image.id} failed at byte {sent}")
            limit = min(self.readable(), end)
            if limit > sent:
                yield sent, limit - sent
                sent = limit
            else:
                await self.wait(partial(_beyond, self, end, sent))

    def attach(self, read_fd: int) -> None:
        """Take ownership of a read-only descriptor on the partial file (closed when unused)."""
        self._read_fd = read_fd

    def _close_if_unused(self) -> None:
        if not self.done or self.readers:
            return
        if self.recent is not None:
            self.recent.clear()  # nobody reads from the fill any more
        if self._read_fd is not None:
            fd, self._read_fd = self._read_fd, None
            os.close(fd)


class Fills:
    """The fills running on this host: at most one per image."""

    def __init__(
        self,
        local: Local,
        tiers: TierSet,
        metrics: Metrics,
        quarantine: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        make_room: Callable[[str, int], Awaitable[bool]] | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.local = local
        self.make_room = make_room
        self.tiers = tiers
        self.limits = limits or Limits([t.config for t in tiers.tiers], metrics)
        self.metrics = metrics
        self.quarantine = quarantine
        self.clock = clock
        self._running: dict[str, Fill] = {}
        self._closing = False  # shutting down: fills cancelled now keep their partial to resume
        self._bad_tiers: dict[str, tuple[frozenset[str], float]] = {}

    def get(self, image_id: str) -> Fill | None:
        return self._running.get(image_id)

    def join(self, image_id: str) -> Fill | None:
        """The running fill of this image, for a caller to stream from: a warm becomes a caller's
        fill, so the caller is not queued behind a warm (``cachenode.limits``)."""
        fill = self._running.get(image_id)
        if fill is not None:
            self._for_a_caller(fill)
        return fill

    def _for_a_caller(self, fill: Fill) -> None:
        if fill.ticket.priority is Priority.WARM:
            fill.ticket.priority = Priority.CALLER
            self.limits.poke()  # if it is queued for a slot, it looks again, as a caller's

    def running(self) -> list[Fill]:
        return list(self._running.values())

    def excluded(self, image_id: str) -> frozenset[str]:
        """Tiers that sent bad bytes for this image recently: not asked for it again yet."""
        bad = self._bad_tiers.get(image_id)
        if bad is None:
            return frozenset()
        if bad[1] < self.clock():
            del self._bad_tiers[image_id]
            return frozenset()
        return bad[0]

    def candidates(self, image_id: str) -> list[Tier]:
        return self.tiers.candidates(self.excluded(image_id))

    def stop(self, image_id: str, why: str) -> bool:
        """Stop the running fill of ``image_id`` because its bytes must go (``why``: the image
        was deleted in Glance); whether one was running.

        It commits nothing: its download is cancelled, its partial discarded, its room given
        back, and an entry it committed meanwhile evicted; readers still streaming are cut
        (``FillBroken``), never handed a clean body. Letting them finish would mean fetching
        and writing an image nobody may ask for any more, from tiers that may stop serving it
        halfway anyway; a cut caller that retries asks Glance first, and gets its 404.

        The cancel is delivered on the next turn of the loop, never to a task that has not run
        yet (it would end before its own cleanup), and not once the fill is cleaning up.
        """
        fill = self._running.get(image_id)
        if fill is None:
            return False
        fill.stopped = why
        asyncio.get_running_loop().call_soon(_cancel, fill)
        return True

    def start(
        self, image: ImageInfo, creds: Credentials | None, priority: Priority = Priority.CALLER
    ) -> tuple[Fill, bool]:
        """The running fill of this image, or a new one, and whether it is new. Never awaits:
        no two can start. The image must be cacheable: a size and a hash to verify it against.
        A caller joining a warm raises the fill to the caller's priority.
        """
        fill = self._running.get(image.id)
        if fill is not None:
            if priority is Priority.CALLER:
                self._for_a_caller(fill)
            return fill, False
        verifier = image.verifier()
        if not image.size or verifier is None:
            raise ValueError(f"image {image.id} has no size or hash to verify a fill against")
        fill = Fill(image, image.size, verifier, priority)
        self._running[image.id] = fill
        self.metrics.inflight_fills.inc()
        fill.task = asyncio.create_task(self._run(fill, creds), name=f"fill-{image.id}")
        return fill, True

    async def _run(self, fill: Fill, creds: Credentials | None) -> None:
        """Reserve, download, verify, commit; one cleanup whatever happened (even a cancel)."""
        started = time.monotonic()
        part: Partial | None = None
        shutdown = False
        try:
            # Before any disk space is reserved: a fill that will not run evicts nothing.
            tiers = [t.name for t in self.candidates(fill.image.id)]
            await self.limits.admission(tiers, fill.ticket, may_wait=False)
            kept = await self.local.take_partial(fill.image.id, fill.size, fill.verifier)
            part = Partial(fill.image.id, kept)  # from here on, discarded with the fill
            # A kept partial's bytes are on disk already (fallocated), and reserved for this fill.
            needed = fill.size if kept is None else 0
            if self.make_room is not None and not await self.make_room(fill.image.id, needed):
                raise NoRoom(f"no room for {fill.size} bytes within the policy")
            await finish(self.local.create_partial(part, fill.size))
            fill.attach(part.take_reader())
            await self._download(fill, part, creds)
            crash.point("fill.verified")
            await finish(self.local.commit(part, self._entry(fill)))
            fill.state = State.COMMITTED
            self._succeeded(fill, started)
        except BaseException as exc:
            fill.error = self._failed(fill, exc)
            if not isinstance(exc, Exception):
                shutdown = self._closing and fill.state is State.RUNNING and not fill.stopped
                if self._closing or not _is_stop(fill, exc):
                    raise  # a cancel (shutdown): cleaned up below, then passed on
                _uncancel()  # our own stop: the task ends as a failed fill, not cancelled
        finally:
            fill.ending = True
            if part is not None and shutdown:
                await finish(self.local.release(part))  # the next start resumes it
            elif part is not None:
                await finish(self.local.discard(part))  # nothing left of a commit that happened
            if fill.stopped is not None:
                await self._forget(fill)
            self.local.unreserve(fill.image.id)  # its file is gone or kept, or it is an entry
            # Readers learn the outcome only now, when nothing partial is left on disk.
            if fill.error is not None:
                fill.state = State.FAILED
            del self._running[fill.image.id]
            self.metrics.inflight_fills.dec()
            self.metrics.fills.labels(fill.tier or "none", self._outcome(fill)).inc()
            fill._close_if_unused()
            fill._notify()

    async def _forget(self, fill: Fill) -> None:
        """A stopped fill's end: the entry it committed meanwhile goes, and its readers are cut
        even if the stop came too late to cancel it (already cleaning up, its commit done)."""
        if fill.error is None:
            fill.error = FillStopped(f"image {fill.image.id} {fill.stopped} while it was filled")
        try:
            if fill.image.id in self.local:
                await finish(self.local.evict(fill.image.id, fill.stopped or "stopped"))
        except Exception:  # the cleanup must go on: readers wait on it, its room is held
            log.exception("could not evict %s after its fill was stopped", fill.image.id)

    def _succeeded(self, fill: Fill, started: float) -> None:
        elapsed = time.monotonic() - started
        self.metrics.fill_duration.observe(elapsed)
        log.info("filled %s: %d bytes from %s in %.2fs",
                 fill.image.id, fill.size, ",".join(fill.provenance.tiers), elapsed)  # fmt: skip

    def _failed(self, fill: Fill, exc: BaseException) -> CachenodeError:
        """What the fill's readers are told, with the log line and metrics of each failure."""
        if _is_stop(fill, exc):
            log.info("fill of %s stopped, nothing committed: image %s", fill.image.id,
                     fill.stopped)  # fmt: skip
            return FillStopped(f"image {fill.image.id} {fill.stopped} while it was filled")
        if isinstance(exc, IntegrityError):
            for tier in exc.tiers:
                self.metrics.integrity_failures.labels(tier).inc()
            self._bad_tiers[fill.image.id] = (
                self.excluded(fill.image.id) | frozenset(exc.tiers),
                self.clock() + self.quarantine,
            )
            log.error("%s; not committed, tiers %s skipped for it", exc,
                      ",".join(exc.tiers) or "(none)")  # fmt: skip
            return exc
        if isinstance(exc, StoreError):
            log.warning("fill of %s stopped by the local disk: %s", fill.image.id, exc)
            return exc
        if isinstance(exc, FillFailed):
            log.warning("fill of %s failed: %s", fill.image.id, exc)
            return exc
        if isinstance(exc, Exception):
            # A bug of ours: fail this fill loudly rather than leave its readers waiting.
            log.error("fill of %s crashed", fill.image.id, exc_info=exc)
            return FillFailed(f"internal error: {type(exc).__name__}")
        return FillFailed("shutting down")

    @staticmethod
    def _outcome(fill: Fill) -> str:
        if fill.state is State.COMMITTED:
            return "ok"
        if isinstance(fill.error, FillStopped):
            return "deleted"
        if isinstance(fill.error, IntegrityError):
            return "integrity"
        if isinstance(fill.error, TiersBusy):
            return "busy"
        if isinstance(fill.error, NoRoom) or (
            isinstance(fill.error, StoreError) and not fill.landed
        ):
            return "no_room"
        return "error"

    async def _download(self, fill: Fill, part: Partial, creds: Credentials | None) -> None:
        """Every byte of the image into the partial file, from the tiers, then verified.

        The sink's threads are stopped (their last write done) before this returns, whatever
        happened: the descriptor they write to is closed right after.
        """
        assert part.fd is not None and part.journal_fd is not None
        header = journal.Record(fill.image.id, fill.size, *fill.verifier)
        recorder = journal.Recorder(part.journal_fd, part.fd, header,
                                    part.kept.seq + 1 if part.kept else 0)  # fmt: skip
        direct = None if part.direct_fd is None else (part.direct_fd, fill.size)
        candidates = self.candidates(fill.image.id)
        sink = Sink(part.fd, fill.verifier[0], self.local.blobs.write, fill.advance,
                    recorder.written, direct, ahead_budget(candidates))  # fmt: skip
        fill.recent = sink.recent
        have = Spans(part.kept.record.spans if part.kept else ())
        if have:
            fill.resumed = have.total
            self.metrics.resumed_bytes.inc(have.total)
            log.info("resuming the fill of %s with %d bytes of a previous run",
                     fill.image.id, have.total)  # fmt: skip
            sink.resume(have)  # readers get the prefix at once; the hash reads it from disk
        fetch = Fetch(fill.image, fill.size, sink, self.tiers, candidates,
                      creds, self.metrics, fill.provenance, self.limits, fill.ticket,
                      have)  # fmt: skip
        try:
            await fetch.run()
        finally:
            await finish(sink.aclose())
            await finish(recorder.aclose(final=self._closing))
        self._verify(fill, sink.hexdigest())
        fill.verified = True
        fill._notify()

    @staticmethod
    def _verify(fill: Fill, digest: str) -> None:
        algo, expected = fill.verifier
        if digest != expected:
            # Bytes of a previous run may be what is wrong (a disk, a hand): no tier is blamed
            # then. The partial goes with this fill, so the next one tells a bad tier for sure.
            detail = f"{algo} is {digest[:16]}..., Glance recorded {expected[:16]}..."
            if fill.resumed:
                detail += f" (resumed with {fill.resumed} bytes of a previous run)"
            blamed = () if fill.resumed else tuple(fill.provenance.tiers)
            raise IntegrityError(fill.image.id, detail, blamed)

    @staticmethod
    def _entry(fill: Fill) -> Entry:
        now = time.time()
        return Entry(
            image_id=fill.image.id,
            size=fill.size,
            hash_algo=fill.verifier[0],
            hash_value=fill.verifier[1],
            checksum=fill.image.checksum,
            tier=fill.tier or "",
            created=now,
            last_access=now,
            tags=fill.image.tags,
            properties=dict(fill.image.properties),
        )

    async def close(self) -> None:
        """Cancel every fill and wait for each one's cleanup; their partials stay, recorded."""
        self._closing = True
        tasks = [f.task for f in self._running.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # A fill cancelled before its task first ran never reached its own cleanup: it had
        # nothing on disk yet, but its readers must still hear that it is over.
        for fill in list(self._running.values()):
            fill.error, fill.state = FillFailed("shutting down"), State.FAILED
            del self._running[fill.image.id]
            self.metrics.inflight_fills.dec()
            fill._notify()


def _cancel(fill: Fill) -> None:
    """Cancel a stopped fill's task, unless it is cleaning up already (a cancel there would
    cut its cleanup short)."""
    if fill.task is not None and not fill.ending:
        fill.task.cancel()


def _is_stop(fill: Fill, exc: BaseException) -> bool:
    """Whether ``exc`` is the cancel ``Fills.stop`` sent (not a shutdown's)."""
    return fill.stopped is not None and isinstance(exc, asyncio.CancelledError)


def _uncancel() -> None:
    """The current task caught a cancel meant for it alone: it ends as it sees fit, and is not
    reported as cancelled any more."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        task.uncancel()


def _beyond(fill: Fill, end: int, sent: int) -> bool:
    """Whether the fill has bytes for a reader that sent up to ``sent`` and stops at ``end``."""
    return min(fill.readable(), end) > sent

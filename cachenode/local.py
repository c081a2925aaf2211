"""L1: the catalog and the blob files together, seen from async code.

Every disk and SQLite call runs in the default executor; the event loop never blocks on them.
What L1 holds is known in memory (``cachenode.index``), so a hit on a recent image, a miss and a
plan run no thread and read no SQLite. A hit is an open file object: once open, the image can be
evicted (its blob unlinked) and the caller still reads all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any, TypeVar

from cachenode import crash, direct, journal
from cachenode.blobs import BlobStore
from cachenode.catalog import Catalog, Entry
from cachenode.errors import StoreError
from cachenode.index import Index
from cachenode.metrics import Metrics
from cachenode.policy import Policy, Usage

log = logging.getLogger(__name__)
T = TypeVar("T")

HELD_BLOBS = 128  # blobs held open for hits; far below any descriptor limit a host sets


@dataclass
class Reservation:
    """Room a fill in flight holds in L1 until its entry is committed or its file discarded."""

    size: int
    on_disk: bool  # its file exists (fallocated whole): the filesystem counts it already


def _owned(part: Partial) -> list[int]:
    """The descriptors ``part`` still owns, handed to the caller to close."""
    fds = [fd for fd in (part.fd, part.read_fd, part.direct_fd, part.journal_fd) if fd is not None]
    part.fd = part.read_fd = part.direct_fd = part.journal_fd = None
    return fds


class Partial:
    """A fill's file while it is being written, its journal, and the descriptors it owns.

    Each descriptor has exactly one owner at a time: this object, until ``take`` or
    ``take_reader`` hands it on (to a commit, to the Fill's readers). Whoever holds it closes it,
    once. Created on the event loop before any thread touches the disk, so a cancel at any await
    still finds it and discards what the thread made. The journal's descriptor stays with it
    (the fill's recorder only borrows it) and is closed by ``Local.discard``.
    """

    def __init__(self, image_id: str, kept: journal.Kept | None = None) -> None:
        self.image_id = image_id
        self.kept = kept  # a previous run's partial file this fill resumes
        self.path = kept.path if kept else None
        self.journal = kept.journal if kept else None
        self.fd: int | None = None
        self.read_fd: int | None = None
        self.direct_fd: int | None = None  # whole blocks go around the page cache
        self.journal_fd: int | None = None

    def take(self) -> int:
        assert self.fd is not None, "the write descriptor was handed on already"
        fd, self.fd = self.fd, None
        return fd

    def take_reader(self) -> int:
        assert self.read_fd is not None, "the read descriptor was handed on already"
        fd, self.read_fd = self.read_fd, None
        return fd


async def finish(aw: Awaitable[T]) -> T:
    """Await ``aw`` to its end even if this task is cancelled meanwhile, then pass the cancel on.

    Disk work handed to a thread cannot be stopped halfway; what follows it (closing its
    descriptor, unlinking its file) must never overlap it.
    """
    task = asyncio.ensure_future(aw)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            cancelled = True
        except Exception:
            break  # task is done; its exception is raised below
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: the cancel is what this task reports
        raise asyncio.CancelledError
    return task.result()


class Local:
    """L1 from async code. The index in memory (``cachenode.index``) answers every question
    about what L1 holds; the catalog is read at start and written when L1 changes: a commit, an
    eviction, a pin, and in batches the access times of hits (``flush``).
    """

    def __init__(
        self,
        root: Path,
        metrics: Metrics,
        policy: Policy | None = None,
        flush_interval: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.metrics = metrics
        self.policy = policy or Policy(name="default")
        self.flush_interval = flush_interval
        self.clock = clock
        self.blobs = BlobStore(root)
        self.catalog = Catalog(root / "catalog")
        self.index = Index(self.policy)
        self.freeing = 0  # bytes of entries out of the index whose blobs are not removed yet
        self._held: OrderedDict[str, int] = OrderedDict()  # open blobs of recent hits
        self._evicting: dict[str, asyncio.Event] = {}  # set once the image's eviction is done
        self._flusher: asyncio.Task[None] | None = None
        self.kept: dict[str, journal.Kept] = {}  # partials of a previous run, not adopted yet
        self.reserved: dict[str, Reservation] = {}  # room of fills in flight, by image

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, partial(fn, *args))

    @property
    def total_bytes(self) -> int:
        return self.index.total_bytes

    @property
    def total_entries(self) -> int:
        return len(self.index)

    async def start(self) -> None:
        """Make disk and catalog agree after whatever happened before (a crash, a kill -9), read
        the catalog into the index, and write access times every ``flush_interval``."""
        entries, pins = await self._run(self._reconcile)
        self.index.load(entries, pins)
        self._publish()
        await self._run(self._publish_disk)
        self._flusher = asyncio.create_task(self._flush_every(), name="l1-flush")

    async def stop(self) -> None:
        """Write the last access times and close the catalog."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush()
        self.close()

    def _reconcile(self) -> tuple[list[Entry], frozenset[str]]:
        kept, gone = journal.scan(self.blobs.partial_dir, time.time())
        for path, why in gone:
            log.info("removed %s of an interrupted fill: %s", path.name, why)
            path.unlink(missing_ok=True)
        on_disk = self.blobs.committed()
        entries: list[Entry] = []
        for entry in list(self.catalog.entries()):
            size = on_disk.pop(entry.image_id, None)
            if size != entry.size:
                log.warning("catalog entry %s has %s; dropping it", entry.image_id,
                            "no blob" if size is None else f"a blob of {size} bytes")  # fmt: skip
                self.catalog.delete(entry.image_id)
                if size is not None:
                    self.blobs.remove(entry.image_id)
                continue
            entries.append(entry)
        for orphan in on_disk:
            # Renamed into place but the catalog record never written (a crash in between):
            # the bytes were verified, but without the record we cannot prove it; refill.
            log.warning("blob %s has no catalog entry; removing it", orphan)
            self.blobs.remove(orphan)
        for image_id in kept.keys() & {e.image_id for e in entries}:
            journal.remove([kept.pop(image_id)])  # filled since: the entry is what counts
        for k in kept.values():
            log.info("kept %d bytes of the interrupted fill of %s", k.record.recorded, k.image_id)
        self.kept = kept
        return entries, self.catalog.pins()

    def __contains__(self, image_id: str) -> bool:
        """Whether L1 holds the image, without a disk access."""
        return image_id in self.index

    def _publish(self) -> None:
        self.metrics.cache_bytes.set(self.index.total_bytes)
        self.metrics.cache_entries.set(len(self.index))

    async def lookup(self, image_id: str) -> tuple[Entry, IO[bytes]] | None:
        """The entry and its open blob, or None; records the hit (in memory, see ``flush``).

        The blobs of recent hits are held open (``HELD_BLOBS``, as nginx's ``open_file_cache``):
        a hit on one of them reads no disk and runs no thread, only a ``dup`` of its descriptor.
        """
        entry = self.index.get(image_id)
        if entry is None:
            return None  # a miss costs no disk access
        fobj = self._open_held(entry)
        if fobj is None:
            fobj = await self._run(self._open, entry)
            current = self.index.get(image_id)
            if current is None or current.created != entry.created:
                # Evicted (or evicted and filled again) while the thread opened it: a miss.
                if not isinstance(fobj, str):
                    fobj.close()
                return None
            if not isinstance(fobj, str):
                self._hold(image_id, fobj)
        if isinstance(fobj, str):
            log.error("L1 entry %s dropped: %s", image_id, fobj)
            await self.evict(image_id, "inconsistent")  # and the caller is filled again
            return None
        self.index.touch(image_id, self.clock())
        return entry, fobj

    def _open(self, entry: Entry) -> IO[bytes] | str:
        """The entry's blob, open; or why L1 disagrees with itself about it."""
        try:
            fobj = open(self.blobs.path(entry.image_id), "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            return "its blob is missing"
        except OSError as exc:
            raise StoreError(f"cannot open the blob of {entry.image_id}: {exc.strerror}") from exc
        if (why := _disagreement(os.fstat(fobj.fileno()), entry)) is not None:
            fobj.close()
            return why
        return fobj

    def _open_held(self, entry: Entry) -> IO[bytes] | str | None:
        """A new handle on the held blob (None when none is held), or why L1 disagrees with
        itself about it: a blob cut short or removed behind the sidecar's back is seen on the
        very next hit, held or not (one ``fstat``, no thread)."""
        fd = self._held.get(entry.image_id)
        if fd is None:
            return None
        if (why := _disagreement(os.fstat(fd), entry)) is not None:
            self._release(entry.image_id)
            return why
        self._held.move_to_end(entry.image_id)
        # Unbuffered: a hit reads with pread or sendfile, never through a buffer (half the cost).
        return os.fdopen(os.dup(fd), "rb", buffering=0)

    def _hold(self, image_id: str, fobj: IO[bytes]) -> None:
        if image_id in self._held:
            return
        self._held[image_id] = os.dup(fobj.fileno())
        if len(self._held) > HELD_BLOBS:
            # Its blob is still linked: closing the descriptor frees nothing on disk, at once.
            os.close(self._held.popitem(last=False)[1])

    def _release(self, image_id: str) -> None:
        """Stop holding the blob open; called before it is unlinked, so the close is cheap."""
        fd = self._held.pop(image_id, None)
        if fd is not None:
            os.close(fd)

    async def flush(self) -> None:
        """Write the access times of the entries hit since the last flush, in one transaction.

        One SQLite write per hit would cost every hit more than serving it. A crash loses the
        access times of at most the last ``flush_interval``: the entries stay, their LRU/LFU
        rank is a few seconds older. A catalog that cannot be written keeps them for next time.
        """
        dirty = self.index.take_dirty()
        if not dirty:
            return
        try:
            await finish(self._run(self._write_access, dirty))
        except StoreError as exc:
            self.index.mark_dirty(dirty)
            log.warning("access times of %d L1 entries not written, kept for the next try: %s",
                        len(dirty), exc)  # fmt: skip

    def _write_access(self, entries: list[Entry]) -> None:
        self.catalog.record_access(entries)
        crash.point("touch.cataloged")

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            await self.flush()

    async def verify(self, entry: Entry) -> bool:
        """Re-hash the entry's blob (in the executor); whether it still matches its record."""
        return await self._run(self._verify, entry)

    def _verify(self, entry: Entry) -> bool:
        try:
            with open(self.blobs.path(entry.image_id), "rb") as f:
                digest = hashlib.file_digest(f, entry.hash_algo)
                size = f.tell()
        except FileNotFoundError:
            return False
        return size == entry.size and digest.hexdigest() == entry.hash_value

    async def get(self, image_id: str) -> Entry | None:
        return self.index.get(image_id)

    async def entries(self) -> list[Entry]:
        return self.index.entries()

    async def pins(self) -> frozenset[str]:
        return self.index.pins

    async def pin(self, image_id: str) -> None:
        await self._run(self.catalog.pin, image_id)
        self.index.pin(image_id)

    async def unpin(self, image_id: str) -> bool:
        was = await self._run(self.catalog.unpin, image_id)
        self.index.unpin(image_id)
        return was

    async def usage(self) -> Usage:
        """Bytes in L1 and the state of the filesystem under it, counting as free the blobs of
        evictions under way (planned, not unlinked yet)."""
        total, free = await self._run(self.blobs.disk_usage)
        self.metrics.disk_free.set(free)
        return Usage(cache_bytes=self.index.total_bytes, disk_total=total,
                     disk_free=free + self.freeing)  # fmt: skip

    @property
    def kept_bytes(self) -> int:
        """Disk held by partials of a previous run (each fallocated to its image's size)."""
        return sum(k.record.size for k in self.kept.values())

    def in_flight(self) -> tuple[int, int]:
        """Bytes that will be entries and are not yet: (on disk already, reserved only).

        Kept partials and the files of running fills are on disk; the room a fill reserved
        before creating its file is not. ``policy.with_in_flight`` counts both as cache bytes.
        """
        on_disk = self.kept_bytes + sum(r.size for r in self.reserved.values() if r.on_disk)
        pending = sum(r.size for r in self.reserved.values() if not r.on_disk)
        return on_disk, pending

    def reserve(self, image_id: str, size: int, on_disk: bool = False) -> None:
        """Hold ``size`` bytes of L1 for the fill of ``image_id``; synchronous, so a plan and the
        reservation it allows happen with no await in between (``Janitor.sweep``)."""
        self.reserved[image_id] = Reservation(size, on_disk)

    def unreserve(self, image_id: str) -> None:
        """Give the fill's room back: its entry is counted now, or its file is gone."""
        self.reserved.pop(image_id, None)

    async def take_partial(
        self, image_id: str, size: int, verifier: tuple[str, str]
    ) -> journal.Kept | None:
        """The partial a previous run left for this image, if it is still this image (Glance's
        size and hash as the caller sees them); one that is not is removed. Only one fill may
        take it: it leaves ``kept`` before the first await, and its bytes stay counted, as the
        room this fill reserved (``in_flight``), until the fill ends."""
        kept = self.kept.pop(image_id, None)
        if kept is None:
            return None
        self.reserve(image_id, kept.record.size, on_disk=True)  # counted as kept until now
        if why := kept.record.mismatch(size, verifier):
            log.info("not resuming the fill of %s: %s", image_id, why)
            await finish(self._run(journal.remove, [kept]))
            self.unreserve(image_id)
            return None
        return kept

    async def drop_partials(self, older_than: float | None = None) -> int:
        """Remove kept partials (those whose last record is older than ``older_than``, or all);
        the bytes freed."""
        dropped = [k for k in self.kept.values() if older_than is None or k.mtime < older_than]
        for k in dropped:
            del self.kept[k.image_id]
            log.info("dropped the partial of %s (%d bytes)", k.image_id, k.record.size)
        if dropped:
            await self._run(journal.remove, dropped)
        return sum(k.record.size for k in dropped)

    async def create_partial(self, part: Partial, size: int) -> None:
        """Open ``part``'s file and journal: a new file with ``size`` bytes reserved, or the one
        ``part.kept`` names, open for writing and reading. The room reserved for it is on disk
        from now on: the filesystem counts it."""
        await self._run(self._create_partial, part, size)
        if (reservation := self.reserved.get(part.image_id)) is not None:
            reservation.on_disk = True

    def _create_partial(self, part: Partial, size: int) -> None:
        if part.kept is not None:
            try:
                self._open_kept(part, size)
                return
            except OSError as exc:
                # Gone or changed since start: this fill starts afresh instead.
                log.warning("cannot resume the fill of %s: %s", part.image_id, exc)
                self.blobs.discard(part.path, _owned(part))
                journal.remove([part.kept])
                part.kept = None
        part.path, part.fd = self.blobs.create_partial(part.image_id, size)
        part.journal = journal.path_for(part.path)
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            part.journal_fd = os.open(part.journal, flags, 0o640)
            part.read_fd = os.open(part.path, os.O_RDONLY | os.O_CLOEXEC)
            part.direct_fd = direct.open_direct(part.path)
        except OSError as exc:
            raise StoreError(f"cannot open {part.path}: {exc.strerror}") from exc

    @staticmethod
    def _open_kept(part: Partial, size: int) -> None:
        assert part.path is not None and part.journal is not None
        part.fd = os.open(part.path, os.O_RDWR | os.O_CLOEXEC)
        if os.fstat(part.fd).st_size != size:
            raise OSError(0, f"{part.path.name} is no longer {size} bytes long")
        part.journal_fd = os.open(part.journal, os.O_RDWR | os.O_CLOEXEC)
        part.read_fd = os.open(part.path, os.O_RDONLY | os.O_CLOEXEC)
        part.direct_fd = direct.open_direct(part.path)

    async def commit(self, part: Partial, entry: Entry) -> None:
        """Make ``part`` the image's entry. Takes its write descriptor, closed whatever happens;
        on failure nothing of the entry is left (no blob without its record)."""
        assert part.path is not None
        while (evicting := self._evicting.get(entry.image_id)) is not None:
            await evicting.wait()  # the eviction of its previous entry must not remove this one
        if part.direct_fd is not None:
            fd, part.direct_fd = part.direct_fd, None
            os.close(fd)  # the fill's writes are done: the commit's fsync covers them
        await self._run(self._commit, part.path, part.take(), entry, part.journal)
        self._release(entry.image_id)
        self.index.add(entry)
        self.unreserve(entry.image_id)  # with the add: its bytes are counted once, always
        self._publish()

    def _commit(self, path: Path, fd: int, entry: Entry, log: Path | None = None) -> None:
        try:
            self.blobs.commit(path, fd, entry.image_id)
        except StoreError:
            path.unlink(missing_ok=True)
            raise
        try:
            self.catalog.put(entry)
        except StoreError:
            self.blobs.remove(entry.image_id)
            raise
        crash.point("commit.cataloged")
        if log is not None:
            with contextlib.suppress(OSError):  # an orphan journal is removed at start anyway
                log.unlink(missing_ok=True)
        self._publish_disk()

    async def discard(self, part: Partial) -> None:
        """Close what ``part`` still owns and remove its file (gone already after a commit) and
        its journal."""
        fds = _owned(part)
        if part.path is not None or fds:
            await self._run(self.blobs.discard, part.path, fds)
        if part.journal is not None:
            await self._run(part.journal.unlink, True)

    async def release(self, part: Partial) -> None:
        """Close what ``part`` still owns and leave its file and journal for the next start."""
        fds = _owned(part)
        await self._run(self.blobs.discard, None, fds)

    async def evict(self, image_id: str, reason: str) -> int:
        """Remove an entry; returns the bytes freed (0 when it was not there)."""
        return await self.remove(self.claim([(image_id, reason)]))

    def claim(self, chosen: Iterable[tuple[str, str]]) -> list[tuple[Entry, str]]:
        """Take entries (image id, reason) out of the index, at once: no hit serves them from
        now on, and no plan made meanwhile counts or chooses them again. ``remove`` them next.

        Synchronous on purpose: a plan and its claim happen with no await in between, so plans
        never race and need no lock, and a fill never waits for another fill's evictions.
        """
        claimed = []
        for image_id, reason in chosen:
            entry = self.index.remove(image_id)
            if entry is not None:
                self._release(image_id)
                self.freeing += entry.size
                claimed.append((entry, reason))
        self._publish()
        return claimed

    async def remove(self, claimed: list[tuple[Entry, str]]) -> int:
        """Remove claimed entries from the catalog and the disk, in one thread; the bytes freed.
        An entry whose record cannot be removed goes back into the index (StoreError raised),
        even if this task is cancelled meanwhile (``_removed``)."""
        if not claimed:
            return 0
        done = asyncio.Event()
        for entry, _ in claimed:
            self._evicting[entry.image_id] = done  # before any await: a commit waits for it
        kept = await finish(self._removed(claimed, done))
        if kept:
            raise StoreError(f"catalog: {len(kept)} entries could not be evicted")
        return sum(entry.size for entry, _ in claimed)

    async def _removed(self, claimed: list[tuple[Entry, str]], done: asyncio.Event) -> list[Entry]:
        """The thread of ``remove`` and the bookkeeping of its outcome, as one unit that
        ``finish`` runs to its end: a cancel of the caller lands only after the entries whose
        record stays are back in the index, so its byte count never leaves them out until a
        restart. The entries kept."""
        kept: list[Entry] = []
        try:
            kept = await self._run(self._uncatalog, claimed)
        finally:
            for entry, _ in claimed:
                self.freeing -= entry.size
                if self._evicting.get(entry.image_id) is done:
                    del self._evicting[entry.image_id]
            for entry in kept:
                self.index.add(entry)
            done.set()
            self._publish()
        return kept

    def _uncatalog(self, claimed: list[tuple[Entry, str]]) -> list[Entry]:
        """Each record, then its blob; the entries whose record stays (the catalog failed)."""
        kept = []
        for entry, reason in claimed:
            try:
                self.catalog.delete(entry.image_id)
            except StoreError as exc:
                log.error("cannot evict %s: %s", entry.image_id, exc)
                kept.append(entry)
                continue
            # Without its record the blob is never served again, so the entry is gone even if
            # the blob below cannot be removed (start-up removes it then).
            self.metrics.evictions.labels(reason).inc()
            self.metrics.evicted_bytes.inc(entry.size)
            crash.point("evict.uncataloged")
            try:
                self.blobs.remove(entry.image_id)
            except StoreError as exc:
                log.error("evicted %s, but its blob stays until the next start: %s",
                          entry.image_id, exc)  # fmt: skip
            crash.point("evict.removed")
            log.info("evicted %s (%d bytes): %s", entry.image_id, entry.size, reason)
        self._publish_disk()
        return kept

    def _publish_disk(self) -> None:
        # A transient failure to read the filesystem only delays the gauge.
        with contextlib.suppress(OSError):
            self.metrics.disk_free.set(self.blobs.disk_usage()[1])

    def close(self) -> None:
        for image_id in list(self._held):
            self._release(image_id)
        self.catalog.close()


def _disagreement(st: os.stat_result, entry: Entry) -> str | None:
    """Why an open blob is not the entry's, or None: L1's one rule for "its blob"."""
    if st.st_nlink == 0:
        return "its blob was removed"
    if st.st_size != entry.size:
        return "its blob has the wrong size"
    return None

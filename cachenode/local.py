"""L1: the catalog and the blob files together, seen from async code.

Every disk and SQLite call runs in the default executor; the event loop never blocks on them.
A hit is an open file object: once open, the image can be evicted (its blob unlinked) and the
caller still reads all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import IO, Any, TypeVar

from cachenode import crash, journal
from cachenode.blobs import BlobStore
from cachenode.catalog import Catalog, Entry
from cachenode.errors import StoreError
from cachenode.metrics import Metrics
from cachenode.policy import Usage

log = logging.getLogger(__name__)
T = TypeVar("T")


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
    def __init__(self, root: Path, metrics: Metrics) -> None:
        self.root = root
        self.metrics = metrics
        self.blobs = BlobStore(root)
        self.catalog = Catalog(root / "catalog")
        self.total_bytes = 0
        self.total_entries = 0
        self._ids: dict[str, int] = {}  # the catalog's entries and sizes, in memory
        self.kept: dict[str, journal.Kept] = {}  # partials of a previous run, not adopted yet
        self._totals = threading.Lock()  # commits and evictions run on different executor threads

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, partial(fn, *args))

    async def start(self) -> None:
        """Make disk and catalog agree after whatever happened before (a crash, a kill -9)."""
        await self._run(self._reconcile)

    def _reconcile(self) -> None:
        kept, gone = journal.scan(self.blobs.partial_dir, time.time())
        for path, why in gone:
            log.info("removed %s of an interrupted fill: %s", path.name, why)
            path.unlink(missing_ok=True)
        on_disk = self.blobs.committed()
        ids: dict[str, int] = {}
        for entry in list(self.catalog.entries()):
            size = on_disk.pop(entry.image_id, None)
            if size != entry.size:
                log.warning("catalog entry %s has %s; dropping it", entry.image_id,
                            "no blob" if size is None else f"a blob of {size} bytes")  # fmt: skip
                self.catalog.delete(entry.image_id)
                if size is not None:
                    self.blobs.remove(entry.image_id)
                continue
            ids[entry.image_id] = entry.size
        for orphan in on_disk:
            # Renamed into place but the catalog record never written (a crash in between):
            # the bytes were verified, but without the record we cannot prove it; refill.
            log.warning("blob %s has no catalog entry; removing it", orphan)
            self.blobs.remove(orphan)
        for image_id in kept.keys() & ids.keys():
            journal.remove([kept.pop(image_id)])  # filled since: the entry is what counts
        for k in kept.values():
            log.info("kept %d bytes of the interrupted fill of %s", k.record.recorded, k.image_id)
        self.kept = kept
        with self._totals:
            self._ids, self.total_bytes, self.total_entries = ids, sum(ids.values()), len(ids)
        self._publish()

    def __contains__(self, image_id: str) -> bool:
        """Whether L1 holds the image, without a disk access (an in-memory index of the catalog)."""
        return image_id in self._ids

    def _count(self, image_id: str, size: int, added: bool) -> None:
        with self._totals:
            self.total_bytes -= self._ids.pop(image_id, 0)
            if added:
                self._ids[image_id] = size
                self.total_bytes += size
            self.total_entries = len(self._ids)
        self._publish()

    def _publish(self) -> None:
        self.metrics.cache_bytes.set(self.total_bytes)
        self.metrics.cache_entries.set(self.total_entries)
        # A transient failure to read the filesystem only delays the gauge.
        with contextlib.suppress(OSError):
            self.metrics.disk_free.set(self.blobs.disk_usage()[1])

    async def lookup(self, image_id: str) -> tuple[Entry, IO[bytes]] | None:
        """The entry and its open blob, or None. Records the hit for LRU/LFU."""
        if image_id not in self._ids:
            return None  # a miss costs no disk access
        return await self._run(self._lookup, image_id)

    def _lookup(self, image_id: str) -> tuple[Entry, IO[bytes]] | None:
        entry = self.catalog.get(image_id)
        if entry is None:
            log.warning("L1 index had %s but the catalog does not; dropping it", image_id)
            self._count(image_id, 0, added=False)
            return None
        try:
            fobj = open(self.blobs.path(image_id), "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            self._drop(entry, "its blob is missing")
            return None
        except OSError as exc:
            raise StoreError(f"cannot open the blob of {image_id}: {exc.strerror}") from exc
        try:
            if os.fstat(fobj.fileno()).st_size != entry.size:
                fobj.close()
                self._drop(entry, "its blob has the wrong size")
                return None
            self.catalog.touch(image_id)
            crash.point("touch.cataloged")
        except BaseException:
            fobj.close()
            raise
        return entry, fobj

    def _drop(self, entry: Entry, why: str) -> None:
        """L1 disagrees with itself about an entry: it goes, and the caller is filled again."""
        log.error("L1 entry %s dropped: %s", entry.image_id, why)
        self._evict(entry.image_id, "inconsistent")

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
        return await self._run(self.catalog.get, image_id)

    async def entries(self) -> list[Entry]:
        return await self._run(lambda: list(self.catalog.entries()))

    async def pins(self) -> frozenset[str]:
        return await self._run(self.catalog.pins)

    async def pin(self, image_id: str) -> None:
        await self._run(self.catalog.pin, image_id)

    async def unpin(self, image_id: str) -> bool:
        return await self._run(self.catalog.unpin, image_id)

    async def usage(self) -> Usage:
        """Bytes in L1 and the state of the filesystem under it."""
        total, free = await self._run(self.blobs.disk_usage)
        self.metrics.disk_free.set(free)
        return Usage(cache_bytes=self.total_bytes, disk_total=total, disk_free=free)

    @property
    def kept_bytes(self) -> int:
        """Disk held by partials of a previous run (each fallocated to its image's size)."""
        return sum(k.record.size for k in self.kept.values())

    async def take_partial(
        self, image_id: str, size: int, verifier: tuple[str, str]
    ) -> journal.Kept | None:
        """The partial a previous run left for this image, if it is still this image (Glance's
        size and hash as the caller sees them); one that is not is removed. Only one fill may
        take it: it leaves ``kept`` before the first await."""
        kept = self.kept.pop(image_id, None)
        if kept is None:
            return None
        if why := kept.record.mismatch(size, verifier):
            log.info("not resuming the fill of %s: %s", image_id, why)
            await finish(self._run(journal.remove, [kept]))
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
        ``part.kept`` names, open for writing and reading."""
        await self._run(self._create_partial, part, size)

    def _create_partial(self, part: Partial, size: int) -> None:
        if part.kept is not None:
            try:
                self._open_kept(part, size)
                return
            except OSError as exc:
                # Gone or changed since start: this fill starts afresh instead.
                log.warning("cannot resume the fill of %s: %s", part.image_id, exc)
                fds = [fd for fd in (part.fd, part.journal_fd) if fd is not None]
                self.blobs.discard(part.path, fds)
                journal.remove([part.kept])
                part.kept, part.fd, part.journal_fd = None, None, None
        part.path, part.fd = self.blobs.create_partial(part.image_id, size)
        part.journal = journal.path_for(part.path)
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            part.journal_fd = os.open(part.journal, flags, 0o640)
            part.read_fd = os.open(part.path, os.O_RDONLY | os.O_CLOEXEC)
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

    async def commit(self, part: Partial, entry: Entry) -> None:
        """Make ``part`` the image's entry. Takes its write descriptor, closed whatever happens;
        on failure nothing of the entry is left (no blob without its record)."""
        assert part.path is not None
        await self._run(self._commit, part.path, part.take(), entry, part.journal)

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
        self._count(entry.image_id, entry.size, added=True)

    async def discard(self, part: Partial) -> None:
        """Close what ``part`` still owns and remove its file (gone already after a commit) and
        its journal."""
        fds = [fd for fd in (part.fd, part.read_fd, part.journal_fd) if fd is not None]
        part.fd = part.read_fd = part.journal_fd = None
        if part.path is not None or fds:
            await self._run(self.blobs.discard, part.path, fds)
        if part.journal is not None:
            await self._run(part.journal.unlink, True)

    async def release(self, part: Partial) -> None:
        """Close what ``part`` still owns and leave its file and journal for the next start."""
        fds = [fd for fd in (part.fd, part.read_fd, part.journal_fd) if fd is not None]
        part.fd = part.read_fd = part.journal_fd = None
        await self._run(self.blobs.discard, None, fds)

    async def evict(self, image_id: str, reason: str) -> int:
        """Remove an entry; returns the bytes freed (0 when it was not there)."""
        return await self._run(self._evict, image_id, reason)

    def _evict(self, image_id: str, reason: str) -> int:
        entry = self.catalog.get(image_id)
        if entry is None:
            return 0
        self.catalog.delete(image_id)
        # The index follows the catalog: without its record the blob is never served again, so
        # the entry is gone even if the blob below cannot be removed (start-up removes it then).
        self._count(image_id, entry.size, added=False)
        self.metrics.evictions.labels(reason).inc()
        self.metrics.evicted_bytes.inc(entry.size)
        crash.point("evict.uncataloged")
        try:
            self.blobs.remove(image_id)
        except StoreError as exc:
            log.error("evicted %s, but its blob stays until the next start: %s", image_id, exc)
        crash.point("evict.removed")
        log.info("evicted %s (%d bytes): %s", image_id, entry.size, reason)
        return entry.size

    def close(self) -> None:
        self.catalog.close()

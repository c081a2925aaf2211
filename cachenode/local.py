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
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any, TypeVar

from cachenode import crash
from cachenode.blobs import BlobStore
from cachenode.catalog import Catalog, Entry
from cachenode.errors import StoreError
from cachenode.metrics import Metrics
from cachenode.policy import Usage

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Partial:
    """A fill's file while it is being written."""

    image_id: str
    path: Path
    fd: int | None


class Local:
    def __init__(self, root: Path, metrics: Metrics) -> None:
        self.root = root
        self.metrics = metrics
        self.blobs = BlobStore(root)
        self.catalog = Catalog(root / "catalog")
        self.total_bytes = 0
        self.total_entries = 0
        self._ids: set[str] = set()
        self._totals = threading.Lock()  # commits and evictions run on different executor threads

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, partial(fn, *args))

    async def start(self) -> None:
        """Make disk and catalog agree after whatever happened before (a crash, a kill -9)."""
        await self._run(self._reconcile)

    def _reconcile(self) -> None:
        for path in self.blobs.clean_partials():
            log.info("removed the partial file of an interrupted fill: %s", path.name)
        on_disk = self.blobs.committed_ids()
        total, ids = 0, set()
        for entry in list(self.catalog.entries()):
            if entry.image_id not in on_disk:
                log.warning("catalog entry %s has no blob; dropping it", entry.image_id)
                self.catalog.delete(entry.image_id)
                continue
            on_disk.discard(entry.image_id)
            ids.add(entry.image_id)
            total += entry.size
        for orphan in on_disk:
            # Renamed into place but the catalog record never written (a crash in between):
            # the bytes were verified, but without the record we cannot prove it; refill.
            log.warning("blob %s has no catalog entry; removing it", orphan)
            self.blobs.remove(orphan)
        with self._totals:
            self._ids, self.total_bytes, self.total_entries = ids, total, len(ids)
        self._publish()

    def __contains__(self, image_id: str) -> bool:
        """Whether L1 holds the image, without a disk access (an in-memory index of the catalog)."""
        return image_id in self._ids

    def _count(self, image_id: str, size: int, added: bool) -> None:
        with self._totals:
            if added:
                self._ids.add(image_id)
            else:
                self._ids.discard(image_id)
            self.total_bytes += size if added else -size
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
            return None
        try:
            fobj = open(self.blobs.path(image_id), "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            log.warning("catalog entry %s lost its blob; dropping it", image_id)
            if self.catalog.delete(image_id):
                self._count(image_id, entry.size, added=False)
            return None
        try:
            if os.fstat(fobj.fileno()).st_size != entry.size:
                fobj.close()
                raise StoreError(f"blob {image_id} has the wrong size")
            self.catalog.touch(image_id)
            crash.point("touch.cataloged")
        except BaseException:
            fobj.close()
            raise
        return entry, fobj

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

    async def create_partial(self, image_id: str, size: int) -> Partial:
        path, fd = await self._run(self.blobs.create_partial, image_id, size)
        return Partial(image_id, path, fd)

    async def commit(self, part: Partial, entry: Entry) -> None:
        await self._run(self._commit, part, entry)

    def _commit(self, part: Partial, entry: Entry) -> None:
        assert part.fd is not None
        fd, part.fd = part.fd, None
        try:
            self.blobs.commit(part.path, fd, entry.image_id)
        except StoreError:
            part.path.unlink(missing_ok=True)
            raise
        self.catalog.put(entry)
        crash.point("commit.cataloged")
        self._count(entry.image_id, entry.size, added=True)

    async def discard(self, part: Partial) -> None:
        fd, part.fd = part.fd, None
        await self._run(self.blobs.discard, part.path, fd)

    async def evict(self, image_id: str, reason: str) -> int:
        """Remove an entry; returns the bytes freed (0 when it was not there)."""
        return await self._run(self._evict, image_id, reason)

    def _evict(self, image_id: str, reason: str) -> int:
        entry = self.catalog.get(image_id)
        if entry is None:
            return 0
        self.catalog.delete(image_id)
        crash.point("evict.uncataloged")
        self.blobs.remove(image_id)
        crash.point("evict.removed")
        self._count(image_id, entry.size, added=False)
        self.metrics.evictions.labels(reason).inc()
        self.metrics.evicted_bytes.inc(entry.size)
        log.info("evicted %s (%d bytes): %s", image_id, entry.size, reason)
        return entry.size

    def close(self) -> None:
        self.catalog.close()

"""Fills in-process, over a real L1 on disk and a real HTTP tier on 127.0.0.1 (our upstream, for
its faults): descriptors, cancellation, disagreeing L1 state, and the quarantine clock."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from cachenode import journal
from cachenode.config import TierConfig
from cachenode.errors import FillBroken, FillFailed, FillStopped, IntegrityError, StoreError
from cachenode.fill import Fill, Fills
from cachenode.glance import ImageInfo
from cachenode.janitor import Janitor
from cachenode.local import Local
from cachenode.metrics import Metrics
from cachenode.tiers import TierSet, build_tier
from tests.support.upstream import Fault, Upstream

IMAGE_ID = "0b7e7e6e-1d3a-4c55-9a2f-6f0d2b7c1a11"


def image_of(data: bytes) -> ImageInfo:
    return ImageInfo(
        id=IMAGE_ID, status="active", size=len(data), checksum=hashlib.md5(data).hexdigest(),
        hash_algo="sha512", hash_value=hashlib.sha512(data).hexdigest(),
    )  # fmt: skip


def open_fds() -> set[str]:
    """The image files (partial or committed) this process has open. (Sockets of connection
    pools and the catalog's SQLite connections, one per thread, are not the fill's.)"""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue
        if "/partial/" in target or "/blobs/" in target:
            found.add(f"{fd} {target}")
    return found


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def fills_over(
    root: Path, upstream: Upstream, clock: Callable[[], float] | None = None
) -> AsyncIterator[Fills]:
    metrics = Metrics()
    local = Local(root, metrics)
    await local.start()
    tier = build_tier(TierConfig(name="origin", kind="http", url=upstream.url))
    tiers = TierSet([tier], metrics)
    metrics.prime(["origin"])
    fills = Fills(local, tiers, metrics, **({"clock": clock} if clock else {}))
    try:
        yield fills
    finally:
        await fills.close()
        await tiers.close()
        await local.stop()


def hold_commits(fills: Fills, entered: threading.Event, release: threading.Event) -> None:
    """Make each commit of ``fills`` set ``entered``, then wait (in its thread) for ``release``."""
    real_commit = fills.local.blobs.commit

    def commit(path: Path, fd: int, image_id: str) -> Path:
        entered.set()
        release.wait(10)
        return real_commit(path, fd, image_id)

    fills.local.blobs.commit = commit  # type: ignore[method-assign]


async def filled(fills: Fills, data: bytes) -> Fill:
    """Fill the image of ``data``, to its end (committed or failed)."""
    fill, _ = fills.start(image_of(data), None)
    assert fill.task is not None
    await fill.task
    return fill


def test_a_write_failing_mid_fill_is_the_last_write_before_the_discard(tmp_path: Path) -> None:
    """The disk fails a write halfway: the fill fails, and no write of it runs after its
    partial file was discarded and its descriptors closed (one owner, no write in flight)."""
    data = os.urandom(6 << 20)
    events: list[str] = []

    async def main() -> None:
        async with fills_over(tmp_path / "cache", upstream) as fills:
            real_write, real_discard = fills.local.blobs.write, fills.local.blobs.discard

            def write(fd: int, chunk: Any, offset: int) -> None:
                events.append("write")
                if offset >= len(data) // 2:
                    raise StoreError("write failed: Input/output error")
                threading.Event().wait(0.002)  # a slow disk keeps writes queued behind this one
                real_write(fd, chunk, offset)
                events.append("wrote")

            def discard(path: Path | None, fds: list[int]) -> None:
                events.append("discard")
                real_discard(path, fds)

            fills.local.blobs.write = write  # type: ignore[method-assign]
            fills.local.blobs.discard = discard  # type: ignore[method-assign]
            before = open_fds()
            fill = await filled(fills, data)
            assert isinstance(fill.error, StoreError)
            assert open_fds() <= before  # both descriptors of the partial file are closed
            assert fills.local.metrics.fills.labels("origin", "error")._value.get() == 1

    with Upstream(blobs={IMAGE_ID: data}, chunk=256 << 10) as upstream:
        asyncio.run(main())
    assert events.count("discard") == 1
    assert "write" not in events[events.index("discard") :]
    assert list((tmp_path / "cache" / "partial").iterdir()) == []
    assert not (tmp_path / "cache" / "blobs" / IMAGE_ID[:2] / IMAGE_ID).exists()


def test_a_cancel_during_commit_waits_for_it_and_leaves_one_consistent_state(
    tmp_path: Path,
) -> None:
    """Shutdown (SIGTERM cancels every fill) lands while the commit is in its thread: the
    cancel waits for the commit instead of closing its descriptor under it or unlinking its
    file mid-rename; afterwards the entry is whole and recorded, and no descriptor is left."""
    data = os.urandom(1 << 20)
    in_commit, release = threading.Event(), threading.Event()

    async def main() -> None:
        async with fills_over(tmp_path / "cache", upstream) as fills:
            hold_commits(fills, in_commit, release)
            before = open_fds()
            fill, _ = fills.start(image_of(data), None)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, in_commit.wait, 10)
            closing = asyncio.create_task(fills.close())  # what SIGTERM does
            for _ in range(20):
                await asyncio.sleep(0)  # the cancel is delivered while the commit is held
            assert fill.task is not None and not fill.task.done()
            release.set()
            await closing
            assert fill.task.cancelled()
            assert open_fds() <= before
            entry = await fills.local.get(IMAGE_ID)
            assert entry is not None and entry.size == len(data)  # the commit completed

    with Upstream(blobs={IMAGE_ID: data}) as upstream:
        asyncio.run(main())
    blob = tmp_path / "cache" / "blobs" / IMAGE_ID[:2] / IMAGE_ID
    assert blob.read_bytes() == data
    assert list((tmp_path / "cache" / "partial").iterdir()) == []


def test_a_blob_that_cannot_be_removed_leaves_l1_consistent(tmp_path: Path) -> None:
    """An eviction whose blob removal fails: the entry is gone from the index and the catalog
    alike (never a half-entry that makes a download fail); start-up removes the blob."""
    data = os.urandom(256 << 10)

    async def main() -> None:
        async with fills_over(tmp_path / "cache", upstream) as fills:
            await filled(fills, data)
            local = fills.local
            assert IMAGE_ID in local

            def remove(image_id: str) -> int:
                raise StoreError("cannot remove: Read-only file system")

            local.blobs.remove = remove  # type: ignore[method-assign]
            assert await local.evict(IMAGE_ID, "requested") == len(data)
            assert IMAGE_ID not in local
            assert await local.lookup(IMAGE_ID) is None
            assert await local.get(IMAGE_ID) is None
            assert local.total_bytes == 0 and local.total_entries == 0

        async with fills_over(tmp_path / "cache", upstream) as fills:
            assert IMAGE_ID not in fills.local

    with Upstream(blobs={IMAGE_ID: data}) as upstream:
        asyncio.run(main())
    assert not (tmp_path / "cache" / "blobs" / IMAGE_ID[:2] / IMAGE_ID).exists()


def test_an_eviction_cancelled_while_the_catalog_fails_gives_the_entry_back(
    tmp_path: Path,
) -> None:
    """The catalog cannot delete the record, and the evicting task is cancelled (a shutdown)
    while its thread tries: the entry stays recorded, so it is back in the index and counted in
    its bytes, as after the same failure without the cancel; nothing is counted as freeing."""
    data = os.urandom(256 << 10)
    in_delete, release = threading.Event(), threading.Event()

    async def main() -> None:
        async with fills_over(tmp_path / "cache", upstream) as fills:
            await filled(fills, data)
            local = fills.local

            def delete(image_id: str) -> bool:
                in_delete.set()
                release.wait(10)
                raise StoreError("catalog: database is locked")

            local.catalog.delete = delete  # type: ignore[method-assign]
            evicting = asyncio.create_task(local.evict(IMAGE_ID, "requested"))
            await asyncio.get_running_loop().run_in_executor(None, in_delete.wait, 10)
            evicting.cancel()  # delivered while the thread holds the delete
            for _ in range(20):
                await asyncio.sleep(0)
            assert not evicting.done()  # the cancel waits for the thread
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await evicting
            assert IMAGE_ID in local
            assert local.total_bytes == len(data) and local.total_entries == 1
            assert local.freeing == 0
            assert local.metrics.cache_bytes._value.get() == len(data)
            hit = await local.lookup(IMAGE_ID)
            assert hit is not None
            hit[1].close()

    with Upstream(blobs={IMAGE_ID: data}) as upstream:
        asyncio.run(main())


def test_a_blob_of_the_wrong_size_is_dropped_not_served(tmp_path: Path) -> None:
    data = os.urandom(256 << 10)

    async def main() -> None:
        async with fills_over(tmp_path / "cache", upstream) as fills:
            await filled(fills, data)
            blob = fills.local.blobs.path(IMAGE_ID)
            os.truncate(blob, 1000)
            assert await fills.local.lookup(IMAGE_ID) is None
            assert IMAGE_ID not in fills.local and not blob.exists()
            evicted = fills.local.metrics.evictions.labels("inconsistent")._value.get()
            assert evicted == 1

    with Upstream(blobs={IMAGE_ID: data}) as upstream:
        asyncio.run(main())


def test_a_tier_that_sent_bad_bytes_is_skipped_until_the_quarantine_ends(tmp_path: Path) -> None:
    data = os.urandom(256 << 10)
    clock = Clock()

    async def main() -> None:
        async with fills_over(tmp_path / "cache", upstream, clock) as fills:
            fill = await filled(fills, data)
            assert isinstance(fill.error, IntegrityError)
            assert fills.candidates(IMAGE_ID) == []
            clock.now += fills.quarantine - 1
            assert fills.candidates(IMAGE_ID) == []
            fill, started = fills.start(image_of(data), None)
            assert started and fill.task is not None
            await fill.task
            assert isinstance(fill.error, FillFailed)  # nothing to ask: no byte requested
            clock.now += 2
            assert [t.name for t in fills.candidates(IMAGE_ID)] == ["origin"]
            fill = await filled(fills, data)
            assert fill.error is None and IMAGE_ID in fills.local

    with Upstream(blobs={IMAGE_ID: data}, faults=[Fault("flip", at=1000)]) as upstream:
        asyncio.run(main())
        assert len(upstream.requests_for(IMAGE_ID)) == 2


@pytest.mark.parametrize("cancel_at", ["reserve", "download"])
def test_a_cancel_before_commit_leaves_no_descriptor_and_only_a_resumable_partial(
    tmp_path: Path, cancel_at: str
) -> None:
    """Shutdown cancels a fill: no descriptor stays open; a fill that had written bytes leaves
    its partial and a journal naming exactly those bytes (cachenode.journal), for the next
    start to resume; one cancelled before it ran leaves nothing."""
    data = os.urandom(4 << 20)
    landed: list[int] = []

    async def main() -> None:
        async with fills_over(tmp_path / "cache", upstream) as fills:
            before = open_fds()
            fill, _ = fills.start(image_of(data), None)
            if cancel_at == "download":
                await fill.wait(lambda: fill.landed > 0)
            await fills.close()
            landed.append(fill.landed)
            assert fill.done and isinstance(fill.error, FillFailed)
            assert open_fds() <= before
            assert fills.get(IMAGE_ID) is None
            assert fills.metrics.inflight_fills._value.get() == 0

    throttle = Fault("throttle", rate=1 << 20, times=-1)
    with Upstream(blobs={IMAGE_ID: data}, faults=[throttle]) as upstream:
        asyncio.run(main())
    left = sorted((tmp_path / "cache" / "partial").iterdir())
    if cancel_at == "reserve":
        assert left == []
        return
    partial, log = left
    found = journal.read(log)
    assert log == journal.path_for(partial) and found is not None
    assert found[1].spans == ((0, landed[0]),) and landed[0] > 0
    assert partial.read_bytes()[: landed[0]] == data[: landed[0]]


def with_room(fills: Fills) -> Fills:
    """``fills`` asking a janitor for room, as the sidecar's do: their room is then reserved."""
    fills.make_room = Janitor(fills.local, fills.local.policy, fills.metrics).make_room
    return fills


def stopped_cleanly(fills: Fills, fill: Fill) -> None:
    """What a stop leaves: a failed fill, counted, with no entry, no partial, no room held."""
    assert fill.done and isinstance(fill.error, FillStopped) and fill.failed
    assert fill.task is not None and not fill.task.cancelled()  # a failed fill, not a shutdown
    assert fills.get(IMAGE_ID) is None and IMAGE_ID not in fills.local
    assert fills.local.reserved == {}
    assert fills.metrics.inflight_fills._value.get() == 0
    assert fills.metrics.fills.labels(fill.tier or "none", "deleted")._value.get() == 1
    assert list((fills.local.root / "partial").iterdir()) == []
    assert not fills.local.blobs.path(IMAGE_ID).exists()


@pytest.mark.parametrize("stop_at", ["start", "download"])
def test_a_stopped_fill_commits_nothing_and_gives_its_room_back(
    tmp_path: Path, stop_at: str
) -> None:
    """Stopped (its image deleted in Glance) before its task first ran, or mid-body: it ends
    as a failed fill, its readers cut, its partial and reserved room gone."""
    data = os.urandom(4 << 20)

    async def main() -> None:
        async with fills_over(tmp_path / "cache", upstream) as fills:
            with_room(fills)
            fill, _ = fills.start(image_of(data), None)
            if stop_at == "download":
                await fill.wait(lambda: fill.landed > 0)
                assert fills.local.reserved[IMAGE_ID].size == len(data)
            assert fills.stop(IMAGE_ID, "deleted")
            assert fill.task is not None
            await fill.task
            stopped_cleanly(fills, fill)
            with pytest.raises(FillBroken):
                async for _ in fill.spans(0, len(data)):
                    pass

    throttle = Fault("throttle", rate=1 << 20, times=-1)
    with Upstream(blobs={IMAGE_ID: data}, faults=[throttle]) as upstream:
        asyncio.run(main())


def test_a_fill_stopped_once_in_its_cleanup_still_ends_stopped(tmp_path: Path) -> None:
    """The stop lands after the commit, while the fill cleans up (too late to cancel it): the
    fill still ends as stopped, so its readers are cut, and the entry goes."""
    data = os.urandom(1 << 20)

    async def main() -> None:
        async with fills_over(tmp_path / "cache", upstream) as fills:
            with_room(fills)
            in_cleanup, release = asyncio.Event(), asyncio.Event()
            real_discard = fills.local.discard

            async def discard(part):  # type: ignore[no-untyped-def]
                in_cleanup.set()
                await release.wait()
                await real_discard(part)

            fills.local.discard = discard  # type: ignore[method-assign]
            fill, _ = fills.start(image_of(data), None)
            await asyncio.wait_for(in_cleanup.wait(), 10)
            assert fill.ending and IMAGE_ID in fills.local  # committed, cleaning up
            assert fills.stop(IMAGE_ID, "deleted")
            for _ in range(20):
                await asyncio.sleep(0)  # the cancel would be delivered now: it is not sent
            release.set()
            assert fill.task is not None
            await fill.task
            stopped_cleanly(fills, fill)

    with Upstream(blobs={IMAGE_ID: data}) as upstream:
        asyncio.run(main())


def test_a_fill_stopped_during_its_commit_is_evicted_once_committed(tmp_path: Path) -> None:
    """The stop lands while the commit is in its thread: the commit completes (a rename is not
    stopped halfway), then the entry goes, as its image was deleted."""
    data = os.urandom(1 << 20)
    in_commit, release = threading.Event(), threading.Event()

    async def main() -> None:
        async with fills_over(tmp_path / "cache", upstream) as fills:
            with_room(fills)
            hold_commits(fills, in_commit, release)
            fill, _ = fills.start(image_of(data), None)
            await asyncio.get_running_loop().run_in_executor(None, in_commit.wait, 10)
            assert fills.stop(IMAGE_ID, "deleted")
            for _ in range(20):
                await asyncio.sleep(0)  # the cancel is delivered while the commit is held
            release.set()
            assert fill.task is not None
            await fill.task
            stopped_cleanly(fills, fill)
            assert fills.metrics.evictions.labels("deleted")._value.get() == 1

    with Upstream(blobs={IMAGE_ID: data}) as upstream:
        asyncio.run(main())

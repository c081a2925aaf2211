"""L1 at scale, on a real disk and catalog: what a sweep, a hit and two fills cost in catalog
calls and threads, counted rather than timed (tests/bench/l1_scale.py times them)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from cachenode.blobs import BlobStore
from cachenode.catalog import Catalog, Entry
from cachenode.janitor import Janitor
from cachenode.local import Local
from cachenode.metrics import Metrics
from cachenode.policy import Policy
from cachenode.units import Size

CATALOG_CALLS = ("get", "put", "delete", "entries", "pins", "record_access", "pin", "unpin")


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def entry(i: int, size: int, last: float) -> Entry:
    return Entry(f"img-{i:05d}", size, "sha512", "x", None, "t", last, last)


def seed(root: Path, entries: list[Entry]) -> None:
    """Blobs and catalog records of ``entries``, as commits would have left them."""
    blobs = BlobStore(root)
    catalog = Catalog(root / "catalog")
    for e in entries:
        path = blobs.path(e.image_id)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * e.size)
        catalog.put(e)
    catalog.close()


def count_calls(catalog: Catalog) -> Counter[str]:
    """Count each call to the catalog (the real one still answers it)."""
    calls: Counter[str] = Counter()

    def counted(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return method(*args, **kwargs)

        return call

    for name in CATALOG_CALLS:
        setattr(catalog, name, counted(name, getattr(catalog, name)))
    return calls


@asynccontextmanager
async def l1(root: Path, policy: Policy, clock: Clock) -> AsyncIterator[Local]:
    local = Local(root, Metrics(), policy, flush_interval=3600, clock=clock)
    await local.start()
    try:
        yield local
    finally:
        await local.stop()


def test_a_sweep_of_10000_entries_touches_only_what_it_evicts(tmp_path: Path) -> None:
    count, evicted = 10_000, 25
    seed(tmp_path, [entry(i, 10, float(i)) for i in range(count)])
    # Past max_bytes by the room one 250-byte image needs, high = low: exactly 25 entries go.
    policy = Policy("p", max_bytes=Size(count * 10), high_watermark=1.0, low_watermark=1.0,
                    min_free_disk=Size(0))  # fmt: skip
    clock = Clock()

    async def main() -> None:
        async with l1(tmp_path, policy, clock) as local:
            janitor = Janitor(local, policy, local.metrics, clock=clock)
            calls = count_calls(local.catalog)
            assert await janitor.make_room("img-new", evicted * 10)
            assert calls == Counter(delete=evicted)  # no read, no scan: one delete an eviction
            gone = [f"img-{i:05d}" for i in range(evicted)]  # the least recently used
            assert not any(i in local for i in gone) and f"img-{evicted:05d}" in local
            assert local.total_entries == count - evicted
            assert local.metrics.evictions.labels("size")._value.get() == evicted
            assert local.metrics.cache_entries._value.get() == count - evicted

    asyncio.run(main())
    assert not (tmp_path / "blobs" / "im" / "img-00000").exists()
    assert (tmp_path / "blobs" / "im" / f"img-{evicted:05d}").exists()


def test_two_fills_never_wait_for_each_others_eviction(tmp_path: Path) -> None:
    """The first fill's eviction is stuck on the disk; a second fill plans, evicts another
    entry and goes on meanwhile."""
    seed(tmp_path, [entry(i, 100, float(i)) for i in range(4)])
    policy = Policy("p", max_bytes=Size(400), high_watermark=1.0, low_watermark=1.0,
                    min_free_disk=Size(0))  # fmt: skip
    clock = Clock()
    entered, release = threading.Event(), threading.Event()

    async def main() -> None:
        async with l1(tmp_path, policy, clock) as local:
            janitor = Janitor(local, policy, local.metrics, clock=clock)
            real_remove = local.blobs.remove

            def remove(image_id: str) -> int:
                if image_id == "img-00000":
                    entered.set()
                    release.wait()
                return real_remove(image_id)

            local.blobs.remove = remove  # type: ignore[method-assign]
            first = asyncio.create_task(janitor.make_room("img-a", 100))
            try:
                await asyncio.to_thread(entered.wait)  # its eviction of img-00000 is under way
                # The second: not behind the first, and the first's 100 bytes are reserved: 300
                # + 100 + 200 is past 400, so two more entries go (not one: over-committed then).
                assert await janitor.make_room("img-b", 200)
                assert not first.done()
                assert "img-00000" not in local and "img-00001" not in local  # each its own
                assert "img-00002" not in local and local.reserved.keys() == {"img-a", "img-b"}
                assert not local.blobs.path("img-00001").exists()
                assert local.blobs.path("img-00000").exists()
            finally:
                release.set()
            assert await first
            assert local.total_entries == 1 and not local.blobs.path("img-00000").exists()
            assert local.metrics.evictions.labels("size")._value.get() == 3

    asyncio.run(main())


def test_hits_write_the_catalog_in_batches_and_reopen_no_blob(tmp_path: Path) -> None:
    seed(tmp_path, [entry(i, 100, float(i)) for i in range(3)])
    clock = Clock()

    async def main() -> None:
        async with l1(tmp_path, Policy("p"), clock) as local:
            calls = count_calls(local.catalog)
            opened = Counter[str]()
            real_open = local._open

            def open_blob(e: Entry) -> Any:
                opened[e.image_id] += 1
                return real_open(e)

            local._open = open_blob  # type: ignore[method-assign]
            for n in range(100):
                clock.now += 1
                hit = await local.lookup(f"img-{n % 2:05d}")
                assert hit is not None
                hit[1].close()
            assert calls == Counter()  # a hit writes nothing to the catalog ...
            assert opened == Counter({"img-00000": 1, "img-00001": 1})  # ... nor reopens a blob
            await local.flush()
            # One transaction for the hundred hits: a read and a write of each entry hit.
            assert calls == Counter(record_access=1, get=2, put=2)
            assert local.index.get("img-00001").last_access == clock.now  # type: ignore[union-attr]

    asyncio.run(main())

    async def reopened() -> None:
        async with l1(tmp_path, Policy("p"), clock) as local:
            held = {e.image_id: e for e in await local.entries()}
            assert held["img-00000"].hits == held["img-00001"].hits == 50
            assert held["img-00001"].last_access == clock.now
            assert held["img-00002"].hits == 0

    asyncio.run(reopened())


def blob_fds(root: Path) -> list[str]:
    """This process's descriptors open on blobs of ``root`` (unlinked ones included)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(root / "blobs")):
                found.append(fd)
    return found


def test_an_eviction_closes_the_blob_held_open_for_hits(tmp_path: Path) -> None:
    seed(tmp_path, [entry(0, 100, 1.0)])

    async def main() -> None:
        async with l1(tmp_path, Policy("p"), Clock()) as local:
            hit = await local.lookup("img-00000")
            assert hit is not None
            hit[1].close()
            assert len(blob_fds(tmp_path)) == 1  # held for the next hit
            assert await local.evict("img-00000", "requested") == 100
            assert blob_fds(tmp_path) == [] and not local.blobs.path("img-00000").exists()
            assert await local.lookup("img-00000") is None
            assert local.metrics.cache_bytes._value.get() == 0

    asyncio.run(main())

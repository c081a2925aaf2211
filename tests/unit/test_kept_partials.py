"""Partials kept for resuming (cachenode.journal) never hold the disk for long: the janitor counts
them as cache bytes, drops them after a day, and drops them before it evicts any entry for room.
A real L1 in a temporary folder; the janitor's clock is injected."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

from cachenode import journal
from cachenode.catalog import Entry
from cachenode.janitor import Janitor
from cachenode.local import Local, Partial
from cachenode.metrics import Metrics
from cachenode.policy import Policy
from cachenode.units import Size

MiB = 1 << 20
KEPT = "0a0a0a0a-0000-4000-8000-00000000000b"
CACHED = "0c0c0c0c-0000-4000-8000-00000000000d"


def leave_partial(root: Path, size: int) -> Path:
    """What a killed fill of KEPT leaves: a fallocated file and a journal naming its first MiB."""
    (root / "partial").mkdir(parents=True, exist_ok=True)
    path = root / "partial" / f"{KEPT}.0001"
    with path.open("wb") as f:
        f.truncate(size)
    record = journal.Record(KEPT, size, "sha512", hashlib.sha512(b"k").hexdigest(), ((0, MiB),))
    journal.path_for(path).write_bytes(journal.encode(record, 0))
    return path


async def cache(local: Local, image_id: str, size: int) -> None:
    part = Partial(image_id)
    await local.create_partial(part, size)
    assert part.fd is not None
    os.pwrite(part.fd, b"x" * size, 0)
    entry = Entry(image_id, size, "sha512", "0" * 128, None, "t", time.time(), time.time())
    await local.commit(part, entry)
    await local.discard(part)


def janitor(local: Local, clock: float | None = None) -> Janitor:
    return Janitor(local, local.policy, local.metrics, clock=lambda: clock or time.time())


def l1(root: Path, max_bytes: int = 100 * MiB) -> Local:
    policy = Policy(name="p", max_bytes=Size(max_bytes), min_free_disk=Size(0))
    return Local(root, Metrics(), policy)


def test_a_partial_goes_after_a_day(tmp_path: Path) -> None:
    path = leave_partial(tmp_path, 4 * MiB)

    async def main() -> None:
        local = l1(tmp_path)
        await local.start()
        assert set(local.kept) == {KEPT} and local.kept_bytes == 4 * MiB
        assert await janitor(local).sweep()
        assert path.exists()  # young, and within the policy: kept
        later = time.time() + journal.KEEP_FOR + 1
        assert await janitor(local, clock=later).sweep()
        assert local.kept == {} and not path.exists()
        assert not journal.path_for(path).exists()
        await local.stop()

    asyncio.run(main())


def test_a_partial_goes_before_any_entry_is_evicted_for_room(tmp_path: Path) -> None:
    path = leave_partial(tmp_path, 6 * MiB)

    async def main() -> None:
        local = l1(tmp_path, max_bytes=10 * MiB)
        await local.start()
        await cache(local, CACHED, 3 * MiB)
        keeper = janitor(local)
        assert await keeper.sweep()  # 9 MiB of 10: under the high watermark, nothing goes
        assert path.exists() and CACHED in local
        assert await keeper.make_room("new", 2 * MiB)  # over it with the partial: the partial goes
        assert not path.exists() and local.kept == {}
        assert CACHED in local
        await local.stop()

    asyncio.run(main())


def test_a_partial_is_dropped_at_start_once_its_image_is_cached(tmp_path: Path) -> None:
    async def main() -> None:
        local = l1(tmp_path)
        await local.start()
        await cache(local, KEPT, 4 * MiB)
        await local.stop()
        path = leave_partial(tmp_path, 4 * MiB)
        local = l1(tmp_path)
        await local.start()
        assert local.kept == {} and not path.exists()
        await local.stop()

    asyncio.run(main())

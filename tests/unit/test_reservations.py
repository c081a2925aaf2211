"""Fills in flight hold their room: the pure accounting (``policy.with_in_flight``), and the
janitor reserving, with a real L1 in a temporary folder, room that a fill gives back when it ends.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from cachenode.catalog import Entry
from cachenode.janitor import Janitor
from cachenode.local import Local, Partial
from cachenode.metrics import Metrics
from cachenode.policy import Policy, Usage, plan, with_in_flight
from cachenode.units import Size

MiB = 1 << 20
CAPACITY = 10_000
POLICY = Policy("p", max_bytes=Size(CAPACITY), high_watermark=1.0, low_watermark=1.0,
                min_free_disk=Size(0))  # fmt: skip


def entry(image_id: str, size: int, at: float = 0.0) -> Entry:
    return Entry(image_id, size, "sha512", "x", None, "t", at, at)


def test_in_flight_bytes_are_cache_bytes_and_pending_ones_not_free() -> None:
    usage = Usage(cache_bytes=100, disk_total=1000, disk_free=500)
    assert with_in_flight(usage, on_disk=30, pending=20) == Usage(150, 1000, 480)


def test_a_second_fill_is_refused_the_room_the_first_reserved() -> None:
    usage = Usage(cache_bytes=4000, disk_total=10**9, disk_free=10**9)
    assert plan([entry("a", 4000)], POLICY, usage, 0.0, needed=6000, pins={"a"}).fits
    reserved = with_in_flight(usage, on_disk=0, pending=6000)  # the first one's room
    second = plan([entry("a", 4000)], POLICY, reserved, 0.0, needed=1, pins={"a"})
    assert not second.fits and second.evictions == ()  # left out, never evicting for it


@settings(max_examples=200, deadline=None)
@given(
    cached=st.lists(st.integers(1, 3000), max_size=8),
    fills=st.lists(st.integers(1, 6000), min_size=1, max_size=8),
    pinned=st.integers(0, 8),
)
def test_committed_plus_reserved_never_passes_max_bytes(
    cached: list[int], fills: list[int], pinned: int
) -> None:
    """Fills start one after another, none committing: each plans with the room of those before
    it counted, evicts what its plan says and reserves on a yes. Whatever fits or not, what L1
    holds plus what is reserved stays within max_bytes (once it was within it)."""
    entries = {f"c{i}": entry(f"c{i}", size, float(i)) for i, size in enumerate(cached)}
    pins = {f"c{i}" for i in range(pinned)}
    if sum(e.size for e in entries.values()) > CAPACITY:
        return  # the invariant is kept from a cache within its policy on
    reserved = 0
    for needed in fills:
        committed = sum(e.size for e in entries.values())
        usage = with_in_flight(Usage(committed, 10**9, 10**9), on_disk=0, pending=reserved)
        result = plan(list(entries.values()), POLICY, usage, 0.0, needed, pins)
        for eviction in result.evictions:
            del entries[eviction.image_id]
        if result.fits:
            reserved += needed
        assert sum(e.size for e in entries.values()) + reserved <= CAPACITY


def l1(root: Path, max_bytes: int) -> Local:
    policy = Policy(name="p", max_bytes=Size(max_bytes), high_watermark=1.0, low_watermark=1.0,
                    min_free_disk=Size(0))  # fmt: skip
    return Local(root, Metrics(), policy)


def test_room_is_reserved_at_once_and_given_back_by_commit_and_discard(tmp_path: Path) -> None:
    """Three fills of 4 MiB ask together within 10 MiB: two get room, the third does not; a
    discarded fill gives its room back, a committed one turns it into its entry (evictable)."""

    async def main() -> None:
        local = l1(tmp_path, 10 * MiB)
        await local.start()
        janitor = Janitor(local, local.policy, local.metrics)
        asked = await asyncio.gather(*(janitor.make_room(i, 4 * MiB) for i in "abc"))
        assert sorted(asked) == [False, True, True]
        assert sum(r.size for r in local.reserved.values()) == 8 * MiB
        given = [i for i, ok in zip("abc", asked, strict=True) if ok]
        parts = {i: Partial(i) for i in given}
        for image_id, part in parts.items():
            await local.create_partial(part, 4 * MiB)
            assert local.reserved[image_id].on_disk
        assert local.in_flight() == (8 * MiB, 0)

        first, second = given
        await local.discard(parts[first])  # a failed fill: what Fills._run does at its end
        local.unreserve(first)
        # its room is free again (for an image none of the three: which one was refused is up
        # to the scheduling of the three make_room calls)
        assert await janitor.make_room("x", 4 * MiB)

        now = time.time()
        await local.commit(parts[second], Entry(second, 4 * MiB, "sha512", "x", None, "t",
                                                now, now))  # fmt: skip
        assert second not in local.reserved and local.total_bytes == 4 * MiB
        assert local.in_flight() == (0, 4 * MiB)  # x's room, not created yet
        await local.discard(parts[second])
        assert await janitor.make_room("d", 4 * MiB)  # the entry goes for it: x's room stays
        assert second not in local and local.in_flight() == (0, 8 * MiB)
        assert not await janitor.make_room("e", 4 * MiB)  # nothing left to evict for it
        assert local.reserved.keys() == {"x", "d"}
        await local.stop()

    asyncio.run(main())

"""Eviction plans: pure functions over catalog records, their invariants checked by hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachenode.catalog import Entry
from cachenode.errors import ConfigError
from cachenode.policy import (
    EVICTION_ORDER,
    ORDERS,
    Eviction,
    Plan,
    Policy,
    Selector,
    Usage,
    parse_policy,
    plan,
)
from cachenode.units import Size

NOW = 1_000_000.0
DISK = 100_000
IDS = [f"img-{i}" for i in range(25)]


@st.composite
def entries(draw: st.DrawFn) -> list[Entry]:
    count = draw(st.integers(0, 25))
    out = []
    for i in range(count):
        created = draw(st.floats(0, NOW))
        out.append(Entry(
            image_id=f"img-{i}", size=draw(st.integers(1, 1000)), hash_algo="sha512",
            hash_value="x",
            checksum=None, tier="t", created=created,
            last_access=draw(st.floats(created, NOW)), hits=draw(st.integers(0, 50)),
            tags=tuple(draw(st.sets(st.sampled_from(["golden", "gpu", "x"]), max_size=2))),
            properties={"os": draw(st.sampled_from(["ubuntu", "rhel"]))},
        ))  # fmt: skip
    return out


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    low = draw(st.floats(0.1, 1.0))
    high = draw(st.floats(low, 1.0))
    max_object = st.one_of(
        st.none(),
        st.builds(Size, st.integers(1, 3000)),
        st.builds(lambda f: Size(fraction=f), st.floats(0.001, 0.03)),  # of DISK
    )
    return Policy(
        name="p", order=draw(st.sampled_from(ORDERS)), max_bytes=Size(draw(st.integers(0, 20_000))),
        high_watermark=high, low_watermark=low, min_free_disk=Size(draw(st.integers(0, 5000))),
        max_idle=draw(st.one_of(st.none(), st.floats(1, NOW))),
        max_object_size=draw(max_object),
        pin=Selector(ids=tuple(draw(st.sets(st.sampled_from(IDS), max_size=4))),
                     tags=tuple(draw(st.sets(st.just("golden"), max_size=1))),
                     properties=tuple(draw(st.sets(st.just(("os", "rhel")), max_size=1)))),
    )  # fmt: skip


def pinned_ids(policy: Policy, cached: list[Entry]) -> set[str]:
    return {e.image_id for e in cached if policy.pin.matches(e.image_id, e.tags, e.properties)}


def size_target(policy: Policy, least: int) -> float:
    """Where eviction past high_watermark stops: the lowest mark that what must stay allows."""
    capacity = policy.max_bytes.bytes
    for mark in (policy.low_watermark, policy.high_watermark):
        if least <= capacity * mark:
            return capacity * mark
    return float(capacity)


@settings(max_examples=500)
@given(
    entries(), policies(), st.integers(0, 30_000), st.integers(0, 3000), st.sets(st.integers(0, 24))
)
def test_plans_keep_the_invariants(cached: list[Entry], policy: Policy, free: int, needed: int,
                                   runtime_pins: set[int]) -> None:  # fmt: skip
    pins = frozenset(f"img-{i}" for i in runtime_pins)
    total = sum(e.size for e in cached)
    usage = Usage(cache_bytes=total, disk_total=DISK, disk_free=free)
    result = plan(cached, policy, usage, NOW, needed=needed, pins=pins)
    evicted = [ev.image_id for ev in result.evictions]
    protected = pinned_ids(policy, cached) | pins
    by_id = {e.image_id: e for e in cached}
    evictable = set(by_id) - protected
    capacity, min_free = policy.max_bytes.bytes, policy.min_free_disk.bytes
    limit = policy.max_object_size.resolve(DISK) if policy.max_object_size else None
    admitted = limit is None or needed <= limit

    assert len(evicted) == len(set(evicted))  # each at most once
    assert not set(evicted) & protected  # a pinned image is never evicted
    assert all(ev.size == by_id[ev.image_id].size for ev in result.evictions)
    freed = sum(ev.size for ev in result.evictions)
    room_after = total - freed + needed <= capacity and free + freed - needed >= min_free
    assert result.fits == (room_after and (admitted or not needed))

    if needed:
        # Room is found whenever some exists with every evictable entry gone ...
        room = sum(by_id[i].size for i in evictable)
        possible = total - room + needed <= capacity and free + room - needed >= min_free
        assert result.fits == (possible and admitted)
        if not result.fits:  # ... and an image that cannot be cached costs nothing
            assert result.evictions == ()
            return
    elif not result.fits:  # housekeeping does what it can: everything it may evict goes
        assert set(evicted) == evictable
    if policy.max_idle is not None:  # idle ones always go, unless pinned
        idle = {e.image_id for e in cached if NOW - e.last_access > policy.max_idle} - protected
        assert idle <= set(evicted)
    assert_by_order_and_no_more(policy, by_id, evictable, result.evictions, free, needed)


def assert_by_order_and_no_more(
    policy: Policy,
    by_id: dict[str, Entry],
    evictable: set[str],
    evictions: tuple[Eviction, ...],
    free: int,
    needed: int,
) -> None:
    """Beyond idle ones, evictions follow the policy's order and stop once the targets are met."""
    key = EVICTION_ORDER[policy.order]
    idle = [ev for ev in evictions if ev.reason == "idle"]
    ordered = [ev for ev in evictions if ev.reason != "idle"]
    assert evictions == (*idle, *ordered)
    kept = [by_id[i] for i in evictable - {ev.image_id for ev in evictions}]
    for ev in ordered:  # nothing evictable that ranks before an evicted entry stays
        assert all(key(e) >= key(by_id[ev.image_id]) for e in kept)

    idle_bytes = sum(ev.size for ev in idle)
    total = sum(e.size for e in by_id.values()) - idle_bytes  # once the idle ones are gone
    free += idle_bytes
    staying = total - (sum(by_id[i].size for i in evictable) - idle_bytes)  # pinned bytes
    capacity, min_free = policy.max_bytes.bytes, policy.min_free_disk.bytes
    past_high = total + needed > capacity * policy.high_watermark
    target = size_target(policy, staying + needed) if past_high else float("inf")
    freed = sum(ev.size for ev in ordered)
    if total - freed + needed <= capacity and free + freed - needed >= min_free:
        assert total - freed + needed <= target  # under the lowest mark it could reach
    if ordered:  # and not one eviction more: without the last, a target would still be missed
        before = freed - ordered[-1].size
        assert total - before + needed > target or free + before - needed < min_free


def entry(name: str, size: int, created: float, last: float, hits: int = 0) -> Entry:
    return Entry(name, size, "sha512", "x", None, "t", created, last, hits)


def test_an_image_that_cannot_fit_evicts_nothing() -> None:
    cached = [entry(f"img-{i}", 300, i, i) for i in range(3)]
    policy = Policy("p", max_bytes=Size(1000), high_watermark=0.9, low_watermark=0.5,
                    min_free_disk=Size(0), pin=Selector(ids=("img-2",)))  # fmt: skip
    usage = Usage(cache_bytes=900, disk_total=10_000, disk_free=9_000)
    assert plan(cached, policy, usage, NOW, needed=701) == Plan((), fits=False)  # 300 pinned
    fits = plan(cached, policy, usage, NOW, needed=700)
    assert fits.fits and [ev.image_id for ev in fits.evictions] == ["img-0", "img-1"]
    small = plan(cached, policy, usage, NOW, needed=100)  # 900 + 100 past 900: down to 500
    assert small.fits and [ev.image_id for ev in small.evictions] == ["img-0", "img-1"]
    full_disk = Usage(cache_bytes=900, disk_total=10_000, disk_free=500)
    assert plan(cached, policy, full_disk, NOW, needed=1101) == Plan((), fits=False)

    capped = Policy("p", max_bytes=Size(1000), min_free_disk=Size(0), max_object_size=Size(99))
    assert plan(cached, capped, usage, NOW, needed=100) == Plan((), fits=False)
    assert plan(cached, capped, usage, NOW, needed=99).fits
    assert not capped.admits(100, 10_000) and capped.admits(99, 10_000)
    percent = Policy("p", max_object_size=Size(fraction=0.01))
    assert percent.admits(100, 10_000) and not percent.admits(101, 10_000)


def test_pins_above_the_low_watermark_do_not_empty_the_cache() -> None:
    cached = [entry("pinned", 700, 0, 0), *(entry(f"img-{i}", 50, i, i) for i in range(1, 5))]
    policy = Policy("p", max_bytes=Size(1000), high_watermark=0.9, low_watermark=0.5,
                    min_free_disk=Size(0), pin=Selector(ids=("pinned",)))  # fmt: skip
    usage = Usage(cache_bytes=900, disk_total=10_000, disk_free=9_000)
    # 900 + 100 is past high (900); low (500) is out of reach with 700 pinned, high is not.
    result = plan(cached, policy, usage, NOW, needed=100)
    assert result.fits and [ev.image_id for ev in result.evictions] == ["img-1", "img-2"]
    housekeeping = plan(cached, policy, usage, NOW)  # 900 is not past high: nothing to do
    assert housekeeping == Plan((), fits=True)


def test_max_object_size_is_read_and_checked() -> None:
    assert parse_policy({}, "p").max_object_size is None
    assert parse_policy({"max_object_size": "10GiB"}, "p").max_object_size == Size(10 << 30)
    assert parse_policy({"max_object_size": "5%"}, "p").max_object_size == Size(fraction=0.05)
    for bad, message in [(0, "must be more than 0"), ("0%", "must be more than 0"),
                         ("big", "not a size"), (-1, "cannot be negative")]:  # fmt: skip
        with pytest.raises(ConfigError, match=f"^max_object_size: .*{message}"):
            parse_policy({"max_object_size": bad}, "p")


def test_orders_pick_who_goes_first() -> None:
    cached = [
        entry("old-big", 500, 1, 90, 9),
        entry("new-small", 100, 50, 60, 1),
        entry("mid", 300, 20, 95, 3),
    ]
    usage = Usage(cache_bytes=900, disk_total=10_000, disk_free=9_000)
    first = {}
    for order in ORDERS:
        policy = Policy("p", order=order, max_bytes=Size(1000), high_watermark=0.5,
                        low_watermark=0.5, min_free_disk=Size(0))  # fmt: skip
        first[order] = plan(cached, policy, usage, NOW).evictions[0].image_id
    assert first == {
        "lru": "new-small",
        "lfu": "new-small",
        "largest": "old-big",
        "fifo": "old-big",
    }

"""Eviction plans: pure functions over catalog records, their invariants checked by hypothesis."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cachenode.catalog import Entry
from cachenode.policy import EVICTION_ORDER, ORDERS, Policy, Selector, Usage, plan
from cachenode.units import Size

NOW = 1_000_000.0
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
    return Policy(
        name="p", order=draw(st.sampled_from(ORDERS)), max_bytes=Size(draw(st.integers(0, 20_000))),
        high_watermark=high, low_watermark=low, min_free_disk=Size(draw(st.integers(0, 5000))),
        max_idle=draw(st.one_of(st.none(), st.floats(1, NOW))),
        pin=Selector(ids=tuple(draw(st.sets(st.sampled_from(IDS), max_size=4))),
                     tags=tuple(draw(st.sets(st.just("golden"), max_size=1))),
                     properties=tuple(draw(st.sets(st.just(("os", "rhel")), max_size=1)))),
    )  # fmt: skip


def pinned_ids(policy: Policy, cached: list[Entry]) -> set[str]:
    return {e.image_id for e in cached if policy.pin.matches(e.image_id, e.tags, e.properties)}


@settings(max_examples=300)
@given(
    entries(), policies(), st.integers(0, 30_000), st.integers(0, 3000), st.sets(st.integers(0, 24))
)
def test_plans_keep_the_invariants(cached: list[Entry], policy: Policy, free: int, needed: int,
                                   runtime_pins: set[int]) -> None:  # fmt: skip
    pins = frozenset(f"img-{i}" for i in runtime_pins)
    total = sum(e.size for e in cached)
    usage = Usage(cache_bytes=total, disk_total=100_000, disk_free=free)
    result = plan(cached, policy, usage, NOW, needed=needed, pins=pins)
    evicted = [ev.image_id for ev in result.evictions]
    protected = pinned_ids(policy, cached) | pins

    assert len(evicted) == len(set(evicted))  # each at most once
    assert not set(evicted) & protected  # a pinned image is never evicted
    by_id = {e.image_id: e for e in cached}
    assert all(ev.size == by_id[ev.image_id].size for ev in result.evictions)
    after_total = total - sum(ev.size for ev in result.evictions)
    after_free = free + sum(ev.size for ev in result.evictions)
    capacity = policy.max_bytes.bytes
    assert result.fits == (
        after_total + needed <= capacity and after_free - needed >= policy.min_free_disk.bytes
    )
    everything = set(evicted) == set(by_id) - protected
    idle_bytes = sum(ev.size for ev in result.evictions if ev.reason == "idle")
    if total - idle_bytes + needed > capacity * policy.high_watermark:  # past high: back under low
        assert after_total + needed <= capacity * policy.low_watermark or everything
    if not result.fits:  # it could only fail to make room by evicting everything it may
        assert set(evicted) == set(by_id) - protected
    if policy.max_idle is not None:  # idle ones always go, unless pinned
        idle = {e.image_id for e in cached if NOW - e.last_access > policy.max_idle} - protected
        assert idle <= set(evicted)
    for ev in result.evictions:
        if ev.reason == "size":  # by the policy's order: nothing unpinned ranked before it stays
            key = EVICTION_ORDER[policy.order](by_id[ev.image_id])
            kept = [e for e in cached if e.image_id not in set(evicted) | protected]
            assert all(EVICTION_ORDER[policy.order](e) >= key for e in kept)


def test_orders_pick_who_goes_first() -> None:
    def entry(name: str, size: int, created: float, last: float, hits: int) -> Entry:
        return Entry(name, size, "sha512", "x", None, "t", created, last, hits)

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

"""L1's index: its plans are the pure function's, and cost what they evict, not what L1 holds."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from hypothesis import given, settings
from hypothesis import strategies as st

from cachenode.catalog import Entry
from cachenode.index import Index, _touched
from cachenode.policy import ORDERS, Policy, Selector, Usage, plan, plan_over
from cachenode.units import Size

NOW = 1_000_000.0
DISK = 10**9


def entry(i: int, size: int, created: float, last: float, hits: int = 0) -> Entry:
    tags = ("golden",) if i % 7 == 3 else ()
    return Entry(f"img-{i:05d}", size, "sha512", "x", None, "t", created, last, hits, tags)


@st.composite
def catalogs(draw: st.DrawFn) -> list[Entry]:
    """Entries with distinct creation and access times: every order is total, so the index
    and the pure function must choose exactly the same entries."""
    count = draw(st.integers(0, 30))
    created = draw(st.lists(st.integers(0, 10**6), min_size=count, max_size=count, unique=True))
    used = draw(st.lists(st.integers(0, 10**6), min_size=count, max_size=count, unique=True))
    return [
        entry(i, draw(st.integers(1, 1000)), float(c), float(10**6 + u), draw(st.integers(0, 9)))
        for i, (c, u) in enumerate(zip(created, used, strict=True))
    ]


@settings(max_examples=300)
@given(
    catalogs(),
    st.sampled_from(ORDERS),
    st.one_of(st.none(), st.floats(1, NOW)),
    st.lists(st.tuples(st.sampled_from(["touch", "pin", "unpin", "remove"]), st.integers(0, 29))),
    st.integers(0, 20_000),
    st.integers(0, 3000),
)
def test_the_index_plans_as_the_policy_says(
    cached: list[Entry],
    order: str,
    max_idle: float | None,
    ops: list[tuple[str, int]],
    capacity: int,
    needed: int,
) -> None:
    policy = Policy("p", order=order, max_bytes=Size(capacity), high_watermark=0.9,
                    low_watermark=0.7, min_free_disk=Size(0), max_idle=max_idle,
                    pin=Selector(tags=("golden",)))  # fmt: skip
    index = Index(policy)
    index.load(cached, pins={"img-00001"})
    clock = iter(range(3 * 10**6, 4 * 10**6))
    for op, i in ops:
        image_id = f"img-{i:05d}"
        if op == "touch":
            index.touch(image_id, float(next(clock)))
        elif op == "pin":
            index.pin(image_id)
        elif op == "unpin":
            index.unpin(image_id)
        else:
            index.remove(image_id)
    held = index.entries()
    assert index.total_bytes == sum(e.size for e in held)
    usage = Usage(cache_bytes=index.total_bytes, disk_total=DISK, disk_free=DISK // 2)
    now = 5 * 10**6
    expected = plan(held, policy, usage, now, needed, index.pins)
    assert plan_over(index, policy, usage, now, needed) == expected


class Counting:
    """An index whose walks count the entries they hand out."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.read = 0
        self.evictable_bytes = index.evictable_bytes

    def _count(self, entries: Iterator[Entry]) -> Iterator[Entry]:
        for e in entries:
            self.read += 1
            yield e

    def in_order(self) -> Iterator[Entry]:
        return self._count(self.index.in_order())

    def least_recent(self) -> Iterator[Entry]:
        return self._count(self.index.least_recent())


def test_a_plan_reads_what_it_evicts_whatever_the_catalog_holds() -> None:
    """Ten evictions out of 100 or out of 10,000 entries read the same dozen entries."""
    reads = {}
    for count in (100, 10_000):
        policy = Policy("p", max_bytes=Size(count * 100), high_watermark=1.0, low_watermark=0.99,
                        min_free_disk=Size(0), max_idle=30 * 86400.0)  # fmt: skip
        index = Index(policy)
        index.load((entry(i, 100, float(i), NOW - count + i) for i in range(count)), ())
        walks = Counting(index)
        needed = count  # 1% of max_bytes: down to 99% with it, so `needed` bytes + 1% go
        result = plan_over(walks, policy, Usage(index.total_bytes, DISK, DISK), NOW, needed)
        evicted = len(result.evictions)
        assert result.fits and evicted == count // 100 * 2  # its own room and the 1% margin
        reads[count] = walks.read - evicted
    assert reads[100] == reads[10_000] <= 3  # the entry that stops each walk, no more


def test_an_image_that_cannot_fit_reads_no_entry() -> None:
    policy = Policy("p", max_bytes=Size(1_000_000), min_free_disk=Size(0))
    index = Index(policy)
    index.load((entry(i, 100, float(i), float(i)) for i in range(10_000)), ())
    walks = Counting(index)
    usage = Usage(index.total_bytes, DISK, DISK)
    assert not plan_over(walks, policy, usage, NOW, needed=2_000_000).fits
    assert walks.read == 0


def test_pinned_entries_are_not_walked() -> None:
    policy = Policy("p", max_bytes=Size(10_000), high_watermark=0.5, low_watermark=0.5,
                    min_free_disk=Size(0), pin=Selector(tags=("golden",)))  # fmt: skip
    index = Index(policy)
    index.load((entry(i, 100, float(i), float(i)) for i in range(100)), pins={"img-00000"})
    walked = [e.image_id for e in index.in_order()]
    assert "img-00000" not in walked and "img-00003" not in walked  # runtime pin, golden tag
    index.unpin("img-00000")
    assert next(index.in_order()).image_id == "img-00000"
    index.touch("img-00000", NOW)
    assert next(index.in_order()).image_id == "img-00001"  # lru: touched, now the last
    assert [e.image_id for e in index.in_order()][-1] == "img-00000"


def test_a_hit_copies_every_field_of_the_entry() -> None:
    """``_touched`` copies an entry by hand (for speed): every field, one added later included,
    comes through as it was, and only the access time and the hit count change. Each field in
    turn holds a value no default can equal, so a copy that leaves one out fails here."""
    base = entry(1, 100, 1.0, 2.0, hits=4)
    for f in dataclasses.fields(Entry):
        if f.name in ("last_access", "hits"):
            continue
        marked = dataclasses.replace(base, **{f.name: object()})
        expected = dataclasses.replace(marked, last_access=NOW, hits=5)
        assert _touched(marked, NOW) == expected, f.name

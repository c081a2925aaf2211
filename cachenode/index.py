"""L1's index in memory: every entry, its pin state, and the orders eviction walks.

The catalog is read once, at start; from then on a hit, a plan and a listing read this index
and never SQLite. A hit updates the entry's ``last_access`` and ``hits`` here and marks it
dirty; ``cachenode.local`` writes dirty entries to the catalog in batches (a crash loses at most
the access times of the last batch, never an entry).

Eviction walks sorted lists of the evictable entries only (pinned ones are kept out of them), in
the policy's order and, for ``max_idle``, by last access: a plan that evicts k entries reads
about k of them, whatever the size of the catalog. ``sortedcontainers`` keeps each list sorted
at O(log n) an insertion; a heap would have to be popped to be walked, and a plan that finds no
room must leave the order as it was.

A hit does not move its entry in those lists at once: that was most of what a hit cost the index
(two sorted-list operations an order, at 10,000 entries) while nothing reads the orders but a plan.
The entry as it is ranked is noted (``_moved``, once per entry however often it is hit) and every
moved entry takes its place before anything reads or changes the orders (``_settle``): a plan sees
exactly the order it would have seen, and an image hit a thousand times between two plans moves
once.

Not thread-safe: it lives on the event loop, and only there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from sortedcontainers import SortedList

from cachenode.catalog import Entry
from cachenode.policy import EVICTION_ORDER, Policy, is_pinned

_Rank = tuple[tuple[float, ...], str]


class Index:
    """The entries of L1 by image id, with ``cachenode.policy.Candidates`` for ``plan_over``."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._clear()

    def _clear(self) -> None:
        self.total_bytes = 0
        self.evictable_bytes = 0
        self._entries: dict[str, Entry] = {}
        self._pins: set[str] = set()
        self._dirty: set[str] = set()
        self._moved: dict[str, Entry] = {}  # touched evictable entries, as they are ranked
        # The policy's order, and last access for max_idle when that is another order.
        order = self.policy.order
        orders = {order, "lru"} if self.policy.max_idle is not None else {order}
        self._orders: dict[str, SortedList] = {name: SortedList() for name in orders}

    def load(self, entries: Iterable[Entry], pins: Iterable[str]) -> None:
        self._clear()
        self._pins = set(pins)
        for entry in entries:
            self.add(entry)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, image_id: str) -> Entry | None:
        return self._entries.get(image_id)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    @property
    def pins(self) -> frozenset[str]:
        return frozenset(self._pins)

    def add(self, entry: Entry) -> None:
        """Hold ``entry``, in place of any entry of the same image."""
        self.remove(entry.image_id)  # settles
        self._entries[entry.image_id] = entry
        self.total_bytes += entry.size
        if not is_pinned(self.policy, entry, self._pins):
            self._rank(entry)

    def remove(self, image_id: str) -> Entry | None:
        self._settle()
        entry = self._entries.pop(image_id, None)
        if entry is None:
            return None
        self.total_bytes -= entry.size
        self._dirty.discard(image_id)
        if not is_pinned(self.policy, entry, self._pins):
            self._unrank(entry)
        return entry

    def touch(self, image_id: str, now: float) -> None:
        """One more hit of ``image_id``, at ``now``; written to the catalog by the next flush."""
        entry = self._entries.get(image_id)
        if entry is None:
            return
        if image_id not in self._moved and not is_pinned(self.policy, entry, self._pins):
            self._moved[image_id] = entry  # ranked as it is now until the next _settle
        self._entries[image_id] = _touched(entry, now)
        self._dirty.add(image_id)

    def pin(self, image_id: str) -> None:
        self._settle()
        entry = self._entries.get(image_id)
        if entry is not None and not is_pinned(self.policy, entry, self._pins):
            self._unrank(entry)
        self._pins.add(image_id)

    def unpin(self, image_id: str) -> None:
        if image_id not in self._pins:
            return
        self._settle()
        self._pins.discard(image_id)
        entry = self._entries.get(image_id)
        if entry is not None and not is_pinned(self.policy, entry, self._pins):
            self._rank(entry)

    def take_dirty(self) -> list[Entry]:
        """The entries touched since the last call, as they are now; they are clean after it."""
        dirty = [self._entries[i] for i in self._dirty]
        self._dirty.clear()
        return dirty

    def mark_dirty(self, entries: Iterable[Entry]) -> None:
        """Entries a flush could not write: the next flush tries again (if they are still held)."""
        self._dirty.update(e.image_id for e in entries if e.image_id in self._entries)

    # -- cachenode.policy.Candidates
    def in_order(self) -> Iterator[Entry]:
        return self._walk(self.policy.order)

    def least_recent(self) -> Iterator[Entry]:
        return self._walk("lru")

    def _walk(self, order: str) -> Iterator[Entry]:
        self._settle()
        for _, image_id in self._orders[order]:
            yield self._entries[image_id]

    def _settle(self) -> None:
        """Every entry hit since the last call to its place in the orders (see the module)."""
        for image_id, ranked in self._moved.items():
            now = self._entries[image_id]
            for order, entries in self._orders.items():
                before, after = _rank(order, ranked), _rank(order, now)
                if before != after:
                    entries.remove(before)
                    entries.add(after)
        self._moved.clear()

    def _rank(self, entry: Entry) -> None:
        self.evictable_bytes += entry.size
        for order, ranked in self._orders.items():
            ranked.add(_rank(order, entry))

    def _unrank(self, entry: Entry) -> None:
        self.evictable_bytes -= entry.size
        for order, ranked in self._orders.items():
            ranked.remove(_rank(order, entry))


def _rank(order: str, entry: Entry) -> _Rank:
    """Where ``entry`` sorts in ``order``; the image id makes every rank distinct."""
    return EVICTION_ORDER[order](entry), entry.image_id


def _touched(entry: Entry, now: float) -> Entry:
    """``dataclasses.replace(entry, last_access=now, hits=entry.hits + 1)``, by hand: every hit
    makes one. ``replace`` gathers the fields one by one and runs ``__init__`` (a frozen
    dataclass's sets each field through ``object.__setattr__``): about 2.5 µs a call against
    0.5 µs here (CPython 3.11, an Entry with tags and properties, timeit): 2 µs more per hit,
    about 1% of the CPU time a small hit costs the sidecar (README, performance). ``__dict__``
    holds every field, so a field added to Entry is copied too (tests/unit/test_index.py checks
    each one)."""
    fields = dict(entry.__dict__, last_access=now, hits=entry.hits + 1)
    touched: Entry = object.__new__(Entry)
    touched.__dict__.update(fields)
    return touched

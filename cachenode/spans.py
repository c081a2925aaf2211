"""Sets of byte ranges: which parts of an image are still missing, which have been written.

Pure arithmetic over half-open spans [start, end), kept sorted and disjoint; no I/O.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator


class Spans:
    """Disjoint half-open byte ranges, sorted, merged where they touch."""

    def __init__(self, spans: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in spans:
            self.add(start, end)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._starts, self._ends, strict=True))

    def __repr__(self) -> str:
        return f"Spans({list(self)})"

    @property
    def total(self) -> int:
        return sum(e - s for s, e in self)

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        i = bisect.bisect_left(self._ends, start)  # first span that ends at or after start
        j = bisect.bisect_right(self._starts, end)  # spans before j start at or before end
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def discard(self, start: int, end: int) -> None:
        if start >= end:
            return
        i = bisect.bisect_right(self._ends, start)  # first span that ends after start
        j = bisect.bisect_left(self._starts, end)  # spans before j start before end
        if i >= j:
            return
        keep: list[tuple[int, int]] = []
        if self._starts[i] < start:
            keep.append((self._starts[i], start))
        if self._ends[j - 1] > end:
            keep.append((end, self._ends[j - 1]))
        self._starts[i:j] = [s for s, _ in keep]
        self._ends[i:j] = [e for _, e in keep]

    def take(self, limit: int) -> tuple[int, int] | None:
        """Remove and return the lowest span, cut to at most ``limit`` bytes."""
        if not self._starts:
            return None
        start = self._starts[0]
        end = min(self._ends[0], start + limit)
        self.discard(start, end)
        return start, end

    def overlapping(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) that are in the set."""
        i = bisect.bisect_right(self._ends, start)
        j = bisect.bisect_left(self._starts, end)
        return [
            (max(s, start), min(e, end))
            for s, e in zip(self._starts[i:j], self._ends[i:j], strict=True)
        ]

    def end_of_run(self, start: int) -> int:
        """Where the span containing ``start`` ends; ``start`` itself when no span contains it."""
        i = bisect.bisect_right(self._starts, start) - 1
        if i >= 0 and self._ends[i] > start:
            return self._ends[i]
        return start

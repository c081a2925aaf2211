"""How much each tier is asked at once: ``max_fills`` and ``max_rate`` (SPEC §4).

A fill reading from a tier holds one of the tier's slots for as long as it reads from it (one slot
per fill, however many ``parallel`` requests it has open), and pays every chunk it receives into
the tier's bucket of ``max_rate`` bytes a second, shared by every fill reading from the tier.

Two priorities. A fill someone is waiting for (``CALLER``: a boot's miss) comes first; a warm
(nobody is waiting) takes only what callers leave:

- slots: a warm never takes a tier's last free slot, so a caller's miss finds one unless callers
  hold them all. A tier with ``max_fills: 1`` is therefore never warmed from.
- rate: a caller's chunk is counted at once and the caller sleeps off the debt it made; a warm's
  chunk waits until no caller is waiting on the bucket and the bucket stays at least half full
  after it, so a caller arriving finds a chunk's worth of tokens, never a debt a warm left.
- a caller joining a warm's fill raises it to ``CALLER`` (``Ticket``): a boot's miss is never
  queued behind a warm, even when it is the warm's own image.

What a fill does when no slot is free is decided in one place, ``Limits.admission``: a warm
waits; a fill that has bytes on disk (its readers may have their headers) waits; a caller's fill
with nothing yet does not wait, it is passed to Glance (the README says why).

The bucket's clock and sleep are injectable: its arithmetic is tested without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass

from cachenode.config import TierConfig
from cachenode.errors import TiersBusy
from cachenode.metrics import Metrics

BURST_SECONDS = 0.1  # a bucket holds this much of its rate ...
MIN_BURST = 2 << 20  # ... and at least two fill chunks (cachenode.tiers.http.READ_SIZE)


class Priority(enum.Enum):
    CALLER = "caller"
    WARM = "warm"


@dataclass
class Ticket:
    """One fill's standing with the limits: its priority (raised when a caller joins a warm) and
    whether it is queued for a slot (shown by the admin API)."""

    priority: Priority = Priority.CALLER
    queued: bool = False


class Slots:
    """``limit`` fills at a time (None: any number); the last free one is never a warm's."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.in_use = 0

    def free(self, priority: Priority) -> bool:
        if self.limit is None:
            return True
        keep = 1 if priority is Priority.WARM else 0
        return self.limit - self.in_use > keep

    @property
    def warmable(self) -> bool:
        """Whether a warm can ever get a slot here."""
        return self.limit is None or self.limit > 1

    def take(self, priority: Priority) -> bool:
        if not self.free(priority):
            return False
        self.in_use += 1
        return True

    def give_back(self) -> None:
        assert self.in_use > 0, "a slot given back that was never taken"
        self.in_use -= 1


def burst(rate: float) -> float:
    """The depth of a bucket of ``rate`` bytes a second."""
    return max(rate * BURST_SECONDS, MIN_BURST)


class Bucket:
    """A token bucket of ``rate`` bytes a second, ``capacity`` deep, with two priorities.

    Chunks are paid for after they arrived (their size is known only then): the wait keeps the
    next read back. Over any span of time a tier so sends at most ``rate`` times it, plus the
    capacity, plus the one chunk each of its requests has in hand.
    """

    def __init__(
        self,
        rate: float,
        capacity: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError("a bucket needs a positive rate and capacity")
        self.rate = rate
        self.capacity = capacity
        self.clock = clock
        self.sleep = sleep
        self.tokens = capacity
        self._stamp = clock()
        self._callers_waiting = 0

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def take(self, nbytes: int, ticket: Ticket) -> float:
        """Count ``nbytes`` against the rate, waiting as long as the ticket's priority requires
        (read again while a warm waits: a caller joining it must not wait behind other callers
        for the bucket to be idle); the seconds waited."""
        started = self.clock()
        if not await self._after_callers(nbytes, ticket):
            self._refill()
            self.tokens -= nbytes
            if self.tokens < 0:
                self._callers_waiting += 1
                try:
                    await self.sleep(-self.tokens / self.rate)
                finally:
                    self._callers_waiting -= 1
        return self.clock() - started

    async def _after_callers(self, nbytes: int, ticket: Ticket) -> bool:
        """A warm's payment: only from tokens no caller is waiting for, leaving half the bucket.
        False, nothing paid, once the ticket is (or becomes) a caller's."""
        half = self.capacity / 2
        need = min(nbytes, half) + half
        while ticket.priority is Priority.WARM:
            self._refill()
            if self._callers_waiting == 0 and self.tokens >= need:
                self.tokens -= nbytes
                return True
            # While callers wait, look again after one of their chunks could have been paid.
            short = need - self.tokens if self._callers_waiting == 0 else min(nbytes, half)
            await self.sleep(short / self.rate)
        return False


@dataclass
class _TierLimit:
    slots: Slots
    bucket: Bucket | None


class Limits:
    """Every tier's slots and bucket, and the one rule for a fill that finds no slot free."""

    def __init__(
        self,
        tiers: Iterable[TierConfig],
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.metrics = metrics
        self._tiers = {
            t.name: _TierLimit(
                Slots(t.max_fills),
                Bucket(t.max_rate, burst(t.max_rate), clock, sleep) if t.max_rate else None,
            )
            for t in tiers
        }
        self._changed = asyncio.Event()

    def free(self, tier: str, priority: Priority) -> bool:
        return self._tiers[tier].slots.free(priority)

    def in_use(self, tier: str) -> int:
        return self._tiers[tier].slots.in_use

    @contextlib.contextmanager
    def slot(self, tier: str, priority: Priority) -> Iterator[bool]:
        """Hold one of the tier's slots for the block, if one is free for ``priority`` (yields
        whether it is). Taking never awaits, so a slot seen free is the slot taken."""
        slots = self._tiers[tier].slots
        if not slots.take(priority):
            yield False
            return
        try:
            yield True
        finally:
            slots.give_back()
            self.poke()

    def poke(self) -> None:
        """Wake every fill waiting for a slot: one was given back, or a fill's priority rose."""
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def admission(self, tiers: list[str], ticket: Ticket, may_wait: bool) -> None:
        """Return once one of ``tiers`` has a slot for the ticket's priority.

        Raises TiersBusy instead of waiting when the fill is a caller's that may not wait (it
        has nothing on disk yet: Glance serves the caller at once), or a warm whose tiers all
        keep their one slot for callers (it would wait for ever).
        """
        while tiers and not any(self.free(t, ticket.priority) for t in tiers):
            if ticket.priority is Priority.CALLER and not may_wait:
                raise TiersBusy(f"every tier is at max_fills ({', '.join(tiers)})")
            if ticket.priority is Priority.WARM and not any(
                self._tiers[t].slots.warmable for t in tiers
            ):
                raise TiersBusy(f"no tier may be warmed from: max_fills 1 ({', '.join(tiers)})")
            ticket.queued = True
            try:
                await self._changed.wait()
            finally:
                ticket.queued = False

    async def pay(self, tier: str, nbytes: int, ticket: Ticket) -> None:
        """Count ``nbytes`` received from ``tier`` against its max_rate, waiting as needed."""
        bucket = self._tiers[tier].bucket
        if bucket is None:
            return
        waited = await bucket.take(nbytes, ticket)
        if waited > 0:
            self.metrics.tier_rate_limited.labels(tier).inc(waited)

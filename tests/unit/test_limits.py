"""A tier's limits without a socket and without sleeping: slots with a caller's reserve, and a
token bucket whose clock moves only when every task is asleep (``VirtualTime``)."""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Coroutine
from typing import Any

import pytest

from cachenode.config import TierConfig
from cachenode.errors import TiersBusy
from cachenode.limits import Bucket, Limits, Priority, Slots, Ticket, burst
from cachenode.metrics import Metrics

MiB = 1 << 20
CALLER, WARM = Priority.CALLER, Priority.WARM


class VirtualTime:
    """A clock for a few tasks: when all of them sleep, it jumps to the earliest wake-up."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds > 0, "a zero sleep would spin"
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, self._seq, future))
        self._seq += 1
        await future

    def run(self, *coros: Coroutine[Any, Any, Any]) -> list[Any]:
        async def main() -> list[Any]:
            tasks = [asyncio.ensure_future(c) for c in coros]
            while not all(t.done() for t in tasks):
                for _ in range(20):  # every task that can run, runs until it sleeps
                    await asyncio.sleep(0)
                if all(t.done() for t in tasks):
                    break
                assert self._sleepers, "tasks wait for something other than time"
                wake, _, future = heapq.heappop(self._sleepers)
                self.now = max(self.now, wake)
                future.set_result(None)
            return [t.result() for t in tasks]

        return asyncio.run(main())


def stream(
    bucket: Bucket, chunks: int, priority: Priority, log: list[tuple[float, float]]
) -> Coroutine[Any, Any, float]:
    """Pay ``chunks`` chunks of 1 MiB back to back; log (time paid, seconds waited)."""

    async def run() -> float:
        waited = 0.0
        for _ in range(chunks):
            w = await bucket.take(MiB, Ticket(priority))
            waited += w
            log.append((bucket.clock(), w))
        return waited

    return run()


def test_slots_keep_the_last_one_for_callers() -> None:
    two = Slots(2)
    assert two.take(WARM) and not two.take(WARM)  # the last slot is not a warm's
    assert two.take(CALLER) and not two.take(CALLER)
    two.give_back()
    assert not two.free(WARM) and two.free(CALLER)
    one = Slots(1)
    assert not one.warmable and not one.take(WARM) and one.take(CALLER)
    unlimited = Slots(None)
    assert all(unlimited.take(WARM) for _ in range(100)) and unlimited.warmable


def test_burst_is_a_tenth_of_a_second_but_at_least_two_chunks() -> None:
    assert burst(500e6) == 50e6
    assert burst(1e6) == 2 * MiB


def test_a_caller_alone_gets_exactly_the_rate_after_the_burst() -> None:
    time = VirtualTime()
    bucket = Bucket(MiB, 2 * MiB, time.clock, time.sleep)
    log: list[tuple[float, float]] = []
    (waited,) = time.run(stream(bucket, 10, CALLER, log))
    # 10 MiB at 1 MiB/s with 2 MiB in the bucket: the last chunk is paid at 8 s, all of it waiting
    assert time.now == pytest.approx(8.0) and waited == pytest.approx(8.0)
    assert [w for _, w in log[:2]] == [0, 0]  # the burst


def test_callers_share_the_rate() -> None:
    time = VirtualTime()
    bucket = Bucket(MiB, 2 * MiB, time.clock, time.sleep)
    a: list[tuple[float, float]] = []
    b: list[tuple[float, float]] = []
    time.run(stream(bucket, 10, CALLER, a), stream(bucket, 10, CALLER, b))
    assert time.now == pytest.approx(18.0)  # 20 MiB - 2 MiB of burst, at 1 MiB/s
    # The first one had the burst; from then on, while both want more, they alternate.
    assert [t for t, _ in a] == [0, 0, 1, 3, 5, 7, 9, 11, 13, 15]
    assert [t for t, _ in b] == [2, 4, 6, 8, 10, 12, 14, 16, 17, 18]


def test_a_warm_takes_nothing_while_a_caller_wants_the_whole_rate() -> None:
    time = VirtualTime()
    bucket = Bucket(MiB, 2 * MiB, time.clock, time.sleep)
    caller: list[tuple[float, float]] = []
    warm: list[tuple[float, float]] = []
    time.run(stream(bucket, 10, CALLER, caller), stream(bucket, 3, WARM, warm))
    assert caller[-1][0] == pytest.approx(8.0)  # as fast as alone
    assert warm[0][0] >= caller[-1][0]  # every warm chunk after the caller's last


def test_a_warm_uses_what_a_slow_caller_leaves_and_never_makes_it_wait() -> None:
    time = VirtualTime()
    bucket = Bucket(MiB, 2 * MiB, time.clock, time.sleep)
    caller_waits: list[float] = []

    async def slow_caller() -> None:  # 1 MiB every 4 s: a quarter of the rate
        for _ in range(10):
            caller_waits.append(await bucket.take(MiB, Ticket(CALLER)))
            await time.sleep(4)

    warm: list[tuple[float, float]] = []
    time.run(slow_caller(), stream(bucket, 25, WARM, warm))
    assert sum(caller_waits) == 0
    # The warm has the other three quarters of the rate: three chunks in every four seconds.
    assert [t for t, _ in warm][:6] == [1, 2, 3, 5, 6, 7] and warm[-1][0] == 33


def limits(time: VirtualTime, **tier: Any) -> tuple[Limits, Metrics]:
    metrics = Metrics()
    configs = [
        TierConfig(name="regional", kind="glance", url="http://r", **tier),
        TierConfig(name="origin", kind="http", url="http://o"),
    ]
    metrics.prime([c.name for c in configs])
    return Limits(configs, metrics, time.clock, time.sleep), metrics


def test_pay_counts_the_seconds_waited_per_tier() -> None:
    time = VirtualTime()
    lim, metrics = limits(time, max_rate=MiB)

    async def fill() -> None:
        for _ in range(5):
            await lim.pay("regional", MiB, Ticket(CALLER))
            await lim.pay("origin", MiB, Ticket(CALLER))  # no max_rate: never waits

    time.run(fill())
    seconds = metrics.tier_rate_limited.labels
    assert seconds("regional")._value.get() == pytest.approx(3.0)  # 5 MiB - 2 MiB of burst
    assert seconds("origin")._value.get() == 0


def test_a_callers_fill_with_nothing_landed_does_not_wait_for_a_slot() -> None:
    time = VirtualTime()
    lim, _ = limits(time, max_fills=1)

    async def main() -> None:
        with lim.slot("regional", CALLER) as held:
            assert held
            with pytest.raises(TiersBusy, match="max_fills"):
                await lim.admission(["regional"], Ticket(CALLER), may_wait=False)
        await lim.admission(["regional"], Ticket(CALLER), may_wait=False)  # free again

    time.run(main())


def test_a_warm_waits_for_a_slot_a_caller_would_not() -> None:
    time = VirtualTime()
    lim, _ = limits(time, max_fills=2)
    order: list[str] = []

    async def first_warm() -> None:
        with lim.slot("regional", WARM) as held:
            assert held
            await time.sleep(5)
            order.append("first warm done")

    async def second_warm() -> None:
        ticket = Ticket(WARM)
        await asyncio.sleep(0)
        assert not lim.free("regional", WARM) and lim.free("regional", CALLER)
        waiting = asyncio.ensure_future(lim.admission(["regional"], ticket, may_wait=False))
        await asyncio.sleep(0)
        assert ticket.queued
        await waiting
        order.append("second warm admitted")
        assert not ticket.queued and time.now == 5

    time.run(first_warm(), second_warm())
    assert order == ["first warm done", "second warm admitted"]


def test_a_warm_raised_to_a_caller_takes_the_reserved_slot_at_once() -> None:
    time = VirtualTime()
    lim, _ = limits(time, max_fills=2)

    async def main() -> None:
        with lim.slot("regional", WARM):
            ticket = Ticket(WARM)
            waiting = asyncio.ensure_future(lim.admission(["regional"], ticket, may_wait=False))
            await asyncio.sleep(0)
            assert ticket.queued
            ticket.priority = CALLER  # a caller joined (Fills.start)
            lim.poke()
            await waiting
            with lim.slot("regional", ticket.priority) as held:
                assert held and lim.in_use("regional") == 2

    time.run(main())


def test_a_warm_whose_tiers_keep_their_only_slot_fails_at_once() -> None:
    time = VirtualTime()
    lim, _ = limits(time, max_fills=1)

    async def main() -> None:
        with pytest.raises(TiersBusy, match="no tier may be warmed from"):
            await lim.admission(["regional"], Ticket(WARM), may_wait=True)
        await lim.admission(["regional", "origin"], Ticket(WARM), may_wait=True)  # origin may

    time.run(main())


def test_a_warm_raised_to_a_caller_while_it_waits_on_the_rate_pays_as_a_caller() -> None:
    """A caller joins a warm whose chunk waits on a bucket that two callers keep busy: from then
    on the fill shares the rate as a caller, instead of waiting until the others are done."""
    time = VirtualTime()
    bucket = Bucket(MiB, 2 * MiB, time.clock, time.sleep)
    a: list[tuple[float, float]] = []
    b: list[tuple[float, float]] = []
    ticket = Ticket(WARM)

    async def warm_then_joined() -> float:
        await time.sleep(0.5)  # the callers have emptied the bucket
        await bucket.take(MiB, ticket)
        return time.now

    async def join_at_one_second() -> None:
        await time.sleep(1)
        ticket.priority = CALLER  # Fills.join

    paid, *_ = time.run(
        warm_then_joined(), join_at_one_second(), stream(bucket, 15, CALLER, a),
        stream(bucket, 15, CALLER, b),
    )  # fmt: skip
    assert min(a[-1][0], b[-1][0]) >= 25  # the others want the whole rate all along
    # Three callers sharing 1 MiB/s: its chunk is paid within a few chunks of the others.
    assert paid <= 4

"""The rule a reader of a fill lives by, without a socket or a disk: a byte goes out once it
landed, the last byte only once the image verified, and a failed fill cuts its readers."""

from __future__ import annotations

import asyncio

import pytest

from cachenode.errors import FillBroken, FillFailed, FillStopped, IntegrityError
from cachenode.fill import Fill, State
from cachenode.glance import ImageInfo

SIZE = 100


def new_fill() -> Fill:
    image = ImageInfo("id", "active", SIZE, "md5", "sha512", "ab" * 64)
    return Fill(image, SIZE, ("sha512", "ab" * 64))


async def collect(fill: Fill, start: int, end: int, into: list[tuple[int, int]]) -> None:
    async for span in fill.spans(start, end):
        into.append(span)


def test_the_last_byte_waits_for_the_hash() -> None:
    async def main() -> None:
        fill = new_fill()
        got: list[tuple[int, int]] = []
        reader = asyncio.create_task(collect(fill, 0, SIZE, got))
        fill.advance(40)
        fill._notify()
        await asyncio.sleep(0)
        fill.advance(SIZE)
        fill._notify()
        for _ in range(5):
            await asyncio.sleep(0)
        assert sum(n for _, n in got) == SIZE - 1 and not reader.done()
        fill.verified = True
        fill._notify()
        await reader
        assert got[0] == (0, 40) and sum(n for _, n in got) == SIZE
        assert [o for o, _ in got] == sorted(o for o, _ in got)  # in order, no overlap

    asyncio.run(main())


def test_a_fill_failing_mid_stream_raises_fill_broken_before_the_end() -> None:
    async def main() -> None:
        fill = new_fill()
        got: list[tuple[int, int]] = []
        reader = asyncio.create_task(collect(fill, 0, SIZE, got))
        fill.advance(SIZE)  # every byte landed, but the hash will not match
        fill._notify()
        await asyncio.sleep(0)
        fill.error, fill.state = IntegrityError("id", "bad", ("t",)), State.FAILED
        fill._notify()
        with pytest.raises(FillBroken):
            await reader
        assert sum(n for _, n in got) == SIZE - 1

    asyncio.run(main())


def test_ready_raises_the_fills_error_when_it_failed_first() -> None:
    async def main() -> None:
        fill = new_fill()
        waiter = asyncio.create_task(fill.ready(0))
        await asyncio.sleep(0)
        assert not waiter.done()
        fill.error, fill.state = FillFailed("no tier"), State.FAILED
        fill._notify()
        with pytest.raises(FillFailed):
            await waiter

    asyncio.run(main())


def test_a_verified_fill_serves_every_byte_even_if_its_commit_failed() -> None:
    async def main() -> None:
        fill = new_fill()
        fill.advance(SIZE)
        fill.verified = True
        fill.error, fill.state = FillFailed("disk"), State.FAILED
        got: list[tuple[int, int]] = []
        await fill.ready(0)
        await collect(fill, 10, SIZE, got)
        assert got == [(10, SIZE - 10)]

    asyncio.run(main())


def test_a_stopped_fill_cuts_its_readers_even_once_verified() -> None:
    """The image was deleted in Glance: what has not been handed over yet is not sent."""

    async def main() -> None:
        fill = new_fill()
        fill.advance(SIZE)
        fill.verified = True
        fill.error, fill.state = FillStopped("deleted"), State.FAILED
        with pytest.raises(FillStopped):
            await fill.ready(0)
        with pytest.raises(FillBroken):
            await collect(fill, 10, SIZE, [])

    asyncio.run(main())

"""The fill's sink: bytes land in order, the hash sees them in order, errors stop it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import threading
import time
from itertools import accumulate
from pathlib import Path

import pytest

from cachenode.blobs import BlobStore
from cachenode.direct import open_direct
from cachenode.errors import StoreError
from cachenode.recent import LIMIT
from cachenode.sink import Ahead, Sink


def run_sink(
    tmp_path: Path,
    chunks: list[bytes],
    write=BlobStore.write,
    order: list[int] | None = None,
    direct: bool = False,
    ahead: int = 0,
    after_put=lambda sink: None,
    end_each: bool = True,
) -> tuple[list[int], str, bytes]:  # type: ignore[no-untyped-def]
    """Put ``chunks`` (in ``order`` of their indexes, default in order); what landed, the hash.

    ``direct``: through an O_DIRECT descriptor too (skipped where the filesystem refuses
    O_DIRECT); each chunk a run of its own, unless not ``end_each``: then the run ends only at
    the image's end, and a chunk's unaligned tail is carried into the next one. ``after_put(sink)``
    is called after each put."""
    path = tmp_path / "blob"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    landed: list[int] = []
    offsets = list(accumulate([0] + [len(c) for c in chunks]))
    os.posix_fallocate(fd, 0, max(offsets[-1], 1))
    dfd = open_direct(path) if direct else None
    if direct and dfd is None:
        os.close(fd)
        pytest.skip(f"{tmp_path} does not take O_DIRECT")

    async def main() -> str:
        sink = Sink(fd, "sha512", write, landed.append,
                    direct=None if dfd is None else (dfd, offsets[-1]), ahead=ahead)  # fmt: skip
        try:
            for i in order or range(len(chunks)):
                await sink.put(chunks[i], offsets[i])
                if end_each:
                    sink.end(offsets[i + 1])
                after_put(sink)
            await sink.drain()
            assert sink.landed == offsets[-1]
            return sink.hexdigest()
        finally:
            await sink.aclose()

    try:
        digest = asyncio.run(main())
    finally:
        os.close(fd)
        if dfd is not None:
            os.close(dfd)
    return landed, digest, path.read_bytes()


def test_many_chunks_land_in_order_and_hash_in_order(tmp_path: Path) -> None:
    # Big chunks hash slower than they write: the hash queue outgrows the write queue.
    chunks = [os.urandom(n) for n in [1, 17, 3] + [4 << 20] * 12]
    landed, digest, on_disk = run_sink(tmp_path, chunks)
    assert landed == list(accumulate(len(c) for c in chunks))
    assert on_disk == b"".join(chunks)
    assert digest == hashlib.sha512(on_disk).hexdigest()


def test_slow_writes_do_not_reorder_landing(tmp_path: Path) -> None:
    def slow_write(fd: int, data: bytes, offset: int) -> None:
        time.sleep(0.01 if len(data) % 2 else 0)
        BlobStore.write(fd, data, offset)

    chunks = [os.urandom(1000 + i) for i in range(20)]
    landed, _, on_disk = run_sink(tmp_path, chunks, slow_write)
    assert landed == list(accumulate(len(c) for c in chunks))
    assert on_disk == b"".join(chunks)


def test_out_of_order_pieces_land_as_a_prefix_and_hash_in_image_order(tmp_path: Path) -> None:
    """Parallel ranges: pieces arrive in any order; landing is the written prefix; the hash is
    of the image in order (read back from the file for the pieces that came early)."""
    chunks = [os.urandom(n) for n in [3000, 1 << 20, 5, 700_000, 1 << 20, 64, 2 << 20, 9]]
    for seed in range(5):
        order = list(range(len(chunks)))
        random.Random(seed).shuffle(order)
        landed, digest, on_disk = run_sink(tmp_path, chunks, order=order)
        assert on_disk == b"".join(chunks)
        assert digest == hashlib.sha512(on_disk).hexdigest()
        assert landed == sorted(landed) and landed[-1] == len(on_disk)
        offsets = set(accumulate(len(c) for c in chunks))
        assert set(landed) <= offsets  # only ever a boundary of written chunks
        (tmp_path / "blob").unlink()


@pytest.mark.parametrize("direct", [False, True])
def test_pieces_ahead_are_hashed_from_memory_within_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """Pieces that arrive ahead of the hashed prefix are held and hashed from memory, up to the
    ``ahead`` budget; only what came over it is read back from the file for the hash."""
    chunks = [os.urandom(1 << 20) for _ in range(8)]
    read_back: list[int] = []
    pread = os.pread

    def counted(fd: int, n: int, offset: int) -> bytes:
        data = pread(fd, n, offset)
        read_back.append(len(data))
        return data

    monkeypatch.setattr(os, "pread", counted)
    order = [1, 2, 3, 4, 5, 6, 7, 0]  # all but the first MiB arrive before it
    for budget, over in ((8 << 20, 0), (3 << 20, 4 << 20), (0, 7 << 20)):
        landed, digest, on_disk = run_sink(tmp_path, chunks, order=order, direct=direct,
                                           ahead=budget)  # fmt: skip
        assert on_disk == b"".join(chunks)
        assert digest == hashlib.sha512(on_disk).hexdigest()
        assert landed[-1] == len(on_disk)
        assert sum(read_back) == over, budget
        read_back.clear()
        (tmp_path / "blob").unlink()


def test_a_drain_returns_only_once_every_write_has_landed(tmp_path: Path) -> None:
    """A write's job is done an iteration of the loop before its landing is recorded. A sink
    that let go of finished jobs before that could end its drain with bytes on disk that never
    landed, and so never read back for the hash (an integrity failure of good bytes). Timing
    decides when that happens: the code before failed within a few dozen of these runs."""
    chunks = [os.urandom(64 << 10) for _ in range(8)]
    for _ in range(300):
        landed, digest, on_disk = run_sink(tmp_path, chunks, order=[1, 2, 3, 4, 5, 6, 7, 0])
        assert landed[-1] == len(on_disk) == 8 * (64 << 10)  # run_sink checks sink.landed too
        assert digest == hashlib.sha512(on_disk).hexdigest()
        (tmp_path / "blob").unlink()


def test_what_is_held_for_readers_and_ahead_shares_one_budget(tmp_path: Path) -> None:
    """Chunks kept for readers (``recent``) and pieces held ahead of the hashed prefix never
    hold more than LIMIT + ahead together, whatever the order; the hash is still right."""
    ahead = 8 << 20
    chunks = [os.urandom(1 << 20) for _ in range(40)]
    # 20 MiB in order (kept for readers), then 12 MiB ahead (8 held), then the gap.
    order = list(range(20)) + list(range(28, 40)) + list(range(20, 28))
    peaks: list[int] = []
    _, digest, on_disk = run_sink(tmp_path, chunks, order=order, ahead=ahead,
                                  after_put=lambda sink: peaks.append(sink.held))  # fmt: skip
    assert on_disk == b"".join(chunks)
    assert digest == hashlib.sha512(on_disk).hexdigest()
    assert max(peaks) == LIMIT + ahead  # full, never over: two budgets held 28 MiB here
    assert peaks[19] == 20 << 20 and peaks[27] == LIMIT + ahead


def test_a_chunk_ahead_is_held_once_and_never_empty() -> None:
    held = Ahead(4 << 20)
    chunk = memoryview(os.urandom(1 << 20))
    assert not held.keep(chunk[:0], 1 << 20)  # nothing to hold, nothing counted
    assert held.keep(chunk, 1 << 20)
    assert not held.keep(chunk, 1 << 20)  # the same offset twice: counted once
    assert not held.keep(memoryview(bytearray(10)), 5 << 20)  # a buffer someone may reuse
    assert held.held == 1 << 20
    assert held.pop(1 << 20) is chunk and held.held == 0


def test_a_failed_write_stops_the_sink_and_lands_nothing_after_it(tmp_path: Path) -> None:
    calls = []

    def failing_write(fd: int, data: bytes, offset: int) -> None:
        calls.append(offset)
        if len(calls) == 3:
            raise StoreError("write failed: No space left on device")
        BlobStore.write(fd, data, offset)

    with pytest.raises(StoreError, match="No space left"):
        run_sink(tmp_path, [b"x" * 100] * 20, failing_write)


def test_no_write_is_in_flight_once_the_sink_is_closed(tmp_path: Path) -> None:
    """A write fails mid-fill while the next ones are queued or running: ``aclose`` returns only
    when no write runs any more, so the descriptor can be closed (and its number reused) safely.
    """
    events: list[str] = []
    started = threading.Event()

    def write(fd: int, data: bytes, offset: int) -> None:
        events.append(f"start {offset}")
        if offset == 300:
            started.set()
            raise StoreError("write failed: Input/output error")
        time.sleep(0.02)  # a slow disk: the next writes are queued behind this one
        BlobStore.write(fd, data, offset)
        events.append(f"end {offset}")

    async def main(fd: int) -> None:
        sink = Sink(fd, "sha512", write, lambda landed: None)
        try:
            with pytest.raises(StoreError, match="Input/output"):
                for i in range(40):
                    await sink.put(b"x" * 100, i * 100)
                await sink.drain()
        finally:
            await sink.aclose()
            events.append("closed")

    fd = os.open(tmp_path / "blob", os.O_RDWR | os.O_CREAT)
    try:
        asyncio.run(main(fd))
    finally:
        os.close(fd)
    assert started.is_set()
    closed = events.index("closed")
    assert all(e == "closed" for e in events[closed:])  # nothing wrote after the close
    begun = [e for e in events[:closed] if e.startswith("start")]
    ended = [e for e in events[:closed] if e.startswith("end")]
    assert len(begun) == len(ended) + 1  # every write but the failed one finished before it

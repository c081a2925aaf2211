"""Writes around the page cache: whole aligned blocks go direct, every byte exactly once."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import mmap
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachenode.blobs import BlobStore
from cachenode.direct import BLOCK, BUFFER, Runs, Write
from cachenode.errors import StoreError
from cachenode.recent import Recent
from tests.unit.test_sink import run_sink


def apply(writes: list[Write], disk: bytearray, seen: list[int]) -> None:
    for w in writes:
        if w.direct:
            assert w.offset % BLOCK == 0 and len(w.view) % BLOCK == 0, (w.offset, len(w.view))
            assert isinstance(w.buffer, mmap.mmap) and len(w.view) <= BUFFER
        assert w.offset >= 0 and w.end <= len(disk)
        disk[w.offset : w.end] = w.view
        for i in range(w.offset, w.end):
            seen[i] += 1


@st.composite
def layouts(draw: st.DrawFn) -> tuple[int, list[list[tuple[int, int]]], int]:
    """An image size, its bytes cut into runs, each run cut into chunks; an interleaving seed."""
    size = draw(st.integers(1, 6 * BLOCK + 3 * BUFFER // 64))
    cuts = sorted(set(draw(st.lists(st.integers(1, size - 1), max_size=6)) if size > 1 else []))
    bounds = [0, *cuts, size]
    runs = []
    for start, end in itertools.pairwise(bounds):
        inner = sorted(set(draw(st.lists(st.integers(start + 1, end - 1), max_size=5))
                           if end - start > 1 else []))  # fmt: skip
        points = [start, *inner, end]
        runs.append(list(itertools.pairwise(points)))
    return size, runs, draw(st.integers(0, 2**32))


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_every_byte_written_once_direct_writes_aligned(layout) -> None:  # type: ignore[no-untyped-def]
    size, runs, seed = layout
    image = os.urandom(size)
    disk, seen = bytearray(size), [0] * size
    sink = Runs(size)
    rng = random.Random(seed)
    cursors = [0] * len(runs)
    live = list(range(len(runs)))
    while live:
        r = rng.choice(live)
        start, end = runs[r][cursors[r]]
        writes = sink.put(image[start:end], start)
        apply(writes, disk, seen)
        for w in writes:
            sink.release(w)
        cursors[r] += 1
        if cursors[r] == len(runs[r]):
            live.remove(r)
            apply(sink.end(end), disk, seen)
    apply(sink.end_all(), disk, seen)
    assert seen == [1] * size
    assert bytes(disk) == image


def test_a_run_waits_with_less_than_a_block() -> None:
    runs = Runs(10 * BLOCK)
    assert runs.put(b"a" * 100, 0) == []
    writes = runs.put(b"b" * (BLOCK + 50), 100)
    assert [(w.offset, len(w.view), w.direct) for w in writes] == [(0, BLOCK, True)]
    # A run starting mid-block: its first block goes through the page cache once complete.
    writes = runs.put(b"c" * BLOCK, 3 * BLOCK + 10)
    first = [(w.offset, len(w.view), w.direct) for w in writes]
    assert first == [(3 * BLOCK + 10, BLOCK - 10, False)]
    assert [(w.offset, len(w.view)) for w in runs.end(BLOCK + 150)] == [(BLOCK, 150)]
    assert runs.end(BLOCK + 150) == []


def test_the_last_block_is_written_at_once_and_never_past_the_end() -> None:
    size = 2 * BLOCK + 7
    writes = Runs(size).put(b"x" * size, 0)
    assert [(w.offset, len(w.view), w.direct) for w in writes] == [
        (0, 2 * BLOCK, True), (2 * BLOCK, 7, False)
    ]  # fmt: skip


def test_recent_holds_the_last_bytes_and_only_immutable_ones() -> None:
    recent = Recent(limit=3000)
    chunks = [os.urandom(1000) for _ in range(4)]
    recent.keep(chunks[0], 0)
    recent.keep(memoryview(chunks[1]), 1000)
    recent.keep(bytearray(chunks[2]), 2000)  # may change after: never kept
    assert bytes(recent.get(500, 4000) or b"") == chunks[0][500:]
    assert bytes(recent.get(1500, 1700) or b"") == chunks[1][500:700]
    assert recent.get(2000, 3000) is None
    recent.keep(chunks[3], 3000)
    recent.keep(os.urandom(1500), 5000)  # over the limit: the oldest go
    assert recent.get(0, 10) is None and recent.get(1000, 10) is None
    assert bytes(recent.get(3000, 3010) or b"") == chunks[3][:10]
    assert recent.held <= 3000


@pytest.mark.parametrize("shuffle", [False, True])
def test_sink_writes_direct_lands_and_hashes_in_order(tmp_path: Path, shuffle: bool) -> None:
    size = 5 * BUFFER + 12345
    image = os.urandom(size)
    rng = random.Random(7)
    cuts = sorted(rng.sample(range(1, size), 40))
    chunks = [image[s:e] for s, e in itertools.pairwise([0, *cuts, size])]
    order = list(range(len(chunks)))
    if shuffle:
        rng.shuffle(order)
    # In order, one run: unaligned tails are carried from one chunk to the next.
    landed, digest, on_disk = run_sink(tmp_path, chunks, order=order, direct=True,
                                       end_each=shuffle)  # fmt: skip
    assert on_disk == image
    assert digest == hashlib.sha512(image).hexdigest()
    assert landed == sorted(landed) and landed[-1] == size


def test_a_stalled_run_is_written_as_it_is_and_goes_on_after() -> None:
    runs = Runs(4 * BLOCK)
    runs.put(b"a" * 100, 0)
    assert runs.end_idle() == []  # it grew since the last look
    assert [(w.offset, len(w.view), w.direct) for w in runs.end_idle()] == [(0, 100, False)]
    assert not runs.waiting
    writes = runs.put(b"b" * (2 * BLOCK), 100)  # the tier sends more: the block's rest, cached
    assert [(w.offset, len(w.view), w.direct) for w in writes] == [
        (100, BLOCK - 100, False), (BLOCK, BLOCK, True)
    ]  # fmt: skip


def test_recent_counts_the_whole_chunk_a_slice_pins() -> None:
    recent = Recent(limit=1 << 20)
    chunk = os.urandom(1 << 20)
    recent.keep(memoryview(chunk)[:10], 0)  # ten bytes, but the 1 MiB chunk stays in memory
    assert recent.held == 1 << 20
    recent.keep(memoryview(chunk)[10:20], 10)
    assert recent.get(0, 10) is None and bytes(recent.get(10, 20) or b"") == chunk[10:20]


def test_direct_writes_refused_at_write_time_go_through_the_page_cache(tmp_path: Path) -> None:
    """A filesystem that takes O_DIRECT at open and refuses it at write (EINVAL): the fill's
    bytes all land, through the page cache, with the right hash."""
    refused: list[int] = []

    def write(fd: int, data: bytes | memoryview, offset: int) -> None:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            try:
                raise OSError(errno.EINVAL, "Invalid argument")
            except OSError as exc:
                raise StoreError("write failed: Invalid argument") from exc
        BlobStore.write(fd, data, offset)

    image = os.urandom(3 * BUFFER + 777)
    chunks = [image[i : i + 300_000] for i in range(0, len(image), 300_000)]
    landed, digest, on_disk = run_sink(tmp_path, chunks, write=write, direct=True)
    assert refused == [0]  # asked once; every later write went through the page cache
    assert on_disk == image and digest == hashlib.sha512(image).hexdigest()
    assert landed[-1] == len(image)

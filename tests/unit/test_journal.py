"""The fill's journal: records survive torn writes, lie about nothing they are trusted for, and a
sink resumed from one hashes exactly the image."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from dataclasses import replace
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from cachenode import journal
from cachenode.blobs import BlobStore
from cachenode.journal import SLOT, Record, Recorder
from cachenode.sink import Sink
from cachenode.spans import Spans

IMAGE = "7e57ab1e-0000-4000-8000-00000000000a"
SHA = hashlib.sha512(b"x").hexdigest()
RECORD = Record(IMAGE, 10 << 20, "sha512", SHA, ((0, 4 << 20), (5 << 20, 6 << 20)))


def write_journal(path: Path, *records: tuple[Record, int]) -> None:
    with path.open("wb") as f:
        for record, seq in records:
            f.seek((seq % 2) * SLOT)
            f.write(journal.encode(record, seq))


def test_a_record_round_trips_and_the_newest_slot_wins(tmp_path: Path) -> None:
    newer = replace(RECORD, spans=((0, 8 << 20),))
    write_journal(tmp_path / "j", (RECORD, 4), (newer, 5))
    assert journal.read(tmp_path / "j") == (5, newer)


def test_a_torn_slot_falls_back_to_the_one_before(tmp_path: Path) -> None:
    newer = replace(RECORD, spans=((0, 8 << 20),))
    write_journal(tmp_path / "j", (RECORD, 4), (newer, 5))
    with (tmp_path / "j").open("r+b") as f:
        f.seek(SLOT + 40)  # inside the newer record's payload
        f.write(b"#")
    assert journal.read(tmp_path / "j") == (4, RECORD)


@given(st.binary(max_size=SLOT))
def test_garbage_is_never_a_record(block: bytes) -> None:
    assert journal.decode(block) is None


@given(st.lists(st.tuples(st.integers(0, 1 << 40), st.integers(1, 1 << 20)), max_size=200))
def test_any_span_set_fits_one_slot(raw: list[tuple[int, int]]) -> None:
    spans = tuple(Spans((s, s + n) for s, n in raw))
    record = replace(RECORD, size=(1 << 41), spans=spans)
    found = journal.decode(journal.encode(record, 1))
    assert found is not None
    assert found[1].spans == spans[: journal.MAX_SPANS]  # the first ones; the rest refetched


def test_problems_name_what_is_wrong() -> None:
    assert RECORD.problem() is None
    cases = {
        "not a canonical image id": replace(RECORD, image_id=IMAGE.upper()),
        "unknown hash algorithm 'whirlpool'": replace(RECORD, algo="whirlpool"),
        "not a sha512 digest": replace(RECORD, hash_value=SHA[:-1]),
        "spans beyond the image": replace(RECORD, spans=((0, (10 << 20) + 1),)),
        "spans not sorted and disjoint": replace(RECORD, spans=((5, 9), (0, 4))),
        "nothing recorded": replace(RECORD, spans=()),
    }
    for why, record in cases.items():
        assert record.problem() == why


def test_a_fill_adopts_only_the_same_size_and_hash() -> None:
    assert RECORD.mismatch(10 << 20, ("sha512", SHA)) is None
    assert RECORD.mismatch(10 << 20, ("sha512", "0" * 128)) is not None
    assert RECORD.mismatch(11 << 20, ("sha512", SHA)) is not None
    assert RECORD.mismatch(10 << 20, ("md5", SHA)) is not None


def make_partial(
    directory: Path, record: Record, size: int | None = None, nonce: str = "ab"
) -> Path:
    path = directory / f"{record.image_id}.{nonce}"
    with path.open("wb") as f:
        f.truncate(record.size if size is None else size)
    write_journal(journal.path_for(path), (record, 0))
    return path


def test_scan_keeps_what_matches_and_removes_everything_else(tmp_path: Path) -> None:
    good = make_partial(tmp_path, RECORD)
    other = replace(RECORD, image_id=str(uuid.UUID(int=8)))
    resized = make_partial(tmp_path, other, size=RECORD.size - 1)
    third = replace(RECORD, image_id=str(uuid.UUID(int=9)))
    renamed = make_partial(tmp_path, third)
    renamed.rename(tmp_path / f"{other.image_id}.cd")  # its journal goes with no partial file
    journal.path_for(renamed).rename(tmp_path / f"{other.image_id}.cd.journal")
    (tmp_path / f"{IMAGE}.zz").write_bytes(b"")  # no journal
    kept, gone = journal.scan(tmp_path, time.time())
    assert list(kept) == [IMAGE] and kept[IMAGE].path == good
    reasons = {p.name: why for p, why in gone}
    assert (
        reasons[resized.name]
        == f"the file has {RECORD.size - 1} bytes, the record says {RECORD.size}"
    )
    assert reasons[f"{other.image_id}.cd"] == "the record names another image"
    assert reasons[f"{IMAGE}.zz"] == "no journal"
    assert len(gone) == 5


def test_scan_drops_old_and_superseded_partials(tmp_path: Path) -> None:
    older = make_partial(tmp_path, RECORD, nonce="01")
    newer = make_partial(tmp_path, RECORD, nonce="02")
    os.utime(journal.path_for(older), (time.time() - 60, time.time() - 60))
    kept, gone = journal.scan(tmp_path, time.time())
    assert kept[IMAGE].path == newer and {p for p, _ in gone} == {older, journal.path_for(older)}
    kept, gone = journal.scan(tmp_path, time.time() + journal.KEEP_FOR + 1)
    assert kept == {} and {why for _, why in gone} == {"older than a day"}


def run_recorded(tmp_path: Path, data: bytes, piece: int, hold: float = 0.0) -> tuple[int, Record]:
    """Put ``data`` through a sink with a recorder, pieces of ``piece`` bytes; the last record."""
    fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT)
    jfd = os.open(tmp_path / "journal", os.O_RDWR | os.O_CREAT)
    header = Record(IMAGE, len(data), "sha512", hashlib.sha512(data).hexdigest())

    async def main() -> None:
        recorder = Recorder(jfd, fd, header)
        sink = Sink(fd, "sha512", BlobStore.write, lambda _: None, recorder.written)
        try:
            for off in range(0, len(data), piece):
                await sink.put(data[off : off + piece], off)
            await sink.drain()
            await asyncio.sleep(hold)
        finally:
            await sink.aclose()
            await recorder.aclose()

    try:
        asyncio.run(main())
    finally:
        os.close(fd)
        os.close(jfd)
    found = journal.read(tmp_path / "journal")
    assert found is not None
    return found


def test_records_are_batched_and_in_the_end_name_every_written_byte(tmp_path: Path) -> None:
    data = os.urandom(8 << 20)  # a record every 128 KiB at most, one at a time
    seq, record = run_recorded(tmp_path, data, 64 << 10, hold=journal.RECORD_SECONDS + 0.5)
    assert 1 <= seq <= len(data) // journal.every(len(data))  # never one per 64 KiB piece
    assert record.spans == ((0, len(data)),)
    assert (tmp_path / "data").read_bytes() == data


def test_a_quiet_fill_is_recorded_within_a_second(tmp_path: Path) -> None:
    data = os.urandom(100 << 10)  # less than one batch
    _, record = run_recorded(tmp_path, data, 4096, hold=journal.RECORD_SECONDS + 0.5)
    assert record.spans == ((0, len(data)),)


def test_a_resumed_sink_hashes_the_whole_image(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    path = tmp_path / "data"
    have = Spans([(0, 1 << 20), (2 << 20, (2 << 20) + 1000)])
    with path.open("wb") as f:
        f.write(bytes(len(data)))
    fd = os.open(path, os.O_RDWR)
    for s, e in have:
        os.pwrite(fd, data[s:e], s)
    landed: list[int] = []

    async def main() -> str:
        sink = Sink(fd, "sha512", BlobStore.write, landed.append)
        try:
            sink.resume(have)
            assert landed == [1 << 20]  # readers get the prefix at once
            missing = Spans([(0, len(data))])
            for s, e in have:
                missing.discard(s, e)
            for s, e in reversed(list(missing)):  # the hole last: the kept piece waits for it
                await sink.put(data[s:e], s)
            await sink.drain()
            return sink.hexdigest()
        finally:
            await sink.aclose()

    try:
        assert asyncio.run(main()) == hashlib.sha512(data).hexdigest()
    finally:
        os.close(fd)
    assert landed[-1] == len(data)

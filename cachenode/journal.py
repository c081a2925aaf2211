"""A fill's journal: which bytes of its partial file are on disk, so that a fill survives a restart.

Next to each partial file ``partial/<id>.<nonce>`` lies ``partial/<id>.<nonce>.journal``: two
slots of ``SLOT`` bytes, written alternately, so a record never overwrites the newest one. A write
torn by a kill or a power cut breaks at most the slot being written; its checksum tells, and the
other slot (one record older) is used. Each slot::

    b"CNJ1" | seq (u64) | length (u32) | crc32 of seq and payload (u32) | payload | zeros

The payload (JSON) holds only facts that do not depend on a tier or a caller: the image id, its
size, the hash algorithm and value the fill is verified against, and the byte spans written. Never
a URL, a token or a location: the journal outlives the credentials of the caller whose miss
started the fill, and the tiers may have moved by the time the fill resumes.

**O(1) and bounded.** A record is one ``pwrite`` of one slot, whatever the image size. Spans beyond
``MAX_SPANS`` are left out: a fill has its prefix plus about ``parallel`` pieces in flight, and
naming fewer bytes than were written is always safe (they are fetched again).

**When a record is written** (``Recorder``): once ``every(size)`` new bytes have landed since the
last one (1/64 of the image, at least 64 KiB, at most 16 MiB), or ``RECORD_SECONDS`` after the first
byte it does not name yet; one record at a time. A kill then loses what the last record did not
name: at most 1/64 of the image plus what landed during one record, so a kill at 80% leaves the
tiers about 22% to send again (SPEC §9: at most 25%; ``tests/bench/resume.py`` measures it).

**Durable before it is named.** A record names only bytes whose writes completed, and before it is
written the data file is fdatasync'ed: after a kill -9 the page cache would do, but after a power
cut a span named by a record whose data was still in the page cache would read as zeros (the file
is fallocated). So the batch is also what one fdatasync flushes: 64 of them per image at most
(plus one a second on a slow tier), each of bytes the kernel must write anyway, on the journal's
own thread, never the writer's or the loop's. Measured (``tests/bench/resume.py``), putting 1 GiB
through a sink is not slower with them but faster (dirty pages are written as they come rather
than throttled and flushed at the commit's fsync). The journal itself is not fsynced: a lost or
torn record only means resuming from the one before. A shutdown (SIGTERM) writes one last record
naming every byte written, and leaves the partial for the next start.

**Trust** (``scan``, at start): a journal is kept only if its newest readable record is
well-formed, names a canonical image id (the one its file name carries), a hash algorithm this
Python knows with a digest of the right length, spans inside the image, and its partial file has
exactly the image's size; not older than ``KEEP_FOR``; and only the newest per image. Anything else
in ``partial/`` is removed. A kept partial is then adopted by a fill only if Glance's record, as the
caller sees it, still has that size and hash (``Record.mismatch``); its bytes are re-hashed from
disk with the rest, and the whole image is verified before it is served whole, so a record that
lies about its file costs a refill, never a wrong byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import string
import struct
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from cachenode import crash
from cachenode.glance import is_image_id
from cachenode.spans import Spans

log = logging.getLogger(__name__)

SLOT = 4096
MAGIC = b"CNJ1"
_HEAD = struct.Struct("<4sQII")
MAX_SPANS = 64  # a record with a sha512 value and 64 spans of 1 TiB offsets fits in one slot
RECORD_SECONDS = 1.0
KEEP_FOR = 24 * 3600.0  # a partial nobody asked for again within a day is not worth its disk
SUFFIX = ".journal"


def every(size: int) -> int:
    """New bytes between two records for an image of ``size`` bytes."""
    return min(16 << 20, max(64 << 10, size // 64))


def path_for(partial_file: Path) -> Path:
    return partial_file.with_name(partial_file.name + SUFFIX)


@dataclass(frozen=True)
class Record:
    image_id: str
    size: int
    algo: str
    hash_value: str
    spans: tuple[tuple[int, int], ...] = ()

    def problem(self) -> str | None:
        """Why this record cannot be trusted on its own, or None."""
        if not is_image_id(self.image_id):
            return "not a canonical image id"
        if self.algo not in hashlib.algorithms_guaranteed:
            return f"unknown hash algorithm {self.algo!r}"
        digits = hashlib.new(self.algo).digest_size * 2
        if len(self.hash_value) != digits or not set(self.hash_value) <= _HEX:
            return f"not a {self.algo} digest"
        if self.size <= 0:
            return "no size"
        prev = 0
        for start, end in self.spans:
            if not prev <= start < end:
                return "spans not sorted and disjoint"
            prev = end
        if prev > self.size:
            return "spans beyond the image"
        if not self.spans:
            return "nothing recorded"
        return None

    def mismatch(self, size: int, verifier: tuple[str, str]) -> str | None:
        """Why a fill of an image with this size and hash must not adopt the partial, or None."""
        if (self.size, self.algo, self.hash_value) != (size, *verifier):
            return "the image's size or hash is no longer the one recorded"
        return None

    @property
    def recorded(self) -> int:
        return sum(e - s for s, e in self.spans)


_HEX = frozenset(string.hexdigits.lower())


def encode(record: Record, seq: int) -> bytes:
    payload = json.dumps(
        {
            "image": record.image_id,
            "size": record.size,
            "algo": record.algo,
            "hash": record.hash_value,
            "spans": [list(s) for s in record.spans[:MAX_SPANS]],
        },
        separators=(",", ":"),
    ).encode()
    assert _HEAD.size + len(payload) <= SLOT, "MAX_SPANS keeps a record within one slot"
    crc = zlib.crc32(struct.pack("<Q", seq) + payload)
    return (_HEAD.pack(MAGIC, seq, len(payload), crc) + payload).ljust(SLOT, b"\0")


def decode(block: bytes) -> tuple[int, Record] | None:
    """The record in one slot, or None when it is torn, foreign or malformed."""
    if len(block) < _HEAD.size:
        return None
    magic, seq, length, crc = _HEAD.unpack_from(block)
    payload = block[_HEAD.size : _HEAD.size + length]
    if magic != MAGIC or len(payload) != length:
        return None
    if zlib.crc32(struct.pack("<Q", seq) + payload) != crc:
        return None
    try:
        return seq, _record(json.loads(payload))
    except (ValueError, TypeError, KeyError):
        return None


def _record(doc: Any) -> Record:
    fields = (doc["image"], doc["size"], doc["algo"], doc["hash"])
    if not all(isinstance(f, t) for f, t in zip(fields, (str, int, str, str), strict=True)):
        raise TypeError("a field of the wrong type")
    spans = tuple((s, e) for s, e in doc["spans"])
    if not all(type(x) is int for span in spans for x in span):
        raise TypeError("a span of the wrong type")
    return Record(*fields, spans=spans)


def read(path: Path) -> tuple[int, Record] | None:
    """The newest readable record of a journal file, with its sequence number."""
    with path.open("rb") as f:
        slots = [decode(f.read(SLOT)) for _ in range(2)]
    found = [s for s in slots if s is not None]
    return max(found, key=lambda s: s[0]) if found else None


@dataclass(frozen=True)
class Kept:
    """A partial file a previous run left, whose journal was found trustworthy at start."""

    path: Path
    journal: Path
    record: Record
    seq: int
    mtime: float  # of the journal: when its last record was written

    @property
    def image_id(self) -> str:
        return self.record.image_id


def scan(directory: Path, now: float) -> tuple[dict[str, Kept], list[tuple[Path, str]]]:
    """The partials of ``directory`` worth resuming, and every other file in it with why it goes.

    Blocking (it stats and reads each file): run it in an executor.
    """
    files = {p.name: p for p in directory.iterdir()}
    gone: list[tuple[Path, str]] = []
    kept: dict[str, Kept] = {}
    for name, path in sorted(files.items()):
        if name.endswith(SUFFIX):
            data = files.get(name.removesuffix(SUFFIX))
            if data is None:
                gone.append((path, "a journal without its partial file"))
            continue
        if (journal := files.get(name + SUFFIX)) is None:
            gone.append((path, "no journal"))
            continue
        try:
            found, why = _judge(path, journal, now)
        except OSError as exc:
            found, why = None, f"unreadable: {exc.strerror}"
        if found is None:
            gone += [(path, why), (journal, why)]
            continue
        older = kept.get(found.image_id)
        if older is not None and older.mtime > found.mtime:
            found, older = older, found
        if older is not None:
            gone += [(older.path, "a newer partial of the image"), (older.journal, "superseded")]
        kept[found.image_id] = found
    return kept, gone


def _judge(path: Path, journal: Path, now: float) -> tuple[Kept | None, str]:
    newest = read(journal)
    if newest is None:
        return None, "no readable record"
    seq, record = newest
    if why := record.problem():
        return None, why
    if record.image_id != path.name.partition(".")[0]:
        return None, "the record names another image"
    size, mtime = path.stat().st_size, journal.stat().st_mtime
    if size != record.size:
        return None, f"the file has {size} bytes, the record says {record.size}"
    if now - mtime > KEEP_FOR:
        return None, "older than a day"
    return Kept(path, journal, record, seq, mtime), ""


def remove(kept: Iterable[Kept]) -> None:
    for k in kept:
        k.path.unlink(missing_ok=True)
        k.journal.unlink(missing_ok=True)


class Recorder:
    """Writes a fill's journal as its bytes land: batched, one record at a time, off the loop.

    ``written`` is called on the event loop with the set of spans written so far (every write in
    it completed); the record is written by the recorder's own thread, after an fdatasync of the
    data. ``aclose`` waits for the record in progress: only then may either descriptor close.
    """

    def __init__(self, journal_fd: int, data_fd: int, header: Record, seq: int = 0) -> None:
        self.journal_fd = journal_fd
        self.data_fd = data_fd
        self.header = header
        self.every = every(header.size)
        self.recorded = 0  # bytes named by the newest record written
        self._seq = seq
        self._spans = Spans()
        self._pending = 0
        self._again = False
        self._failed = False
        self._job: asyncio.Future[int] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="fill-journal")

    def written(self, spans: Spans, nbytes: int) -> None:
        """``nbytes`` more landed; ``spans`` is every byte written so far."""
        self._spans = spans
        self._pending += nbytes
        if self._pending >= self.every:
            self._record()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(RECORD_SECONDS, self._record)

    def _record(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._failed or not self._pending:
            return
        if self._job is not None:
            self._again = True  # once the record in progress is written
            return
        spans, self._pending, self._again = tuple(self._spans), 0, False
        loop = asyncio.get_running_loop()
        self._job = loop.run_in_executor(self._thread, self._write, spans)
        self._job.add_done_callback(self._done)

    def _write(self, spans: tuple[tuple[int, int], ...]) -> int:
        os.fdatasync(self.data_fd)  # see the module's docstring: durable before it is named
        record = replace(self.header, spans=spans[:MAX_SPANS])
        os.pwrite(self.journal_fd, encode(record, self._seq), (self._seq % 2) * SLOT)
        self._seq += 1
        crash.point("fill.recorded")
        return record.recorded

    def _done(self, job: asyncio.Future[int]) -> None:
        self._job = None
        if job.cancelled():
            return
        if (exc := job.exception()) is not None:
            # The fill goes on; it only loses the chance to resume after a crash.
            self._failed = True
            log.warning("journal of %s: %s; this fill will not survive a restart",
                        self.header.image_id, exc)  # fmt: skip
            return
        self.recorded = job.result()
        if self._again:
            self._record()

    async def aclose(self, final: bool = False) -> None:
        """Stop recording; returns once the record being written (if any) is written, and with
        ``final`` (a shutdown: the fill resumes at the next start) one naming every byte."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_running_loop()
        if final and self._pending and not self._failed:
            # Queued behind the record in progress, if any: the thread writes them in order.
            last = loop.run_in_executor(self._thread, self._write, tuple(self._spans))
            await asyncio.gather(last, return_exceptions=True)
        self._failed = True  # stopped: no record from here on
        await loop.run_in_executor(None, partial(self._thread.shutdown, wait=True))
        if self._job is not None:
            await asyncio.gather(self._job, return_exceptions=True)

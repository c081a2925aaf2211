"""Writing a fill's bytes around the page cache (O_DIRECT), in whole aligned blocks.

Why: written through the page cache, a 1 GiB fill makes the kernel allocate and copy into 262,144
fresh pages, which measured as 30-40% of the fill's CPU on a compute host (``tests/bench/
fill_cpu.py``), and leaves a GiB of cold image in the memory the host sells to its guests. Written
direct, the bytes go from the fill's buffer to the disk; the fill's callers are served from the
bytes still in memory (``Recent``), and a later hit reads the blob like any file.

O_DIRECT wants the buffer's address, the offset and the length aligned to the device's block.
A fill's bytes come in runs (one per request to a tier: a stream, a parallel piece, a retry from
where a failed one stopped), at any offset and in chunks of any size. ``Runs`` gathers each run's
bytes into aligned buffers and turns them into writes:

- whole blocks go direct, as soon as a chunk completes them;
- a block the run does not own whole (its first block when it starts mid-block, its last when it
  stops mid-block) goes through the page cache, once its bytes are all there or the run ends:
  another run may write the rest of that block, and the page cache merges bytes, O_DIRECT would
  overwrite them with whatever the buffer held;
- at most one partial block per run waits for the next chunk, so the bytes a reader may send
  (the fill's written prefix) lag the bytes received by less than a block; a run that stalls
  with one is ended (``end_idle``, called by the sink after IDLE seconds), and continues as a
  new run if its tier sends more.

Readers of the partial file read it through the page cache, and read-ahead may bring in blocks
not written yet (zeros of the reserved file). The kernel invalidates the page cache over the
range of every direct write, before and after it, so those pages never outlive the write; what
would defeat that (the file mapped with mmap, pages dirtied through another path) is not done
here, and a hit is still a file whose hash was checked from the bytes written.

Deciding the writes is pure (``Runs.put`` and ``Runs.end`` return them); the sink carries them out.
A filesystem that refuses O_DIRECT (tmpfs, some network filesystems) gets every write through the
page cache instead (``open_direct`` returns None).
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

BLOCK = 4096  # the largest logical block size of the disks hosts use (4Kn); 512e disks accept it
BUFFER = 1 << 20  # one direct write at most: the size a tier's body is handed over in


@dataclass(frozen=True)
class Write:
    """``view`` goes to ``offset``: direct (aligned, from an aligned buffer) or buffered."""

    offset: int
    view: memoryview
    direct: bool
    buffer: mmap.mmap | None = None  # back to the pool once written

    @property
    def end(self) -> int:
        return self.offset + len(self.view)


class _Run:
    """Bytes of one run not written yet: ``tail``, at ``start``. Once the run has reached a
    block boundary, ``start`` is aligned and ``tail`` is shorter than a block."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.tail = b""
        self.fresh = True  # grew since the last ``end_idle``

    @property
    def end(self) -> int:
        return self.start + len(self.tail)


class Runs:
    """The runs of one fill, each keyed by the offset it continues at."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._runs: dict[int, _Run] = {}
        self._pool: list[mmap.mmap] = []

    def put(self, data: bytes | memoryview, offset: int) -> list[Write]:
        """The writes ``data`` at ``offset`` completes; less than a block of it may wait."""
        run = self._runs.pop(offset, None) or _Run(offset)
        run.fresh = True
        view = memoryview(data)
        writes = []
        if run.start % BLOCK:  # the run's first block is not all its own
            boundary = min(run.start - run.start % BLOCK + BLOCK, self.size)
            take = min(len(view), boundary - run.end)
            run.tail += view[:take]
            view = view[take:]
            if run.end < boundary:
                return self._keep(run)
            writes.append(Write(run.start, memoryview(run.tail), direct=False))
            run.start, run.tail = boundary, b""
        whole = (len(run.tail) + len(view)) // BLOCK * BLOCK
        while whole:
            buffer = self._pool.pop() if self._pool else mmap.mmap(-1, BUFFER)
            count = min(whole, BUFFER)
            head = len(run.tail)
            buffer[:head] = run.tail
            buffer[head:count] = view[: count - head]
            view = view[count - head :]
            writes.append(Write(run.start, memoryview(buffer)[:count], True, buffer))
            run.start, run.tail, whole = run.start + count, b"", whole - count
        run.tail += view
        return writes + self._keep(run)

    def end(self, offset: int) -> list[Write]:
        """The run that reached ``offset`` stops there: what it holds is written as it is."""
        run = self._runs.pop(offset, None)
        return self._flush(run) if run is not None else []

    @property
    def waiting(self) -> bool:
        """Whether bytes wait in a run for the rest of their block."""
        return bool(self._runs)

    def end_idle(self) -> list[Write]:
        """End the runs that did not grow since the last call."""
        idle = [offset for offset, run in self._runs.items() if not run.fresh]
        for run in self._runs.values():
            run.fresh = False
        return [write for offset in idle for write in self.end(offset)]

    def end_all(self) -> list[Write]:
        return [write for offset in list(self._runs) for write in self.end(offset)]

    def release(self, write: Write) -> None:
        """``write`` is done with: its buffer serves the next one."""
        if write.buffer is not None:
            self._pool.append(write.buffer)

    def _keep(self, run: _Run) -> list[Write]:
        if run.end >= self.size:
            return self._flush(run)  # the image's last block: never written past its end
        self._runs[run.end] = run
        return []

    @staticmethod
    def _flush(run: _Run) -> list[Write]:
        return [Write(run.start, memoryview(run.tail), direct=False)] if run.tail else []


def open_direct(path: Path) -> int | None:
    """A write-only O_DIRECT descriptor on ``path``, or None where the filesystem refuses it."""
    flags = os.O_WRONLY | os.O_CLOEXEC | getattr(os, "O_DIRECT", 0)
    if flags == os.O_WRONLY | os.O_CLOEXEC:
        return None
    try:
        return os.open(path, flags)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise

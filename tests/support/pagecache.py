"""How much of a file the page cache holds (mincore(2) over a mapping of it), for tests that
show where a fill's bytes went."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path

import pytest

from cachenode import direct

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_FAILED = ctypes.c_void_p(-1).value


def resident(path: Path, offset: int = 0, length: int | None = None) -> int:
    """Bytes of ``path`` in the page cache, in whole pages: all of it, or the pages of
    [offset, offset + length)."""
    size = path.stat().st_size
    start = offset - offset % mmap.PAGESIZE
    length = (size - offset if length is None else length) + offset - start
    if length <= 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        if addr == _FAILED:
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            pages = (length + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = ctypes.create_string_buffer(pages)
            if _libc.mincore(addr, length, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(b & 1 for b in vec.raw) * mmap.PAGESIZE
        finally:
            _libc.munmap(addr, length)
    finally:
        os.close(fd)


def skip_unless_direct(directory: Path) -> None:
    """Skip the test where ``directory``'s filesystem refuses O_DIRECT (tmpfs): fills there go
    through the page cache, as they should."""
    probe = directory / "direct-probe"
    probe.touch()
    fd = direct.open_direct(probe)
    if fd is None:
        pytest.skip(f"{directory} does not take O_DIRECT")
    os.close(fd)

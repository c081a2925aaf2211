"""Crash points: named places where a test may kill the process, to prove nothing torn survives.

Inert in production: ``point`` costs one dict look-up unless ``CACHENODE_CRASH_AT`` is set when the
process starts. ``CACHENODE_CRASH_AT=commit.renamed`` kills the process with SIGKILL (no cleanup,
no ``finally``, as a power cut or the OOM killer would) the first time that point is passed;
``commit.renamed:3`` the third time. The points, in the order a fill and an eviction pass them:

    fill.chunk          a chunk of the image was written to the partial file
    fill.recorded       the journal names more written bytes (cachenode.journal)
    fill.verified       the whole image hashed correctly, before fsync and rename
    commit.fsynced      the partial file is durable, not yet renamed into blobs/
    commit.renamed      the blob is in place, its catalog record not yet written
    commit.cataloged    the catalog record is written
    touch.cataloged     a batch of hits' access times is written to the catalog
    evict.uncataloged   an evicted entry's record is gone, its blob not yet removed
    evict.removed       the evicted blob is removed
"""

from __future__ import annotations

import os
import signal
import threading

POINTS = frozenset(
    (
        "fill.chunk",
        "fill.recorded",
        "fill.verified",
        "commit.fsynced",
        "commit.renamed",
        "commit.cataloged",
        "touch.cataloged",
        "evict.uncataloged",
        "evict.removed",
    )
)
_passes: dict[str, int] = {}
_lock = threading.Lock()
_target: tuple[str, int] | None = None
_loaded = False


def _load() -> tuple[str, int] | None:
    spec = os.environ.get("CACHENODE_CRASH_AT", "")
    if not spec:
        return None
    name, _, nth = spec.partition(":")
    if name not in POINTS:
        raise ValueError(f"CACHENODE_CRASH_AT: unknown crash point {name!r}")
    return name, int(nth or 1)


def point(name: str) -> None:
    """Pass the crash point ``name``; dies here if the environment asked for it."""
    global _target, _loaded
    if not _loaded:
        _target, _loaded = _load(), True
    if _target is None or _target[0] != name:
        return
    with _lock:
        _passes[name] = _passes.get(name, 0) + 1
        if _passes[name] >= _target[1]:
            os.kill(os.getpid(), signal.SIGKILL)

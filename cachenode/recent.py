"""The last bytes a fill received, kept in memory for the callers streaming it.

A caller of a fill follows the fill's written prefix, a few MiB behind what the tiers sent.
Written around the page cache (``cachenode.direct``), those bytes are no longer in memory once
on disk; sending them from the chunks the fill still holds costs one copy into the socket,
where reading them back would cost a disk read and a page-cache fill. A caller further behind
than ``LIMIT`` (a slow link, one that joined late) is sent the file with sendfile, as a hit is.

A chunk is kept once the fill's hash reaches it: as it arrives for one stream; for a parallel
fill, a piece held ahead of the hashed prefix (``cachenode.sink.Ahead``) is kept when the prefix
reaches it, since a caller is then sent the whole run of pieces the prefix just passed. The two
share one budget, LIMIT plus the fill's ahead budget (``Sink``): what the pieces ahead hold, this
gives up, oldest first.

Only immutable chunks are kept: the bytes sent are exactly the bytes written and hashed.
"""

from __future__ import annotations

from collections import deque

from sortedcontainers import SortedDict

LIMIT = 16 << 20  # per fill: four announcements' worth (cachenode.fill.ANNOUNCE_BYTES)


class Recent:
    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self.held = 0
        self._chunks: SortedDict[int, memoryview] = SortedDict()
        self._order: deque[int] = deque()

    def keep(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        if not isinstance(view.obj, bytes) or not view or offset in self._chunks:
            return  # a buffer someone may reuse is never sent later
        self._chunks[offset] = view
        self._order.append(offset)
        self.held += pinned(view)
        self._trim()

    def resize(self, limit: int) -> None:
        """Hold ``limit`` bytes at most from now on (the oldest let go first)."""
        self.limit = limit
        self._trim()

    def _trim(self) -> None:
        while self.held > self.limit:
            self.held -= pinned(self._chunks.pop(self._order.popleft()))

    def get(self, start: int, end: int) -> memoryview | None:
        """Bytes from ``start`` (up to ``end``) held in memory, or None."""
        index = self._chunks.bisect_right(start) - 1
        if index < 0:
            return None
        offset, view = self._chunks.peekitem(index)
        assert isinstance(view, memoryview)
        if start >= offset + len(view):
            return None
        return view[start - offset : min(end, offset + len(view)) - offset]

    def clear(self) -> None:
        self._chunks.clear()
        self._order.clear()
        self.held = 0


def pinned(view: memoryview) -> int:
    """Memory a kept view holds: the whole chunk it is a slice of (counted again for each
    slice kept: more than held, never less)."""
    return len(view.obj)  # type: ignore[arg-type]

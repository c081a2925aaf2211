"""Range arithmetic for one image (SPEC §3), pure functions over sizes.

Parsing the header is aiohttp's (``request.http_range``); what is left here is what Glance decides
once the image size is known: a single range is resolved to [start, end), a start at or past the
end is unsatisfiable (416), a suffix longer than the image is the whole image.
"""

from __future__ import annotations

from dataclasses import dataclass


class Unsatisfiable(ValueError):
    """The range cannot be served for this size: 416 with ``Content-Range: bytes */SIZE``."""


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # exclusive

    @property
    def length(self) -> int:
        return self.end - self.start

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end - 1}/{size}"


def resolve(wanted: slice, size: int) -> ByteRange:
    """The bytes ``wanted`` (as aiohttp parses ``Range``) selects of an image of ``size`` bytes."""
    start, stop = wanted.start, wanted.stop
    if start is None:
        raise Unsatisfiable("no range")
    if start < 0:  # a suffix: the last -start bytes
        if size == 0:
            raise Unsatisfiable("empty image")
        return ByteRange(max(0, size + start), size)
    if start >= size:
        raise Unsatisfiable(f"start {start} is past the end ({size} bytes)")
    end = size if stop is None else min(stop, size)
    return ByteRange(start, end)

"""Range requests for one image (SPEC §3), answered exactly as Glance answers them.

Glance parses ``Range`` with webob, which is laxer than RFC 9110 (and than aiohttp's parser):
spaces are allowed around ``=`` and ``-``, anything after the first range spec is ignored, and
``bytes=-0`` means the whole image. Clients must not notice the cache, so ``parse`` is webob's own
parser (``webob.byterange.Range.parse``, what Glance calls), not a copy of it, and ``resolve``
does what Glance does once the size is known: a start at or past the end is unsatisfiable (416),
a suffix longer than the image is the whole image. Several ranges are never parsed here: they go
to Glance, which refuses them (400).
"""

from __future__ import annotations

from dataclasses import dataclass

from webob.byterange import Range


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


def parse(header: str) -> slice:
    """``Range`` as Glance reads it: [start, stop) with a negative start for a suffix.

    Raises ValueError for what Glance answers with 416 (malformed, or end before start).
    """
    # Glance's server hands webob the header's bytes as latin-1; aiohttp decodes them as UTF-8.
    # Read them as Glance does, or "bytes=\u0663-" (an Arabic-Indic digit) would be a range.
    parsed = Range.parse(header.encode("utf-8", "surrogateescape").decode("latin-1"))
    if parsed is None:
        raise ValueError(f"malformed Range: {header!r}")
    return slice(parsed.start, parsed.end)


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

"""Durations, sizes and range arithmetic: pure functions, with properties checked by hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachenode.ranges import ByteRange, Unsatisfiable, parse, resolve
from cachenode.units import Size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("14d", 14 * 86400), ("2h", 7200), ("250ms", 0.25), (10, 10)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "5 parsecs", "m5", True, None, [], "-5s"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("500MiB", Size(500 << 20)),
        ("200GiB", Size(200 << 30)),
        ("1GB", Size(10**9)),
        (4096, Size(4096)),
        ("10%", Size(fraction=0.1)),
        ("64 MiB", Size(64 << 20)),
    ],
)
def test_sizes(text: object, size: Size) -> None:
    assert parse_size(text, allow_percent=True) == size


def test_percent_only_where_allowed() -> None:
    with pytest.raises(ValueError, match="percentage is not allowed"):
        parse_size("10%")
    assert parse_size("10%", allow_percent=True).resolve(1000) == 100
    with pytest.raises(ValueError):
        parse_size("150%", allow_percent=True)


def test_ranges_like_glance() -> None:
    assert resolve(slice(0, 1), 10) == ByteRange(0, 1)
    assert resolve(slice(5, None), 10) == ByteRange(5, 10)
    assert resolve(slice(-3, None), 10) == ByteRange(7, 10)
    assert resolve(slice(-30, None), 10) == ByteRange(0, 10)  # a suffix longer than the image
    assert resolve(slice(8, 100), 10) == ByteRange(8, 10)
    assert ByteRange(8, 10).content_range(10) == "bytes 8-9/10"
    for unsatisfiable in (slice(10, None), slice(10, 12), slice(11, None)):
        with pytest.raises(Unsatisfiable):
            resolve(unsatisfiable, 10)


@given(st.integers(0, 10**12), st.integers(0, 10**12), st.one_of(st.none(), st.integers(1, 10**12)))
def test_resolved_ranges_stay_inside_the_image(size: int, start: int, length: int | None) -> None:
    stop = None if length is None else start + length
    try:
        rng = resolve(slice(start, stop), size)
    except Unsatisfiable:
        assert start >= size
        return
    assert 0 <= rng.start < rng.end <= size
    assert rng.start == start
    assert rng.length == (size - start if stop is None else min(stop, size) - start)


@pytest.mark.parametrize(
    ("header", "wanted"),
    [
        ("bytes=0-0", slice(0, 1)),
        ("bytes=5-", slice(5, None)),
        ("bytes=-5", slice(-5, None)),
        ("bytes=-0", slice(0, None)),  # webob: the whole image, not unsatisfiable
        ("bytes = 1 - 2", slice(1, 3)),  # webob allows spaces
        ("BYTES=1-2", slice(1, 3)),
        ("bytes=1-2junk", slice(1, 3)),  # webob matches a prefix
    ],
)
def test_parse_like_glance(header: str, wanted: slice) -> None:
    assert parse(header) == wanted


@pytest.mark.parametrize(
    "header", ["", "bytes=", "bytes=-", "items=0-1", "bytes=5-1", "0-1", "bytes=a-b"]
)
def test_parse_rejects_like_glance(header: str) -> None:
    with pytest.raises(ValueError):
        parse(header)


@pytest.mark.parametrize("header", ["bytes=\u0663-", "bytes=-\u0663", "byte\u017f=0-0"])
def test_parse_reads_header_bytes_as_latin_1_like_glance(header: str) -> None:
    with pytest.raises(ValueError):
        parse(header)

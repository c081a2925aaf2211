"""Which downloads go straight to Glance before the cache looks at them (a pure decision)."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from cachenode.server import bypass_reason

ID = "0b7e7e6e-1d3a-4c55-9a2f-6f0d2b7c1a11"


def reason(*headers: tuple[str, str], image_id: str = ID) -> str | None:
    return bypass_reason(image_id, CIMultiDictProxy(CIMultiDict(headers)))


def test_a_plain_download_is_the_cache_s() -> None:
    assert reason(("X-Auth-Token", "a"), ("X-Service-Token", "s"), ("Range", "bytes=0-9")) is None


@pytest.mark.parametrize("image_id", [ID.upper(), ID + "\n", ID[:-1], "..", ""])
def test_ids_that_are_not_canonical(image_id: str) -> None:
    assert reason(("X-Auth-Token", "a"), image_id=image_id) == "not_cacheable"


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ((("Content-Range", "bytes 0-4/9"),), "not_cacheable"),
        ((("Range", "bytes=0-1,3-4"),), "multi_range"),
        ((("Range", "bytes=0-1"), ("Range", "bytes=3-4")), "multi_range"),
        ((("Range", "bytes=0-1"), ("range", "")), "multi_range"),
        ((("X-Auth-Token", "a"), ("X-Auth-Token", "b")), "repeated_credentials"),
        ((("X-Service-Token", "a"), ("x-service-token", "a")), "repeated_credentials"),
        ((("X-Auth-Token", "a"), ("X_Auth_Token", "b")), "ambiguous_headers"),
        ((("X_Service_Token", "s"),), "ambiguous_headers"),
        ((("Content_Range", "bytes 0-4/9"),), "ambiguous_headers"),
    ],
)
def test_requests_whose_answer_only_glance_can_give(
    headers: tuple[tuple[str, str], ...], why: str
) -> None:
    assert reason(*headers) == why


def test_underscores_elsewhere_do_not_matter() -> None:
    assert reason(("X-Auth-Token", "a"), ("X_Custom_Thing", "1")) is None

"""Downloads through the sidecar from the real glance-api: MISS, then HIT, with Glance's headers."""

from __future__ import annotations

import hashlib

from tests.support.glance import ALICE, Glance
from tests.support.sidecar import Sidecar


def test_miss_then_hit_same_bytes_and_headers(glance: Glance, sidecar: Sidecar) -> None:
    # A fresh image is not in Glance's cache: the fill reads the body Glance's caching middleware
    # sends on a miss, without Content-Length, ended by closing the connection.
    image = glance.create_image(3 << 20)

    first = sidecar.get(image.id, ALICE)
    second = sidecar.get(image.id, ALICE)

    for resp, status, tier in ((first, "MISS", "glance"), (second, "HIT", "l1")):
        assert resp.status_code == 200
        assert hashlib.sha512(resp.content).hexdigest() == image.sha512
        assert resp.headers["X-Cachenode-Status"] == status
        assert resp.headers["X-Cachenode-Tier"] == tier
        assert resp.headers["Content-Length"] == str(len(image.data))
        assert resp.headers["Content-Type"] == "application/octet-stream"
        assert resp.headers["Content-MD5"] == image.md5
        assert resp.headers["Accept-Ranges"] == "bytes"
    blobs = sidecar.blobs()
    assert [b.name for b in blobs] == [image.id]
    assert blobs[0].read_bytes() == image.data
    # Written once: no second copy of the bytes in the catalog (metadata only) or elsewhere.
    catalog = sum(
        p.stat().st_size for p in (sidecar.cache_dir / "catalog").rglob("*") if p.is_file()
    )
    assert catalog < 256 << 10
    everything = sum(p.stat().st_size for p in sidecar.cache_dir.rglob("*") if p.is_file())
    assert everything < len(image.data) + (256 << 10)
    assert sidecar.metric("cachenode_requests_total", status="miss") == 1
    assert sidecar.metric("cachenode_requests_total", status="hit") == 1
    assert sidecar.metric("cachenode_fills_total", tier="glance", outcome="ok") == 1
    assert sidecar.metric("cachenode_cache_bytes") == len(image.data)

"""Failover across real services (issue 3): the regional glance-api dies mid-fill, then Swift too.

Services of its own: a Swift, a central glance-api (glance.url) and a regional one with its image
cache on, sharing one database and one store, as in a region. They are killed here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import requests

from tests.conftest import SWIFT_SEGMENTS
from tests.support.clients import Caller, start, wait_for
from tests.support.glance import ALICE, Glance
from tests.support.swift import Swift
from tests.support.upstream import Fault, Upstream


def test_regional_dies_mid_fill_then_swift_too(tmp_path: Path, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    swift = Swift(tmp_path / "swift").start()
    shared = {**SWIFT_SEGMENTS, "GLANCE_DB": str(tmp_path / "glance.sqlite")}
    central = Glance(tmp_path / "central", flavor="fakeauth", env=shared).start(swift.base)
    regional = Glance(tmp_path / "regional", env=shared).start(swift.base)
    key = tmp_path / "tempurl.key"
    key.write_text(os.urandom(8).hex())
    swift.set_temp_url_key(key.read_text())
    try:
        # Large enough that the bytes in flight (socket buffers) cannot hold the rest of it.
        image = central.create_image(40 << 20, chunked=True)
        other = central.create_image(2 << 20)
        # The regional Glance behind a slow link, so that it dies mid-fill.
        with Upstream(
            target=regional.url, faults=[Fault("throttle", rate=2 << 20, times=-1)]
        ) as link:
            sidecar = sidecar_factory(glance_url=central.url, tiers=[
                {"name": "regional", "kind": "glance", "url": link.url, "read_timeout": "2s"},
                {"name": "objectstore", "kind": "swift", "url": swift.storage_url,
                 "temp_url_key_file": str(key), "parallel": 2, "chunk_size": "2MiB"},
            ]).start()  # fmt: skip
            callers = [Caller(f"{sidecar.url}/v2/images/{image.id}/file", ALICE) for _ in range(3)]
            threads = [start(c) for c in callers]
            wait_for(lambda: link.bytes_for(image.id) > 8 << 20)
            regional.kill9()
            for thread in threads:
                thread.join(60)
            for caller in callers:
                assert caller.error is None and caller.status == 200
                assert caller.sha512 == image.sha512  # one uninterrupted, correct body each
            from_regional = sidecar.metric("cachenode_upstream_bytes_total", tier="regional")
            from_swift = sidecar.metric("cachenode_upstream_bytes_total", tier="objectstore")
            assert 8 << 20 < from_regional < len(image.data)
            assert from_regional + from_swift == len(image.data)  # resumed: each byte once
            assert (
                sidecar.metric("cachenode_tier_failures_total", tier="regional", kind="short_read")
                == 1
            )
        sidecar.settle()
        assert [b.name for b in sidecar.blobs()] == [image.id]

        swift.stop()  # now the object store is gone too; central Glance still authorizes
        hit = sidecar.get(image.id, ALICE)
        assert hit.status_code == 200 and hit.headers["X-Cachenode-Status"] == "HIT"
        assert hit.content == image.data
        # A miss with no tier left is passed to Glance, which cannot read its store either and
        # drops the connection without an answer: the caller's connection is dropped too (never
        # a 503 "Glance unreachable": Glance answered the probe), and not a byte of the image.
        with pytest.raises(requests.ConnectionError):
            central.api("GET", f"/v2/images/{other.id}/file")
        with pytest.raises(requests.ConnectionError):  # no status line: not a byte
            sidecar.get(other.id, ALICE)
        assert sidecar.metric("cachenode_passthrough_total", reason="tier_failed") == 1
        assert [b.name for b in sidecar.blobs()] == [image.id] and sidecar.partials() == []
    finally:
        regional.stop()
        central.stop()
        swift.stop()

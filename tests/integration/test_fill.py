"""One fetch, many streams (SPEC §3 Coalescing) and ranges on hits and on images not yet local."""

from __future__ import annotations

import threading

import pytest
import requests

from tests.support.clients import Caller, run_all, start, wait_for
from tests.support.glance import ALICE, Glance
from tests.support.pagecache import resident, skip_unless_direct
from tests.support.sidecar import Sidecar
from tests.support.upstream import Fault, Upstream


def file_url(sidecar: Sidecar, image_id: str) -> str:
    return f"{sidecar.url}/v2/images/{image_id}/file"


def test_simultaneous_cold_callers_share_one_fetch(glance: Glance, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(8 << 20)
    with Upstream(target=glance.url, faults=[Fault("throttle", rate=4 << 20, times=-1)]) as l2:
        sidecar = sidecar_factory(
            tiers=[{"name": "regional", "kind": "glance", "url": l2.url}]
        ).start()
        callers = run_all([Caller(file_url(sidecar, image.id), ALICE) for _ in range(8)])

        fetches = l2.requests_for(image.id)
        assert len(fetches) == 1, fetches
        assert l2.bytes_for(image.id) == len(image.data)
        fill_done = fetches[0].finished
        assert fill_done is not None
        for caller in callers:
            assert caller.error is None and caller.status == 200
            assert caller.sha512 == image.sha512
            assert caller.first_byte is not None and caller.first_byte < fill_done
        statuses = sorted(c.response_headers["X-Cachenode-Status"] for c in callers)
        assert statuses == ["JOINED"] * 7 + ["MISS"]
        assert sidecar.metric("cachenode_coalesced_requests_total") == 7
        assert sidecar.metric("cachenode_upstream_bytes_total", tier="regional") == len(image.data)
        assert sidecar.metric("cachenode_served_bytes_total", tier="regional") == 8 * len(
            image.data
        )


def test_late_callers_join_mid_fill(glance: Glance, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(8 << 20)
    with Upstream(target=glance.url, faults=[Fault("throttle", rate=4 << 20, times=-1)]) as l2:
        sidecar = sidecar_factory(
            tiers=[{"name": "regional", "kind": "glance", "url": l2.url}]
        ).start()
        first = Caller(file_url(sidecar, image.id), ALICE)
        thread = start(first)
        wait_for(lambda: l2.bytes_for(image.id) > len(image.data) // 3)
        late = run_all([Caller(file_url(sidecar, image.id), ALICE) for _ in range(3)])
        thread.join()
        assert len(l2.requests_for(image.id)) == 1
        for caller in [first, *late]:
            assert caller.error is None and caller.sha512 == image.sha512
        assert [c.response_headers["X-Cachenode-Status"] for c in late] == ["JOINED"] * 3
    after = requests.get(file_url(sidecar, image.id), headers={"X-Auth-Token": ALICE}, timeout=30)
    assert after.headers["X-Cachenode-Status"] == "HIT" and after.content == image.data


@pytest.mark.parametrize(
    "header",
    [
        "bytes=0-0",
        "bytes=100-199",
        "bytes=1000-",
        "bytes=-500",
        "bytes=-99999999",
        "bytes=4194303-99999999",
        "bytes=4194304-",
        "bytes=9-3",
        "bytes=abc",
        "bytes=0-1,5-6",
        "bytes=-0",
        "bytes=99999999999999999999999-",
        "items=0-1",
        "bytes= 0-1",
        "bytes=1-2junk",
    ],
)
def test_ranges_on_a_hit_answer_like_glance(glance: Glance, sidecar: Sidecar, header: str) -> None:
    image = glance.create_image(4 << 20)
    assert sidecar.get(image.id, ALICE).status_code == 200
    via = sidecar.get(image.id, ALICE, headers={"Range": header})
    ref = requests.get(
        f"{glance.url}/v2/images/{image.id}/file",
        timeout=30,
        headers={"X-Auth-Token": ALICE, "Range": header},
    )
    assert via.status_code == ref.status_code
    if ref.status_code == 206:
        assert via.headers["Content-Range"] == ref.headers["Content-Range"]
        assert via.content == ref.content
        assert via.headers["X-Cachenode-Status"] == "HIT"
        assert via.headers["Content-MD5"] == image.md5
    if ref.status_code == 416:
        assert via.headers["Content-Range"] == f"bytes */{len(image.data)}"
        assert image.data[:16] not in via.content


def test_range_on_an_image_not_yet_local(glance: Glance, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    """Answered at once, from landed bytes or a ranged fetch, while the whole fill goes on."""
    image = glance.create_image(8 << 20)
    size = len(image.data)
    with Upstream(target=glance.url, faults=[Fault("throttle", rate=2 << 20, times=-1)]) as l2:
        sidecar = sidecar_factory(
            tiers=[{"name": "regional", "kind": "glance", "url": l2.url}]
        ).start()
        tail = sidecar.get(
            image.id, ALICE, settle=False, headers={"Range": f"bytes={size - 1000}-"}
        )
        assert tail.status_code == 206 and tail.content == image.data[-1000:]
        assert tail.headers["Content-Range"] == f"bytes {size - 1000}-{size - 1}/{size}"
        assert tail.headers["X-Cachenode-Status"] == "MISS"
        fills = [s for s in l2.requests_for(image.id) if s.range is None]
        assert len(fills) == 1 and fills[0].finished is None  # the full fill is still running
        ranged = [s.range for s in l2.requests_for(image.id) if s.range]
        assert ranged == [f"bytes={size - 1000}-{size - 1}"]

        wait_for(lambda: l2.bytes_for(image.id) > 2 << 20)
        head = sidecar.get(
            image.id, ALICE, settle=False, headers={"Range": "bytes=0-99"}
        )  # landed already
        assert head.status_code == 206 and head.content == image.data[:100]
        assert head.headers["X-Cachenode-Status"] == "JOINED"
        assert len(l2.requests_for(image.id)) == 2
        wait_for(lambda: [b.name for b in sidecar.blobs()] == [image.id])
    assert (sidecar.cache_dir / "blobs" / image.id[:2] / image.id).read_bytes() == image.data


def test_a_range_at_the_fills_front_waits_for_the_fill(glance: Glance, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    """A 1-byte probe of an image whose fill has not landed its first byte yet (a host's
    authorization probe at a regional cachenode) is answered from the fill: the tier is asked
    for the image once, never again for the byte already on its way."""
    image = glance.create_image(4 << 20)
    hold = Fault("hold", at=0)
    with Upstream(blobs={image.id: image.data}, faults=[hold]) as origin:
        car = sidecar_factory(tiers=[{"name": "origin", "kind": "http", "url": origin.url}])
        car.start()
        whole = Caller(f"{car.url}/v2/images/{image.id}/file", ALICE)
        thread = start(whole)
        assert hold.reached.wait(30)  # the fill asked, and has no byte yet
        got: list[requests.Response] = []
        probe = threading.Thread(target=lambda: got.append(car.get(
            image.id, ALICE, settle=False, headers={"Range": "bytes=0-0"})))  # fmt: skip
        probe.start()
        wait_for(lambda: car.metric("cachenode_coalesced_requests_total") == 1)
        hold.release()
        probe.join(30)
        thread.join(30)
        assert got[0].status_code == 206 and got[0].content == image.data[:1]
        assert got[0].headers["X-Cachenode-Status"] == "JOINED"
        assert whole.sha512 == image.sha512
        assert [(s.range, s.bytes) for s in origin.requests_for(image.id)] == [
            (None, len(image.data))
        ]


def test_a_fill_leaves_its_bytes_out_of_the_page_cache(glance: Glance, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    """A fill writes around the page cache and its caller is sent the bytes from memory: once
    committed, the blob is all on disk and next to none of it in memory (cachenode.direct)."""
    image = glance.create_image(16 << 20)
    with Upstream(blobs={image.id: image.data}) as origin:
        car = sidecar_factory(tiers=[{"name": "origin", "kind": "http", "url": origin.url}])
        car.start()
        skip_unless_direct(car.cache_dir)
        got = car.get(image.id, ALICE)
        assert got.status_code == 200 and got.content == image.data
        assert got.headers["X-Cachenode-Status"] == "MISS"
        car.settle()
        (blob,) = car.blobs()
        # Written through the page cache (or read back from it for the caller), all 16 MiB would
        # be there. The image ends on a block boundary: no block went through the page cache.
        assert resident(blob) == 0
        assert blob.read_bytes() == image.data
        assert resident(blob) == len(image.data)  # the measure sees what a read brings in


def test_http_tier_serves_and_ranges(glance: Glance, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(2 << 20)
    with Upstream(blobs={image.id: image.data}) as origin:
        sidecar = sidecar_factory(
            tiers=[{"name": "mirror", "kind": "http", "url": origin.url + "/images/{image_id}"}]
        ).start()
        resp = sidecar.get(image.id, ALICE)
        assert resp.status_code == 200 and resp.content == image.data
        assert resp.headers["X-Cachenode-Tier"] == "mirror"
        assert [s.path for s in origin.log] == [f"/images/{image.id}"]

"""Nothing torn (SPEC §2.4): a kill -9 at any instant leaves only complete, verified entries."""

from __future__ import annotations

import shutil

import pytest

from tests.support.clients import Caller, start, wait_for
from tests.support.glance import ALICE, Glance
from tests.support.sidecar import Sidecar
from tests.support.upstream import Fault, Upstream


def test_kill_9_mid_fill_leaves_nothing_servable_and_restart_resumes(
    glance: Glance, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(8 << 20)
    with Upstream(target=glance.url, faults=[Fault("throttle", rate=2 << 20, times=1)]) as l2:
        sidecar: Sidecar = sidecar_factory(
            tiers=[{"name": "regional", "kind": "glance", "url": l2.url}]
        ).start()
        caller = Caller(f"{sidecar.url}/v2/images/{image.id}/file", ALICE)
        thread = start(caller)
        wait_for(lambda: l2.bytes_for(image.id) > 2 << 20)
        sidecar.kill9()
        thread.join()
        assert caller.error is not None and caller.received < len(image.data)
        assert sidecar.blobs() == []
        partial, log = sidecar.partials()  # what the crash left: the file and its journal
        assert log.name == partial.name + ".journal"

        sidecar.start()
        assert sidecar.blobs() == []  # nothing servable; the partial is kept to resume from
        resp = sidecar.get(image.id, ALICE)
        assert resp.status_code == 200 and resp.content == image.data
        assert resp.headers["X-Cachenode-Status"] == "MISS"
        assert sidecar.metric("cachenode_resumed_bytes_total") > 0
        assert [b.name for b in sidecar.blobs()] == [image.id]
        assert sidecar.partials() == []


def test_catalog_survives_restart_and_reconciles_with_disk(
    glance: Glance, sidecar: Sidecar
) -> None:
    kept, lost = glance.create_image(1 << 20), glance.create_image(1 << 20)
    for image in (kept, lost):
        assert sidecar.get(image.id, ALICE).headers["X-Cachenode-Status"] == "MISS"
    sidecar.stop()

    blob_dir = sidecar.cache_dir / "blobs"
    (blob_dir / lost.id[:2] / lost.id).unlink()  # a record whose blob vanished
    orphan = (
        "0123abcd-0000-4000-8000-000000000000"  # a blob renamed in place, its record never written
    )
    (blob_dir / orphan[:2]).mkdir(exist_ok=True)
    shutil.copy(blob_dir / kept.id[:2] / kept.id, blob_dir / orphan[:2] / orphan)

    sidecar.start()
    assert sorted(b.name for b in sidecar.blobs()) == [kept.id]
    assert sidecar.metric("cachenode_cache_entries") == 1
    assert sidecar.metric("cachenode_cache_bytes") == len(kept.data)
    hit = sidecar.get(kept.id, ALICE)
    assert hit.headers["X-Cachenode-Status"] == "HIT" and hit.content == kept.data
    miss = sidecar.get(lost.id, ALICE)
    assert miss.headers["X-Cachenode-Status"] == "MISS" and miss.content == lost.data


def test_a_corrupt_catalog_is_set_aside_and_the_cache_starts_empty(
    glance: Glance, sidecar: Sidecar
) -> None:
    image = glance.create_image(1 << 20)
    assert sidecar.get(image.id, ALICE).headers["X-Cachenode-Status"] == "MISS"
    sidecar.stop()
    database = sidecar.cache_dir / "catalog" / "cache.db"
    database.write_bytes(b"\x00not a database" * 4096)

    sidecar.start()  # up, not crashed
    assert list(sidecar.cache_dir.glob("catalog.corrupt-*"))
    assert "is unreadable" in sidecar.log()
    assert sidecar.blobs() == []  # what the lost catalog described cannot be proven: refilled
    again = sidecar.get(image.id, ALICE)
    assert again.headers["X-Cachenode-Status"] == "MISS" and again.content == image.data


@pytest.mark.parametrize("damage", ["truncated", "removed"])
def test_a_blob_that_disagrees_with_its_record_is_refilled_not_bypassed(
    glance: Glance, sidecar: Sidecar, damage: str
) -> None:
    """L1 never disagrees with itself into a 500, a hang or a permanent bypass: a blob cut short
    or removed behind the sidecar's back (while a recent hit holds it open) is dropped on the
    next hit, and that caller is filled from the tiers."""
    image = glance.create_image(1 << 20)
    assert sidecar.get(image.id, ALICE).headers["X-Cachenode-Status"] == "MISS"
    assert sidecar.get(image.id, ALICE).headers["X-Cachenode-Status"] == "HIT"
    (blob,) = sidecar.blobs()
    if damage == "removed":
        blob.unlink()
    else:
        with blob.open("r+b") as f:
            f.truncate(1000)
    resp = sidecar.get(image.id, ALICE)
    assert resp.status_code == 200 and resp.content == image.data
    assert resp.headers["X-Cachenode-Status"] == "MISS"
    assert sidecar.metric("cachenode_evictions_total", reason="inconsistent") == 1
    again = sidecar.get(image.id, ALICE)
    assert again.headers["X-Cachenode-Status"] == "HIT" and again.content == image.data

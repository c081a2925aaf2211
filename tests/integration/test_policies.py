"""Eviction and warm policies in a running sidecar (SPEC §5), and a disk that fills up."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.support.clients import wait_for
from tests.support.glance import ADMIN, ALICE, Glance
from tests.support.sidecar import Sidecar
from tests.support.upstream import Fault, Upstream

MiB = 1 << 20


def policy_file(tmp_path: Path, **policy: object) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return str(path)


def golden_lru(tmp_path: Path, low_watermark: float) -> str:
    """LRU within 10 MiB (evicting past 90%), images tagged golden pinned."""
    golden = {"tags": ["golden"]}
    return policy_file(tmp_path, order="lru", max_bytes="10MiB", high_watermark=0.9,
                       low_watermark=low_watermark, min_free_disk=0, pin=golden)  # fmt: skip


def test_lru_within_max_bytes_and_pins_by_tag(
    glance: Glance, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    policy = golden_lru(tmp_path, low_watermark=0.6)
    sidecar = sidecar_factory(cache={"policy": policy}).start()
    golden = glance.create_image(3 * MiB, tags=["golden"])
    a, b = glance.create_image(3 * MiB), glance.create_image(2 * MiB)
    for image in (golden, a, b):
        assert sidecar.get(image.id, ALICE).status_code == 200
    time.sleep(0.05)
    assert sidecar.get(a.id, ALICE).headers["X-Cachenode-Status"] == "HIT"  # b is now least recent
    c = glance.create_image(3 * MiB)  # 8 + 3 > 9 (high): evict down to 6 (low) - 3 = 3 before it
    assert sidecar.get(c.id, ALICE).headers["X-Cachenode-Status"] == "MISS"
    cached = {p.name for p in sidecar.blobs()}
    assert golden.id in cached and c.id in cached  # pinned stays, the new one got room
    assert b.id not in cached and a.id not in cached  # least recent first: b, then a
    assert sidecar.metric("cachenode_evictions_total", reason="size") == 2
    assert sidecar.metric("cachenode_cache_bytes") == 6 * MiB


def evictions(sidecar: Sidecar) -> float:
    return sum(
        value for (name, _), value in sidecar.metrics().items()
        if name == "cachenode_evictions_total"
    )  # fmt: skip


def test_an_image_that_cannot_fit_is_passed_through_and_evicts_nothing(
    glance: Glance, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    policy = golden_lru(tmp_path, low_watermark=0.5)
    sidecar = sidecar_factory(cache={"policy": policy}).start()
    golden = glance.create_image(4 * MiB, tags=["golden"])
    small = [glance.create_image(1 * MiB) for _ in range(3)]
    for image in (golden, *small):
        assert sidecar.get(image.id, ALICE).headers["X-Cachenode-Status"] == "MISS"
    held = {golden.id, *(i.id for i in small)}
    assert {p.name for p in sidecar.blobs()} == held

    # 7 MiB is under max_bytes, but with 4 MiB pinned it cannot fit whatever goes; 11 MiB never.
    for size in (7 * MiB, 11 * MiB):
        big = glance.create_image(size)
        resp = sidecar.get(big.id, ALICE)
        assert resp.status_code == 200 and resp.content == big.data
        assert resp.headers["X-Cachenode-Status"] == "BYPASS"
        assert {p.name for p in sidecar.blobs()} == held  # not one entry lost for it
        assert sidecar.partials() == []
    assert evictions(sidecar) == 0
    assert sidecar.metric("cachenode_cache_entries") == 4
    assert sidecar.metric("cachenode_passthrough_total", reason="no_room") == 2

    # One that can fit gets room, and only as much as it needs: 7 + 3 is past high (9 MiB); low
    # (5 MiB) is out of reach with 4 MiB pinned, high is not: the least recent 1 MiB goes.
    fits = glance.create_image(3 * MiB)
    resp = sidecar.get(fits.id, ALICE)
    assert resp.headers["X-Cachenode-Status"] == "MISS" and resp.content == fits.data
    assert {p.name for p in sidecar.blobs()} == held - {small[0].id} | {fits.id}
    assert evictions(sidecar) == sidecar.metric("cachenode_evictions_total", reason="size") == 1


def test_max_object_size_passes_larger_images_through(
    glance: Glance, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    policy = policy_file(
        tmp_path, max_bytes="6MiB", high_watermark=0.9, low_watermark=0.5, min_free_disk=0,
        max_object_size="2MiB",
    )  # fmt: skip
    sidecar = sidecar_factory(cache={"policy": policy}).start()
    cached = [glance.create_image(2 * MiB) for _ in range(2)]
    for image in cached:
        assert sidecar.get(image.id, ALICE).headers["X-Cachenode-Status"] == "MISS"
    larger = glance.create_image(2 * MiB + 1)  # room could be made for it: the policy says no
    for _ in range(2):
        resp = sidecar.get(larger.id, ALICE)
        assert resp.headers["X-Cachenode-Status"] == "BYPASS" and resp.content == larger.data
    assert {p.name for p in sidecar.blobs()} == {i.id for i in cached}
    assert evictions(sidecar) == 0
    assert sidecar.metric("cachenode_passthrough_total", reason="no_room") == 2


def test_idle_images_go_and_warm_policy_runs_on_its_interval(
    glance: Glance, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "service.token").write_text(ADMIN)
    tag = f"warm-{time.monotonic_ns()}"
    policy = policy_file(
        tmp_path,
        max_idle="2s",
        min_free_disk=0,
        warm={"tags": [tag], "interval": "1s"},
        pin={"tags": [tag]},
    )
    wanted = glance.create_image(1 * MiB, tags=[tag])
    sidecar = sidecar_factory(
        cache={"policy": policy, "janitor_interval": "0.3s"},
        service_auth={"token_file": str(tmp_path / "service.token")},
    ).start()
    wait_for(lambda: wanted.id in {p.name for p in sidecar.blobs()}, timeout=15)  # warmed unasked
    later = glance.create_image(1 * MiB, tags=[tag])
    wait_for(lambda: later.id in {p.name for p in sidecar.blobs()}, timeout=15)  # next interval
    idle = glance.create_image(1 * MiB)
    assert sidecar.get(idle.id, ALICE).status_code == 200
    wait_for(lambda: idle.id not in {p.name for p in sidecar.blobs()}, timeout=15)
    assert sidecar.metric("cachenode_evictions_total", reason="idle") >= 1
    time.sleep(2.5)  # pinned by tag, the warmed ones outlive max_idle
    assert {wanted.id, later.id} <= {p.name for p in sidecar.blobs()}
    hit = sidecar.get(wanted.id, ALICE)
    assert hit.headers["X-Cachenode-Status"] == "HIT" and hit.content == wanted.data


def test_eviction_never_cuts_a_reader_nor_a_fill(
    glance: Glance, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "admin.token").write_text("t0ken")
    cached, filling = glance.create_image(8 * MiB), glance.create_image(8 * MiB)
    with Upstream(target=glance.url, faults=[Fault("throttle", rate=4 * MiB, times=-1)]) as l2:
        sidecar = sidecar_factory(
            admin={"token_file": str(tmp_path / "admin.token")},
            tiers=[{"name": "regional", "kind": "glance", "url": l2.url}],
        ).start()
        assert sidecar.get(cached.id, ALICE).status_code == 200
        received: dict[str, bytes] = {}

        def slow_reader(image_id: str) -> None:
            with requests.get(
                f"{sidecar.url}/v2/images/{image_id}/file",
                headers={"X-Auth-Token": ALICE},
                stream=True,
                timeout=60,
            ) as resp:
                parts = []
                for chunk in resp.iter_content(256 * 1024):
                    parts.append(chunk)
                    time.sleep(0.02)  # ~12 MiB/s: still reading when the eviction comes
                received[image_id] = b"".join(parts)

        hits = sidecar.metric("cachenode_requests_total", status="hit")
        readers = [threading.Thread(target=slow_reader, args=(i,)) for i in (cached.id, filling.id)]
        for reader in readers:
            reader.start()
        wait_for(lambda: len(sidecar.partials()) == 2)  # the fill's file and its journal
        # and the cached image's reader has its hit: evicted before that, it would be a miss
        wait_for(lambda: sidecar.metric("cachenode_requests_total", status="hit") == hits + 1)
        evicted = requests.post(
            sidecar.admin_url + "/admin/v1/evict",
            json={"all": True},
            timeout=10,
            headers={"Authorization": "Bearer t0ken"},
        ).json()
        assert evicted["evicted"] == [cached.id]  # the fill is not an entry yet: never evicted
        for reader in readers:
            reader.join(60)
        assert received[cached.id] == cached.data  # its file was unlinked mid-read: still whole
        assert received[filling.id] == filling.data
        sidecar.settle()
        assert [p.name for p in sidecar.blobs()] == [filling.id]


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 16 MiB tmpfs for the cache: a disk that really fills up."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_passes_through_and_makes_room(
    glance: Glance, sidecar_factory, tmp_path: Path, small_disk: Path
) -> None:  # type: ignore[no-untyped-def]
    policy = policy_file(
        tmp_path, max_bytes="100%", high_watermark=1.0, low_watermark=1.0, min_free_disk=0
    )
    sidecar: Sidecar = sidecar_factory(
        cache={"dir": str(small_disk / "cache"), "policy": policy}
    ).start()
    huge = glance.create_image(24 * MiB)  # more than the whole disk
    resp = sidecar.get(huge.id, ALICE)
    assert resp.status_code == 200 and resp.content == huge.data
    assert resp.headers["X-Cachenode-Status"] == "BYPASS"
    assert sidecar.metric("cachenode_passthrough_total", reason="no_room") == 1
    assert sidecar.blobs() == [] and sidecar.partials() == []

    first, second, third = (glance.create_image(6 * MiB) for _ in range(3))
    for image in (first, second):
        assert sidecar.get(image.id, ALICE).headers["X-Cachenode-Status"] == "MISS"
    third_resp = sidecar.get(third.id, ALICE)  # 12 of ~16 MiB used: the first must go
    assert third_resp.headers["X-Cachenode-Status"] == "MISS" and third_resp.content == third.data
    assert {p.name for p in sidecar.blobs()} == {second.id, third.id}
    assert (
        sidecar.metric("cachenode_evictions_total", reason="size")
        + sidecar.metric("cachenode_evictions_total", reason="disk")
        == 1
    )
    assert sidecar.partials() == []


def test_concurrent_fills_never_take_l1_past_max_bytes(
    glance: Glance, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Three 4 MiB fills start together within 10 MiB: each fits alone, two fit together. The
    bytes the first two reserved (fallocated, not committed yet) count in the third one's plan:
    it is passed through, and L1 never holds more than max_bytes."""
    policy = policy_file(tmp_path, max_bytes="10MiB", high_watermark=1.0, low_watermark=1.0,
                         min_free_disk=0)  # fmt: skip
    images = [glance.create_image(4 * MiB) for _ in range(3)]
    hold = Fault("hold", at=1 * MiB, times=-1)  # every fill stops at 1 MiB until released
    with Upstream(target=glance.url, faults=[hold]) as l2:
        sidecar = sidecar_factory(
            cache={"policy": policy},
            tiers=[{"name": "regional", "kind": "glance", "url": l2.url}],
        ).start()
        got: dict[str, requests.Response] = {}

        def download(image_id: str) -> None:
            got[image_id] = sidecar.get(image_id, ALICE, settle=False)

        readers = [threading.Thread(target=download, args=(i.id,)) for i in images]
        for reader in readers:
            reader.start()

        # Two fills hold their room (a file and a journal each); the third went to Glance. Three
        # files and journals is the over-commit this test is about.
        def room_decided() -> bool:
            no_room = sidecar.metric("cachenode_passthrough_total", reason="no_room")
            return len(sidecar.partials()) == 6 or (no_room == 1 and len(sidecar.partials()) == 4)

        wait_for(room_decided)
        assert len(sidecar.partials()) == 4
        assert sidecar.metric("cachenode_inflight_fills") == 2
        hold.release()
        for reader in readers:
            reader.join(60)
        sidecar.settle()
        statuses = sorted(r.headers["X-Cachenode-Status"] for r in got.values())
        assert statuses == ["BYPASS", "MISS", "MISS"]
        assert all(got[i.id].content == i.data for i in images)
        bypassed = next(i for i in images if got[i.id].headers["X-Cachenode-Status"] == "BYPASS")
        assert l2.requests_for(bypassed.id) == []  # passed through to Glance, not to the tier
        assert sidecar.metric("cachenode_cache_bytes") == 8 * MiB
        assert len(sidecar.blobs()) == 2 and sidecar.partials() == []
        assert sidecar.metric("cachenode_fills_total", tier="none", outcome="no_room") == 1


def test_a_failed_fill_gives_its_room_back(glance: Glance, sidecar_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Room for one 4 MiB image in 6 MiB: a fill that breaks after its file was made gives its
    room back when its file goes, so the next image gets it (kept, it would be passed through)."""
    policy = policy_file(tmp_path, max_bytes="6MiB", high_watermark=1.0, low_watermark=1.0,
                         min_free_disk=0)  # fmt: skip
    broken, after = glance.create_image(4 * MiB), glance.create_image(4 * MiB)
    with Upstream(target=glance.url, faults=[Fault("reset", at=1 * MiB)]) as l2:
        sidecar = sidecar_factory(
            cache={"policy": policy},
            tiers=[{"name": "regional", "kind": "glance", "url": l2.url}],
        ).start()
        try:
            resp = sidecar.get(broken.id, ALICE)
            assert resp.headers["X-Cachenode-Status"] == "BYPASS"  # failed before its headers
        except requests.exceptions.RequestException:
            sidecar.settle()  # cut mid-body: never a clean body of a broken fill
        assert sidecar.metric("cachenode_fills_total", tier="regional", outcome="error") == 1
        assert sidecar.partials() == [] and sidecar.blobs() == []
        resp = sidecar.get(after.id, ALICE)
        assert resp.headers["X-Cachenode-Status"] == "MISS" and resp.content == after.data
        assert [p.name for p in sidecar.blobs()] == [after.id]
        assert sidecar.metric("cachenode_passthrough_total", reason="no_room") == 0

"""A tier's own limits (SPEC §4) with a real sidecar in front of the real Glance; the tiers are
our upstream forwarding to that Glance, to count what each was asked and to hold a fill open.

max_fills: a warm never takes a tier's last slot, so a caller's miss starts at once while warms
run; a caller that finds every slot taken by callers is passed to Glance. max_rate: a tier's
fills together get no more than the rate. connect_timeout: a tier that refuses or drops
connections moves the fill to the next tier after one short timeout, then is skipped.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from cachenode.limits import burst
from tests.support.glance import ADMIN, ALICE, Glance
from tests.support.sidecar import Sidecar, free_port
from tests.support.upstream import Fault, Upstream

MiB = 1 << 20


def operated(sidecar_factory, tmp_path: Path, tiers: list[dict[str, Any]]) -> Sidecar:  # type: ignore[no-untyped-def]
    """A sidecar with these tiers, an admin token and service credentials (for warms)."""
    (tmp_path / "admin.token").write_text("s3cret-admin\n")
    (tmp_path / "service.token").write_text(ADMIN + "\n")
    return sidecar_factory(
        admin={"token_file": str(tmp_path / "admin.token")},
        service_auth={"token_file": str(tmp_path / "service.token")},
        tiers=tiers,
    ).start()


def admin(sidecar: Sidecar, method: str, path: str) -> requests.Response:
    return requests.request(
        method,
        f"{sidecar.admin_url}/admin/v1{path}",
        headers={"Authorization": "Bearer s3cret-admin"},
        timeout=10,
    )


def fill_of(sidecar: Sidecar, image_id: str) -> dict[str, Any]:
    doc = admin(sidecar, "GET", f"/images/{image_id}").json()
    assert isinstance(doc, dict)
    return doc


def until(condition: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def glance_tier(name: str, url: str, **limits: object) -> dict[str, object]:
    return {"name": name, "kind": "glance", "url": url, **limits}


def test_a_warm_leaves_a_tiers_only_slot_to_a_callers_miss(
    glance: Glance, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """max_fills 1: the warm goes to the next tier; a boot's miss starts at once on the first."""
    warmed, booted = glance.create_image(4 * MiB), glance.create_image(2 * MiB)
    hold = Fault("hold", at=MiB)
    with (
        Upstream(target=glance.url) as regional,
        Upstream(target=glance.url, faults=[hold]) as origin,
    ):
        sidecar = operated(sidecar_factory, tmp_path, [
            glance_tier("regional", regional.url, max_fills=1),
            glance_tier("origin", origin.url),
        ])  # fmt: skip
        assert admin(sidecar, "POST", f"/images/{warmed.id}/warm").status_code == 202
        assert hold.reached.wait(30)  # the warm is reading, from origin, and held there
        boot = sidecar.get(booted.id, ALICE, settle=False)
        assert boot.status_code == 200 and boot.content == booted.data
        assert boot.headers["X-Cachenode-Status"] == "MISS"
        assert boot.headers["X-Cachenode-Tier"] == "regional"
        assert fill_of(sidecar, warmed.id)["state"] == "filling"  # still held
        hold.release()
        sidecar.settle()
    assert regional.requests_for(warmed.id) == []  # never took the regional tier's only slot
    assert len(origin.requests_for(warmed.id)) == 1 and origin.requests_for(booted.id) == []
    assert {b.name for b in sidecar.blobs()} == {warmed.id, booted.id}


def test_a_second_warm_queues_and_a_callers_miss_does_not(
    glance: Glance, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """max_fills 2 on the only tier: one warm runs, the next one waits for a slot without
    asking the tier, and a caller's miss takes the slot kept for callers at once."""
    first, second, booted = (glance.create_image(3 * MiB) for _ in range(3))
    hold = Fault("hold", at=MiB)
    with Upstream(target=glance.url, faults=[hold]) as regional:
        sidecar = operated(sidecar_factory, tmp_path, [
            glance_tier("regional", regional.url, max_fills=2),
        ])  # fmt: skip
        assert admin(sidecar, "POST", f"/images/{first.id}/warm").status_code == 202
        assert hold.reached.wait(30)
        assert admin(sidecar, "POST", f"/images/{second.id}/warm").status_code == 202
        until(lambda: fill_of(sidecar, second.id).get("queued"), "the second warm queued")
        assert fill_of(sidecar, second.id)["priority"] == "warm"
        boot = sidecar.get(booted.id, ALICE, settle=False)
        assert boot.headers["X-Cachenode-Status"] == "MISS" and boot.content == booted.data
        assert fill_of(sidecar, second.id)["queued"]  # the caller's slot is not the warm's
        assert regional.requests_for(second.id) == []
        hold.release()
        sidecar.settle()
    assert [len(regional.requests_for(i.id)) for i in (first, second, booted)] == [1, 1, 1]
    assert {b.name for b in sidecar.blobs()} == {first.id, second.id, booted.id}
    assert sidecar.metric("cachenode_fills_total", tier="regional", outcome="ok") == 3


def test_a_caller_joining_a_queued_warm_raises_it_to_a_callers_fill(
    glance: Glance, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The warmed image is the one a boot asks for: the boot is not queued behind the warm."""
    first, second = glance.create_image(3 * MiB), glance.create_image(3 * MiB)
    hold = Fault("hold", at=MiB)
    with Upstream(target=glance.url, faults=[hold]) as regional:
        sidecar = operated(sidecar_factory, tmp_path, [
            glance_tier("regional", regional.url, max_fills=2),
        ])  # fmt: skip
        admin(sidecar, "POST", f"/images/{first.id}/warm")
        assert hold.reached.wait(30)
        admin(sidecar, "POST", f"/images/{second.id}/warm")
        until(lambda: fill_of(sidecar, second.id).get("queued"), "the second warm queued")
        boot = sidecar.get(second.id, ALICE, settle=False)
        assert boot.headers["X-Cachenode-Status"] == "JOINED" and boot.content == second.data
        assert fill_of(sidecar, first.id)["state"] == "filling"  # the warm still holds on
        hold.release()
        sidecar.settle()
    assert {b.name for b in sidecar.blobs()} == {first.id, second.id}


def test_a_caller_finding_every_slot_taken_by_callers_is_passed_to_glance(
    glance: Glance, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    held_image, other = glance.create_image(3 * MiB), glance.create_image(2 * MiB)
    hold = Fault("hold", at=MiB)
    with Upstream(target=glance.url, faults=[hold]) as regional:
        sidecar = operated(sidecar_factory, tmp_path, [
            glance_tier("regional", regional.url, max_fills=1),
        ])  # fmt: skip
        url = f"{sidecar.url}/v2/images/{held_image.id}/file"
        with requests.get(url, headers={"X-Auth-Token": ALICE}, stream=True, timeout=60) as first:
            assert first.headers["X-Cachenode-Status"] == "MISS"
            assert hold.reached.wait(30)
            second = sidecar.get(other.id, ALICE, settle=False)
            assert second.status_code == 200 and second.content == other.data
            assert second.headers["X-Cachenode-Status"] == "BYPASS"
            hold.release()
            assert first.content == held_image.data
        sidecar.settle()
    assert regional.requests_for(other.id) == []  # the tier was not asked beyond its limit
    assert sidecar.metric("cachenode_passthrough_total", reason="tiers_busy") == 1
    assert [b.name for b in sidecar.blobs()] == [held_image.id]


@pytest.mark.parametrize("kind", ["glance", "http"])
def test_max_rate_holds_a_tiers_fills_to_the_rate(
    glance: Glance, sidecar_factory, tmp_path: Path, kind: str
) -> None:  # type: ignore[no-untyped-def]
    """Whole streams (glance) and parallel ranged pieces (http) pay into the tier's bucket.

    The bucket starts full (``burst``) and gains ``rate`` a second: a fill of ``size`` bytes
    cannot be over before (size - burst) / rate seconds, most of it waiting on the limit.
    """
    size, rate = 6 * MiB, 2_000_000
    image = glance.create_image(size)
    parallel = 3 if kind == "http" else 1
    limited = {"max_rate": "2MB", "parallel": parallel}
    if kind == "http":
        limited["chunk_size"] = "1MiB"
    blobs = {image.id: image.data} if kind == "http" else {}
    target = None if kind == "http" else glance.url
    with Upstream(blobs=blobs, target=target) as tier, Upstream(target=glance.url) as spare:
        sidecar = operated(sidecar_factory, tmp_path, [
            {"name": "limited", "kind": kind, "url": tier.url, **limited},
            glance_tier("spare", spare.url),
        ])  # fmt: skip
        got = sidecar.get(image.id, ALICE)
    assert got.content == image.data and got.headers["X-Cachenode-Tier"] == "limited"
    assert tier.bytes_for(image.id) == size and spare.requests_for(image.id) == []
    least = (size - burst(rate)) / rate  # about 2.1 s
    took = sidecar.metric("cachenode_fill_duration_seconds_sum")
    assert took >= least
    # Seconds waited, summed over the fill's requests (each of the parallel ones waits its turn)
    waited = sidecar.metric("cachenode_tier_rate_limited_seconds_total", tier="limited")
    assert least / 2 < waited <= parallel * took
    assert sidecar.metric("cachenode_tier_rate_limited_seconds_total", tier="spare") == 0


def test_a_range_beyond_the_fill_pays_into_the_tiers_rate(
    glance: Glance, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A range beyond the bytes landed is fetched from the tier at once (not a fill: no slot),
    and its bytes pay into the tier's max_rate: a lazy boot's reads cannot take a tier past it.
    The bucket holds at most ``burst``, so 3 MiB at 1 MB/s waits at least (3 MiB - burst) / rate."""
    size, rate = 8 * MiB, 1_000_000
    image = glance.create_image(size)
    hold = Fault("hold", at=MiB)
    with Upstream(blobs={image.id: image.data}, faults=[hold]) as tier:
        sidecar = operated(sidecar_factory, tmp_path, [
            {"name": "limited", "kind": "http", "url": tier.url, "max_rate": "1MB"},
        ])  # fmt: skip
        whole = threading.Thread(target=sidecar.get, args=(image.id, ALICE), daemon=True)
        whole.start()
        assert hold.reached.wait(30)  # the fill has 1 MiB and is held there
        start, end = 4 * MiB, 7 * MiB
        got = sidecar.get(image.id, ALICE, settle=False,
                          headers={"Range": f"bytes={start}-{end - 1}"})  # fmt: skip
        assert got.status_code == 206 and got.content == image.data[start:end]
        assert got.headers["X-Cachenode-Tier"] == "limited"
        waited = sidecar.metric("cachenode_tier_rate_limited_seconds_total", tier="limited")
        assert waited >= 0.9 * (end - start - burst(rate)) / rate
        hold.release()
        whole.join(60)
    assert [b.name for b in sidecar.blobs()] == [image.id]


@contextmanager
def dead_port(how: str) -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections (nothing listens), or drops them (a
    listener whose one-connection backlog is full: the kernel drops every further SYN)."""
    if how == "refuses":
        yield free_port()
        return
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())
        yield listener.getsockname()[1]


@pytest.mark.parametrize(("how", "kind"), [("refuses", "connect"), ("blackholes", "timeout")])
def test_a_dead_tier_costs_one_short_connect_then_is_skipped(
    glance: Glance, sidecar_factory, tmp_path: Path, how: str, kind: str
) -> None:  # type: ignore[no-untyped-def]
    """With the default connect_timeout (2 s), not a read timeout nor a retry per request."""
    images = [glance.create_image(MiB) for _ in range(3)]
    with dead_port(how) as port, Upstream(target=glance.url) as origin:
        sidecar = operated(sidecar_factory, tmp_path, [
            glance_tier("dead", f"http://127.0.0.1:{port}", failures_before_cooldown=1),
            glance_tier("origin", origin.url),
        ])  # fmt: skip
        for image in images:
            got = sidecar.get(image.id, ALICE)
            assert got.content == image.data and got.headers["X-Cachenode-Tier"] == "origin"
    # The first fill asked the dead tier once and failed over; the next two did not ask it.
    assert sidecar.metric("cachenode_tier_failures_total", tier="dead", kind=kind) == 1
    dead = [v for (name, labels), v in sidecar.metrics().items()
            if name == "cachenode_tier_failures_total" and ("tier", "dead") in labels]  # fmt: skip
    assert sum(dead) == 1
    assert [len(origin.requests_for(i.id)) for i in images] == [1, 1, 1]

"""The authorization matrix of the core against a glance-api that checks real Keystone tokens
(keystonemiddleware): owner, other project, reader only, no token, bad token, membership
removed, image deactivated, image deleted, user disabled and user deleted; on hits, misses and
joined fills. The fake-auth version (test_authz.py) stays for the fast tests."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import requests

from tests.support.glance import Image
from tests.support.keystone import KeystoneBed
from tests.support.sidecar import Sidecar
from tests.support.upstream import Fault, Upstream


def direct(bed: KeystoneBed, image_id: str, token: str | None) -> requests.Response:
    headers = {"X-Auth-Token": token} if token else {}
    url = f"{bed.glance.url}/v2/images/{image_id}/file"
    return requests.get(url, headers=headers, timeout=60)


def refused_like_glance(
    bed: KeystoneBed, sidecar: Sidecar, image: Image, token: str | None, status: int
) -> None:
    via = sidecar.get(image.id, token, settle=False)
    ref = direct(bed, image.id, token)
    assert (via.status_code, ref.status_code) == (status, status)
    assert image.data[:64] not in via.content
    assert "X-Cachenode-Status" not in via.headers


def cached(bed: KeystoneBed, sidecar: Sidecar) -> Image:
    image = bed.glance.create_image(1 << 20, token=bed.token("alice"))
    first = sidecar.get(image.id, bed.token("alice"))
    assert first.status_code == 200 and first.content == image.data
    assert first.headers["X-Cachenode-Status"] == "MISS"
    return image


def test_hit_is_refused_to_everyone_keystone_or_glance_refuses(
    keystone_bed: KeystoneBed, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    bed = keystone_bed
    sidecar = sidecar_factory(glance_url=bed.glance.url).start()
    image = cached(bed, sidecar)
    hit = sidecar.get(image.id, bed.token("alice"))
    assert hit.headers["X-Cachenode-Status"] == "HIT" and hit.content == image.data

    refused_like_glance(bed, sidecar, image, bed.token("bob"), 404)  # another project
    refused_like_glance(bed, sidecar, image, bed.token("rita"), 403)  # reader only
    refused_like_glance(bed, sidecar, image, None, 401)
    refused_like_glance(bed, sidecar, image, "gAAAAAnot-a-fernet-token", 401)
    assert sidecar.metric("cachenode_requests_total", status="denied") == 4
    assert sidecar.metric("cachenode_requests_total", status="hit") == 1


def test_membership_removed_and_image_deactivated(
    keystone_bed: KeystoneBed, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    bed = keystone_bed
    sidecar = sidecar_factory(glance_url=bed.glance.url).start()
    image = cached(bed, sidecar)
    alice = bed.token("alice")
    bed.glance.share(image.id, bed.project_id("projB"), token=alice)
    shared = sidecar.get(image.id, bed.token("bob"))
    assert shared.status_code == 200 and shared.headers["X-Cachenode-Status"] == "HIT"

    bed.glance.unshare(image.id, bed.project_id("projB"), token=alice)
    refused_like_glance(bed, sidecar, image, bed.token("bob"), 404)

    admin = bed.token_of_admin()
    path = f"/v2/images/{image.id}/actions"
    bed.glance.api("POST", f"{path}/deactivate", admin).raise_for_status()
    refused_like_glance(bed, sidecar, image, bed.token("alice"), 403)
    assert image.id in [b.name for b in sidecar.blobs()]  # kept: it may be reactivated
    bed.glance.api("POST", f"{path}/reactivate", admin).raise_for_status()
    again = sidecar.get(image.id, bed.token("alice"))
    assert again.status_code == 200 and again.headers["X-Cachenode-Status"] == "HIT"


def test_disabled_and_deleted_users_lose_their_hits(
    keystone_bed: KeystoneBed, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    bed = keystone_bed
    sidecar = sidecar_factory(glance_url=bed.glance.url).start()
    image = cached(bed, sidecar)
    for name, how in (
        (f"dis{time.monotonic_ns()}", "disable"),
        (f"del{time.monotonic_ns()}", "delete"),
    ):
        user_id = bed.create_user(name, "projA", ("member", "reader"))
        token = bed.token(name, "projA")
        hit = sidecar.get(image.id, token)
        assert hit.status_code == 200 and hit.headers["X-Cachenode-Status"] == "HIT"
        if how == "disable":
            bed.admin("PATCH", f"/users/{user_id}", json={"user": {"enabled": False}})
        else:
            bed.admin("DELETE", f"/users/{user_id}")
        refused_like_glance(bed, sidecar, image, token, 401)  # the same token, now revoked


def test_deleted_image_leaves_l1_checked_with_the_service_identity(
    keystone_bed: KeystoneBed, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    bed = keystone_bed
    sidecar = sidecar_factory(
        glance_url=bed.glance.url, service_auth=bed.service_auth_app_cred(tmp_path / "secrets")
    ).start()
    image = cached(bed, sidecar)
    bed.glance.api("DELETE", f"/v2/images/{image.id}", bed.token("alice")).raise_for_status()
    refused_like_glance(bed, sidecar, image, bed.token("alice"), 404)
    assert sidecar.blobs() == []
    assert sidecar.metric("cachenode_evictions_total", reason="deleted") == 1
    assert sidecar.metric("cachenode_service_auth_renewals_total", outcome="ok") == 1


def test_miss_refused_before_any_fetch(keystone_bed: KeystoneBed, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    bed = keystone_bed
    image = bed.glance.create_image(1 << 20, token=bed.token("alice"))
    with Upstream(target=bed.glance.url) as l2:
        sidecar = sidecar_factory(
            glance_url=bed.glance.url,
            tiers=[{"name": "regional", "kind": "glance", "url": l2.url}],
        ).start()
        refused_like_glance(bed, sidecar, image, bed.token("bob"), 404)
        refused_like_glance(bed, sidecar, image, bed.token("rita"), 403)
        refused_like_glance(bed, sidecar, image, "gAAAAAnot-a-fernet-token", 401)
        assert l2.requests_for(image.id) == []
        assert sidecar.blobs() == [] and sidecar.partials() == []


def test_joined_fill_needs_its_own_authorization(
    keystone_bed: KeystoneBed, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    bed = keystone_bed
    alice = bed.token("alice")
    image = bed.glance.create_image(4 << 20, token=alice)
    bed.glance.share(image.id, bed.project_id("projB"), token=alice)
    bob, rita = bed.token("bob"), bed.token("rita")  # asked before: the fill must still run
    slow = Fault("throttle", rate=1 << 20, times=-1)  # ~4 s for the whole image
    with Upstream(target=bed.glance.url, faults=[slow]) as l2:
        sidecar = sidecar_factory(
            glance_url=bed.glance.url,
            tiers=[{"name": "regional", "kind": "glance", "url": l2.url}],
        ).start()
        results: dict[str, requests.Response] = {}
        owner = threading.Thread(target=lambda: results.update(alice=sidecar.get(image.id, alice)))
        owner.start()
        deadline = time.monotonic() + 10
        while not sidecar.partials() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sidecar.partials(), "the fill did not start"
        refused_like_glance(bed, sidecar, image, rita, 403)
        refused_like_glance(bed, sidecar, image, None, 401)
        member = sidecar.get(image.id, bob, settle=False)  # joins: allowed
        owner.join()
        assert member.status_code == 200 and member.content == image.data
        assert member.headers["X-Cachenode-Status"] == "JOINED"
        assert results["alice"].content == image.data
        assert len(l2.requests_for(image.id)) == 1

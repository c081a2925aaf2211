"""Glance decides who gets bytes: on hits, misses and joined streams alike (SPEC §3)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import requests

from tests.support.glance import ADMIN, ALICE, ALICE_READER, BOB, CAROL, Glance, Image
from tests.support.sidecar import Sidecar
from tests.support.upstream import Fault, Upstream


def direct(glance: Glance, image_id: str, token: str | None) -> requests.Response:
    headers = {"X-Auth-Token": token} if token else {}
    return requests.get(f"{glance.url}/v2/images/{image_id}/file", headers=headers, timeout=60)


def assert_refused_like_glance(
    glance: Glance, sidecar: Sidecar, image: Image, token: str | None, status: int
) -> None:
    via = sidecar.get(image.id, token, settle=False)
    ref = direct(glance, image.id, token)
    assert (via.status_code, ref.status_code) == (status, status)
    assert via.content == ref.content  # Glance's own body, relayed unchanged
    assert image.data[:64] not in via.content
    assert "X-Cachenode-Status" not in via.headers


def cached(glance: Glance, sidecar: Sidecar, **props: object) -> Image:
    image = glance.create_image(1 << 20, **props)
    first = sidecar.get(image.id, ALICE)
    assert first.status_code == 200 and first.content == image.data
    assert image.id in [b.name for b in sidecar.blobs()]
    return image


def test_hit_is_refused_to_everyone_glance_refuses(glance: Glance, sidecar: Sidecar) -> None:
    image = cached(glance, sidecar)
    hit = sidecar.get(image.id, ALICE)
    assert hit.headers["X-Cachenode-Status"] == "HIT" and hit.content == image.data

    assert_refused_like_glance(glance, sidecar, image, BOB, 404)  # another project
    assert_refused_like_glance(glance, sidecar, image, ALICE_READER, 403)  # may see, not download
    assert_refused_like_glance(glance, sidecar, image, None, 401)
    assert_refused_like_glance(glance, sidecar, image, "not-a-token", 401)
    assert sidecar.metric("cachenode_requests_total", status="denied") == 4
    assert sidecar.metric("cachenode_requests_total", status="hit") == 1


def test_removed_membership_and_deactivation(glance: Glance, sidecar: Sidecar) -> None:
    image = cached(glance, sidecar)
    glance.share(image.id, "projC")
    shared = sidecar.get(image.id, CAROL)
    assert shared.status_code == 200 and shared.content == image.data
    assert shared.headers["X-Cachenode-Status"] == "HIT"

    glance.unshare(image.id, "projC")
    assert_refused_like_glance(glance, sidecar, image, CAROL, 404)

    glance.api("POST", f"/v2/images/{image.id}/actions/deactivate", ADMIN).raise_for_status()
    assert_refused_like_glance(glance, sidecar, image, ALICE, 403)
    assert image.id in [b.name for b in sidecar.blobs()]  # kept: it may be reactivated
    glance.api("POST", f"/v2/images/{image.id}/actions/reactivate", ADMIN).raise_for_status()
    again = sidecar.get(image.id, ALICE)
    assert again.status_code == 200 and again.headers["X-Cachenode-Status"] == "HIT"


def test_deleted_image_is_refused_and_leaves_l1(
    glance: Glance, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    token = tmp_path / "service.token"
    token.write_text(ADMIN)
    sidecar = sidecar_factory(service_auth={"token_file": str(token)}).start()
    image = cached(glance, sidecar)
    glance.api("DELETE", f"/v2/images/{image.id}").raise_for_status()

    assert_refused_like_glance(glance, sidecar, image, ALICE, 404)
    assert sidecar.blobs() == []
    assert sidecar.metric("cachenode_evictions_total", reason="deleted") == 1
    assert sidecar.metric("cachenode_cache_entries") == 0


def test_miss_refused_before_any_fetch(glance: Glance, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(1 << 20)
    with Upstream(target=glance.url) as l2:
        sidecar = sidecar_factory(
            tiers=[{"name": "regional", "kind": "glance", "url": l2.url}]
        ).start()
        assert_refused_like_glance(glance, sidecar, image, BOB, 404)
        assert_refused_like_glance(glance, sidecar, image, ALICE_READER, 403)
        assert l2.requests_for(image.id) == []
        assert sidecar.blobs() == [] and sidecar.partials() == []


def test_joined_stream_needs_its_own_authorization(glance: Glance, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(4 << 20)
    glance.share(image.id, "projC")
    slow = Fault("throttle", rate=2 << 20, times=-1)  # ~2 s for the whole image
    with Upstream(target=glance.url, faults=[slow]) as l2:
        sidecar = sidecar_factory(
            tiers=[{"name": "regional", "kind": "glance", "url": l2.url}]
        ).start()
        results: dict[str, requests.Response] = {}
        owner = threading.Thread(target=lambda: results.update(alice=sidecar.get(image.id, ALICE)))
        owner.start()
        deadline = time.monotonic() + 10
        while not sidecar.partials() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sidecar.partials(), "the fill did not start"
        assert_refused_like_glance(glance, sidecar, image, BOB, 404)
        assert_refused_like_glance(glance, sidecar, image, ALICE_READER, 403)
        member = sidecar.get(image.id, CAROL, settle=False)  # joins the running fill: allowed
        owner.join()
        assert member.status_code == 200 and member.content == image.data
        assert member.headers["X-Cachenode-Status"] == "JOINED"
        assert results["alice"].content == image.data
        assert len(l2.requests_for(image.id)) == 1


def test_positive_decisions_are_reused_for_ttl_at_most(glance: Glance, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    sidecar = sidecar_factory(authz={"ttl": "4s"}).start()
    image = cached(glance, sidecar)
    glance.share(image.id, "projC")
    granted_at = time.monotonic()
    assert sidecar.get(image.id, CAROL).status_code == 200
    glance.unshare(image.id, "projC")
    within = sidecar.get(image.id, CAROL, settle=False)  # well inside the 4 s: reused
    assert time.monotonic() - granted_at < 4
    assert within.status_code == 200 and within.content == image.data
    assert sidecar.metric("cachenode_authz_total", outcome="cached") == 1
    time.sleep(max(0.0, 4.3 - (time.monotonic() - granted_at)))
    after = sidecar.get(image.id, CAROL)
    assert after.status_code == 404 and image.data[:64] not in after.content


def create_without_data(glance: Glance) -> str:
    """An image that stays ``queued``: created, never uploaded."""
    body = {
        "name": f"queued-{time.monotonic_ns()}",
        "disk_format": "raw",
        "container_format": "bare",
    }
    r = glance.api("POST", "/v2/images", json=body)
    r.raise_for_status()
    return str(r.json()["id"])


def test_an_image_without_data_gets_glances_204(glance: Glance, sidecar: Sidecar) -> None:
    # glance-api (uWSGI) drops the connection on the probe's ranged GET of such an image: no
    # usable answer for this one request, which is not "Glance is down".
    image_id = create_without_data(glance)
    ref = direct(glance, image_id, ALICE)
    via = sidecar.get(image_id, ALICE)
    assert (via.status_code, ref.status_code) == (204, 204)
    assert via.content == ref.content == b""
    assert via.headers["X-Cachenode-Status"] == "BYPASS"
    assert sidecar.metric("cachenode_passthrough_total", reason="undecided") == 1
    assert sidecar.metric("cachenode_authz_total", outcome="undecided") == 1
    assert sidecar.metric("cachenode_authz_total", outcome="error") == 0
    refused, ref = sidecar.get(image_id, BOB), direct(glance, image_id, BOB)
    assert (refused.status_code, refused.content) == (404, ref.content)


def test_an_empty_image_is_allowed_and_passed_through(glance: Glance, sidecar: Sidecar) -> None:
    # Glance answers the probe of a 0-byte image with its own 416 (no byte 0): allowed, no data.
    image = glance.create_image(0)
    ref = direct(glance, image.id, ALICE)
    via = sidecar.get(image.id, ALICE)
    assert (via.status_code, ref.status_code) == (200, 200)
    assert via.content == ref.content == b""
    assert via.headers["X-Cachenode-Status"] == "BYPASS"
    assert sidecar.metric("cachenode_passthrough_total", reason="no_data") == 1
    assert sidecar.metric("cachenode_authz_total", outcome="allowed") == 1
    refused, ref = sidecar.get(image.id, ALICE_READER), direct(glance, image.id, ALICE_READER)
    assert (refused.status_code, refused.content) == (403, ref.content)


def test_a_store_without_random_access_grants_only_after_authorization(
    glance_swift: Glance, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    # Glance on Swift answers the probe's Range with 400 "random access not supported", which its
    # serializer raises only once the download was authorized: that exact 400 is a grant.
    image = glance_swift.create_image(1 << 20)
    probe = glance_swift.api(
        "GET", f"/v2/images/{image.id}/file", ALICE, headers={"Range": "bytes=0-0"}
    )
    assert probe.status_code == 400 and b"randomly" in probe.content
    sidecar = sidecar_factory(glance_url=glance_swift.url).start()
    for status in ("MISS", "HIT"):
        resp = sidecar.get(image.id, ALICE)
        assert resp.status_code == 200 and resp.content == image.data
        assert resp.headers["X-Cachenode-Status"] == status
    for token, refused in ((BOB, 404), (ALICE_READER, 403), ("not-a-token", 401)):
        assert_refused_like_glance(glance_swift, sidecar, image, token, refused)
    assert sidecar.metric("cachenode_authz_total", outcome="allowed") == 2


def test_a_refusal_is_glances_answer_to_the_callers_own_request(
    glance: Glance, sidecar: Sidecar
) -> None:
    """Glance shapes its refusals by the caller's Accept (JSON for openstacksdk, HTML or text
    for others): on a hit and on a miss, the caller gets what Glance gives its own request."""
    hit, cold = cached(glance, sidecar), glance.create_image(1 << 20)
    for image in (hit, cold):
        for accept in ("application/json", "text/html", "text/plain"):
            for token, status in ((BOB, 404), (ALICE_READER, 403), ("junk", 401)):
                headers = {"X-Auth-Token": token, "Accept": accept}
                url = f"/v2/images/{image.id}/file"
                via = requests.get(sidecar.url + url, headers=headers, timeout=60)
                ref = requests.get(glance.url + url, headers=headers, timeout=60)
                assert (via.status_code, ref.status_code) == (status, status)
                assert via.headers["Content-Type"] == ref.headers["Content-Type"]
                assert via.content == ref.content and image.data[:64] not in via.content
    assert cold.id not in [b.name for b in sidecar.blobs()]

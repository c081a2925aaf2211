"""Glance's locations API (a swift tier's ``locations: api``), against the real services.

A cloud's Glance hides locations from users, and glance_store may spread images over containers
(``swift_store_multiple_containers_seed``): then only Glance knows where an object is, and tells
only an identity with the service role that can see the image. With the option on and such an
identity the Swift tier reads the object Glance names; with it off, or refused, it reads the
single-tenant layout, finds nothing there, and the next tier serves the caller.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from tests.support.glance import ADMIN, ALICE, BOB, Glance
from tests.support.keystone import KeystoneBed
from tests.support.swift import Swift
from tests.support.upstream import Upstream

SERVICE_ADMIN = "cachenode:service:service,admin"
SERVICE_ONLY = "cachenode:service:service"
TIER_FAILURES = "cachenode_tier_failures_total"


def hidden(glance: Glance, image_id: str) -> None:
    """The caller's record says nothing of where the data is; the object is not at glance/ID."""
    record = glance.api("GET", f"/v2/images/{image_id}").json()
    assert not record.get("locations") and "direct_url" not in record


def tiers(swift: Swift, key: Path, regional: str, locations: str) -> list[dict[str, object]]:
    return [
        {"name": "objectstore", "kind": "swift", "url": swift.storage_url,
         "temp_url_key_file": str(key), "locations": locations},
        {"name": "regional", "kind": "glance", "url": regional},
    ]  # fmt: skip


def service_auth(tmp_path: Path, token: str) -> dict[str, str]:
    path = tmp_path / "service.token"
    path.write_text(token + "\n")
    return {"token_file": str(path)}


def test_the_object_glance_names_is_read_from_swift_with_the_locations_api(
    glance_swift_hidden: Glance, swift: Swift, temp_url_key: Path, tmp_path: Path, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    images = [glance_swift_hidden.create_image(3 << 20) for _ in range(2)]
    for image in images:
        hidden(glance_swift_hidden, image.id)
        assert swift.head(f"glance_{image.id[:3]}", image.id).status_code == 200
        assert swift.head("glance", image.id).status_code == 404
    with Upstream(target=glance_swift_hidden.url) as regional:
        (tmp_path / "admin.token").write_text("adm\n")
        sidecar = sidecar_factory(
            glance_url=glance_swift_hidden.url,
            tiers=tiers(swift, temp_url_key, regional.url, "api"),
            service_auth=service_auth(tmp_path, SERVICE_ADMIN),
            admin={"token_file": str(tmp_path / "admin.token")},
        ).start()
        for image in images:
            resp = sidecar.get(image.id, ALICE)
            assert resp.status_code == 200 and resp.content == image.data
            assert resp.headers["X-Cachenode-Status"] == "MISS"
            assert resp.headers["X-Cachenode-Tier"] == "objectstore"
            assert regional.requests_for(image.id) == []  # Glance sent none of its data
        requests.post(
            sidecar.admin_url + "/admin/v1/evict", json={"ids": [images[0].id]},
            headers={"Authorization": "Bearer adm"}, timeout=10,
        ).raise_for_status()  # fmt: skip
        again = sidecar.get(images[0].id, ALICE)  # the answer is kept: Glance is not asked again
        assert again.headers["X-Cachenode-Tier"] == "objectstore"
        assert again.content == images[0].data
    assert sidecar.metric("cachenode_locations_lookups_total", outcome="answered") == 2
    assert sidecar.metric("cachenode_upstream_bytes_total", tier="objectstore") == 3 * (3 << 20)
    assert sidecar.metric(TIER_FAILURES, tier="objectstore", kind="not_found") == 0


def test_the_service_role_alone_is_answered_for_an_image_it_can_see(
    glance_swift_hidden: Glance, swift: Swift, temp_url_key: Path, tmp_path: Path, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    image = glance_swift_hidden.create_image(2 << 20, token=ADMIN, visibility="public")
    hidden(glance_swift_hidden, image.id)
    with Upstream(target=glance_swift_hidden.url) as regional:
        sidecar = sidecar_factory(
            glance_url=glance_swift_hidden.url,
            tiers=tiers(swift, temp_url_key, regional.url, "api"),
            service_auth=service_auth(tmp_path, SERVICE_ONLY),
        ).start()
        resp = sidecar.get(image.id, BOB)  # any project may download a public image
        assert resp.status_code == 200 and resp.content == image.data
        assert resp.headers["X-Cachenode-Tier"] == "objectstore"
        assert regional.requests_for(image.id) == []
    assert sidecar.metric("cachenode_locations_lookups_total", outcome="answered") == 1


@pytest.mark.parametrize(
    ("locations", "identity", "refused"),
    [("record", SERVICE_ADMIN, 0), ("api", SERVICE_ONLY, 1)],
    ids=["off", "refused"],
)
def test_off_or_refused_the_tier_reads_the_single_tenant_layout(
    glance_swift_hidden: Glance,
    swift: Swift,
    temp_url_key: Path,
    tmp_path: Path,
    sidecar_factory,
    locations: str,
    identity: str,
    refused: int,
) -> None:  # type: ignore[no-untyped-def]
    image = glance_swift_hidden.create_image(2 << 20)
    hidden(glance_swift_hidden, image.id)
    # The service role alone cannot see alice's private image: Glance answers 404.
    api = f"/v2/images/{image.id}/locations"
    assert glance_swift_hidden.api("GET", api, SERVICE_ONLY).status_code == 404
    assert glance_swift_hidden.api("GET", api, ALICE).status_code == 403  # not for users
    with Upstream(target=glance_swift_hidden.url) as regional:
        sidecar = sidecar_factory(
            glance_url=glance_swift_hidden.url,
            tiers=tiers(swift, temp_url_key, regional.url, locations),
            service_auth=service_auth(tmp_path, identity),
        ).start()
        resp = sidecar.get(image.id, ALICE)
        assert resp.status_code == 200 and resp.content == image.data
        assert resp.headers["X-Cachenode-Tier"] == "regional"
        assert len(regional.requests_for(image.id)) == 1
    assert sidecar.metric("cachenode_locations_lookups_total", outcome="refused") == refused
    assert sidecar.metric("cachenode_locations_lookups_total", outcome="answered") == 0
    assert sidecar.metric(TIER_FAILURES, tier="objectstore", kind="not_found") == 1
    assert SERVICE_ONLY not in sidecar.log() and SERVICE_ADMIN not in sidecar.log()


def test_which_real_keystone_roles_the_locations_api_wants(
    keystone_bed: KeystoneBed, tmp_path: Path
) -> None:
    """With real tokens: the cachenode user (service, member, reader in project service) is
    refused a private image of another project; a user with service and admin gets its
    locations. This is the exposure the README describes."""
    import asyncio

    from cachenode.config import parse_config
    from cachenode.glance import GlanceClient
    from cachenode.identity import ServiceIdentity
    from cachenode.locations import Locator
    from cachenode.metrics import Metrics
    from cachenode.proxy import Pools

    image = keystone_bed.glance.create_image(1 << 20, token=keystone_bed.token("alice"))
    keystone_bed.create_user("locator", "service", ("service", "admin"))
    plain = keystone_bed.service_auth_password(tmp_path / "plain")
    admin = {**keystone_bed.service_auth_password(tmp_path / "admin"), "username": "locator"}
    (tmp_path / "admin" / "cachenode.password").write_text("locatorpass\n")

    async def ask(auth: dict[str, str]) -> tuple[tuple[str, ...], Metrics]:
        cfg = parse_config({"glance": {"url": keystone_bed.glance.url}, "service_auth": auth})
        metrics, pools = Metrics(), Pools.open(30.0)
        identity = ServiceIdentity.from_config(cfg, metrics)
        assert identity is not None
        glance = GlanceClient(pools.short, cfg.glance_url, 30.0)
        try:
            return await Locator(glance, identity, metrics).locations(image.id), metrics
        finally:
            await pools.close()

    urls, metrics = asyncio.run(ask(plain))
    assert urls == () and metrics.locations_lookups.labels("refused")._value.get() == 1
    urls, metrics = asyncio.run(ask(admin))
    assert len(urls) == 1 and urls[0].startswith("file:///") and urls[0].endswith(image.id)
    assert metrics.locations_lookups.labels("answered")._value.get() == 1

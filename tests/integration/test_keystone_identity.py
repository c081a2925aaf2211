"""The sidecar's own identity from Keystone (``service_auth`` with keystoneauth1 options): its
token is renewed before it expires, without a restart; the caller's X-Service-Token reaches Glance
untouched. Keystone's tokens live 60 s in this bed (tests/support/keystone.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import requests

from cachenode.config import parse_config
from cachenode.identity import ServiceIdentity
from cachenode.metrics import Metrics
from tests.support.glance import Image
from tests.support.keystone import TOKEN_LIFETIME, KeystoneBed
from tests.support.sidecar import Sidecar


def community_image(bed: KeystoneBed, size: int = 1 << 20) -> Image:
    """An image of alice's that every project may see and download (so the sidecar may warm it)."""
    return bed.glance.create_image(size, token=bed.token("alice"), visibility="community")


def test_the_token_is_renewed_within_the_margin_and_only_then(
    keystone_bed: KeystoneBed, tmp_path: Path
) -> None:
    # The clock is injected: the renewal decision is shown without waiting for Keystone's clock.
    auth = keystone_bed.service_auth_password(tmp_path)
    cfg = parse_config({"glance": {"url": keystone_bed.glance.url}, "service_auth": auth})
    now = [time.time()]
    metrics = Metrics()
    metrics.prime([])
    identity = ServiceIdentity(keystone=cfg.service_keystone, metrics=metrics, clock=lambda: now[0])

    async def token() -> str:
        return dict((await identity.credentials()).headers)["X-Auth-Token"]

    async def scenario() -> tuple[str, str]:
        first = await token()
        now[0] += TOKEN_LIFETIME * 0.7  # 18 s left of 60: more than a quarter, kept
        assert await token() == first
        now[0] += TOKEN_LIFETIME * 0.1  # 12 s left: less than a quarter, renewed
        second = await token()
        assert second != first
        now[0] = time.time()  # back to Keystone's clock: the new token has its 60 s
        assert await token() == second
        return first, second

    first, second = asyncio.run(scenario())
    renewals = metrics.service_auth_renewals
    assert renewals.labels("ok")._value.get() == 2 and renewals.labels("error")._value.get() == 0
    # Both are real tokens Keystone issued for the cachenode user.
    for tok in (first, second):
        r = keystone_bed.glance.api("GET", "/v2/images?limit=1", tok)
        assert r.status_code == 200


def test_warm_and_eviction_check_still_work_after_the_first_token_expired(
    keystone_bed: KeystoneBed, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # Bounded real wait (~65 s): Keystone must have expired the sidecar's first token.
    bed = keystone_bed
    (tmp_path / "admin.token").write_text("s3cret-admin\n")
    sidecar: Sidecar = sidecar_factory(
        glance_url=bed.glance.url,
        admin={"token_file": str(tmp_path / "admin.token")},
        service_auth=bed.service_auth_password(tmp_path / "secrets"),
    ).start()
    early, late = community_image(bed), community_image(bed)
    started = time.monotonic()
    assert warm(sidecar, early.id) == 202  # filling
    sidecar.settle()
    assert early.id in [b.name for b in sidecar.blobs()]
    assert sidecar.metric("cachenode_service_auth_renewals_total", outcome="ok") == 1

    time.sleep(max(0.0, started + TOKEN_LIFETIME + 5 - time.monotonic()))
    assert warm(sidecar, late.id) == 202  # filling, with a renewed token
    sidecar.settle()
    hit = sidecar.get(late.id, bed.token("bob"))
    assert hit.headers["X-Cachenode-Status"] == "HIT" and hit.content == late.data

    # "deleted or not yours?": asked of Glance with the renewed token; an expired one gets 401
    # and the entry would stay.
    bed.glance.api("DELETE", f"/v2/images/{early.id}", bed.token("alice")).raise_for_status()
    assert sidecar.get(early.id, bed.token("bob")).status_code == 404
    assert early.id not in [b.name for b in sidecar.blobs()]
    assert sidecar.metric("cachenode_evictions_total", reason="deleted") == 1
    assert sidecar.metric("cachenode_service_auth_renewals_total", outcome="ok") == 2
    assert sidecar.metric("cachenode_service_auth_renewals_total", outcome="error") == 0


def warm(sidecar: Sidecar, image_id: str) -> int:
    r = requests.post(
        f"{sidecar.admin_url}/admin/v1/images/{image_id}/warm",
        headers={"Authorization": "Bearer s3cret-admin"},
        timeout=60,
    )
    return r.status_code


def test_the_callers_service_token_reaches_glance_untouched(
    keystone_bed: KeystoneBed, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    # keystonemiddleware in this Glance refuses (401) a request whose X-Service-Token is invalid
    # or lacks the service role: what it judged is what the caller sent.
    bed = keystone_bed
    sidecar: Sidecar = sidecar_factory(glance_url=bed.glance.url).start()
    alice = bed.token("alice")
    image = bed.glance.create_image(1 << 20, token=alice)
    service = bed.token("cachenode")  # has the service role, as nova's own token has
    cases = (
        (service, 200),
        ("gAAAAAnot-a-service-token", 401),
        (bed.token("bob"), 401),  # a valid token without the service role
    )
    for status in ("MISS", "HIT"):
        for service_token, expected in cases:
            headers = {"X-Auth-Token": alice, "X-Service-Token": service_token}
            via = sidecar.get(image.id, None, headers=headers)
            ref = requests.get(
                f"{bed.glance.url}/v2/images/{image.id}/file", headers=headers, timeout=60
            )
            assert (via.status_code, ref.status_code) == (expected, expected)
            if expected == 200:
                assert via.content == image.data
                assert via.headers["X-Cachenode-Status"] == status


def test_cli_warm_by_tag_asks_glance_with_the_application_credential(
    keystone_bed: KeystoneBed, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    bed = keystone_bed
    (tmp_path / "admin.token").write_text("s3cret-admin\n")
    sidecar: Sidecar = sidecar_factory(
        glance_url=bed.glance.url,
        admin={"token_file": str(tmp_path / "admin.token")},
        service_auth=bed.service_auth_app_cred(tmp_path / "secrets"),
    ).start()
    tag = f"golden-{time.monotonic_ns()}"
    # Public: Glance lists community images only to a query for visibility=community.
    image = bed.glance.create_image(1 << 20, token=bed.token_of_admin(), visibility="public",
                                    tags=[tag])  # fmt: skip
    warmed = subprocess.run(
        [sys.executable, "-m", "cachenode", "warm", "--tag", tag, "-c", str(sidecar.config_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert warmed.returncode == 0, warmed.stderr
    sidecar.settle()
    assert [b.name for b in sidecar.blobs()] == [image.id]

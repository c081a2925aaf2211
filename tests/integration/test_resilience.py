"""No worse than no cache: Glance down, callers gone, hostile input (SPEC §2)."""

from __future__ import annotations

import socket
from pathlib import Path

import requests

from tests.support.clients import Caller, start, wait_for
from tests.support.glance import ALICE, BOB, Glance
from tests.support.health import AdminApi
from tests.support.sidecar import Sidecar
from tests.support.upstream import Fault, Upstream

FAULTS = Path(__file__).resolve().parents[1] / "support" / "faults"


def test_stale_if_error_serves_recently_approved_hits_while_glance_is_down(
    glance: Glance, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    cold = glance.create_image(1 << 20)
    with Upstream(target=glance.url) as front:  # glance.url as the sidecar sees it; stopped below
        image = glance.create_image(1 << 20)
        strict = sidecar_factory(
            "strict",
            glance_url=front.url,
            tiers=[{"name": "glance", "kind": "glance", "url": glance.url}],
        ).start()
        lenient = sidecar_factory(
            "lenient",
            glance_url=front.url,
            authz={"ttl": "0s", "stale_if_error": "5m"},
            tiers=[{"name": "glance", "kind": "glance", "url": glance.url}],
        ).start()
        for car in (strict, lenient):
            assert car.get(image.id, ALICE).status_code == 200
    # glance.url is down from here on.
    served = lenient.get(image.id, ALICE)
    assert served.status_code == 200 and served.content == image.data
    assert served.headers["X-Cachenode-Status"] == "HIT"
    assert lenient.metric("cachenode_authz_total", outcome="stale") == 1
    for car, token, image_id in (
        (strict, ALICE, image.id),
        (lenient, BOB, image.id),
        (lenient, ALICE, cold.id),
    ):
        refused = car.get(image_id, token)  # never approved, or not a hit: no bytes without Glance
        assert refused.status_code == 503
        assert image.data[:64] not in refused.content
    assert lenient.metric("cachenode_authz_total", outcome="error") == 2


def test_a_caller_that_leaves_does_not_stop_the_fill(glance: Glance, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(8 << 20)
    hold = Fault("hold", at=1 << 20)  # the fill is at most 1 MiB in when its only caller leaves
    with Upstream(target=glance.url, faults=[hold]) as l2:
        sidecar = sidecar_factory(
            tiers=[{"name": "regional", "kind": "glance", "url": l2.url}]
        ).start()
        with requests.get(
            f"{sidecar.url}/v2/images/{image.id}/file",
            headers={"X-Auth-Token": ALICE},
            stream=True,
            timeout=30,
        ) as resp:
            assert resp.status_code == 200
            assert resp.raw.read(1) == image.data[:1]
        hold.release()  # the caller is gone: the rest of the image comes now
        sidecar.settle()
        assert sidecar.metric("cachenode_fills_total", tier="regional", outcome="ok") == 1
        assert [b.name for b in sidecar.blobs()] == [image.id]
        hit = sidecar.get(image.id, ALICE)
        assert hit.headers["X-Cachenode-Status"] == "HIT" and hit.content == image.data
        assert len(l2.requests_for(image.id)) == 1 and l2.bytes_for(image.id) == len(image.data)


def test_what_a_tier_sent_reaches_callers_while_it_pauses(glance: Glance, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    """A tier that pauses mid-body (a slow origin, a stall before a failover): the bytes it sent
    before the pause stream to the callers now, not when it goes on or times out."""
    image = glance.create_image(4 << 20)
    hold = Fault("hold", at=1 << 20)
    with Upstream(target=glance.url, faults=[hold]) as l2:
        sidecar = sidecar_factory(
            tiers=[{"name": "regional", "kind": "glance", "url": l2.url}]
        ).start()
        caller = Caller(f"{sidecar.url}/v2/images/{image.id}/file", ALICE)
        thread = start(caller)
        wait_for(hold.reached.is_set)  # 1 MiB is in the sidecar's socket; the tier sends no more
        sent = lambda: sidecar.metric("cachenode_served_bytes_total", tier="regional")  # noqa: E731
        wait_for(lambda: sent() == 1 << 20, timeout=10)  # the read timeout is 30 s
        hold.release()
        thread.join(60)
        assert caller.status == 200 and caller.sha512 == image.sha512


def test_hostile_input_is_answered_and_harms_nothing(glance: Glance, sidecar: Sidecar) -> None:
    image = glance.create_image(1 << 20)
    assert sidecar.get(image.id, ALICE).status_code == 200
    for path in (
        "/v2/images/..%2F..%2Fetc%2Fpasswd/file",
        "/v2/images/%00/file",
        f"/v2/images/{image.id.upper()}/file",
        "/v2/images//file",
    ):
        resp = requests.get(sidecar.url + path, headers={"X-Auth-Token": ALICE}, timeout=10)
        direct = requests.get(glance.url + path, headers={"X-Auth-Token": ALICE}, timeout=10)
        assert resp.status_code == direct.status_code >= 400, path  # Glance's answer, passed on
        assert image.data[:64] not in resp.content
    refused = sidecar.get(image.id, None, headers={"X-Auth-Token": "\u00e9\u00e9:x:y"})
    assert refused.status_code == 401  # not ASCII: no OpenStack token, and not forwarded altered
    for token in ("a" * 8000, ":::", "alice:projA:", "bob:projB:reader,member"):
        resp = sidecar.get(image.id, None, headers={"X-Auth-Token": token})
        direct = requests.get(
            f"{glance.url}/v2/images/{image.id}/file", timeout=10, headers={"X-Auth-Token": token}
        )
        assert resp.status_code == direct.status_code >= 400, token
        assert image.data[:64] not in resp.content
    with socket.create_connection(("127.0.0.1", sidecar.port)) as raw:
        raw.sendall(b"GET /v2/images/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _status(raw.recv(100)) == 400  # from aiohttp's parser, before any handler
    with socket.create_connection(("127.0.0.1", sidecar.port)) as raw:
        raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert _status(raw.recv(100)) == 400
    assert [b.name for b in sidecar.blobs()] == [image.id] and sidecar.partials() == []
    again = sidecar.get(image.id, ALICE)  # still serving
    assert again.status_code == 200 and again.headers["X-Cachenode-Status"] == "HIT"


def test_a_broken_catalog_costs_no_download_and_loses_no_access_time(
    glance: Glance, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The catalog is read once, at start: once it breaks, L1 still serves what it holds, and the
    access times it cannot write are kept until it heals."""
    trigger = tmp_path / "catalog-broken"
    faults = {"PYTHONPATH": str(FAULTS), "CACHENODE_FAULT_CATALOG": str(trigger)}
    admin_token = tmp_path / "admin.token"
    admin_token.write_text("resilience-admin\n")
    sidecar = sidecar_factory(
        cache={"access_flush_interval": "0.1s"}, admin={"token_file": str(admin_token)}
    ).start(env=faults)
    admin = AdminApi(sidecar, "resilience-admin")
    image = glance.create_image(1 << 20)
    assert sidecar.get(image.id, ALICE).headers["X-Cachenode-Status"] == "MISS"
    trigger.touch()  # from now on, the catalog cannot be read
    for _ in range(3):
        resp = sidecar.get(image.id, ALICE)
        assert resp.status_code == 200 and resp.content == image.data
        assert resp.headers["X-Cachenode-Status"] == "HIT"
    wait_for(lambda: "access times of 1 L1 entries not written" in sidecar.log())
    assert "injected" in sidecar.log()
    trigger.unlink()  # healed: the hits reach the catalog, and survive a restart
    sidecar.stop()
    sidecar.start()
    assert admin.cached()[image.id]["hits"] == 3


def _status(answer: bytes) -> int:
    """The status code of a raw HTTP answer's status line."""
    return int(answer.split(b"\r\n", 1)[0].split(b" ")[1])

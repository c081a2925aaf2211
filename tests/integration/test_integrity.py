"""Bad bytes never become a clean body, and failover gives one uninterrupted body (SPEC §3)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import glanceclient
import pytest
from keystoneauth1 import session as ks_session
from keystoneauth1 import token_endpoint

from tests.support.clients import Caller, run_all
from tests.support.glance import ALICE, Glance
from tests.support.sidecar import Sidecar
from tests.support.upstream import Fault, Upstream

GLANCE_CLI = str(Path(sys.executable).parent / "glance")


def glance_tier(name: str, url: str, **extra: object) -> dict[str, object]:
    return {"name": name, "kind": "glance", "url": url, **extra}


def url(sidecar: Sidecar, image_id: str) -> str:
    return f"{sidecar.url}/v2/images/{image_id}/file"


def test_a_flipped_byte_cuts_every_caller_and_commits_nothing(
    glance: Glance, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(6 << 20)
    flip = Fault("flip", at=(3 << 20) + 12345, times=-1)
    throttle = Fault("throttle", rate=8 << 20, times=-1)  # long enough for every caller to join
    with (
        Upstream(target=glance.url, faults=[flip, throttle]) as bad,
        Upstream(target=glance.url) as good,
    ):
        sidecar = sidecar_factory(
            tiers=[glance_tier("regional", bad.url), glance_tier("central", good.url)]
        ).start()
        callers = run_all([Caller(url(sidecar, image.id), ALICE) for _ in range(5)])
        for caller in callers:
            assert caller.status == 200
            assert caller.error is not None, "a caller finished a body that failed its hash"
            assert caller.received < len(image.data)
        assert sidecar.blobs() == [] and sidecar.partials() == []
        assert len(bad.requests_for(image.id)) == 1 and good.requests_for(image.id) == []
        assert sidecar.metric("cachenode_integrity_failures_total", tier="regional") == 1
        assert sidecar.metric("cachenode_fills_total", tier="regional", outcome="integrity") == 1

        # The next attempt skips the tier that sent bad bytes.
        again = sidecar.get(image.id, ALICE)
        assert again.status_code == 200 and again.content == image.data
        assert again.headers["X-Cachenode-Tier"] == "central"
        assert len(bad.requests_for(image.id)) == 1 and len(good.requests_for(image.id)) == 1
        assert [b.name for b in sidecar.blobs()] == [image.id]


def test_glanceclient_reports_an_error_not_a_corrupt_image(
    glance: Glance, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    by_cli, by_api = glance.create_image(2 << 20), glance.create_image(2 << 20)
    with Upstream(target=glance.url, faults=[Fault("flip", at=1000, times=-1)]) as bad:
        sidecar = sidecar_factory(tiers=[glance_tier("regional", bad.url)]).start()

        out = tmp_path / "out.raw"
        cli = subprocess.run(
            [
                GLANCE_CLI,
                "--os-image-url",
                sidecar.url,
                "--os-auth-token",
                ALICE,
                "image-download",
                "--file",
                str(out),
                by_cli.id,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode != 0
        assert not out.exists() or out.read_bytes() != by_cli.data

        session = ks_session.Session(auth=token_endpoint.Token(sidecar.url, ALICE))
        client = glanceclient.Client("2", session=session, endpoint_override=sidecar.url)
        with pytest.raises(Exception) as failure:
            b"".join(client.images.data(by_api.id))
        # Cut before the end: glanceclient never got a whole body to find a bad hash in.
        assert "Corrupt image download" not in str(failure.value)
        assert sidecar.blobs() == [] and sidecar.partials() == []

        # The only tier is skipped for these images now: Glance itself answers, correctly.
        again = sidecar.get(by_api.id, ALICE)
        assert again.status_code == 200 and again.content == by_api.data
        assert again.headers["X-Cachenode-Status"] == "BYPASS"
        assert len(bad.requests_for(by_api.id)) == 1


def test_an_oversized_body_is_an_integrity_failure(glance: Glance, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(4 << 20)
    with Upstream(blobs={image.id: image.data + b"trailing garbage"}) as mirror:
        sidecar = sidecar_factory(
            tiers=[
                {"name": "mirror", "kind": "http", "url": mirror.url},
                glance_tier("central", glance.url),
            ]
        ).start()
        first = Caller(url(sidecar, image.id), ALICE)
        first.run()
        # Cut mid-body, or refused outright when the excess came before any byte was sent.
        assert (first.status == 200 and first.error is not None) or first.status == 502
        assert first.received < len(image.data)
        assert sidecar.blobs() == [] and sidecar.partials() == []
        assert sidecar.metric("cachenode_integrity_failures_total", tier="mirror") == 1
        second = sidecar.get(image.id, ALICE)
        assert second.content == image.data and second.headers["X-Cachenode-Tier"] == "central"


@pytest.mark.parametrize("fault", ["reset", "truncate", "stall"])
def test_failover_resumes_at_the_offset_reached(
    glance: Glance, sidecar_factory, fault: str
) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(6 << 20)
    at = (2 << 20) + 777
    with (
        Upstream(target=glance.url, faults=[Fault(fault, at=at, seconds=30)]) as first,
        Upstream(target=glance.url) as second,
    ):
        sidecar = sidecar_factory(
            tiers=[
                glance_tier("regional", first.url, read_timeout="1s"),
                glance_tier("central", second.url),
            ]
        ).start()
        started = time.monotonic()
        caller = Caller(url(sidecar, image.id), ALICE)
        caller.run()
        assert caller.error is None and caller.status == 200
        assert caller.sha512 == image.sha512  # one uninterrupted, correct body
        assert time.monotonic() - started < 25  # a stall did not wait out the stall
        assert first.bytes_for(image.id) == at
        resumed = second.requests_for(image.id)
        assert len(resumed) == 1 and resumed[0].range is not None
        # Resumed where the fill's bytes ended: at most `at` (the last bytes before a broken
        # connection can be lost in flight), never from the start.
        offset = int(resumed[0].range.removeprefix("bytes=").rstrip("-"))
        assert 0 < offset <= at
        assert second.bytes_for(image.id) == len(image.data) - offset
        kind = {"reset": "short_read", "truncate": "short_read", "stall": "timeout"}[fault]
        assert sidecar.metric("cachenode_tier_failures_total", tier="regional", kind=kind) == 1
        sidecar.settle()
        assert [b.name for b in sidecar.blobs()] == [image.id]


def test_failover_to_an_http_tier_and_from_a_dead_one(glance: Glance, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(3 << 20)
    with Upstream(blobs={image.id: image.data}) as mirror:
        sidecar = sidecar_factory(
            tiers=[
                glance_tier("dead", "http://127.0.0.1:9", connect_timeout="1s"),
                {"name": "mirror", "kind": "http", "url": mirror.url + "/{image_id}"},
            ]
        ).start()
        resp = sidecar.get(image.id, ALICE)
        assert resp.status_code == 200 and resp.content == image.data
        assert resp.headers["X-Cachenode-Tier"] == "mirror"
        assert sidecar.metric("cachenode_tier_failures_total", tier="dead", kind="connect") == 1


def test_no_tier_left_falls_back_to_glance(glance: Glance, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(1 << 20)
    sidecar = sidecar_factory(tiers=[glance_tier("dead", "http://127.0.0.1:9")]).start()
    resp = sidecar.get(image.id, ALICE)
    assert resp.status_code == 200 and resp.content == image.data
    assert resp.headers["X-Cachenode-Status"] == "BYPASS"
    assert sidecar.metric("cachenode_passthrough_total", reason="tier_failed") == 1
    assert sidecar.blobs() == [] and sidecar.partials() == []

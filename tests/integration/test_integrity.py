"""Bad bytes never become a clean body, and failover gives one uninterrupted body (SPEC §3)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import glanceclient
import pytest
import requests
from keystoneauth1 import session as ks_session
from keystoneauth1 import token_endpoint

from tests.support.clients import Caller, start, wait_for
from tests.support.glance import ALICE, Glance
from tests.support.sidecar import Sidecar
from tests.support.upstream import Fault, Upstream

GLANCE_CLI = str(Path(sys.executable).parent / "glance")


def glance_tier(name: str, url: str, **extra: object) -> dict[str, object]:
    return {"name": name, "kind": "glance", "url": url, **extra}


def url(sidecar: Sidecar, image_id: str) -> str:
    return f"{sidecar.url}/v2/images/{image_id}/file"


def streaming(sidecar: Sidecar, misses: int = 1, joined: int = 0) -> bool:
    """Whether that many callers have their 200 and headers (counted once the headers are out)."""
    return (
        sidecar.metric("cachenode_requests_total", status="miss") == misses
        and sidecar.metric("cachenode_requests_total", status="joined") == joined
    )


def test_a_flipped_byte_cuts_every_caller_and_commits_nothing(
    glance: Glance, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(6 << 20)
    # The tier holds after 1 MiB until all five callers have their headers and first bytes: the
    # flipped byte, at 3 MiB, can then only end in cut connections, never in a status.
    hold = Fault("hold", at=1 << 20)
    flip = Fault("flip", at=(3 << 20) + 12345, times=-1)
    with (
        Upstream(target=glance.url, faults=[hold, flip]) as bad,
        Upstream(target=glance.url) as good,
    ):
        sidecar = sidecar_factory(
            tiers=[glance_tier("regional", bad.url), glance_tier("central", good.url)]
        ).start()
        callers = [Caller(url(sidecar, image.id), ALICE) for _ in range(5)]
        threads = [start(c) for c in callers]
        wait_for(lambda: streaming(sidecar, misses=1, joined=4))
        hold.release()
        for thread in threads:
            thread.join(60)
        for caller in callers:
            assert caller.status == 200
            assert caller.error is not None, "a caller finished a body that failed its hash"
            assert caller.received < len(image.data)
        statuses = sorted(c.response_headers["X-Cachenode-Status"] for c in callers)
        assert statuses == ["JOINED"] * 4 + ["MISS"]
        assert sidecar.blobs() == [] and sidecar.partials() == []
        assert len(bad.requests_for(image.id)) == 1 and good.requests_for(image.id) == []
        assert sidecar.metric("cachenode_upstream_bytes_total", tier="regional") == len(image.data)
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
    # Each download holds after 512 KiB (the flipped byte already sent) until the client has its
    # 200: from then on the only correct end is a cut connection.
    holds = [Fault("hold", at=512 << 10), Fault("hold", at=512 << 10)]
    with Upstream(target=glance.url, faults=[Fault("flip", at=1000, times=-1), holds[0]]) as bad:
        sidecar = sidecar_factory(tiers=[glance_tier("regional", bad.url)]).start()

        out = tmp_path / "out.raw"
        command = [GLANCE_CLI, "--os-image-url", sidecar.url, "--os-auth-token", ALICE,
                   "image-download", "--file", str(out), by_cli.id]  # fmt: skip
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as cli:
            wait_for(lambda: streaming(sidecar, misses=1), timeout=60)
            holds[0].release()
            _, stderr = cli.communicate(timeout=120)
        assert cli.returncode != 0
        assert b"Corrupt image download" not in stderr  # cut, never a whole body to check
        assert out.stat().st_size < len(by_cli.data)  # what it saved is short, never whole
        sidecar.settle()
        assert sidecar.metric("cachenode_integrity_failures_total", tier="regional") == 1

        bad.faults.append(holds[1])

        session = ks_session.Session(auth=token_endpoint.Token(sidecar.url, ALICE))
        client = glanceclient.Client("2", session=session, endpoint_override=sidecar.url)
        body = client.images.data(by_api.id)  # the 200 and its headers, bytes still to come
        assert streaming(sidecar, misses=2)
        holds[1].release()
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            b"".join(body)  # cut before the end, not "Corrupt image download" (IOError)
        sidecar.settle()
        assert sidecar.blobs() == [] and sidecar.partials() == []
        assert sidecar.metric("cachenode_integrity_failures_total", tier="regional") == 2

        # The only tier is skipped for these images now: Glance itself answers, correctly.
        again = sidecar.get(by_api.id, ALICE)
        assert again.status_code == 200 and again.content == by_api.data
        assert again.headers["X-Cachenode-Status"] == "BYPASS"
        assert len(bad.requests_for(by_api.id)) == 1


def test_an_oversized_body_is_an_integrity_failure(glance: Glance, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(4 << 20)
    hold = Fault("hold", at=1 << 20)  # until the caller has its 200: then the excess can only cut
    with Upstream(blobs={image.id: image.data + b"trailing garbage"}, faults=[hold]) as mirror:
        sidecar = sidecar_factory(
            tiers=[
                {"name": "mirror", "kind": "http", "url": mirror.url},
                glance_tier("central", glance.url),
            ]
        ).start()
        first = Caller(url(sidecar, image.id), ALICE)
        thread = start(first)
        wait_for(lambda: streaming(sidecar, misses=1))
        hold.release()
        thread.join(60)
        assert first.status == 200 and first.error is not None
        assert first.received < len(image.data)
        sidecar.settle()
        assert sidecar.blobs() == [] and sidecar.partials() == []
        assert sidecar.metric("cachenode_integrity_failures_total", tier="mirror") == 1
        second = sidecar.get(image.id, ALICE)
        assert second.content == image.data and second.headers["X-Cachenode-Tier"] == "central"
        assert len(mirror.requests_for(image.id)) == 1


def test_bad_bytes_found_before_any_byte_is_sent_answer_502(
    glance: Glance, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    """A one-byte image: its only byte waits for the hash, so no caller has a 200 when the fill
    fails. Bad bytes then answer 502 (never pass-through: Glance may be what sent them), and each
    tier that sent them is skipped for the image from then on."""
    image = glance.create_image(1)
    with (
        Upstream(blobs={image.id: image.data + b"trailing garbage"}) as mirror,
        Upstream(target=glance.url, faults=[Fault("flip", at=0, times=-1)]) as regional,
    ):
        sidecar = sidecar_factory(tiers=[
            {"name": "mirror", "kind": "http", "url": mirror.url},
            glance_tier("regional", regional.url),
            glance_tier("central", glance.url),
        ]).start()  # fmt: skip
        for tier in ("mirror", "regional"):
            refused = sidecar.get(image.id, ALICE)
            assert refused.status_code == 502, tier
            assert refused.json()["error"]["code"] == 502
            assert "X-Cachenode-Status" not in refused.headers
            assert sidecar.metric("cachenode_integrity_failures_total", tier=tier) == 1
        served = sidecar.get(image.id, ALICE)
        assert served.status_code == 200 and served.content == image.data
        assert served.headers["X-Cachenode-Status"] == "MISS"
        assert served.headers["X-Cachenode-Tier"] == "central"
        assert len(mirror.requests_for(image.id)) == 1 and len(regional.requests_for(image.id)) == 1
        assert sidecar.metric("cachenode_requests_total", status="error") == 2
        assert [b.name for b in sidecar.blobs()] == [image.id] and sidecar.partials() == []


@pytest.mark.parametrize("fault", ["reset", "truncate", "stall"])
def test_failover_resumes_at_the_offset_reached(
    glance: Glance, sidecar_factory, fault: str
) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(6 << 20)
    at = (2 << 20) + 777
    # The fault strikes only once the sidecar's side has every byte before `at` (a reset would
    # otherwise throw away what was still in flight): the resume must then start exactly there.
    delivered = Fault("hold", at=at).release()
    with (
        Upstream(target=glance.url, faults=[delivered, Fault(fault, at=at, seconds=30)]) as first,
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
        assert delivered.reached.is_set() and first.bytes_for(image.id) == at
        resumed = second.requests_for(image.id)
        assert [r.range for r in resumed] == [f"bytes={at}-"]  # where the first tier stopped
        assert second.bytes_for(image.id) == len(image.data) - at
        assert sidecar.metric("cachenode_upstream_bytes_total", tier="regional") == at
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

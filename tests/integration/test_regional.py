"""cachenode as the regional tier: host sidecars whose ``glance.url`` and ``glance`` tier point
at a regional cachenode, which stands in front of the real Glance (README, "A regional
cachenode"). The origin sends each image once per region; Glance still decides every download,
asked through the regional with each caller's own token."""

from __future__ import annotations

import hashlib
import threading

import requests

from tests.support.glance import ALICE, ALICE_READER, BOB, Glance
from tests.support.sidecar import Sidecar
from tests.support.upstream import Upstream

HOSTS = 3
CALLERS = 6


def download(car: Sidecar, image_id: str, out: list[tuple[int, str, str]]) -> None:
    resp = car.get(image_id, ALICE, settle=False)
    digest = hashlib.sha512(resp.content).hexdigest()
    out.append((resp.status_code, digest, resp.headers.get("X-Cachenode-Status", "")))


def test_three_hosts_behind_a_regional_get_one_cold_image_from_the_origin_once(
    glance: Glance, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(size=16 << 20)
    with Upstream(target=glance.url) as origin:  # counts what the origin is asked for
        regional = sidecar_factory(
            "regional", tiers=[{"name": "origin", "kind": "glance", "url": origin.url}]
        ).start()
        tier = {"name": "regional", "kind": "glance", "url": regional.url}
        hosts = [
            sidecar_factory(f"host{n}", glance_url=regional.url, tiers=[tier]).start()
            for n in range(HOSTS)
        ]
        got: list[tuple[int, str, str]] = []
        callers = [
            threading.Thread(target=download, args=(hosts[n % HOSTS], image.id, got))
            for n in range(CALLERS)
        ]
        for t in callers:
            t.start()
        for t in callers:
            t.join(120)

        assert [(status, digest) for status, digest, _ in got] == [(200, image.sha512)] * CALLERS
        for car in (regional, *hosts):
            car.settle()
        asked = origin.requests_for(image.id)
        assert [(s.status, s.bytes) for s in asked if s.range is None] == [(200, len(image.data))]
        # A host's authorization probe (a 1-byte range, with the caller's token) that reaches the
        # regional before its fill landed byte 0 waits for that fill: never a request of its own.
        assert [s.range for s in asked if s.range] == []
        # The regional filled once, from the origin; each host once, from the regional.
        assert regional.metric("cachenode_fills_total", tier="origin", outcome="ok") == 1
        for car in hosts:
            assert car.metric("cachenode_fills_total", tier="regional", outcome="ok") == 1
            assert [b.name for b in car.blobs()] == [image.id]

        # Glance still decides, asked through the regional with the caller's own token: the
        # image is in L1 of every host, and still refused to whom Glance refuses it.
        for car in hosts:
            for token, status in ((BOB, 404), (ALICE_READER, 403)):
                refused = car.get(image.id, token, settle=False)
                direct = requests.get(
                    f"{glance.url}/v2/images/{image.id}/file",
                    headers={"X-Auth-Token": token},
                    timeout=60,
                )
                assert (refused.status_code, direct.status_code) == (status, status)
                assert refused.content == direct.content  # Glance's own body
        assert len(origin.requests_for(image.id)) == len(asked)  # refusals cost the origin nothing

"""Glance's notifications end remembered decisions at once (SPEC §3), on a real bus and Glance.

Every sidecar here remembers decisions for 10 minutes (``authz.ttl``): without the notification,
the cached image would keep being served for that long, so each refusal below is the listener's
doing. Glance publishes on a private RabbitMQ (tests/testbed/start-rabbitmq.sh).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import requests

from cachenode.catalog import Catalog
from tests.integration.test_authz import direct
from tests.support.clients import wait_for
from tests.support.glance import ADMIN, ALICE, CAROL, Glance, Image
from tests.support.rabbit import Rabbit, envelope
from tests.support.sidecar import Sidecar
from tests.support.upstream import Fault, Upstream

MiB = 1 << 20


def start_listening(sidecar_factory, rabbit: Rabbit, glance: Glance, tmp_path: Path,
                    **config: object) -> Sidecar:  # type: ignore[no-untyped-def]  # fmt: skip
    """A sidecar before ``glance`` (with ``config``), once it listens to Glance's notifications."""
    car: Sidecar = sidecar_factory(
        glance_url=glance.url,
        notifications={"transport_url_file": str(rabbit.url_file(tmp_path))},
        **config,
    ).start()
    wait_for(lambda: car.metric("cachenode_notifications_connected") == 1, timeout=20)
    return car


@pytest.fixture
def listening(sidecar_factory, rabbit: Rabbit, glance_notifying: Glance, tmp_path: Path) -> Sidecar:  # type: ignore[no-untyped-def]
    """A sidecar before ``glance_notifying``, remembering decisions for 10 minutes, listening."""
    return start_listening(sidecar_factory, rabbit, glance_notifying, tmp_path,
                           authz={"ttl": "10m"})  # fmt: skip


def cached_and_remembered(glance: Glance, car: Sidecar, token: str = ALICE) -> Image:
    image = glance.create_image(1 * MiB)
    assert car.get(image.id, token).headers["X-Cachenode-Status"] == "MISS"
    hit = car.get(image.id, token)
    assert hit.headers["X-Cachenode-Status"] == "HIT" and hit.content == image.data
    return image


def refused(car: Sidecar, glance: Glance, image: Image, token: str, status: int) -> bool:
    resp = car.get(image.id, token, settle=False)
    if resp.status_code == 200:
        return False  # still the remembered decision: the notice has not arrived yet
    ref = direct(glance, image.id, token)
    assert (resp.status_code, ref.status_code) == (status, status)
    assert resp.content == ref.content and image.data[:64] not in resp.content
    return True


def test_deactivation_is_refused_at_once(listening: Sidecar, glance_notifying: Glance) -> None:
    glance = glance_notifying
    image = cached_and_remembered(glance, listening)
    glance.api("POST", f"/v2/images/{image.id}/actions/deactivate", ADMIN).raise_for_status()
    wait_for(lambda: refused(listening, glance, image, ALICE, 403), timeout=5)
    assert image.id in [b.name for b in listening.blobs()]  # kept: it may be reactivated
    assert listening.metric("cachenode_notifications_total",
                            event="image.update", action="forget") >= 1  # fmt: skip


def test_removed_membership_is_refused_at_once(
    listening: Sidecar, glance_notifying: Glance
) -> None:
    glance = glance_notifying
    image = cached_and_remembered(glance, listening)
    glance.share(image.id, "projC")
    wait_for(lambda: listening.get(image.id, CAROL).status_code == 200, timeout=5)
    assert listening.get(image.id, CAROL).headers["X-Cachenode-Status"] == "HIT"
    glance.unshare(image.id, "projC")
    wait_for(lambda: refused(listening, glance, image, CAROL, 404), timeout=5)
    assert listening.get(image.id, ALICE).headers["X-Cachenode-Status"] == "HIT"  # still hers
    assert listening.metric("cachenode_notifications_total",
                            event="image.member.delete", action="forget") == 1  # fmt: skip


def test_deleted_image_is_evicted_unasked(listening: Sidecar, glance_notifying: Glance) -> None:
    glance = glance_notifying
    image = cached_and_remembered(glance, listening)
    glance.api("DELETE", f"/v2/images/{image.id}").raise_for_status()
    # No service credentials and nobody asking: the notice alone takes it out of L1.
    wait_for(lambda: image.id not in [b.name for b in listening.blobs()], timeout=5)
    assert listening.metric("cachenode_evictions_total", reason="deleted") == 1
    assert refused(listening, glance, image, ALICE, 404)


def test_malformed_messages_are_counted_and_ignored(
    listening: Sidecar, rabbit: Rabbit, glance_notifying: Glance
) -> None:
    image = cached_and_remembered(glance_notifying, listening)
    for body in (b"{not json", '{"oslo.version": "2.0"}', envelope("image.delete", {}),
                 '{"oslo.version": "2.0", "oslo.message": "[1, 2]"}'):  # fmt: skip
        rabbit.publish(body)
    wait_for(lambda: listening.metric("cachenode_notifications_total",
                                      event="malformed", action="ignore") == 4)  # fmt: skip
    assert listening.metric("cachenode_notifications_connected") == 1
    assert listening.get(image.id, ALICE).headers["X-Cachenode-Status"] == "HIT"
    assert "cachenode_notifications_total" in requests.get(listening.admin_url + "/metrics").text


def test_warm_on_upload(
    sidecar_factory, rabbit: Rabbit, glance_notifying: Glance, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    policy = tmp_path / "golden.yaml"
    policy.write_text("min_free_disk: 0\nwarm: {tags: [golden], interval: 10m, jitter: 1s}\n")
    (tmp_path / "service.token").write_text(ADMIN)
    car = start_listening(
        sidecar_factory, rabbit, glance_notifying, tmp_path,
        cache={"policy": str(policy)},
        service_auth={"token_file": str(tmp_path / "service.token")},
    )  # fmt: skip
    wait_for(lambda: "warm: 0 images selected" in car.log())  # the start's warm saw none
    plain = glance_notifying.create_image(1 * MiB)
    golden = glance_notifying.create_image(1 * MiB, tags=["golden"])
    wait_for(lambda: golden.id in [b.name for b in car.blobs()], timeout=15)
    hit = car.get(golden.id, ALICE)
    assert hit.headers["X-Cachenode-Status"] == "HIT" and hit.content == golden.data
    assert plain.id not in [b.name for b in car.blobs()]  # activated too, but not selected
    assert car.metric("cachenode_notifications_total", event="image.activate", action="warm") == 2


def test_a_fill_of_a_deleted_image_stops_and_commits_nothing(
    sidecar_factory, rabbit: Rabbit, glance_notifying: Glance, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A caller streams a fill that its tier holds at 2 MiB of 4; the image is deleted in
    Glance. The fill stops: the caller is cut, nothing of it stays in L1 (catalog, blobs,
    partials), the tier is not asked again, and the next request gets Glance's 404."""
    glance = glance_notifying
    image = glance.create_image(4 * MiB)
    hold = Fault("hold", at=2 * MiB, seconds=30)
    with Upstream(target=glance.url, faults=[hold]) as l2:
        car = start_listening(
            sidecar_factory, rabbit, glance, tmp_path,
            authz={"ttl": "10m"}, tiers=[{"name": "regional", "kind": "glance", "url": l2.url}],
        )  # fmt: skip
        received: list[bytes] = []
        broken: list[Exception] = []

        def stream() -> None:
            url = f"{car.url}/v2/images/{image.id}/file"
            try:
                with requests.get(url, headers={"X-Auth-Token": ALICE}, stream=True,
                                  timeout=60) as resp:  # fmt: skip
                    assert resp.headers["X-Cachenode-Status"] == "MISS"
                    for chunk in resp.iter_content(64 * 1024):
                        received.append(chunk)
            except requests.exceptions.RequestException as exc:
                broken.append(exc)

        reader = threading.Thread(target=stream)
        reader.start()
        assert hold.reached.wait(20)  # the tier sent 2 MiB and holds the rest
        wait_for(lambda: sum(map(len, received)) > 0)  # the caller is streaming
        asked = len(l2.requests_for(image.id))
        glance.api("DELETE", f"/v2/images/{image.id}").raise_for_status()
        wait_for(lambda: car.metric("cachenode_fills_total", tier="regional",
                                    outcome="deleted") == 1, timeout=10)  # fmt: skip
        reader.join(30)
        body = b"".join(received)
        assert broken and len(body) < len(image.data)  # cut: never a complete clean body
        assert body == image.data[: len(body)]
        car.settle()
        assert car.blobs() == [] and car.partials() == []
        assert [e.image_id for e in Catalog(car.cache_dir / "catalog").entries()] == []
        assert car.metric("cachenode_cache_entries") == 0
        hold.release()  # what the tier still had goes nowhere: the fill hung up
        assert car.get(image.id, ALICE).status_code == 404  # Glance's answer, asked first
        assert len(l2.requests_for(image.id)) == asked  # the tier: not asked again
        assert car.blobs() == [] and car.partials() == []


def test_a_caller_waiting_on_a_fill_of_a_deleted_image_gets_glances_answer(
    sidecar_factory, rabbit: Rabbit, glance_notifying: Glance, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The tier sends headers and holds every byte, so the caller waits for the fill's first
    byte; the image is deleted in Glance. The stopped fill passes the caller to Glance (its
    404), counted as a deletion, not as a tier that failed."""
    glance = glance_notifying
    image = glance.create_image(1 * MiB)
    hold = Fault("hold", at=0, seconds=30)
    with Upstream(target=glance.url, faults=[hold]) as l2:
        car = start_listening(
            sidecar_factory, rabbit, glance, tmp_path,
            authz={"ttl": "10m"}, tiers=[{"name": "regional", "kind": "glance", "url": l2.url}],
        )  # fmt: skip
        answers: list[requests.Response] = []
        waiting = threading.Thread(target=lambda: answers.append(car.get(image.id, ALICE)))
        waiting.start()
        assert hold.reached.wait(20)  # the fill has its tier's headers, not one byte
        glance.api("DELETE", f"/v2/images/{image.id}").raise_for_status()
        waiting.join(30)
        hold.release()
        [resp] = answers
        assert (resp.status_code, resp.headers["X-Cachenode-Status"]) == (404, "BYPASS")
        assert resp.content == direct(glance, image.id, ALICE).content
        assert car.metric("cachenode_passthrough_total", reason="deleted") == 1
        assert car.metric("cachenode_passthrough_total", reason="tier_failed") == 0
        car.settle()
        assert car.blobs() == [] and car.partials() == []


def test_a_bus_outage_costs_no_download(
    listening: Sidecar, rabbit: Rabbit, glance_notifying: Glance
) -> None:
    """Last in this module: it restarts the session's bus."""
    glance = glance_notifying
    image = cached_and_remembered(glance, listening)
    rabbit.stop()
    try:
        wait_for(lambda: listening.metric("cachenode_notifications_connected") == 0, timeout=20)
        ready = requests.get(listening.admin_url + "/readyz", timeout=5)
        assert ready.status_code == 200 and "notifications: disconnected" in ready.text
        assert listening.get(image.id, ALICE).headers["X-Cachenode-Status"] == "HIT"
        fresh = glance.create_image(1 * MiB)
        miss = listening.get(fresh.id, ALICE)
        assert miss.headers["X-Cachenode-Status"] == "MISS" and miss.content == fresh.data
        assert listening.get(fresh.id, ALICE).headers["X-Cachenode-Status"] == "HIT"
        # Taken away while nobody hears it: served on the remembered decision until the bus is back.
        unheard = glance.api("POST", f"/v2/images/{fresh.id}/actions/deactivate", ADMIN)
        unheard.raise_for_status()
        assert listening.get(fresh.id, ALICE).headers["X-Cachenode-Status"] == "HIT"
    finally:
        rabbit.start()  # the same port: Glance and the sidecar find it again
    wait_for(lambda: listening.metric("cachenode_notifications_connected") == 1, timeout=40)
    assert "notifications: connected" in requests.get(listening.admin_url + "/readyz").text
    # Reconnected: every remembered decision is dropped, the unheard change included.
    wait_for(lambda: refused(listening, glance, Image(fresh.id, fresh.data), ALICE, 403), timeout=5)
    assert "guest:guest" not in listening.log()  # the bus's credentials are never logged
    glance.api("POST", f"/v2/images/{image.id}/actions/deactivate", ADMIN).raise_for_status()
    wait_for(lambda: refused(listening, glance, image, ALICE, 403), timeout=10)

"""The object store tier (issue 3) against a real Swift and a real glance-api that stores in it."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import requests

from tests.support.clients import Caller, start, wait_for
from tests.support.glance import ALICE, Glance
from tests.support.swift import Swift
from tests.support.upstream import Fault, Upstream


def swift_tier(swift: Swift, name: str = "objectstore", **extra: object) -> dict[str, object]:
    return {"name": name, "kind": "swift", "url": swift.storage_url, **extra}


def test_objects_and_manifests_through_a_temp_url(
    glance_swift: Glance, swift: Swift, temp_url_key: Path, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    small = glance_swift.create_image(1 << 20)  # one object
    large = glance_swift.create_image(9 << 20, chunked=True)  # segments plus a manifest
    manifest = swift.head("glance", large.id)
    assert "X-Object-Manifest" in manifest.headers  # glance_store writes a DLO manifest
    assert manifest.headers["Etag"].strip('"') != large.md5  # the manifest's ETag proves nothing
    sidecar = sidecar_factory(
        glance_url=glance_swift.url,
        log_level="debug",
        tiers=[
            swift_tier(swift, temp_url_key_file=str(temp_url_key), parallel=3, chunk_size="2MiB")
        ],
    ).start()
    for image in (small, large):
        resp = sidecar.get(image.id, ALICE)
        assert resp.status_code == 200 and resp.content == image.data
        assert resp.headers["X-Cachenode-Tier"] == "objectstore"
    key = temp_url_key.read_text().strip()
    metrics = requests.get(sidecar.admin_url + "/metrics", timeout=5).text
    for text in (sidecar.log(), metrics):
        assert key not in text and "temp_url_sig" not in text and "AUTH_glance" not in text


def test_service_token_read_again_when_its_file_changes(
    glance_swift: Glance, swift: Swift, tmp_path: Path, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    token_file = tmp_path / "swift.token"
    token_file.write_text("AUTH_tk_not_a_token\n")
    images = [glance_swift.create_image(1 << 20) for _ in range(2)]
    sidecar = sidecar_factory(
        glance_url=glance_swift.url, tiers=[swift_tier(swift, token_file=str(token_file))]
    ).start()
    refused = sidecar.get(images[0].id, ALICE)  # Swift says 401: Glance itself answers
    assert refused.status_code == 200 and refused.headers["X-Cachenode-Status"] == "BYPASS"
    assert sidecar.metric("cachenode_tier_failures_total", tier="objectstore", kind="denied") == 1
    token_file.write_text(swift.token() + "\n")  # rotated, no restart
    served = sidecar.get(images[1].id, ALICE)
    assert served.headers["X-Cachenode-Status"] == "MISS" and served.content == images[1].data
    assert swift.token() not in sidecar.log()


def test_the_object_glance_names_is_the_one_read(
    glance_swift: Glance, swift: Swift, temp_url_key: Path, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    image = glance_swift.create_image(2 << 20)
    record = glance_swift.api("GET", f"/v2/images/{image.id}").json()
    assert record["direct_url"] == f"swift+config://ref1/glance/{image.id}"
    # A wrong default container: only Glance's location can lead to the object.
    sidecar = sidecar_factory(
        glance_url=glance_swift.url,
        tiers=[swift_tier(swift, container="nonesuch", temp_url_key_file=str(temp_url_key))],
    ).start()
    resp = sidecar.get(image.id, ALICE)
    assert resp.headers["X-Cachenode-Status"] == "MISS" and resp.content == image.data


def test_a_poisoned_regional_cache_is_routed_around(
    glance_swift: Glance, swift: Swift, temp_url_key: Path, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    image = glance_swift.create_image(6 << 20)
    url = f"{glance_swift.url}/v2/images/{image.id}/file"
    assert requests.get(url, headers={"X-Auth-Token": ALICE}, timeout=60).content == image.data
    cached = glance_swift.base / "data" / "cache" / image.id
    wait_for(cached.exists)
    with cached.open("r+b") as f:  # one byte of Glance's cached copy goes bad
        f.seek(3 << 20)
        byte = f.read(1)
        f.seek(3 << 20)
        f.write(bytes([byte[0] ^ 0xFF]))
    poisoned = requests.get(url, headers={"X-Auth-Token": ALICE}, timeout=60)
    assert poisoned.status_code == 200 and poisoned.headers["Content-MD5"] == image.md5
    assert poisoned.content != image.data  # Glance serves it, none the wiser

    # The regional tier's answer holds after 1 MiB until the caller has its 200, so the bad byte
    # (at 3 MiB) can only end in a cut connection, not in a status.
    hold = Fault("hold", at=1 << 20)
    with Upstream(target=glance_swift.url, faults=[hold]) as regional:
        sidecar = sidecar_factory(glance_url=glance_swift.url, tiers=[
            {"name": "regional", "kind": "glance", "url": regional.url},
            swift_tier(swift, temp_url_key_file=str(temp_url_key), parallel=2, chunk_size="2MiB"),
        ]).start()  # fmt: skip
        first = Caller(f"{sidecar.url}/v2/images/{image.id}/file", ALICE)
        thread = start(first)
        wait_for(lambda: sidecar.metric("cachenode_requests_total", status="miss") == 1)
        hold.release()
        thread.join(60)
        assert first.status == 200 and first.error is not None
        assert first.received < len(image.data)  # cut before its end: never a whole bad body
        sidecar.settle()
        assert sidecar.blobs() == [] and sidecar.partials() == []
        assert sidecar.metric("cachenode_integrity_failures_total", tier="regional") == 1
        second = sidecar.get(image.id, ALICE)
        assert second.status_code == 200 and second.content == image.data
        assert second.headers["X-Cachenode-Tier"] == "objectstore"
        assert len(regional.requests_for(image.id)) == 1  # the poisoned tier was not asked again
        assert sidecar.metric("cachenode_upstream_bytes_total", tier="objectstore") == len(
            image.data
        )
        assert [b.name for b in sidecar.blobs()] == [image.id]


def test_hostile_locations_never_lead_out_of_the_object_glance_reads(
    glance_swift: Glance, swift: Swift, temp_url_key: Path, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    """Records whose location a URL library would follow out of the object glance_store reads:
    encoded '..' and '/' (glance_store reads such a name literally; decoded, it climbs to another
    container or account), or credentials of another account (glance_store reads that account;
    reading the same names in Glance's account is another object). Glance serves each image from
    where its record says; the sidecar refuses them and never asks Swift for anything else.

    Glance's API lets no one add such a location (swift+config:// is restricted, and others must
    start with the store's own prefix), so the records are tampered with in its database.
    """
    mine = account(swift, "glance:glance", "glancepass")  # the account Glance stores in
    theirs = account(swift, "test:tester", "testing")
    assert theirs.url.endswith("/v1/AUTH_test")
    mine.put("secret/obj", b"secret" * 1000)
    theirs.put("private/obj", b"private" * 1000)
    keystone = swift_env(swift)["SWIFT_KEYSTONE"].removeprefix("http://")
    locations = [
        "swift+config://ref1/glance/..%2Fsecret%2Fobj",  # decoded: another container
        "swift+config://ref1/glance/..%2F..%2FAUTH_test%2Fprivate%2Fobj",  # another account
        f"swift+http://test%3Atester:testing@{keystone}/v3/secret/obj",  # another account's names
    ]
    images = {location: glance_swift.create_image(1 << 20) for location in locations}
    for location, image in images.items():  # where each location really leads, its bytes
        container, name = location.rsplit("/", 2)[1:]
        (theirs if "@" in location else mine).put(f"{container}/{quote(name, safe='')}", image.data)
        with sqlite3.connect(glance_swift.base / "glance.sqlite") as db:
            db.execute(
                "UPDATE image_locations SET value = ? WHERE image_id = ?", (location, image.id)
            )
        assert glance_swift.api("GET", f"/v2/images/{image.id}").json()["direct_url"] == location

    plain = glance_swift.create_image(1 << 20)
    sidecar = sidecar_factory(
        glance_url=glance_swift.url, tiers=[swift_tier(swift, temp_url_key_file=str(temp_url_key))]
    ).start()
    proxy_log = swift.base / "log" / "proxy.log"
    seen = len(proxy_log.read_text())
    for image in images.values():
        resp = sidecar.get(image.id, ALICE)  # Glance's own answer, from where its record says
        assert resp.status_code == 200 and resp.content == image.data
        assert resp.headers["X-Cachenode-Status"] == "BYPASS"
    assert (
        sidecar.metric("cachenode_tier_failures_total", tier="objectstore", kind="bad_location")
        == 3
    )
    served = sidecar.get(plain.id, ALICE)  # the tier works, and its requests are in the log
    assert served.headers["X-Cachenode-Tier"] == "objectstore" and served.content == plain.data

    asked = proxy_log.read_text()[seen:]
    assert f"GET /v1/AUTH_glance/glance/{plain.id}" in asked
    assert "/v1/AUTH_glance/secret/obj" not in asked and "/v1/AUTH_test/private/obj" not in asked
    assert "testing" not in sidecar.log() and "..%2F" not in sidecar.log()


@dataclass
class Account:
    url: str
    token: str

    def put(self, path: str, data: bytes) -> None:
        """``container/object``, with its container."""
        headers = {"X-Auth-Token": self.token}
        container = f"{self.url}/{path.split('/')[0]}"
        requests.put(container, headers=headers, timeout=30).raise_for_status()
        requests.put(
            f"{self.url}/{path}", data=data, headers=headers, timeout=30
        ).raise_for_status()


def account(swift: Swift, user: str, key: str) -> Account:
    resp = requests.get(swift.url + "/auth/v1.0", timeout=10,
                        headers={"X-Storage-User": user, "X-Storage-Pass": key})  # fmt: skip
    resp.raise_for_status()
    return Account(resp.headers["X-Storage-Url"], resp.headers["X-Auth-Token"])


def swift_env(swift: Swift) -> dict[str, str]:
    lines = (swift.base / "env.sh").read_text().splitlines()
    return dict(line.removeprefix("export ").split("=", 1) for line in lines)

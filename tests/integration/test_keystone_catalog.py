"""Without ``glance.url``, the sidecar finds Glance in the real Keystone's catalog (service type
``image``, the configured ``interface`` and ``region_name``), or does not start.

ks-setup.py registers the test glance-api as the image endpoint of RegionOne for all three
interfaces. Other regions are made here, each with its own name, and removed afterwards: the
endpoints of RegionOne, which other tests' tokens carry, are never touched."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.keystone import KeystoneBed
from tests.support.sidecar import Sidecar, free_port


@contextmanager
def region(bed: KeystoneBed, **urls: str) -> Iterator[str]:
    """A new region whose image endpoints are ``urls`` by interface (through Keystone's API, as
    its admin); its name."""
    name = f"Region-{time.monotonic_ns()}"
    bed.admin("POST", "/regions", json={"region": {"id": name}})
    image = bed.admin("GET", "/services?type=image").json()["services"][0]["id"]
    made = []
    try:
        for interface, url in urls.items():
            endpoint = {"service_id": image, "interface": interface, "url": url, "region_id": name}
            made.append(bed.admin("POST", "/endpoints", json={"endpoint": endpoint}))
        yield name
    finally:
        for r in made:
            bed.admin("DELETE", f"/endpoints/{r.json()['endpoint']['id']}")
        bed.admin("DELETE", f"/regions/{name}")


def service_auth(bed: KeystoneBed, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**bed.service_auth_password(tmp_path / "secrets"), **extra}


def from_region(sidecar_factory, bed: KeystoneBed, tmp_path: Path, name: str,
                catalog_timeout: str) -> Sidecar:  # type: ignore[no-untyped-def]  # fmt: skip
    """A sidecar (not started) that learns Glance's endpoint from the catalog of region ``name``."""
    sidecar: Sidecar = sidecar_factory(
        from_catalog=True, glance={"catalog_timeout": catalog_timeout},
        service_auth=service_auth(bed, tmp_path, region_name=name),
    )  # fmt: skip
    return sidecar


def test_without_glance_url_the_catalog_names_glance(
    keystone_bed: KeystoneBed, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    bed = keystone_bed
    sidecar: Sidecar = sidecar_factory(
        from_catalog=True, service_auth=service_auth(bed, tmp_path, region_name="RegionOne")
    ).start()
    assert "glance:" not in sidecar.config_path.read_text().replace("glance: {}", "")
    alice = bed.token("alice")
    image = bed.glance.create_image(1 << 20, token=alice)
    miss = sidecar.get(image.id, alice)
    assert (miss.status_code, miss.headers["X-Cachenode-Status"]) == (200, "MISS")
    assert miss.content == image.data
    hit = sidecar.get(image.id, alice)
    assert (hit.status_code, hit.headers["X-Cachenode-Status"]) == (200, "HIT")
    assert hit.content == image.data
    log = sidecar.log()
    found = "glance endpoint from Keystone's catalog (image, interface internal, region RegionOne)"
    assert f"{found}: {bed.glance.url}" in log
    assert f"glance {bed.glance.url}, tiers glance" in log
    # Glance's authorization still decides: bob may not have alice's private image, even cached.
    assert sidecar.get(image.id, bed.token("bob")).status_code == 404


def test_the_configured_interface_picks_its_url(
    keystone_bed: KeystoneBed, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    bed = keystone_bed
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with region(bed, public=dead, internal=bed.glance.url) as name:
        alice = bed.token("alice")
        image = bed.glance.create_image(1 << 20, token=alice)
        internal: Sidecar = sidecar_factory(
            "internal", from_catalog=True,
            service_auth=service_auth(bed, tmp_path, region_name=name, interface="internal"),
        ).start()  # fmt: skip
        public: Sidecar = sidecar_factory(
            "public", from_catalog=True,
            service_auth=service_auth(bed, tmp_path, region_name=name, interface="public"),
        ).start()  # fmt: skip

        for status in ("MISS", "HIT"):
            r = internal.get(image.id, alice)
            assert (r.status_code, r.headers["X-Cachenode-Status"]) == (200, status)
            assert r.content == image.data
        assert f"glance {bed.glance.url}," in internal.log()

        # The public one was told the dead URL, and uses it: Glance cannot be asked, nothing is
        # served (not even what the other sidecar cached, which it never sees).
        assert f"glance {dead}," in public.log()
        r = public.get(image.id, alice)
        assert r.status_code >= 500 and image.data not in r.content
        assert not public.blobs()


def test_cli_warm_by_tag_finds_glance_in_the_catalog_too(
    keystone_bed: KeystoneBed, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    # ``cachenode warm --tag`` asks Glance for the tagged images itself, from the same config.
    bed = keystone_bed
    dead = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "admin.token").write_text("s3cret-admin\n")
    with region(bed, public=dead, internal=bed.glance.url) as name:
        sidecar: Sidecar = sidecar_factory(
            from_catalog=True, admin={"token_file": str(tmp_path / "admin.token")},
            service_auth=service_auth(bed, tmp_path, region_name=name),
        ).start()  # fmt: skip
        tag = f"golden-{time.monotonic_ns()}"
        image = bed.glance.create_image(1 << 20, token=bed.token_of_admin(), visibility="public",
                                        tags=[tag])  # fmt: skip
        warm = [sys.executable, "-m", "cachenode", "warm", "--tag", tag]
        warmed = subprocess.run(
            [*warm, "-c", str(sidecar.config_path)], capture_output=True, text=True, timeout=120
        )
        assert warmed.returncode == 0, warmed.stderr
        sidecar.settle()
        assert [b.name for b in sidecar.blobs()] == [image.id]


def stopped(sidecar: Sidecar, within: float) -> tuple[int, float, str]:
    """Start ``sidecar`` expecting it to give up: exit status, seconds taken, its log."""
    began = time.monotonic()
    sidecar.start(ready=False)
    assert sidecar.proc is not None
    code = sidecar.proc.wait(within)
    return code, time.monotonic() - began, sidecar.log()


def test_a_region_without_an_image_endpoint_stops_the_start_with_one_line(
    keystone_bed: KeystoneBed, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    bed = keystone_bed
    with region(bed) as name:  # a region, with no endpoint of its own
        sidecar = from_region(sidecar_factory, bed, tmp_path, name, "3s")
        code, took, log = stopped(sidecar, within=60)
    assert code == 1
    assert 3 <= took < 20  # asked again for 3 s (1 s, then 2 s apart), then gave up
    assert "Traceback" not in log
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1, log
    assert errors[0].endswith(
        f"cannot start: glance endpoint: Keystone's catalog has no image endpoint for interface "
        f"internal, region {name} (asked 3 times in 3s)"
    )
    assert log.count("asking again in") == 2
    # nothing was listening meanwhile: no socket was taken before Glance was known
    assert "serving on" not in log


def test_an_endpoint_url_with_a_password_is_refused_at_once(
    keystone_bed: KeystoneBed, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    bed = keystone_bed
    host = bed.glance.url.removeprefix("http://")
    with region(bed, internal=f"http://glance:hunter2@{host}") as name:
        sidecar = from_region(sidecar_factory, bed, tmp_path, name, "60s")
        code, took, log = stopped(sidecar, within=60)
    assert code == 1 and took < 20  # not asked again: the catalog's answer will not change
    assert "Traceback" not in log and "hunter2" not in log
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1, log
    assert errors[0].endswith(
        f"cannot start: glance endpoint: the catalog's image endpoint for interface internal, "
        f"region {name} is refused: an URL here takes no user or password (secrets come only "
        f"from files) (asked once in 0s)"
    )


def test_a_sigterm_while_asking_the_catalog_stops_at_once(
    keystone_bed: KeystoneBed, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A start that keeps asking the catalog (no image endpoint yet) and is told to stop
    meanwhile stops at once, as a stopped sidecar: exit 0, one line on what it waited for."""
    bed = keystone_bed
    with region(bed) as name:  # a region, with no endpoint of its own
        sidecar = from_region(sidecar_factory, bed, tmp_path, name, "60s")
        sidecar.start(ready=False)
        assert sidecar.proc is not None
        deadline = time.monotonic() + 30
        while "asking again in" not in sidecar.log():  # it asked, and waits to ask again
            assert time.monotonic() < deadline, sidecar.log()
            time.sleep(0.01)
        took = sidecar.sigterm()
    assert took < 5, took  # the wait it cut short lasts 30 to 60 s
    log = sidecar.stopped_before_serving("Keystone's catalog to name Glance")
    assert " ERROR " not in log


def test_a_sigterm_while_keystone_says_nothing_stops_at_once(
    sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Keystone takes the connection and never answers: one attempt would last its timeout
    (up to 30 s). A stop asked for meanwhile does not wait for it."""
    secret = tmp_path / "cachenode.password"
    secret.write_text("cachenodepass\n")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(30)
        sidecar: Sidecar = sidecar_factory(
            from_catalog=True, glance={"catalog_timeout": "60s"},
            service_auth={
                "auth_url": f"http://127.0.0.1:{silent.getsockname()[1]}/v3",
                "auth_type": "password", "username": "cachenode",
                "password_file": str(secret), "project_name": "service",
            },
        )  # fmt: skip
        sidecar.start(ready=False)
        assert sidecar.proc is not None
        conn, _ = silent.accept()  # the first attempt is on its way, and gets no answer
        with conn:
            took = sidecar.sigterm()
    assert took < 5, took  # the wait it cut short lasts 30 to 60 s
    sidecar.stopped_before_serving("Keystone's catalog to name Glance")

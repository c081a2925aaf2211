"""Real clients through the sidecar: glanceclient (CLI and API) and openstacksdk, unchanged."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import glanceclient
import openstack
import psutil
import requests
from keystoneauth1 import session as ks_session
from keystoneauth1 import token_endpoint

from tests.support.glance import ALICE, Glance
from tests.support.sidecar import Sidecar

GLANCE_CLI = str(Path(sys.executable).parent / "glance")


def cli(sidecar: Sidecar, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GLANCE_CLI, "--os-image-url", sidecar.url, "--os-auth-token", ALICE, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def glance_api(url: str, token: str) -> glanceclient.v2.client.Client:
    """The Python API as nova builds it: a keystoneauth session and an endpoint override."""
    session = ks_session.Session(auth=token_endpoint.Token(url, token))
    return glanceclient.Client("2", session=session, endpoint_override=url)


def field(table: str, name: str) -> str:
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 2 and cells[1] == name:
            return cells[2]
    raise KeyError(name)


def test_glance_cli_lifecycle_through_the_sidecar(
    glance: Glance, sidecar: Sidecar, tmp_path: Path
) -> None:
    data = os.urandom(5 << 20)
    (tmp_path / "in.raw").write_bytes(data)
    created = cli(
        sidecar,
        "image-create",
        "--name",
        "cli-test",
        "--disk-format",
        "raw",
        "--container-format",
        "bare",
        "--file",
        str(tmp_path / "in.raw"),
    )
    assert created.returncode == 0, created.stderr
    image_id = field(created.stdout, "id")
    assert field(created.stdout, "status") == "active"
    record = glance.api("GET", f"/v2/images/{image_id}").json()
    assert record["os_hash_value"] == hashlib.sha512(data).hexdigest()

    shown = cli(sidecar, "image-show", image_id)
    assert shown.returncode == 0 and field(shown.stdout, "size") == str(len(data))
    listed = cli(sidecar, "image-list")
    assert listed.returncode == 0 and image_id in listed.stdout

    for n in (1, 2):  # a MISS, then a HIT; the CLI verifies the hash itself
        out = tmp_path / f"out{n}.raw"
        downloaded = cli(sidecar, "image-download", "--file", str(out), image_id)
        assert downloaded.returncode == 0, downloaded.stderr
        assert out.read_bytes() == data
        sidecar.settle()
    assert sidecar.metric("cachenode_requests_total", status="miss") == 1
    assert sidecar.metric("cachenode_requests_total", status="hit") == 1

    deleted = cli(sidecar, "image-delete", image_id)
    assert deleted.returncode == 0, deleted.stderr
    assert glance.api("GET", f"/v2/images/{image_id}").status_code == 404


def test_glanceclient_python_api(glance: Glance, sidecar: Sidecar) -> None:
    client = glance_api(sidecar.url, ALICE)
    data = os.urandom(3 << 20)
    image = client.images.create(name="api-test", disk_format="raw", container_format="bare")
    client.images.upload(image.id, io.BytesIO(data))
    assert client.images.get(image.id).status == "active"
    assert image.id in [i.id for i in client.images.list()]
    for _ in range(2):
        body = client.images.data(image.id)  # verifies os_hash_value at the end
        assert b"".join(body) == data
        sidecar.settle()
    client.images.delete(image.id)
    assert glance.api("GET", f"/v2/images/{image.id}").status_code == 404


def test_openstacksdk_download_with_and_without_stream(glance: Glance, sidecar: Sidecar) -> None:
    image = glance.create_image(4 << 20)
    conn = openstack.connect(
        auth_type="admin_token",
        auth={"endpoint": sidecar.url, "token": ALICE},
        image_endpoint_override=sidecar.url,
        load_yaml_config=False,
        load_envvars=False,
    )
    whole = conn.image.download_image(image.id)  # verifies the hash before returning
    assert (whole.content if isinstance(whole, requests.Response) else whole) == image.data
    sidecar.settle()
    streamed = conn.image.download_image(image.id, stream=True)
    assert b"".join(streamed.iter_content(1 << 16)) == image.data
    assert sidecar.metric("cachenode_requests_total", status="miss") == 1
    assert sidecar.metric("cachenode_requests_total", status="hit") == 1


def test_version_discovery_points_back_at_the_sidecar(glance: Glance, sidecar: Sidecar) -> None:
    for path in ("/", "/versions"):
        resp = requests.get(sidecar.url + path, timeout=10)
        assert resp.status_code == requests.get(glance.url + path, timeout=10).status_code
        links = [link["href"] for v in resp.json()["versions"] for link in v["links"]]
        assert links and all(href.startswith(sidecar.url + "/") for href in links), links


def test_large_upload_streams_without_growing_memory(
    glance: Glance, sidecar: Sidecar, tmp_path: Path
) -> None:
    """A 1 GiB chunked upload through the sidecar: Glance gets it all, the RSS stays flat."""
    size = 1 << 30
    block = os.urandom(1 << 20)
    digest = hashlib.sha512()
    for _ in range(size // len(block)):
        digest.update(block)
    assert sidecar.proc is not None
    proc = psutil.Process(sidecar.proc.pid)
    baseline = proc.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        client = glance_api(sidecar.url, ALICE)
        image = client.images.create(name="big", disk_format="raw", container_format="bare")

        class Blocks(io.RawIOBase):  # 1 GiB of data without holding 1 GiB in the test either
            sent = 0

            def readable(self) -> bool:
                return True

            def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
                n = min(len(buf), len(block), size - self.sent)
                offset = self.sent % len(block)
                n = min(n, len(block) - offset)
                buf[:n] = block[offset : offset + n]
                self.sent += n
                return n

        client.images.upload(image.id, io.BufferedReader(Blocks()))
    finally:
        done.set()
        sampler.join()
    record = glance.api("GET", f"/v2/images/{image.id}").json()
    assert record["size"] == size
    assert record["os_hash_value"] == digest.hexdigest()
    assert peak - baseline < 64 << 20, f"RSS grew by {(peak - baseline) >> 20} MiB"

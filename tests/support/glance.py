"""The test bed's real glance-api, started from tests/testbed/, and helpers to put images in it."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

TESTBED = Path(__file__).resolve().parent.parent / "testbed"

ALICE = "alice:projA:reader,member"
BOB = "bob:projB:reader,member"
CAROL = "carol:projC:reader,member"
ALICE_READER = "alice:projA:reader"
ADMIN = "cloudadmin:admin:admin,reader,member"


@dataclass
class Image:
    id: str
    data: bytes

    @property
    def md5(self) -> str:
        return hashlib.md5(self.data).hexdigest()

    @property
    def sha512(self) -> str:
        return hashlib.sha512(self.data).hexdigest()


class Glance:
    """A real glance-api on 127.0.0.1, started by tests/testbed/start-glance.sh."""

    def __init__(
        self, base: Path, flavor: str = "fakeauth+caching", env: dict[str, str] | None = None
    ):
        self.base = base
        self.flavor = flavor
        self.env = env or {}
        self.url = ""

    def start(self, swift_base: Path | None = None) -> Glance:
        """Start it; with ``swift_base``, its store is that test bed Swift."""
        env = {**os.environ, "GLANCE_FLAVOR": self.flavor, **self.env}
        command = [str(TESTBED / "start-glance.sh"), str(self.base)]
        if swift_base is not None:
            command = [str(TESTBED / "start-glance-swift.sh"), str(self.base), str(swift_base)]
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        for line in (self.base / "env.sh").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            if key == "GLANCE_URL":
                self.url = value
        return self

    def stop(self) -> None:
        subprocess.run([str(TESTBED / "stop-glance.sh"), str(self.base)], check=False)

    def pid(self) -> int:
        return int((self.base / "uwsgi.pid").read_text())

    def kill9(self) -> None:
        """Kill every process of this glance-api at once, as a crash would (master and workers)."""
        subprocess.run(["pkill", "-KILL", "-f", f"{self.base}/etc/uwsgi.ini"], check=False)

    # -- the Glance API, asked directly (not through the sidecar)
    def api(self, method: str, path: str, token: str = ALICE, **kw: Any) -> requests.Response:
        headers = {"X-Auth-Token": token, **kw.pop("headers", {})}
        return requests.request(method, self.url + path, headers=headers, timeout=120, **kw)

    def create_image(
        self,
        size: int = 4 << 20,
        token: str = ALICE,
        data: bytes | None = None,
        chunked: bool = False,
        **props: Any,
    ) -> Image:
        """An active image of ``size`` random bytes; ``chunked`` uploads it without a length
        (as glanceclient does), which Glance's swift store writes as segments and a manifest."""
        data = os.urandom(size) if data is None else data
        body = {
            "name": f"test-{time.monotonic_ns()}",
            "disk_format": "raw",
            "container_format": "bare",
            **props,
        }
        r = self.api("POST", "/v2/images", token, json=body)
        r.raise_for_status()
        image_id = r.json()["id"]
        body = (
            (data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20))
            if chunked
            else io.BytesIO(data)
        )
        r = self.api(
            "PUT",
            f"/v2/images/{image_id}/file",
            token,
            data=body,
            headers={"Content-Type": "application/octet-stream"},
        )
        r.raise_for_status()
        return Image(image_id, data)

    def share(self, image_id: str, project: str, token: str = ALICE) -> None:
        self.api(
            "PATCH",
            f"/v2/images/{image_id}",
            token,
            json=[{"op": "replace", "path": "/visibility", "value": "shared"}],
            headers={"Content-Type": "application/openstack-images-v2.1-json-patch"},
        ).raise_for_status()
        self.api(
            "POST", f"/v2/images/{image_id}/members", token, json={"member": project}
        ).raise_for_status()

    def unshare(self, image_id: str, project: str, token: str = ALICE) -> None:
        self.api("DELETE", f"/v2/images/{image_id}/members/{project}", token).raise_for_status()

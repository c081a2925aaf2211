"""The test bed's real Swift (tests/testbed/start-swift.sh) and what tests ask of it directly."""

from __future__ import annotations

import subprocess
from pathlib import Path

import requests

from tests.support.glance import TESTBED


class Swift:
    """A one-node Swift on 127.0.0.1 with tempauth, tempurl and the Keystone shim."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.url = self.storage_url = ""

    def start(self) -> Swift:
        subprocess.run([str(TESTBED / "start-swift.sh"), str(self.base)], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        env = dict(
            line.removeprefix("export ").split("=", 1)
            for line in (self.base / "env.sh").read_text().splitlines()
        )
        self.url, self.storage_url = env["SWIFT_URL"], env["SWIFT_STORAGE_URL"]
        return self

    def stop(self) -> None:
        subprocess.run([str(TESTBED / "stop-swift.sh"), str(self.base)], check=False)

    def token(self) -> str:
        account = {"X-Storage-User": "glance:glance", "X-Storage-Pass": "glancepass"}
        resp = requests.get(self.url + "/auth/v1.0", headers=account, timeout=10)
        resp.raise_for_status()
        return resp.headers["X-Auth-Token"]

    def set_temp_url_key(self, key: str) -> None:
        requests.post(self.storage_url, timeout=10, headers={
            "X-Auth-Token": self.token(), "X-Account-Meta-Temp-URL-Key": key,
        }).raise_for_status()  # fmt: skip

    def head(self, container: str, name: str) -> requests.Response:
        return requests.head(f"{self.storage_url}/{container}/{name}", timeout=10,
                             headers={"X-Auth-Token": self.token()})  # fmt: skip

    def listing(self, container: str = "glance") -> list[str]:
        resp = requests.get(f"{self.storage_url}/{container}", timeout=10,
                            headers={"X-Auth-Token": self.token()})  # fmt: skip
        return resp.text.split() if resp.status_code == 200 else []

"""What the adversarial tests check of the sidecar itself after each attack, and its admin API.

All read from outside, as an operator would: the process (same pid, still ready), its open
descriptors and resident memory from /proc, the partial files on disk, the exceptions in its log.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path
from typing import Any

import requests

from tests.support.sidecar import Sidecar

# aiohttp logs a handler's unhandled exception with this line before its traceback; our own code
# logs tracebacks only for bugs ("fill ... crashed").
UNHANDLED = ("Traceback (most recent call last)", "Error handling request")
_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")  # cachenode's log format


def pid(sidecar: Sidecar) -> int:
    assert sidecar.proc is not None
    return sidecar.proc.pid


def fd_count(process: int) -> int:
    return len(os.listdir(f"/proc/{process}/fd"))


def open_files(process: int) -> list[str]:
    """What each open descriptor points at: a path, ``socket:[inode]``, ``pipe:[inode]``..."""
    found = []
    for fd in os.listdir(f"/proc/{process}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            found.append(os.readlink(f"/proc/{process}/fd/{fd}"))
    return found


def sockets(process: int) -> int:
    return sum(1 for target in open_files(process) if target.startswith("socket:"))


def image_files(sidecar: Sidecar, process: int) -> list[str]:
    """Descriptors on image files that nobody owns once every caller and fill is gone: any on a
    partial file, a second one on a blob, any on a blob no longer linked (evicted).

    What may stay is L1's own: one descriptor on each blob of a recent hit (``HELD_BLOBS``, as
    nginx's ``open_file_cache``). (The catalog's SQLite files stay open too.)
    """
    blobs, partials = str(sidecar.cache_dir / "blobs"), str(sidecar.cache_dir / "partial")
    found = [t for t in open_files(process) if t.startswith((blobs, partials))]
    return [
        t for i, t in enumerate(found)
        if t.startswith(partials) or t.endswith(" (deleted)") or t in found[:i]
    ]  # fmt: skip


def fds_not_held(sidecar: Sidecar, process: int) -> int:
    """Open descriptors, less the blobs L1 holds open for hits (at most ``HELD_BLOBS``): what a
    leak would make grow."""
    blobs = str(sidecar.cache_dir / "blobs")
    return sum(1 for t in open_files(process) if not t.startswith(blobs))


def rss_bytes(process: int) -> int:
    for line in Path(f"/proc/{process}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {process}")


def assert_alive(sidecar: Sidecar, process: int) -> None:
    """The same process is still running and still ready (nothing crashed or restarted it)."""
    assert sidecar.proc is not None and sidecar.proc.pid == process
    assert sidecar.proc.poll() is None, f"cachenode exited {sidecar.proc.returncode}"
    assert requests.get(sidecar.admin_url + "/readyz", timeout=10).status_code == 200


def unhandled(sidecar: Sidecar) -> list[str]:
    """Log records of the sidecar that report an exception nothing handled.

    aiohttp logs a request its HTTP parser refused (a line too long, a bad header) with a
    traceback too, and answers it 400: that exception is handled, and the client's doing.
    """
    return [
        record
        for record in _records(sidecar.log())
        if any(m in record for m in UNHANDLED) and "aiohttp.http_exceptions." not in record
    ]


def _records(log: str) -> list[str]:
    """The log cut into records: each starts with its timestamp, tracebacks stay with it."""
    records: list[str] = []
    for line in log.splitlines():
        if _STAMP.match(line) or not records:
            records.append(line)
        else:
            records[-1] += "\n" + line
    return records


def assert_clean(sidecar: Sidecar, process: int) -> None:
    """Alive, no fill running, no partial file left, no unhandled exception logged."""
    assert_alive(sidecar, process)
    sidecar.settle()
    assert sidecar.partials() == []
    assert unhandled(sidecar) == [], sidecar.log()[-4000:]


def wait_below(measure: Any, limit: int, timeout: float = 15) -> int:
    """Poll ``measure()`` until it is at most ``limit`` (connections take a moment to be closed
    on the server's side after the client's); the last value either way."""
    deadline = time.monotonic() + timeout
    value = int(measure())
    while value > limit and time.monotonic() < deadline:
        time.sleep(0.1)
        value = int(measure())
    return value


class AdminApi:
    """The sidecar's JSON admin API, with the token its config names."""

    def __init__(self, sidecar: Sidecar, token: str) -> None:
        self.url = sidecar.admin_url + "/admin/v1"
        self.headers = {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, **kw: Any) -> Any:
        resp = requests.request(method, self.url + path, headers=self.headers, timeout=60, **kw)
        resp.raise_for_status()
        return resp.json()

    def cached(self) -> dict[str, dict[str, Any]]:
        """The entries L1 lists (fills in progress left out), by image id."""
        images = self.call("GET", "/images")["images"]
        return {i["id"]: i for i in images if i["state"] == "cached"}

    def evict(self, *image_ids: str) -> list[str]:
        return list(self.call("POST", "/evict", json={"ids": list(image_ids)})["evicted"])

    def evict_all(self) -> list[str]:
        return list(self.call("POST", "/evict", json={"all": True, "force": True})["evicted"])

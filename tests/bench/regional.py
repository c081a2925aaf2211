"""A regional tier in front of N host sidecars, side by side: a regional cachenode against
glance-api's own image cache (SPEC §9: "the origin sends each image once per region"). Not a
test: a table.

    .venv/bin/python tests/bench/regional.py      # BENCH_SIZE_MB (1024), BENCH_HOSTS (8)

One real glance-api (file store, its image cache on: the test bed's fakeauth+caching) is the
origin. Topology "cachenode": a regional sidecar whose tier is that Glance, and N host sidecars
whose ``glance.url`` and ``glance`` tier point at the regional. Topology "glance-api cache": the
N host sidecars' tier is the glance-api itself, its cache the regional tier. Each topology gets
its own cold image; one curl per host asks for it at the same instant. Everything is on
127.0.0.1, one image of each at a time.

Figures: what glance-api sent for the image (its uWSGI log), how many of those reads came from its
store rather than its cache (its debug log: every download that was not a "Cache hit"), the
slowest host's total time, and the latest first byte.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.bench import Fetch, curl  # noqa: E402
from tests.support.glance import ALICE, Glance  # noqa: E402
from tests.support.sidecar import Sidecar  # noqa: E402

SIZE = int(os.environ.get("BENCH_SIZE_MB", "1024")) << 20
HOSTS = int(os.environ.get("BENCH_HOSTS", "8"))
_SENT = re.compile(
    r"GET /v2/images/([0-9a-f-]+)/file => generated (\d+) bytes .*\(HTTP/1.1 (\d+)\)"
)


def upload(glance: Glance, work: Path) -> str:
    """A public image of SIZE random bytes, written to Glance from a file (not held in memory)."""
    blob = work / "image.raw"
    with blob.open("wb") as f:
        for _ in range(SIZE >> 20):
            f.write(os.urandom(1 << 20))
    r = glance.api(
        "POST", "/v2/images", json={"name": "regional", "disk_format": "raw",
                                    "container_format": "bare"},
    )  # fmt: skip
    image_id = str(r.json()["id"])
    with blob.open("rb") as f:
        glance.api(
            "PUT", f"/v2/images/{image_id}/file", data=f,
            headers={"Content-Type": "application/octet-stream"},
        ).raise_for_status()  # fmt: skip
    blob.unlink()
    return image_id


def glance_sent(glance: Glance, image_id: str) -> tuple[int, int, int]:
    """Bytes glance-api sent for the image's data, its answers of more than one byte (whole
    downloads, not authorization probes), and of those, the ones its cache served."""
    sent = whole = 0
    for line in (glance.base / "log" / "uwsgi.log").read_text().splitlines():
        m = _SENT.search(line)
        if m and m.group(1) == image_id:
            sent += int(m.group(2))
            whole += int(m.group(2)) > 1
    log = (glance.base / "log" / "glance-api.log").read_text()
    if f"Tee'ing image '{image_id}' into cache" not in log:
        raise RuntimeError("glance-api logs no debug lines (or never cached the image)")
    hits = log.count(f"Cache hit for image '{image_id}'")
    return sent, whole, hits


def herd(cars: list[Sidecar], image_id: str) -> list[Fetch]:
    """One curl per host, all started at once."""
    got: list[Fetch] = []
    lock = threading.Lock()
    start = threading.Barrier(len(cars))

    def one(car: Sidecar) -> None:
        start.wait()
        f = curl(f"{car.url}/v2/images/{image_id}/file", ALICE)
        with lock:
            got.append(f)

    threads = [threading.Thread(target=one, args=(car,)) for car in cars]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def run(name: str, glance: Glance, work: Path, image_id: str, regional: bool) -> list[str]:
    cars: list[Sidecar] = []
    try:
        upstream = glance.url
        if regional:
            tier = {"name": "origin", "kind": "glance", "url": glance.url}
            cars.append(Sidecar(work / f"{name}-regional", glance.url, tiers=[tier]).start())
            upstream = cars[0].url
        tier = {"name": "regional", "kind": "glance", "url": upstream}
        hosts = [
            Sidecar(work / f"{name}-host{n}", upstream, tiers=[tier]).start() for n in range(HOSTS)
        ]
        cars += hosts
        got = herd(hosts, image_id)
        assert all(f.status == 200 and f.size == SIZE for f in got), got
        for car in cars:
            car.settle(120)
        sent, whole, hits = glance_sent(glance, image_id)
        return [
            name,
            f"{sent / SIZE:.2f}x",
            f"{whole - hits} of {whole}",
            f"{max(f.total for f in got):.2f} s",
            f"{max(f.ttfb for f in got) * 1000:.0f} ms",
        ]
    finally:
        for car in cars:
            car.stop()
            shutil.rmtree(car.workdir, ignore_errors=True)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="cachenode-regional."))
    # Glance logs its cache hits at debug level only.
    glance = Glance(work / "glance", env={"GLANCE_EXTRA_CONF": "[DEFAULT]\ndebug = True\n"})
    glance.start()
    try:
        print(f"bench: two cold {SIZE >> 20} MiB images into Glance...", file=sys.stderr)
        images = [upload(glance, work), upload(glance, work)]
        rows = [
            run("cachenode regional", glance, work, images[0], regional=True),
            run("glance-api cache", glance, work, images[1], regional=False),
        ]
        header = ["regional tier", "glance-api sent", "store reads", "slowest host", "first byte"]
        print(
            f"\n{HOSTS} host sidecars, one cold {SIZE >> 20} MiB image asked by each at once, "
            f"loopback, {os.cpu_count()} cores\n"
        )
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, ["-" * w for w in widths], *rows]:
            print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        return 0
    finally:
        glance.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

"""How soon a sidecar refuses what Glance has just taken away (target: under 1 s). Not a test.

    .venv/bin/python tests/bench/notify_latency.py        # BENCH_RUNS rounds (default 10)

A private RabbitMQ, a real glance-api publishing its notifications on it, and cachenode remembering
decisions for 10 minutes (``authz.ttl``), so only the notification can end them. Each round caches
an image, deactivates it through Glance's API, and polls the sidecar until it refuses: the figure
is the time from Glance's API answering to the first refusal. Then the same for a deletion.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.support.glance import ADMIN, ALICE, TESTBED, Glance  # noqa: E402
from tests.support.rabbit import Rabbit  # noqa: E402
from tests.support.sidecar import Sidecar  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "10"))


def until_refused(car: Sidecar, image_id: str, since: float, limit: float = 30) -> float:
    while car.get(image_id, ALICE, settle=False).status_code == 200:
        if time.monotonic() - since > limit:
            return float("inf")
        time.sleep(0.002)
    return time.monotonic() - since


def measure(glance: Glance, car: Sidecar, take_away: Callable[[str], requests.Response]) -> float:
    image = glance.create_image(1 << 20)
    car.get(image.id, ALICE)
    assert car.get(image.id, ALICE).headers["X-Cachenode-Status"] == "HIT"
    take_away(image.id).raise_for_status()
    return until_refused(car, image.id, time.monotonic())


def report(name: str, figures: list[float]) -> None:
    ms = sorted(f * 1000 for f in figures)
    print(f"{name:<12} median {statistics.median(ms):7.1f} ms   max {ms[-1]:7.1f} ms   "
          f"({len(ms)} runs; target < 1000 ms)")  # fmt: skip


def main() -> int:
    subprocess.run([str(TESTBED / "install.sh")], check=True)
    work = Path(tempfile.mkdtemp(prefix="cachenode-notify-bench."))
    rabbit = Rabbit(work / "rabbit").start()
    glance = Glance(work / "glance", env={"GLANCE_TRANSPORT_URL": rabbit.transport_url})
    car: Sidecar | None = None
    try:
        glance.start()
        car = Sidecar(work / "sidecar", glance.url, authz={"ttl": "10m"},
                      notifications={"transport_url_file": str(rabbit.url_file(work))})  # fmt: skip
        car.start()
        while car.metric("cachenode_notifications_connected") != 1:
            time.sleep(0.05)

        def deactivate(image_id: str) -> requests.Response:
            return glance.api("POST", f"/v2/images/{image_id}/actions/deactivate", ADMIN)

        def delete(image_id: str) -> requests.Response:
            return glance.api("DELETE", f"/v2/images/{image_id}", ADMIN)

        report("deactivate", [measure(glance, car, deactivate) for _ in range(RUNS)])
        report("delete", [measure(glance, car, delete) for _ in range(RUNS)])
    finally:
        if car is not None:
            car.stop()
        glance.stop()
        rabbit.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

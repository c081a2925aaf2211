"""Restart at 80% of a 1 GiB fill (SPEC §9): what the tier sends again. Not a test: a table.

    .venv/bin/python tests/bench/resume.py      # BENCH_SIZE_MB=1024 by default, ~1 minute

A real glance-api (authorization, the image record), the image served by our own upstream
(tests/support/upstream.py, throttled to ``BENCH_RATE_MBS`` a connection, default 200 MB/s, as a
far object store) as cachenode's ``http`` tier, one stream or four parallel ranged ones. The
sidecar is killed with SIGKILL as soon as the origin has sent 80% of the image: no waiting for
the journal, so what its batching loses shows. It is restarted and the image fetched whole
(sha512 checked); the row is what the origin sent after the restart, as a fraction of the image.

The last rows are the journal's price: 1 GiB put through a fill's sink into a file on the cache's
filesystem, without and with the recorder (an fdatasync before each record), each ending with
the fsync every commit does anyway (medians of 3 runs each, interleaved).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cachenode import journal  # noqa: E402
from cachenode.blobs import BlobStore  # noqa: E402
from cachenode.sink import Sink  # noqa: E402
from tests.support.glance import ALICE, Glance  # noqa: E402
from tests.support.sidecar import Sidecar  # noqa: E402
from tests.support.upstream import Fault, Upstream  # noqa: E402

SIZE = int(os.environ.get("BENCH_SIZE_MB", "1024")) << 20
RATE = float(os.environ.get("BENCH_RATE_MBS", "200")) * 1e6
KILL_AT = 0.8


def restart_row(work: Path, glance: Glance, image_id: str, data: bytes, parallel: int) -> str:
    with Upstream(blobs={image_id: data}, faults=[Fault("throttle", rate=RATE, times=-1)]) as up:
        tier = {"name": "origin", "kind": "http", "url": up.url, "parallel": parallel}
        car = Sidecar(work / f"cachenode-p{parallel}", glance.url, tiers=[tier]).start()
        url = f"{car.url}/v2/images/{image_id}/file"
        first = Thread(url)
        deadline = time.monotonic() + 120
        while up.bytes_for(image_id) < KILL_AT * SIZE:
            assert time.monotonic() < deadline, "the fill never reached 80%"
            time.sleep(0.002)
        car.kill9()
        sent_before = up.bytes_for(image_id)
        first.join()
        car.start()
        digest = hashlib.sha512()
        with requests.get(url, headers={"X-Auth-Token": ALICE}, stream=True, timeout=300) as r:
            for chunk in r.iter_content(1 << 20):
                digest.update(chunk)
        car.settle(120)
        resumed = car.metric("cachenode_resumed_bytes_total")
        car.stop()
    assert digest.hexdigest() == hashlib.sha512(data).hexdigest(), "wrong bytes after the restart"
    again = up.bytes_for(image_id) - sent_before
    return (
        f"killed at {sent_before / SIZE:.1%} sent | resumed {resumed / SIZE:.1%} | "
        f"tier sent again {again / SIZE:.1%} (target <= 25%)"
    )


class Thread:
    """A caller that starts the fill and dies with the sidecar."""

    def __init__(self, url: str) -> None:
        self._t = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._t.start()

    @staticmethod
    def _run(url: str) -> None:
        try:
            with requests.get(url, headers={"X-Auth-Token": ALICE}, stream=True, timeout=300) as r:
                for _ in r.iter_content(1 << 20):
                    pass
        except requests.RequestException:
            pass  # the kill cuts it

    def join(self) -> None:
        self._t.join(30)


def sink_seconds(directory: Path, data: bytes, recorded: bool) -> tuple[float, int]:
    """Seconds to put ``data`` through a sink (1 MiB pieces) and fsync; records written."""
    path = directory / f"sink-{recorded}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    jfd = os.open(journal.path_for(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    os.posix_fallocate(fd, 0, len(data))
    header = journal.Record("00000000-0000-4000-8000-000000000000", len(data), "sha512", "0" * 128)
    recorder = journal.Recorder(jfd, fd, header)

    async def main() -> None:
        on_written = recorder.written if recorded else None
        sink = Sink(fd, "sha512", BlobStore.write, lambda _: None, on_written)
        try:
            view = memoryview(data)
            for off in range(0, len(data), 1 << 20):
                await sink.put(view[off : off + (1 << 20)], off)
            await sink.drain()
        finally:
            await sink.aclose()
            await recorder.aclose()

    os.sync()
    started = time.monotonic()
    asyncio.run(main())
    os.fsync(fd)
    elapsed = time.monotonic() - started
    os.close(fd)
    os.close(jfd)
    found = journal.read(journal.path_for(path))
    path.unlink()
    journal.path_for(path).unlink()
    return elapsed, (found[0] + 1 if found else 0)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="cachenode-resume."))
    print(f"resume bench: {SIZE >> 20} MiB image, origin {RATE / 1e6:.0f} MB/s a connection",
          file=sys.stderr)  # fmt: skip
    data = os.urandom(SIZE)
    glance = Glance(work / "glance").start()
    try:
        doc = {"name": "resume", "disk_format": "raw", "container_format": "bare"}
        image_id = glance.api("POST", "/v2/images", json=doc).json()["id"]
        octets = {"Content-Type": "application/octet-stream"}
        glance.api("PUT", f"/v2/images/{image_id}/file", data=data, headers=octets)
        rows = [
            ("Restart at 80%, one stream", restart_row(work, glance, image_id, data, 1)),
            ("Restart at 80%, 4 parallel ranges", restart_row(work, glance, image_id, data, 4)),
        ]
        runs = [(sink_seconds(work, data, False), sink_seconds(work, data, True)) for _ in range(3)]
        plain = statistics.median(p for (p, _), _ in runs)
        with_journal = statistics.median(j for _, (j, _) in runs)
        records = runs[0][1][1]
        rows.append(("Sink, no journal", f"{SIZE / plain / 1e6:.0f} MB/s ({plain:.2f} s)"))
        rows.append(
            (
                "Sink, journal",
                f"{SIZE / with_journal / 1e6:.0f} MB/s ({with_journal:.2f} s, {records} records,"
                f" {with_journal / plain:.2f}x the time)",
            )
        )
    finally:
        glance.stop()
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}} | {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

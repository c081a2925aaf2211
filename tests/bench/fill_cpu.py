"""What a fill costs in CPU-seconds per GiB (getrusage, not wall time), side by side in one run
with the floor of the same work on this machine. Not a test: a table.

    .venv/bin/python tests/bench/fill_cpu.py      # 1 GiB image (BENCH_SIZE_MB), ~2 minutes

Rows, each the median of ``BENCH_RUNS`` (default 3):

- cachenode, a cold miss of one client from an unthrottled nginx origin (one stream, and four
  parallel ranges): the sidecar process's user+system CPU from the request until the fill is
  committed. It receives, writes (whole blocks with O_DIRECT, ``cachenode.direct``), hashes
  (sha512) and serves the image (from the bytes it still holds) and fsyncs it.
- the floor: a 25-line Python loop doing the least any verifying cache must do with the same
  bytes from the same origin: ``recv_into`` one reused 1 MiB buffer, sha512 it, ``pwrite`` it
  into a preallocated file, fsync. No serving, no event loop, no threads. Once through the page
  cache (the reference the ratios are to), once with O_DIRECT (what the same loop costs when
  the kernel copies nothing).
- sha512 alone over 1 GiB in memory: a floor no verifying design goes under.

The cost of writing fresh pages into the page cache varies with the machine's memory (on this
VM between 0.5 and 2.4 s/GiB for the same write), which is why the floor runs in the same run,
interleaved with cachenode's.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "bench"))

import bench  # noqa: E402

from tests.support.glance import ALICE, Glance  # noqa: E402
from tests.support.sidecar import Sidecar  # noqa: E402

SIZE = bench.SIZE
RUNS = bench.RUNS
GIB = 2**30

FLOOR = r"""
import hashlib, mmap, os, resource, socket, sys
port, path, out, direct = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "direct"
r0 = resource.getrusage(resource.RUSAGE_SELF)
s = socket.create_connection(("127.0.0.1", port))
s.sendall(f"GET {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n".encode())
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(65536)
head, _, rest = head.partition(b"\r\n\r\n")
size = next(int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n"))
            if k.lower() == b"content-length")
buf = mmap.mmap(-1, 1 << 20); view = memoryview(buf); h = hashlib.sha512()
fd = os.open(out, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
os.posix_fallocate(fd, 0, size)
wfd = os.open(out, os.O_WRONLY | os.O_DIRECT) if direct else fd
view[: len(rest)] = rest; h.update(rest); held = off = len(rest); base = 0
while off < size:
    n = s.recv_into(view[held:])
    if not n:
        break
    h.update(view[held : held + n]); held += n; off += n
    if held == len(buf) or off == size:
        whole = held - held % 4096
        os.pwrite(wfd, view[:whole], base)
        os.pwrite(fd, view[whole:held], base + whole)
        base += held; held = 0
os.fsync(fd); os.close(fd)
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(off, r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
"""


def per_gib(cpu: float) -> float:
    return cpu / (SIZE / GIB)


def sidecar_fill(work: Path, glance: Glance, origin: str, image_id: str, name: str,
                 parallel: int) -> float:  # fmt: skip
    """CPU-seconds the sidecar spent on one cold miss, to the fill's commit."""
    tier = {"name": "origin", "kind": "http", "url": origin, "parallel": parallel}
    car = Sidecar(work / name, glance.url, authz={"ttl": "60s"}, tiers=[tier]).start()
    try:
        proc = psutil.Process(car.proc.pid)  # type: ignore[union-attr]
        bench.settle()
        before = proc.cpu_times()
        fetch = bench.curl(f"{car.url}/v2/images/{image_id}/file", ALICE)
        car.settle()
        after = proc.cpu_times()
        assert fetch.status == 200 and fetch.size == SIZE, fetch
        return (after.user - before.user) + (after.system - before.system)
    finally:
        car.stop()


def floor(port: int, path: str, out: Path, mode: str) -> float:
    bench.settle()
    done = subprocess.run(
        [sys.executable, "-c", FLOOR, str(port), path, str(out), mode],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    received, cpu = done.stdout.split()
    assert int(received) == SIZE
    out.unlink()
    return float(cpu)


def sha512_alone() -> float:
    chunk = os.urandom(1 << 20)
    digest = hashlib.sha512()
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(SIZE >> 20):
        digest.update(chunk)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return after.ru_utime - before.ru_utime


def main() -> int:
    if not shutil.which("nginx") or not shutil.which("curl"):
        print("fill_cpu: nginx and curl are needed (apt-get install nginx curl)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="cachenode-fillcpu."))
    files = work / "files" / "images"
    files.mkdir(parents=True)
    glance = Glance(work / "glance").start()
    nginx = None
    try:
        data = work / "image.raw"
        with data.open("wb") as f:
            for _ in range(SIZE >> 20):
                f.write(os.urandom(1 << 20))
        record = {"name": "fillcpu", "disk_format": "raw", "container_format": "bare"}
        image_id = glance.api("POST", "/v2/images", json=record).json()["id"]
        octets = {"Content-Type": "application/octet-stream"}
        with data.open("rb") as f:
            glance.api(
                "PUT", f"/v2/images/{image_id}/file", data=f, headers=octets
            ).raise_for_status()
        os.link(data, files / image_id)
        nginx = bench.Nginx(work, files.parent)
        origin = f"http://127.0.0.1:{nginx.plain}/images"
        one, four, floors, directs = [], [], [], []
        for n in range(RUNS):  # interleaved: each row sees the same state of the machine
            floors.append(floor(nginx.plain, f"/images/{image_id}", work / "floor.out", "cached"))
            directs.append(floor(nginx.plain, f"/images/{image_id}", work / "floor.out", "direct"))
            one.append(sidecar_fill(work, glance, origin, image_id, f"one{n}", 1))
            four.append(sidecar_fill(work, glance, origin, image_id, f"four{n}", 4))
        ref = statistics.median(floors)
        rows = [
            ("cachenode fill, one stream", statistics.median(one)),
            ("cachenode fill, 4 parallel ranges", statistics.median(four)),
            ("floor: recv + sha512 + pwrite + fsync", ref),
            ("the same, pwrite with O_DIRECT", statistics.median(directs)),
            ("sha512 alone", sha512_alone()),
        ]
        print(f"\nfill CPU: {SIZE >> 20} MiB image, loopback, {os.cpu_count()} cores, "
              f"median of {RUNS} runs (target <= 2.5 CPU-s/GiB)\n")  # fmt: skip
        print(f"{'case':40} | CPU-s/GiB | vs floor")
        print("-" * 64)
        for name, cpu in rows:
            print(f"{name:40} | {per_gib(cpu):9.2f} | {cpu / ref:.2f}x")
        return 0
    finally:
        if nginx is not None:
            nginx.stop()
        glance.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

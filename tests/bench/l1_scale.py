"""L1 at scale: a miss, a hit and a sweep with 10 and with 10,000 entries, next to references.

    .venv/bin/python tests/bench/l1_scale.py       # about two minutes; BENCH_SECONDS

Not a test: a table. Everything runs on this machine, on 127.0.0.1 only: a real glance-api (the
test bed's), cachenode in front of it with its L1 seeded with 10 or 10,000 entries of 4 KiB (a
policy at exactly its limit, so that every miss evicts one of them), and as references, in the
same run, a plain aiohttp ``FileResponse`` server and (when installed) nginx with sendfile and one
worker, serving the same file. Every server is loaded by the same client, a lean asyncio HTTP/1.1
client in a process of its own: 32 keep-alive connections asking random 4 KiB ranges of a
64 MiB image for BENCH_SECONDS (default 5).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cachenode.blobs import BlobStore  # noqa: E402
from cachenode.catalog import Catalog, Entry  # noqa: E402
from tests.support.glance import ALICE, Glance  # noqa: E402
from tests.support.sidecar import Sidecar, free_port  # noqa: E402

SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
MISSES = int(os.environ.get("BENCH_MISSES", "10"))  # each evicts one seeded entry: <= 10
SMALL = 4 << 10
HOT = 64 << 20
CONNS = 32
SIZES = (10, 10_000)


# -- the client (also run as `l1_scale.py --load HOST PORT PATH TOKEN CONNS SECONDS`)
def ranged(path: str, token: str, size: int, rng: random.Random) -> bytes:
    start = rng.randrange(size // SMALL) * SMALL
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Auth-Token: {token}\r\n"
        f"Range: bytes={start}-{start + SMALL - 1}\r\n\r\n"
    ).encode()


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, int, float]:
    """Send ``request``; (status, body bytes, seconds to the first byte of the answer)."""
    began = time.perf_counter()
    writer.write(request)
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    first = time.perf_counter() - began
    status = int(head.split(b" ", 2)[1])
    at = head.index(b"\r\ncontent-length:") + 17
    length = int(head[at : head.index(b"\r\n", at)])
    await reader.readexactly(length)
    return status, length, first


async def load(host: str, port: int, path: str, token: str, conns: int, seconds: float) -> None:
    """Print requests a second, errors and the median and 99th percentile latency (ms)."""
    rng = random.Random(7)
    done, errors, latencies = 0, 0, []
    deadline = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal done, errors
        reader, writer = await asyncio.open_connection(host, port)
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            status, length, _ = await exchange(reader, writer, ranged(path, token, HOT, rng))
            latencies.append(time.perf_counter() - began)
            if status == 206 and length == SMALL:
                done += 1
            else:
                errors += 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(conns)))
    elapsed = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100)
    print(f"{done / elapsed:.0f} {errors} {q[49] * 1000:.3f} {q[98] * 1000:.3f}")


def run_load(port: int, path: str, conns: int, seconds: float) -> tuple[float, int, float, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--load", "127.0.0.1", str(port), path, ALICE, str(conns),
         str(seconds)],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return float(out[0]), int(out[1]), float(out[2]), float(out[3])


def first_byte(port: int, path: str) -> float:
    """Seconds to the first byte of a whole download, on a new connection."""

    async def go() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {ALICE}\r\n\r\n".encode()
        status, length, first = await exchange(reader, writer, request)
        assert status == 200 and length == SMALL, (status, length)
        writer.close()
        return first

    return asyncio.run(go())


# -- the servers
AIOHTTP = """
import sys
from aiohttp import web
path = sys.argv[2]
async def handler(request):
    return web.FileResponse(path)
app = web.Application()
app.router.add_get("/file", handler)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def wait_port(port: int) -> None:
    import socket

    for _ in range(200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def nginx(work: Path, files: Path, port: int) -> subprocess.Popen[bytes] | None:
    if shutil.which("nginx") is None:
        return None
    conf = work / "nginx.conf"
    user = "user root;" if os.geteuid() == 0 else ""  # its workers must read the temp folder
    conf.write_text(f"""
{user}
worker_processes 1;
daemon off;
error_log {work}/error.log;
pid {work}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 100000000;
    client_body_temp_path {work}; proxy_temp_path {work}; fastcgi_temp_path {work};
    uwsgi_temp_path {work}; scgi_temp_path {work};
    server {{ listen 127.0.0.1:{port}; root {files}; }}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)])
    wait_port(port)
    return proc


def seed(cache: Path, count: int) -> None:
    """``count`` entries of 4 KiB, last used a day ago, as commits would have left them."""
    blobs, catalog = BlobStore(cache), Catalog(cache / "catalog")
    data, then = os.urandom(SMALL), time.time() - 86400
    for i in range(count):
        image_id = str(uuid.uuid4())
        path = blobs.path(image_id)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        catalog.put(Entry(image_id, SMALL, "sha512", "0", None, "glance", then + i, then + i))
    catalog.close()


def cachenode(
    work: Path, glance: Glance, count: int, hot: str, misses: list[str]
) -> dict[str, str]:
    """One sidecar with ``count`` entries in L1: its misses, hit latency and hit throughput."""
    cache = work / f"cache{count}"
    seed(cache, count)
    policy = work / f"policy{count}.yaml"
    # At its limit once the hot image is in: every 4 KiB miss evicts exactly one entry.
    policy.write_text(f"max_bytes: {count * SMALL + HOT}\nhigh_watermark: 1.0\n"
                      "low_watermark: 1.0\nmin_free_disk: 0\n")  # fmt: skip
    car = Sidecar(work / f"car{count}", glance.url, authz={"ttl": "10m"},
                  cache={"dir": str(cache), "policy": str(policy)}).start()  # fmt: skip
    try:
        car.get(hot, ALICE)  # its fill, then hits only
        path = f"/v2/images/{hot}/file"
        run_load(car.port, path, 1, 0.5)  # warm-up: the first probe and a held blob
        firsts = []
        for image_id in misses:
            firsts.append(first_byte(car.port, f"/v2/images/{image_id}/file"))
            car.settle()
        evicted = car.metric("cachenode_evictions_total", reason="size")
        assert evicted == len(misses), (evicted, car.metric("cachenode_cache_entries"))
        _, _, latency, _ = run_load(car.port, path, 1, SECONDS)
        rate, errors, median, p99 = run_load(car.port, path, CONNS, SECONDS)
        assert errors == 0
        return {
            "miss": f"{statistics.median(firsts) * 1000:.1f} ms",
            "hit": f"{latency:.2f} ms",
            "rate": f"{rate:.0f} req/s (p50 {median:.1f} ms, p99 {p99:.1f} ms)",
            "_miss": str(statistics.median(firsts)),
            "_hit": str(latency),
            "_rate": str(rate),
        }
    finally:
        car.stop()


def sweeps(work: Path) -> str:
    """In-process: a sweep of 10,000 entries evicting 1, 100 and 1,000 of them."""
    from cachenode.janitor import Janitor
    from cachenode.local import Local
    from cachenode.metrics import Metrics
    from cachenode.policy import Policy
    from cachenode.units import Size

    cache = work / "sweep"
    seed(cache, 10_000)
    cells = []

    async def sweep(evicted: int) -> float:
        left = len(local.index)
        policy = Policy("p", max_bytes=Size((left - evicted) * SMALL), high_watermark=1.0,
                        low_watermark=1.0, min_free_disk=Size(0))  # fmt: skip
        janitor = Janitor(local, local.policy, local.metrics)
        janitor.policy = policy  # the index orders by LRU either way
        began = time.perf_counter()
        await janitor.sweep()
        elapsed = time.perf_counter() - began
        assert len(local.index) == left - evicted
        return elapsed

    async def main() -> None:
        await local.start()
        try:
            for evicted in (1, 100, 1000):
                cells.append(f"{evicted}: {await sweep(evicted) * 1000:.1f} ms")
        finally:
            await local.stop()

    local = Local(cache, Metrics(), Policy("p"))
    asyncio.run(main())
    return ", ".join(cells)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="l1scale-"))
    glance = Glance(work / "glance").start()
    refs: list[subprocess.Popen[bytes]] = []
    try:
        hot = glance.create_image(HOT)
        misses = {n: [glance.create_image(SMALL).id for _ in range(MISSES)] for n in SIZES}
        results = {n: cachenode(work, glance, n, hot.id, misses[n]) for n in SIZES}

        files = work / "files"
        files.mkdir()
        (files / "file").write_bytes(hot.data)
        port = free_port()
        refs.append(
            subprocess.Popen([sys.executable, "-c", AIOHTTP, str(port), str(files / "file")])
        )
        wait_port(port)
        run_load(port, "/file", 1, 0.5)
        _, _, aio_latency, _ = run_load(port, "/file", 1, SECONDS)
        aio = run_load(port, "/file", CONNS, SECONDS)
        nginx_port = free_port()
        ngx = nginx(work, files, nginx_port)
        ngx_cell = "not installed"
        if ngx is not None:
            refs.append(ngx)
            run_load(nginx_port, "/file", 1, 0.5)
            _, _, ngx_latency, _ = run_load(nginx_port, "/file", 1, SECONDS)
            n = run_load(nginx_port, "/file", CONNS, SECONDS)
            ngx_cell = f"nginx {n[0]:.0f} req/s, one connection {ngx_latency:.2f} ms"
        sweep_cell = sweeps(work)

        small, large = results[SIZES[0]], results[SIZES[1]]

        def ratio(key: str) -> str:
            return f"{float(large[key]) / float(small[key]):.2f}x"

        rows = [
            ("case", "10 entries", "10,000 entries", "10,000 / 10", "reference (same run)"),
            ("miss of 4 KiB: first byte, median", small["miss"], large["miss"],
             ratio("_miss") + " (target <= 1.10x)", "-"),
            ("hit: 4 KiB range, one connection, median", small["hit"], large["hit"],
             ratio("_hit") + " (target <= 1.10x)",
             f"aiohttp FileResponse {aio_latency:.2f} ms"),
            ("hits: 4 KiB ranges, 32 connections", small["rate"], large["rate"],
             f"{float(large['_rate']) / aio[0]:.2f}x aiohttp (target >= 2x)",
             f"aiohttp FileResponse {aio[0]:.0f} req/s (p50 {aio[2]:.1f} ms); {ngx_cell}"),
            ("sweep of 10,000 entries, evicting k", "-", sweep_cell, "-", "-"),
        ]  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        print(f"\nL1 at scale: loopback, {os.cpu_count()} cores, {SECONDS:.0f} s a load\n")
        for i, row in enumerate(rows):
            print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
            if i == 0:
                print("-+-".join("-" * w for w in widths))
        return 0
    finally:
        for proc in refs:
            proc.terminate()
            proc.wait(10)
        glance.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--load"]:
        host, port, path, token, conns, seconds = sys.argv[2:8]
        asyncio.run(load(host, int(port), path, token, int(conns), float(seconds)))
        raise SystemExit(0)
    raise SystemExit(main())

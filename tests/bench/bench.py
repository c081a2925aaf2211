"""cachenode against its peers, side by side in one run (SPEC §9). Not a test: a table.

    make bench                     # 1 GiB image (BENCH_SIZE_MB to change), ~3 minutes

Everything runs on this machine, on loopback: a real glance-api (authorization and the image
record), an origin nginx serving the image file with ``limit_rate`` (200 MB/s a connection, as a
far object store would), cachenode with that origin as its ``http`` tier, and the peers in front of
the same origin: nginx ``proxy_cache`` with ``proxy_cache_lock`` and Varnish. Clients are curl
processes. Each figure is the median of ``BENCH_RUNS`` runs (default 3).

Needs nginx, varnish and curl (Debian packages); ``make bench`` installs them when missing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.support.glance import ALICE, Glance  # noqa: E402
from tests.support.sidecar import Sidecar, free_port  # noqa: E402

SIZE = int(os.environ.get("BENCH_SIZE_MB", "1024")) << 20
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
RATE = 200_000_000  # bytes/s a connection at the origin
CLIENTS = 10


@dataclass
class Fetch:
    status: int
    ttfb: float
    total: float
    size: int


def uncache(path: Path) -> None:
    """Drop ``path``'s pages from the page cache: its next reader reads the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def curl(url: str, token: str | None = None) -> Fetch:
    cmd = [
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{time_starttransfer} %{time_total} %{size_download}",
    ]
    if token:
        cmd += ["-H", f"X-Auth-Token: {token}"]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=False).stdout.split()
    return Fetch(int(out[0]), float(out[1]), float(out[2]), int(out[3]))


def curl_many(url: str, n: int, token: str | None = None) -> list[Fetch]:
    results: list[Fetch] = []
    lock = threading.Lock()

    def one() -> None:
        f = curl(url, token)
        with lock:
            results.append(f)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


class Peak:
    """Peak RSS of a process while the block runs."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> Peak:
        self._thread = threading.Thread(target=self._sample)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Nginx:
    def __init__(self, work: Path, files: Path) -> None:
        self.dir = work / "nginx"
        self.dir.mkdir()
        self.plain, self.origin, self.cache = free_port(), free_port(), free_port()
        self.log = self.dir / "access.log"
        (self.dir / "nginx.conf").write_text(f"""
user root;
worker_processes 2;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log;
events {{ worker_connections 1024; }}
http {{
  log_format bench '$server_port $body_bytes_sent';
  access_log {self.log} bench;
  sendfile on;
  tcp_nopush on;
  client_body_temp_path {self.dir}/body;
  proxy_temp_path {self.dir}/proxy_temp;
  fastcgi_temp_path {self.dir}/fcgi;
  uwsgi_temp_path {self.dir}/uwsgi;
  scgi_temp_path {self.dir}/scgi;
  proxy_cache_path {self.dir}/cache levels=1:2 keys_zone=img:10m max_size=20g inactive=1h
                   use_temp_path=off;
  server {{ listen 127.0.0.1:{self.plain}; root {files}; }}
  server {{ listen 127.0.0.1:{self.origin}; root {files}; limit_rate {RATE}; }}
  server {{
    listen 127.0.0.1:{self.cache};
    location / {{
      proxy_pass http://127.0.0.1:{self.origin};
      proxy_cache img;
      proxy_cache_lock on;
      proxy_cache_valid 200 1h;
    }}
  }}
}}
""")
        subprocess.run(
            ["nginx", "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir)], check=True
        )

    def origin_bytes(self) -> int:
        """Bytes the origin has sent so far (from its access log)."""
        total = 0
        for line in self.log.read_text().splitlines():
            port, sent = line.split()
            if int(port) == self.origin:
                total += int(sent)
        return total

    def stop(self) -> None:
        subprocess.run(
            ["nginx", "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir), "-s", "stop"],
            stderr=subprocess.DEVNULL,
        )


class Varnish:
    def __init__(self, work: Path, origin: int) -> None:
        self.dir = work / "varnish"
        self.dir.mkdir()
        self.port = free_port()
        subprocess.run(
            [
                "varnishd",
                "-a",
                f"127.0.0.1:{self.port}",
                "-b",
                f"127.0.0.1:{origin}",
                "-n",
                str(self.dir),
                "-s",
                f"file,{self.dir}/storage.bin,{2 * SIZE + (1 << 30)}",
                "-P",
                str(self.dir / "pid"),
                "-p",
                "default_ttl=3600",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1)

    def stop(self) -> None:
        pid = int((self.dir / "pid").read_text())
        os.kill(pid, 15)


def settle() -> None:
    """Flush what earlier runs left dirty (a fill's fsync, a peer's cache file): its writeback
    would otherwise land on whichever run comes next."""
    os.sync()
    time.sleep(0.5)


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    for tool in ("nginx", "varnishd", "curl"):
        if not shutil.which(tool):
            print(f"bench: {tool} is missing (apt-get install nginx varnish curl)", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="cachenode-bench."))
    files = work / "files" / "images"
    files.mkdir(parents=True)
    glance = Glance(work / "glance").start()
    nginx = varnish = None
    cars: list[Sidecar] = []
    try:
        print(
            f"bench: writing a {SIZE >> 20} MiB image and registering it in Glance...",
            file=sys.stderr,
        )
        blob = work / "image.raw"
        digest = hashlib.sha512()
        with blob.open("wb") as f:
            for _ in range(SIZE >> 20):
                chunk = os.urandom(1 << 20)
                digest.update(chunk)
                f.write(chunk)
        r = glance.api(
            "POST",
            "/v2/images",
            json={"name": "bench", "disk_format": "raw", "container_format": "bare"},
        )
        image_id = r.json()["id"]
        with blob.open("rb") as f:
            glance.api(
                "PUT",
                f"/v2/images/{image_id}/file",
                data=f,
                headers={"Content-Type": "application/octet-stream"},
            ).raise_for_status()
        os.link(blob, files / image_id)
        nginx = Nginx(work, files.parent)
        varnish = Varnish(work, nginx.origin)

        def sidecar(name: str, origin_port: int | None = None, parallel: int = 1) -> Sidecar:
            origin = f"http://127.0.0.1:{origin_port or nginx.origin}/images"
            tier = {"name": "origin", "kind": "http", "url": origin, "parallel": parallel}
            car = Sidecar(
                work / f"cachenode-{name}", glance.url, authz={"ttl": "60s"}, tiers=[tier]
            )
            cars.append(car)
            return car.start()

        rows: list[tuple[str, str, str, str]] = []

        # L1 hit, one stream, vs nginx sendfile of a file in the same state: first with the
        # file out of the page cache (a fill writes around it: the first hit reads the disk),
        # then again, in the page cache.
        car = sidecar("hit")
        assert curl(f"{car.url}/v2/images/{image_id}/file", ALICE).status == 200  # fill it
        car.settle()  # the commit follows the last byte sent
        hits: dict[str, list[Fetch]] = {"cold": [], "warm": []}
        refs: dict[str, list[Fetch]] = {"cold": [], "warm": []}
        for _ in range(RUNS):
            for path, url, token, into in (
                (car.blobs()[0], f"{car.url}/v2/images/{image_id}/file", ALICE, hits),
                (files / image_id, f"http://127.0.0.1:{nginx.plain}/images/{image_id}", None, refs),
            ):  # fmt: skip
                uncache(path)
                into["cold"].append(curl(url, token))
                into["warm"].append(curl(url, token))
        for state in ("warm", "cold"):
            hit_rate = SIZE / median([f.total for f in hits[state]])
            ref_rate = SIZE / median([f.total for f in refs[state]])
            rows.append(
                (
                    "L1 hit, one stream" + (", from disk" if state == "cold" else ""),
                    f"{hit_rate / 1e6:.0f} MB/s",
                    f"nginx sendfile {ref_rate / 1e6:.0f} MB/s",
                    f"{hit_rate / ref_rate:.2f}x (target >= 0.9x)",
                )
            )
        with Peak(car.proc.pid) as hits_rss:  # type: ignore[union-attr]
            curl_many(f"{car.url}/v2/images/{image_id}/file", CLIENTS, ALICE)

        # Cold miss, one client, vs a direct download from the same origin.
        cold, direct = [], []
        for n in range(RUNS):
            c = sidecar(f"cold{n}")
            settle()
            cold.append(curl(f"{c.url}/v2/images/{image_id}/file", ALICE).total)
            c.stop()
            settle()
            direct.append(
                curl(f"http://127.0.0.1:{nginx.origin}/images/{image_id}?direct={n}").total
            )
        rows.append(
            (
                "Cold miss, one client",
                f"{median(cold):.2f} s",
                f"direct from origin {median(direct):.2f} s",
                f"{median(cold) / median(direct):.3f}x (target <= 1.05x)",
            )
        )

        # A parallel fill: four ranged streams of 16 MiB pieces (the default) against the single
        # stream above.
        par = []
        for n in range(RUNS):
            c = sidecar(f"par{n}", parallel=4)
            settle()
            par.append(curl(f"{c.url}/v2/images/{image_id}/file", ALICE).total)
            c.stop()
        rows.append(
            (
                "Cold miss, 4 parallel ranges",
                f"{median(par):.2f} s",
                f"one stream {median(cold):.2f} s",
                f"{median(cold) / median(par):.2f}x faster (target >= 3x)",
            )
        )

        # The same from an origin without a rate limit (loopback at page-cache speed, faster than
        # one core hashes sha512): what verifying every byte costs when the origin is that fast.
        fast_cold, fast_direct = [], []
        for n in range(RUNS):
            c = sidecar(f"fast{n}", origin_port=nginx.plain)
            settle()
            fast_cold.append(curl(f"{c.url}/v2/images/{image_id}/file", ALICE).total)
            c.stop()
            settle()
            fast_direct.append(
                curl(f"http://127.0.0.1:{nginx.plain}/images/{image_id}?d={n}").total
            )
        rows.append(
            (
                "Cold miss, unthrottled origin",
                f"{median(fast_cold):.2f} s",
                f"direct from origin {median(fast_direct):.2f} s",
                f"{median(fast_cold) / median(fast_direct):.2f}x (bound by sha512)",
            )
        )

        # 10 simultaneous cold clients: cachenode, nginx proxy_cache_lock, Varnish.
        herd: dict[str, list[tuple[int, float, float]]] = {
            "cachenode": [],
            "nginx": [],
            "varnish": [],
        }
        rss = 0
        for n in range(RUNS):
            c = sidecar(f"herd{n}")
            before = nginx.origin_bytes()
            settle()
            with Peak(c.proc.pid) as p:  # type: ignore[union-attr]
                got = curl_many(f"{c.url}/v2/images/{image_id}/file", CLIENTS, ALICE)
            rss = max(rss, p.peak)
            time.sleep(0.2)
            herd["cachenode"].append(
                (nginx.origin_bytes() - before, max(f.ttfb for f in got), max(f.total for f in got))
            )
            assert all(f.status == 200 and f.size == SIZE for f in got), got
            c.stop()
            for name, port in (("nginx", nginx.cache), ("varnish", varnish.port)):
                before = nginx.origin_bytes()
                settle()
                got = curl_many(f"http://127.0.0.1:{port}/images/{image_id}?herd={n}", CLIENTS)
                time.sleep(0.2)
                herd[name].append(
                    (
                        nginx.origin_bytes() - before,
                        max(f.ttfb for f in got),
                        max(f.total for f in got),
                    )
                )

        def herd_cell(name: str) -> str:
            runs = herd[name]
            origin = median([r[0] for r in runs]) / SIZE
            first_byte = median([r[1] for r in runs]) * 1000
            slowest = median([r[2] for r in runs])
            return (
                f"origin sent {origin:.1f}x, first byte <= {first_byte:.0f} ms, "
                f"slowest {slowest:.2f} s"
            )

        rows.append(
            (
                "10 cold clients, origin 200 MB/s/conn",
                herd_cell("cachenode"),
                "nginx: " + herd_cell("nginx"),
                "varnish: " + herd_cell("varnish"),
            )
        )
        rows.append(
            (
                "Peak RSS, ten 1 GiB streams",
                f"{max(rss, hits_rss.peak) >> 20} MiB",
                f"cold herd {rss >> 20} MiB, hits {hits_rss.peak >> 20} MiB",
                "target <= 150 MB",
            )
        )

        print(
            f"\ncachenode benchmark: {SIZE >> 20} MiB image, loopback, {os.cpu_count()} cores, "
            f"median of {RUNS} runs\n"
        )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        header = ("case", "cachenode", "reference", "ratio / peers")
        widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]
        line = " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
        print(line)
        print("-" * len(line))
        for r in rows:
            print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        return 0
    finally:
        for car in cars:
            car.stop()
        if varnish:
            varnish.stop()
        if nginx:
            nginx.stop()
        glance.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

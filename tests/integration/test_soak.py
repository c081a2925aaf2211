"""A bounded soak: 200 concurrent mixed callers against a sidecar in front of the real Glance.

For ``CACHENODE_SOAK_SECONDS`` (default 60; CI uses the default) each caller loops over a seeded
mix: whole-image hits, misses on images uploaded during the run or evicted from L1 through the
admin API (several callers on one cold image join its fill), single ranges, callers Glance refuses
(another project, a reader-only token, no token, a junk token), and callers that go away
mid-body. Asserted afterwards:

- 0 wrong bytes: every completed 200 or 206 body is exactly the image or its range;
- 0 answers other than the one each caller must get (so 0 5xx of the sidecar's own: in this run
  Glance has no reason to answer 5xx, and every 5xx counts);
- refused callers got 0 image bytes;
- the same process, ready, no partial file, no unhandled exception logged;
- open descriptors and resident memory back near their baseline once every connection closed.

The baseline is taken after a warm-up burst of the same mix (a tenth of the run, at least 3 s):
Python's allocator keeps the arenas a burst of 200 concurrent bodies needed, and the executors
keep their threads (each with its own SQLite connection to the catalog), so a baseline taken cold
would measure the high-water mark, not a leak. Against that baseline, a leak grows with the
requests served (tens of thousands in a run): descriptors may differ by at most 5 (a connection
or two still closing, an executor thread started late), resident memory by at most 30 MiB (less
than one 4 MiB image per 25 requests in flight, far below what a leak per request would add).

The figures (requests by kind, statuses, cache statuses, bytes, descriptors and memory) are
printed and logged; run with ``-s`` or ``-rP`` to see them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import requests

from tests.support.glance import ALICE, ALICE_READER, BOB, Glance, Image
from tests.support.health import (
    assert_clean,
    fds_not_held,
    image_files,
    pid,
    rss_bytes,
    wait_below,
)
from tests.support.rawhttp import leaked
from tests.support.sidecar import Sidecar

log = logging.getLogger(__name__)
log.setLevel(logging.INFO)

SECONDS = float(os.environ.get("CACHENODE_SOAK_SECONDS", "60"))
SEED = int(os.environ.get("CACHENODE_SOAK_SEED", "424242"))
CLIENTS = 200
KINDS = {"hit": 30, "miss": 12, "range": 18, "refused": 20, "vanish": 10}
REFUSED = {BOB: 404, ALICE_READER: 403, None: 401, "not-a-token": 401}
THINK = (0.02, 0.2)  # seconds a caller waits between two requests
UPLOAD_EVERY = 2.0  # a new image in Glance, cold for the sidecar
EVICT_EVERY = 1.5  # an image evicted from L1 through the admin API
FD_SLACK = 5
RSS_SLACK = 30 << 20


@dataclass
class Tally:
    requests: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    cache: Counter[str] = field(default_factory=Counter)
    received: int = 0
    wrong: list[str] = field(default_factory=list)  # bodies that were not the image's bytes
    unexpected: list[str] = field(default_factory=list)  # answers a caller must not get
    broken: list[str] = field(default_factory=list)  # bodies cut although nobody left
    leaked: int = 0  # refused answers that carried image bytes
    uploads: int = 0
    evictions: int = 0

    def figures(self) -> dict[str, object]:
        return {
            "requests": dict(self.requests),
            "statuses": dict(sorted(self.statuses.items())),
            "cache_status": dict(self.cache),
            "bytes_received": self.received,
            "wrong_bodies": len(self.wrong),
            "unexpected_answers": len(self.unexpected),
            "cut_bodies": len(self.broken),
            "refused_with_image_bytes": self.leaked,
            "uploads": self.uploads,
            "evictions": self.evictions,
        }


@dataclass
class Run:
    car: Sidecar
    glance: Glance
    session: aiohttp.ClientSession
    admin_headers: dict[str, str]
    warm: list[Image]
    fresh: list[Image]
    tally: Tally
    deadline: float

    def url(self, image: Image) -> str:
        return f"{self.car.url}/v2/images/{image.id}/file"

    def any_image(self, rng: random.Random) -> Image:
        return rng.choice(self.warm + self.fresh[-8:])

    def cold_image(self, rng: random.Random) -> Image:
        """One of the newest uploads (callers pile onto them and join their fills), or any."""
        if self.fresh and rng.random() < 0.8:
            return rng.choice(self.fresh[-2:])
        return self.any_image(rng)


async def _get(run: Run, kind: str, image: Image, headers: dict[str, str]) -> tuple[int, bytes]:
    async with run.session.get(run.url(image), headers=headers) as resp:
        body = await resp.read()
        run.tally.requests[kind] += 1
        run.tally.statuses[f"{kind} {resp.status}"] += 1
        run.tally.cache[resp.headers.get("X-Cachenode-Status", "-")] += 1
        run.tally.received += len(body)
        return resp.status, body


async def whole(run: Run, kind: str, image: Image) -> None:
    status, body = await _get(run, kind, image, {"X-Auth-Token": ALICE})
    if status != 200:
        run.tally.unexpected.append(f"{kind} {image.id}: {status} {body[:200]!r}")
    elif hashlib.sha512(body).hexdigest() != image.sha512:
        run.tally.wrong.append(f"{kind} {image.id}: {len(body)} bytes")


async def ranged(run: Run, rng: random.Random) -> None:
    image = run.any_image(rng)
    first = rng.randrange(len(image.data))
    last = rng.randrange(first, min(len(image.data), first + (1 << 20)))
    headers = {"X-Auth-Token": ALICE, "Range": f"bytes={first}-{last}"}
    status, body = await _get(run, "range", image, headers)
    if status != 206:
        run.tally.unexpected.append(f"range {image.id} {first}-{last}: {status} {body[:200]!r}")
    elif body != image.data[first : last + 1]:
        run.tally.wrong.append(f"range {image.id} {first}-{last}: {len(body)} bytes")


async def refused(run: Run, rng: random.Random) -> None:
    image = run.cold_image(rng) if rng.random() < 0.5 else run.any_image(rng)
    token = rng.choice(list(REFUSED))
    status, body = await _get(run, "refused", image, {"X-Auth-Token": token} if token else {})
    if status != REFUSED[token]:
        run.tally.unexpected.append(f"refused {image.id}: {status} {body[:200]!r}")
    if leaked(body, image.data):
        run.tally.leaked += 1


async def vanish(run: Run, rng: random.Random) -> None:
    image = run.cold_image(rng) if rng.random() < 0.5 else run.any_image(rng)
    async with run.session.get(run.url(image), headers={"X-Auth-Token": ALICE}) as resp:
        run.tally.requests["vanish"] += 1
        run.tally.statuses[f"vanish {resp.status}"] += 1
        got = await resp.content.read(rng.randrange(1, len(image.data)))
        run.tally.received += len(got)
        if resp.status != 200:
            run.tally.unexpected.append(f"vanish {image.id}: {resp.status}")
        resp.close()  # the connection goes with it, mid-body


async def caller(run: Run, number: int) -> None:
    rng = random.Random(SEED * 1000 + number)
    kinds, weights = list(KINDS), list(KINDS.values())
    loop = asyncio.get_running_loop()
    while loop.time() < run.deadline:
        kind = rng.choices(kinds, weights)[0]
        try:
            if kind == "hit":
                await whole(run, kind, rng.choice(run.warm))
            elif kind == "miss":
                await whole(run, kind, run.cold_image(rng))
            elif kind == "range":
                await ranged(run, rng)
            elif kind == "refused":
                await refused(run, rng)
            else:
                await vanish(run, rng)
        except (aiohttp.ClientError, TimeoutError) as exc:
            if kind != "vanish":
                run.tally.broken.append(f"{kind}: {type(exc).__name__} {exc}")
        await asyncio.sleep(rng.uniform(*THINK))


async def every(run: Run, period: float, action: Callable[[], Awaitable[None]]) -> None:
    """``action`` at once (a short run still has a cold image), then every ``period``."""
    loop = asyncio.get_running_loop()
    while loop.time() < run.deadline:
        await action()
        await asyncio.sleep(period)


async def soak(car: Sidecar, glance: Glance, warm: list[Image], fresh: list[Image],
               admin_headers: dict[str, str], seconds: float) -> Tally:  # fmt: skip
    """``CLIENTS`` callers for ``seconds``, with uploads and evictions; what they saw."""
    rng = random.Random(SEED)
    sizes = [rng.randrange(1 << 20, 3 << 20) for _ in range(int(seconds / UPLOAD_EVERY) + 2)]
    connector = aiohttp.TCPConnector(limit=CLIENTS + 20)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        loop = asyncio.get_running_loop()
        run = Run(car, glance, session, admin_headers, warm, fresh, Tally(),
                  loop.time() + seconds)  # fmt: skip

        async def upload() -> None:
            # Straight to the test bed's Glance, not through the sidecar: its sqlite may refuse
            # an upload under this load (500, "database is locked"); that is the bed's, not ours.
            for attempt in range(3):
                try:
                    image = await asyncio.to_thread(glance.create_image, sizes[run.tally.uploads])
                    break
                except requests.HTTPError as exc:
                    if exc.response is None or exc.response.status_code < 500 or attempt == 2:
                        raise
            run.fresh.append(image)
            run.tally.uploads += 1

        async def evict() -> None:
            victim = rng.choice(run.warm + run.fresh)
            url = f"{car.admin_url}/admin/v1/evict"
            async with session.post(url, json={"ids": [victim.id]}, headers=admin_headers) as r:
                assert r.status == 200, await r.text()
                run.tally.evictions += len((await r.json())["evicted"])

        await asyncio.gather(
            *(caller(run, n) for n in range(CLIENTS)),
            every(run, UPLOAD_EVERY, upload),
            every(run, EVICT_EVERY, evict),
        )
    return run.tally


def settled(car: Sidecar, process: int, fds: int | None = None) -> tuple[int, int]:
    """Descriptors (but the blobs L1 holds open for hits) and resident bytes once the fills are
    over and connections closed."""
    car.settle(timeout=120)
    if fds is not None:
        wait_below(lambda: fds_not_held(car, process), fds + FD_SLACK)
    return fds_not_held(car, process), rss_bytes(process)


def test_soak_200_mixed_callers(glance: Glance, sidecar_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "admin.token").write_text("soak-admin\n")
    car: Sidecar = sidecar_factory(
        authz={"ttl": "60s"}, admin={"token_file": str(tmp_path / "admin.token")}
    ).start()
    process = pid(car)
    headers = {"Authorization": "Bearer soak-admin"}
    rng = random.Random(SEED)
    warm = [glance.create_image(rng.randrange(256 << 10, 2 << 20)) for _ in range(8)]
    for image in warm:
        assert car.get(image.id, ALICE).content == image.data
    fresh: list[Image] = []

    warmup = asyncio.run(soak(car, glance, warm, fresh, headers, max(3.0, SECONDS / 10)))
    assert warmup.wrong == warmup.unexpected == warmup.broken == [], warmup.figures()
    fds_before, rss_before = settled(car, process)

    started = time.monotonic()
    tally = asyncio.run(soak(car, glance, warm, fresh, headers, SECONDS))
    elapsed = time.monotonic() - started
    fds_after, rss_after = settled(car, process, fds_before)

    figures = {
        "seconds": round(elapsed, 1),
        "clients": CLIENTS,
        "seed": SEED,
        **tally.figures(),
        "fds_before": fds_before,
        "fds_after": fds_after,
        "rss_mib_before": round(rss_before / 2**20, 1),
        "rss_mib_after": round(rss_after / 2**20, 1),
    }
    text = json.dumps(figures, indent=1)
    print(f"soak figures:\n{text}")
    log.info("soak figures: %s", text)
    for name in ("wrong", "unexpected", "broken"):
        for line in getattr(tally, name)[:10]:
            print(f"{name}: {line}")

    assert tally.wrong == [], "bodies that were not the image's bytes"
    assert tally.unexpected == [], "answers a caller must not get (5xx included)"
    assert tally.broken == [], "bodies cut although nobody went away"
    assert tally.leaked == 0, "refused callers received image bytes"
    assert tally.cache["JOINED"] > 0 and tally.cache["MISS"] > 0 and tally.cache["HIT"] > 0
    assert_clean(car, process)
    assert image_files(car, process) == [], "blobs or partial files still held open"
    assert fds_after <= fds_before + FD_SLACK, (fds_before, fds_after)
    assert rss_after <= rss_before + RSS_SLACK, (rss_before, rss_after)

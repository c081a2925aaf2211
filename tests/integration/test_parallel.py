"""Parallel ranged fills (issue 3): pieces at their offsets, callers in order, one hash."""

from __future__ import annotations

import re
from itertools import pairwise

from tests.support.clients import Caller, run_all
from tests.support.glance import ALICE, Glance
from tests.support.pagecache import resident, skip_unless_direct
from tests.support.upstream import Fault, Upstream

MiB = 1 << 20


def ranges_asked(origin: Upstream, image_id: str) -> list[tuple[int, int]]:
    out = []
    for served in origin.requests_for(image_id):
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", served.range or "")
        assert m, f"a parallel fill asks for explicit ranges, not {served.range!r}"
        out.append((int(m.group(1)), int(m.group(2)) + 1))
    return out


def mirror(url: str, **extra: object) -> dict[str, object]:
    return {
        "name": "mirror",
        "kind": "http",
        "url": url,
        "parallel": 4,
        "chunk_size": "1MiB",
        **extra,
    }


def test_pieces_cover_the_image_once_and_callers_stream_in_order(
    glance: Glance, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(10 * MiB + 12345)
    throttle = Fault("throttle", rate=4 * MiB, times=-1)  # per connection: parallelism shows
    with Upstream(blobs={image.id: image.data}, faults=[throttle]) as origin:
        sidecar = sidecar_factory(tiers=[mirror(origin.url)]).start()
        callers = run_all(
            [Caller(f"{sidecar.url}/v2/images/{image.id}/file", ALICE) for _ in range(3)]
        )
        for caller in callers:
            assert caller.error is None and caller.sha512 == image.sha512
        asked = sorted(ranges_asked(origin, image.id))
        assert asked[0][0] == 0 and asked[-1][1] == len(image.data)
        assert all(a[1] == b[0] for a, b in pairwise(asked))  # contiguous, no overlap
        assert all(e - s <= MiB for s, e in asked)
        assert origin.bytes_for(image.id) == len(image.data)
        sidecar.settle()
        assert [b.name for b in sidecar.blobs()] == [image.id]
        # Four connections at 4 MiB/s each: clearly more than one connection's worth at once.
        starts = sorted(s.started for s in origin.requests_for(image.id))
        assert starts[3] - starts[0] < 0.5


def test_a_failed_piece_is_retried_from_the_byte_it_reached(
    glance: Glance, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(6 * MiB)
    at = 3 * MiB + 1000
    reset = Fault("reset", at=at, times=1)  # breaks the piece [3 MiB, 4 MiB) once
    with Upstream(blobs={image.id: image.data}, faults=[reset]) as origin:
        sidecar = sidecar_factory(tiers=[mirror(origin.url)]).start()
        resp = sidecar.get(image.id, ALICE)
        assert resp.status_code == 200 and resp.content == image.data
        ranges_asked(origin, image.id)  # explicit ranges only
        # Every byte sent once, except those of the broken piece between where its landed bytes
        # ended and the fault (in flight when the connection broke): never the image again.
        sent = [(r.range or "", r.bytes) for r in origin.requests_for(image.id)]
        times_sent: dict[int, int] = {}
        for rng, length in sent:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            for block in range(start // 100, (start + length) // 100):
                times_sent[block] = times_sent.get(block, 0) + 1
        twice = sorted(block * 100 for block, n in times_sent.items() if n > 1)
        assert all(3 * MiB <= off <= at for off in twice), twice[:5]
        starts = [int(rng.removeprefix("bytes=").split("-")[0]) for rng, _ in sent]
        assert starts.count(3 * MiB) + sum(3 * MiB < x <= at for x in starts) == 2  # one retry
        assert len(times_sent) >= len(image.data) // 100  # all of it was sent
        failures = sidecar.metric("cachenode_tier_failures_total", tier="mirror", kind="short_read")
        assert failures == 1


def test_pieces_a_tier_cannot_deliver_go_to_the_next_tier(glance: Glance, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(6 * MiB)
    broken = Fault("reset", at=2 * MiB + 5, times=-1)  # fails however often it is asked
    with Upstream(blobs={image.id: image.data}, faults=[broken]) as bad, \
            Upstream(blobs={image.id: image.data}) as good:  # fmt: skip
        backup = {"name": "backup", "kind": "http", "url": good.url, "parallel": 2}
        sidecar = sidecar_factory(tiers=[mirror(bad.url), {**backup, "chunk_size": "1MiB"}]).start()
        resp = sidecar.get(image.id, ALICE)
        assert resp.status_code == 200 and resp.content == image.data
        from_backup = ranges_asked(good, image.id)
        assert from_backup and all(s >= 2 * MiB for s, _ in from_backup)
        assert sum(e - s for s, e in from_backup) < 2 * MiB  # only what the first could not give
        sidecar.settle()
        assert [b.name for b in sidecar.blobs()] == [image.id]


def test_a_tier_that_ignores_range_is_not_read_in_pieces(glance: Glance, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(4 * MiB)
    with Upstream(blobs={image.id: image.data}, faults=[Fault("no_range", times=-1)]) as plain, \
            Upstream(blobs={image.id: image.data}) as good:  # fmt: skip
        sidecar = sidecar_factory(
            tiers=[mirror(plain.url), {"name": "backup", "kind": "http", "url": good.url}]
        ).start()
        resp = sidecar.get(image.id, ALICE)
        assert resp.status_code == 200 and resp.content == image.data
        # Only a piece at 0 can be cut out of a whole body; every other piece went to the backup.
        assert [s.range for s in good.requests_for(image.id)] == [f"bytes={MiB}-"]
        assert sidecar.metric("cachenode_tier_failures_total", tier="mirror", kind="no_range") >= 1


def test_parallel_pieces_are_hashed_from_memory_and_leave_the_page_cache(
    glance: Glance, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    """Pieces that land ahead of the hashed prefix are held in memory until it reaches them, so
    they are written around the page cache like the prefix, never read back for the hash, and
    the caller is sent them from memory: once committed, none of the blob is in the page cache."""
    image = glance.create_image(16 * MiB)
    throttle = Fault("throttle", rate=16 * MiB, times=-1)  # per connection: the pieces interleave
    with Upstream(blobs={image.id: image.data}, faults=[throttle]) as origin:
        car = sidecar_factory(tiers=[mirror(origin.url)]).start()
        skip_unless_direct(car.cache_dir)
        got = car.get(image.id, ALICE)
        assert got.status_code == 200 and got.content == image.data
        assert len(ranges_asked(origin, image.id)) == 16  # 1 MiB pieces, four at a time
        car.settle()
        (blob,) = car.blobs()
        # Through the page cache (the pieces ahead of the prefix, before), 12 MiB would be there.
        assert resident(blob) == 0
        assert blob.read_bytes() == image.data

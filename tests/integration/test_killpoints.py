"""Kill -9 at many points of a fill, a commit, a hit and an eviction, restarting in between.

One cache directory lives through every kill. Each round arms one crash point
(``CACHENODE_CRASH_AT=<point>:<pass>``, see cachenode/crash.py), drives the sidecar until the
process dies there, and restarts it unarmed. The test keeps its own model of what L1 must hold:
images whose fill committed before the kill, plus the one in flight only when its catalog record
was written (``commit.cataloged``); an image whose eviction started is gone. After each restart:

- the catalog (the admin API's list) and the blobs on disk are exactly that model;
- every blob has its record's size and hashes to Glance's ``os_hash_value``;
- the only partial files left are kept to resume a fill (cachenode/journal.py): each with its
  journal, of an image outside the model, of that image's size and naming Glance's hash; after
  ``fill.recorded`` (a record was just written) the image in flight has one;
- every image downloads whole and right, a HIT exactly for the images of the model, and the
  bytes taken from kept partials (``resumed_bytes_total``) are exactly what their journals named;
  no partial is left after those downloads.

The points and their pass numbers are drawn from a seeded generator (``CACHENODE_KILL_SEED``),
printed with the plan so that a failing round can be replayed. Images are small and the tier is
throttled while armed, so that a fill passes ``fill.chunk`` several times.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from cachenode import journal
from tests.support.glance import ALICE, Glance, Image
from tests.support.health import AdminApi
from tests.support.sidecar import Sidecar
from tests.support.upstream import Fault, Upstream

SEED = int(os.environ.get("CACHENODE_KILL_SEED", "20240917"))
FILLING = (
    "fill.chunk",
    "fill.recorded",
    "fill.verified",
    "commit.fsynced",
    "commit.renamed",
    "commit.cataloged",
)
POINTS = (*FILLING, "touch.cataloged", "evict.uncataloged", "evict.removed")
PASSES = {
    "fill.chunk": 6,
    "fill.recorded": 6,
    "touch.cataloged": 4,
}  # highest pass number drawn; 3 otherwise
IMAGES = 4
IMAGE_SIZE = 512 << 10
THROTTLE = 2 << 20  # bytes/s while armed: a fill lasts about a quarter of a second
FLUSH = "0.1s"  # hits' access times reach the catalog this often (cache.access_flush_interval)
HITS = 2000  # at most this many hits wait for the armed flush (a few hundred suffice)


@dataclass
class Round:
    point: str
    nth: int

    @property
    def spec(self) -> str:
        return f"{self.point}:{self.nth}"


def plan(seed: int, kills: int = 32) -> list[Round]:
    """Every point at least twice, the rest drawn at random; pass numbers drawn per round."""
    rng = random.Random(seed)
    points = [*POINTS, *POINTS]
    points += [rng.choice(POINTS) for _ in range(kills - len(points))]
    rng.shuffle(points)
    return [Round(p, rng.randint(1, PASSES.get(p, 3))) for p in points]


@dataclass
class Bed:
    glance: Glance
    car: Sidecar
    admin: AdminApi
    throttle: Fault
    images: list[Image]
    l1: set[str] = field(default_factory=set)  # what L1 must hold: the model
    resumed: int = 0  # restarts after which a kept partial was resumed

    def arm(self, spec: str | None) -> None:
        """Start the sidecar, armed to die at ``spec``, with the tier throttled while armed."""
        self.throttle.times = -1 if spec else 0
        self.car.start(env={"CACHENODE_CRASH_AT": spec} if spec else None)

    def absent(self) -> list[Image]:
        return [i for i in self.images if i.id not in self.l1]


@pytest.fixture
def bed(glance: Glance, sidecar_factory, tmp_path: Path) -> Iterator[Bed]:  # type: ignore[no-untyped-def]
    (tmp_path / "admin.token").write_text("kill-admin\n")
    throttle = Fault("throttle", rate=THROTTLE, times=0)
    with Upstream(target=glance.url, faults=[throttle]) as l2:
        car = sidecar_factory(
            tiers=[{"name": "regional", "kind": "glance", "url": l2.url}],
            admin={"token_file": str(tmp_path / "admin.token")},
            cache={"access_flush_interval": FLUSH},
        )
        images = [glance.create_image(IMAGE_SIZE) for _ in range(IMAGES)]
        yield Bed(glance, car, AdminApi(car, "kill-admin"), throttle, images)


def drive(bed: Bed, rnd: Round) -> str | None:
    """Work that passes ``rnd.point`` until the process dies; the image in flight then."""
    if rnd.point in FILLING:
        for image in bed.absent():
            try:
                resp = bed.car.get(image.id, ALICE, settle=False)
                assert resp.status_code == 200 and resp.content == image.data
                bed.car.settle()
            except requests.RequestException:
                return image.id
            bed.l1.add(image.id)  # committed: the fill is over and it did not fail
        return None
    if rnd.point == "touch.cataloged":
        # Access times are written in batches: hit until the nth batch is written.
        hits = sorted(bed.l1)
        for i in range(HITS):
            image = next(x for x in bed.images if x.id == hits[i % len(hits)])
            try:
                resp = bed.car.get(image.id, ALICE, settle=False)
            except requests.RequestException:
                return image.id
            assert resp.headers["X-Cachenode-Status"] == "HIT" and resp.content == image.data
        return None
    for image_id in sorted(bed.l1):
        try:
            assert bed.admin.evict(image_id) == [image_id]
        except requests.RequestException:
            return image_id
        bed.l1.discard(image_id)
    return None


def kept_partials(bed: Bed) -> dict[str, int]:
    """The partials the restart kept, each checked against the model and Glance: image id to the
    bytes its journal names."""
    files = bed.car.partials()
    kept: dict[str, int] = {}
    for log in (p for p in files if p.name.endswith(journal.SUFFIX)):
        data = log.with_name(log.name.removesuffix(journal.SUFFIX))
        found = journal.read(log)
        assert data in files and found is not None, f"{log.name} kept without its file or record"
        record = found[1]
        assert record.image_id not in bed.l1 and record.image_id not in kept, log.name
        glance = bed.glance.api("GET", f"/v2/images/{record.image_id}").json()
        assert record.problem() is None and data.stat().st_size == record.size == glance["size"]
        assert (record.algo, record.hash_value) == (glance["os_hash_algo"], glance["os_hash_value"])
        kept[record.image_id] = record.recorded
    assert len(files) == 2 * len(kept), f"partial files left that nothing resumes: {files}"
    return kept


def check(bed: Bed, must_keep: str | None = None) -> None:
    """After a restart: catalog, blobs and downloads agree with the model, and with Glance."""
    car = bed.car
    kept = kept_partials(bed)
    if must_keep is not None:
        assert must_keep in kept, "the fill killed after its record was written left nothing"
    listed = bed.admin.cached()
    assert set(listed) == bed.l1, f"catalog {sorted(listed)} != model {sorted(bed.l1)}"
    assert {b.name for b in car.blobs()} == bed.l1, "blobs and catalog disagree"
    for image_id, entry in listed.items():
        blob = car.cache_dir / "blobs" / image_id[:2] / image_id
        record = bed.glance.api("GET", f"/v2/images/{image_id}").json()
        assert entry["size"] == blob.stat().st_size == record["size"]
        with blob.open("rb") as f:
            digest = hashlib.file_digest(f, record["os_hash_algo"]).hexdigest()
        assert digest == record["os_hash_value"], f"blob {image_id} is not the image"
    for image in bed.images:
        resp = car.get(image.id, ALICE)
        assert resp.status_code == 200 and resp.content == image.data
        expected = "HIT" if image.id in bed.l1 else "MISS"
        assert resp.headers["X-Cachenode-Status"] == expected, image.id
    assert car.partials() == [], "a kept partial outlived the fill that resumed it"
    assert car.metric("cachenode_resumed_bytes_total") == sum(kept.values())
    bed.resumed += bool(kept)
    bed.l1 = {i.id for i in bed.images}


def test_kill_9_at_random_points_never_leaves_a_torn_or_unproven_entry(bed: Bed) -> None:
    rounds = plan(SEED)
    print(f"kill plan (CACHENODE_KILL_SEED={SEED}): {' '.join(r.spec for r in rounds)}")
    bed.arm(None)
    check(bed)  # fills every image: the first round starts from a full L1
    for number, rnd in enumerate(rounds, 1):
        if rnd.point in FILLING:
            assert sorted(bed.admin.evict_all()) == sorted(bed.l1)
            bed.l1.clear()
        bed.car.stop()

        bed.arm(rnd.spec)
        in_flight = drive(bed, rnd)
        assert in_flight is not None, f"round {number}: {rnd.spec} was never reached"
        assert bed.car.proc is not None
        assert bed.car.proc.wait(30) == -signal.SIGKILL, f"round {number}: not killed at {rnd.spec}"
        if rnd.point == "commit.cataloged":
            bed.l1.add(in_flight)  # its record was written: it is a complete, proven entry
        elif rnd.point.startswith("evict."):
            bed.l1.discard(in_flight)  # its record went first: the restart drops the blob

        bed.arm(None)
        try:
            check(bed, in_flight if rnd.point == "fill.recorded" else None)
        except AssertionError as exc:
            raise AssertionError(f"round {number} ({rnd.spec}), seed {SEED}: {exc}") from exc
    print(f"{len(rounds)} kills, catalog and blobs agreed after each restart; "
          f"{bed.resumed} restarts resumed a fill from its journal")  # fmt: skip

"""The janitor: keeps L1 within its policy, and warms what the policy wants warm.

Eviction runs every ``interval`` seconds and before every fill (``make_room``). The plan itself is
a pure function (``cachenode.policy.plan_over``) over L1's index; this module only gathers its
inputs and carries it out. Warming asks Glance, with the service credentials, for
the images the policy selects (by id, tag or property) and fills those not in L1, one at a time.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from cachenode import journal
from cachenode.errors import CachenodeError
from cachenode.fill import Fills
from cachenode.glance import GlanceClient, ImageInfo
from cachenode.identity import ServiceIdentity
from cachenode.limits import Priority
from cachenode.local import Local
from cachenode.metrics import Metrics
from cachenode.policy import Plan, Policy, Usage, plan_over, with_in_flight
from cachenode.units import format_bytes

log = logging.getLogger(__name__)


class Janitor:
    def __init__(
        self,
        local: Local,
        policy: Policy,
        metrics: Metrics,
        interval: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.local = local
        self.policy = policy
        self.metrics = metrics
        self.interval = interval
        self.clock = clock
        if local.policy != policy:
            raise ValueError("the janitor must apply the policy L1's index is ordered by")

    async def make_room(self, image_id: str, needed: int) -> bool:
        """Evict what the policy allows so that ``needed`` more bytes fit, and reserve them for
        the fill of ``image_id``; whether they fit.

        All or nothing (``policy.plan_over``): when they cannot fit, nothing is evicted and
        nothing reserved, and the fill that asked is passed through. The fill gives its room back
        when it ends (``Local.unreserve``; a commit does it as the entry is counted).
        """
        fits = await self.sweep(needed, reserve_for=image_id)
        if not fits:
            log.info("no room for an image of %s within policy %s: nothing evicted for it",
                     format_bytes(needed), self.policy.name)  # fmt: skip
        return fits

    async def sweep(self, needed: int = 0, reserve_for: str | None = None) -> bool:
        """Plan over L1's index and carry the plan out; whether ``needed`` more bytes fit (then
        reserved for the fill of ``reserve_for``, if given).

        The plan, the claim of its entries and the reservation run with no await in between
        (``Local.claim``, ``Local.reserve``), so two sweeps never choose the same entry, count
        bytes another already freed, or give the same room to two fills; each then waits only
        for the removal of its own evictions. The room of fills in flight is cache bytes in the
        plan (``policy.with_in_flight``): fills that start together cannot take L1 past the
        policy between them. A plan reads about as many entries as it evicts
        (``cachenode.index``), however many L1 holds.

        Partials a previous run left (``cachenode.journal``) count as cache bytes, last a day at
        most, and all go before any entry would be evicted for room.
        """
        await self.local.drop_partials(older_than=self.clock() - journal.KEEP_FOR)
        usage = await self._usage()
        result = plan_over(self.local.index, self.policy, usage, self.clock(), needed)
        if self.local.kept and (not result.fits or _for_room(result)):
            await self.local.drop_partials()
            usage = await self._usage()
            result = plan_over(self.local.index, self.policy, usage, self.clock(), needed)
        claimed = self.local.claim((e.image_id, e.reason) for e in result.evictions)
        if reserve_for is not None and needed and result.fits:
            self.local.reserve(reserve_for, needed)
        self.metrics.cache_capacity.set(self.policy.max_bytes.resolve(usage.disk_total))
        await self.local.remove(claimed)
        return result.fits

    async def _usage(self) -> Usage:
        """L1's usage with the bytes not committed yet (kept partials, fills in flight) counted;
        read after the last await, so the plan made from it right after sees them all."""
        usage = await self.local.usage()
        return with_in_flight(usage, *self.local.in_flight())

    async def run(self, warmer: Warmer | None) -> None:
        """Sweep every ``interval``, warm every ``warm_interval``, until cancelled."""
        next_warm = self.clock()
        while True:
            try:
                await self.sweep()
                if warmer is not None and self.clock() >= next_warm:
                    next_warm = self.clock() + self.policy.warm_interval
                    await warmer.warm_policy()
            except CachenodeError as exc:
                log.warning("janitor: %s", exc)
            await asyncio.sleep(self.interval)


def _for_room(result: Plan) -> bool:
    """Whether a plan evicts entries for room (not only idle ones)."""
    return any(e.reason != "idle" for e in result.evictions)


class Warmer:
    """Fills images before anyone asks, with the service credentials, at low priority: a warm
    never takes a tier's last fill slot nor rate a caller's fill could use (``cachenode.limits``).

    ``activated`` warms an image Glance has just published (its ``image.activate`` notification)
    when the policy selects it, after a random delay of up to ``warm.jitter``: every node of a
    region hears the same notice at once, and the jitter spreads their fills over the tiers.
    ``uniform`` and ``sleep`` are injectable so tests need not wait.
    """

    def __init__(
        self,
        glance: GlanceClient,
        fills: Fills,
        local: Local,
        identity: ServiceIdentity,
        policy: Policy,
        uniform: Callable[[float, float], float] = random.uniform,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.glance = glance
        self.fills = fills
        self.local = local
        self.identity = identity
        self.policy = policy
        self.uniform = uniform
        self.sleep = sleep
        self._tasks: set[asyncio.Task[str]] = set()

    async def selected(
        self,
        ids: tuple[str, ...] = (),
        tags: tuple[str, ...] = (),
        properties: tuple[tuple[str, str], ...] = (),
    ) -> list[ImageInfo]:
        """The active images named by id, or carrying one of ``tags`` or ``properties``."""
        found: dict[str, ImageInfo] = {}
        creds = await self.identity.credentials()
        for image_id in ids:
            image = await self.glance.image(image_id, creds)
            found[image.id] = image
        queries = [{"tag": t} for t in tags] + [{k: v} for k, v in properties]
        for query in queries:
            for image in await self.glance.images(creds, {**query, "status": "active"}):
                found[image.id] = image
        return [i for i in found.values() if i.status == "active"]

    async def warm(self, image: ImageInfo) -> str:
        """Start (or join) the fill of ``image``; 'cached', 'filling' or why it cannot be."""
        if image.id in self.local:
            return "cached"
        if image.status != "active" or not image.size or image.verifier() is None:
            return "not cacheable"
        if not self.policy.admits(image.size, (await self.local.usage()).disk_total):
            return "larger than max_object_size"
        self.fills.start(image, await self.identity.credentials(), Priority.WARM)
        return "filling"

    async def warm_policy(self) -> None:
        selector = self.policy.warm
        if not selector:
            return
        images = await self.selected(selector.ids, selector.tags, selector.properties)
        for image in images:
            if await self.warm(image) == "filling" and (fill := self.fills.get(image.id)):
                await fill.wait(lambda: False)  # one at a time: warming must not become a storm
        log.info("warm: %d images selected by policy %s", len(images), self.policy.name)

    def activated(self, image_id: str) -> asyncio.Task[str] | None:
        """Warm ``image_id`` (just activated) if the policy selects it; None when it has no
        warm selector. The notice only names the image: Glance's own record is what is judged."""
        if not self.policy.warm:
            return None
        task = asyncio.create_task(self._activated(image_id), name=f"warm-{image_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _activated(self, image_id: str) -> str:
        await self.sleep(self.uniform(0.0, self.policy.warm_jitter))
        try:
            image = await self.glance.image(image_id, await self.identity.credentials())
        except CachenodeError as exc:
            log.warning("warm on activate: %s: %s", image_id, exc)
            return "error"
        if not self.policy.warm.matches(image.id, image.tags, image.properties):
            return "not selected"
        outcome = await self.warm(image)
        log.info("warm on activate: %s: %s", image_id, outcome)
        return outcome

"""Getting one image's bytes from the tiers, in order, into a Sink.

What is still missing is a set of byte spans. Each tier in turn is asked for what is missing:

- a tier that honours Range and has ``parallel`` > 1 is read as up to ``parallel`` concurrent
  ranged requests of ``chunk_size`` each, lowest offset first (callers stream the prefix while
  later pieces land). A piece that fails goes back to the missing set from the byte it reached
  and is retried, by this tier once more, then by the next.
- any other tier is read as one stream from the first missing byte (or from 0, skipping ahead,
  when it cannot start there), and only the missing bytes of it are written.

So every byte is written once, whichever tiers it came from, and a failover never restarts the
image. A fill resumed after a restart starts with the spans its journal kept (``have``) already
there. A tier that sends more than the image's size is an IntegrityError; every other tier
failure moves on to the next tier.

A tier is read only while the fill holds one of its slots, and every chunk is paid into its
bucket (``cachenode.limits``). A tier with no slot free is passed over like a failed one, but
kept: when the other tiers are done and bytes are still missing, the fill is admitted again
(``Limits.admission``: it waits for a slot, or gives up with TiersBusy) and asks the tiers it
passed over.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from cachenode.errors import (
    FillFailed,
    IntegrityError,
    RangeNotSupported,
    TierDenied,
    TierError,
    TierNotFound,
    TierShortRead,
)
from cachenode.glance import Credentials, ImageInfo
from cachenode.limits import Limits, Ticket
from cachenode.metrics import Metrics
from cachenode.sink import Sink
from cachenode.spans import Spans
from cachenode.tiers import Tier, TierSet

log = logging.getLogger(__name__)

# Failures that say this tier will not serve this image at all: not worth a retry on it.
_HOPELESS = (RangeNotSupported, TierNotFound, TierDenied)

AHEAD = 64 << 20  # the most a fill holds in memory of bytes ahead of its hashed prefix


def ahead_budget(tiers: list[Tier]) -> int:
    """What a fill from ``tiers`` may hold of the bytes its parallel pieces put ahead of the
    hashed prefix (``Sink``'s ``ahead``): the pieces of every worker but the prefix's, AHEAD
    at most. Held, they are hashed from memory and written around the page cache; beyond it,
    they are written through it and read back for the hash."""
    pieces = [(t.config.parallel - 1) * t.config.chunk_size for t in tiers if t.ranged]
    return min(AHEAD, max(pieces, default=0))


@dataclass
class Provenance:
    """Which tiers an image's bytes came from, in the order they first sent some."""

    tiers: list[str] = field(default_factory=list)

    @property
    def first(self) -> str | None:
        return self.tiers[0] if self.tiers else None

    def record(self, tier: str) -> None:
        if tier not in self.tiers:
            self.tiers.append(tier)


class Fetch:
    def __init__(
        self,
        image: ImageInfo,
        size: int,
        sink: Sink,
        tiers: TierSet,
        candidates: list[Tier],
        creds: Credentials | None,
        metrics: Metrics,
        provenance: Provenance,
        limits: Limits,
        ticket: Ticket,
        have: Spans | None = None,
    ) -> None:
        self.image = image
        self.size = size
        self.sink = sink
        self.tiers = tiers
        self.candidates = candidates
        self.creds = creds
        self.metrics = metrics
        self.provenance = provenance
        self.limits = limits
        self.ticket = ticket
        self.missing = Spans([(0, size)])
        for start, end in have or ():
            self.missing.discard(start, end)  # a previous run's bytes (cachenode.journal)
        self.errors: list[str] = []

    async def run(self) -> None:
        """Put every byte of the image into the sink, or raise FillFailed / IntegrityError
        (TiersBusy when tiers were passed over for want of a slot and the fill may not wait)."""
        tiers = self.candidates
        while tiers and self.missing:
            passed_over = await self._walk(tiers)
            if passed_over and self.missing:
                # Bytes on disk may already be on their way to callers: finish, never give up.
                landed = self.missing.total < self.size
                names = [t.name for t in passed_over]
                await self.limits.admission(names, self.ticket, may_wait=landed)
            tiers = passed_over
        await self.sink.drain()
        if self.missing:
            raise FillFailed(
                f"no tier delivered {self.image.id}: " + "; ".join(self.errors or ["no tier left"])
            )

    async def _walk(self, tiers: list[Tier]) -> list[Tier]:
        """Ask each tier in turn for what is missing; the tiers passed over (no slot free)."""
        passed_over = []
        for tier in tiers:
            if not self.missing:
                break
            with self.limits.slot(tier.name, self.ticket.priority) as admitted:
                if not admitted:
                    passed_over.append(tier)
                elif tier.ranged and tier.config.parallel > 1:
                    await self._parallel(tier)
                else:
                    await self._stream(tier)
        return passed_over

    async def _stream(self, tier: Tier) -> None:
        """One request for everything still missing, writing only what is missing."""
        wanted, self.missing = self.missing, Spans()
        pos = next(iter(wanted))[0]
        try:
            async with tier.open(self.image, self.creds, pos) as body:
                pos = body.offset
                async for chunk in body.chunks():
                    end = pos + len(chunk)
                    await self._received(tier, len(chunk))
                    if end > self.size:
                        raise IntegrityError(
                            self.image.id, f"{tier.name} sent more than {self.size} bytes",
                            tuple(dict.fromkeys([*self.provenance.tiers, tier.name])),
                        )  # fmt: skip
                    view = memoryview(chunk)
                    for s, e in wanted.overlapping(pos, end):
                        await self._put(tier, view[s - pos : e - pos], s)
                        wanted.discard(s, e)
                        if e < end:
                            self.sink.end(e)  # the bytes after it were there already
                    pos = end
                    if not wanted and pos < self.size:
                        break  # the rest is there already (a whole read still checks its end)
            if wanted:
                raise TierShortRead(tier.name, f"body ended at byte {pos} of {self.size}")
            self.tiers.succeeded(tier)
        except TierError as exc:
            self._failed(tier, exc, pos)
        finally:
            self.sink.end(pos)
            for s, e in wanted:
                self.missing.add(s, e)

    async def _parallel(self, tier: Tier) -> None:
        workers = [asyncio.create_task(self._pieces(tier)) for _ in range(tier.config.parallel)]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _pieces(self, tier: Tier) -> None:
        """One worker: ranged pieces from ``tier`` until none is missing or the tier fails twice."""
        failures = 0
        while failures < 2 and (piece := self.missing.take(tier.config.chunk_size)):
            start, end = piece
            pos = start
            try:
                async with tier.open(self.image, self.creds, start, end, exact=True) as body:
                    async for chunk in body.chunks():
                        await self._received(tier, len(chunk))
                        data = memoryview(chunk)[: end - pos]
                        await self._put(tier, data, pos)
                        pos += len(data)
                        if pos == end:
                            break
                if pos < end:
                    raise TierShortRead(tier.name, f"range ended at byte {pos} of {end}")
                failures = 0
                self.tiers.succeeded(tier)
            except TierError as exc:
                failures = 2 if isinstance(exc, _HOPELESS) else failures + 1
                self._failed(tier, exc, pos)
            finally:
                self.sink.end(pos)
                self.missing.add(pos, end)  # what this piece did not get goes back

    async def _put(self, tier: Tier, data: memoryview, offset: int) -> None:
        self.provenance.record(tier.name)
        await self.sink.put(data, offset)

    async def _received(self, tier: Tier, nbytes: int) -> None:
        """Count what a tier sent; the next read waits until the tier's max_rate allows it."""
        self.metrics.upstream_bytes.labels(tier.name).inc(nbytes)
        await self.limits.pay(tier.name, nbytes, self.ticket)

    def _failed(self, tier: Tier, exc: TierError, pos: int) -> None:
        self.tiers.failed(tier, exc)
        self.errors.append(str(exc))
        # What the failed request did not deliver goes back to ``missing`` after this, so the
        # log says where it stopped rather than a count that would not include it yet.
        log.warning("fill of %s: %s at byte %d", self.image.id, exc, pos)

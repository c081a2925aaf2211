"""The tiers behind L1: one contract, one module per kind.

A tier delivers an image's bytes from an offset (``open``); what it cannot do it says with a
TierError subclass, never with a library exception. ``TierSet`` orders the tiers for a fill,
skipping those that keep failing for a cool-down.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from cachenode.config import TierConfig
from cachenode.errors import TierError, TierNotFound
from cachenode.glance import Credentials, ImageInfo
from cachenode.metrics import Metrics

if TYPE_CHECKING:
    from cachenode.tiers.swift import Locations


class Body(Protocol):
    """An open response: bytes of the image starting at ``offset``."""

    offset: int

    def chunks(self) -> AsyncIterator[bytes]: ...


class Tier(Protocol):
    config: TierConfig
    ranged: bool  # honours Range: may be read in parallel pieces, and for a caller's range

    @property
    def name(self) -> str: ...

    def open(
        self,
        image: ImageInfo,
        creds: Credentials | None,
        start: int = 0,
        end: int | None = None,
        exact: bool = False,
    ) -> AbstractAsyncContextManager[Body]:
        """Bytes [start, end) of the image (to the end when ``end`` is None).

        Unless ``exact``, a tier that cannot start at ``start`` may deliver from 0
        (``Body.offset`` says so); with ``exact`` it raises RangeNotSupported instead.
        """
        ...

    async def close(self) -> None: ...


@dataclass
class _Health:
    consecutive_failures: int = 0
    cooling_until: float = 0.0


class TierSet:
    """The configured tiers in order, with their health."""

    def __init__(
        self, tiers: list[Tier], metrics: Metrics, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.tiers = tiers
        self.metrics = metrics
        self.clock = clock
        self._health = {t.name: _Health() for t in tiers}

    def candidates(self, exclude: frozenset[str] = frozenset()) -> list[Tier]:
        """Tiers to try, in order: healthy ones first, cooling ones as a last resort.

        A tier in cool-down is not asked while another can be; when none other is left, asking it
        is still better than failing the caller.
        """
        now = self.clock()
        usable = [t for t in self.tiers if t.name not in exclude]
        healthy = [t for t in usable if self._health[t.name].cooling_until <= now]
        return healthy + [t for t in usable if t not in healthy]

    def failed(self, tier: Tier, exc: TierError) -> None:
        self.metrics.tier_failures.labels(tier.name, exc.kind).inc()
        if isinstance(exc, TierNotFound):
            return  # about one image (not there, or a location refused), not the tier's health
        health = self._health[tier.name]
        health.consecutive_failures += 1
        if health.consecutive_failures >= tier.config.failures_before_cooldown:
            health.cooling_until = self.clock() + tier.config.cooldown

    def succeeded(self, tier: Tier) -> None:
        self._health[tier.name] = _Health()

    async def close(self) -> None:
        for tier in self.tiers:
            await tier.close()


def build_tier(config: TierConfig, locator: Locations | None = None) -> Tier:
    """The tier ``config`` describes; ``locator`` answers where Glance keeps an image, for a
    swift tier with ``locations: api``."""
    from cachenode.tiers.glance import GlanceTier
    from cachenode.tiers.http import HttpTier
    from cachenode.tiers.swift import SwiftTier

    if config.kind == "swift":
        return SwiftTier(config, locator)
    kinds: dict[str, Callable[[TierConfig], Tier]] = {"glance": GlanceTier, "http": HttpTier}
    return kinds[config.kind](config)

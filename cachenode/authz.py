"""Authorization: Glance decides, per caller and image, before any cached byte is sent.

A positive decision may be reused for ``authz.ttl`` per (credentials digest, image). Refusals are
never reused: a caller granted access a second later must not wait out a TTL. With
``authz.stale_if_error`` a positive decision also survives, for that long, a Glance that cannot be
reached; the handler uses such a stale decision for L1 hits only.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cachenode.errors import GlanceRefused, GlanceUnavailable
from cachenode.glance import Credentials, GlanceClient
from cachenode.metrics import Metrics


@dataclass(frozen=True)
class Decision:
    """Glance allows the download; ``has_data`` False: allowed, but nothing to cache."""

    has_data: bool
    stale: bool = False


@dataclass
class _Remembered:
    has_data: bool
    fresh_until: float
    stale_until: float


class Authorizer:
    def __init__(
        self,
        glance: GlanceClient,
        metrics: Metrics,
        ttl: float,
        stale_if_error: float = 0.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.glance = glance
        self.metrics = metrics
        self.ttl = ttl
        self.stale_if_error = stale_if_error
        self.max_entries = max_entries
        self.clock = clock
        # Digests are keyed with a per-process secret: nothing in memory can be matched to a token.
        self._key = secrets.token_bytes(32)
        self._remembered: OrderedDict[tuple[bytes, str], _Remembered] = OrderedDict()

    async def authorize(self, image_id: str, creds: Credentials) -> Decision:
        """Glance's decision for this caller; raises GlanceRefused or GlanceUnavailable."""
        key = (creds.digest(self._key), image_id)
        now = self.clock()
        known = self._remembered.get(key)
        if known is not None and now < known.fresh_until:
            self.metrics.authz.labels("cached").inc()
            return Decision(known.has_data)
        try:
            has_data = await self.glance.probe(image_id, creds)
        except GlanceRefused:
            self._remembered.pop(key, None)
            self.metrics.authz.labels("denied").inc()
            raise
        except GlanceUnavailable:
            if known is not None and now < known.stale_until:
                self.metrics.authz.labels("stale").inc()
                return Decision(known.has_data, stale=True)
            self.metrics.authz.labels("error").inc()
            raise
        self.metrics.authz.labels("allowed").inc()
        if has_data and (self.ttl > 0 or self.stale_if_error > 0):
            self._remember(key, has_data, now)
        return Decision(has_data)

    def forget(self, image_id: str) -> None:
        """Drop every decision about an image (it was deleted or deactivated)."""
        for key in [k for k in self._remembered if k[1] == image_id]:
            del self._remembered[key]

    def _remember(self, key: tuple[bytes, str], has_data: bool, now: float) -> None:
        self._remembered[key] = _Remembered(
            has_data, fresh_until=now + self.ttl, stale_until=now + self.ttl + self.stale_if_error
        )
        self._remembered.move_to_end(key)
        while len(self._remembered) > self.max_entries:
            self._remembered.popitem(last=False)

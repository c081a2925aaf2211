"""Where Glance keeps an image's data, asked of Glance's locations API (a swift tier's
``locations: api``, off by default).

Clouds hide ``locations``/``direct_url`` from users, so the record a caller gets does not say
where the object is. ``GET /v2/images/ID/locations`` does, but only to an identity with the
``service`` role that can also see the image: for a private image of another project that means
``service`` plus ``admin`` (observed on Glance 33; the README says what that exposes). Decisions:

- Asked with the sidecar's own identity (``service_auth``), and only when the caller's record
  shows no location: Glance's record, when it shows one, is the answer already.
- The answer only says which object to read. It grants nothing: each caller is authorized by
  Glance before any fill, the tier confines every location to its own account
  (``tiers.swift.object_in``), and the bytes are checked against the record's hash.
- No answer is not an error for the caller: a refusal (the identity lacks a role, or cannot see
  the image) or a failure (Glance down, an unreadable answer) gives no locations, and the tier
  reads the single-tenant layout (``<container>/<image id>``) as it does with the option off.
- Answers are kept per image: a found list until the image changes (``forget``, from Glance's
  notifications), the tier finds no object where it says (``forget``, from the tier), or the
  bound pushes it out; a refusal for ``REFUSED_TTL``, so an identity without the roles costs one
  call per image every five minutes, not one per fill; a failure (Glance down or slow) for
  ``FAILED_TTL``, so the ranged requests of a parallel fill do not each wait out Glance's
  timeout. Concurrent lookups of one image are one call.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from cachenode.errors import GlanceRefused, GlanceUnavailable
from cachenode.glance import GlanceClient, SingleFlight
from cachenode.identity import ServiceIdentity
from cachenode.metrics import Metrics

log = logging.getLogger(__name__)


class Locator:
    MAX_IMAGES = 10_000
    REFUSED_TTL = 300.0
    FAILED_TTL = 30.0

    def __init__(
        self,
        glance: GlanceClient,
        identity: ServiceIdentity,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.glance = glance
        self.identity = identity
        self.metrics = metrics
        self.clock = clock
        self._known: OrderedDict[str, tuple[float, tuple[str, ...]]] = OrderedDict()
        self._asking: SingleFlight[tuple[str, ...]] = SingleFlight()

    async def locations(self, image_id: str) -> tuple[str, ...]:
        """The image's location URLs in Glance's order; () when Glance did not say."""
        known = self._known.get(image_id)
        if known is not None and known[0] > self.clock():
            self._known.move_to_end(image_id)
            return known[1]
        return await self._asking.run(image_id, lambda: self._ask(image_id))

    def forget(self, image_id: str) -> None:
        self._known.pop(image_id, None)

    async def _ask(self, image_id: str) -> tuple[str, ...]:
        try:
            urls = await self.glance.locations(image_id, await self.identity.credentials())
        except GlanceRefused as exc:
            self._count("refused")
            log.warning(
                "locations of %s: glance answered %d (service_auth needs the service role and"
                " must see the image); reading the single-tenant layout",
                image_id,
                exc.status,
            )
            self._keep(image_id, (), self.REFUSED_TTL)
            return ()
        except GlanceUnavailable as exc:
            self._count("failed")
            log.warning("locations of %s: %s; reading the single-tenant layout", image_id, exc)
            self._keep(image_id, (), self.FAILED_TTL)
            return ()
        self._count("answered")
        self._keep(image_id, urls, math.inf)
        return urls

    def _keep(self, image_id: str, urls: tuple[str, ...], ttl: float) -> None:
        self._known[image_id] = (self.clock() + ttl, urls)
        self._known.move_to_end(image_id)
        while len(self._known) > self.MAX_IMAGES:
            self._known.popitem(last=False)

    def _count(self, outcome: str) -> None:
        self.metrics.locations_lookups.labels(outcome).inc()

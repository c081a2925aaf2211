"""Tier kind ``glance``: a glance-api, typically a regional one with Glance's image cache on.

It is asked exactly as a client would ask it, with the caller's own credentials, so it applies its
own authorization too. It is read whole, never in parallel pieces (``ranged`` False): Glance's
cache never serves a Range (it goes to the store), and its Swift store refuses any Range with 400.
A resume asks for a Range and, refused, reads from 0 (``HttpSource.open``).
"""

from __future__ import annotations

from cachenode.glance import Credentials, ImageInfo
from cachenode.tiers.http import HttpSource


class GlanceTier(HttpSource):
    ranged = False
    credentialed = True

    async def locate(
        self, image: ImageInfo, creds: Credentials | None
    ) -> tuple[str, dict[str, str]]:
        return f"{self.config.url}/v2/images/{image.id}/file", dict(creds.headers) if creds else {}

"""Tier kind ``glance``: a glance-api, typically a regional one with Glance's image cache on.

It is asked exactly as a client would ask it, with the caller's own credentials, so it applies its
own authorization too. Its cache never serves a Range and its Swift store refuses one with 400: a
fill that must resume at an offset gets RangeNotSupported or a whole body from 0 (which the fill
skips ahead in).
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

from cachenode.glance import Credentials, ImageInfo
from cachenode.tiers.http import HttpBody, HttpSource


class GlanceTier(HttpSource):
    def open(
        self, image: ImageInfo, creds: Credentials | None, start: int = 0, end: int | None = None
    ) -> AbstractAsyncContextManager[HttpBody]:
        url = f"{self.config.url}/v2/images/{image.id}/file"
        return self.get(url, dict(creds.headers) if creds else {}, start, end)

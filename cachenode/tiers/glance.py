"""Tier kind ``glance``: a glance-api, typically a regional one with Glance's image cache on.

It is asked exactly as a client would ask it, with the caller's own credentials, so it applies its
own authorization too. It is read whole, never in parallel pieces: Glance's cache never serves a
Range (it goes to the store), and its Swift store refuses any Range with 400. A fill that resumes
at an offset asks for a Range and, refused, reads from 0 and skips ahead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from cachenode.errors import RangeNotSupported
from cachenode.glance import Credentials, ImageInfo
from cachenode.tiers.http import HttpBody, HttpSource


class GlanceTier(HttpSource):
    ranged = False
    credentialed = True

    @asynccontextmanager
    async def open(
        self,
        image: ImageInfo,
        creds: Credentials | None,
        start: int = 0,
        end: int | None = None,
        exact: bool = False,
    ) -> AsyncIterator[HttpBody]:
        url = f"{self.config.url}/v2/images/{image.id}/file"
        headers = dict(creds.headers) if creds else {}
        async with AsyncExitStack() as stack:
            try:
                body = await stack.enter_async_context(self.get(url, headers, start, end, exact))
            except RangeNotSupported:
                if exact or start == 0:
                    raise
                body = await stack.enter_async_context(self.get(url, headers, 0, None))
            yield body

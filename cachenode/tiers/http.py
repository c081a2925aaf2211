"""Tier kind ``http``: a plain HTTP origin (a mirror, a CDN, a web server over the object store).

Also home of the HTTP plumbing every HTTP-speaking tier shares: status codes and aiohttp exceptions
become TierErrors here, once.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager

import aiohttp

from cachenode.config import TierConfig
from cachenode.errors import (
    RangeNotSupported,
    TierDenied,
    TierError,
    TierNotFound,
    TierShortRead,
    TierUnavailable,
)
from cachenode.glance import Credentials, ImageInfo

READ_SIZE = 1 << 20  # bytes handed to the fill at a time: big enough to amortise its thread hops
GATHER = 0.02  # seconds a piece may wait to grow to READ_SIZE
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class HttpBody:
    def __init__(self, tier: str, resp: aiohttp.ClientResponse, offset: int) -> None:
        self.tier = tier
        self.resp = resp
        self.offset = offset

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body in pieces of about READ_SIZE.

        The first piece goes out as soon as it arrives (time to first byte); later ones gather up
        to READ_SIZE, or what arrived within GATHER seconds, so a fast body costs the fill about a
        thousand hops to its threads per GiB instead of several thousand, and a slow one still
        lands steadily. A tier that pauses does not hold back what it sent before the pause: the
        window ends on time whether or not more bytes come. Bytes received before an error are
        handed over before the error.
        """
        pieces: list[bytes] = []
        size, first, deadline = 0, True, 0.0
        error: TierError | None = None
        try:
            while (data := await self._read(deadline if pieces else None)) != b"":
                if data is None:  # the window closed before more bytes came
                    yield b"".join(pieces)
                    pieces, size = [], 0
                    continue
                now = asyncio.get_running_loop().time()
                if not pieces:
                    deadline = now + GATHER
                pieces.append(data)
                size += len(data)
                if first or size >= READ_SIZE or now >= deadline:
                    yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
                    pieces, size, first = [], 0, False
        except TimeoutError:
            error = TierUnavailable(self.tier, "read timed out", kind="timeout")
        except (aiohttp.ClientError, OSError) as exc:
            error = TierShortRead(self.tier, f"body broken: {type(exc).__name__}")
        if pieces:
            yield b"".join(pieces)
        if error is not None:
            raise error

    async def _read(self, deadline: float | None) -> bytes | None:
        """The next bytes of the body (b"" at its end); None if ``deadline`` came first."""
        if deadline is None:
            return await self.resp.content.readany()
        try:
            async with asyncio.timeout_at(deadline) as window:
                return await self.resp.content.readany()
        except TimeoutError:
            if window.expired():
                return None
            raise  # the tier's own read timeout


class HttpSource:
    """An aiohttp session with the tier's timeouts, and the status-to-TierError table."""

    ranged = True  # honours Range: parallel pieces and exact ranges may be asked of it
    credentialed = False  # sends credentials of its own: never follows a redirect

    def __init__(self, config: TierConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.config.connect_timeout,
                sock_read=self.config.read_timeout,
            )
            self._session = aiohttp.ClientSession(
                timeout=timeout, auto_decompress=False, read_bufsize=READ_SIZE
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def locate(
        self, image: ImageInfo, creds: Credentials | None
    ) -> tuple[str, dict[str, str]]:
        """The image's URL and the headers that authenticate the request, for this kind."""
        raise NotImplementedError

    def not_found(self, image: ImageInfo) -> None:
        """The object ``locate`` named is not there (404); kinds that learned where it is from
        elsewhere forget it here."""

    @asynccontextmanager
    async def open(
        self,
        image: ImageInfo,
        creds: Credentials | None,
        start: int = 0,
        end: int | None = None,
        exact: bool = False,
    ) -> AsyncIterator[HttpBody]:
        """Bytes [start, end) of the image (the Tier contract). A resume (``start`` > 0, not
        ``exact``) that the server refuses as a Range is read from 0 instead: the fill skips
        what it has, which beats giving up on the tier."""
        url, headers = await self.locate(image, creds)
        async with AsyncExitStack() as stack:
            try:
                body = await stack.enter_async_context(self.get(url, headers, start, end, exact))
            except RangeNotSupported:
                if exact or start == 0:
                    raise
                body = await stack.enter_async_context(self.get(url, headers, 0, None))
            except TierNotFound:
                self.not_found(image)
                raise
            yield body

    @asynccontextmanager
    async def get(
        self,
        url: str,
        headers: Mapping[str, str],
        start: int,
        end: int | None,
        exact: bool = False,
    ) -> AsyncIterator[HttpBody]:
        """GET ``url`` for bytes [start, end); ``exact``: a body from 0 is RangeNotSupported."""
        headers = dict(headers)
        ranged = start > 0 or end is not None
        if ranged:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            # Credentials never follow a redirect: only a credential-free tier may be redirected.
            resp = await self.session.get(
                url, headers=headers, allow_redirects=not self.credentialed
            )
        except TimeoutError:
            raise TierUnavailable(self.name, "connect timed out", kind="timeout") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise TierUnavailable(self.name, f"{type(exc).__name__}", kind="connect") from None
        try:
            offset = self._offset(resp, start, ranged)
            if exact and offset != start:
                raise RangeNotSupported(self.name, "answered a Range with the whole object")
            yield HttpBody(self.name, resp, offset)
        finally:
            if resp.content.at_eof():
                resp.release()
            else:
                resp.close()

    def _offset(self, resp: aiohttp.ClientResponse, start: int, ranged: bool) -> int:
        status = resp.status
        if status == 200:
            return 0
        if status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != start:
                raise TierUnavailable(self.name, "206 for another range", kind="bad_range")
            return start
        if status == 404:
            raise TierNotFound(self.name, "404")
        if status in (401, 403):
            raise TierDenied(self.name, str(status))
        if ranged and status in (400, 416, 501):
            raise RangeNotSupported(self.name, f"{status} to a Range")
        kind = "http_5xx" if status >= 500 else "http_other"
        raise TierUnavailable(self.name, f"answered {status}", kind=kind)


class HttpTier(HttpSource):
    """``url`` with ``{image_id}`` in it, or a base to which ``/<image id>`` is appended."""

    async def locate(
        self, image: ImageInfo, creds: Credentials | None
    ) -> tuple[str, dict[str, str]]:
        if "{image_id}" in self.config.url:
            return self.config.url.replace("{image_id}", image.id), {}
        return f"{self.config.url}/{image.id}", {}

"""Pass-through to glance.url: everything that is not a cached download, streamed both ways.

Bodies are never buffered (an image upload streams from the caller to Glance chunk by chunk), with
one exception: version-discovery documents, a few hundred bytes, whose links are rewritten to point
at the sidecar so that a client that discovers versions stays on it.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp import web

from cachenode.glance import HOP_BY_HOP

log = logging.getLogger(__name__)

_DISCOVERY = re.compile(r"^/(versions/?|v\d+(\.\d+)?/?)?$")
_MAX_DISCOVERY_BODY = 1 << 20


class Proxy:
    def __init__(self, glance_url: str) -> None:
        self.glance_url = glance_url
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600),
                auto_decompress=False,
                read_bufsize=1 << 20,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def forward(
        self, request: web.Request, extra_headers: dict[str, str] | None = None
    ) -> web.StreamResponse:
        """Send ``request`` to Glance and stream its answer back unchanged."""
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() != "host"
        }
        body = request.content if request.body_exists else None
        url = self.glance_url + request.rel_url.raw_path_qs
        try:
            upstream = await self.session.request(
                request.method, url, headers=headers, data=body, allow_redirects=False
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning(
                "pass-through %s %s: glance unreachable: %s",
                request.method,
                request.rel_url.path,
                type(exc).__name__,
            )
            return web.json_response(
                {
                    "error": {
                        "code": 502,
                        "title": "Bad Gateway",
                        "message": "cachenode could not reach Glance",
                    }
                },
                status=502,
            )
        async with upstream:
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    resp.headers.add(name, self._rewrite_location(name, value, request))
            resp.headers.update(extra_headers or {})
            if request.method == "GET" and _DISCOVERY.match(request.rel_url.path):
                return await self._discovery(request, upstream, resp)
            if upstream.content_length is not None:
                resp.content_length = upstream.content_length
            await resp.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await resp.write(chunk)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                # Headers are out: the only honest signal left is a cut connection.
                log.warning(
                    "pass-through %s %s: glance broke off: %s",
                    request.method,
                    request.rel_url.path,
                    type(exc).__name__,
                )
                if request.transport is not None:
                    request.transport.abort()
                return resp
            await resp.write_eof()
            return resp

    def _rewrite_location(self, name: str, value: str, request: web.Request) -> str:
        if name.lower() == "location" and value.startswith(self.glance_url):
            return f"{request.scheme}://{request.host}{value[len(self.glance_url) :]}"
        return value

    async def _discovery(
        self, request: web.Request, upstream: aiohttp.ClientResponse, resp: web.StreamResponse
    ) -> web.StreamResponse:
        raw = await upstream.content.read(_MAX_DISCOVERY_BODY)
        try:
            doc = json.loads(raw)
        except ValueError:
            body = raw
        else:
            body = json.dumps(_rewrite_links(doc, request.scheme, request.host)).encode()
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body)
        await resp.write_eof()
        return resp


def _rewrite_links(doc: Any, scheme: str, host: str) -> Any:
    """Every ``href`` in a version document, pointed at scheme://host with its path kept."""
    if isinstance(doc, dict):
        out = {}
        for key, value in doc.items():
            if (
                key == "href"
                and isinstance(value, str)
                and value.startswith(("http://", "https://"))
            ):
                parts = urlsplit(value)
                value = urlunsplit((scheme, host, parts.path, parts.query, parts.fragment))
            out[key] = _rewrite_links(value, scheme, host)
        return out
    if isinstance(doc, list):
        return [_rewrite_links(item, scheme, host) for item in doc]
    return doc

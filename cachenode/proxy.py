"""Pass-through to glance.url: every request that is not a cached download, streamed both ways.

"Exact" means the caller gets what it would get from Glance directly, and Glance gets what the
caller sent, hop-by-hop parts aside:

- **Headers** keep every value, in order, both ways. The hop-by-hop ones are dropped both ways
  (RFC 9110 §7.6.1: ``Connection`` and every header it names, ``Keep-Alive``, ``TE``,
  ``Transfer-Encoding``, ``Upgrade``, ``Proxy-*``), and the caller's ``Host`` (Glance gets its
  own). aiohttp adds none of its defaults to a request (``Accept``, ``User-Agent``, and above all
  ``Content-Type``: an upload without one gets Glance's 415, not a silent octet-stream).
- **Bodies stream**, never buffered; framing is chosen again on each hop (the caller's length when
  it gave one, else chunked).
- **Expect: 100-continue** is Glance's to answer (see ``_Expecting``).
- **Version documents** (``/``, ``/versions``, ``/v2``...) are read whole, however many reads they
  arrive in, and their links rewritten to point at the sidecar, so that clients that discover
  versions stay on it. A document over ``MAX_DISCOVERY_BODY`` (Glance's are about 2 KiB) is not a
  version document Glance would send: it is streamed unchanged rather than held in memory.
  ``Location`` is rewritten only when it points under glance.url.
- **Two connection pools** (``Pools``), so that short calls never queue behind long streams.
- **Errors**: Glance not reachable (connect, a pool wait, a timeout before its answer) is a 502
  with a JSON body, the only status of our own; once the answer's headers are out, an error can
  only cut the connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

import aiohttp
from aiohttp import payload, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from cachenode.errors import (
    BadRequest,
    CachenodeError,
    PassThroughFailed,
    error_body,
    http_status,
)
from cachenode.glance import HOP_BY_HOP

log = logging.getLogger(__name__)

_DISCOVERY = re.compile(r"/(versions/?|v\d+(\.\d+)?/?)?")
# Image data: the calls that hold a connection for as long as an image takes to move.
_STREAMS = re.compile(r"/v2/images/[^/]+/(file|stage)")
_HOST = re.compile(r"[A-Za-z0-9.-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

MAX_DISCOVERY_BODY = 64 << 10
SHORT_POOL = 64
STREAM_POOL = 128
_STREAM_BUFFER = 256 << 10
_SOCK_CONNECT = 10.0
_SOCK_READ = 600.0


@dataclass(frozen=True)
class Pools:
    """Connections to glance.url, in two pools by how long a call holds one.

    ``short`` (SHORT_POOL = 64): authorization probes, image records and every pass-through call
    that is not image data. Each holds its connection for one round trip (milliseconds), so 64
    carry thousands of calls a second, more than one host asks; the cap keeps a burst from one
    host (a boot storm's probes) from taking every worker of the Glance API behind it.

    ``streams`` (STREAM_POOL = 128): image data passed through (uploads, staging, downloads
    bypassing the cache), which hold theirs for minutes. Nova moves a handful of images at once per
    host (max_concurrent_builds 10, snapshots, migrations), so 128 is far above real use; the cap
    bounds what the sidecar holds for them: 128 x (2 x 256 KiB read buffer + 64 KiB write buffer),
    about 72 MiB, inside the DaemonSet's 512 MiB.

    Apart, a full stream pool never makes a short call wait. In both, waiting for a free connection
    plus connecting is bounded by ``glance.timeout`` (then 502), a TCP connect by 10 s, and a
    silence from Glance by 10 min (an upload's answer comes after Glance has stored it all).
    Cookies are never kept: one jar would hand one caller's cookies to the next.
    """

    short: aiohttp.ClientSession
    streams: aiohttp.ClientSession

    @classmethod
    def open(cls, timeout: float) -> Pools:
        return cls(_session(SHORT_POOL, timeout), _session(STREAM_POOL, timeout, _STREAM_BUFFER))

    async def close(self) -> None:
        await self.short.close()
        await self.streams.close()


def _session(limit: int, timeout: float, read_bufsize: int = 2**16) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        timeout=aiohttp.ClientTimeout(
            total=None, connect=timeout, sock_connect=min(_SOCK_CONNECT, timeout),
            sock_read=_SOCK_READ,
        ),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        read_bufsize=read_bufsize,
        request_class=_GlanceRequest,
    )  # fmt: skip


class Proxy:
    def __init__(self, glance_url: str, pools: Pools) -> None:
        self.glance_url = glance_url.rstrip("/")
        self._base = urlsplit(self.glance_url)
        self.pools = pools

    @staticmethod
    def forwardable(request: web.Request) -> bool:
        """Whether ``request``'s headers can go to Glance unchanged."""
        try:
            _utf8(end_to_end(request.headers))
        except UnicodeEncodeError:
            return False
        return True

    async def forward(
        self, request: web.Request, extra_headers: dict[str, str] | None = None
    ) -> web.StreamResponse:
        """Send ``request`` to Glance and stream its answer back."""
        body = _body(request)
        try:
            headers = request_headers(request, expecting=isinstance(body, _Expecting))
        except UnicodeEncodeError:
            return _error(request, BadRequest("header bytes that are not UTF-8"))
        try:
            upstream = await self._send(request, headers, body)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return _unreachable(request, exc)
        finally:
            if isinstance(body, _Expecting):
                body.stop_watching()
        async with upstream:
            try:
                resp = self._response(request, upstream, extra_headers)
            except UnicodeEncodeError:
                return _error(request, PassThroughFailed("header bytes that are not UTF-8"))
            if request.method == "GET" and _DISCOVERY.fullmatch(request.path):
                return await self._discovery(request, upstream, resp)
            return await _relay(request, upstream, resp)

    async def _send(
        self, request: web.Request, headers: CIMultiDict[str], body: _Body
    ) -> aiohttp.ClientResponse:
        session = self.pools.streams if _STREAMS.fullmatch(request.path) else self.pools.short
        # encoded: the caller's path goes on byte for byte, never normalized or re-quoted
        url = URL(self.glance_url + request.rel_url.raw_path_qs, encoded=True)
        return await session.request(
            request.method, url, headers=headers, data=body, allow_redirects=False,
            skip_auto_headers=_NO_AUTO_HEADERS,
        )  # fmt: skip

    def _response(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        extra_headers: dict[str, str] | None,
    ) -> web.StreamResponse:
        reason = upstream.reason or ""
        reason.encode("utf-8")
        resp = web.StreamResponse(status=upstream.status, reason=reason or None)
        for name, value in _utf8(end_to_end(upstream.headers)).items():
            if name.lower() == "location":
                value = self.rewrite_location(value, _origin(request))
            if name.lower() != "content-length":
                resp.headers.add(name, value)
        resp.headers.update(extra_headers or {})
        if upstream.content_length is not None:
            resp.content_length = upstream.content_length
        _close_if_unread(request, resp)
        return resp

    def rewrite_location(self, value: str, origin: str) -> str:
        """``value`` pointed at ``origin`` if it is a URL under glance.url; else unchanged."""
        tail = under(value, self._base)
        return value if tail is None else origin + tail

    async def _discovery(
        self, request: web.Request, upstream: aiohttp.ClientResponse, resp: web.StreamResponse
    ) -> web.StreamResponse:
        try:
            head, whole = await read_up_to(upstream.content, MAX_DISCOVERY_BODY)
        except (TimeoutError, aiohttp.ClientError, OSError):
            return _error(request, PassThroughFailed("Glance broke off its version document"))
        if not whole:
            return await _relay(request, upstream, resp, head)
        body = rewrite_document(head, _origin(request))
        resp.content_length = len(body)
        try:
            await resp.prepare(request)
            await resp.write(body)
            await resp.write_eof()
        except ConnectionError:
            pass  # the caller went away
        return resp


def request_headers(request: web.Request, expecting: bool) -> CIMultiDict[str]:
    """What goes to Glance: the caller's end-to-end headers, every value, in order."""
    headers = _utf8(end_to_end(request.headers))
    headers.popall("Host", None)
    if not expecting:
        headers.popall("Expect", None)  # HTTP/1.0, or no body: no handshake to have
    return headers


def _utf8(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """``headers``, if they can go on unchanged. aiohttp keeps bytes that are not UTF-8 as
    surrogates, which it cannot write again: UnicodeEncodeError, rather than altered bytes."""
    for name, value in headers.items():
        (name + value).encode("utf-8")
    return headers


def end_to_end(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """``headers`` without the hop-by-hop ones: the standard set and those ``Connection`` names."""
    named = {
        token.strip().lower() for value in headers.getall("Connection", ()) for token in
        value.split(",")
    }  # fmt: skip
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in HOP_BY_HOP and name.lower() not in named:
            out.add(name, value)
    return out


def under(url: str, base: SplitResult) -> str | None:
    """The rest of ``url`` (path, query, fragment) if it lies under ``base``; else None."""
    parts = urlsplit(url)
    try:
        same = (parts.scheme.lower(), parts.hostname, _port(parts)) == (
            base.scheme.lower(), base.hostname, _port(base))  # fmt: skip
    except ValueError:  # a port that is not one
        return None
    prefix = base.path.rstrip("/")
    if not same or parts.username is not None:
        return None
    if parts.path != prefix and not parts.path.startswith(prefix + "/"):
        return None
    return urlunsplit(("", "", parts.path[len(prefix) :] or "/", parts.query, parts.fragment))


def _port(parts: SplitResult) -> int | None:
    return parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())


def rewrite_document(raw: bytes, origin: str) -> bytes:
    """A version document with every absolute ``href`` pointed at ``origin``; other bodies as
    they are."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return raw
    return json.dumps(_rewrite_links(doc, origin)).encode()


def _rewrite_links(doc: Any, origin: str) -> Any:
    if isinstance(doc, dict):
        out = {}
        for key, value in doc.items():
            if (
                key == "href"
                and isinstance(value, str)
                and value.startswith(("http://", "https://"))
            ):
                parts = urlsplit(value)
                value = origin + urlunsplit(("", "", parts.path, parts.query, parts.fragment))
            out[key] = _rewrite_links(value, origin)
        return out
    if isinstance(doc, list):
        return [_rewrite_links(item, origin) for item in doc]
    return doc


def _origin(request: web.Request) -> str:
    """scheme://host:port the caller reached us by: its Host when that is one, else our address."""
    host = request.headers.get("Host", "")
    if not _HOST.fullmatch(host):
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        host = f"{sockname[0]}:{sockname[1]}" if sockname else "127.0.0.1"
    return f"{request.scheme}://{host}"


async def read_up_to(content: aiohttp.StreamReader, limit: int) -> tuple[bytes, bool]:
    """The body if it ends within ``limit`` bytes: (body, True); else (what was read, False)."""
    parts: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await content.readany()
        if not chunk:
            return b"".join(parts), True
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts), False


async def _relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    resp: web.StreamResponse,
    first: bytes = b"",
) -> web.StreamResponse:
    """Stream Glance's body (after ``first``, already read) to the caller."""
    try:
        await resp.prepare(request)
        chunk = first
        while True:
            if chunk:
                await resp.write(chunk)
            try:
                chunk = await upstream.content.readany()
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                # Headers are out: the only honest signal left is a cut connection.
                log.warning("pass-through %s %s: glance broke off: %s",
                            request.method, request.path, type(exc).__name__)  # fmt: skip
                if request.transport is not None:
                    request.transport.abort()
                return resp
            if not chunk:
                break
        await resp.write_eof()
    except ConnectionError:
        pass  # the caller went away; nothing of ours to clean
    return resp


def _close_if_unread(request: web.Request, resp: web.StreamResponse) -> None:
    """Glance answered before the caller's body was read (a refusal, an expectation declined):
    the rest is never read, so the connection ends with this answer (RFC 9112 §9.6)."""
    if not request.content.is_eof():
        resp.force_close()


def _unreachable(request: web.Request, exc: BaseException) -> web.Response:
    if isinstance(exc, aiohttp.ServerDisconnectedError) and request.transport is not None:
        # Glance took the request and closed the connection without a status (uWSGI does when
        # the application fails): the caller gets exactly that, not an answer of ours.
        log.warning("pass-through %s %s: glance closed the connection without an answer",
                    request.method, request.path)  # fmt: skip
        request.transport.abort()
        return web.Response(status=502)  # never sent: the connection is gone
    if request.transport is None or request.transport.is_closing():
        # The caller's body broke off, which aiohttp reports as a failed send: not Glance's doing.
        log.info("pass-through %s %s: the caller went away", request.method, request.path)
    else:
        log.warning("pass-through %s %s: glance unreachable: %s",
                    request.method, request.path, type(exc).__name__)  # fmt: skip
    return _error(request, PassThroughFailed(f"glance unreachable: {type(exc).__name__}"))


def _error(request: web.Request, exc: CachenodeError) -> web.Response:
    """Our answer instead of Glance's, by the one table (``errors.http_status``)."""
    status, message = http_status(exc)
    resp = web.json_response(error_body(status, message), status=status)
    _close_if_unread(request, resp)
    return resp


async def expect_handler(request: web.Request) -> None:
    """aiohttp answers ``Expect: 100-continue`` at once by default; here Glance answers it."""


def _body(request: web.Request) -> _Body:
    """What aiohttp's client sends as the body: None, the caller's stream, or ``_Expecting``."""
    if not request.body_exists:
        return None
    expect = request.headers.get("Expect", "").strip().lower()
    if expect == "100-continue" and request.version >= aiohttp.HttpVersion11:
        return _Expecting(request)
    return request.content


class _Expecting(payload.AsyncIterablePayload):
    """The body of a caller that sent ``Expect: 100-continue``, read only once Glance says so.

    The expectation goes on to Glance, and aiohttp's client sends the body only after Glance's
    ``100 Continue``: only then is that 100 relayed to the caller and its body read. A final
    status instead (401, 403, 409, 413...) reaches the caller, which then never sends the body
    (and the connection closes with it). A caller may also stop waiting and send its body
    unasked (RFC 9110 §10.1.1; curl does after 1 s): its first bytes end the wait as Glance's 100
    would, and go on to Glance, which reads them as it would from the caller directly. Glances
    that never send 100 (uWSGI's http-socket, as in the test bed) then work as without us.
    """

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._early = b""
        self._watch: asyncio.Task[None] | None = None
        super().__init__(self._chunks())

    def watch(self, glance_continue: asyncio.Future[bool]) -> None:
        """Let the caller's first bytes end aiohttp's wait for Glance's 100 too."""

        def arrived(task: asyncio.Task[None]) -> None:
            if task.cancelled():
                return  # Glance answered first
            # Bytes, an early end or a broken caller: aiohttp reads on and finds out which
            # (the caller's stream raises its error again), so the error is dropped here.
            task.exception()
            if not glance_continue.done():
                glance_continue.set_result(True)

        self._watch = asyncio.ensure_future(self._first_bytes())
        self._watch.add_done_callback(arrived)

    def stop_watching(self) -> None:
        if self._watch is not None:
            self._watch.cancel()

    async def _first_bytes(self) -> None:
        self._early = await self._request.content.readany()

    async def _chunks(self) -> AsyncIterator[bytes]:
        if self._watch is None or not self._watch.done():
            # Glance said 100 first: pass it on, then read (once the watch let go of the stream).
            self.stop_watching()
            if self._watch is not None:
                await asyncio.wait({self._watch})
            await self._request.writer.write(_CONTINUE)
            self._request.writer.output_size = 0  # as aiohttp's own expect handler does
        elif self._early:
            yield self._early
        async for chunk in self._request.content.iter_any():
            yield chunk


_Body = _Expecting | aiohttp.StreamReader | None


class _GlanceRequest(aiohttp.ClientRequest):
    """aiohttp's client request with one hook: an ``_Expecting`` body is handed the future on
    which aiohttp waits for Glance's 100 before it sends the body (``_continue``, not public)."""

    def update_expect_continue(self, expect: bool = False) -> None:
        super().update_expect_continue(expect)
        if isinstance(self.body, _Expecting) and self._continue is not None:
            self.body.watch(self._continue)

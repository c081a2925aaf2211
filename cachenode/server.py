"""The data plane (SPEC §3): image downloads through the cache, everything else to Glance.

A download reads top to bottom in ``DataPlane.download``: authorize with Glance, look up L1, serve a
hit, or join or start the image's fill and stream from it as bytes land. Errors of our own become
statuses in one place (``error_response``); once the first byte of a body is out, an error can only
cut the connection.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sys
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from multidict import CIMultiDictProxy

from cachenode import correlation, sendfile
from cachenode.authz import Authorizer
from cachenode.catalog import Entry
from cachenode.errors import (
    CachenodeError,
    FillBroken,
    FillFailed,
    FillStopped,
    GlanceRefused,
    GlanceUnavailable,
    NoRoom,
    ProbeUndecided,
    StoreError,
    TierError,
    TiersBusy,
    error_body,
    http_status,
)
from cachenode.fill import Fill, Fills
from cachenode.glance import (
    CREDENTIAL_HEADERS,
    Credentials,
    GlanceClient,
    ImageInfo,
    is_image_id,
)
from cachenode.identity import ServiceIdentity
from cachenode.limits import Ticket
from cachenode.local import Local
from cachenode.metrics import Metrics
from cachenode.proxy import Proxy, expect_handler
from cachenode.ranges import ByteRange, resolve
from cachenode.ranges import parse as parse_range
from cachenode.tiers import Body

log = logging.getLogger(__name__)

# Cold small reads of hits, in a pool of their own: a burst of them (a lazy boot's first reads
# of a freshly filled image) must not queue the catalog's and commits' work behind it.
_COLD_READS = ThreadPoolExecutor(4, thread_name_prefix="hit-read")
NEAR = 1 << 20  # a range starting this close past a fill's landed bytes waits for them
access = logging.getLogger("cachenode.access")
SENT = web.RequestKey(
    "sent", int
)  # body bytes a download handler sent (sendfile bypasses the writer)
IDS = web.RequestKey("ids", correlation.Correlation)
INLINE_BYTES = 64 << 10  # a hit range up to this goes out with its headers in one write
T = TypeVar("T")


@dataclass
class DataPlane:
    authz: Authorizer
    glance: GlanceClient
    local: Local
    fills: Fills
    proxy: Proxy
    metrics: Metrics
    service_identity: ServiceIdentity | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._frame])
        app.on_response_prepare.append(_stamp)  # a response prepared inside a handler
        # HEAD is Glance's to answer (405): only GET goes through the cache. Expect: 100-continue
        # is Glance's to answer too (cachenode.proxy), never aiohttp's at once.
        app.router.add_get("/v2/images/{image_id}/file", self.download, allow_head=False,
                           expect_handler=expect_handler)  # fmt: skip
        app.router.add_route("*", "/{tail:.*}", self.passthrough, expect_handler=expect_handler)
        return app

    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        return await self.proxy.forward(request)

    async def download(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        image_id = request.match_info["image_id"]
        if reason := bypass_reason(image_id, request.headers):
            return await self._bypass(request, reason)
        creds = Credentials.from_headers(request.headers)
        if not creds.well_formed:
            self.metrics.request("denied").inc()
            return _error(401, "malformed credentials")
        record = None
        if image_id not in self.local and self.fills.get(image_id) is None:
            # Likely a miss, which needs the image record: ask for it while Glance authorizes.
            record = _background(self.glance.image(image_id, creds))
        try:
            return await self._download(request, started, image_id, creds, record)
        except StoreError as exc:
            # A broken L1 (catalog, disk) must not cost the caller the image. Raised only by
            # look-ups, before any response was prepared.
            log.error("L1 failed for %s: %s; passing the download to Glance", image_id, exc)
            return await self._bypass(request, "store_error")
        finally:
            if record is not None:
                record.cancel()

    async def _download(
        self,
        request: web.Request,
        started: float,
        image_id: str,
        creds: Credentials,
        record: asyncio.Task[ImageInfo] | None,
    ) -> web.StreamResponse:
        try:
            decision = await self.authz.authorize(image_id, creds)
        except GlanceRefused as exc:
            if exc.status == 404 and image_id in self.local:
                await self._evict_if_gone(image_id)
            # Glance refused: the caller's own request goes to Glance, so the refusal it gets is
            # exactly Glance's answer to it (its Accept decides JSON, HTML or text; the probe's
            # was asked for one byte, with the probe's headers).
            self.metrics.request("denied").inc()
            if self.proxy.forwardable(request):
                return await self.proxy.forward(request)
            return error_response(exc)  # the probe's refusal is the nearest to Glance's own
        except ProbeUndecided:
            return await self._bypass(request, "undecided")  # the caller gets Glance's answer
        if not decision.has_data:
            return await self._bypass(request, "no_data")
        if (hit := await self.local.lookup(image_id)) is not None:
            return await self._serve_hit(request, started, *hit)
        if decision.stale:
            raise GlanceUnavailable("glance is unreachable and the image is not in L1")
        fill, status = self.fills.join(image_id), "joined"
        if fill is None:
            image = await (record or self.glance.image(image_id, creds))
            if reason := self._uncacheable(image):
                return await self._bypass(request, reason)
            if (hit := await self.local.lookup(image_id)) is not None:
                return await self._serve_hit(request, started, *hit)  # committed meanwhile
            fill, started_it = self.fills.start(image, creds)
            status = "miss" if started_it else "joined"
        if fill.verified:
            status = "hit"  # every byte is local and proven: what was a join is now a hit
        return await self._serve_fill(request, started, fill, status, creds)

    def _uncacheable(self, image: ImageInfo) -> str | None:
        """Why this image goes to Glance instead of the cache, or None."""
        if image.status != "active":
            return "not_active"  # the caller gets exactly Glance's answer
        if not image.size:
            return "empty"
        if image.verifier() is None:
            return "unverifiable"  # no hash to check bytes against: never cache them
        if not self.fills.candidates(image.id):
            return "no_tier"
        return None

    async def _serve_hit(
        self, request: web.Request, started: float, entry: Entry, fobj: IO[bytes]
    ) -> web.StreamResponse:
        try:
            rng = self._range(request, entry.size)
            if isinstance(rng, web.Response):
                return rng
            start, end = (rng.start, rng.end) if rng else (0, entry.size)
            inline = await _read_small(fobj, start, end)
            resp = self._response(entry.size, rng, entry.checksum, "HIT", "l1", inline)
            try:
                await self._begin(request, resp, "hit", started)
                if inline is None:
                    await _sendfile(request, fobj, start, end - start)
                self.metrics.served("l1").inc(end - start)
                request[SENT] = end - start
                await resp.write_eof()
            except ConnectionError:
                pass  # the caller went away; nothing of ours to clean
            return resp
        finally:
            fobj.close()

    async def _serve_fill(
        self, request: web.Request, started: float, fill: Fill, status: str, creds: Credentials
    ) -> web.StreamResponse:
        rng = self._range(request, fill.size)
        if isinstance(rng, web.Response):
            return rng
        start, end = (rng.start, rng.end) if rng else (0, fill.size)
        if status == "joined":
            self.metrics.coalesced.inc()
        async with fill.reader() as open_handle:
            if rng is not None and not _soon(fill, start):
                resp = await self._range_from_tiers(request, started, fill, rng, creds, status)
                if resp is not None:
                    return resp
            try:
                # An IntegrityError goes on to the error table (502), never to pass-through: the
                # bad bytes may have come from Glance's own cache, which would serve them again.
                await fill.ready(start)
            except NoRoom:
                return await self._bypass(request, "no_room")
            except StoreError:
                return await self._bypass(request, "store_error")
            except TiersBusy:
                return await self._bypass(request, "tiers_busy")  # Glance serves it at once
            except FillStopped:
                return await self._bypass(request, "deleted")  # Glance answers for its image
            except FillFailed:
                return await self._bypass(request, "tier_failed")
            fobj = open_handle()
            tier = "l1" if status == "hit" else fill.tier
            resp = self._response(fill.size, rng, fill.image.checksum, status.upper(), tier)
            try:
                await self._begin(request, resp, status, started)
                async for offset, count in fill.spans(start, end):
                    await _send(request, resp, fill, fobj, offset, count)
                    self.metrics.served(tier or "none").inc(count)
                    request[SENT] = offset + count - start
                await resp.write_eof()
            except FillBroken:
                _cut(request)  # never let a caller finish a body the fill could not vouch for
            except ConnectionError:
                pass  # the caller went away; the fill goes on for the next one
            return resp

    async def _begin(
        self, request: web.Request, resp: web.StreamResponse, status: str, started: float
    ) -> None:
        """Send the status line and headers (a caller already gone raises ConnectionError)."""
        await resp.prepare(request)
        self.metrics.request(status).inc()
        self.metrics.first_byte(status).observe(time.monotonic() - started)

    async def _range_from_tiers(
        self,
        request: web.Request,
        started: float,
        fill: Fill,
        rng: ByteRange,
        creds: Credentials,
        status: str,
    ) -> web.StreamResponse | None:
        """A range beyond the bytes landed, fetched from the first tier that honours Range."""
        for tier in self.fills.candidates(fill.image.id):
            try:
                # exact: a tier that would answer with the whole image says so (RangeNotSupported)
                # and the range is left to the fill instead.
                async with tier.open(fill.image, creds, rng.start, rng.end, exact=True) as body:
                    resp = self._response(
                        fill.size, rng, fill.image.checksum, status.upper(), tier.name
                    )
                    await self._relay_range(request, resp, body, rng, (status, started))
                    return resp
            except TierError as exc:  # before the headers: the next tier may answer
                log.info("range of %s from %s: %s", fill.image.id, tier.name, exc)
        return None

    async def _relay_range(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        body: Body,
        rng: ByteRange,
        begun: tuple[str, float],
    ) -> None:
        """The tier's bytes of ``rng`` to the caller; a tier that breaks off cuts the caller.

        Not a fill, so it takes no slot; its bytes still pay into the tier's ``max_rate``, as a
        caller's, so ranges (a lazy boot's reads) cannot take a tier past its limit."""
        sent, tier, caller = 0, resp.headers["X-Cachenode-Tier"], Ticket()
        try:
            await self._begin(request, resp, *begun)
            async for chunk in body.chunks():
                chunk = chunk[: rng.length - sent]
                await self.fills.limits.pay(tier, len(chunk), caller)
                await resp.write(chunk)
                sent += len(chunk)
                if sent == rng.length:
                    break
            if sent == rng.length:
                await resp.write_eof()
        except TierError:
            pass  # headers are out: the cut below is the only honest signal left
        except ConnectionError:
            return  # the caller went away
        finally:
            self.metrics.served(tier).inc(sent)
            request[SENT] = sent
        if sent < rng.length:
            _cut(request)

    async def _bypass(self, request: web.Request, reason: str) -> web.StreamResponse:
        self.metrics.passthrough.labels(reason).inc()
        self.metrics.request("bypass").inc()
        return await self.proxy.forward(request, {"X-Cachenode-Status": "BYPASS"})

    async def _evict_if_gone(self, image_id: str) -> None:
        """Glance says 404 to this caller: if the image is gone for everyone, drop it from L1.

        A 404 may only mean "not yours"; the service credentials tell which. Without them the
        entry stays (and is never served to a caller Glance refuses) until the policy evicts it.
        """
        if self.service_identity is None:
            return
        try:
            creds = await self.service_identity.credentials()
            image = await self.glance.image(image_id, creds)
        except GlanceRefused as exc:
            if exc.status != 404:
                return
        except GlanceUnavailable:
            return
        else:
            if image.status in ("active", "deactivated"):
                return
        await self.local.evict(image_id, "deleted")
        self.authz.forget(image_id)

    def _range(self, request: web.Request, size: int) -> ByteRange | web.Response | None:
        if "Range" not in request.headers:
            return None
        try:
            return resolve(parse_range(request.headers["Range"]), size)
        except ValueError:  # Unsatisfiable too
            # Glance answers a malformed range with 416 too.
            self.metrics.request("error").inc()
            return _error(
                416, "invalid or unsatisfiable Range", {"Content-Range": f"bytes */{size}"}
            )

    @staticmethod
    def _response(
        size: int,
        rng: ByteRange | None,
        checksum: str | None,
        status: str,
        tier: str | None,
        body: bytes | None = None,
    ) -> web.StreamResponse:
        """The answer's status and headers; with ``body``, the whole answer in one write.

        The headers are made in one list, in the order they go out, then given to the response
        whole: one by one through its properties cost a hit more than the rest of its answer."""
        headers = [] if body is not None else [("Content-Length", str(rng.length if rng else size))]
        headers.append(("Content-Type", "application/octet-stream"))
        if rng is not None:
            headers.append(("Content-Range", rng.content_range(size)))
        if checksum:
            headers.append(("Content-MD5", checksum))
        headers += (("Accept-Ranges", "bytes"), ("X-Cachenode-Status", status),
                    ("X-Cachenode-Tier", tier or "none"))  # fmt: skip
        if body is not None:
            return web.Response(status=206 if rng else 200, body=body, headers=headers)
        return web.StreamResponse(status=206 if rng else 200, headers=headers)

    @web.middleware
    async def _frame(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every data-plane request: its ids, for the Glance calls made for it and for its
        response's ``X-Openstack-Request-Id`` (``cachenode.correlation`` says which id and why);
        our errors as statuses (``error_response``); for an image download, one access log line
        (``_access``).

        One middleware rather than three: aiohttp wraps each in two coroutine frames, and a
        hit is short enough that the wrapping showed in its profile."""
        download = request.method == "GET" and request.path.endswith("/file")
        started = time.monotonic()
        ids = correlation.Correlation(correlation.only_valid(request.headers))
        request[IDS] = ids
        token = correlation.CURRENT.set(ids)
        try:
            resp = await handler(request)
        except CachenodeError as exc:
            self.metrics.request("denied" if isinstance(exc, GlanceRefused) else "error").inc()
            resp = error_response(exc)
        finally:
            correlation.CURRENT.reset(token)
        if not resp.prepared:
            await _stamp(request, resp)  # a Response returned whole, prepared after this
        if download:
            _access(request, resp, ids, started)
        return resp


def _access(
    request: web.Request,
    resp: web.StreamResponse,
    ids: correlation.Correlation,
    started: float,
) -> None:
    """One log line per image download. Of the headers, only the request ids, validated
    (``cachenode.correlation``): tokens and anything a caller could forge stay out of logs.

    A record made and handed to the logger as ``Logger.info`` would, filters, handlers and
    levels all applying, without its search of the stack for the caller (a tenth of a hit's
    log line): the caller is always this function."""
    if not access.isEnabledFor(logging.INFO):
        return
    response_id = resp.headers.get(correlation.HEADER)
    args = (
        request.raw_path,  # as sent, percent-encoding and all: one request, one line
        resp.status,
        resp.headers.get("X-Cachenode-Status", "-"),
        resp.headers.get("X-Cachenode-Tier", "-"),
        request.get(SENT, resp.body_length),
        time.monotonic() - started,
        response_id if correlation.valid(response_id) else "-",  # a relayed one may be junk
        ids.caller or "-",
    )
    frame = sys._getframe()
    access.handle(
        access.makeRecord(access.name, logging.INFO, frame.f_code.co_filename, frame.f_lineno,
                          _ACCESS_LINE, args, None, frame.f_code.co_name)
    )  # fmt: skip


_ACCESS_LINE = "GET %s %d %s %s %d bytes %.3fs %s global %s"


# The request headers a cached answer depends on, and those Glance reads by other spellings:
# uWSGI hands Glance "X_Auth_Token" as X-Auth-Token (both become HTTP_X_AUTH_TOKEN).
_DECIDING = frozenset(("x-auth-token", "x-service-token", "range", "content-range"))


def bypass_reason(image_id: str, headers: CIMultiDictProxy[str]) -> str | None:
    """Why a download goes straight to Glance before the cache looks at it, or None.

    Each reason is a request whose answer the cache could not give exactly as Glance would, so
    Glance answers it: an id that is not canonical; the old ``Content-Range`` on a request (Glance
    still honours it); several ranges, in one header or several (Glance joins repeated headers
    and refuses the list with 400); a credential or range header spelled with underscores, or a
    credential header sent twice (which token would Glance judge, which would a tier be shown?).
    """
    if not is_image_id(image_id) or "Content-Range" in headers:
        return "not_cacheable"
    # An underscore in a name is rare: the names are looked at one by one only when there is one.
    if "_" in "".join(headers) and any(
        "_" in name and name.lower().replace("_", "-") in _DECIDING for name in headers
    ):
        return "ambiguous_headers"
    ranges = headers.getall("Range", ())
    if len(ranges) > 1 or (ranges and "," in ranges[0]):
        return "multi_range"
    for name in CREDENTIAL_HEADERS:
        if len(headers.getall(name, ())) > 1:
            return "repeated_credentials"
    return None


class UnparsableRequests(logging.Filter):
    """aiohttp logs a request it cannot parse with an ERROR, a traceback and the offending
    bytes, which may be a caller's token: keep the fact (one INFO line, the error's type),
    drop the bytes, and give a caller who floods the sidecar with junk no tracebacks to write."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = "unparsable request refused: %s", (type(exc).__name__,)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


async def _stamp(request: web.Request, resp: web.StreamResponse) -> None:
    """Give a response exactly one request id: one relayed from Glance keeps Glance's."""
    ids = request.get(IDS)
    if ids is not None and correlation.HEADER not in resp.headers:
        resp.headers[correlation.HEADER] = ids.for_response(resp.headers.get("X-Cachenode-Status"))


def error_response(exc: CachenodeError) -> web.Response:
    """Our exception as the caller sees it: Glance's own answers relayed as they came (status,
    headers, body), everything else by the one table (``errors.http_status``) as a JSON body
    shaped like Glance's."""
    if isinstance(exc, GlanceRefused | GlanceUnavailable) and exc.status is not None:
        return web.Response(status=exc.status, headers=exc.headers, body=exc.body)
    status, message = http_status(exc)
    return _error(status, message)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(status, message), status=status, headers=headers)


async def _send(
    request: web.Request,
    resp: web.StreamResponse,
    fill: Fill,
    fobj: IO[bytes],
    offset: int,
    count: int,
) -> None:
    """Bytes [offset, offset + count) of a fill: from memory while the fill still holds them
    (``cachenode.recent``), from its file otherwise."""
    end = offset + count
    while offset < end:
        held = fill.recent.get(offset, end) if fill.recent is not None else None
        if held is None:
            await _sendfile(request, fobj, offset, end - offset)
            return
        await resp.write(held)
        offset += len(held)


async def _sendfile(request: web.Request, fobj: IO[bytes], offset: int, count: int) -> None:
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the caller went away")
    await sendfile.send(transport, fobj, offset, count)


async def _read_small(fobj: IO[bytes], start: int, end: int) -> bytes | None:
    """Bytes [start, end) of a blob when there are at most INLINE_BYTES of them, else None.

    A small range (QEMU's 4-64 KiB reads of a lazily booted image, format probes) costs more in
    ``loop.sendfile``'s set-up (a writer registered and removed, a second write for the headers)
    than in its bytes: it goes out with its headers in one write instead. Read on the loop only
    when the page cache has it all (``RWF_NOWAIT``); a read that would wait for the disk (a blob
    a fill wrote around the page cache, or one the host's memory let go) goes to a thread, so
    one caller's cold read never stalls every other caller's hit.
    """
    if end - start > INLINE_BYTES:
        return None
    fd, count = fobj.fileno(), end - start
    data = _read_cached(fd, count, start)
    if data is None:
        data = await asyncio.get_running_loop().run_in_executor(
            _COLD_READS, os.pread, fd, count, start
        )
    if len(data) != count:
        raise StoreError(f"blob {fobj.name} ends before byte {end}")  # verified size: never
    return data


def _read_cached(fd: int, count: int, offset: int) -> bytes | None:
    """The bytes if the page cache holds all of them, else None (read them off the loop)."""
    buffer = bytearray(count)
    try:
        got = os.preadv(fd, [buffer], offset, os.RWF_NOWAIT)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL):
            return None  # not cached, or a filesystem without RWF_NOWAIT: the thread reads it
        raise StoreError(f"cannot read a blob: {exc.strerror}") from exc
    return bytes(buffer) if got == count else None


def _soon(fill: Fill, start: int) -> bool:
    """Whether a range starting at ``start`` waits for the fill rather than asking a tier.

    Bytes the fill has, or will have within NEAR, come from it: a range fetched from a tier at
    the fill's front would ask the origin again for bytes already on their way (a host's 1-byte
    authorization probe at a regional cachenode, QEMU's first reads of a booting image). A range
    further on is fetched at once (a lazy boot's random read must not wait for the whole prefix).
    """
    return fill.done or start < fill.landed + NEAR


def _background(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """A task whose failure, if nobody awaits it, is dropped instead of logged as unretrieved."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


def _cut(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()

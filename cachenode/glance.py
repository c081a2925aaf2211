"""What cachenode asks glance.url: may this caller download this image, and what is the image.

Every call carries the caller's own credentials (and, on the probe and record calls, its request
id when well formed: ``cachenode.correlation``); Glance's refusals come back as GlanceRefused with
Glance's status, headers and body, to be relayed unchanged. No call follows a redirect: it would
hand the credentials to whatever the Location names. aiohttp's exceptions are translated here and
nowhere else.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

from cachenode import correlation
from cachenode.authz import PROBE_BODY_LIMIT, ProbeAnswer, Verdict, judge_probe
from cachenode.errors import GlanceRefused, GlanceUnavailable, ProbeUndecided

CREDENTIAL_HEADERS = ("X-Auth-Token", "X-Service-Token")
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Connection",
    )
)
# Glance's canonical image id; only these are cached (they also make safe file names).
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Glance's own image attributes; everything else in an image record is a user property.
_CORE_FIELDS = frozenset(
    (
        "id",
        "name",
        "status",
        "visibility",
        "protected",
        "checksum",
        "os_hash_algo",
        "os_hash_value",
        "size",
        "virtual_size",
        "container_format",
        "disk_format",
        "owner",
        "min_disk",
        "min_ram",
        "created_at",
        "updated_at",
        "tags",
        "self",
        "file",
        "schema",
        "locations",
        "direct_url",
        "os_hidden",
        "stores",
    )
)


def is_image_id(value: str) -> bool:
    """Whole-string match: ``$`` would also accept a trailing newline (a forged log line)."""
    return _UUID.fullmatch(value) is not None


@dataclass(frozen=True)
class Credentials:
    """The caller's own token headers; never logged (repr hides them), never stored.

    Every value is kept, repeats included: Glance must judge exactly what the caller sent (a
    server may join two X-Auth-Token headers into one value that no token matches).
    """

    headers: tuple[tuple[str, str], ...] = field(repr=False)

    @classmethod
    def from_headers(cls, headers: MultiMapping[str]) -> Credentials:
        return cls(tuple((h, v) for h in CREDENTIAL_HEADERS for v in headers.getall(h, [])))

    def header_map(self) -> CIMultiDict[str]:
        return CIMultiDict(self.headers)

    @classmethod
    def token(cls, token: str) -> Credentials:
        return cls((("X-Auth-Token", token),))

    def digest(self, key: bytes) -> bytes:
        """A keyed digest that names these credentials in memory without holding them."""
        # BLAKE2b in its keyed mode (a MAC by design, RFC 7693), 256 bits: as strong a name as
        # HMAC-SHA256, at half its cost, and every download pays for one.
        message = b"".join(
            name.encode() + b"\0" + value.encode("utf-8", "surrogateescape") + b"\0"
            for name, value in self.headers
        )
        return hashlib.blake2b(message, key=key, digest_size=32).digest()

    def __bool__(self) -> bool:
        return bool(self.headers)

    @property
    def well_formed(self) -> bool:
        """OpenStack tokens are ASCII (Keystone's are base64url). Header bytes beyond ASCII
        cannot be passed on to Glance unchanged by this HTTP stack, so such credentials are
        refused here rather than forwarded altered."""
        return all(value.isascii() for _, value in self.headers)


# An image has a handful of locations; a body longer than this is not Glance's answer.
LOCATIONS_BODY_LIMIT = 64 * 1024


def parse_locations(body: bytes) -> tuple[str, ...]:
    """The URLs of a locations answer (``[{"url": ..., "metadata": {...}}, ...]``), in Glance's
    order, repeats dropped. ValueError (why, never the body: a URL may hold credentials) for
    anything else."""
    if len(body) > LOCATIONS_BODY_LIMIT:
        raise ValueError("longer than any list of locations")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("not JSON") from None
    if not isinstance(doc, list) or not all(isinstance(loc, dict) for loc in doc):
        raise ValueError("not a list of locations")
    urls = [loc.get("url") for loc in doc]
    if not all(isinstance(url, str) and url for url in urls):
        raise ValueError("a location without a URL")
    return tuple(dict.fromkeys(urls))


@dataclass(frozen=True)
class ImageInfo:
    """The parts of Glance's image record that the cache needs."""

    id: str
    status: str
    size: int | None
    checksum: str | None
    hash_algo: str | None
    hash_value: str | None
    tags: tuple[str, ...] = ()
    properties: dict[str, str] = field(default_factory=dict)
    locations: tuple[str, ...] = ()
    name: str | None = None  # for people (the CLI's progress bars), never for a decision

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ImageInfo:
        urls = [loc.get("url") for loc in doc.get("locations") or () if isinstance(loc, dict)]
        if doc.get("direct_url"):
            urls.append(doc["direct_url"])
        return cls(
            id=str(doc["id"]),
            status=str(doc.get("status")),
            size=doc.get("size") if isinstance(doc.get("size"), int) else None,
            checksum=doc.get("checksum") or None,
            hash_algo=doc.get("os_hash_algo") or None,
            hash_value=doc.get("os_hash_value") or None,
            tags=tuple(str(t) for t in doc.get("tags") or ()),
            properties={
                k: str(v) for k, v in doc.items() if k not in _CORE_FIELDS and v is not None
            },
            locations=tuple(dict.fromkeys(u for u in urls if isinstance(u, str))),
            name=str(doc["name"]) if doc.get("name") else None,
        )

    def verifier(self) -> tuple[str, str] | None:
        """(hash algorithm, expected hex digest): os_hash first, md5 checksum as a fallback."""
        if self.hash_algo and self.hash_value and self.hash_algo in hashlib.algorithms_available:
            return self.hash_algo, self.hash_value.lower()
        if self.checksum:
            return "md5", self.checksum.lower()
        return None


def relay_headers(headers: CIMultiDictProxy[str] | Mapping[str, str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
            out.add(name, value)
    return out


T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Concurrent calls with the same key share one execution and its outcome.

    A herd of boots asks Glance the same question (same token, same image) at the same instant;
    it is asked once. Each waiter is shielded: one caller going away does not cancel the call the
    others wait for.
    """

    def __init__(self) -> None:
        self._calls: dict[Hashable, asyncio.Future[T]] = {}

    async def run(self, key: Hashable, call: Callable[[], Awaitable[T]]) -> T:
        future = self._calls.get(key)
        if future is None:
            future = asyncio.ensure_future(call())
            self._calls[key] = future
            future.add_done_callback(lambda f: self._finished(key, f))
        return await asyncio.shield(future)

    def _finished(self, key: Hashable, future: asyncio.Future[T]) -> None:
        self._calls.pop(key, None)
        if not future.cancelled():
            future.exception()  # retrieved here, so that no waiter left means no warning


class GlanceClient:
    # Sizes of active images from records read; an image's data never changes once it is active.
    MAX_SIZES = 100_000

    def __init__(self, session: aiohttp.ClientSession, url: str, timeout: float) -> None:
        self.session = session
        self.url = url
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._key = secrets.token_bytes(32)
        self._probes: SingleFlight[Verdict] = SingleFlight()
        self._images: SingleFlight[ImageInfo] = SingleFlight()
        self._sizes: OrderedDict[str, int] = OrderedDict()

    async def probe(self, image_id: str, creds: Credentials) -> Verdict:
        """Whether ``creds`` may download the image (see ``_probe``); identical calls coalesce."""
        key = (creds.digest(self._key), image_id)
        return await self._probes.run(key, lambda: self._probe(image_id, creds))

    async def image(self, image_id: str, creds: Credentials) -> ImageInfo:
        """The image record as the caller sees it; identical concurrent calls coalesce."""
        key = (creds.digest(self._key), image_id)
        return await self._images.run(key, lambda: self._image(image_id, creds))

    async def _probe(self, image_id: str, creds: Credentials) -> Verdict:
        """Ask Glance whether ``creds`` may download the image, without downloading it.

        A one-byte ranged GET of the image file goes through the same checks as a download
        (``download_image`` policy, deactivation, visibility) and costs Glance one byte; the
        metadata call (GET /v2/images/ID) would let a reader-only token through. What the answer
        means is ``judge_probe``'s to say; this method only asks and translates.

        Returns GRANTED (allowed, with data to cache) or GRANTED_NO_DATA; raises GlanceRefused
        (relay it), ProbeUndecided (pass the download through) or GlanceUnavailable (Glance
        cannot be reached: the connection was never made, or nothing came back in time). A
        connection that was made and then dropped or answered garbage is not "Glance is down":
        glance-api under uWSGI drops a ranged GET of an image that has no data, where the
        caller's own GET gets Glance's 204.
        """
        url = f"{self.url}/v2/images/{image_id}/file"
        headers = creds.header_map()
        headers.update(correlation.outbound())  # the caller's request id, if well formed
        headers["Range"] = "bytes=0-0"
        headers["Accept-Encoding"] = "identity"  # Glance's sentences, not a compressed page
        try:
            async with self.session.get(
                url, headers=headers, timeout=self.timeout, allow_redirects=False
            ) as resp:
                correlation.note("probe", resp.headers)
                answer = ProbeAnswer(resp.status, resp.headers, await _small_body(resp))
        except (TimeoutError, aiohttp.ClientConnectorError) as exc:
            raise GlanceUnavailable(f"glance at {self.url}: {type(exc).__name__}") from exc
        except aiohttp.ClientError as exc:
            raise ProbeUndecided(f"no usable answer: {type(exc).__name__}", failing=True) from exc
        size = self._sizes.get(image_id)
        if answer.status == 200 and size is None:
            size = await self._size(image_id, creds)
        verdict = judge_probe(answer, size)
        if verdict is Verdict.REFUSED:
            raise GlanceRefused(answer.status, relay_headers(answer.headers), answer.body or b"")
        if verdict in (Verdict.UNDECIDED, Verdict.FAILED):
            raise ProbeUndecided(
                f"glance answered the probe {answer.status}", failing=verdict is Verdict.FAILED
            )
        return verdict

    async def _size(self, image_id: str, creds: Credentials) -> int | None:
        """The record's size, which a 200 must match to be believed; None if it cannot be had.
        The data plane usually asks for this record at the same moment: the call is shared."""
        try:
            return (await self.image(image_id, creds)).size
        except (GlanceRefused, GlanceUnavailable):
            return None

    async def _image(self, image_id: str, creds: Credentials) -> ImageInfo:
        url = f"{self.url}/v2/images/{image_id}"
        headers = creds.header_map()
        headers.update(correlation.outbound())  # the caller's request id, if well formed
        try:
            async with self.session.get(
                url, headers=headers, timeout=self.timeout, allow_redirects=False
            ) as resp:
                correlation.note("record", resp.headers)
                body = await resp.read()
                if resp.status != 200:
                    raise self._refusal(resp, body)
                try:
                    image = ImageInfo.from_json(await resp.json(content_type=None))
                except (ValueError, KeyError, TypeError) as exc:
                    raise GlanceUnavailable(
                        f"glance sent an unreadable image record: {exc}"
                    ) from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise GlanceUnavailable(f"glance at {self.url}: {type(exc).__name__}") from exc
        self._learn(image)
        return image

    def _learn(self, image: ImageInfo) -> None:
        if image.status == "active" and image.size is not None:
            self._sizes[image.id] = image.size
            self._sizes.move_to_end(image.id)
            while len(self._sizes) > self.MAX_SIZES:
                self._sizes.popitem(last=False)

    async def images(self, creds: Credentials, filters: Mapping[str, str]) -> list[ImageInfo]:
        """Every image the credentials see that matches ``filters`` (``tag``, a property, ...),
        following Glance's pages."""
        found: list[ImageInfo] = []
        path: str | None = "/v2/images"
        params: dict[str, str] | None = {**filters, "limit": "200"}
        try:
            headers = creds.header_map()
            while path:
                url = self.url + path
                async with self.session.get(url, params=params, headers=headers,
                                            timeout=self.timeout,
                                            allow_redirects=False) as resp:  # fmt: skip
                    body = await resp.read()
                    if resp.status != 200:
                        raise self._refusal(resp, body)
                    page = await resp.json(content_type=None)
                found.extend(ImageInfo.from_json(doc) for doc in page.get("images", []))
                path, params = page.get("next"), None  # "next" carries the filters and marker
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise GlanceUnavailable(f"glance at {self.url}: {type(exc).__name__}") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise GlanceUnavailable(f"glance sent an unreadable image list: {exc}") from exc
        for image in found:
            self._learn(image)
        return found

    async def locations(self, image_id: str, creds: Credentials) -> tuple[str, ...]:
        """Where Glance keeps the image's data (``GET /v2/images/ID/locations``, Glance's API for
        services: it wants the service role, and an identity that can see the image).

        Only a 200 whose body ``parse_locations`` accepts is an answer; a refusal is
        GlanceRefused, anything else (a redirect, 5xx, an unreadable or oversized body, no
        answer) GlanceUnavailable.
        """
        url = f"{self.url}/v2/images/{image_id}/locations"
        headers = creds.header_map()
        headers["Accept-Encoding"] = "identity"
        try:
            async with self.session.get(
                url, headers=headers, timeout=self.timeout, allow_redirects=False
            ) as resp:
                body = await _read_at_most(resp, LOCATIONS_BODY_LIMIT + 1)
                if resp.status != 200:
                    raise self._refusal(resp, body)
                return parse_locations(body)
        except ValueError as exc:
            raise GlanceUnavailable(f"glance sent unreadable locations: {exc}") from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise GlanceUnavailable(f"glance at {self.url}: {type(exc).__name__}") from exc

    @staticmethod
    def _refusal(resp: aiohttp.ClientResponse, body: bytes) -> Exception:
        if 300 <= resp.status < 400:
            # Not followed, and not relayed either: the caller asked for an image, not for a
            # place to send its token.
            return GlanceUnavailable(f"glance answered {resp.status}, a redirect (not followed)")
        if resp.status >= 500:
            return GlanceUnavailable(
                f"glance answered {resp.status}", resp.status, relay_headers(resp.headers), body
            )
        return GlanceRefused(resp.status, relay_headers(resp.headers), body)


async def _read_at_most(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or its first ``limit`` bytes when it is longer (the connection then closed)."""
    body = bytearray()
    while len(body) < limit and (piece := await resp.content.read(limit - len(body))):
        body += piece
    if len(body) >= limit:
        resp.close()
    return bytes(body)


async def _small_body(resp: aiohttp.ClientResponse) -> bytes | None:
    """The body if it is small, read whole so the connection goes back to the pool; None (and the
    connection closed) when it is large: a 200 is the whole image, and no answer the probe's
    decision believes is longer than PROBE_BODY_LIMIT."""
    declared = resp.content_length
    if (declared is not None and declared > PROBE_BODY_LIMIT) or (
        declared is None and resp.status == 200
    ):
        resp.close()
        return None
    body = bytearray()
    while len(body) <= PROBE_BODY_LIMIT:
        piece = await resp.content.read(PROBE_BODY_LIMIT + 1 - len(body))
        if not piece:
            return bytes(body)
        body += piece
    resp.close()
    return None

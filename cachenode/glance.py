"""What cachenode asks glance.url: may this caller download this image, and what is the image.

Every call carries the caller's own credentials; Glance's refusals come back as GlanceRefused with
Glance's status, headers and body, to be relayed unchanged. aiohttp's exceptions are translated here
and nowhere else.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from cachenode.errors import GlanceRefused, GlanceUnavailable

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
    """The caller's own token headers; never logged (repr hides them), never stored."""

    headers: tuple[tuple[str, str], ...] = field(repr=False)

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Credentials:
        return cls(tuple((h, headers[h]) for h in CREDENTIAL_HEADERS if h in headers))

    @classmethod
    def token(cls, token: str) -> Credentials:
        return cls((("X-Auth-Token", token),))

    def digest(self, key: bytes) -> bytes:
        """A keyed digest that names these credentials in memory without holding them."""
        mac = hmac.new(key, digestmod=hashlib.sha256)
        for name, value in self.headers:
            mac.update(name.encode() + b"\0" + value.encode("utf-8", "surrogateescape") + b"\0")
        return mac.digest()

    def __bool__(self) -> bool:
        return bool(self.headers)

    @property
    def well_formed(self) -> bool:
        """OpenStack tokens are ASCII (Keystone's are base64url). Header bytes beyond ASCII
        cannot be passed on to Glance unchanged by this HTTP stack, so such credentials are
        refused here rather than forwarded altered."""
        return all(value.isascii() for _, value in self.headers)


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
    def __init__(self, session: aiohttp.ClientSession, url: str, timeout: float) -> None:
        self.session = session
        self.url = url
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._key = secrets.token_bytes(32)
        self._probes: SingleFlight[bool] = SingleFlight()
        self._images: SingleFlight[ImageInfo] = SingleFlight()

    async def probe(self, image_id: str, creds: Credentials) -> bool:
        """Whether ``creds`` may download the image (see ``_probe``); identical calls coalesce."""
        key = (creds.digest(self._key), image_id)
        return await self._probes.run(key, lambda: self._probe(image_id, creds))

    async def image(self, image_id: str, creds: Credentials) -> ImageInfo:
        """The image record as the caller sees it; identical concurrent calls coalesce."""
        key = (creds.digest(self._key), image_id)
        return await self._images.run(key, lambda: self._image(image_id, creds))

    async def _probe(self, image_id: str, creds: Credentials) -> bool:
        """Ask Glance whether ``creds`` may download the image, without downloading it.

        A one-byte ranged GET of the image file goes through the same checks as a download
        (``download_image`` policy, deactivation, visibility) and costs Glance one byte; the
        metadata call (GET /v2/images/ID) would let a reader-only token through. Glance refuses
        Range on stores without random access (Swift) with 400, but only after the caller was
        authorized, so that 400 means yes. True: allowed, with data to cache; False: allowed, but
        the image has no data (204) or is empty (416). A refusal raises GlanceRefused.
        """
        url = f"{self.url}/v2/images/{image_id}/file"
        headers = {**dict(creds.headers), "Range": "bytes=0-0"}
        try:
            async with self.session.get(url, headers=headers, timeout=self.timeout) as resp:
                if resp.status in (200, 206, 400):
                    resp.close()  # never read: a 200 would be the whole image
                    return True
                if resp.status in (204, 416):
                    return False
                body = await resp.read()
                raise self._refusal(resp, body)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise GlanceUnavailable(f"glance at {self.url}: {type(exc).__name__}") from exc

    async def _image(self, image_id: str, creds: Credentials) -> ImageInfo:
        url = f"{self.url}/v2/images/{image_id}"
        try:
            async with self.session.get(
                url, headers=dict(creds.headers), timeout=self.timeout
            ) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise self._refusal(resp, body)
                try:
                    return ImageInfo.from_json(await resp.json(content_type=None))
                except (ValueError, KeyError, TypeError) as exc:
                    raise GlanceUnavailable(
                        f"glance sent an unreadable image record: {exc}"
                    ) from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise GlanceUnavailable(f"glance at {self.url}: {type(exc).__name__}") from exc

    async def images(self, creds: Credentials, filters: Mapping[str, str]) -> list[ImageInfo]:
        """Every image the credentials see that matches ``filters`` (``tag``, a property, ...),
        following Glance's pages."""
        found: list[ImageInfo] = []
        path: str | None = "/v2/images"
        params: dict[str, str] | None = {**filters, "limit": "200"}
        try:
            headers = dict(creds.headers)
            while path:
                url = self.url + path
                async with self.session.get(url, params=params, headers=headers,
                                            timeout=self.timeout) as resp:  # fmt: skip
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
        return found

    @staticmethod
    def _refusal(resp: aiohttp.ClientResponse, body: bytes) -> Exception:
        if resp.status >= 500:
            return GlanceUnavailable(
                f"glance answered {resp.status}", resp.status, relay_headers(resp.headers), body
            )
        return GlanceRefused(resp.status, relay_headers(resp.headers), body)

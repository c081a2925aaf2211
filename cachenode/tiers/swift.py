"""Tier kind ``swift``: the object store Glance keeps the image in, read directly.

The object is the one named by the first Swift location of Glance's record (``locations``, then
``direct_url``), read under the configured account URL and nowhere else. Clouds hide locations
from users; with ``locations: api`` the tier then asks Glance's locations API with the sidecar's
own identity (``cachenode.locations``). A record that names no Swift location, and no answer
from that API, is read as glance_store's single-tenant driver lays it out,
``<container>/<image id>``. Images Glance wrote as segments are
read through their manifest like any object (its ETag is not the image's md5; the fill checks
os_hash_value).

A location is followed only when the object it names is beyond doubt the one Glance reads, in
this account. Refused, never followed (the tier then has nothing for the image: ``BadLocation``,
counted as ``tier_failures_total{kind="bad_location"}``, and the next tier or Glance serves it):

- a path segment that is empty, ``.`` or ``..``, or holds ``/``, ``\\``, ``%`` or a control
  character. glance_store takes segments literally (``%2f`` is three characters to it) while
  every URL library decodes them, so a ``%`` is refused rather than guessed at; names
  glance_store writes (the container, the image id) never hold one;
- ``swift+config://REF/container/object`` with more or fewer than two segments (REF is an
  account of Glance's own configuration, taken to be the tier's account);
- a location with credentials in it (``swift+https://user:key@auth/...``, written by the
  deprecated single-account options): they open whatever account they belong to, which cannot
  be checked against the tier's;
- any other location whose host and account path are not exactly the tier's (a multi-tenant
  store keeps images in each project's account);
- anything with a query, a fragment, a second scheme, or control characters.

The record is not second-guessed when a location is refused: ``<container>/<image id>`` is
then not provably what Glance serves, so it is not read instead.

Every segment is quoted whole (``quote(..., safe="")``) in the URL, and a TempURL is signed over
the decoded form of exactly that path, which is what Swift's tempurl middleware checks.
Authentication is a TempURL signed with the account's key (HMAC-SHA256, valid ``temp_url_ttl``)
or a service token; either file is re-read when it changes, so it can be rotated without a
restart. Neither the key, nor a token, nor a signed URL, nor a location (it may hold
credentials) is ever logged: errors name statuses and reasons.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
import unicodedata
from pathlib import Path
from typing import Protocol
from urllib.parse import SplitResult, quote, unquote, urlsplit

from cachenode.config import TierConfig
from cachenode.errors import BadLocation, TierUnavailable
from cachenode.glance import Credentials, ImageInfo
from cachenode.tiers.http import HttpSource

_SCHEMES = ("swift", "swift+http", "swift+https", "swift+config")
_DEFAULT_PORTS = {"swift": 443, "swift+https": 443, "swift+http": 80, "https": 443, "http": 80}


def segment(name: str) -> str:
    """``name``, when it is one whole path segment that no URL layer can reinterpret.

    Raises ValueError saying why not (never quoting the name: it may come from a location).
    """
    if name in ("", ".", ".."):
        raise ValueError("an empty, '.' or '..' segment")
    for char in name:
        if char in "/\\%":
            raise ValueError(f"a segment with {char!r}")
        if _control(char):
            raise ValueError("a segment with a control character")
    return name


def _control(char: str) -> bool:
    category = unicodedata.category(char)
    return category[0] == "C" or category in ("Zl", "Zp")


def object_in(location: str, account: str) -> tuple[str, str] | None:
    """(container, object) a glance_store location names in the account at URL ``account``.

    None when it is not a Swift location at all; ValueError (why) when it is one that must not
    be followed (see the module's docstring).
    """
    if location.strip().partition("://")[0].lower() not in _SCHEMES:
        return None
    if location != location.strip() or any(_control(c) for c in location):
        raise ValueError("spaces around it or control characters in it")
    if location.count("://") != 1 or "?" in location or "#" in location:
        raise ValueError("a second scheme, a query or a fragment")
    parts, port = _split(location)
    if "@" in parts.netloc:
        raise ValueError("credentials of its own: an account the tier cannot check")
    if not parts.path.startswith("/"):
        raise ValueError("no container and object")
    names = [segment(raw) for raw in parts.path[1:].split("/")]
    if len(names) < 2:
        raise ValueError("no container and object")
    if parts.scheme == "swift+config":
        if len(names) != 2 or not parts.netloc:
            raise ValueError("not swift+config://REF/container/object")
    else:
        home, home_port = _split(account)
        home_path = [p for p in home.path.split("/") if p]
        if (parts.hostname, port, names[:-2]) != (home.hostname, home_port, home_path):
            raise ValueError("another host or account")
    return names[-2], names[-1]


def _split(url: str) -> tuple[SplitResult, int | None]:
    """``url`` split, and its port (the scheme's default when it names none).

    Raises ValueError with a fixed message: urllib's would quote the URL, credentials and all.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("not a URL") from None
    return parts, _DEFAULT_PORTS.get(parts.scheme) if port is None else port


class Locations(Protocol):
    """Glance's locations API for one image (``cachenode.locations.Locator``)."""

    async def locations(self, image_id: str) -> tuple[str, ...]: ...

    def forget(self, image_id: str) -> None: ...


class FileSecret:
    """A credential kept in a file, read again whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._value = ""

    def value(self) -> str:
        st = os.stat(self.path)
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._value = self.path.read_text().strip()
            self._stamp = stamp
        return self._value

    def __repr__(self) -> str:
        return f"FileSecret({self.path}, ***)"


class SwiftTier(HttpSource):
    credentialed = True

    def __init__(self, config: TierConfig, locator: Locations | None = None) -> None:
        super().__init__(config)
        self._key = FileSecret(config.temp_url_key_file) if config.temp_url_key_file else None
        self._token = FileSecret(config.token_file) if config.token_file else None
        self.locator = locator if config.locations == "api" else None

    def object_of(
        self, image: ImageInfo, locations: tuple[str, ...] | None = None
    ) -> tuple[str, str]:
        """(container, object) to read for ``image``, from ``locations`` (the record's when
        None); ValueError (why) when there is none."""
        for location in image.locations if locations is None else locations:
            named = object_in(location, self.config.url)
            if named is not None:
                return named  # the first Swift location only: the one Glance reads first
        return segment(self.config.container), segment(image.id)

    async def locations_of(self, image: ImageInfo) -> tuple[str, ...]:
        """The record's locations; when it shows none, what Glance's locations API says (with
        ``locations: api``)."""
        if image.locations or self.locator is None:
            return image.locations
        return await self.locator.locations(image.id)

    def not_found(self, image: ImageInfo) -> None:
        """No object where the locations API said: forget its answer, so the next fill asks
        again (an image moved between containers or stores)."""
        if self.locator is not None:
            self.locator.forget(image.id)

    def signed(self, container: str, obj: str, now: float | None = None) -> str:
        """The object's URL, with a TempURL signature when the tier has a key."""
        account = self.config.url.rstrip("/")
        url = f"{account}/{quote(container, safe='')}/{quote(obj, safe='')}"
        if self._key is None:
            return url
        expires = int((now or time.time()) + self.config.temp_url_ttl)
        # Swift checks the signature against the path it decodes from the request.
        path = f"{unquote(urlsplit(account).path)}/{container}/{obj}"
        message = f"GET\n{expires}\n{path}".encode()
        signature = hmac.new(self._key.value().encode(), message, hashlib.sha256).hexdigest()
        return f"{url}?temp_url_sig={signature}&temp_url_expires={expires}"

    async def locate(
        self, image: ImageInfo, creds: Credentials | None
    ) -> tuple[str, dict[str, str]]:
        try:
            container, obj = self.object_of(image, await self.locations_of(image))
        except ValueError as exc:
            raise BadLocation(self.name, f"location refused: {exc}") from None
        try:
            headers = {"X-Auth-Token": self._token.value()} if self._token else {}
            return self.signed(container, obj), headers
        except OSError as exc:
            raise TierUnavailable(
                self.name, f"credentials unreadable: {exc.strerror}", kind="credentials"
            ) from None

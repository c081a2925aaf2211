"""Tier kind ``swift``: the object store Glance keeps the image in, read directly.

The object is the one Glance's record names (``locations``/``direct_url``: ``swift+config://ref/
container/object``, ``swift+http(s)://.../container/object``), else ``<container>/<image id>`` as
glance_store's single-tenant driver lays it out, always under the configured account URL: a
location never sends cachenode to another host. Images Glance wrote as segments are read through
their manifest like any object (its ETag is not the image's md5; the fill checks os_hash_value).

Authentication is a TempURL signed with the account's key (HMAC-SHA256, valid ``temp_url_ttl``)
or a service token; either file is re-read when it changes, so it can be rotated without a
restart. Neither the key, nor a token, nor a signed URL is ever logged: errors name statuses.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from cachenode.config import TierConfig
from cachenode.errors import TierUnavailable
from cachenode.glance import Credentials, ImageInfo
from cachenode.tiers.http import HttpSource

_SCHEMES = ("swift", "swift+http", "swift+https", "swift+config")


def object_in(location: str) -> tuple[str, str] | None:
    """(container, object) named by a glance_store swift location, or None."""
    parts = urlsplit(location)
    if parts.scheme not in _SCHEMES:
        return None
    names = [unquote(p) for p in parts.path.split("/") if p]
    if len(names) < 2:
        return None
    return names[-2], names[-1]


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

    def __init__(self, config: TierConfig) -> None:
        super().__init__(config)
        self._key = FileSecret(config.temp_url_key_file) if config.temp_url_key_file else None
        self._token = FileSecret(config.token_file) if config.token_file else None

    def object_path(self, image: ImageInfo) -> str:
        """The object's path under the account: ``/container/object``, unquoted."""
        for location in image.locations:
            if named := object_in(location):
                return f"/{named[0]}/{named[1]}"
        return f"/{self.config.container}/{image.id}"

    def signed(self, path: str, now: float | None = None) -> str:
        """The object's URL, with a TempURL signature when the tier has a key."""
        url = self.config.url + quote(path)
        if self._key is None:
            return url
        expires = int((now or time.time()) + self.config.temp_url_ttl)
        full_path = urlsplit(self.config.url).path + path
        message = f"GET\n{expires}\n{full_path}".encode()
        signature = hmac.new(self._key.value().encode(), message, hashlib.sha256).hexdigest()
        return f"{url}?temp_url_sig={signature}&temp_url_expires={expires}"

    def locate(self, image: ImageInfo, creds: Credentials | None) -> tuple[str, dict[str, str]]:
        try:
            headers = {"X-Auth-Token": self._token.value()} if self._token else {}
            return self.signed(self.object_path(image)), headers
        except OSError as exc:
            raise TierUnavailable(
                self.name, f"credentials unreadable: {exc.strerror}", kind="credentials"
            ) from None

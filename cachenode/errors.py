"""The exceptions of cachenode, each raised by exactly one layer.

Library exceptions (aiohttp, diskcache, OSError from the disk) are translated where the library is
used, ``raise ... from exc``, into the most specific of these::

    CachenodeError
     ├── ConfigError              a config or policy file is invalid (exit status 2)
     ├── GlanceRefused            Glance refused the caller: relayed to it unchanged
     ├── GlanceUnavailable        glance.url could not answer (connect, timeout, 5xx)
     ├── TierError                one tier could not deliver (fill fails over to the next)
     │    ├── TierUnavailable     connect error, timeout, 5xx
     │    ├── TierShortRead       the body ended or broke before the expected size
     │    ├── TierNotFound        404: the tier does not have the image
     │    │    └── BadLocation    Glance's record names the object where the tier will not go
     │    ├── TierDenied          401/403 from the tier
     │    └── RangeNotSupported   the tier cannot start at an offset
     ├── IntegrityError           the bytes do not match Glance's size or hash
     ├── FillFailed               no tier could deliver the image
     └── StoreError               the local disk failed (full, read-only, I/O error)

The HTTP layer maps them to statuses in one table (``cachenode.server``).
"""

from __future__ import annotations

from collections.abc import Mapping


class CachenodeError(Exception):
    """Base of every exception cachenode raises on purpose."""


class ConfigError(CachenodeError):
    """A configuration value is wrong; ``key`` names it as ``tiers[1].url``."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


class GlanceRefused(CachenodeError):
    """Glance answered the caller's own request with an error: relay it as is."""

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        super().__init__(f"glance answered {status}")
        self.status = status
        self.headers = dict(headers)
        self.body = body


class GlanceUnavailable(CachenodeError):
    """glance.url could not be asked (connection refused, timeout) or answered 5xx.

    When Glance did answer, its status, headers and body are kept to be relayed.
    """

    def __init__(
        self,
        detail: str,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.headers = dict(headers or {})
        self.body = body


class TierError(CachenodeError):
    """A tier could not deliver; ``kind`` is the low-cardinality label for metrics."""

    kind = "error"

    def __init__(self, tier: str, detail: str) -> None:
        super().__init__(f"tier {tier}: {detail}")
        self.tier = tier
        self.detail = detail


class TierUnavailable(TierError):
    kind = "unavailable"

    def __init__(self, tier: str, detail: str, kind: str = "unavailable") -> None:
        super().__init__(tier, detail)
        self.kind = kind


class TierShortRead(TierError):
    kind = "short_read"


class TierNotFound(TierError):
    kind = "not_found"


class BadLocation(TierNotFound):
    """The image's location is one the tier refuses to follow (out of its account, or a name a
    URL could reinterpret): for this image the tier has nothing, as if it answered 404."""

    kind = "bad_location"


class TierDenied(TierError):
    kind = "denied"


class RangeNotSupported(TierError):
    kind = "no_range"


class IntegrityError(CachenodeError):
    """The image's bytes do not match the size or hash Glance recorded."""

    def __init__(self, image_id: str, detail: str, tiers: tuple[str, ...]) -> None:
        super().__init__(f"image {image_id}: {detail}")
        self.image_id = image_id
        self.detail = detail
        self.tiers = tiers


class FillFailed(CachenodeError):
    """Every tier was tried and none delivered the whole image."""


class StoreError(CachenodeError):
    """The local disk could not take or give an entry."""

"""The exceptions of cachenode, each raised by exactly one layer.

Library exceptions (aiohttp, diskcache, OSError from the disk) are translated where the library is
used, ``raise ... from exc``, into the most specific of these::

    CachenodeError
     ├── ConfigError              a config or policy file is invalid (exit status 2)
     ├── AdminError               an admin API call is wrong (its own 4xx status)
     ├── GlanceRefused            Glance refused the caller: relayed to it unchanged
     ├── GlanceUnavailable        glance.url could not answer (connect, timeout, 5xx)
     │    └── ServiceAuthFailed   the sidecar has no valid token of its own (Keystone refused)
     ├── NoGlanceEndpoint         Keystone's catalog named no usable Glance endpoint (no start)
     ├── PassThroughFailed        a request passed to Glance got no usable answer (502)
     ├── BadRequest               a request the sidecar cannot pass on unchanged (400)
     ├── ProbeUndecided           the authorization probe got no answer that decides: pass through
     ├── TierError                one tier could not deliver (fill fails over to the next)
     │    ├── TierUnavailable     connect error, timeout, 5xx
     │    ├── TierShortRead       the body ended or broke before the expected size
     │    ├── TierNotFound        404: the tier does not have the image
     │    │    └── BadLocation    Glance's record names the object where the tier will not go
     │    ├── TierDenied          401/403 from the tier
     │    └── RangeNotSupported   the tier cannot start at an offset
     ├── IntegrityError           the bytes do not match Glance's size or hash
     ├── FillFailed               no tier could deliver the image
     │    ├── TiersBusy           every tier it may use is at max_fills: pass through
     │    └── FillStopped         the image was deleted in Glance while it was filled
     ├── FillBroken               a fill failed while a reader streamed it: cut the connection
     └── StoreError               the local disk failed (full, read-only, I/O error)
          └── NoRoom              the policy cannot make room for the image

Both listeners map them to statuses with one table, ``http_status`` below.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus


class CachenodeError(Exception):
    """Base of every exception cachenode raises on purpose."""


class ConfigError(CachenodeError):
    """A configuration value is wrong; ``key`` names it as ``tiers[1].url``."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


class AdminError(CachenodeError):
    """An admin API call the sidecar refuses, with its 4xx status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
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


class ServiceAuthFailed(GlanceUnavailable):
    """The sidecar's own identity could not get a token: Glance cannot be asked on its behalf."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)


class NoGlanceEndpoint(CachenodeError):
    """Without ``glance.url``, the start could not learn Glance's endpoint from Keystone's catalog.

    ``final``: asking again cannot help (Keystone refused the credentials, or the catalog's URL is
    not one the sidecar will use); otherwise (Keystone unreachable or failing, no such endpoint
    yet) the start asks again until ``glance.catalog_timeout``.
    """

    def __init__(self, detail: str, final: bool = False) -> None:
        super().__init__(detail)
        self.final = final


class ProbeUndecided(CachenodeError):
    """The probe's answer is neither Glance's grant nor Glance's refusal (see ``judge_probe``).

    The download is passed through, so the caller gets exactly what Glance (or the proxy in front
    of it) answers its own request. ``failing``: the answer suggests Glance or the path to it is
    failing (a 5xx, a connection dropped mid-answer), so a remembered decision may be used stale.
    """

    def __init__(self, detail: str, failing: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.failing = failing


class PassThroughFailed(CachenodeError):
    """A request passed through to Glance got no answer that can be relayed."""


class BadRequest(CachenodeError):
    """A request the sidecar cannot pass on unchanged (header bytes that are not UTF-8, ...)."""


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


class FillStopped(FillFailed):
    """The image's bytes must go while it was filled (deleted in Glance): nothing committed."""


class TiersBusy(FillFailed):
    """Every tier the fill may use is at ``max_fills`` and the fill may not wait for a slot."""


class FillBroken(CachenodeError):
    """The fill a reader streams from failed before its bytes verified; headers are out."""


class StoreError(CachenodeError):
    """The local disk could not take or give an entry."""


class NoRoom(StoreError):
    """The policy cannot make room for the image: it is passed through, evicting nothing."""


# The one table from our exceptions to HTTP statuses, for the data plane and the admin API alike:
# the first row whose class matches wins; a status of None means "the status the exception
# carries" (Glance's own answer, relayed; an admin error's 4xx).
_STATUSES: tuple[tuple[type[CachenodeError], int | None, str], ...] = (
    (AdminError, None, "Bad Request"),
    (GlanceRefused, None, "Glance refused the request"),
    (GlanceUnavailable, 503, "Glance cannot be reached to authorize this request"),
    (PassThroughFailed, 502, "cachenode could not reach Glance"),
    (BadRequest, 400, "cachenode cannot pass this request on unchanged"),
    (IntegrityError, 502, "the image's bytes did not match its hash; try again"),
    (FillFailed, 502, "no tier could deliver the image"),
    (TierError, 502, "no tier could deliver the image"),
    (FillBroken, 502, "the image's fill failed"),
    (StoreError, 503, "the local cache failed"),
    (ConfigError, 400, "invalid setting"),
)


def http_status(exc: CachenodeError) -> tuple[int, str]:
    """The HTTP status and a message for one of our exceptions."""
    for kind, status, message in _STATUSES:
        if isinstance(exc, kind):
            carried = getattr(exc, "status", None)
            if status is None or (isinstance(exc, GlanceUnavailable) and carried is not None):
                return int(carried or 500), str(exc) if isinstance(exc, AdminError) else message
            return status, message
    return 500, "cachenode failed"


def error_body(status: int, message: str) -> dict[str, dict[str, object]]:
    """The JSON body of every answer the sidecar gives instead of Glance, shaped like Glance's."""
    return {"error": {"code": status, "title": HTTPStatus(status).phrase, "message": message}}

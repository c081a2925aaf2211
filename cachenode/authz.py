"""Authorization: Glance decides, per caller and image, before any cached byte is sent.

Glance is asked with a probe (``GlanceClient.probe``: a one-byte ranged GET of the image file with
the caller's credentials); ``judge_probe`` turns its answer into a ``Verdict`` without any I/O.

A positive decision may be reused for ``authz.ttl`` per (credentials digest, image). Refusals are
never reused: a caller granted access a second later must not wait out a TTL; nor are undecided
probes, which are not decisions at all. With ``authz.stale_if_error`` a positive decision also
survives, for that long, a Glance that cannot be reached or is failing (5xx, dropped answers); the
handler uses such a stale decision for L1 hits only.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from multidict import MultiMapping

from cachenode.errors import GlanceRefused, GlanceUnavailable, ProbeUndecided
from cachenode.metrics import Metrics

if TYPE_CHECKING:
    from cachenode.glance import Credentials

# Bodies of probe answers are read up to this many bytes. Glance's own answers to the probe are a
# few hundred bytes at most (one image byte, or an error page); a longer body is none of them.
PROBE_BODY_LIMIT = 64 << 10

# What Glance says, word for word, once it has authorized the download (Glance 33, glance_store 5).
# A store without random access (Swift, HTTP) refuses the probe's Range in the response
# serializer, which runs only after the controller applied download_image, visibility and
# deactivation; the sentence names exactly the offset and length the probe asked.
NO_RANDOM_ACCESS = b"Getting images randomly from this store is not supported. Offset: 0, length: 1"
# The same serializer refuses any Range of an image of size 0 with this 416 (it has no byte 0).
EMPTY_IMAGE = (
    b"Invalid start position in Range header. "
    b"Start position MUST be in the inclusive range [0, -1]."
)
_CONTENT_RANGE = re.compile(r"bytes 0-0/([1-9][0-9]*)")
_OCTETS = "application/octet-stream"


class Verdict(Enum):
    """What one probe answer says about this caller and this image."""

    GRANTED = "granted"  # Glance allows the download, and the image has data to cache
    GRANTED_NO_DATA = "granted_no_data"  # Glance allows it, but there is nothing to cache
    REFUSED = "refused"  # Glance refused the caller: relay its answer unchanged
    UNDECIDED = "undecided"  # not Glance judging this caller: pass the download through
    FAILED = "failed"  # Glance or the path to it failed (5xx): pass through, or stale


@dataclass(frozen=True)
class ProbeAnswer:
    """The parts of the probe's response that the decision reads."""

    status: int
    headers: MultiMapping[str]
    body: bytes | None  # None: not read (a 200 of the image, or longer than PROBE_BODY_LIMIT)


def judge_probe(answer: ProbeAnswer, size: int | None = None) -> Verdict:
    """Whether ``answer`` is Glance granting this download; ``size``: the image record's size,
    when it is known.

    The probe asks for byte 0 and nothing else, so a grant has exactly one shape: a 206 of that
    one byte, ``Content-Range: bytes 0-0/<size>`` with size > 0 (the record's, when known). A
    front proxy's own page cannot take that shape, so a 206 needs no other mark (a proxy may drop
    Glance's headers; it cannot make up that byte). Glance's other positive answers are only
    believed when they carry Glance's own marks, ``x-openstack-request-id`` (which Glance's
    context middleware puts on every answer it makes, after the token was accepted) and the
    sentence Glance writes:

    - 400 with NO_RANDOM_ACCESS: the store cannot seek; raised after authorization. Any other 400
      (an oversized or malformed header, which nginx, HAProxy or Apache answer themselves with 400,
      413, 414 or 431, before Glance ever sees the token) decides nothing.
    - 204 with an empty body: the image has no data yet; 416 with EMPTY_IMAGE: its size is 0.
    - 200: a server that ignored the Range sent the whole image. Believed only when it is provably
      the image: ``application/octet-stream``, with Glance's request id, and a Content-Length
      equal to the record's size (so the size must be known). Glance's cache middleware streams
      without a length: that 200, like a maintenance page, is undecided.

    Refusals: 403 and 404 only with Glance's request id; a front proxy's own 403 (an ACL, a WAF)
    or 404 (no route) did not judge the token, and may have refused the probe for what it lacks
    (the caller's other headers), so the caller's own request must find out. A 401 comes from the
    identity middleware in front of Glance (keystonemiddleware), before any request id exists: it
    is relayed, unless it challenges for something other than a Keystone token (a proxy's own
    Basic or Negotiate authentication, which the probe cannot satisfy for the caller).

    A refusal is relayed rather than asked again because Glance authorizes before it reads the
    Range: its refusal of the probe is its refusal of the download.

    Everything else is not a grant: a redirect (never followed: it would carry the caller's
    token elsewhere), a 206 of another range or length, HTML where Glance sends octets, a body
    over PROBE_BODY_LIMIT, any 5xx (FAILED: Glance, or the path to it, is failing, so a
    remembered grant may be used stale). UNDECIDED and FAILED both pass the download through,
    which is always safe: then it is Glance (or its proxy) answering the caller's own request,
    byte for byte, and the cache serves nothing.
    """
    status, headers, body = answer.status, answer.headers, answer.body
    if status >= 500:
        return Verdict.FAILED
    if body is None and status not in (200, 206):
        return Verdict.UNDECIDED  # too long to be Glance's, and to relay whole
    if status == 206:
        return Verdict.GRANTED if _one_byte(answer, size) else Verdict.UNDECIDED
    if status == 401:
        return Verdict.REFUSED if _token_challenge(headers) else Verdict.UNDECIDED
    if not _from_glance(headers):
        return Verdict.UNDECIDED
    if status in (403, 404):
        return Verdict.REFUSED
    if status == 400 and NO_RANDOM_ACCESS in (body or b""):
        return Verdict.GRANTED
    if status == 204 and body == b"":
        return Verdict.GRANTED_NO_DATA
    if status == 416 and EMPTY_IMAGE in (body or b""):
        return Verdict.GRANTED_NO_DATA
    if status == 200 and _whole_image(headers, size):
        return Verdict.GRANTED
    return Verdict.UNDECIDED


def _only(headers: MultiMapping[str], name: str) -> str | None:
    """The header's value if it appears exactly once; a repeated header is nobody's answer."""
    values = headers.getall(name, [])
    return values[0] if len(values) == 1 else None


def _from_glance(headers: MultiMapping[str]) -> bool:
    request_id = _only(headers, "x-openstack-request-id")
    return request_id is not None and request_id.startswith("req-")


def _token_challenge(headers: MultiMapping[str]) -> bool:
    """A 401 of the identity layer: no challenge (Glance's context middleware, fake or real
    Keystone middleware without a URI to name) or a Keystone one, never another scheme."""
    challenges = headers.getall("WWW-Authenticate", [])
    return all(c.strip().lower().startswith("keystone") for c in challenges)


def _octets(headers: MultiMapping[str]) -> bool:
    content_type = _only(headers, "Content-Type")
    return content_type is not None and content_type.split(";")[0].strip().lower() == _OCTETS


def _one_byte(answer: ProbeAnswer, size: int | None) -> bool:
    """A 206 of byte 0 and nothing else, of an image of ``size`` bytes when that is known."""
    m = _CONTENT_RANGE.fullmatch(_only(answer.headers, "Content-Range") or "")
    length = _only(answer.headers, "Content-Length")
    return (
        m is not None
        and (size is None or int(m.group(1)) == size)
        and _octets(answer.headers)
        and length in (None, "1")
        and answer.body is not None
        and len(answer.body) == 1
    )


def _whole_image(headers: MultiMapping[str], size: int | None) -> bool:
    length = _only(headers, "Content-Length")
    return bool(size) and _octets(headers) and length is not None and length == str(size)


class Prober(Protocol):
    async def probe(self, image_id: str, creds: Credentials) -> Verdict:
        """GRANTED or GRANTED_NO_DATA; raises GlanceRefused, ProbeUndecided, GlanceUnavailable."""
        ...


@dataclass(frozen=True)
class Decision:
    """Glance allows the download; ``has_data`` False: allowed, but nothing to cache."""

    has_data: bool
    stale: bool = False


@dataclass
class _Remembered:
    has_data: bool
    fresh_until: float
    stale_until: float


class Authorizer:
    def __init__(
        self,
        glance: Prober,
        metrics: Metrics,
        ttl: float,
        stale_if_error: float = 0.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.glance = glance
        self.metrics = metrics
        self.ttl = ttl
        self.stale_if_error = stale_if_error
        self.max_entries = max_entries
        self.clock = clock
        # Digests are keyed with a per-process secret: nothing in memory can be matched to a token.
        self._key = secrets.token_bytes(32)
        self._remembered: OrderedDict[tuple[bytes, str], _Remembered] = OrderedDict()

    async def authorize(self, image_id: str, creds: Credentials) -> Decision:
        """Glance's decision for this caller; raises GlanceRefused, ProbeUndecided (pass the
        download through) or GlanceUnavailable (Glance cannot be reached)."""
        key = (creds.digest(self._key), image_id)
        now = self.clock()
        known = self._remembered.get(key)
        if known is not None and now < known.fresh_until:
            self.metrics.decision("cached").inc()
            return Decision(known.has_data)
        try:
            verdict = await self.glance.probe(image_id, creds)
        except GlanceRefused:
            self._remembered.pop(key, None)
            self.metrics.decision("denied").inc()
            raise
        except (GlanceUnavailable, ProbeUndecided) as exc:
            # Stale only when Glance is failing; an undecided answer about this very request
            # (a proxy's 400 for an oversized token, a redirect) is no outage.
            failing = isinstance(exc, GlanceUnavailable) or exc.failing
            if failing and known is not None and now < known.stale_until:
                self.metrics.decision("stale").inc()
                return Decision(known.has_data, stale=True)
            self.metrics.decision(
                "error" if isinstance(exc, GlanceUnavailable) else "undecided"
            ).inc()
            raise
        self.metrics.decision("allowed").inc()
        has_data = verdict is Verdict.GRANTED
        if has_data and (self.ttl > 0 or self.stale_if_error > 0):
            self._remember(key, has_data, now)
        return Decision(has_data)

    def forget(self, image_id: str) -> None:
        """Drop every decision about an image (it was deleted or deactivated)."""
        for key in [k for k in self._remembered if k[1] == image_id]:
            del self._remembered[key]

    def forget_all(self) -> None:
        """Drop every decision: the notification listener (re)connected, and what Glance changed
        while it was away is unknown."""
        self._remembered.clear()

    def _remember(self, key: tuple[bytes, str], has_data: bool, now: float) -> None:
        self._remembered[key] = _Remembered(
            has_data, fresh_until=now + self.ttl, stale_until=now + self.ttl + self.stale_if_error
        )
        self._remembered.move_to_end(key)
        while len(self._remembered) > self.max_entries:
            self._remembered.popitem(last=False)

"""Request ids (``X-Openstack-Request-Id``): which id a response carries, which id Glance is given.

- **Inbound.** Nova (keystoneauth, glanceclient) sends its global request id as
  ``X-Openstack-Request-Id: req-<uuid>``. Glance 33's context middleware adopts any value it
  is given (up to 64 characters) as its own request id: it prefixes ``req-`` if missing, logs every
  line of that request under it and answers with it; a longer one gets 431. So a value is forwarded
  on the probe and record calls, and logged, only in the form oslo.middleware accepts
  (``req-`` and a lowercase uuid, the whole value, one header): junk would become Glance's own id
  and land in its logs, and an 8 KB one would turn the probe into a 431. Pass-through forwards the
  caller's headers unchanged, as it does everything (Glance decides).
- **Outbound.** Every data-plane response carries exactly one id: an answer relayed from Glance
  (pass-through, bypass, a refusal) keeps Glance's; a miss or a join carries the id of the Glance
  call made for this very request (the probe's, which authorized this caller, else the record
  call's); a hit, our own errors, and a miss whose calls were shared with another caller (one
  coalesced call answers for both, under the first caller's id) or not made (authorization
  remembered) carry our own ``req-<uuid4>``, new per request.
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar
from dataclasses import dataclass, field

from multidict import MultiMapping

HEADER = "X-Openstack-Request-Id"
# oslo.middleware's ID_FORMAT, matched whole (its ``$`` would also take a trailing newline).
_FORMAT = re.compile(r"req-[a-f0-9]{8}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{12}")


def valid(value: str | None) -> bool:
    return value is not None and _FORMAT.fullmatch(value) is not None


def only_valid(headers: MultiMapping[str]) -> str | None:
    """The request id in ``headers`` if there is exactly one and it has oslo's form; else None."""
    values = headers.getall(HEADER, [])
    return values[0] if len(values) == 1 and valid(values[0]) else None


def new_id() -> str:
    """An id of our own, in the form oslo.context generates: ``req-`` and a random (version 4)
    uuid, built here from 16 random bytes as ``uuid.uuid4`` does, without its ``UUID`` object
    (a hit pays for one of these)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"req-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass
class Correlation:
    """One data-plane request's ids; Glance's are noted by the calls made on its behalf."""

    caller: str | None  # the caller's global request id, validated; None if absent or invalid
    own: str = field(default_factory=new_id)
    probe: str | None = None  # Glance's id of the probe made for this request
    record: str | None = None  # Glance's id of the image-record call made for this request

    def for_response(self, cache_status: str | None) -> str:
        """The id a response of ours carries (one relayed from Glance keeps Glance's)."""
        if cache_status in ("MISS", "JOINED"):
            return self.probe or self.record or self.own
        return self.own


# The request being served, seen by the Glance calls made for it (asyncio tasks copy it when they
# are created, so a call shared by several callers notes its id for the first caller only).
CURRENT: ContextVar[Correlation | None] = ContextVar("cachenode_correlation", default=None)


def outbound() -> dict[str, str]:
    """The header to send Glance on a call made for the current request (nothing if none)."""
    current = CURRENT.get()
    return {HEADER: current.caller} if current is not None and current.caller else {}


def note(call: str, headers: MultiMapping[str]) -> None:
    """Remember Glance's id from the answer to ``call`` ("probe" or "record"), if well formed."""
    current = CURRENT.get()
    glance_id = only_valid(headers)
    if current is None or glance_id is None:
        return
    if call == "probe":
        current.probe = current.probe or glance_id
    else:
        current.record = current.record or glance_id

"""Every metric cachenode exports (SPEC §8), on a registry the app owns.

Nothing here touches the global registry, so each test and each app gets its own. Gauges are kept
up to date by the code that changes them (a commit, an eviction), never computed at scrape time:
collection runs on the event loop and must stay O(1).

Every label value cachenode can produce is created at start with 0 (``prime``): a series that
first appears already at 1 hides that increase from ``rate()`` and ``increase()``, and alerts on
rare events (an integrity failure) would miss the first one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

M = TypeVar("M", Counter, Histogram)

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_FILL = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


STATUSES = ("hit", "miss", "joined", "bypass", "denied", "error")
AUTHZ = ("allowed", "cached", "stale", "denied", "undecided", "error")
FILL_OUTCOMES = ("ok", "integrity", "error", "no_room", "busy", "deleted")
TIER_FAILURES = ("connect", "timeout", "http_5xx", "short_read", "denied", "not_found",
                 "bad_location", "credentials")  # fmt: skip
EVICTIONS = ("idle", "size", "disk", "requested", "verify", "deleted", "inconsistent")
PASSTHROUGH = ("not_cacheable", "multi_range", "no_data", "not_active", "empty", "unverifiable",
               "no_tier", "tier_failed", "no_room", "store_error", "undecided",
               "repeated_credentials", "ambiguous_headers", "tiers_busy", "deleted")  # fmt: skip
# Glance's notifications (cachenode.notifications): every event counted, with the actions it can get
NOTIFICATIONS = {
    "image.delete": ("evict",),
    "image.update": ("forget",),
    **{f"image.member.{op}": ("forget",) for op in ("create", "update", "delete")},
    "image.activate": ("warm", "ignore"),
    "other": ("ignore",),
    "malformed": ("ignore",),
}
RENEWALS = ("ok", "error")
LOCATIONS = ("answered", "refused", "failed")  # Glance's locations API (cachenode.locations)
# The listening-socket handover (cachenode.handover), by this process's role: what can happen
HANDOVERS = {"giver": ("given", "refused"), "taker": ("taken", "refused", "none")}


class Children(Generic[M]):
    """A metric's child for one label value, looked up once: ``labels()`` costs a hit more
    (a lock, a tuple of strings checked) than counting it. Nothing removes a child, so a child
    once looked up stays the one the registry exports."""

    def __init__(self, metric: M) -> None:
        self._labels: Callable[[str], M] = metric.labels
        self._children: dict[str, M] = {}

    def __call__(self, value: str) -> M:
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = self._labels(value)
        return child


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        p = "cachenode_"
        self.requests = Counter(
            p + "requests", "Image download requests by outcome", ["status"], registry=r
        )
        self.served_bytes = Counter(
            p + "served_bytes", "Image bytes sent to callers, by source", ["tier"], registry=r
        )
        # The labelled metrics of every download, by label value (``Children``).
        self.request, self.served = Children(self.requests), Children(self.served_bytes)
        self.upstream_bytes = Counter(
            p + "upstream_bytes", "Image bytes received from each tier", ["tier"], registry=r
        )
        self.fills = Counter(
            p + "fills",
            "Fills by the tier that started them and outcome",
            ["tier", "outcome"],
            registry=r,
        )
        self.fill_duration = Histogram(
            p + "fill_duration_seconds", "Time to fill one image", buckets=_FILL, registry=r
        )
        self.ttfb = Histogram(
            p + "ttfb_seconds",
            "Time to the first body byte sent",
            ["status"],
            buckets=_LATENCY,
            registry=r,
        )
        self.first_byte = Children(self.ttfb)
        self.inflight_fills = Gauge(p + "inflight_fills", "Fills running now", registry=r)
        self.coalesced = Counter(
            p + "coalesced_requests", "Callers served by another caller's fill", registry=r
        )
        self.authz = Counter(
            p + "authz", "Authorization decisions by outcome", ["outcome"], registry=r
        )
        self.decision = Children(self.authz)
        self.integrity_failures = Counter(
            p + "integrity_failures",
            "Fills whose bytes failed the size or hash check",
            ["tier"],
            registry=r,
        )
        self.tier_failures = Counter(
            p + "tier_failures", "Tier errors by tier and kind", ["tier", "kind"], registry=r
        )
        self.tier_rate_limited = Counter(
            p + "tier_rate_limited_seconds",
            "Seconds fills waited on a tier's max_rate, summed over a fill's parallel requests",
            ["tier"],
            registry=r,
        )
        self.evictions = Counter(
            p + "evictions", "Entries removed from L1 by reason", ["reason"], registry=r
        )
        self.evicted_bytes = Counter(p + "evicted_bytes", "Bytes removed from L1", registry=r)
        self.cache_bytes = Gauge(p + "cache_bytes", "Bytes of verified entries in L1", registry=r)
        self.cache_entries = Gauge(p + "cache_entries", "Verified entries in L1", registry=r)
        self.cache_capacity = Gauge(
            p + "cache_capacity_bytes", "max_bytes of the policy", registry=r
        )
        self.disk_free = Gauge(
            p + "disk_free_bytes", "Free bytes on the cache filesystem", registry=r
        )
        self.passthrough = Counter(
            p + "passthrough", "Downloads passed to Glance, by reason", ["reason"], registry=r
        )
        self.notifications = Counter(
            p + "notifications",
            "Glance notifications received, by event and what was done",
            ["event", "action"],
            registry=r,
        )
        # Exported only by a sidecar with a listener (``listening``): no series means none is
        # configured, so an alert on 0 never fires on a host that does not use notifications.
        self.notifications_connected = Gauge(
            p + "notifications_connected",
            "1 while the notification listener is connected to the bus",
            registry=None,
        )
        self.service_auth_renewals = Counter(
            p + "service_auth_renewals",
            "Tokens the sidecar asked of Keystone for itself, by outcome",
            ["outcome"],
            registry=r,
        )
        self.resumed_bytes = Counter(
            p + "resumed_bytes",
            "Bytes of fills taken from a previous run's partial file instead of a tier",
            registry=r,
        )
        self.locations_lookups = Counter(
            p + "locations_lookups",
            "Calls to Glance's locations API (a swift tier's locations: api), by outcome",
            ["outcome"],
            registry=r,
        )
        # A taker counts once, before its admin port answers: its first scrape already shows
        # the outcome, which increase() cannot see; read it raw (the dashboard does). A giver's
        # ``given`` stays in a process whose admin port went with the sockets: a scrape finds
        # it on the taker, as ``taker``/``taken``.
        self.handovers = Counter(
            p + "handovers",
            "Listening-socket handovers (handover.path) by role and outcome: a giver's sockets "
            "given, or refused (a peer that did not take them); a taker's sockets taken, refused "
            "(what answered was no sidecar: bound instead) or none (nobody to take from: bound)",
            ["role", "outcome"],
            registry=r,
        )

    def listening(self) -> None:
        """A notification listener is configured: export its state (0 until it connects)."""
        self.registry.register(self.notifications_connected)

    def prime(self, tiers: list[str]) -> None:
        """Create every series this sidecar can produce, at 0 (see the module's docstring)."""
        for status in STATUSES:
            self.requests.labels(status)
        for status in ("hit", "miss", "joined"):
            self.ttfb.labels(status)
        for outcome in AUTHZ:
            self.authz.labels(outcome)
        for reason in EVICTIONS:
            self.evictions.labels(reason)
        for reason in PASSTHROUGH:
            self.passthrough.labels(reason)
        for event, actions in NOTIFICATIONS.items():
            for action in actions:
                self.notifications.labels(event, action)
        for outcome in RENEWALS:
            self.service_auth_renewals.labels(outcome)
        for outcome in LOCATIONS:
            self.locations_lookups.labels(outcome)
        for role, outcomes in HANDOVERS.items():
            for outcome in outcomes:
                self.handovers.labels(role, outcome)
        self.served_bytes.labels("l1")
        for tier in tiers:
            self.served_bytes.labels(tier)
            self.upstream_bytes.labels(tier)
            self.integrity_failures.labels(tier)
            self.tier_rate_limited.labels(tier)
            for outcome in FILL_OUTCOMES:
                self.fills.labels(tier, outcome)
            for kind in TIER_FAILURES:
                self.tier_failures.labels(tier, kind)

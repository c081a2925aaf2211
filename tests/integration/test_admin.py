"""The admin listener: Prometheus metrics with the SPEC §8 names, health and readiness."""

from __future__ import annotations

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.glance import ALICE, BOB, Glance
from tests.support.sidecar import Sidecar

SPEC_METRICS = {
    "cachenode_requests": "counter",
    "cachenode_served_bytes": "counter",
    "cachenode_upstream_bytes": "counter",
    "cachenode_fills": "counter",
    "cachenode_fill_duration_seconds": "histogram",
    "cachenode_ttfb_seconds": "histogram",
    "cachenode_inflight_fills": "gauge",
    "cachenode_coalesced_requests": "counter",
    "cachenode_authz": "counter",
    "cachenode_integrity_failures": "counter",
    "cachenode_tier_failures": "counter",
    "cachenode_evictions": "counter",
    "cachenode_evicted_bytes": "counter",
    "cachenode_cache_bytes": "gauge",
    "cachenode_cache_entries": "gauge",
    "cachenode_cache_capacity_bytes": "gauge",
    "cachenode_disk_free_bytes": "gauge",
    "cachenode_passthrough": "counter",
    "cachenode_notifications": "counter",  # notifications_connected: only with a listener
}


def test_metrics_health_and_readiness(glance: Glance, sidecar: Sidecar) -> None:
    image = glance.create_image(1 << 20)
    sidecar.get(image.id, ALICE)  # miss
    sidecar.get(image.id, ALICE)  # hit
    sidecar.get(image.id, BOB)  # denied
    sidecar.get("not-a-uuid", ALICE)  # bypass

    text = requests.get(sidecar.admin_url + "/metrics", timeout=10).text
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert {name: families.get(name) for name in SPEC_METRICS} == SPEC_METRICS
    for status in ("miss", "hit", "denied", "bypass"):
        assert sidecar.metric("cachenode_requests_total", status=status) == 1
    assert sidecar.metric("cachenode_ttfb_seconds_count", status="hit") == 1
    assert sidecar.metric("cachenode_fill_duration_seconds_count") == 1
    assert sidecar.metric("cachenode_served_bytes_total", tier="l1") == len(image.data)
    assert sidecar.metric("cachenode_authz_total", outcome="allowed") == 2
    assert sidecar.metric("cachenode_authz_total", outcome="denied") == 1
    assert sidecar.metric("cachenode_passthrough_total", reason="not_cacheable") == 1
    assert sidecar.metric("cachenode_inflight_fills") == 0
    assert sidecar.metric("cachenode_cache_capacity_bytes") > 0
    assert sidecar.metric("cachenode_disk_free_bytes") > 0
    labels = {
        key for f in text_string_to_metric_families(text) for s in f.samples for key in s.labels
    }
    low_cardinality = {
        *("status", "tier", "outcome", "kind", "reason", "le", "event", "action"),
        "role",  # a handover's giver or taker
    }
    assert labels <= low_cardinality  # never an image id, a URL or a token
    assert image.id not in text and glance.url not in text
    assert "cachenode_notifications_connected" not in text  # no listener configured: no series

    assert requests.get(sidecar.admin_url + "/healthz", timeout=5).status_code == 200
    assert requests.get(sidecar.admin_url + "/readyz", timeout=5).status_code == 200
    # The admin plane is never on the data port: there, /metrics is Glance's to answer.
    on_data_port = requests.get(sidecar.url + "/metrics", timeout=5)
    assert on_data_port.status_code == requests.get(glance.url + "/metrics", timeout=5).status_code
    assert "cachenode_" not in on_data_port.text

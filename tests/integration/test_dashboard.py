"""The Grafana dashboard and the Prometheus rules against a real Prometheus scraping a sidecar.

Debian's ``prometheus`` scrapes the sidecar's admin port every second while the test drives every
kind of traffic (hits, misses, joins, refusals, pass-throughs, a poisoned tier, a dead tier,
evictions); then every panel's query must be valid PromQL that returns numbers.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.support.clients import Caller, run_all, wait_for
from tests.support.glance import ALICE, BOB, Glance
from tests.support.sidecar import free_port
from tests.support.upstream import Fault, Upstream

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((ROOT / "grafana" / "cachenode.json").read_text())
SPEC_METRICS = [
    "requests_total",
    "served_bytes_total",
    "upstream_bytes_total",
    "fills_total",
    "fill_duration_seconds",
    "ttfb_seconds",
    "inflight_fills",
    "coalesced_requests_total",
    "authz_total",
    "integrity_failures_total",
    "tier_failures_total",
    "evictions_total",
    "evicted_bytes_total",
    "cache_bytes",
    "cache_entries",
    "cache_capacity_bytes",
    "disk_free_bytes",
    "passthrough_total",
    "notifications_total",
    "notifications_connected",
    "service_auth_renewals_total",
    "locations_lookups_total",
    "tier_rate_limited_seconds_total",
    "resumed_bytes_total",
    "handovers_total",
]


def targets() -> list[tuple[str, str]]:
    return [
        (p["title"], t["expr"])
        for p in DASHBOARD["panels"]
        if p["type"] != "row"
        for t in p["targets"]
    ]


def test_the_dashboard_is_importable_and_complete() -> None:
    names = [v["name"] for v in DASHBOARD["templating"]["list"]]
    assert names[0] == "datasource" and DASHBOARD["templating"]["list"][0]["type"] == "datasource"
    for panel in DASHBOARD["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    exprs = " ".join(expr for _, expr in targets())
    missing = [m for m in SPEC_METRICS if f"cachenode_{m}" not in exprs]
    assert not missing, f"metrics without a panel: {missing}"
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))


@pytest.fixture
def prometheus(tmp_path: Path):  # type: ignore[no-untyped-def]
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed (apt-get install prometheus; .ci/run does)")

    def start(target: str) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {"job_name": "cachenode", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        with (tmp_path / "prometheus.log").open("wb") as log:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=log,
            )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ready(url), timeout=30)
        return url

    procs: list[subprocess.Popen[bytes]] = []
    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(20)


def _ready(url: str) -> bool:
    try:
        return requests.get(url + "/-/ready", timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


def query(url: str, expr: str) -> list[dict]:  # type: ignore[type-arg]
    resp = requests.get(url + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert resp["status"] == "success", (expr, resp)
    return resp["data"]["result"]  # type: ignore[no-any-return]


def test_every_panel_returns_data_from_a_real_prometheus(
    glance: Glance, sidecar_factory, prometheus, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "admin.token").write_text("t")
    (tmp_path / "transport.url").write_text("rabbit://u:p@127.0.0.1:9/")  # a bus never reached
    images = [glance.create_image(2 << 20) for _ in range(4)]
    with (
        Upstream(target=glance.url, faults=[Fault("flip", at=1000, times=1)]) as poisoned,
        Upstream(target=glance.url, faults=[Fault("throttle", rate=8 << 20, times=-1)]) as slow,
    ):
        sidecar = sidecar_factory(
            admin={"token_file": str(tmp_path / "admin.token")},
            notifications={"transport_url_file": str(tmp_path / "transport.url")},
            tiers=[
                {
                    "name": "dead",
                    "kind": "http",
                    "url": "http://127.0.0.1:9",
                    "connect_timeout": "1s",
                },
                {"name": "poisoned", "kind": "glance", "url": poisoned.url},
                {"name": "regional", "kind": "glance", "url": slow.url},
            ],
        ).start()
        url = prometheus(f"127.0.0.1:{sidecar.admin_port}")
        wait_for(lambda: bool(query(url, "up == 1")), timeout=30)

        first = Caller(f"{sidecar.url}/v2/images/{images[0].id}/file", ALICE)
        first.run()  # dead tier fails, poisoned tier's bytes fail the hash: an integrity failure
        assert first.error is not None or first.status == 502
        callers = run_all(
            [Caller(f"{sidecar.url}/v2/images/{images[1].id}/file", ALICE) for _ in range(4)]
        )
        assert all(c.sha512 == images[1].sha512 for c in callers)  # a miss, joined by three
        sidecar.get(images[0].id, ALICE)  # refilled from regional
        sidecar.get(images[1].id, ALICE)  # hits
        sidecar.get(images[2].id, ALICE)
        sidecar.get(images[1].id, BOB)  # denied
        sidecar.get("not-an-image", ALICE)  # bypass
        requests.post(
            sidecar.admin_url + "/admin/v1/evict",
            json={"ids": [images[2].id]},
            timeout=10,
            headers={"Authorization": "Bearer t"},
        ).raise_for_status()
        time.sleep(4)  # a few scrapes with all of it

        empty, nan_only = [], []
        for title, expr in targets():
            concrete = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
            result = query(url, concrete)  # a PromQL error fails inside query()
            values = [float(r["value"][1]) for r in result]
            if not values:
                empty.append(f"{title}: {concrete}")
            elif not any(math.isfinite(v) for v in values):
                nan_only.append(f"{title}: {concrete}")
        assert not empty, "panels without data:\n" + "\n".join(empty)
        assert not nan_only, "panels with only NaN:\n" + "\n".join(nan_only)
        integrity = query(url, "sum by (tier) (increase(cachenode_integrity_failures_total[1h]))")
        assert {r["metric"]["tier"] for r in integrity if float(r["value"][1]) > 0} == {"poisoned"}


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (apt-get install prometheus; .ci/run does)")
    rules = subprocess.run(
        [promtool, "check", "rules", str(ROOT / "deploy" / "alerts.yml")],
        capture_output=True,
        text=True,
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", str(ROOT / "tests" / "deploy" / "alerts_test.yml")],
        capture_output=True,
        text=True,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    config = subprocess.run(
        [promtool, "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert config.returncode == 0, config.stdout + config.stderr

"""``glance.url`` may be left out when ``service_auth`` talks to Keystone: the start then reads
Glance's endpoint from the catalog (cachenode.identity). The rules of the config for it."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cachenode import identity
from cachenode.config import FROM_CATALOG, parse_config, where_glance
from cachenode.errors import ConfigError, NoGlanceEndpoint
from cachenode.identity import ServiceIdentity

CACHE = {"cache": {"dir": "/var/lib/cachenode"}}
MISSING = (
    "glance.url: missing (give it, or service_auth.auth_url to find Glance in Keystone's catalog)"
)


@pytest.fixture
def keystone(tmp_path: Path) -> dict[str, Any]:
    secret = tmp_path / "appcred.secret"
    secret.write_text("s3cret\n")
    return {
        "auth_url": "http://keystone.example:5000/v3", "auth_type": "v3applicationcredential",
        "application_credential_id": "0123abcd",
        "application_credential_secret_file": str(secret),
    }  # fmt: skip


def error_of(doc: object) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(doc)
    return str(exc.value)


def test_without_glance_url_service_auth_with_keystone_is_needed(tmp_path: Path) -> None:
    assert error_of(CACHE) == MISSING
    assert error_of({**CACHE, "glance": {"timeout": "10s"}}) == MISSING
    token = tmp_path / "service.token"
    token.write_text("t0ken\n")
    # a static token has no catalog to read
    assert error_of({**CACHE, "service_auth": {"token_file": str(token)}}) == MISSING


def test_with_keystone_the_url_and_the_implicit_tier_wait_for_the_catalog(
    keystone: dict[str, Any],
) -> None:
    cfg = parse_config({**CACHE, "service_auth": {**keystone, "region_name": "RegionTwo"}})
    assert cfg.glance_url is None and cfg.glance_catalog_timeout == 60
    assert [(t.name, t.kind, t.url) for t in cfg.tiers] == [("glance", "glance", FROM_CATALOG)]
    assert where_glance(cfg) == "from Keystone's catalog (image, internal, region RegionTwo)"

    found = cfg.with_glance_url("http://glance.internal:9292")
    assert found.glance_url == "http://glance.internal:9292"
    assert [t.url for t in found.tiers] == ["http://glance.internal:9292"]
    assert found.service_keystone == cfg.service_keystone and found.policy == cfg.policy


def test_explicit_tiers_keep_their_own_urls(keystone: dict[str, Any]) -> None:
    tiers = [
        {"name": "regional", "kind": "glance", "url": "http://regional:9393"},
        {"name": "mirror", "kind": "http", "url": "http://mirror/images"},
    ]
    cfg = parse_config(
        {**CACHE, "tiers": tiers, "service_auth": {**keystone, "interface": "public"}}
    )
    assert where_glance(cfg) == "from Keystone's catalog (image, public, any region)"
    found = cfg.with_glance_url("http://glance.public:9292")
    assert [t.url for t in found.tiers] == ["http://regional:9393", "http://mirror/images"]


def test_an_explicit_glance_url_wins_over_the_catalog(keystone: dict[str, Any]) -> None:
    # A host pointed at a regional cachenode sets glance.url on purpose (README, "regional").
    doc = {**CACHE, "glance": {"url": "http://regional:9393"}, "service_auth": keystone}
    cfg = parse_config(doc)
    assert cfg.glance_url == "http://regional:9393" and where_glance(cfg) == "http://regional:9393"
    assert [t.url for t in cfg.tiers] == ["http://regional:9393"]


@pytest.mark.parametrize(
    ("value", "expected"), [("0s", 0.0), ("5s", 5.0), ("10m", 600.0), ("1h", 3600.0)]
)
def test_catalog_timeout(keystone: dict[str, Any], value: str, expected: float) -> None:
    doc = {**CACHE, "glance": {"catalog_timeout": value}, "service_auth": keystone}
    assert parse_config(doc).glance_catalog_timeout == expected


@pytest.mark.parametrize(
    ("glance", "message"),
    [
        ({"catalog_timeout": "2h"}, "glance.catalog_timeout: must be between 0s and 1h"),
        ({"catalog_timeout": "-1s"}, "glance.catalog_timeout: "),
        ({"catalog_timeout": "soon"}, "glance.catalog_timeout: "),
        ({"url": "http://u:p@glance:9292"}, "glance.url: an URL here takes no user or password"),
        ({"url": "http://u@glance:9292"}, "glance.url: an URL here takes no user or password"),
        ({"url": "http://glance:9292/?x=1"}, "glance.url: an URL here takes no query or fragment"),
        ({"url": "ftp://glance"}, "glance.url: not an http(s) URL"),
        ({"url": "http://glance:9292", "catalog": "x"}, "glance.catalog: unknown key"),
    ],
)
def test_bad_glance_values_name_the_key(
    keystone: dict[str, Any], glance: dict[str, Any], message: str
) -> None:
    assert error_of({**CACHE, "glance": glance, "service_auth": keystone}).startswith(message)


def test_check_config_says_where_glance_will_be_found(
    keystone: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**CACHE, "service_auth": keystone}))
    ok = subprocess.run(
        [sys.executable, "-m", "cachenode", "check-config", "-c", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "glance from Keystone's catalog (image, internal, any region)" in ok.stdout
    path.write_text(yaml.safe_dump(CACHE))
    bad = subprocess.run(
        [sys.executable, "-m", "cachenode", "serve", "-c", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (bad.returncode, bad.stderr, bad.stdout) == (2, f"config error: {MISSING}\n", "")


def test_an_unreachable_keystone_is_asked_again_with_backoff_then_given_up(
    keystone: dict[str, Any],
) -> None:
    # The clock and the pauses are injected: the backoff is shown without waiting for it.
    with socket.socket() as s:  # a port nothing listens on: each attempt fails at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    doc = {**CACHE, "service_auth": {**keystone, "auth_url": f"http://127.0.0.1:{port}/v3"}}
    identity = ServiceIdentity.from_config(parse_config(doc))
    assert identity is not None
    now, pauses = [0.0], []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        now[0] += seconds

    with pytest.raises(NoGlanceEndpoint) as exc:
        asyncio.run(identity.glance_endpoint(30.0, clock=lambda: now[0], sleep=sleep))
    assert pauses == [1.0, 2.0, 4.0, 8.0, 10.0, 5.0]  # the last one only what is left of 30 s
    message = str(exc.value)
    assert message.startswith(f"glance endpoint: cannot ask Keystone at http://127.0.0.1:{port}/v3")
    assert message.endswith("(asked 7 times in 30s)") and "\n" not in message
    assert not exc.value.final

    pauses.clear()
    with pytest.raises(NoGlanceEndpoint, match=r"\(asked once in 0s\)$"):
        asyncio.run(identity.glance_endpoint(0.0, clock=lambda: now[0], sleep=sleep))
    assert pauses == []


@pytest.mark.parametrize(
    ("url", "root"),
    [
        ("http://glance:9292", "http://glance:9292"),
        ("http://glance:9292/", "http://glance:9292"),
        ("http://glance:9292/v2", "http://glance:9292"),
        ("https://cloud/image/v2.1/", "https://cloud/image"),
        ("https://cloud/image", "https://cloud/image"),
        ("https://cloud/v2x", "https://cloud/v2x"),
    ],
)
def test_a_catalog_url_with_its_version_names_glances_root(url: str, root: str) -> None:
    assert identity.unversioned(url) == root

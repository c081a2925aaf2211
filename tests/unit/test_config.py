"""The config file: every mistake stops the start with one line naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cachenode.config import load_config, parse_config
from cachenode.errors import ConfigError

MINIMAL = {"glance": {"url": "http://glance.example:9292"}, "cache": {"dir": "/var/lib/cachenode"}}


def config(**overrides: Any) -> dict[str, Any]:
    return {**MINIMAL, **overrides}


def error_of(doc: object) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(doc)
    return str(exc.value)


def test_minimal_config_uses_glance_as_the_only_tier() -> None:
    cfg = parse_config(config())
    assert cfg.listen == ("127.0.0.1", 9393)
    assert cfg.admin_listen == ("127.0.0.1", 9394)
    assert [(t.name, t.kind, t.url) for t in cfg.tiers] == [
        ("glance", "glance", "http://glance.example:9292")
    ]
    assert cfg.authz_ttl == 60
    assert cfg.policy.name == "default"


def test_full_config_of_the_spec_parses(tmp_path: Path) -> None:
    token = tmp_path / "service.token"
    token.write_text("svc:svc:admin\n")
    cfg = parse_config(
        config(
            listen="127.0.0.1:9393",
            authz={"ttl": "60s", "stale_if_error": "5m"},
            cache={"dir": "/var/lib/cachenode", "policy": "golden-images"},
            tiers=[
                {"name": "regional", "kind": "glance", "url": "http://glance-cache.region:9292"},
                {
                    "name": "mirror",
                    "kind": "http",
                    "url": "http://mirror.region/images/{image_id}",
                    "parallel": 4,
                    "chunk_size": "64MiB",
                    "read_timeout": "10s",
                },
            ],
            admin={"listen": "127.0.0.1:9394"},
            service_auth={"token_file": str(token)},
        )
    )
    assert cfg.authz_stale_if_error == 300
    assert [t.name for t in cfg.tiers] == ["regional", "mirror"]
    assert cfg.tiers[1].chunk_size == 64 << 20 and cfg.tiers[1].read_timeout == 10
    assert cfg.service_token is not None and cfg.service_token.reveal() == "svc:svc:admin"
    assert "svc" not in repr(cfg)
    assert cfg.policy.pin.tags == ("golden",)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            config(
                tiers=[
                    {"name": "a", "kind": "glance", "url": "http://x"},
                    {"name": "b", "kind": "http", "url": "ftp://x"},
                ]
            ),
            "tiers[1].url: not an http(s) URL",
        ),
        (config(listen="nowhere"), "listen: expected address:port"),
        (config(listen="localhost:9393"), "listen: expected an IP address"),
        (config(admin={"listen": "[1:2:3]:9394"}), "admin.listen: expected an IP address"),
        (config(listen="127.0.0.1:99999"), "listen: port must be between 1 and 65535"),
        (config(authz={"ttl": "soon"}), "authz.ttl: not a duration"),
        (config(authz={"ttl": -3}), "authz.ttl: a duration cannot be negative"),
        (config(authz={"tll": "5s"}), "authz.tll: unknown key"),
        (config(colour="blue"), "colour: unknown key"),
        (
            config(tiers=[{"name": "a", "kind": "ftp", "url": "http://x"}]),
            "tiers[0].kind: must be one of",
        ),
        (
            config(tiers=[{"name": "a", "kind": "http", "url": "http://x", "chunk_size": "lots"}]),
            "tiers[0].chunk_size: not a size",
        ),
        (
            config(tiers=[{"name": "a", "kind": "http", "url": "http://x", "parallel": "4"}]),
            "tiers[0].parallel: expected a whole number",
        ),
        (
            config(
                tiers=[
                    {"name": "a", "kind": "http", "url": "http://x"},
                    {"name": "a", "kind": "http", "url": "http://y"},
                ]
            ),
            "tiers[1].name: 'a' is used by an earlier tier",
        ),
        (config(tiers={"name": "a"}), "tiers: expected a list"),
        (config(glance={}), "glance.url: missing"),
        (config(glance="http://x"), "glance: expected a mapping"),
        (config(cache={"dir": "relative/path"}), "cache.dir: must be an absolute path"),
        (
            config(cache={"dir": "/x", "policy": "nonesuch"}),
            "cache.policy: no policy named 'nonesuch'",
        ),
        (config(admin={"listen": "127.0.0.1:9393"}), "admin.listen: must differ from listen"),
        (
            config(service_auth={"token_file": "/nonexistent/token"}),
            "service_auth.token_file: cannot read /nonexistent/token",
        ),
        ([1, 2], "expected a mapping, got a list"),
    ],
)
def test_bad_values_name_their_key(doc: object, message: str) -> None:
    assert message in error_of(doc)


def test_policy_errors_name_the_file_and_key(tmp_path: Path) -> None:
    policy = tmp_path / "mine.yaml"
    policy.write_text("order: random\n")
    assert "mine.yaml: order: must be one of lru, lfu, largest, fifo" in error_of(
        config(cache={"dir": "/x", "policy": str(policy)})
    )
    policy.write_text("low_watermark: 0.9\nhigh_watermark: 0.5\n")
    assert "low_watermark: must not be above high_watermark" in error_of(
        config(cache={"dir": "/x", "policy": str(policy)})
    )


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("glance: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cachenode", *args], capture_output=True, text=True, timeout=60
    )


def test_check_config_and_serve_exit_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(config(tiers=[{"name": "x", "kind": "http", "url": "gopher://x"}]))
    )
    for command in ("check-config", "serve"):
        result = run_cli(command, "-c", str(path))
        assert result.returncode == 2
        assert result.stderr == "config error: tiers[0].url: not an http(s) URL\n"
        assert result.stdout == ""


def test_check_config_ok_and_env_default(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config()))
    result = run_cli("check-config", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config ok:")
    env_result = subprocess.run(
        [sys.executable, "-m", "cachenode", "check-config"],
        capture_output=True,
        text=True,
        env={"CACHENODE_CONFIG": str(path), "PATH": "/usr/bin"},
    )
    assert env_result.returncode == 0, env_result.stderr


def test_shipped_policies_all_load() -> None:
    for name in ("default", "lru", "size-capped", "golden-images"):
        cfg = parse_config(config(cache={"dir": "/x", "policy": name}))
        assert cfg.policy.name == name


def test_swift_tiers(tmp_path: Path) -> None:
    key = tmp_path / "tempurl.key"
    key.write_text("k\n")
    swift = {"name": "objectstore", "kind": "swift", "url": "http://swift:8080/v1/AUTH_glance"}
    cfg = parse_config(config(tiers=[{**swift, "temp_url_key_file": str(key), "parallel": 4}]))
    tier = cfg.tiers[0]
    assert (tier.container, tier.temp_url_key_file, tier.token_file) == ("glance", key, None)
    assert tier.parallel == 4 and tier.temp_url_ttl == 300
    assert "needs one of temp_url_key_file or token_file" in error_of(config(tiers=[swift]))
    both = {**swift, "temp_url_key_file": str(key), "token_file": str(key)}
    assert "tiers[0].temp_url_key_file: a swift tier needs one of" in error_of(config(tiers=[both]))
    http = {"name": "m", "kind": "http", "url": "http://m", "container": "x"}
    assert "tiers[0].container: unknown key" in error_of(config(tiers=[http]))
    glance = {"name": "g", "kind": "glance", "url": "http://g", "parallel": 2}
    assert "tiers[0].parallel: a glance tier is read whole" in error_of(config(tiers=[glance]))


def test_the_locations_api_is_opt_in_and_needs_the_service_identity(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("k\n")
    swift = {"name": "o", "kind": "swift", "url": "http://swift:8080/v1/AUTH_glance",
             "temp_url_key_file": str(key)}  # fmt: skip
    assert parse_config(config(tiers=[swift])).tiers[0].locations == "record"
    api = {**swift, "locations": "api"}
    assert "tiers[0].locations: api needs service_auth" in error_of(config(tiers=[api]))
    cfg = parse_config(config(tiers=[api], service_auth={"token_file": str(key)}))
    assert cfg.tiers[0].locations == "api"
    assert "tiers[0].locations: must be one of record, api" in error_of(
        config(tiers=[{**swift, "locations": "always"}])
    )
    http = {"name": "m", "kind": "http", "url": "http://m", "locations": "api"}
    assert "tiers[0].locations: unknown key" in error_of(config(tiers=[http]))


@pytest.mark.parametrize("name", ["..", ".", "a/b", "a%2fb", "a\\b", "a\nb"])
def test_a_swift_container_is_one_plain_segment(tmp_path: Path, name: str) -> None:
    key = tmp_path / "tempurl.key"
    key.write_text("k\n")
    swift = {"name": "o", "kind": "swift", "url": "http://swift:8080/v1/AUTH_glance",
             "temp_url_key_file": str(key), "container": name}  # fmt: skip
    assert "tiers[0].container: not a container name" in error_of(config(tiers=[swift]))


def tier(**keys: object) -> dict[str, Any]:
    return config(
        tiers=[
            {"name": "regional", "kind": "glance", "url": "http://regional:9292"},
            {"name": "origin", "kind": "http", "url": "http://origin", **keys},
        ]
    )


def test_tier_limits_and_the_short_connect_timeout() -> None:
    plain, limited = parse_config(tier(max_fills=4, max_rate="500MB")).tiers
    assert (plain.max_fills, plain.max_rate, plain.connect_timeout) == (None, None, 2.0)
    assert (limited.max_fills, limited.max_rate) == (4, 500_000_000)
    assert parse_config(tier(max_rate="1GiB", connect_timeout="500ms")).tiers[1].max_rate == 2**30


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"max_rate": "fast"}, "tiers[1].max_rate: not a size: 'fast'"),
        ({"max_rate": "0MB"}, "tiers[1].max_rate: must be more than 0"),
        ({"max_rate": "10%"}, "tiers[1].max_rate: a percentage is not allowed here"),
        ({"max_rate": "9" * 400 + "MB"}, "tiers[1].max_rate: too large"),  # not a traceback
        ({"chunk_size": "9" * 8000}, "tiers[1].chunk_size: too large"),
        ({"max_fills": 0}, "tiers[1].max_fills: must be at least 1"),
        ({"max_fills": "2"}, "tiers[1].max_fills: expected a whole number"),
        ({"connect_timeout": "0s"}, "tiers[1].connect_timeout: must be more than 0s"),
        ({"max_fill": 2}, "tiers[1].max_fill: unknown key"),
    ],
)
def test_tier_limit_errors_name_their_key(keys: dict[str, object], message: str) -> None:
    assert message in error_of(tier(**keys))


def test_a_bad_max_rate_stops_check_config_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tier(max_rate="lots")))
    result = run_cli("check-config", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith("config error: tiers[1].max_rate: not a size: 'lots'")
    assert result.stderr.count("\n") == 1

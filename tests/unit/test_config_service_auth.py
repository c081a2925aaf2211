"""``service_auth`` with keystoneauth1 options: secrets only from files, errors naming the key."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from cachenode.config import parse_config
from cachenode.errors import ConfigError, ServiceAuthFailed
from cachenode.identity import ServiceIdentity
from cachenode.metrics import Metrics

BASE = {"glance": {"url": "http://glance.example:9292"}, "cache": {"dir": "/var/lib/cachenode"}}


def parsed(**service: Any) -> Any:
    return parse_config({**BASE, "service_auth": service})


def error_of(**service: Any) -> str:
    with pytest.raises(ConfigError) as exc:
        parsed(**service)
    return str(exc.value)


@pytest.fixture
def secret(tmp_path: Path) -> str:
    path = tmp_path / "secret"
    path.write_text("s3cret-value\n")
    return str(path)


def password(secret: str, **extra: Any) -> dict[str, Any]:
    return {
        "auth_url": "http://keystone.example:5000/v3", "auth_type": "password",
        "username": "cachenode", "password_file": secret, "project_name": "service", **extra,
    }  # fmt: skip


def test_password_and_application_credential_parse(secret: str) -> None:
    cfg = parsed(**password(secret, region_name="RegionTwo", interface="public"))
    ks = cfg.service_keystone
    assert ks is not None and cfg.service_token is None
    assert (ks.auth_type, ks.username, ks.project_name) == ("password", "cachenode", "service")
    assert (ks.user_domain_name, ks.project_domain_name) == ("Default", "Default")
    assert (ks.region_name, ks.interface) == ("RegionTwo", "public")
    assert ks.password is not None and ks.password.reveal() == "s3cret-value"
    assert "s3cret" not in repr(cfg)

    cfg = parsed(
        auth_url="https://keystone.example/v3", auth_type="v3applicationcredential",
        application_credential_id="0123abcd", application_credential_secret_file=secret,
    )  # fmt: skip
    ks = cfg.service_keystone
    assert ks is not None and ks.application_credential_id == "0123abcd"
    assert ks.application_credential_secret is not None
    assert ks.application_credential_secret.reveal() == "s3cret-value"
    assert ks.interface == "internal"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"password": "inline"}, "service_auth.password: secrets come only from files"),
        ({"auth_type": "token"}, "service_auth.auth_type: "),
        ({"auth_url": "keystone:5000"}, "service_auth.auth_url: not an http(s) URL"),
        ({"interface": "private"}, "service_auth.interface: "),
        ({"username": None}, "service_auth.username: "),
        ({"project_name": 5}, "service_auth.project_name: "),
        ({"region": "RegionOne"}, "service_auth.region: unknown key"),
        ({"password_file": "/nonexistent/file"}, "service_auth.password_file: "),
        ({"application_credential_id": "x"}, "service_auth.application_credential_id: unknown"),
    ],
)
def test_bad_values_name_the_key(secret: str, change: dict[str, Any], message: str) -> None:
    assert error_of(**password(secret, **change)).startswith(message)


def test_missing_and_conflicting_keys(secret: str, tmp_path: Path) -> None:
    doc = password(secret)
    del doc["username"]
    assert error_of(**doc) == "service_auth.username: missing"
    assert error_of(auth_type="password") == "service_auth.auth_url: missing"
    both = error_of(**password(secret, token_file=secret))
    assert both.startswith("service_auth.token_file: give either token_file or auth_url")
    inline = error_of(
        auth_url="http://k/v3", auth_type="v3applicationcredential",
        application_credential_id="x", application_credential_secret="inline",
    )  # fmt: skip
    assert inline.startswith("service_auth.application_credential_secret: secrets come only")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert error_of(**password(str(empty))).startswith("service_auth.password_file: ")


def test_an_unreachable_keystone_is_a_counted_service_auth_failure(secret: str) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = parsed(**password(secret, auth_url=f"http://127.0.0.1:{port}/v3"))
    metrics = Metrics()
    metrics.prime([])
    identity = ServiceIdentity.from_config(cfg, metrics)
    assert identity is not None
    with pytest.raises(ServiceAuthFailed, match="cannot get a token from Keystone"):
        asyncio.run(identity.credentials())
    assert metrics.service_auth_renewals.labels("error")._value.get() == 1
    assert metrics.service_auth_renewals.labels("ok")._value.get() == 0


def test_a_static_token_file_is_used_as_is(secret: str) -> None:
    identity = ServiceIdentity.from_config(parsed(token_file=secret))
    assert identity is not None
    creds = asyncio.run(identity.credentials())
    assert creds.headers == (("X-Auth-Token", "s3cret-value"),)
    assert ServiceIdentity.from_config(parse_config(BASE)) is None

"""The configuration file (SPEC §4): one YAML document read into frozen records.

Every problem stops the start with one line naming the key
(``tiers[1].url: not an http(s) URL``); ``cachenode check-config`` runs the same checks. Secrets
(token files) are read once here and kept in ``Secret`` wrappers whose repr never shows them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from cachenode import validate as v
from cachenode.errors import ConfigError
from cachenode.policy import Policy, load_policy
from cachenode.units import parse_duration, parse_size

DEFAULT_PATH = "/etc/cachenode/cachenode.yaml"
TIER_KINDS = ("glance", "swift", "http")
_TIER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
# Tiers are in the region: a connect takes milliseconds. 2 s still lets Linux retransmit a lost
# SYN once (its first retransmit goes at 1 s), and a tier that drops SYNs costs a fill 2 s, not
# a boot a minute; after failures_before_cooldown of them the tier is skipped altogether.
CONNECT_TIMEOUT = 2.0
# The URL of the implicit glance tier while glance.url is still to be read from Keystone's catalog;
# never a URL a tier's own config may have (those are checked http(s) URLs).
FROM_CATALOG = ""


class Secret:
    """A credential read from a file; ``str()`` gives it, ``repr()`` never does."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class TierConfig:
    name: str
    kind: str
    url: str
    parallel: int = 1
    chunk_size: int = 16 * 2**20
    connect_timeout: float = CONNECT_TIMEOUT
    read_timeout: float = 30.0
    failures_before_cooldown: int = 3
    cooldown: float = 30.0
    max_fills: int | None = None  # fills reading from the tier at once (cachenode.limits)
    max_rate: int | None = None  # bytes a second over all of them
    # kind swift: the object is <url>/<container>/<image id> unless Glance's locations name one
    container: str = "glance"
    temp_url_key_file: Path | None = None  # sign TempURLs with this account key ...
    token_file: Path | None = None  # ... or send this token (re-read when the file changes)
    temp_url_ttl: float = 300.0
    # "api": when the caller's record shows no location, ask Glance's locations API with the
    # sidecar's own identity (cachenode.locations); "record": the record's locations only
    locations: str = "record"


@dataclass(frozen=True)
class KeystoneAuth:
    """``service_auth`` as keystoneauth1 options: the sidecar's own identity from Keystone.

    Secrets come only from files (``password_file``, ``application_credential_secret_file``): a
    config file is copied, templated and shown in reviews; a secret file has its own mode bits.
    """

    auth_url: str
    auth_type: str  # "password" or "v3applicationcredential"
    username: str | None = None
    password: Secret | None = None
    project_name: str | None = None
    user_domain_name: str = "Default"
    project_domain_name: str = "Default"
    application_credential_id: str | None = None
    application_credential_secret: Secret | None = None
    region_name: str | None = None
    interface: str = "internal"


@dataclass(frozen=True)
class Config:
    # None: Glance's endpoint comes from Keystone's catalog at start (``with_glance_url``)
    glance_url: str | None
    cache_dir: Path
    policy: Policy
    tiers: tuple[TierConfig, ...]
    listen: tuple[str, int] = ("127.0.0.1", 9393)
    glance_timeout: float = 30.0
    glance_catalog_timeout: float = 60.0  # how long the start asks the catalog before it gives up
    authz_ttl: float = 60.0
    authz_stale_if_error: float = 0.0
    admin_listen: tuple[str, int] = ("127.0.0.1", 9394)
    admin_token: Secret | None = None
    service_token: Secret | None = None
    service_keystone: KeystoneAuth | None = None
    log_level: str = "info"
    janitor_interval: float = 30.0
    access_flush_interval: float = 5.0  # hits' access times reach the catalog this often
    notifications_url: Secret | None = None  # Glance's bus, rabbit://user:pass@host:5672/
    notifications_durable: bool = False  # as Glance's [oslo_messaging_rabbit] amqp_durable_queues
    handover_path: Path | None = None  # a unix socket: listening sockets pass to the next process

    def with_glance_url(self, url: str) -> Config:
        """The config once Glance's endpoint is known: ``glance.url`` and the implicit glance
        tier (no ``tiers`` list), whose URL is ``FROM_CATALOG`` until then."""
        tiers = tuple(
            replace(t, url=url) if t.kind == "glance" and t.url == FROM_CATALOG else t
            for t in self.tiers
        )
        return replace(self, glance_url=url, tiers=tiers)


def _secret_file(value: object) -> Secret:
    path = v.readable_file(value)
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"{path} is empty")
    return Secret(token)


def _tier(path: str, data: object) -> TierConfig:
    s = v.Section(data, path)
    name = s.take("name", v.string)
    if not _TIER_NAME.match(name) or name == "l1":
        raise ConfigError(
            s.key("name"), "use 1-32 lowercase letters, digits, '-' or '_' (not 'l1')"
        )
    kind = s.take("kind", v.choice(*TIER_KINDS))
    tier = TierConfig(
        name=name,
        kind=kind,
        url=s.take("url", v.http_url),
        parallel=s.take("parallel", v.integer(1, 64), 1),
        chunk_size=s.take("chunk_size", lambda x: parse_size(x).bytes, 16 * 2**20),
        connect_timeout=s.take("connect_timeout", _positive_duration, CONNECT_TIMEOUT),
        read_timeout=s.take("read_timeout", parse_duration, 30.0),
        failures_before_cooldown=s.take("failures_before_cooldown", v.integer(1), 3),
        cooldown=s.take("cooldown", parse_duration, 30.0),
        max_fills=s.take("max_fills", v.integer(1), None),
        max_rate=s.take("max_rate", _rate, None),
    )
    if tier.chunk_size < 2**20:
        raise ConfigError(s.key("chunk_size"), "must be at least 1MiB")
    if kind == "glance" and tier.parallel > 1:
        raise ConfigError(
            s.key("parallel"), "a glance tier is read whole (its cache never serves a Range)"
        )
    if kind == "swift":
        tier = _swift(s, tier)
    s.finish()
    return tier


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be more than 0s")
    return seconds


def _rate(value: object) -> int:
    """Bytes a second, written as a size (``500MB``, ``1GiB``)."""
    rate = parse_size(value).bytes
    if rate <= 0:
        raise ValueError("must be more than 0 (leave max_rate out for no limit)")
    return rate


def _swift(s: v.Section, tier: TierConfig) -> TierConfig:
    key = s.take("temp_url_key_file", v.readable_file, None)
    token = s.take("token_file", v.readable_file, None)
    if (key is None) == (token is None):
        raise ConfigError(
            s.key("temp_url_key_file"), "a swift tier needs one of temp_url_key_file or token_file"
        )
    ttl = s.take("temp_url_ttl", parse_duration, 300.0)
    if not 1 <= ttl <= 86400:
        raise ConfigError(s.key("temp_url_ttl"), "must be between 1s and 1d")
    container = s.take("container", v.string, "glance")
    from cachenode.tiers.swift import segment  # the tier's own rule; tiers import this module

    try:
        segment(container)
    except ValueError as exc:
        raise ConfigError(s.key("container"), f"not a container name: {exc}") from None
    locations = s.take("locations", v.choice("record", "api"), "record")
    return replace(
        tier,
        container=container,
        temp_url_key_file=key,
        token_file=token,
        temp_url_ttl=ttl,
        locations=locations,
    )


def _transport_url_file(value: object) -> Secret:
    """A file holding ``rabbit://user:pass@host:5672/`` (secrets only ever in files)."""
    from cachenode.notifications import kombu_url  # its own rule for the URL

    url = _secret_file(value)
    kombu_url(url.reveal())  # ValueError: named after the key by Section.take
    return url


def _unix_socket_path(value: object) -> Path:
    """Where the running sidecar offers its listening sockets (``cachenode.handover``)."""
    path = Path(v.string(value))
    if not path.is_absolute():
        raise ValueError("must be an absolute path")
    if len(os.fsencode(path)) > 107:  # sun_path holds 108 bytes, the last a NUL
        raise ValueError("too long for a unix socket (107 bytes at most)")
    return path


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


_AUTH_TYPES = ("password", "v3applicationcredential")
_INLINE_SECRETS = {
    "password": "password_file",
    "application_credential_secret": "application_credential_secret_file",
    "token": "token_file",
}


def _service_auth(s: v.Section) -> tuple[Secret | None, KeystoneAuth | None]:
    """A static ``token_file`` (test beds) or keystoneauth1 options, never both."""
    for inline, from_file in _INLINE_SECRETS.items():
        if s.has(inline):
            raise ConfigError(s.key(inline), f"secrets come only from files: use {from_file}")
    token = s.take("token_file", _secret_file, None)
    if not s.has("auth_url") and not s.has("auth_type"):
        s.finish()
        return token, None
    if token is not None:
        raise ConfigError(s.key("token_file"), "give either token_file or auth_url, not both")
    auth_url = s.take("auth_url", v.http_url)
    auth_type = s.take("auth_type", v.choice(*_AUTH_TYPES))
    common = {
        "region_name": s.take("region_name", v.string, None),
        "interface": s.take("interface", v.choice("public", "internal", "admin"), "internal"),
    }
    if auth_type == "password":
        auth = KeystoneAuth(
            auth_url, auth_type,
            username=s.take("username", v.string),
            password=s.take("password_file", _secret_file),
            project_name=s.take("project_name", v.string),
            user_domain_name=s.take("user_domain_name", v.string, "Default"),
            project_domain_name=s.take("project_domain_name", v.string, "Default"),
            **common,
        )  # fmt: skip
    else:
        auth = KeystoneAuth(
            auth_url, auth_type,
            application_credential_id=s.take("application_credential_id", v.string),
            application_credential_secret=s.take(
                "application_credential_secret_file", _secret_file
            ),
            **common,
        )  # fmt: skip
    s.finish()
    return None, auth


def parse_config(data: object) -> Config:
    doc = v.Section(data, "")
    listen = doc.take("listen", v.listen_address, ("127.0.0.1", 9393))
    log_level = doc.take("log_level", v.choice("debug", "info", "warning", "error"), "info")

    glance = doc.section("glance")
    glance_url = glance.take("url", v.http_url, None)
    glance_timeout = glance.take("timeout", parse_duration, 30.0)
    catalog_timeout = glance.take("catalog_timeout", parse_duration, 60.0)
    if not 0 <= catalog_timeout <= 3600:
        raise ConfigError(glance.key("catalog_timeout"), "must be between 0s and 1h")
    glance.finish()

    authz = doc.section("authz")
    ttl = authz.take("ttl", parse_duration, 60.0)
    stale = authz.take("stale_if_error", parse_duration, 0.0)
    authz.finish()

    cache = doc.section("cache")
    cache_dir = cache.take("dir", lambda x: Path(v.string(x)), Path("/var/lib/cachenode"))
    if not cache_dir.is_absolute():
        raise ConfigError(cache.key("dir"), "must be an absolute path")
    policy = cache.take("policy", lambda x: load_policy(v.string(x)), None)
    janitor_interval = cache.take("janitor_interval", parse_duration, 30.0)
    if janitor_interval <= 0:
        raise ConfigError(cache.key("janitor_interval"), "must be more than 0s")
    access_flush_interval = cache.take("access_flush_interval", parse_duration, 5.0)
    if not 0 < access_flush_interval <= 300:
        raise ConfigError(cache.key("access_flush_interval"), "must be between 0s and 5m")
    if policy is None:
        policy = load_policy("default")
    cache.finish()

    tiers = tuple(_tier(path, item) for path, item in doc.items("tiers"))
    names = [t.name for t in tiers]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"tiers[{i}].name", f"{name!r} is used by an earlier tier")
    if not tiers and not doc.has("tiers"):
        # Without a tiers list, Glance itself is the one tier: the smallest useful config.
        tiers = (TierConfig(name="glance", kind="glance", url=glance_url or FROM_CATALOG),)

    admin = doc.section("admin")
    admin_listen = admin.take("listen", v.listen_address, ("127.0.0.1", 9394))
    admin_token = admin.take("token_file", _secret_file, None)
    admin.finish()
    if admin_listen == listen:
        raise ConfigError(
            "admin.listen", "must differ from listen (the admin plane never shares the data port)"
        )

    service_token, service_keystone = _service_auth(doc.section("service_auth"))
    # Both given: glance.url wins, on purpose. Hosts pointed at a regional cachenode (README, "A
    # regional cachenode") set it so that their calls go to the region's cache; the catalog names
    # Glance itself, and taking it would quietly bypass the regional for every host.
    if glance_url is None and service_keystone is None:
        raise ConfigError(
            "glance.url",
            "missing (give it, or service_auth.auth_url to find Glance in Keystone's catalog)",
        )
    for i, tier in enumerate(tiers):
        if tier.locations == "api" and service_token is None and service_keystone is None:
            raise ConfigError(
                f"tiers[{i}].locations", "api needs service_auth (the identity that asks Glance)"
            )
    notifications = doc.section("notifications")
    notifications_url = notifications.take("transport_url_file", _transport_url_file, None)
    notifications_durable = notifications.take("durable_exchange", _boolean, False)
    notifications.finish()
    handover = doc.section("handover")
    handover_path = handover.take("path", _unix_socket_path, None)
    handover.finish()
    doc.finish()

    return Config(
        listen=listen,
        glance_url=glance_url,
        glance_timeout=glance_timeout,
        glance_catalog_timeout=catalog_timeout,
        authz_ttl=ttl,
        authz_stale_if_error=stale,
        cache_dir=cache_dir,
        policy=policy,
        tiers=tiers,
        admin_listen=admin_listen,
        admin_token=admin_token,
        service_token=service_token,
        service_keystone=service_keystone,
        log_level=log_level,
        janitor_interval=janitor_interval,
        access_flush_interval=access_flush_interval,
        notifications_url=notifications_url,
        notifications_durable=notifications_durable,
        handover_path=handover_path,
    )


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check the config file at ``path``; raise ConfigError naming the bad key."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError("", f"{path}: not valid YAML{line}") from None
    return parse_config(data)


def where_glance(config: Config) -> str:
    """``glance.url``, or where the start will look for it: for logs and ``check-config``."""
    if config.glance_url is not None:
        return config.glance_url
    ks = config.service_keystone
    assert ks is not None  # parse_config: no glance.url without service_auth.auth_url
    region = f"region {ks.region_name}" if ks.region_name else "any region"
    return f"from Keystone's catalog (image, {ks.interface}, {region})"


def default_config_path() -> str:
    return os.environ.get("CACHENODE_CONFIG", DEFAULT_PATH)

"""The sidecar's own identity (``service_auth``): the credentials of warming and of the "deleted or
not yours?" check.

Two sources, one interface (``await identity.credentials()``):

- a static token from ``token_file`` (test beds): always the same token;
- keystoneauth1 options: a token from Keystone, renewed before it expires without a restart.

Decisions:

- keystoneauth1 does the talking to Keystone (v3 password or application credential, the catalog,
  TLS); it is synchronous, so every call runs in the default executor, never on the event loop;
  the catalog's at start, in a thread of its own (``_daemon``).
- Renewal is decided here, not by keystoneauth1's fixed 120 s margin: with short-lived tokens (a
  60 s Keystone) that margin would ask Keystone on every call. A token is renewed when less than a
  quarter of its lifetime, at most ``max_margin`` (120 s), is left; the clock is injectable.
- One renewal at a time (a lock): a burst of warms must not become a burst of logins.
- A failed renewal keeps the current token while it is still valid (Keystone may be restarting);
  once it has expired, callers get ``ServiceAuthFailed`` (a ``GlanceUnavailable``: the question to
  Glance cannot be asked), and the next call tries again.

Glance's endpoint from the catalog (no ``glance.url``; ``glance_endpoint``), at start only:

- keystoneauth1 reads the catalog (service type ``image``, ``interface``, ``region_name``), without
  version discovery: the catalog's URL is Glance's root, as Glance's install guides register it,
  and the sidecar adds ``/v2/...`` itself. Without ``region_name`` the first region listed is used.
- The URL is another service's word: it must pass the config's own rule for URLs
  (``validate.http_url``: http(s), a host, no user or password, no query or fragment), or the start
  stops. Nothing is served before it is known: a sidecar that does not know where Glance is can
  authorize nothing, and serving cached bytes without Glance's yes is never an option.
- Keystone unreachable or failing (5xx), or no such endpoint yet (a cloud still being registered):
  asked again, 1 s, 2 s, 4 s ... apart (at most 10 s), for ``glance.catalog_timeout`` (60 s); then
  the start fails with one line and exit status 1, and systemd or the kubelet restarts it with
  their own backoff. Keystone refusing the credentials (4xx) or an unusable URL stops at once:
  asking again cannot fix them.
- Read once: an endpoint moved in the catalog is seen at the next restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

from keystoneauth1 import exceptions as ks_exceptions
from keystoneauth1 import session as ks_session
from keystoneauth1.access import AccessInfo
from keystoneauth1.identity import v3
from keystoneauth1.identity.base import BaseIdentityPlugin

from cachenode import validate
from cachenode.config import Config, KeystoneAuth
from cachenode.errors import NoGlanceEndpoint, ServiceAuthFailed
from cachenode.glance import Credentials
from cachenode.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")


def _plugin(cfg: KeystoneAuth) -> BaseIdentityPlugin:
    if cfg.auth_type == "v3applicationcredential":
        assert cfg.application_credential_secret is not None
        return v3.ApplicationCredential(
            auth_url=cfg.auth_url,
            application_credential_id=cfg.application_credential_id,
            application_credential_secret=cfg.application_credential_secret.reveal(),
        )
    assert cfg.password is not None
    return v3.Password(
        auth_url=cfg.auth_url,
        username=cfg.username,
        password=cfg.password.reveal(),
        project_name=cfg.project_name,
        user_domain_name=cfg.user_domain_name,
        project_domain_name=cfg.project_domain_name,
    )


class ServiceIdentity:
    """Who the sidecar is when it asks Glance on its own behalf."""

    def __init__(
        self,
        static: Credentials | None = None,
        keystone: KeystoneAuth | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        max_margin: float = 120.0,
        timeout: float = 30.0,
    ) -> None:
        self._static = static
        self._keystone = keystone
        self._metrics = metrics
        self.clock = clock
        self.max_margin = max_margin
        self._plugin = _plugin(keystone) if keystone is not None else None
        self._session = ks_session.Session(auth=self._plugin, timeout=timeout)
        self._access: AccessInfo | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_config(cls, config: Config, metrics: Metrics | None = None) -> ServiceIdentity | None:
        """None when ``service_auth`` is empty: no warming, no "deleted or not yours?" check."""
        if config.service_keystone is not None:
            return cls(keystone=config.service_keystone, metrics=metrics)
        if config.service_token is not None:
            return cls(static=Credentials.token(config.service_token.reveal()))
        return None

    async def credentials(self) -> Credentials:
        if self._static is not None:
            return self._static
        async with self._lock:
            access = self._access
            if access is None or self._expires_in(access) < self._margin(access):
                access = await self._renew(access)
            return Credentials.token(_token(access))

    def _expires_in(self, access: AccessInfo) -> float:
        return _timestamp(access.expires) - self.clock()

    def _margin(self, access: AccessInfo) -> float:
        issued = access.issued
        lifetime = _timestamp(access.expires) - _timestamp(issued) if issued else 0.0
        return min(self.max_margin, max(lifetime, 0.0) / 4)

    async def _renew(self, current: AccessInfo | None) -> AccessInfo:
        assert self._plugin is not None
        try:
            access = await asyncio.get_running_loop().run_in_executor(None, self._login)
        except ks_exceptions.ClientException as exc:
            self._count("error")
            if current is not None and self._expires_in(current) > 0:
                log.warning("service_auth: renewal failed, keeping the current token: %s", exc)
                return current
            raise ServiceAuthFailed(
                f"service_auth: cannot get a token from Keystone: {exc}"
            ) from exc
        self._count("ok")
        self._access = access
        log.info("service_auth: token renewed, expires in %.0fs", self._expires_in(access))
        return access

    def _login(self) -> AccessInfo:
        """Blocking: a new token from Keystone (runs in the executor)."""
        assert self._plugin is not None
        self._plugin.invalidate()
        return self._plugin.get_access(self._session)

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.service_auth_renewals.labels(outcome).inc()

    def token_now(self) -> str:
        """Blocking, for the command line (``cachenode warm --tag``): a token for one run."""
        if self._static is not None:
            return dict(self._static.headers)["X-Auth-Token"]
        try:
            return _token(self._login())
        except ks_exceptions.ClientException as exc:
            raise ServiceAuthFailed(
                f"service_auth: cannot get a token from Keystone: {exc}"
            ) from exc

    async def glance_endpoint(
        self,
        wait: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> str:
        """Glance's endpoint from Keystone's catalog, asked again for ``wait`` seconds while the
        answer may still change (see the module's docstring); NoGlanceEndpoint after that."""
        started, delay, attempts = clock(), 1.0, 0
        while True:
            attempts += 1
            left = wait - (clock() - started)
            # one attempt never outlasts what is left by much (at least 1 s, at most 30 s)
            timeout = min(30.0, max(1.0, left))
            try:
                return await _daemon(functools.partial(self.glance_endpoint_now, timeout))
            except NoGlanceEndpoint as exc:
                left = wait - (clock() - started)
                if exc.final or left <= 0:
                    times = "once" if attempts == 1 else f"{attempts} times"
                    took = f"asked {times} in {clock() - started:.0f}s"
                    raise NoGlanceEndpoint(f"{exc} ({took})", exc.final) from None
                pause = min(delay, left)
                log.warning("%s; asking again in %.0fs", exc, pause)
                await sleep(pause)
                delay = min(delay * 2, 10.0)

    def glance_endpoint_now(self, timeout: float = 30.0) -> str:
        """Blocking: one look at the catalog (the CLI, and each attempt of ``glance_endpoint``)."""
        cfg, plugin = self._keystone, self._plugin
        if cfg is None or plugin is None:
            raise NoGlanceEndpoint("glance endpoint: service_auth has no auth_url", final=True)
        where = f"interface {cfg.interface}, " + (
            f"region {cfg.region_name}" if cfg.region_name else "any region"
        )
        session = ks_session.Session(auth=plugin, timeout=timeout)
        try:
            url = session.get_endpoint(
                service_type="image",
                interface=cfg.interface,
                region_name=cfg.region_name,
                skip_discovery=True,
            )
        except ks_exceptions.EndpointNotFound:  # what keystoneauth1 raises, or answers None
            url = None
        except ks_exceptions.HttpError as exc:
            lasting = 400 <= (exc.http_status or 500) < 500 and exc.http_status not in (408, 429)
            raise NoGlanceEndpoint(
                f"glance endpoint: Keystone at {cfg.auth_url} answered {_one_line(exc)}",
                final=lasting,
            ) from None
        except ks_exceptions.ClientException as exc:  # connect, timeout, TLS, a bad answer
            raise NoGlanceEndpoint(
                f"glance endpoint: cannot ask Keystone at {cfg.auth_url}: {_one_line(exc)}"
            ) from None
        if not url:
            raise NoGlanceEndpoint(
                f"glance endpoint: Keystone's catalog has no image endpoint for {where}"
            )
        try:
            url = validate.http_url(url)
        except ValueError as exc:  # the URL itself is not logged: it may hold a password
            raise NoGlanceEndpoint(
                f"glance endpoint: the catalog's image endpoint for {where} is refused: {exc}",
                final=True,
            ) from None
        url = unversioned(url)
        log.info("glance endpoint from Keystone's catalog (image, %s): %s", where, url)
        return url


def unversioned(url: str) -> str:
    """Glance's root from a catalog URL registered with its API version (``.../v2``), as some
    clouds do: every path cachenode asks for starts with the version already."""
    return re.sub(r"/v\d+(?:\.\d+)?/?$", "", url.rstrip("/")) or url


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _timestamp(when: datetime | None) -> float:
    """A token without an expiry is treated as expired: renewed at the next call."""
    return when.timestamp() if when is not None else 0.0


def _token(access: AccessInfo) -> str:
    token = access.auth_token
    if not token:
        raise ServiceAuthFailed("service_auth: Keystone answered without a token")
    return token


def _daemon(call: Callable[[], T]) -> asyncio.Future[T]:
    """``call`` in a thread of its own, which the process's exit does not wait for. An attempt
    on the catalog at start may hang for its whole timeout (a Keystone that takes the connection
    and says nothing); a stop asked for meanwhile abandons the start (``Sidecar._unless_stopped``)
    and must not then wait for it, as it would for a thread of the default executor."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(set_it: Callable[[Any], None], value: object) -> None:
        if not future.cancelled():  # cancelled: the start was abandoned
            set_it(value)

    def run() -> None:
        try:
            outcome: tuple[Callable[[Any], None], object] = (future.set_result, call())
        except BaseException as exc:  # handed to the awaiting coroutine
            outcome = (future.set_exception, exc)
        # The loop is closed when the start was abandoned and the process is ending.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="keystone-catalog", daemon=True).start()
    return future

"""The sidecar's own identity (``service_auth``): the credentials of warming and of the "deleted or
not yours?" check.

Two sources, one interface (``await identity.credentials()``):

- a static token from ``token_file`` (test beds): always the same token;
- keystoneauth1 options: a token from Keystone, renewed before it expires without a restart.

Decisions:

- keystoneauth1 does the talking to Keystone (v3 password or application credential, the catalog,
  TLS); it is synchronous, so every call runs in the default executor, never on the event loop.
- Renewal is decided here, not by keystoneauth1's fixed 120 s margin: with short-lived tokens (a
  60 s Keystone) that margin would ask Keystone on every call. A token is renewed when less than a
  quarter of its lifetime, at most ``max_margin`` (120 s), is left; the clock is injectable.
- One renewal at a time (a lock): a burst of warms must not become a burst of logins.
- A failed renewal keeps the current token while it is still valid (Keystone may be restarting);
  once it has expired, callers get ``ServiceAuthFailed`` (a ``GlanceUnavailable``: the question to
  Glance cannot be asked), and the next call tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime

from keystoneauth1 import exceptions as ks_exceptions
from keystoneauth1 import session as ks_session
from keystoneauth1.access import AccessInfo
from keystoneauth1.identity import v3
from keystoneauth1.identity.base import BaseIdentityPlugin

from cachenode.config import Config, KeystoneAuth
from cachenode.errors import ServiceAuthFailed
from cachenode.glance import Credentials
from cachenode.metrics import Metrics

log = logging.getLogger(__name__)


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


def _timestamp(when: datetime | None) -> float:
    """A token without an expiry is treated as expired: renewed at the next call."""
    return when.timestamp() if when is not None else 0.0


def _token(access: AccessInfo) -> str:
    token = access.auth_token
    if not token:
        raise ServiceAuthFailed("service_auth: Keystone answered without a token")
    return token

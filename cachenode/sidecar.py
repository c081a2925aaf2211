"""The sidecar process: builds every part from the config, starts both listeners, stops cleanly."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from aiohttp import web

from cachenode import activation
from cachenode.admin import Admin
from cachenode.authz import Authorizer
from cachenode.config import Config
from cachenode.fill import Fills
from cachenode.glance import GlanceClient
from cachenode.identity import ServiceIdentity
from cachenode.janitor import Janitor, Warmer
from cachenode.local import Local
from cachenode.locations import Locator
from cachenode.metrics import Metrics
from cachenode.notifications import Invalidator, Listener
from cachenode.proxy import Pools, Proxy
from cachenode.server import DataPlane, UnparsableRequests
from cachenode.tiers import TierSet, build_tier

log = logging.getLogger(__name__)


class Sidecar:
    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.local = Local(config.cache_dir, self.metrics, config.policy,
                           config.access_flush_interval)  # fmt: skip
        self.ready = False
        self._runners: list[web.AppRunner] = []
        self._pools: Pools | None = None
        self._janitor_task: asyncio.Task[None] | None = None
        self.listener: Listener | None = None
        self.locator: Locator | None = None

    async def start(self) -> None:
        cfg = self.config
        logging.getLogger("aiohttp.server").addFilter(UnparsableRequests())
        # Sockets systemd passed are taken first: one it should not have passed stops the start
        # before anything is opened.
        wanted = {"listen": cfg.listen, "admin.listen": cfg.admin_listen}
        passed = await asyncio.to_thread(activation.inherited, wanted)
        await self.local.start()
        # One pool for calls of one round trip, one for image data (see Pools).
        self._pools = Pools.open(cfg.glance_timeout)
        glance = GlanceClient(self._pools.short, cfg.glance_url, cfg.glance_timeout)
        service = ServiceIdentity.from_config(cfg, self.metrics)
        # Only a swift tier with ``locations: api`` asks (config checks that service_auth is set).
        self.locator = Locator(glance, service, self.metrics) if service else None
        self.tiers = TierSet([build_tier(t, self.locator) for t in cfg.tiers], self.metrics)
        self.metrics.prime([t.name for t in cfg.tiers])
        self.janitor = Janitor(self.local, cfg.policy, self.metrics, cfg.janitor_interval)
        self.fills = Fills(self.local, self.tiers, self.metrics, make_room=self.janitor.make_room)
        self.proxy = Proxy(cfg.glance_url, self._pools)
        warmer = Warmer(glance, self.fills, self.local, service, cfg.policy) if service else None
        authz = Authorizer(glance, self.metrics, cfg.authz_ttl, cfg.authz_stale_if_error)
        plane = DataPlane(
            authz=authz,
            glance=glance, local=self.local, fills=self.fills, proxy=self.proxy,
            metrics=self.metrics, service_identity=service,
        )  # fmt: skip
        await self.janitor.sweep()
        admin = Admin(self.metrics, self.local, self.fills, self.janitor, warmer, cfg.policy,
                      cfg.admin_token, lambda: self.ready,
                      self._listen_notifications(authz, warmer))  # fmt: skip
        await self._listen(admin.app(), cfg.admin_listen, passed.get("admin.listen"))
        await self._listen(plane.app(), cfg.listen, passed.get("listen"))
        self._janitor_task = asyncio.create_task(self.janitor.run(warmer), name="janitor")
        self.ready = True
        log.info(
            "cachenode serving on %s:%d (admin %s:%d%s), glance %s, tiers %s, policy %s",
            *cfg.listen,
            *cfg.admin_listen,
            ", sockets from systemd: " + " ".join(sorted(passed)) if passed else "",
            cfg.glance_url,
            ",".join(t.name for t in cfg.tiers) or "none",
            cfg.policy.name,
        )

    def _listen_notifications(
        self, authz: Authorizer, warmer: Warmer | None
    ) -> Callable[[], str] | None:
        """Start the listener on Glance's notifications, if configured; its state for /readyz."""
        if self.config.notifications_url is None:
            return None
        self.metrics.listening()
        act = Invalidator(self.metrics, self._forget(authz), self.local.evict,
                          warmer.activated if warmer else None, self.fills.stop)  # fmt: skip
        self.listener = Listener(self.config.notifications_url.reveal(), act, self.metrics,
                                 asyncio.get_running_loop(), authz.forget_all,
                                 self.config.notifications_durable)  # fmt: skip
        self.listener.start()
        return self.listener.state

    def _forget(self, authz: Authorizer) -> Callable[[str], None]:
        """What a changed image drops: remembered decisions, and where Glance said it lives."""

        def forget(image_id: str) -> None:
            authz.forget(image_id)
            if self.locator is not None:
                self.locator.forget(image_id)

        return forget

    async def _listen(
        self, app: web.Application, address: tuple[str, int], sock: socket.socket | None
    ) -> None:
        """Serve ``app`` on the socket systemd passed, else on ``address``. On SIGTERM the
        listener closes first (systemd's copy of a passed socket stays open, so new connections
        wait in its backlog for the next process), then streams in flight get this long to finish
        before they are cut (the unit and the DaemonSet allow 30 s in all)."""
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=15.0)
        await runner.setup()
        site = (
            web.SockSite(runner, sock, backlog=1024)
            if sock is not None
            else web.TCPSite(runner, address[0], address[1], backlog=1024)
        )
        await site.start()
        self._runners.append(runner)

    async def stop(self) -> None:
        self.ready = False
        if self._janitor_task is not None:
            self._janitor_task.cancel()
        if self.listener is not None:
            await asyncio.to_thread(self.listener.stop)
        for runner in reversed(self._runners):
            await runner.cleanup()
        await self.fills.close()
        await self.tiers.close()
        if self._pools is not None:
            await self._pools.close()
        await self.local.stop()

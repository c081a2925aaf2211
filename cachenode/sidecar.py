"""The sidecar process: builds every part from the config, starts both listeners, stops cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from cachenode import activation, handover
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

ACCEPTED_GRACE = 1.0  # seconds a connection accepted before a stop has to send its request

T = TypeVar("T")


class StartAbandoned(Exception):
    """A stop was asked for while the start waited on something outside this process (what it
    waited for, in one line). Not a CachenodeError: nothing failed, the process ends as stopped."""


class Sidecar:
    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.ready = False
        self.handed_over = asyncio.Event()  # set once a new sidecar took the listening sockets
        self.stop_requested = asyncio.Event()  # SIGTERM, SIGINT (cachenode.cli), at any time
        self._giver: handover.Giver | None = None
        self._cache_lock: int | None = None
        self._runners: list[web.AppRunner] = []
        self._pools: Pools | None = None
        self._janitor_task: asyncio.Task[None] | None = None
        self.listener: Listener | None = None
        self.locator: Locator | None = None

    async def start(self) -> None:
        cfg = self.config
        logging.getLogger("aiohttp.server").addFilter(UnparsableRequests())
        service = ServiceIdentity.from_config(cfg, self.metrics)
        # Before the sockets: a successor that cannot learn where Glance is must not take them
        # from a running sidecar (handover), nor hold callers in a backlog it will never serve.
        glance_url = cfg.glance_url
        if glance_url is None:
            assert service is not None  # config: no glance.url without service_auth.auth_url
            glance_url = await self._unless_stopped(
                "Keystone's catalog to name Glance",
                service.glance_endpoint(cfg.glance_catalog_timeout),
            )
            cfg = self.config = cfg.with_glance_url(glance_url)  # and the implicit glance tier
        # Then the listening sockets: one systemd should not have passed, or a port in use, stops
        # the start before anything is opened. From here connections wait in the backlog.
        wanted = {"listen": cfg.listen, "admin.listen": cfg.admin_listen}
        # A start already asked to stop never takes a running sidecar's sockets to close them.
        if self.stop_requested.is_set():
            raise StartAbandoned("the listening sockets")
        socks, origin = await asyncio.to_thread(self._sockets, wanted)
        if cfg.handover_path is not None:  # the cache is one process's (cachenode.handover)
            self._cache_lock = await self._lock_cache(socks)
        self.local = Local(cfg.cache_dir, self.metrics, cfg.policy, cfg.access_flush_interval)
        await self.local.start()
        # One pool for calls of one round trip, one for image data (see Pools).
        self._pools = Pools.open(cfg.glance_timeout)
        glance = GlanceClient(self._pools.short, glance_url, cfg.glance_timeout)
        # Only a swift tier with ``locations: api`` asks (config checks that service_auth is set).
        self.locator = Locator(glance, service, self.metrics) if service else None
        self.tiers = TierSet([build_tier(t, self.locator) for t in cfg.tiers], self.metrics)
        self.metrics.prime([t.name for t in cfg.tiers])
        self.janitor = Janitor(self.local, cfg.policy, self.metrics, cfg.janitor_interval)
        self.fills = Fills(self.local, self.tiers, self.metrics, make_room=self.janitor.make_room)
        self.proxy = Proxy(glance_url, self._pools)
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
        await self._listen(admin.app(), socks["admin.listen"])
        await self._listen(plane.app(), socks["listen"])
        self._janitor_task = asyncio.create_task(self.janitor.run(warmer), name="janitor")
        if cfg.handover_path is not None:
            self._giver = handover.Giver(
                cfg.handover_path, socks, self.handed_over.set, self.metrics
            )
            await self._giver.start()
        self.ready = True
        log.info(
            "cachenode serving on %s:%d (admin %s:%d%s), glance %s, tiers %s, policy %s",
            *cfg.listen,
            *cfg.admin_listen,
            origin,
            glance_url,
            ",".join(t.name for t in cfg.tiers) or "none",
            cfg.policy.name,
        )

    async def _unless_stopped(self, what: str, wait: Awaitable[T]) -> T:
        """What ``wait`` gives, unless a stop is asked for first: then ``wait`` is cancelled and
        the start abandoned at once (StartAbandoned). Every wait of the start on something outside
        this process goes through here (``what`` names it): it may last minutes (Keystone down,
        the previous sidecar's drain), and the SIGTERM of an orchestrator that gave up on this
        start must end it within its grace period, not after the wait. The start's own work is
        short, and a stop asked for meanwhile is acted on once it is done."""
        waiting = asyncio.ensure_future(wait)
        stop = asyncio.create_task(self.stop_requested.wait())
        try:
            done, _ = await asyncio.wait((waiting, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not waiting.done():
                waiting.cancel()
                # Whatever it ends with now (cancelled, or an error of the last instant), the
                # start is abandoned: the stop was asked for first.
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await waiting
        if waiting not in done:
            raise StartAbandoned(what)
        return waiting.result()

    async def _lock_cache(self, socks: dict[str, socket.socket]) -> int:
        """The cache's lock (``handover.lock_cache``), for as long as the previous sidecar holds it.
        A start that ends here, stopped or failed, closes the listening sockets first (its own
        descriptors: systemd keeps its own). Sockets it bound: nobody else listens there. Sockets
        it took over: the previous sidecar closed its descriptors on handing them over and went
        on to stop, so no process will accept what is queued in them once this one ends; closing
        them now answers those callers at once (a reset, an error they can retry) instead of at
        exit, the same answer. Handing them back would need the previous sidecar to accept again
        after its stop began, a second direction of the protocol for a rare case; the next start
        binds the ports afresh."""
        try:
            return await self._unless_stopped(
                f"the previous sidecar to close {self.config.cache_dir}",
                handover.lock_cache(self.config.cache_dir),
            )
        except BaseException:
            for sock in socks.values():
                sock.close()
            raise

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

    def _sockets(self, wanted: dict[str, tuple[str, int]]) -> tuple[dict[str, socket.socket], str]:
        """Each listener's socket: systemd's, else the running sidecar's (``handover.path``),
        else one bound here; and where they came from, for the log (blocking)."""
        socks, origin = activation.inherited(wanted), "systemd"
        if not socks and self.config.handover_path is not None:
            socks = handover.take(self.config.handover_path, wanted, self.metrics)
            origin = "the old sidecar"
        said = f", sockets from {origin}: " + " ".join(sorted(socks)) if socks else ""
        try:
            for key, address in wanted.items():
                if key not in socks:
                    socks[key] = activation.bind(address)
        except OSError:
            for sock in socks.values():
                sock.close()
            raise
        return socks, said

    async def _listen(self, app: web.Application, sock: socket.socket) -> None:
        """Serve ``app`` on ``sock``. On SIGTERM, or once a new sidecar took the sockets, the
        listener closes first: this process's descriptor only, never a shutdown of the socket, so
        with systemd's or the new sidecar's descriptor still open, new connections wait in its
        backlog for the next process. Then streams in flight get this long to finish before they
        are cut (the unit and the DaemonSet allow 30 s in all)."""
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=15.0)
        await runner.setup()
        await web.SockSite(runner, sock, backlog=1024).start()
        self._runners.append(runner)

    async def _stop_accepting(self) -> None:
        """Close the listening sockets (this process's copies), then give each connection
        accepted just before that up to ACCEPTED_GRACE seconds to send its first request.

        aiohttp's shutdown closes every connection with no request in progress. A caller whose
        connection this process accepted an instant before the close (a successor took the
        sockets, systemd restarts the service), and whose request was still on its way, would
        see its connection dropped unanswered; its request is served instead, and the streams in
        flight finish as before."""
        for runner in self._runners:
            for site in list(runner.sites):
                await site.stop()
        for _ in range(round(ACCEPTED_GRACE / 0.01)):  # aiohttp tells nobody of a request's start
            if not any(
                _awaiting_first_request(conn)
                for runner in self._runners
                if runner.server is not None
                for conn in runner.server.connections
            ):
                break
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop serving and close the cache. The cache's lock is let go however the stop ends: a
        sidecar that handed its sockets over waits for its SIGTERM after this (cachenode.cli),
        and its successor waits for the lock for as long as it is held."""
        self.ready = False
        try:
            if self._giver is not None:
                await self._giver.close()
            if self._janitor_task is not None:
                self._janitor_task.cancel()
            if self.listener is not None:
                await asyncio.to_thread(self.listener.stop)
            await self._stop_accepting()
            for runner in reversed(self._runners):
                await runner.cleanup()
            await self.fills.close()
            await self.tiers.close()
            if self._pools is not None:
                await self._pools.close()
            await self.local.stop()
        finally:
            if self._cache_lock is not None:
                os.close(self._cache_lock)  # the next sidecar may open the cache now
                self._cache_lock = None


def _awaiting_first_request(conn: object) -> bool:
    """Whether an accepted connection has not sent a request yet (aiohttp counts the requests
    it parsed on each connection; without that count, no connection is waited for)."""
    return getattr(conn, "_request_count", 1) == 0

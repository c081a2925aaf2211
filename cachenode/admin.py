"""The admin plane (SPEC §6), on its own listener: metrics, health, and a JSON API for operators.

``/metrics``, ``/healthz`` and ``/readyz`` are open (a scraper and a kubelet have no token); the
JSON API under ``/admin/v1/`` requires ``Authorization: Bearer <admin token>`` and is refused
entirely when no ``admin.token_file`` is configured. The ``cachenode`` CLI is its client.

    GET    /admin/v1/images              every entry in L1 and every fill in progress
    GET    /admin/v1/images/{id}         one of them (404 when neither)
    GET    /admin/v1/fills               the fills in progress only (what ``warm`` follows)
    POST   /admin/v1/images/{id}/warm    fill it now, with the service credentials (202)
    PUT    /admin/v1/images/{id}/pin     never evict it (it may not be cached yet)
    DELETE /admin/v1/images/{id}/pin
    POST   /admin/v1/evict               {"ids": [...]} | {"all": true} | {"idle_for": "7d"}, +force
    POST   /admin/v1/verify              re-hash every entry, evict those that fail
    GET    /admin/v1/stats
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cachenode.catalog import Entry
from cachenode.config import Secret
from cachenode.errors import AdminError, CachenodeError, http_status
from cachenode.fill import Fill, Fills
from cachenode.glance import is_image_id
from cachenode.janitor import Janitor, Warmer
from cachenode.local import Local
from cachenode.metrics import Metrics
from cachenode.policy import Policy, is_pinned
from cachenode.units import parse_duration


@dataclass
class Admin:
    metrics: Metrics
    local: Local
    fills: Fills
    janitor: Janitor
    warmer: Warmer | None
    policy: Policy
    token: Secret | None
    ready: Callable[[], bool]
    # the notification listener's state, for /readyz's detail (None: no listener configured)
    notifications: Callable[[], str] | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        r = app.router
        r.add_get("/metrics", self.metrics_text)
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/admin/v1/images", self.list_images)
        r.add_get("/admin/v1/images/{image_id}", self.show_image)
        r.add_get("/admin/v1/fills", self.list_fills)
        r.add_post("/admin/v1/images/{image_id}/warm", self.warm)
        r.add_put("/admin/v1/images/{image_id}/pin", self.pin)
        r.add_delete("/admin/v1/images/{image_id}/pin", self.unpin)
        r.add_post("/admin/v1/evict", self.evict)
        r.add_post("/admin/v1/verify", self.verify)
        r.add_get("/admin/v1/stats", self.stats)
        return app

    # -- open endpoints
    async def metrics_text(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready or not; a listener that lost the bus is a detail, never a reason to be unready
        (downloads do not need it: ``authz.ttl`` still bounds every remembered decision)."""
        detail = f"notifications: {self.notifications()}\n" if self.notifications else ""
        if self.ready():
            return web.Response(text="ready\n" + detail)
        return web.Response(status=503, text="not ready\n" + detail)

    # -- the JSON API
    async def list_images(self, request: web.Request) -> web.Response:
        pins = await self.local.pins()
        entries = await self.local.entries()
        images = [self._entry(e, pins) for e in sorted(entries, key=lambda e: e.image_id)]
        images += [self._fill(f) for f in self.fills.running()]
        return web.json_response({"images": images})

    async def list_fills(self, request: web.Request) -> web.Response:
        return web.json_response({"fills": [self._fill(f) for f in self.fills.running()]})

    async def show_image(self, request: web.Request) -> web.Response:
        image_id = _image_id(request)
        if (fill := self.fills.get(image_id)) is not None:
            return web.json_response(self._fill(fill))
        entry = await self.local.get(image_id)
        if entry is None:
            raise AdminError(404, f"{image_id} is not in this cache")
        return web.json_response(self._entry(entry, await self.local.pins()))

    async def warm(self, request: web.Request) -> web.Response:
        image_id = _image_id(request)
        if self.warmer is None:
            raise AdminError(409, "warming needs service_auth in the config")
        images = await self.warmer.selected(ids=(image_id,))
        if not images:
            raise AdminError(409, f"{image_id} is not active in Glance")
        state = await self.warmer.warm(images[0])
        status = {"filling": 202, "cached": 200}.get(state, 409)
        image = images[0]
        return web.json_response(
            {"id": image_id, "state": state, "size": image.size, "name": image.name},
            status=status,
        )

    async def pin(self, request: web.Request) -> web.Response:
        image_id = _image_id(request)
        await self.local.pin(image_id)
        return web.json_response({"id": image_id, "pinned": True})

    async def unpin(self, request: web.Request) -> web.Response:
        image_id = _image_id(request)
        if not await self.local.unpin(image_id):
            raise AdminError(404, f"{image_id} was not pinned")
        return web.json_response({"id": image_id, "pinned": False})

    async def evict(self, request: web.Request) -> web.Response:
        body = await _json(request)
        force = bool(body.get("force", False))
        entries = await self.local.entries()
        if body.get("all"):
            chosen = entries
        elif "idle_for" in body:
            try:
                idle = parse_duration(body["idle_for"])
            except ValueError as exc:
                raise AdminError(400, f"idle_for: {exc}") from None
            chosen = [e for e in entries if time.time() - e.last_access > idle]
        elif isinstance(body.get("ids"), list):
            wanted = {str(i) for i in body["ids"]}
            chosen = [e for e in entries if e.image_id in wanted]
        else:
            raise AdminError(400, 'give "ids", "all" or "idle_for"')
        pins = await self.local.pins()
        evicted, kept = [], []
        for entry in chosen:
            if not force and is_pinned(self.policy, entry, pins):
                kept.append(entry.image_id)
            elif await self.local.evict(entry.image_id, "requested"):
                evicted.append(entry.image_id)
        return web.json_response({"evicted": evicted, "kept_pinned": kept})

    async def verify(self, request: web.Request) -> web.Response:
        checked, failed = 0, []
        for entry in await self.local.entries():
            checked += 1
            if not await self.local.verify(entry):
                await self.local.evict(entry.image_id, "verify")
                failed.append(entry.image_id)
        return web.json_response({"checked": checked, "failed": failed})

    async def stats(self, request: web.Request) -> web.Response:
        usage = await self.local.usage()
        requests = {
            s.labels["status"]: int(s.value)
            for s in _samples(self.metrics, "cachenode_requests_total")
        }
        served = sum(requests.get(k, 0) for k in ("hit", "miss", "joined", "bypass"))
        return web.json_response({
            "entries": self.local.total_entries,
            "bytes": usage.cache_bytes,
            "capacity_bytes": self.policy.max_bytes.resolve(usage.disk_total),
            "disk_free_bytes": usage.disk_free,
            "inflight_fills": len(self.fills.running()),
            "policy": self.policy.name,
            "requests": requests,
            "hit_ratio": round(requests.get("hit", 0) / served, 4) if served else None,
        })  # fmt: skip

    # -- plumbing
    def _entry(self, entry: Entry, pins: frozenset[str]) -> dict[str, Any]:
        return {
            "id": entry.image_id, "state": "cached", "size": entry.size, "tier": entry.tier,
            "created": entry.created, "last_access": entry.last_access, "hits": entry.hits,
            "pinned": is_pinned(self.policy, entry, pins), "hash_algo": entry.hash_algo,
        }  # fmt: skip

    @staticmethod
    def _fill(fill: Fill) -> dict[str, Any]:
        """A fill in progress: bytes landed of its size, the tier they come from, its priority
        (``warm`` or ``caller``) and whether it is queued for a tier's slot."""
        return {"id": fill.image.id, "name": fill.image.name, "state": "filling",
                "size": fill.size, "landed": fill.landed,
                "tier": fill.tier, "priority": fill.ticket.priority.value,
                "queued": fill.ticket.queued}  # fmt: skip

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/admin/"):
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {self.token.reveal()}" if self.token else None
            if expected is None or not hmac.compare_digest(given.encode(), expected.encode()):
                return _error(401, "admin token required", {"WWW-Authenticate": "Bearer"})
        try:
            return await handler(request)
        except CachenodeError as exc:
            return _error(*http_status(exc))


def _image_id(request: web.Request) -> str:
    image_id = request.match_info["image_id"]
    if not is_image_id(image_id):
        raise AdminError(400, "not an image id (a lowercase UUID)")
    return image_id


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise AdminError(400, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise AdminError(400, "the body must be a JSON object")
    return body


def _samples(metrics: Metrics, name: str) -> list[Any]:
    return [s for family in metrics.registry.collect() for s in family.samples if s.name == name]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)

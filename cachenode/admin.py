"""The admin plane (SPEC §6), on its own listener: metrics, health and readiness.

``/metrics``, ``/healthz`` and ``/readyz`` are open (a scraper and a kubelet have no token); the
JSON API under ``/admin/v1/`` requires ``Authorization: Bearer <admin token>``.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cachenode.config import Secret
from cachenode.metrics import Metrics


def admin_app(metrics: Metrics, ready: Callable[[], bool], token: Secret | None) -> web.Application:
    async def metrics_handler(request: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    @web.middleware
    async def bearer(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/admin/"):
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {token.reveal()}" if token else None
            if expected is None or not hmac.compare_digest(given.encode(), expected.encode()):
                return web.json_response(
                    {"error": "admin token required"},
                    status=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    app = web.Application(middlewares=[bearer])
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app

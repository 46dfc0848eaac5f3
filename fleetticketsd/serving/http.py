"""The HTTP endpoint: /metrics, /healthz, /readyz and the status page (/), served from
the daemon's own loop.

Serving from the same event loop as the drains is deliberate: if the loop stalls,
/healthz stops answering and the orchestrator restarts the container. /healthz never
touches the database (a database outage must not get a healthy daemon killed);
/readyz does, and names each failing check.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

# check name -> None when fine, else what is wrong
ReadinessProbe = Callable[[], Awaitable[dict[str, str | None]]]
LivenessProbe = Callable[[], str | None]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_app(
    registry: CollectorRegistry, live: LivenessProbe, ready: ReadinessProbe, page: Handler | None = None
) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        problem = live()
        if problem:
            return web.json_response({"status": "unhealthy", "reason": problem}, status=503)
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        checks = await ready()
        failing = {name: why for name, why in checks.items() if why}
        body = {
            "status": "ready" if not failing else "not ready",
            "checks": {k: v or "ok" for k, v in checks.items()},
        }
        return web.Response(
            text=json.dumps(body),
            status=200 if not failing else 503,
            content_type="application/json",
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if page is not None:
        app.router.add_get("/", page)
    return app


async def start(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return runner

"""A geocoding provider on loopback that behaves as FEED.md says, for tests.

It speaks LocationIQ (``/search``, also Nominatim's shape) and OpenCage
(``/geocode/v1/json``) and enforces what a real provider enforces: the key, a
per-second limit answered with 429 "Rate Limited Second" when exceeded, a daily
quota (429 "Rate Limited Day" / OpenCage 402). What a query returns is decided by
``places``: the longest key the query starts with wins; a point answers, ``None``
(or no key) is "no match". Keys in ``fail_first`` answer 503 (with Retry-After) that
many times first; keys in ``slow`` answer only after that many seconds.

It runs in a thread with its own event loop so that synchronous tests (subprocesses)
and asynchronous ones alike can use it, and it records every request's arrival time
so tests can measure the spacing the worker achieves.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

KEY = "test-key"
# Points used across the tests: a cluster centroid, places near it, and one far away.
KILIMANI = (-1.2921, 36.7856)
JOGOO_KILIMANI = (-1.2950, 36.7900)  # ~0.6 km from KILIMANI
MOMBASA = (-4.0435, 39.6682)  # ~440 km from Kilimani: the wrong city


@dataclass
class Request:
    at: float  # time.monotonic() on arrival
    q: str
    status: int


@dataclass
class FakeGeocoder:
    places: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    per_second: int = 100  # requests allowed within any one second
    per_day: int | None = None
    fail_first: dict[str, int] = field(default_factory=dict)
    slow: dict[str, float] = field(default_factory=dict)
    retry_after_s: float = 0.0
    # Anything not in places: a point derived from the query (near Nairobi), or no match.
    default_point: bool = False
    requests: list[Request] = field(default_factory=list)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- what tests read -------------------------------------------------------------

    def queries(self) -> list[str]:
        with self._lock:
            return [r.q for r in self.requests]

    def statuses(self) -> Counter[int]:
        with self._lock:
            return Counter(r.status for r in self.requests)

    def arrivals(self) -> list[float]:
        with self._lock:
            return [r.at for r in self.requests]

    # --- behaviour ---------------------------------------------------------------------

    def _lookup(self, q: str) -> tuple[float, float] | None:
        for key in sorted(self.places, key=len, reverse=True):
            if q.startswith(key):
                return self.places[key]
        if self.default_point:
            h = sum(ord(c) for c in q)
            return (-1.28 + (h % 100) / 10000, 36.82 + (h % 37) / 10000)
        return None

    def _police(
        self, q: str, key: str | None, user_agent: str, dialect: str, now: float
    ) -> tuple[int, str, dict[str, str]] | None:
        """The checks a provider makes before it looks anything up; None when they pass."""
        if dialect == "nominatim":
            # No key; its usage policy bans anonymous clients instead.
            if not user_agent or user_agent.startswith("python-httpx"):
                return 403, "Access blocked: identify your application", {}
        elif key != KEY:
            return 401, "Invalid key", {}
        with self._lock:
            # 0.98 s, not 1 s: evenly spaced requests at exactly the limit must pass
            # despite timer jitter, and a burst still fails.
            recent = sum(1 for r in self.requests if now - r.at < 0.98 and r.status not in (401, 403))
            total = len(self.requests)
        if self.per_day is not None and total >= self.per_day:
            return 429, "Rate Limited Day", {}
        if recent >= self.per_second:
            return 429, "Rate Limited Second", {"Retry-After": "1"}
        for k, n in self.fail_first.items():
            if q.startswith(k) and n > 0:
                self.fail_first[k] = n - 1
                return 503, "Service Unavailable", {"Retry-After": str(self.retry_after_s)}
        return None

    async def _answer(self, request: web.Request, dialect: str) -> web.Response:
        now = time.monotonic()
        q = request.query.get("q", "")
        refused = self._police(
            q, request.query.get("key"), request.headers.get("User-Agent", ""), dialect, now
        )
        for k, delay in self.slow.items():
            if q.startswith(k):
                await asyncio.sleep(delay)
        point = self._lookup(q)
        status = refused[0] if refused else (200 if point or dialect != "locationiq" else 404)
        with self._lock:
            self.requests.append(Request(now, q, status))
        if refused:
            code, message, headers = refused
            if dialect == "opencage":
                code = 402 if message == "Rate Limited Day" else code
                return web.json_response(
                    {"status": {"code": code, "message": message}, "results": []},
                    status=code,
                    headers=headers,
                )
            return web.json_response({"error": message}, status=code, headers=headers)
        if dialect == "opencage":
            results: list[Any] = []
            if point:
                results = [{"geometry": {"lat": point[0], "lng": point[1]}, "formatted": f"fake: {q}"}]
            return web.json_response({"results": results, "status": {"code": 200, "message": "OK"}})
        if point is None:
            if dialect == "nominatim":
                return web.json_response([])
            return web.json_response({"error": "Unable to geocode"}, status=404)
        return web.json_response(
            [{"lat": str(point[0]), "lon": str(point[1]), "display_name": f"fake: {q}", "importance": 0.5}]
        )

    # --- server ------------------------------------------------------------------------------

    def start(self, dialect: str = "locationiq") -> FakeGeocoder:
        async def handle(request: web.Request) -> web.Response:
            return await self._answer(request, dialect)

        app = web.Application()
        app.router.add_get("/geocode/v1/json" if dialect == "opencage" else "/search", handle)
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._runner = web.AppRunner(app, access_log=None)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://127.0.0.1:{port}"
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="fake-geocoder", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        async def cleanup() -> None:
            await self._runner.cleanup()

        fut = asyncio.run_coroutine_threadsafe(cleanup(), self._loop)
        fut.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

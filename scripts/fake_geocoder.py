"""A geocoding provider on loopback that behaves as FEED.md says: for tests and the demo.

It speaks LocationIQ (``/search``, also Nominatim's shape) and OpenCage
(``/geocode/v1/json``) and enforces what a real provider enforces: the key, a
per-second limit answered with 429 "Rate Limited Second" when exceeded, a daily
quota (429 "Rate Limited Day" / OpenCage 402). What a query returns is decided by
``places``: the longest key the query starts with wins; a point answers, ``None``
(or no key) is "no match". Keys in ``fail_first`` answer 503 (with Retry-After) that
many times first; keys in ``slow`` answer only after that many seconds. With
``default_point``, any other query gets a made-up but plausible Kenyan point
(:func:`kenya_point`).

Two ways to run it:

- in a test, ``FakeGeocoder(...).start()`` serves it from a thread with its own event
  loop (so synchronous and asynchronous tests alike can use it) and records every
  request's arrival time, so tests can measure the spacing the worker achieves;
- as a program, ``python scripts/fake_geocoder.py --port N --key K`` (what
  ``scripts/run.py`` starts for the demo when no ``GEOCODER_API_KEY`` is set). It needs
  only aiohttp, not the tests or the project's package, and stops on SIGINT/SIGTERM.

Its points are NOT real coordinates; every answer's display name says so.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

DEFAULT_KEY = "test-key"
LABEL = "LOCAL FAKE geocoder, not a real place"

# Where made-up points go: a query naming one of these (the region the worker adds, or
# a town) lands near it; any other query near one of the first three, by its hash.
# The coastal and lakeside anchors sit a little inland, so that points stay on land.
ANCHORS: dict[str, tuple[float, float]] = {
    "nairobi": (-1.2864, 36.8172),
    "mombasa": (-4.0300, 39.6400),
    "kisumu": (-0.0800, 34.7900),
    "coast": (-4.0300, 39.6400),
    "western": (-0.0800, 34.7900),
    "central": (-1.0388, 37.0834),  # Thika
    "rift valley": (-0.3031, 36.0800),  # Nakuru
    "nakuru": (-0.3031, 36.0800),
    "eldoret": (0.5143, 35.2698),
    "thika": (-1.0388, 37.0834),
}
CLUSTER_SPREAD_KM = 6.0  # a cluster's point lies this close to its anchor
LOCATION_SPREAD_KM = 1.5  # a location's point lies this close to its cluster's


def _hash(seed: str, salt: str = "") -> int:
    """32 stable bits (``hash()`` differs between processes)."""
    return int.from_bytes(hashlib.sha256((salt + seed.lower()).encode()).digest()[:4], "big")


def _offset(seed: str, max_km: float) -> tuple[float, float]:
    """A deterministic (dlat, dlon) in degrees within ``max_km``, from a hash of ``seed``."""
    angle = _hash(seed, "angle:") / 2**32 * 2 * math.pi
    km = math.sqrt(_hash(seed, "radius:") / 2**32) * max_km  # uniform over the disc
    return km * math.sin(angle) / 111.0, km * math.cos(angle) / 111.0


def kenya_point(q: str) -> tuple[float, float]:
    """A plausible, deterministic point for a worker query such as
    "Jogoo Rd, Kilimani, Nairobi, Kenya" or "Kilimani, Nairobi, Kenya".

    The cluster (the part before the region) lands within ``CLUSTER_SPREAD_KM`` of the
    region's anchor, and each location within ``LOCATION_SPREAD_KM`` of its cluster's
    point, so the worker's wrong-city guard (25 km by default) accepts them and a map
    shows tickets in their cities.
    """
    parts = [p.strip() for p in q.split(",") if p.strip()]
    if parts and parts[-1].lower() == "kenya":
        parts.pop()
    region_at = next((i for i in reversed(range(len(parts))) if parts[i].lower() in ANCHORS), None)
    cluster_at = max(len(parts) - 1 if region_at is None else region_at - 1, 0)
    cluster = parts[cluster_at] if parts else q
    if region_at is not None:
        anchor = ANCHORS[parts[region_at].lower()]
    else:  # no region: one of the three big cities, by the cluster's hash
        anchor = list(ANCHORS.values())[_hash(cluster) % 3]
    dlat, dlon = _offset(cluster, CLUSTER_SPREAD_KM)
    lat, lon = anchor[0] + dlat, anchor[1] + dlon
    if cluster_at > 0:  # a location within the cluster
        dlat, dlon = _offset(q, LOCATION_SPREAD_KM)
        lat, lon = lat + dlat, lon + dlon
    return round(lat, 6), round(lon, 6)


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
    # Anything not in places: a point derived from the query (kenya_point), or no match.
    default_point: bool = False
    key: str = DEFAULT_KEY
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
        return kenya_point(q) if self.default_point else None

    def _police(
        self, q: str, key: str | None, user_agent: str, dialect: str, now: float
    ) -> tuple[int, str, dict[str, str]] | None:
        """The checks a provider makes before it looks anything up; None when they pass."""
        if dialect == "nominatim":
            # No key; its usage policy bans anonymous clients instead.
            if not user_agent or user_agent.startswith("python-httpx"):
                return 403, "Access blocked: identify your application", {}
        elif key != self.key:
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
                results = [{"geometry": {"lat": point[0], "lng": point[1]}, "formatted": f"{LABEL}: {q}"}]
            return web.json_response({"results": results, "status": {"code": 200, "message": "OK"}})
        if point is None:
            if dialect == "nominatim":
                return web.json_response([])
            return web.json_response({"error": "Unable to geocode"}, status=404)
        return web.json_response(
            [{"lat": str(point[0]), "lon": str(point[1]), "display_name": f"{LABEL}: {q}", "importance": 0.5}]
        )

    # --- server ------------------------------------------------------------------------------

    def app(self, dialect: str = "locationiq") -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            return await self._answer(request, dialect)

        app = web.Application()
        app.router.add_get("/geocode/v1/json" if dialect == "opencage" else "/search", handle)
        return app

    def start(self, dialect: str = "locationiq") -> FakeGeocoder:
        """Serve from a thread on a free loopback port (tests); ``url`` says where."""
        app = self.app(dialect)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="scripts/fake_geocoder.py",
        description="A LOCAL FAKE geocoding provider: made-up Kenyan points, not real coordinates.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--key", required=True, help="the only API key it accepts")
    p.add_argument("--dialect", choices=("locationiq", "opencage", "nominatim"), default="locationiq")
    p.add_argument("--per-second", type=int, default=2, help="requests allowed per second (else 429)")
    args = p.parse_args(argv)
    fake = FakeGeocoder(key=args.key, per_second=args.per_second, default_point=True)
    print(
        f"fake geocoder ({LABEL}): {args.dialect} on http://{args.host}:{args.port}, {args.per_second}/s",
        flush=True,
    )
    # run_app stops cleanly on SIGINT and SIGTERM.
    web.run_app(fake.app(args.dialect), host=args.host, port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

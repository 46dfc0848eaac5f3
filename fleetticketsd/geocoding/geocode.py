"""The geocoding worker: one queue, one pacer, one daily budget, one gazetteer.

Why it looks like this:

- The gazetteer (``tickets.geo_clusters``, ``tickets.geo_locations``) is the cache and
  the source of truth; the in-memory queue is only a work list. It is refilled from
  the database at start-up and after every drain pass, so a restart loses nothing,
  and a place is asked for only while it has no usable cache entry.
- Cluster centroids go first (priority 0): they are every ticket's fallback and the
  reference of the wrong-city guard for the cluster's locations (priority 1), which
  are only queued once their cluster has an answer.
- Requests go through one :class:`~.pacer.Pacer` for the worker's whole life: one in
  flight at a time, the next one ``1 / rate`` after the previous *answer*, so the
  provider never sees two closer than that, even when a connection set-up or a busy
  event loop delays a send (which is what made a limiter that spaces acquisitions
  collide with LocationIQ's per-second limit at start-up; see pacer.py). Its turns
  are shared with every other process on the database (a replica, a `geocode` run),
  and a 429 or a Retry-After pushes the next turn of all of them.
- The wrong-city guard is judged again whenever a centroid arrives or is corrected
  (tickets.judge_locations, migration 0010); an answer without a centroid to check it
  is stored 'unguarded', counted and shown, not taken silently.
- The daily budget is counted in PostgreSQL per provider and UTC day with an atomic
  conditional upsert, so a restart or a second replica cannot overspend it.
- The database decides where tickets are: storing a gazetteer row fires the
  migration's triggers, which re-resolve the affected tickets set-based; the
  wrong-city guard is ``ST_DWithin`` on geography in the same statement.
- Provider failures never kill the worker (a dead side task stops the daemon): auth
  failures pause it until a reload or restart, loudly; quota pauses it until 00:00 UTC.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, NamedTuple, TypeAlias

import asyncpg
import httpx
import structlog

from fleetticketsd.config import GeocoderConfig
from fleetticketsd.geocoding.pacer import DatabaseTurns, Pacer
from fleetticketsd.geocoding.providers import Answer, Provider, make_provider
from fleetticketsd.metrics import GEOCODE_OUTCOMES, Metrics

log = structlog.get_logger("fleetticketsd.geocoding.geocode")

Kind = Literal["cluster", "location"]
CLUSTER, LOCATION = 0, 1  # queue priorities: lower first
# Tries of one place within a pass for transient failures (429 per second, 5xx, timeout).
TRANSIENT_TRIES = 3
MAX_BACKOFF_S = 60.0
# A 429 without Retry-After pauses every request this long (LocationIQ counts per second).
RATE_LIMITED_PAUSE_S = 1.0
# While paused until a time (midnight UTC), re-read the injected clock this often.
CLOCK_CHECK_S = 30.0
STOP_REASONS = ("auth", "budget", "day_limit")

# A gazetteer row is "pending" (to be asked) when it does not exist, or is not a
# person's, not a usable answer (unguarded is one: it waits for its centroid, not for
# the provider), and its retry time has come. The refill and the
# check before each request use this same expression so they can never disagree.
_PENDING = (
    "({a}.status IS NULL"
    " OR (NOT {a}.verified AND {a}.status NOT IN ('ok', 'unguarded') AND {a}.retry_at <= $1))"
)

PENDING_CLUSTERS = f"""
SELECT w.cluster, mode() WITHIN GROUP (ORDER BY w.region) AS region, a.place AS alias
FROM tickets.geo_wanted() AS w
LEFT JOIN tickets.geo_clusters AS c ON c.cluster = w.cluster
LEFT JOIN tickets.geo_cluster_aliases AS a ON a.cluster = w.cluster
WHERE {_PENDING.format(a="c")}
GROUP BY w.cluster, a.place
ORDER BY count(*) DESC, w.cluster
"""

# Locations wait for their cluster's answer (the guard's reference); a cluster the
# provider does not know still lets its locations be tried, unguarded.
PENDING_LOCATIONS = f"""
SELECT w.cluster, mode() WITHIN GROUP (ORDER BY w.region) AS region, w.location, a.place AS alias
FROM tickets.geo_wanted() AS w
JOIN tickets.geo_clusters AS c ON c.cluster = w.cluster AND c.status IN ('ok', 'no_match')
LEFT JOIN tickets.geo_locations AS l ON l.cluster = w.cluster AND l.location = w.location
LEFT JOIN tickets.geo_cluster_aliases AS a ON a.cluster = w.cluster
WHERE w.location IS NOT NULL AND {_PENDING.format(a="l")}
GROUP BY w.cluster, w.location, a.place
ORDER BY w.cluster, w.location
"""

# How many places the refill would queue now (`fleetticketsd status`): the same two
# queries, so the count cannot disagree with the worker. $1: now.
PENDING_COUNT = f"""
SELECT (SELECT count(DISTINCT cluster) FROM ({PENDING_CLUSTERS}) AS c)
     + (SELECT count(DISTINCT (cluster, location)) FROM ({PENDING_LOCATIONS}) AS l)
"""

CLUSTER_PENDING = f"""
SELECT {_PENDING.format(a="c")}
FROM (SELECT 1) AS one LEFT JOIN tickets.geo_clusters AS c ON c.cluster = $2
"""
LOCATION_PENDING = f"""
SELECT {_PENDING.format(a="l")}
FROM (SELECT 1) AS one
LEFT JOIN tickets.geo_locations AS l ON l.cluster = $2 AND l.location = $3
"""

_POINT = (
    "CASE WHEN $4::float8 IS NULL THEN NULL ELSE ST_SetSRID(ST_MakePoint($5::float8, $4::float8), 4326) END"
)

# $1 cluster $2 query $3 status $4 lat $5 lon $6 provider $7 display_name $8 last_error
# $9 geocoded_at $10 retry_at. A verified row is a person's: never overwritten. An error
# keeps an earlier answer's point and status.
STORE_CLUSTER = f"""
INSERT INTO tickets.geo_clusters AS c
    (cluster, query, geom, status, provider, display_name, attempts, last_error, geocoded_at, retry_at)
VALUES ($1, $2, {_POINT}, $3, $6, $7, 1, $8, $9, $10)
ON CONFLICT (cluster) DO UPDATE SET
    query = EXCLUDED.query,
    geom = CASE WHEN EXCLUDED.status = 'error' THEN c.geom ELSE EXCLUDED.geom END,
    status = CASE WHEN EXCLUDED.status = 'error' AND c.status = 'ok' THEN c.status ELSE EXCLUDED.status END,
    provider = EXCLUDED.provider,
    display_name = coalesce(EXCLUDED.display_name, c.display_name),
    attempts = c.attempts + 1,
    last_error = EXCLUDED.last_error,
    geocoded_at = coalesce(EXCLUDED.geocoded_at, c.geocoded_at),
    retry_at = EXCLUDED.retry_at,
    updated_at = now()
WHERE NOT c.verified
RETURNING status
"""

# The wrong-city guard: an answer farther than $11 km from its cluster's centroid is
# stored rejected_distance (kept for review, not used) and its tickets fall back to
# the centroid. Without a centroid (the cluster is unknown to the provider) there is
# no reference: the answer is stored 'unguarded' (its tickets use it, the gauge and
# `status` count it) and judged once the cluster has a centroid (JUDGE_LOCATIONS).
# The same judgement as tickets.judge_locations (migration 0010), for one new answer.
# Parameters as STORE_CLUSTER plus $11 max_distance_km, $12 location.
STORE_LOCATION = f"""
WITH p AS (SELECT {_POINT} AS g),
ref AS (SELECT geom FROM tickets.geo_clusters WHERE cluster = $1 AND status = 'ok'),
v AS (
    SELECT p.g,
           ST_Distance(p.g::geography, ref.geom::geography) / 1000.0 AS km,
           CASE WHEN $3 <> 'ok' THEN $3
                WHEN ref.geom IS NULL THEN 'unguarded'
                WHEN NOT ST_DWithin(p.g::geography, ref.geom::geography, $11::float8 * 1000.0)
                THEN 'rejected_distance' ELSE 'ok' END AS status
    FROM p LEFT JOIN ref ON true
)
INSERT INTO tickets.geo_locations AS l
    (cluster, location, query, geom, distance_km, status, provider, display_name, attempts,
     last_error, geocoded_at, retry_at)
SELECT $1, $12, $2, v.g, v.km, v.status, $6, $7, 1, $8, $9,
       CASE WHEN v.status IN ('ok', 'unguarded') THEN NULL ELSE $10::timestamptz END
FROM v
ON CONFLICT (cluster, location) DO UPDATE SET
    query = EXCLUDED.query,
    geom = CASE WHEN EXCLUDED.status = 'error' THEN l.geom ELSE EXCLUDED.geom END,
    distance_km = CASE WHEN EXCLUDED.status = 'error' THEN l.distance_km ELSE EXCLUDED.distance_km END,
    status = CASE WHEN EXCLUDED.status = 'error' AND l.status IN ('ok', 'unguarded') THEN l.status
                  ELSE EXCLUDED.status END,
    provider = EXCLUDED.provider,
    display_name = coalesce(EXCLUDED.display_name, l.display_name),
    attempts = l.attempts + 1,
    last_error = EXCLUDED.last_error,
    geocoded_at = coalesce(EXCLUDED.geocoded_at, l.geocoded_at),
    retry_at = EXCLUDED.retry_at,
    updated_at = now()
WHERE NOT l.verified
RETURNING status
"""

# Judge stored answers again against their cluster's centroid (migration 0010): after
# a centroid arrives or is corrected, and on every refill (which also catches a
# correction made in plain SQL, and a changed max_distance_km). $1 max_distance_km,
# $2 cluster (NULL: all), $3 when a newly rejected answer may be asked again.
JUDGE_LOCATIONS = "SELECT cluster, location, was, status FROM tickets.judge_locations($1, $2, $3)"
# Answers placed without a centroid to check them: the gauge, and which clusters.
UNGUARDED = """
SELECT count(*) AS n, coalesce(array_agg(DISTINCT cluster ORDER BY cluster), '{}') AS clusters
FROM tickets.geo_locations WHERE status = 'unguarded'
"""

# Take one request from the day's budget, or NULL when it is spent. Atomic, so
# concurrent workers (replicas) cannot both take the last one.
RESERVE_BUDGET = """
INSERT INTO tickets.geo_budget AS b (provider, day, requests)
SELECT $1, $2, 1 WHERE $3::int > 0
ON CONFLICT (provider, day) DO UPDATE SET requests = b.requests + 1
WHERE b.requests < $3::int AND NOT b.exhausted
RETURNING requests
"""
MARK_DAY_EXHAUSTED = """
INSERT INTO tickets.geo_budget AS b (provider, day, requests, exhausted) VALUES ($1, $2, 0, true)
ON CONFLICT (provider, day) DO UPDATE SET exhausted = true
"""
BUDGET_USED = "SELECT requests, exhausted FROM tickets.geo_budget WHERE provider = $1 AND day = $2"

# Operators' corrections (`fleetticketsd gazetteer set`): verified, never overwritten.
# The triggers re-resolve the tickets.
SET_CLUSTER = """
INSERT INTO tickets.geo_clusters AS c (cluster, query, geom, status, provider, verified, geocoded_at)
VALUES ($1, NULL, ST_SetSRID(ST_MakePoint($3, $2), 4326), 'ok', 'manual', true, now())
ON CONFLICT (cluster) DO UPDATE SET
    geom = EXCLUDED.geom, status = 'ok', provider = 'manual', verified = true,
    last_error = NULL, retry_at = NULL, geocoded_at = now(), updated_at = now()
"""
SET_LOCATION = """
WITH g AS (SELECT ST_SetSRID(ST_MakePoint($4, $3), 4326) AS geom)
INSERT INTO tickets.geo_locations AS l
    (cluster, location, geom, distance_km, status, provider, verified, geocoded_at)
SELECT $1, $2, g.geom,
       (SELECT ST_Distance(g.geom::geography, c.geom::geography) / 1000.0
        FROM tickets.geo_clusters c WHERE c.cluster = $1 AND c.status = 'ok'),
       'ok', 'manual', true, now()
FROM g
ON CONFLICT (cluster, location) DO UPDATE SET
    geom = EXCLUDED.geom, distance_km = EXCLUDED.distance_km, status = 'ok', provider = 'manual',
    verified = true, last_error = NULL, retry_at = NULL, geocoded_at = now(), updated_at = now()
"""
# The same key as the ticket tables' generated location_key (migration 0003).
CLEAN_LOCATION = "SELECT left(tickets.clean_location($1, $2), 200)"


def utc_now() -> datetime:
    return datetime.now(UTC)


def next_utc_midnight(now: datetime) -> datetime:
    day = now.astimezone(UTC).date() + timedelta(days=1)
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def build_query(
    cluster: str,
    region: str | None,
    country: str,
    location: str | None = None,
    alias: str | None = None,
) -> str:
    """The text sent to the provider: the place, then wider context.

    "Jogoo Rd, Kilimani, Nairobi, Kenya"; a cluster code becomes its curated place
    ("Quarry Road, Nairobi, Kenya"). Region arrives lower-cased from ingest.
    """
    parts = [location, alias or cluster, region.title() if region else None, country]
    out: list[str] = []
    for p in parts:
        if p and p.strip() and p.strip().lower() not in (o.lower() for o in out):
            out.append(p.strip())
    return ", ".join(out)


@dataclass(frozen=True, order=True)
class Job:
    priority: int
    seq: int
    cluster: str = field(compare=False)
    location: str | None = field(compare=False)
    query: str = field(compare=False)

    @property
    def kind(self) -> Kind:
        return "cluster" if self.location is None else "location"

    @property
    def key(self) -> tuple[str, str | None]:
        return (self.cluster, self.location)


@dataclass
class PassReport:
    requests: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    cache_hits: int = 0
    queued: int = 0
    left: int = 0
    stopped: str | None = None  # auth | budget | day_limit | limit

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "outcomes": dict(self.outcomes),
            "cache_hits": self.cache_hits,
            "queued": self.queued,
            "left": self.left,
            "stopped": self.stopped,
        }


PoolSource: TypeAlias = asyncpg.Pool | Callable[[], asyncpg.Pool]
_Result = Literal["done", "auth", "budget", "day_limit", "limit", "stopping"]


class Geocoder:
    """The worker. ``run`` is the daemon's side task; ``run_pass`` is the CLI's one pass."""

    def __init__(
        self,
        config: GeocoderConfig,
        pool: PoolSource,
        metrics: Metrics,
        *,
        clock: Callable[[], datetime] = utc_now,
        clock_check_s: float = CLOCK_CHECK_S,
        transport: httpx.AsyncBaseTransport | None = None,
        pacer: Pacer | None = None,
    ) -> None:
        self._pool = pool
        self.metrics = metrics
        self.clock = clock
        self.clock_check_s = clock_check_s
        # A PriorityQueue is an asyncio.Queue: one shared queue, clusters served first.
        self.queue: asyncio.PriorityQueue[Job] = asyncio.PriorityQueue()
        self._queued: set[tuple[str, str | None]] = set()
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self.stopped: str | None = None  # "auth" while the key is refused
        self.config = config
        self.provider: Provider = make_provider(config)
        # One pacer for the worker's life, its turns shared with every other process on
        # this database through it (pacer.py). Passed in: shared within the process too.
        self.pacer = pacer or Pacer(
            1.0 / config.rate_per_second, shared=DatabaseTurns(lambda: self.pool, lambda: self.provider.name)
        )
        for outcome in GEOCODE_OUTCOMES:
            metrics.geocode_requests.labels(config.provider, outcome)
        for reason in STOP_REASONS:
            metrics.geocode_stopped.labels(reason).set(0)
        metrics.geocode_queue_depth.set(0)

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool() if callable(self._pool) else self._pool

    # --- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> Geocoder:
        self._client = self._make_client(self.config)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _make_client(self, config: GeocoderConfig) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout_s, connect=min(config.timeout_s, 10.0)),
            headers={"User-Agent": config.user_agent, "Accept": "application/json"},
            transport=self._transport,
            follow_redirects=False,
        )

    def reconfigure(self, config: GeocoderConfig) -> None:
        """SIGHUP: new limits apply to the next request; a refused key may be retried."""
        old, self.config = self.config, config
        if config.rate_per_second != old.rate_per_second:
            # The same pacer, a new interval: a fresh one would let the next request
            # go at once, right behind the last one.
            self.pacer.set_rate(config.rate_per_second)
        if (config.provider, config.base_url, config.country_codes) != (
            old.provider,
            old.base_url,
            old.country_codes,
        ) or config.api_key != old.api_key:
            self.provider = make_provider(config)
        else:
            self.provider.config = config
        if self._client is not None:
            self._client.timeout = httpx.Timeout(config.timeout_s, connect=min(config.timeout_s, 10.0))
            self._client.headers["User-Agent"] = config.user_agent
        if self.stopped:
            log.info("geocoder resumed by reload", was=self.stopped)
            self._set_stopped(None)
        self.notify()

    def notify(self) -> None:
        """New tickets may need places (called after each drain pass)."""
        self._wake.set()

    # --- the daemon's side task ------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        async with self:
            self._check_key()
            # Export today's budget at once, not only after the first request.
            with contextlib.suppress(*DB_ERRORS):
                await self.budget_remaining()
            while not stop.is_set():
                report = PassReport()
                try:
                    if self.stopped is None:
                        added = await self.refill(clusters=True, locations=True)
                        report.queued += added
                        result = await self._drain_queue(report, None)
                        if result in ("budget", "day_limit"):
                            await self._pause_until_reset(result)
                            continue
                        if added and report.requests:
                            continue  # answered clusters can unlock their locations
                except DB_ERRORS as exc:
                    log.warning("geocoder: database error; retrying later", error=str(exc))
                await self._wait_for_work()

    async def _wait_for_work(self) -> None:
        wake = asyncio.create_task(self._wake.wait())
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait(
                {wake, stop}, timeout=self.config.refill_interval_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            wake.cancel()
            stop.cancel()
        self._wake.clear()

    async def _pause_until_reset(self, reason: str) -> None:
        until = next_utc_midnight(self.clock())
        log.warning("geocoding paused until the budget resets", reason=reason, until=until.isoformat())
        self._set_stopped(reason)
        while not self._stop.is_set():
            left = (until - self.clock()).total_seconds()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=min(left, self.clock_check_s))
        if self.stopped == reason:
            self._set_stopped(None)
        log.info("geocoding resumed: new UTC day")

    # --- one pass (CLI) ----------------------------------------------------------------

    async def run_pass(
        self, *, clusters: bool = True, locations: bool = True, limit: int | None = None
    ) -> PassReport:
        report = PassReport()
        if not self._check_key():
            report.stopped = "auth"
            return report
        while True:
            before = report.requests
            added = await self.refill(clusters=clusters, locations=locations)
            report.queued += added
            result = await self._drain_queue(report, limit)
            if result != "done":
                report.stopped = result
                break
            if not added or report.requests == before:
                break
        report.left = self.queue.qsize()
        return report

    # --- the queue -------------------------------------------------------------------------

    async def refill(self, *, clusters: bool = True, locations: bool = True) -> int:
        """Queue every place actionable tickets need and the gazetteer lacks; return how many."""
        now = self.clock()
        added = 0
        async with self.pool.acquire() as conn:
            # Stored answers first, against today's centroids and guard: no request.
            await judge_locations(conn, self.config, None, now)
            await self._export_unguarded(conn)
            if clusters:
                for r in await conn.fetch(PENDING_CLUSTERS, now):
                    q = build_query(r["cluster"], r["region"], self.config.country_name, alias=r["alias"])
                    added += self._put(CLUSTER, r["cluster"], None, q)
            if locations:
                for r in await conn.fetch(PENDING_LOCATIONS, now):
                    q = build_query(
                        r["cluster"], r["region"], self.config.country_name, r["location"], r["alias"]
                    )
                    added += self._put(LOCATION, r["cluster"], r["location"], q)
        return added

    def _put(self, priority: int, cluster: str, location: str | None, query: str) -> int:
        if (cluster, location) in self._queued:
            return 0
        self._queued.add((cluster, location))
        self.queue.put_nowait(Job(priority, next(self._seq), cluster, location, query))
        self.metrics.geocode_queue_depth.set(self.queue.qsize())
        return 1

    async def _drain_queue(self, report: PassReport, limit: int | None) -> _Result:
        while not self.queue.empty():
            if self._stop.is_set():
                return "stopping"
            job = self.queue.get_nowait()
            try:
                result = await self._handle(job, report, limit)
            except BaseException:
                self.queue.put_nowait(job)  # not lost: a DB error or a cancel retries it later
                raise
            finally:
                self.metrics.geocode_queue_depth.set(self.queue.qsize())
            if result == "done":
                self._queued.discard(job.key)
                continue
            self.queue.put_nowait(job)  # unanswered: first in line once we may ask again
            self.metrics.geocode_queue_depth.set(self.queue.qsize())
            return result
        return "done"

    # --- one place ----------------------------------------------------------------------------

    async def _handle(self, job: Job, report: PassReport, limit: int | None) -> _Result:
        # Answered meanwhile (another replica, an operator, an earlier job): no request.
        async with self.pool.acquire() as conn:
            if job.location is None:
                pending = await conn.fetchval(CLUSTER_PENDING, self.clock(), job.cluster)
            else:
                pending = await conn.fetchval(LOCATION_PENDING, self.clock(), job.cluster, job.location)
        if not pending:
            report.cache_hits += 1
            self.metrics.geocode_cache_hits.inc()
            return "done"
        answer: Answer | None = None
        for attempt in range(TRANSIENT_TRIES):
            if self._stop.is_set():
                return "stopping"
            if limit is not None and report.requests >= limit:
                return "limit"
            if not await self._take_budget():
                return "budget"
            answer = await self._request(job.query, attempt)
            if answer is None:
                return "stopping"
            report.requests += 1
            report.outcomes[answer.outcome] += 1
            if answer.outcome in ("ok", "no_match"):
                break
            if answer.outcome == "day_limit":
                self._count("rate_limited")
                await self._mark_day_exhausted()
                return "day_limit"
            if answer.outcome == "auth":
                self._count("error")
                self._set_stopped("auth")
                log.error(
                    "GEOCODER KEY REFUSED: geocoding stopped until reload or restart; "
                    "check GEOCODER_API_KEY and the provider account",
                    provider=self.config.provider,
                    detail=answer.detail,
                )
                return "auth"
            # rate_limited / error: transient; _request has pushed the pacer's next turn.
            self._count("rate_limited" if answer.outcome == "rate_limited" else "error")
            log.warning(
                "geocode request failed; backing off",
                outcome=answer.outcome,
                detail=answer.detail,
                query=job.query,
                attempt=attempt + 1,
            )
        assert answer is not None
        status = await self._store(job, answer)
        if answer.outcome in ("ok", "no_match"):
            # An unguarded answer is an ok answer of the provider's (the contract's outcomes).
            self._count("ok" if status == "unguarded" else status or answer.outcome)
        if status == "rejected_distance":
            log.warning(
                "geocode answer rejected: too far from its cluster", cluster=job.cluster, query=job.query
            )
        elif status == "unguarded":
            log.warning(
                "geocode answer unguarded: its cluster has no centroid to check it against; "
                "set one with `fleetticketsd gazetteer set CLUSTER LAT LON`",
                cluster=job.cluster,
                query=job.query,
            )
        return "done"

    async def _request(self, query: str, attempt: int = 0) -> Answer | None:
        """One request in the pacer's turn; None when stopping before it was sent."""
        assert self._client is not None, "use the Geocoder as an async context manager"
        async with self.pacer.turn(self._stop) as go:
            if not go:
                return None
            try:
                response = await self._client.get(self.provider.url(), params=self.provider.params(query))
            except httpx.TimeoutException as exc:
                answer = Answer("error", detail=f"timeout: {type(exc).__name__}")
            except httpx.HTTPError as exc:
                answer = Answer("error", detail=f"{type(exc).__name__}: {exc}")
            else:
                answer = self.provider.interpret(response)
            # Still inside the turn, so that no other pass slips in before the pause.
            # The provider asked the process, not this place, to slow down.
            self.pacer.hold(self._backoff_s(answer, attempt))
        return answer

    @staticmethod
    def _backoff_s(answer: Answer, attempt: int) -> float:
        if answer.outcome not in ("rate_limited", "error"):
            return 0.0
        if answer.retry_after_s is not None:  # always honoured, after the last try too
            return min(answer.retry_after_s, MAX_BACKOFF_S * 5)
        if answer.outcome == "rate_limited":
            return RATE_LIMITED_PAUSE_S
        if attempt + 1 >= TRANSIENT_TRIES:  # the place is stored as error; the next one may go
            return 0.0
        return min(2.0**attempt, MAX_BACKOFF_S)  # 1 s, 2 s

    async def _store(self, job: Job, answer: Answer) -> str | None:
        now = self.clock()
        if answer.outcome == "ok":
            status, retry_at, geocoded_at = "ok", None, now
        elif answer.outcome == "no_match":
            status, geocoded_at = "no_match", now
            retry_at = now + timedelta(days=self.config.no_match_retry_days)
        else:
            status, geocoded_at = "error", None
            retry_at = now + timedelta(seconds=self.config.error_retry_s)
        args: list[Any] = [
            job.cluster,
            job.query,
            status,
            answer.lat,
            answer.lon,
            self.provider.name,
            answer.display_name,
            None if status != "error" else answer.detail,
            geocoded_at,
        ]
        stored: str | None
        async with self.pool.acquire() as conn:
            if job.location is None:
                async with conn.transaction():
                    stored = await conn.fetchval(STORE_CLUSTER, *args, retry_at)
                    if stored == "ok":  # a centroid at last: its answers are judged against it
                        await judge_locations(conn, self.config, job.cluster, now)
            else:
                # A rejected answer is retried no sooner than an unknown place.
                retry_at = retry_at or now + timedelta(days=self.config.no_match_retry_days)
                stored = await conn.fetchval(
                    STORE_LOCATION, *args, retry_at, self.config.max_distance_km, job.location
                )
            await self._export_unguarded(conn)
            return stored

    async def _export_unguarded(self, conn: asyncpg.Connection) -> None:
        n, _ = await unguarded_locations(conn)
        self.metrics.geocode_unguarded.set(n)

    # --- budget and state ----------------------------------------------------------------------

    def _today(self) -> date:
        return self.clock().astimezone(UTC).date()

    async def _take_budget(self) -> bool:
        async with self.pool.acquire() as conn:
            used = await conn.fetchval(
                RESERVE_BUDGET, self.config.provider, self._today(), self.config.daily_budget
            )
        if used is None:
            self.metrics.geocode_budget_remaining.set(0)
            return False
        self.metrics.geocode_budget_remaining.set(max(0, self.config.daily_budget - used))
        return True

    async def _mark_day_exhausted(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(MARK_DAY_EXHAUSTED, self.config.provider, self._today())
        self.metrics.geocode_budget_remaining.set(0)

    async def budget_remaining(self) -> int:
        async with self.pool.acquire() as conn:
            left = await budget_left(conn, self.config, self.clock())
        self.metrics.geocode_budget_remaining.set(left)
        return left

    def _check_key(self) -> bool:
        if self.provider.needs_key and not self.config.api_key:
            self._set_stopped("auth")
            log.error(
                "GEOCODER KEY MISSING: set GEOCODER_API_KEY; geocoding stopped",
                provider=self.config.provider,
            )
            return False
        return True

    def _set_stopped(self, reason: str | None) -> None:
        self.stopped = reason
        for r in STOP_REASONS:
            self.metrics.geocode_stopped.labels(r).set(1 if r == reason else 0)

    def _count(self, outcome: str) -> None:
        self.metrics.geocode_requests.labels(self.provider.name, outcome).inc()


DB_ERRORS: tuple[type[BaseException], ...] = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


# --- read-only views for `fleetticketsd status` ------------------------------------------------


async def pending_places(conn: asyncpg.Connection, now: datetime | None = None) -> int:
    """Places (clusters, and locations of answered clusters) waiting to be asked."""
    return int(await conn.fetchval(PENDING_COUNT, now or utc_now()))


async def budget_left(conn: asyncpg.Connection, config: GeocoderConfig, now: datetime | None = None) -> int:
    """Requests left of ``daily_budget`` for the provider on the UTC day of ``now``."""
    day = (now or utc_now()).astimezone(UTC).date()
    row = await conn.fetchrow(BUDGET_USED, config.provider, day)
    if row is None:
        return config.daily_budget
    return 0 if row["exhausted"] else max(0, config.daily_budget - row["requests"])


async def unguarded_locations(conn: asyncpg.Connection) -> tuple[int, list[str]]:
    """Answers placed without a centroid to check them, and their clusters."""
    row = await conn.fetchrow(UNGUARDED)
    assert row is not None
    return int(row["n"]), list(row["clusters"])


# --- the guard, judged again ----------------------------------------------------------------------


@dataclass(frozen=True)
class Judgement:
    """What judging stored answers again changed (status changes only)."""

    accepted: int = 0  # now ok: within max_distance_km of the centroid
    rejected: int = 0  # now rejected_distance: its tickets use the centroid
    unguarded: int = 0  # now unguarded: the cluster has no centroid any more

    def describe(self) -> str:
        return f"{self.accepted} accepted, {self.rejected} rejected, {self.unguarded} unguarded"


async def judge_locations(
    conn: asyncpg.Connection, config: GeocoderConfig, cluster: str | None, now: datetime | None = None
) -> Judgement:
    """Judge the stored answers of ``cluster`` (None: all) against their centroid and
    ``max_distance_km``; the triggers move the tickets of every answer that changes."""
    retry_at = (now or utc_now()) + timedelta(days=config.no_match_retry_days)
    rows = await conn.fetch(JUDGE_LOCATIONS, config.max_distance_km, cluster, retry_at)
    changed = Counter(r["status"] for r in rows if r["status"] != r["was"])
    judged = Judgement(changed["ok"], changed["rejected_distance"], changed["unguarded"])
    if changed:
        log.info(
            "geocode answers judged again against their cluster centroid",
            cluster=cluster,
            accepted=judged.accepted,
            rejected=judged.rejected,
            unguarded=judged.unguarded,
            max_distance_km=config.max_distance_km,
        )
    return judged


# --- operators' corrections --------------------------------------------------------------------


class GazetteerSet(NamedTuple):
    location: str | None  # the cleaned location (None: the cluster's centroid was set)
    tickets: int  # tickets now on the point
    judged: Judgement  # a centroid's answers, judged against it


async def set_gazetteer(
    conn: asyncpg.Connection,
    cluster: str,
    location: str | None,
    lat: float,
    lon: float,
    config: GeocoderConfig | None = None,
) -> GazetteerSet:
    """Record a person's point for a cluster or a location: verified, never overwritten.

    ``location`` may be raw (as the ticket shows it) or already clean. A cluster's new
    centroid re-judges the cluster's stored answers against ``config.max_distance_km``
    in the same transaction: those now too far are rejected (their tickets move to the
    centroid), those rejected before that now fit are accepted, unguarded ones are
    judged at last; verified locations are left alone. Returns the cleaned location,
    how many tickets now sit on the point, and what the judgement changed.
    """
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise ValueError(f"not a coordinate: lat {lat}, lon {lon}")
    judged = Judgement()
    async with conn.transaction():
        if location is None:
            await conn.execute(SET_CLUSTER, cluster, lat, lon)
            judged = await judge_locations(conn, config or GeocoderConfig(), cluster)
            clean = None
        else:
            clean = await conn.fetchval(CLEAN_LOCATION, location, cluster)
            if clean is None:
                raise ValueError(f"{location!r} holds no place once network codes are removed")
            await conn.execute(SET_LOCATION, cluster, clean, lat, lon)
        count = 0
        tables = await conn.fetch("SELECT t::text AS name FROM tickets.ticket_tables() AS t")
        for t in tables:
            count += await conn.fetchval(
                f"SELECT count(*) FROM {t['name']} WHERE cluster = $1 AND geo_source = $2 "
                "AND ST_Equals(geom, ST_SetSRID(ST_MakePoint($4, $3), 4326))",
                cluster,
                "cluster" if location is None else "location",
                lat,
                lon,
            )
    return GazetteerSet(clean, count, judged)

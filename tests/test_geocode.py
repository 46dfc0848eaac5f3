"""The geocoding worker against a fake provider on loopback and the real PostgreSQL.

What the operators rely on: the configured rate is never exceeded (and so provokes no
429), the daily budget holds across restarts and resumes after 00:00 UTC, a
wrong-city answer never places a ticket, a cached place costs no request, a verified
row is never overwritten, and every actionable ticket ends with a point.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from aiolimiter import AsyncLimiter
from prometheus_client import generate_latest

from fleetticketsd import feedgen
from fleetticketsd.config import Config, GeocoderConfig
from fleetticketsd.database import db
from fleetticketsd.geocoding.geocode import Geocoder
from fleetticketsd.geocoding.pacer import Pacer
from fleetticketsd.ingest.drain import Engine, drain
from fleetticketsd.metrics import Metrics

from . import fake_geocoder as fg
from .conftest import SAMPLE, Bucket, apoll, inc_key, poll, run_cli
from .test_geocode_sql import put_cluster, raw, upsert, where

KEY1 = "automations/inc/changes/2026-06-22T15-50-39.csv"


class Clock:
    """An injected UTC clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def fake() -> Iterator[fg.FakeGeocoder]:
    server = fg.FakeGeocoder(places={"Kilimani": fg.KILIMANI}).start()
    yield server
    server.stop()


@pytest.fixture
async def pool(db_url: str, config: Config) -> AsyncIterator[asyncpg.Pool]:
    p = await db.create_pool(config.database)
    yield p
    await p.close()


def geo(fake: fg.FakeGeocoder, **values: Any) -> GeocoderConfig:
    base = GeocoderConfig(
        enabled=True, provider="locationiq", base_url=fake.url, rate_per_second=20.0, api_key=fg.KEY
    )
    return dataclasses.replace(base, **values)


def worker(
    cfg: GeocoderConfig, pool: asyncpg.Pool, clock: Callable[[], datetime] | None = None, **kw: Any
) -> Geocoder:
    extra: dict[str, Any] = {"clock": clock} if clock else {}
    return Geocoder(cfg, pool, kw.pop("metrics", None) or Metrics(), clock_check_s=0.02, **extra, **kw)


async def tickets(conn: asyncpg.Connection, *specs: tuple[str, str, str]) -> None:
    for tid, cluster, location in specs:
        await upsert(conn, tid, KEY1, **raw(cluster, location))


def metric(m: Metrics, name: str, **labels: str) -> float:
    value = m.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


# --- the rate limit ---------------------------------------------------------------------


async def test_requests_are_evenly_spaced_at_the_configured_rate_and_provoke_no_429(
    fake: fg.FakeGeocoder, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    rate = 5  # the provider allows 5 per second; so do we
    fake.per_second = rate
    fake.default_point = True
    await tickets(conn, *[(f"INC{i}", "Kilimani", f"KILIMANI_Street {i} FDT1") for i in range(14)])
    async with worker(geo(fake, rate_per_second=float(rate)), pool) as w:
        report = await w.run_pass()
    assert report.requests == 15 and report.outcomes == {"ok": 15}
    assert fake.statuses() == {200: 15}  # not a single 429
    arrivals = fake.arrivals()
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert min(gaps) >= 0.9 / rate, gaps  # evenly spaced, no burst
    in_any_second = max(sum(1 for t in arrivals if s <= t < s + 1.0) for s in arrivals)
    assert in_any_second <= rate + 1  # a window closed at both ends may catch one more
    assert (arrivals[-1] - arrivals[0]) >= (len(arrivals) - 1) / rate * 0.95


async def test_the_fake_does_punish_a_burst(fake: fg.FakeGeocoder) -> None:
    """Control: requests sent back to back (what AsyncLimiter(rate, 1) lets through) get 429."""
    fake.per_second = 5
    params = {"q": "Kilimani, Nairobi, Kenya", "key": fg.KEY, "format": "json"}
    async with httpx.AsyncClient() as client:
        answers = await asyncio.gather(*(client.get(f"{fake.url}/search", params=params) for _ in range(9)))
    assert sum(r.status_code == 429 for r in answers) >= 3
    assert any(r.json() == {"error": "Rate Limited Second"} for r in answers)


# --- no 429, at start-up too: what the provider sees -------------------------------------------
# The fake timestamps each request on arrival and enforces its own per-second limit as
# LocationIQ does (429 "Rate Limited Second"), so these measure what the provider
# measures, not what the worker believes it did.


async def seed(conn: asyncpg.Connection, n: int, clusters: int = 4) -> None:
    await tickets(conn, *[(f"OLD{i}", f"Cluster {i % clusters}", f"Street {i} FDT1") for i in range(n)])


def seed_places(db_url: str, n: int) -> None:
    """Tickets needing ``n`` locations in 4 clusters, before a process starts."""

    async def go() -> None:
        c = await asyncpg.connect(db_url)
        try:
            await seed(c, n)
        finally:
            await c.close()

    asyncio.run(go())


def gaps(server: fg.FakeGeocoder) -> list[float]:
    return [b - a for a, b in itertools.pairwise(server.arrivals())]


class SlowFirstSend(httpx.AsyncBaseTransport):
    """The first request leaves late, as a first connection does on a busy event loop."""

    def __init__(self, delay_s: float) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.delay_s = delay_s
        self.sent = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        if self.sent == 1:
            await asyncio.sleep(self.delay_s)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_spacing_acquisitions_bunches_arrivals_spacing_answers_does_not(fake: fg.FakeGeocoder) -> None:
    rate = 2.0
    interval = 1 / rate
    params = {"q": "Kilimani, Nairobi, Kenya", "key": fg.KEY, "format": "json"}
    # The old way: AsyncLimiter(1, 1/rate) spaces acquisitions; a send delayed by 0.8
    # of an interval after its acquisition arrives 0.2 of an interval before the next.
    limiter = AsyncLimiter(1, interval)
    async with httpx.AsyncClient(transport=SlowFirstSend(0.8 * interval)) as client:
        for _ in range(2):
            async with limiter:
                await client.get(f"{fake.url}/search", params=params)
    assert gaps(fake)[0] < 0.5 * interval, gaps(fake)
    # The pacer counts from the answer: the same delay cannot bring two arrivals closer.
    fake.requests.clear()
    pacer = Pacer(interval)
    async with httpx.AsyncClient(transport=SlowFirstSend(0.8 * interval)) as client:
        for _ in range(3):
            async with pacer.turn():
                await client.get(f"{fake.url}/search", params=params)
    assert min(gaps(fake)) >= interval, gaps(fake)


@pytest.mark.parametrize("pacers", ["one", "own, shared through the database", "own, local (control)"])
async def test_concurrent_passes_send_no_burst(
    pacers: str, fake: fg.FakeGeocoder, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """A cluster pass and a location pass at once, as two workers of one process, or
    of two processes (each worker's own pacer takes its turns through the database)."""
    rate = 8
    fake.per_second = rate
    fake.default_point = True
    await seed(conn, 24, clusters=6)
    for i in range(3):  # half the clusters answered: the location pass has work at once
        await put_cluster(conn, f"Cluster {i}", fg.KILIMANI)
    cfg = geo(fake, rate_per_second=float(rate))
    one = Pacer(1 / rate)
    kw: list[dict[str, Any]] = [{}, {}]  # the default: a pacer of its own, shared through PostgreSQL
    if pacers == "one":
        kw = [{"pacer": one}, {"pacer": one}]
    elif pacers.endswith("(control)"):
        kw = [{"pacer": Pacer(1 / rate)}, {"pacer": Pacer(1 / rate)}]
    async with Geocoder(cfg, pool, Metrics(), **kw[0]) as a, Geocoder(cfg, pool, Metrics(), **kw[1]) as b:
        await asyncio.gather(
            a.run_pass(clusters=True, locations=False, limit=6),
            b.run_pass(clusters=False, locations=True, limit=6),
        )
    if pacers.endswith("(control)"):  # two pacers that know nothing of each other: twice the rate
        assert min(gaps(fake)) < 1 / rate
        return
    assert fake.statuses() == {200: 3 + 6}  # three clusters unanswered, six locations
    assert min(gaps(fake)) >= 1 / rate, gaps(fake)


async def test_a_reload_changes_the_rate_but_keeps_the_pacers_clock(
    fake: fg.FakeGeocoder, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """A fresh limiter on SIGHUP would let the next request go at once, right behind the last."""
    await tickets(conn, ("INC1", "Kilimani", "KILIMANI_Jogoo Rd FDT1"))
    async with worker(geo(fake, rate_per_second=2.0), pool) as w:
        pacer = w.pacer
        await w.run_pass(clusters=True, locations=False)
        w.reconfigure(dataclasses.replace(w.config, rate_per_second=1.0))
        assert w.pacer is pacer and pacer.interval_s == 1.0
        assert 0 < pacer.wait_s() <= 0.5  # still the pause the old rate owed
        await w.run_pass()
    assert gaps(fake)[0] >= 0.5


async def test_retry_after_pushes_every_pass_sharing_the_pacer(
    fake: fg.FakeGeocoder, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    fake.default_point = True
    await seed(conn, 8, clusters=2)
    await put_cluster(conn, "Cluster 1", fg.KILIMANI)
    fake.fail_first["Cluster 0"] = 1  # 503 with Retry-After to the cluster pass
    fake.retry_after_s = 0.6
    cfg = geo(fake, rate_per_second=20.0)
    pacer = Pacer(1 / 20.0)
    async with (
        Geocoder(cfg, pool, Metrics(), pacer=pacer) as a,
        Geocoder(cfg, pool, Metrics(), pacer=pacer) as b,
    ):
        await asyncio.gather(
            a.run_pass(clusters=True, locations=False),
            b.run_pass(clusters=False, locations=True, limit=3),
        )
    arrivals = fake.arrivals()
    refused = [i for i, r in enumerate(fake.requests) if r.status == 503]
    assert len(refused) == 1 and refused[0] < len(arrivals) - 1
    # Whichever pass sent next waited the Retry-After, not only the one that was told.
    i = refused[0]
    assert arrivals[i + 1] - arrivals[i] >= 0.6, (fake.queries(), gaps(fake))
    assert fake.statuses()[429] == 0


@pytest.mark.parametrize("rate", [2, 8])
def test_daemon_start_up_sends_no_burst_at_the_providers_own_limit(
    rate: int,
    fake: fg.FakeGeocoder,
    start_daemon: Callable[..., tuple[Any, dict[str, Any]]],
    bucket: Bucket,
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`make run`'s start: places already waiting in the database (the geocoder's
    first pass starts at once) while the start-up drains apply a baseline of each
    dataset in the same event loop. The rate is the provider's own limit."""
    fake.per_second = rate
    fake.default_point = True
    seed_places(db_url, 40)
    for ds, rows in (("inc", 3000), ("crq", 1200)):
        spec = feedgen.FeedSpec(dataset=ds, seed=7, baseline_rows=rows, deltas=2, delta_rows=20)
        for name, data in feedgen.generate(spec):
            bucket.put(f"automations/{ds}/changes/{name}", data)
    monkeypatch.setenv("GEOCODER_API_KEY", fg.KEY)
    d, _ = start_daemon(geocoder={"enabled": True, "base_url": fake.url, "rate_per_second": float(rate)})
    want = 4 * rate  # four seconds of requests, the start-up drains among them
    poll(lambda: len(fake.requests) >= want, timeout_s=60, what=f"{want} requests")
    assert fake.statuses()[429] == 0, d.logged("geocode request failed; backing off")
    assert not d.logged("geocode request failed; backing off")
    assert min(gaps(fake)[: want - 1]) >= 1 / rate, gaps(fake)


@pytest.mark.parametrize("first", ["daemon", "command"])
def test_a_geocode_command_beside_the_daemon_sends_no_burst_whichever_starts_first(
    first: str,
    fake: fg.FakeGeocoder,
    start_daemon: Callable[..., tuple[Any, dict[str, Any]]],
    cli_env: Callable[..., dict[str, str]],
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two processes, one provider: the daemon at start-up and an operator's
    `fleetticketsd geocode`, each at the provider's own limit."""
    import json
    import subprocess
    import sys

    from .conftest import REPO

    rate = 8
    fake.per_second = rate
    fake.default_point = True
    seed_places(db_url, 20)  # 24 places: 4 clusters, 20 locations
    monkeypatch.setenv("GEOCODER_API_KEY", fg.KEY)
    geocoder = {"enabled": True, "base_url": fake.url, "rate_per_second": float(rate)}
    env = cli_env(geocoder=geocoder)

    def command() -> subprocess.Popen[str]:
        argv = [sys.executable, "-m", "fleetticketsd", "geocode", "--json"]
        return subprocess.Popen(
            argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    cli = command() if first == "command" else None
    d, _ = start_daemon(geocoder=geocoder)
    cli = cli or command()
    out, err = cli.communicate(timeout=120)
    assert cli.returncode == 0, err
    poll(
        lambda: d.metric("fleettickets_geocode_queue_depth") == 0 and len(fake.requests) >= 24,
        what="all asked",
    )
    assert json.loads(out)["requests"] >= 1  # the command did send, between the daemon's requests
    assert fake.statuses()[429] == 0, fake.statuses()
    assert min(gaps(fake)) >= 1 / rate, gaps(fake)


# --- the daily budget ---------------------------------------------------------------------


async def test_daily_budget_stops_at_the_cap_and_resumes_after_utc_midnight(
    fake: fg.FakeGeocoder, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    fake.default_point = True
    # One cluster and five locations: six requests, two days at three a day.
    await tickets(conn, *[(f"INC{i}", "Kilimani", f"KILIMANI_Street {i} FDT1") for i in range(5)])
    clock = Clock(datetime(2026, 6, 22, 23, 59, 0, tzinfo=UTC))
    cfg = geo(fake, daily_budget=3)
    metrics = Metrics()
    stop = asyncio.Event()
    w = worker(cfg, pool, clock, metrics=metrics)
    task = asyncio.create_task(w.run(stop))
    try:
        await apoll(lambda: w.stopped == "budget", what="worker paused on the budget")
        assert len(fake.requests) == 3
        assert metric(metrics, "fleettickets_geocode_budget_remaining") == 0
        assert metric(metrics, "fleettickets_geocode_stopped", reason="budget") == 1
        # A restart on the same day does not get a fresh budget: it is counted in PostgreSQL.
        async with worker(cfg, pool, clock) as second:
            report = await second.run_pass()
        assert report.stopped == "budget" and report.requests == 0 and len(fake.requests) == 3
        await asyncio.sleep(0.2)
        assert len(fake.requests) == 3  # still waiting for midnight
        clock.now = datetime(2026, 6, 23, 0, 0, 1, tzinfo=UTC)
        await apoll(lambda: len(fake.requests) == 6, what="the rest after midnight")
        await apoll(lambda: w.queue.empty() and w.stopped is None, what="queue done")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    days = await conn.fetch("SELECT day, requests FROM tickets.geo_budget ORDER BY day")
    assert [(str(r["day"]), r["requests"]) for r in days] == [("2026-06-22", 3), ("2026-06-23", 3)]
    assert await conn.fetchval("SELECT count(*) FROM tickets.inc WHERE geo_source = 'location'") == 5
    assert len(fake.requests) == 6


async def test_rate_limited_day_stops_until_midnight(
    fake: fg.FakeGeocoder, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    fake.default_point = True
    fake.per_day = 2
    await tickets(conn, *[(f"INC{i}", "Kilimani", f"KILIMANI_Street {i} FDT1") for i in range(4)])
    clock = Clock(datetime(2026, 6, 22, 12, 0, tzinfo=UTC))
    async with worker(geo(fake), pool, clock) as w:
        report = await w.run_pass()
        assert report.stopped == "day_limit" and report.outcomes == {"ok": 2, "day_limit": 1}
        # The provider said the day is over: no more requests today, even from a new pass.
        again = await w.run_pass()
        assert again.requests == 0 and again.stopped == "budget"
    assert len(fake.requests) == 3


# --- answers -------------------------------------------------------------------------------


async def test_wrong_city_answer_is_rejected_and_the_ticket_gets_the_cluster_centroid(
    fake: fg.FakeGeocoder, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    fake.places.update({"Mombasa Rd": fg.MOMBASA, "Jogoo Rd": fg.JOGOO_KILIMANI})
    await tickets(
        conn,
        ("INC1", "Kilimani", "NW_KILIMANI_Mombasa Rd FDT10"),
        ("INC2", "Kilimani", "NW_KILIMANI_Jogoo Rd FDT1"),
    )
    metrics = Metrics()
    async with worker(geo(fake, max_distance_km=25.0), pool, metrics=metrics) as w:
        await w.run_pass()
    assert fake.queries() == [
        "Kilimani, Nairobi, Kenya",  # the centroid first: the guard's reference
        "Jogoo Rd, Kilimani, Nairobi, Kenya",
        "Mombasa Rd, Kilimani, Nairobi, Kenya",
    ]
    rows = {
        r["location"]: r
        for r in await conn.fetch("SELECT location, status, distance_km FROM tickets.geo_locations")
    }
    assert rows["Mombasa Rd"]["status"] == "rejected_distance" and rows["Mombasa Rd"]["distance_km"] > 400
    assert rows["Jogoo Rd"]["status"] == "ok" and rows["Jogoo Rd"]["distance_km"] < 1
    assert await where(conn, "INC1") == ("cluster", -1.2921, 36.7856)
    assert await where(conn, "INC2") == ("location", -1.295, 36.79)
    assert (
        metric(
            metrics, "fleettickets_geocode_requests_total", provider="locationiq", outcome="rejected_distance"
        )
        == 1
    )
    assert metric(metrics, "fleettickets_geocode_requests_total", provider="locationiq", outcome="ok") == 2


async def test_unguarded_answers_are_counted_shown_and_judged_once_the_centroid_is_known(
    fake: fg.FakeGeocoder,
    pool: asyncpg.Pool,
    conn: asyncpg.Connection,
    cli_env: Callable[..., dict[str, str]],
) -> None:
    import json

    fake.places.update({"Karen": None, "Jogoo Rd": fg.JOGOO_KILIMANI, "Mombasa Rd": fg.MOMBASA})
    await tickets(conn, ("INC1", "Karen", "KAREN_Jogoo Rd FDT1"), ("INC2", "Karen", "KAREN_Mombasa Rd FDT2"))
    clock = Clock(datetime(2026, 6, 22, 12, 0, tzinfo=UTC))
    metrics = Metrics()
    cfg = geo(fake, no_match_retry_days=7.0)
    async with worker(cfg, pool, clock, metrics=metrics) as w:
        report = await w.run_pass()
    # The provider knows no "Karen": nothing to check the two answers against.
    assert report.outcomes == {"no_match": 1, "ok": 2}
    assert metric(metrics, "fleettickets_geocode_unguarded_locations") == 2
    assert await where(conn, "INC2") == ("location", -4.0435, 39.6682)  # used, not trusted silently

    env = cli_env(geocoder={"enabled": True, "base_url": fake.url})
    human = run_cli("status", env=env)
    assert human.returncode == 0, human.stderr
    line = next(x for x in human.stdout.splitlines() if x.startswith("geocode unguarded"))
    assert "2 location(s) placed without a cluster centroid" in line and "Karen" in line, line
    as_json = json.loads(run_cli("status", "--json", env=env).stdout)
    assert as_json["geocoder"]["unguarded_locations"] == 2
    assert as_json["geocoder"]["unguarded_clusters"] == ["Karen"]

    # A week later the provider knows Karen: the centroid arrives and both answers are judged.
    fake.places["Karen"] = fg.KILIMANI
    clock.now += timedelta(days=8)
    async with worker(cfg, pool, clock, metrics=metrics) as w:
        report = await w.run_pass()
    assert report.requests == 1 and fake.queries()[-1] == "Karen, Nairobi, Kenya"  # no location re-asked
    assert metric(metrics, "fleettickets_geocode_unguarded_locations") == 0
    assert await where(conn, "INC1") == ("location", -1.295, 36.79)
    assert await where(conn, "INC2") == ("cluster", -1.2921, 36.7856)  # the wrong city, caught at last
    rows = dict(await conn.fetch("SELECT location, status FROM tickets.geo_locations"))
    assert rows == {"Jogoo Rd": "ok", "Mombasa Rd": "rejected_distance"}
    as_json = json.loads(run_cli("status", "--json", env=env).stdout)
    assert as_json["geocoder"]["unguarded_locations"] == 0


def test_gazetteer_set_of_a_centroid_rejudges_its_answers(
    fake: fg.FakeGeocoder, cli_env: Callable[..., dict[str, str]], db_url: str, config: Config
) -> None:
    """The operator's command: a wrong centroid corrected, its cluster's answers judged again."""

    async def seed_and_geocode() -> None:
        c = await asyncpg.connect(db_url)
        p = await db.create_pool(config.database)
        try:
            await tickets(c, ("INC1", "Kilimani", "KILIMANI_Jogoo Rd FDT1"))
            fake.places.update({"Kilimani": fg.MOMBASA, "Jogoo Rd": fg.JOGOO_KILIMANI})
            async with worker(geo(fake), p) as w:
                await w.run_pass()
        finally:
            await p.close()
            await c.close()

    asyncio.run(seed_and_geocode())
    env = cli_env(geocoder={"enabled": True, "base_url": fake.url})
    res = run_cli("gazetteer", "set", "Kilimani", str(fg.KILIMANI[0]), str(fg.KILIMANI[1]), env=env)
    assert res.returncode == 0, res.stderr
    assert "judged against the new centroid (25 km): 1 accepted, 0 rejected, 0 unguarded" in res.stdout

    async def check() -> tuple[Any, ...]:
        c = await asyncpg.connect(db_url)
        try:
            return await where(c, "INC1")
        finally:
            await c.close()

    assert asyncio.run(check()) == ("location", -1.295, 36.79)


async def test_a_cached_place_sends_no_request(
    fake: fg.FakeGeocoder, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    fake.places["Jogoo Rd"] = fg.JOGOO_KILIMANI
    # Three raw names, one place: one request for it.
    await tickets(
        conn,
        ("INC1", "Kilimani", "NW_KILIMANI_Jogoo Rd FDT1"),
        ("INC2", "Kilimani", "SDUS KILIMANI_Jogoo Rd FDT21"),
        ("INC3", "Kilimani", 'ADR_MNT_KILIMANI_Jogoo Rd FDT7 (opp. "Naivas")'),
    )
    async with worker(geo(fake), pool) as w:
        first = await w.run_pass()
    assert first.requests == 2
    # New tickets at cached places, a second pass: nothing is asked again.
    await tickets(conn, ("INC4", "Kilimani", "NW_ADR_MNT_KILIMANI_Jogoo Rd FDT30"))
    assert await where(conn, "INC4") == ("location", -1.295, 36.79)  # resolved at upsert
    async with worker(geo(fake), pool) as w:
        second = await w.run_pass()
        assert second.requests == 0 and second.queued == 0
        # Even a place already queued is checked against the cache before it is asked.
        w._put(1, "Kilimani", "Jogoo Rd", "Jogoo Rd, Kilimani, Nairobi, Kenya")
        third = await w.run_pass()
        assert third.requests == 0 and third.cache_hits == 1
    assert len(fake.requests) == 2


async def test_no_match_is_cached_and_asked_again_only_after_the_retry_period(
    fake: fg.FakeGeocoder, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    await tickets(conn, ("INC1", "Kilimani", "NW_KILIMANI_Nowhere Lane FDT1"))
    clock = Clock(datetime(2026, 6, 22, 12, 0, tzinfo=UTC))
    cfg = geo(fake, no_match_retry_days=7.0)
    async with worker(cfg, pool, clock) as w:
        assert (await w.run_pass()).outcomes == {"ok": 1, "no_match": 1}
        assert await where(conn, "INC1") == ("cluster", -1.2921, 36.7856)
        clock.now += timedelta(days=6)
        assert (await w.run_pass()).requests == 0
        clock.now += timedelta(days=2)
        fake.places["Nowhere Lane"] = fg.JOGOO_KILIMANI  # the map got better meanwhile
        assert (await w.run_pass()).outcomes == {"ok": 1}
    assert await where(conn, "INC1") == ("location", -1.295, 36.79)


async def test_5xx_backs_off_honouring_retry_after_then_succeeds(
    fake: fg.FakeGeocoder, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    fake.fail_first["Kilimani"] = 2
    fake.retry_after_s = 0.3
    await tickets(conn, ("INC1", "Kilimani", "NW_KILIMANI"))
    async with worker(geo(fake), pool) as w:
        report = await w.run_pass()
    assert report.outcomes == {"error": 2, "ok": 1}
    arrivals = fake.arrivals()
    assert arrivals[1] - arrivals[0] >= 0.28 and arrivals[2] - arrivals[1] >= 0.28
    assert await where(conn, "INC1") == ("cluster", -1.2921, 36.7856)


async def test_a_place_that_keeps_failing_is_stored_as_error_and_the_rest_go_on(
    fake: fg.FakeGeocoder, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    fake.places.update({"Slow Rd": fg.JOGOO_KILIMANI, "Jogoo Rd": fg.JOGOO_KILIMANI})
    fake.slow["Slow Rd"] = 1.0
    await tickets(
        conn, ("INC1", "Kilimani", "KILIMANI_Slow Rd FDT1"), ("INC2", "Kilimani", "KILIMANI_Jogoo Rd FDT1")
    )
    clock = Clock(datetime(2026, 6, 22, 12, 0, tzinfo=UTC))
    async with worker(geo(fake, timeout_s=0.2, error_retry_s=600.0), pool, clock) as w:
        report = await w.run_pass()
        assert report.outcomes == {"ok": 2, "error": 3}
        row = await conn.fetchrow(
            "SELECT status, retry_at, last_error FROM tickets.geo_locations WHERE location = 'Slow Rd'"
        )
        assert row is not None and row["status"] == "error" and "timeout" in row["last_error"]
        assert row["retry_at"] == clock.now + timedelta(seconds=600)
        assert await where(conn, "INC2") == ("location", -1.295, 36.79)
        assert await where(conn, "INC1") == ("cluster", -1.2921, 36.7856)
        assert (await w.run_pass()).requests == 0  # not before retry_at
        clock.now += timedelta(seconds=601)
        fake.slow.clear()
        assert (await w.run_pass()).outcomes == {"ok": 1}
    assert await where(conn, "INC1") == ("location", -1.295, 36.79)


async def test_a_refused_key_stops_the_worker_loudly_without_retrying(
    fake: fg.FakeGeocoder, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    await tickets(
        conn, ("INC1", "Kilimani", "KILIMANI_Jogoo Rd FDT1"), ("INC2", "Westlands", "WESTLANDS_Jogoo Rd FDT1")
    )
    metrics = Metrics()
    stop = asyncio.Event()
    w = worker(geo(fake, api_key="wrong"), pool, metrics=metrics)
    task = asyncio.create_task(w.run(stop))
    try:
        await apoll(lambda: w.stopped == "auth", what="auth stop")
        w.notify()  # a drain pass later: still nothing sent
        await asyncio.sleep(0.2)
        assert len(fake.requests) == 1 and fake.statuses() == {401: 1}
        assert metric(metrics, "fleettickets_geocode_stopped", reason="auth") == 1
        assert not task.done()  # the daemon stays up; readiness does not depend on it
        # A reload (SIGHUP) with a good key resumes.
        w.reconfigure(dataclasses.replace(w.config, api_key=fg.KEY))
        await apoll(lambda: fake.statuses()[200] >= 1, what="resumed")
        assert metric(metrics, "fleettickets_geocode_stopped", reason="auth") == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


# --- the queue ------------------------------------------------------------------------------


async def test_a_restart_resumes_the_queue_from_the_database(
    fake: fg.FakeGeocoder, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    fake.default_point = True
    await tickets(conn, *[(f"INC{i}", "Kilimani", f"KILIMANI_Street {i} FDT1") for i in range(5)])
    async with worker(geo(fake), pool) as first:
        report = await first.run_pass(limit=3)
    assert report.stopped == "limit" and report.left == 3
    # The process dies with three places queued in memory; a new one finds them again.
    async with worker(geo(fake), pool) as second:
        report = await second.run_pass()
    assert report.requests == 3 and report.left == 0
    queries = fake.queries()
    assert len(queries) == 6 and len(set(queries)) == 6  # everything once, nothing twice
    assert await conn.fetchval("SELECT count(*) FROM tickets.inc WHERE geom IS NULL") == 0


async def test_a_verified_row_survives_a_geocode_pass(
    fake: fg.FakeGeocoder, pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    from fleetticketsd.geocoding.geocode import set_gazetteer

    fake.places["Jogoo Rd"] = fg.MOMBASA  # the provider would say something else
    await tickets(conn, ("INC1", "Kilimani", "KILIMANI_Jogoo Rd FDT1"))
    await set_gazetteer(conn, "Kilimani", "Jogoo Rd", -1.3, 36.8)
    # Even if it were asked (retry time passed, status not ok), the store would not overwrite it.
    await conn.execute(
        "UPDATE tickets.geo_locations SET status = 'no_match', retry_at = now() - interval '1 day'"
    )
    async with worker(geo(fake), pool) as w:
        report = await w.run_pass()
    assert fake.queries() == ["Kilimani, Nairobi, Kenya"]
    assert report.requests == 1
    async with worker(geo(fake), pool) as w:
        from fleetticketsd.geocoding.geocode import Job
        from fleetticketsd.geocoding.providers import Answer

        await w._store(Job(1, 0, "Kilimani", "Jogoo Rd", "q"), Answer("ok", lat=-4.0, lon=39.6))
    row = await conn.fetchrow("SELECT verified, ST_Y(geom) AS lat FROM tickets.geo_locations")
    assert row is not None and row["verified"] and row["lat"] == -1.3


async def test_every_actionable_sample_ticket_ends_with_a_point(
    fake: fg.FakeGeocoder, engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    for path in sorted((SAMPLE / "inc" / "changes").glob("*.csv")):
        bucket.put(inc_key(path.name), path.read_bytes())
    assert (await drain(engine, engine.config.dataset("inc"))).ok
    fake.default_point = True
    fake.places["Kamakis"] = None  # some places are unknown: their tickets use the centroid
    async with worker(geo(fake, rate_per_second=50.0), engine.pool) as w:
        report = await w.run_pass()
    assert report.stopped is None and report.left == 0
    assert "Quarry Road, Nairobi, Kenya" in fake.queries()  # the alias, not the code
    missing = await conn.fetchval(
        "SELECT count(*) FROM tickets.inc WHERE is_actionable AND closed_at IS NULL "
        "AND coalesce(normalized_status, '') <> 'closed' AND geom IS NULL"
    )
    assert missing == 0
    by_source = dict(await conn.fetch("SELECT geo_source, count(*) FROM tickets.inc GROUP BY 1"))
    assert by_source.get("location", 0) > 0 and by_source.get("cluster", 0) > 0


async def test_opencage_and_nominatim_dialects(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    await tickets(
        conn, ("INC1", "Kilimani", "KILIMANI_Jogoo Rd FDT1"), ("INC2", "Kilimani", "KILIMANI_Nowhere FDT1")
    )
    places: dict[str, tuple[float, float] | None] = {"Kilimani": fg.KILIMANI, "Jogoo Rd": fg.JOGOO_KILIMANI}
    for provider in ("opencage", "nominatim"):
        await conn.execute("TRUNCATE tickets.geo_locations, tickets.geo_clusters")
        server = fg.FakeGeocoder(places=dict(places)).start(provider)
        try:
            async with worker(geo(server, provider=provider), pool) as w:
                report = await w.run_pass()
        finally:
            server.stop()
        assert report.outcomes == {"ok": 2, "no_match": 1}, provider
        assert await where(conn, "INC1") == ("location", -1.295, 36.79)


# --- the command line -----------------------------------------------------------------------


def test_geocode_command_runs_one_pass_and_gazetteer_set_corrects(
    fake: fg.FakeGeocoder, cli_env: Callable[..., dict[str, str]], db_url: str
) -> None:
    async def seed() -> None:
        c = await asyncpg.connect(db_url)
        try:
            await tickets(c, ("INC1", "Kilimani", "KILIMANI_Jogoo Rd FDT1"))
        finally:
            await c.close()

    asyncio.run(seed())
    fake.places["Jogoo Rd"] = fg.JOGOO_KILIMANI
    env = cli_env(geocoder={"enabled": True, "base_url": fake.url, "rate_per_second": 20.0})
    env["GEOCODER_API_KEY"] = fg.KEY
    res = run_cli("geocode", "--clusters", env=env)
    assert res.returncode == 0, res.stderr
    assert "1 request(s)" in res.stdout and fake.queries() == ["Kilimani, Nairobi, Kenya"]
    res = run_cli("geocode", "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert '"requests": 1' in res.stdout and '"budget_remaining": 4998' in res.stdout
    res = run_cli("gazetteer", "set", "Kilimani", "NW_KILIMANI_Jogoo Rd FDT1", "-1.3", "36.8", env=env)
    assert res.returncode == 0, res.stderr
    assert "Kilimani / Jogoo Rd" in res.stdout and "1 ticket(s)" in res.stdout

    async def check() -> tuple[Any, ...]:
        c = await asyncpg.connect(db_url)
        try:
            return await where(c, "INC1")
        finally:
            await c.close()

    assert asyncio.run(check()) == ("location", -1.3, 36.8)
    assert run_cli("gazetteer", "set", "Kilimani", "north", "36.8", env=env).returncode == 2


def test_metrics_expose_the_contract_names(fake: fg.FakeGeocoder) -> None:
    m = Metrics()
    Geocoder(geo(fake), lambda: None, m)  # type: ignore[arg-type,return-value]
    text = generate_latest(m.registry).decode()
    for name in (
        "fleettickets_geocode_queue_depth",
        'fleettickets_geocode_requests_total{outcome="rate_limited",provider="locationiq"}',
        "fleettickets_geocode_budget_remaining",
    ):
        assert name in text


# --- inside the daemon ----------------------------------------------------------------------


def test_daemon_geocodes_what_its_drains_bring_and_reloads_limits(
    fake: fg.FakeGeocoder,
    start_daemon: Callable[..., tuple[Any, dict[str, Any]]],
    bucket: Bucket,
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import signal

    from .conftest import csv_file, poll, row

    fake.places["Jogoo Rd"] = fg.JOGOO_KILIMANI
    monkeypatch.setenv("GEOCODER_API_KEY", fg.KEY)
    bucket.put(
        inc_key("2026-06-22T10-00-00.csv"), csv_file(row("T1"), row("T2", location_name="SDUS KILIMANI_FDT2"))
    )
    geocoder = {"enabled": True, "base_url": fake.url, "rate_per_second": 20.0, "refill_interval_s": 300.0}
    d, data = start_daemon(geocoder=geocoder)
    poll(
        lambda: d.metric("fleettickets_geocode_requests_total", provider="locationiq", outcome="ok") == 2,
        what="cluster and location geocoded after the start-up drain",
    )

    async def sources() -> dict[str, str]:
        c = await asyncpg.connect(db_url)
        try:
            return {
                r["ticket_id"]: r["geo_source"]
                for r in await c.fetch("SELECT ticket_id, geo_source FROM tickets.inc")
            }
        finally:
            await c.close()

    poll(lambda: asyncio.run(sources()) == {"T1": "location", "T2": "cluster"}, what="tickets placed")
    assert d.metric("fleettickets_geocode_queue_depth") == 0
    assert d.metric("fleettickets_geocode_unguarded_locations") == 0  # Kilimani has its centroid
    assert d.metric("fleettickets_geocode_budget_remaining") == 4998
    status, _ = d.get("/readyz")
    assert status == 200
    # The key travels in the provider's query string: no log line may carry it.
    assert fg.KEY not in d.log_path.read_text()
    # SIGHUP with a new budget: the worker takes it without a restart.
    d.write_config({**data, "geocoder": {**geocoder, "daily_budget": 10}})
    d.signal(signal.SIGHUP)
    poll(lambda: d.logged("configuration reloaded"), what="reload")
    assert d.metric("fleettickets_config_last_reload_successful") == 1

"""Every function of the schema works under any search_path, so a pg_dump restores.

pg_restore runs with search_path = '' and once failed on tickets.feed_point's
unqualified PostGIS calls (migrations/0006_search_path.sql). Here: a guard that every
function is pinned or on a checked allowlist, the main paths in sessions whose
search_path is empty, and a `pg_dump -Fc` / `pg_restore` round trip of a populated
database with the PostgreSQL 15 client binaries.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fleetticketsd import feedgen
from fleetticketsd.config import Config
from fleetticketsd.database import db
from fleetticketsd.ingest.drain import DrainReport, Engine, drain
from fleetticketsd.ingest.source import S3Source
from fleetticketsd.metrics import Metrics

from .conftest import SAMPLE, Bucket, csv_file, inc_key, row, run_cli

PG_BIN = Path("/usr/lib/postgresql/15/bin")

# Functions that are deliberately not pinned (migrations/0006_search_path.sql, groups 1
# and 2): hot, so a SET clause would cost them (it stops a LANGUAGE sql function from
# being inlined, and adds a GUC save/restore per call), and verified to use only
# pg_catalog built-ins and schema-qualified names. Each comes with a call and its
# result, which test_allowlisted_functions_work_under_an_empty_search_path checks in a
# session with search_path = '': a name that needed the path would fail there.
ALLOWLIST: dict[str, tuple[str, Any]] = {
    # per row: STORED generated columns (0001-0003)
    "tickets.eat_ts(text)": (
        "tickets.eat_ts('2026-06-22 15:50:39')",
        datetime(2026, 6, 22, 12, 50, 39, tzinfo=UTC),
    ),
    "tickets.eat_ts_lenient(text)": (
        "tickets.eat_ts_lenient('2026-06-22T15:50:39.5+02:00')",
        datetime(2026, 6, 22, 13, 50, 39, 500000, tzinfo=UTC),
    ),
    "tickets.minutes_or_null(text)": ("tickets.minutes_or_null(' 18734.6 ')", 18735),
    "tickets.bool_or_null(text)": ("tickets.bool_or_null(' TRUE ')", True),
    "tickets.float_or_null(text)": ("tickets.float_or_null('-1.2921')", -1.2921),
    "tickets.clean_location(text,text)": (
        "tickets.clean_location('NW_KILIMANI_Jogoo Rd FDT1', 'Kilimani')",
        "Jogoo Rd",
    ),
    # per row, and calls PostGIS: qualified with the extension's schema by 0006
    "tickets.feed_point(jsonb)": (
        """tickets.feed_point('{"latitude": "-1.2921", "longitude": "36.7856"}')::text""",
        # EWKB of POINT(36.7856 -1.2921), SRID 4326
        "0101000020E61000006ADE718A8E644240EA95B20C71ACF4BF",
    ),
    # per row of every upsert: the stale-write guard
    "tickets.key_name(text)": (
        "tickets.key_name('automations/inc/changes/2026-06-22T15-50-39.csv')",
        "2026-06-22T15-50-39.csv",
    ),
    # per row in views and set-based statements of the read side (0004)
    "reporting.sla_state(timestamp with time zone,timestamp with time zone)": (
        "reporting.sla_state('2026-06-20 10:00+00', '2026-06-22 10:00+00')",
        "breached",
    ),
    "reporting.eat_day(timestamp with time zone)": (
        "reporting.eat_day('2026-06-20 21:00+00')",
        date(2026, 6, 21),
    ),
    "reporting.eat_day_start(date)": (
        "reporting.eat_day_start('2026-06-21')",
        datetime(2026, 6, 20, 21, tzinfo=UTC),
    ),
    # per feature of every map and dashboard call (0009)
    "reporting.json_state(text)": ("reporting.json_state('at_risk')", '"at_risk"'),
    "reporting.key_time(text)": (
        "reporting.key_time('automations/inc/changes/2026-06-22T15-50-39.csv')",
        datetime(2026, 6, 22, 12, 50, 39, tzinfo=UTC),
    ),
}

OUR_FUNCTIONS = """
SELECT p.oid::regprocedure::text AS name, coalesce(p.proconfig, '{}') AS config
FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname IN ('tickets', 'reporting')
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
ORDER BY 1
"""
POSTGIS_SCHEMA = (
    "SELECT n.nspname FROM pg_catalog.pg_extension e "
    "JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'postgis'"
)


async def postgis_schema(conn: asyncpg.Connection) -> str:
    schema = await conn.fetchval(POSTGIS_SCHEMA)
    assert schema
    return str(schema)


# --------------------------------------------------------------------------- the guard


async def test_every_function_is_pinned_or_allowlisted(conn: asyncpg.Connection) -> None:
    """A CREATE OR REPLACE FUNCTION in a later migration drops the function's SET clauses:
    this fails until the migration pins it again (or the function joins the allowlist)."""
    pinned = f"search_path=pg_catalog, {await postgis_schema(conn)}, tickets, reporting, pg_temp"
    functions = {r["name"]: r for r in await conn.fetch(OUR_FUNCTIONS)}
    unhandled = [
        name
        for name, r in functions.items()
        if name not in ALLOWLIST and not any(c.startswith("search_path=") for c in r["config"])
    ]
    assert unhandled == [], "neither pinned (SET search_path) nor allowlisted in this test"
    wrong = {n: r["config"] for n, r in functions.items() if n not in ALLOWLIST and pinned not in r["config"]}
    assert wrong == {}, f"pinned to another path than {pinned!r}"
    # An allowlisted function must exist (no stale entries) and carry no SET at all:
    # a SET clause is exactly what it is allowlisted to avoid.
    assert sorted(set(ALLOWLIST) - set(functions)) == []
    assert {n: functions[n]["config"] for n in ALLOWLIST if functions[n]["config"]} == {}
    assert len(functions) > len(ALLOWLIST)  # the query found the pinned ones too


async def test_allowlisted_functions_work_under_an_empty_search_path(conn: asyncpg.Connection) -> None:
    await conn.execute("SET search_path = ''")
    got = {name: await conn.fetchval(f"SELECT {call}") for name, (call, _) in ALLOWLIST.items()}
    assert got == {name: want for name, (_, want) in ALLOWLIST.items()}


async def test_hot_functions_are_still_inlined(conn: asyncpg.Connection) -> None:
    """feed_point and clean_location run per row and rely on the planner inlining them
    (0002, 0003); a SET clause would stop that. Inlined, with PostGIS reached by name."""
    schema = await postgis_schema(conn)
    await conn.execute("SET search_path = ''")
    rows = await conn.fetch(
        "EXPLAIN (VERBOSE, COSTS OFF) SELECT tickets.feed_point(raw), "
        "tickets.clean_location(location_name, cluster) FROM tickets.inc"
    )
    plan = "\n".join(r[0] for r in rows)
    assert "feed_point" not in plan and "clean_location" not in plan, plan
    assert f"{schema}.st_setsrid({schema}.st_makepoint(" in plan and "regexp_replace(" in plan, plan


# --------------------------------------------------------------------------- a populated database

NEW_X_KEY = "automations/x/changes/2026-06-22T18-00-00.csv"
MAP = "SELECT reporting.fn_tickets_for_map()::text"
DASHBOARD = "SELECT reporting.fn_inc_dashboard(p_from => '2026-06-01', p_to => '2026-07-01')::text"


def point(schema: str, lon: float | str, lat: float | str) -> str:
    """A PostGIS point in SQL that needs no search_path."""
    return f"{schema}.ST_SetSRID({schema}.ST_MakePoint({lon}, {lat}), 4326)"


def bad_row() -> str:
    return '"only","three","fields"'


def engine_config(make_config: Callable[..., Config], **overrides: Any) -> Config:
    datasets = {
        "inc": {"prefix": "automations/inc/", "table": "tickets.inc", "post_apply": ["capture_history"]},
        "crq": {"prefix": "automations/crq/", "table": "tickets.crq"},
    }
    return make_config(datasets=datasets, **overrides)


async def drain_all(config: Config, *datasets: str) -> list[DrainReport]:
    """One pass of each dataset through the engine, on a pool of its own."""
    async with S3Source(config.s3) as source:
        pool = await db.create_pool(config.database)
        try:
            engine = Engine(config, pool, source, Metrics())
            return [await drain(engine, config.dataset(name)) for name in datasets]
        finally:
            await pool.close()


async def populate(config: Config, bucket: Bucket, conn: asyncpg.Connection) -> None:
    """INC's sample, a CRQ feedgen stream, a ticket with feed coordinates and a reject,
    drained through the engine (INC with its capture_history hook); then a gazetteer,
    which the triggers spread over the tickets."""
    for path in sorted((SAMPLE / "inc" / "changes").glob("*.csv")):
        bucket.put(inc_key(path.name), path.read_bytes())
    bucket.put(
        inc_key("2026-06-22T18-00-00.csv"),
        csv_file(row("FEEDPT1", latitude="-1.2921", longitude="36.7856"), bad_row()),
    )
    crq = feedgen.FeedSpec(dataset="crq", seed=3, baseline_rows=150, deltas=2, delta_rows=5)
    for name, body in feedgen.generate(crq):
        bucket.put(f"automations/crq/changes/{name}", body)
    for report in await drain_all(config, "inc", "crq"):
        assert report.ok and report.files_applied > 0, report

    schema = await postgis_schema(conn)
    await conn.execute(
        f"""
        INSERT INTO tickets.geo_clusters (cluster, query, geom, status, provider)
        SELECT c, c || ', Kenya', {point(schema, "36.8 + n / 100.0", "-1.3 + n / 100.0")}, 'ok', 'test'
        FROM (SELECT c, row_number() OVER (ORDER BY c) AS n
              FROM (SELECT cluster FROM tickets.inc UNION SELECT cluster FROM tickets.crq) x(c)
              WHERE c IS NOT NULL) y
        """
    )
    await conn.execute(
        f"""
        INSERT INTO tickets.geo_locations (cluster, location, query, geom, distance_km, status, provider)
        VALUES ('Kilimani', 'Jogoo Rd', 'Jogoo Rd, Kilimani, Nairobi, Kenya',
                {point(schema, 36.79, -1.295)}, 0.6, 'ok', 'test')
        """
    )
    await conn.execute(
        "INSERT INTO tickets.geo_budget (provider, day, requests) VALUES ('test', '2026-06-22', 3)"
    )
    await conn.execute("SELECT tickets.capture_history()")


# --------------------------------------------------------------------------- empty search_path


async def test_main_paths_under_an_empty_search_path(
    db_url: str, bucket: Bucket, make_config: Callable[..., Config]
) -> None:
    # Every session opened from here on, the engine's pool included, starts with an
    # empty search_path: only pg_catalog (and pg_temp) is searched.
    setup = await asyncpg.connect(db_url)
    await setup.execute(f"ALTER DATABASE {db_url.rsplit('/', 1)[1]} SET search_path = ''")
    await setup.close()
    conn = await asyncpg.connect(db_url)
    try:
        assert await conn.fetchval("SHOW search_path") == '""'
        await check_main_paths(conn, engine_config(make_config), bucket)
    finally:
        await conn.close()


async def check_main_paths(conn: asyncpg.Connection, config: Config, bucket: Bucket) -> None:
    schema = await postgis_schema(conn)
    await populate(config, bucket, conn)
    # The file with feed coordinates: feed_point's PostGIS calls ran in the upsert.
    feed = await conn.fetchrow(
        "SELECT geo_source, latitude, longitude, feed_geom IS NOT NULL "
        "FROM tickets.inc WHERE ticket_id = 'FEEDPT1'"
    )
    assert feed is not None and tuple(feed) == ("feed", -1.2921, 36.7856, True)
    assert await conn.fetchval("SELECT count(*) FROM tickets.ingest_rejects") == 1
    # The gazetteer triggers resolved every ticket of both tables.
    sources = await conn.fetch(
        "SELECT 'inc' AS t, geo_source, count(*) AS n FROM tickets.inc GROUP BY 2 "
        "UNION ALL SELECT 'crq', geo_source, count(*) FROM tickets.crq GROUP BY 2"
    )
    by_source = {(r["t"], r["geo_source"]): r["n"] for r in sources}
    assert by_source[("inc", "feed")] == 1 and by_source[("inc", "location")] >= 1
    assert by_source[("crq", "cluster")] > 50
    assert ("inc", None) not in by_source and ("crq", None) not in by_source
    # Moving a location moves its tickets (geo_locations_changed → apply_gazetteer → resolve_geo).
    assert (
        await conn.execute(f"UPDATE tickets.geo_locations SET geom = {point(schema, 36.7, -1.2)}")
        == "UPDATE 1"
    )
    at_location = (
        "SELECT array_agg(DISTINCT (longitude, latitude)::text) FROM tickets.inc "
        "WHERE geo_source = 'location'"
    )
    assert await conn.fetchval(at_location) == ["(36.7,-1.2)"]
    # Removing a cluster centroid un-maps its tickets (geo_clusters_changed).
    await conn.execute("DELETE FROM tickets.geo_clusters WHERE cluster = 'Westlands'")
    westlands = await conn.fetchrow(
        "SELECT count(*) AS n, count(geom) AS mapped FROM tickets.inc WHERE cluster = 'Westlands'"
    )
    assert westlands is not None and westlands["n"] > 0 and westlands["mapped"] == 0

    counts = await conn.fetchrow(
        "SELECT count(*) AS total, count(*) FILTER (WHERE normalized_status = 'open') AS open, "
        "count(*) FILTER (WHERE normalized_status = 'closed') AS closed FROM tickets.inc"
    )
    assert counts is not None
    m = json.loads(await conn.fetchval(MAP))
    assert m["summary"]["inc"]["total"] == counts["total"]
    assert m["summary"]["crq"]["total"] == await conn.fetchval("SELECT count(*) FROM tickets.crq")
    assert len(m["features"]) == m["summary"]["inc"]["on_map"] + m["summary"]["crq"]["on_map"] > 0
    assert m["freshness"]["inc"]["watermark_key"] == inc_key("2026-06-22T18-00-00.csv")
    d = json.loads(await conn.fetchval(DASHBOARD))
    assert d["metrics"]["open"] == counts["open"] and d["metrics"]["closed"] == counts["closed"] > 0
    assert d["open"]["features"] and d["closed"]["features"]
    with pytest.raises(asyncpg.InvalidParameterValueError, match=r"^p_window: '0d' is not a window"):
        await conn.execute("SELECT reporting.fn_inc_dashboard(p_window => '0d')")  # dashboard_error

    await conn.execute("SELECT tickets.capture_history()")
    assert await conn.fetchval("SELECT count(*) FROM tickets.closure_events") == counts["closed"]
    backlog = "SELECT open_backlog FROM tickets.inc_daily_snapshot WHERE day = reporting.eat_day(now())"
    assert await conn.fetchval(backlog) == counts["open"]

    # A third dataset, then tickets in it: the generated columns and the gazetteer reach it.
    await conn.execute("SELECT tickets.create_dataset_table('x')")
    tables = [r["t"] for r in await conn.fetch("SELECT t::text AS t FROM tickets.ticket_tables() t")]
    assert tables == ["tickets.crq", "tickets.inc", "tickets.x"]
    x1 = {
        "cluster": "Kilimani",
        "location_name": "SDUS KILIMANI_Jogoo Rd FDT21",
        "normalized_status": "open",
        "is_actionable": "true",
        "created_at_service": "2026-06-22 10:00:00",
    }
    x2 = {"cluster": "Kilimani", "latitude": "-1.3", "longitude": "36.8"}
    await conn.executemany(
        "INSERT INTO tickets.x (ticket_id, raw, source_key) VALUES ($1, $2::jsonb, $3)",
        [("X1", json.dumps(x1), NEW_X_KEY), ("X2", json.dumps(x2), NEW_X_KEY)],
    )
    assert await conn.fetchval("SELECT tickets.resolve_ticket_geo('tickets.x', $1)", NEW_X_KEY) == 2
    x = await conn.fetch(
        "SELECT ticket_id, location_key, geo_source, longitude, latitude, created_at_service "
        "FROM tickets.x ORDER BY 1"
    )
    assert [tuple(r) for r in x] == [
        ("X1", "Jogoo Rd", "location", 36.7, -1.2, datetime(2026, 6, 22, 7, tzinfo=UTC)),
        ("X2", None, "feed", 36.8, -1.3, None),
    ]
    # geo_wanted reads every ticket table: X1 is the only wanted place without a region.
    wanted = await conn.fetch("SELECT * FROM tickets.geo_wanted() WHERE region IS NULL")
    assert [tuple(r) for r in wanted] == [("Kilimani", None, "Jogoo Rd")]


# --------------------------------------------------------------------------- pg_dump / pg_restore

TABLES = """
SELECT c.oid::regclass::text AS name
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname IN ('tickets', 'reporting') AND c.relkind IN ('r', 'p')
ORDER BY 1
"""
# Rendered by each type's output function (geometry as hex EWKB): exact, generated
# columns included.
TABLE_ROWS = "SELECT t::text FROM {table} t"
# Derived from now(), so they differ between any two calls.
NOW_KEYS = frozenset({"generated_at", "closed_since", "age_hours", "hours_to_breach"})
KEPT_STATE = (
    "tickets.inc",
    "tickets.crq",
    "tickets.ingest_files",
    "tickets.ingest_rejects",
    "tickets.import_meta",
    "tickets.schema_migrations",
    "tickets.closure_events",
    "tickets.inc_daily_snapshot",
    "tickets.geo_clusters",
    "tickets.geo_locations",
    "tickets.geo_budget",
    "tickets.geo_cluster_aliases",
)


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A PostgreSQL 15 client binary (.ci/run installs them: postgresql-client-15)."""
    path = PG_BIN / name
    assert path.is_file(), f"{path} is missing: apt-get install postgresql-client-15"
    return subprocess.run([str(path), *args], capture_output=True, text=True, timeout=120)


def without_now(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_now(v) for k, v in value.items() if k not in NOW_KEYS}
    if isinstance(value, list):
        return [without_now(v) for v in value]
    return value


async def snapshot(url: str) -> tuple[dict[str, list[str]], list[Any]]:
    conn = await asyncpg.connect(url)
    try:
        tables = [r["name"] for r in await conn.fetch(TABLES)]
        rows = {t: sorted(r[0] for r in await conn.fetch(TABLE_ROWS.format(table=t))) for t in tables}
        payloads = [json.loads(await conn.fetchval(sql)) for sql in (MAP, DASHBOARD)]
    finally:
        await conn.close()
    for p in payloads:
        assert "generated_at" in p
    return rows, [without_now(p) for p in payloads]


async def test_pg_dump_of_a_populated_database_restores(
    db_url: str,
    empty_db_url: str,
    bucket: Bucket,
    make_config: Callable[..., Config],
    cli_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await populate(engine_config(make_config), bucket, conn)
    finally:
        await conn.close()
    before_rows, before_payloads = await snapshot(db_url)
    # Not vacuous: every kind of state the engine keeps has rows to carry over.
    for table in KEPT_STATE:
        assert before_rows[table], table

    dump = tmp_path / "fleettickets.dump"
    dumped = run_tool("pg_dump", "--format=custom", f"--file={dump}", f"--dbname={db_url}")
    assert (dumped.returncode, dumped.stderr) == (0, "")
    restored = run_tool("pg_restore", "--exit-on-error", f"--dbname={empty_db_url}", str(dump))
    assert (restored.returncode, restored.stderr) == (0, "")

    after_rows, after_payloads = await snapshot(empty_db_url)
    assert list(after_rows) == list(before_rows)
    for table, rows in before_rows.items():
        assert after_rows[table] == rows, table
    assert after_payloads == before_payloads

    env = cli_env()
    env["DATABASE_URL"] = empty_db_url
    check = run_cli("migrate", "--check", env=env)
    assert (check.returncode, check.stdout.strip()) == (0, "schema is current"), check.stderr

    # The restored database goes on where the original stopped: a new file applies, its
    # hook records the closure, and its reject gets the next id of the restored identity.
    new_key = inc_key("2026-06-23T08-00-00.csv")
    closing = row(
        "INC000000000002",
        normalized_status="closed",
        raw_status="Closed",
        closed_at="2026-06-23 07:30:00",
        mttr="4300",
    )
    bucket.put(new_key, csv_file(closing, row("FEEDPT2", latitude="-1.30", longitude="36.80"), bad_row()))
    (report,) = await drain_all(engine_config(make_config, database={"url": empty_db_url}), "inc")
    assert report.ok and report.watermark == new_key, report
    assert (report.files_applied, report.rows_upserted, report.rows_rejected) == (1, 2, 1)
    conn = await asyncpg.connect(empty_db_url)
    try:
        closure = await conn.fetchrow(
            "SELECT closed_at, mttr_minutes, source_key FROM tickets.closure_events "
            "WHERE ticket_id = 'INC000000000002'"
        )
        assert closure is not None
        assert tuple(closure) == (datetime(2026, 6, 23, 4, 30, tzinfo=UTC), 4300, new_key)
        feed = await conn.fetchrow(
            "SELECT geo_source, latitude, longitude FROM tickets.inc WHERE ticket_id = 'FEEDPT2'"
        )
        assert feed is not None and tuple(feed) == ("feed", -1.3, 36.8)
        assert await conn.fetchval("SELECT count(*) FROM tickets.ingest_rejects") == 2
    finally:
        await conn.close()

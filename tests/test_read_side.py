"""The read side (issue 5) against real PostgreSQL: SLA view, history, map and dashboard.

Expectations are computed by hand. Ages are set relative to now() inside one
transaction, where now() is constant, so a boundary ("exactly 36 h") is exact.
History is driven through the real engine where it matters (re-applied and late files).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from fleetticketsd.config import Config
from fleetticketsd.database import db
from fleetticketsd.ingest import history
from fleetticketsd.ingest.drain import Engine, drain
from fleetticketsd.ingest.source import S3Source
from fleetticketsd.metrics import Metrics

from .conftest import PG_ADMIN_URL, Bucket, csv_file, inc_key, row, run_cli

# An EAT wall-clock string for now() minus an interval, as the feed writes it (with
# microseconds, which tickets.eat_ts accepts), so the typed column is exactly that instant.
AGO = "to_char((now() - {}::interval) AT TIME ZONE 'UTC' + interval '3 hours', 'YYYY-MM-DD HH24:MI:SS.US')"


async def put(conn: asyncpg.Connection, ticket_id: str, table: str = "tickets.inc", **fields: Any) -> None:
    """Insert a ticket directly. A value given as ("ago", '36 hours') becomes that long before now()."""
    base: dict[str, Any] = {"normalized_status": "open", "cluster": "Kilimani", "owner": "P. Wanjiru"}
    base.update(fields)
    keys, exprs, args = [], [], []
    for k, v in base.items():
        keys.append(k)
        if isinstance(v, tuple) and v[0] == "ago":
            args.append(v[1])
            exprs.append(AGO.format(f"${len(args)}::text"))
        else:
            args.append(v)
            exprs.append(f"${len(args)}::text")
    obj = ", ".join(f"'{k}', {e}" for k, e in zip(keys, exprs, strict=True))
    args.append(ticket_id)
    await conn.execute(
        f"INSERT INTO {table} (ticket_id, raw, source_key) "
        f"VALUES (${len(args)}, jsonb_build_object({obj}), 'automations/x/changes/2026-06-22T10-00-00.csv')",
        *args,
    )


def ago(interval: str) -> tuple[str, str]:
    return ("ago", interval)


async def set_point(conn: asyncpg.Connection, ticket_id: str, table: str = "tickets.inc") -> None:
    await conn.execute(
        f"UPDATE {table} SET geom = ST_SetSRID(ST_MakePoint(36.78, -1.29), 4326), geo_source = 'cluster' "
        "WHERE ticket_id = $1",
        ticket_id,
    )


async def fetch_json(conn: asyncpg.Connection, sql: str, *args: Any) -> Any:
    value = await conn.fetchval(sql, *args)
    return json.loads(value) if isinstance(value, str) else value


# --------------------------------------------------------------------------- SLA view


async def test_sla_states_at_exact_boundaries(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await put(conn, "OK", created_at_service=ago("35:59:59.999999"))
        await put(conn, "RISK36", created_at_service=ago("36 hours"))
        await put(conn, "RISK48", created_at_service=ago("47:59:59.999999"))
        await put(conn, "BREACH48", created_at_service=ago("48 hours"))
        await put(conn, "FRESH", created_at_service=ago("0 seconds"))
        await put(conn, "CLOSED", normalized_status="closed", created_at_service=ago("100 hours"))
        rows = await conn.fetch(
            "SELECT ticket_id, sla_state, age_hours, hours_to_breach"
            " FROM tickets.inc_open_sla ORDER BY ticket_id"
        )
    got = {r["ticket_id"]: (r["sla_state"], str(r["age_hours"]), str(r["hours_to_breach"])) for r in rows}
    assert got == {
        "OK": ("ok", "36.00", "12.00"),  # display rounds up; the state uses the exact interval
        "RISK36": ("at_risk", "36.00", "12.00"),
        "RISK48": ("at_risk", "48.00", "0.00"),
        "BREACH48": ("breached", "48.00", "0.00"),
        "FRESH": ("ok", "0.00", "48.00"),
    }


async def test_snapshot_counts_match_the_view_at_exact_boundaries(conn: asyncpg.Connection) -> None:
    """capture_history() counts by clock ranges (an index-only scan), not through the
    view: the two must agree exactly at 36 h and 48 h, and on tickets without a clock."""
    async with conn.transaction():
        await put(conn, "OK", created_at_service=ago("35:59:59.999999"))
        await put(conn, "RISK36", created_at_service=ago("36 hours"))
        await put(conn, "RISK48", created_at_service=ago("47:59:59.999999"))
        await put(conn, "BREACH48", created_at_service=ago("48 hours"))
        await put(conn, "FALLBACK", created_at_service="", first_seen_at=ago("50 hours"))
        await put(conn, "NOCLOCK", created_at_service="", first_seen_at="")
        await put(conn, "CLOSED", normalized_status="closed", created_at_service=ago("100 hours"))
        await conn.execute("SELECT tickets.capture_history()")
        snap = await conn.fetchrow(
            "SELECT open_backlog, breached, at_risk FROM tickets.inc_daily_snapshot"
            " WHERE day = reporting.eat_day(now())"
        )
        view = await conn.fetchrow(
            "SELECT count(*) AS open_backlog, count(*) FILTER (WHERE sla_state = 'breached') AS breached,"
            " count(*) FILTER (WHERE sla_state = 'at_risk') AS at_risk FROM tickets.inc_open_sla"
        )
    assert tuple(snap) == tuple(view) == (6, 2, 2)


async def test_sla_clock_falls_back_to_first_seen(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await put(conn, "FALLBACK", created_at_service="", first_seen_at=ago("40 hours"))
        # The service's own time wins over first_seen_at when present.
        await put(conn, "SERVICE", created_at_service=ago("10 hours"), first_seen_at=ago("50 hours"))
        await put(conn, "NOCLOCK", created_at_service="", first_seen_at="")
        rows = {
            r["ticket_id"]: r
            for r in await conn.fetch(
                "SELECT v.*, v.sla_clock_start = now() - interval '40 hours' AS is_40h_ago "
                "FROM tickets.inc_open_sla v"
            )
        }
    assert rows["FALLBACK"]["sla_state"] == "at_risk" and rows["FALLBACK"]["is_40h_ago"]
    assert rows["FALLBACK"]["hours_to_breach"] == 8
    assert rows["SERVICE"]["sla_state"] == "ok" and rows["SERVICE"]["age_hours"] == 10
    assert rows["NOCLOCK"]["sla_state"] is None and rows["NOCLOCK"]["age_hours"] is None


# --------------------------------------------------------------------------- history


async def test_eat_day_boundary_helpers(conn: asyncpg.Connection) -> None:
    assert await conn.fetchval("SELECT reporting.eat_day('2026-06-20 20:59:59.999999+00')") == date(
        2026, 6, 20
    )
    assert await conn.fetchval("SELECT reporting.eat_day('2026-06-20 21:00:00+00')") == date(2026, 6, 21)
    assert await conn.fetchval("SELECT reporting.eat_day_start('2026-06-21')") == datetime(
        2026, 6, 20, 21, tzinfo=UTC
    )


async def test_snapshot_counts_by_eat_day(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        # Feed times are EAT: 23:59:59 EAT is still the 20th; 21:00Z is 00:00 EAT on the 21st.
        await put(conn, "O20", created_at_service="2026-06-20 23:59:59")
        await put(conn, "O21", created_at_service="2026-06-20T21:00:00Z")
        await put(
            conn,
            "C21",
            normalized_status="closed",
            created_at_service="2026-06-19 10:00:00",
            closed_at="2026-06-21 00:00:00",
            mttr="2280",
        )
        await put(
            conn,
            "C20",
            normalized_status="closed",
            created_at_service="2026-06-19 12:00:00",
            closed_at="2026-06-20T20:59:59Z",
            mttr="1979.98",
        )
        # No service time: first_seen_at (21:30 EAT on the 19th) is the clock.
        await put(conn, "F19", created_at_service="", first_seen_at="2026-06-19 21:30:00")
        await conn.execute("SELECT tickets.capture_history()")
        today = await conn.fetchval("SELECT reporting.eat_day(now())")
    snap = {
        r["day"]: dict(r) for r in await conn.fetch("SELECT * FROM tickets.inc_daily_snapshot ORDER BY day")
    }
    assert {d: (s["opened"], s["closed"]) for d, s in snap.items() if d != today} == {
        date(2026, 6, 19): (3, 0),
        date(2026, 6, 20): (1, 1),
        date(2026, 6, 21): (1, 1),
    }
    # Past days were never current while a file was applied: no point-in-time figures.
    assert snap[date(2026, 6, 20)]["open_backlog"] is None
    # Today: the three open tickets, all long past 48 h.
    assert (snap[today]["open_backlog"], snap[today]["breached"], snap[today]["at_risk"]) == (3, 3, 0)
    assert snap[today]["captured_at"] is not None
    events = {r["ticket_id"]: r for r in await conn.fetch("SELECT * FROM tickets.closure_events")}
    assert set(events) == {"C20", "C21"}
    assert events["C21"]["mttr_minutes"] == 2280 and events["C21"]["sla_status"] == "met"
    assert events["C20"]["mttr_minutes"] == 1980


async def test_closure_events_are_append_only(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await put(conn, "C", normalized_status="closed", closed_at="2026-06-21 10:00:00", mttr="5")
        await conn.execute("SELECT tickets.capture_history()")
    with pytest.raises(asyncpg.PostgresError, match="append-only"):
        await conn.execute("UPDATE tickets.closure_events SET owner = 'x'")
    with pytest.raises(asyncpg.PostgresError, match="append-only"):
        await conn.execute("DELETE FROM tickets.closure_events")


@pytest.fixture
async def history_engine(make_config: Callable[..., Config]) -> AsyncIterator[Engine]:
    cfg = make_config(
        datasets={
            "inc": {"prefix": "automations/inc/", "table": "tickets.inc", "post_apply": ["capture_history"]},
            "crq": {"prefix": "automations/crq/", "table": "tickets.crq"},
        }
    )
    pool = await db.create_pool(cfg.database)
    async with S3Source(cfg.s3) as source:
        yield Engine(cfg, pool, source, Metrics())
    await pool.close()


def closed(ticket_id: str, closed_at: str, **values: str) -> str:
    return row(
        ticket_id,
        bucket="closed",
        raw_status="Closed",
        normalized_status="closed",
        created_at_service="2026-06-20 10:00:00",
        closed_at=closed_at,
        **values,
    )


async def events(conn: asyncpg.Connection) -> list[tuple[str, str, str]]:
    rows = await conn.fetch(
        "SELECT ticket_id, closed_at, source_key FROM tickets.closure_events ORDER BY ticket_id, closed_at"
    )
    return [(r["ticket_id"], r["closed_at"].isoformat(), r["source_key"].rsplit("/", 1)[-1]) for r in rows]


async def test_closures_recorded_once_through_the_engine(
    history_engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    engine = history_engine
    inc = engine.config.dataset("inc")
    assert await db.check_dataset(conn, inc) is None  # the hook exists where the engine looks

    bucket.put(inc_key("2026-06-22T10-00-00.csv"), csv_file(row("T1"), row("T2")))
    bucket.put(inc_key("2026-06-22T10-05-00.csv"), csv_file(closed("T1", "2026-06-22 10:01:00", mttr="2941")))
    report = await drain(engine, inc)
    assert report.ok and report.files_applied == 2
    t1 = ("T1", "2026-06-22T07:01:00+00:00", "2026-06-22T10-05-00.csv")
    assert await events(conn) == [t1]
    ev = await conn.fetchrow("SELECT * FROM tickets.closure_events")
    assert ev["mttr_minutes"] == 2941 and ev["sla_status"] == "breached"  # 2941 min ≥ 48 h
    assert ev["observed_at"] == await conn.fetchval(
        "SELECT applied_at FROM tickets.ingest_files WHERE key = $1", inc_key("2026-06-22T10-05-00.csv")
    )

    # A re-export of the same key (new ETag) repeats T1's closure and adds T3's.
    bucket.put(
        inc_key("2026-06-22T10-05-00.csv"),
        csv_file(
            closed("T1", "2026-06-22 10:01:00", mttr="2941", last_seen_at="2026-06-22 10:05:30"),
            closed("T3", "2026-06-22 10:02:00", mttr="30"),
        ),
    )
    # A late file: older than the watermark. T1's stale copy is refused by the guard;
    # T2 was last written by an older file, so its closure is taken.
    bucket.put(
        inc_key("2026-06-22T10-02-00.csv"),
        csv_file(closed("T1", "2026-06-22 09:59:00"), closed("T2", "2026-06-22 10:01:30", mttr="40")),
    )
    # A newer file repeating T1's closure with other bookkeeping: the row changes, the closure does not.
    bucket.put(
        inc_key("2026-06-22T10-10-00.csv"),
        csv_file(closed("T1", "2026-06-22 10:01:00", mttr="2941", last_seen_at="2026-06-22 10:10:00")),
    )
    report = await drain(engine, inc)
    assert report.ok and report.files_applied == 3, report
    assert await events(conn) == [
        t1,
        ("T2", "2026-06-22T07:01:30+00:00", "2026-06-22T10-02-00.csv"),
        ("T3", "2026-06-22T07:02:00+00:00", "2026-06-22T10-05-00.csv"),
    ]
    assert await conn.fetchval("SELECT source_key FROM tickets.inc WHERE ticket_id = 'T1'") == inc_key(
        "2026-06-22T10-10-00.csv"
    )

    # Reopened and closed again: a second, distinct closure.
    bucket.put(
        inc_key("2026-06-22T11-00-00.csv"), csv_file(row("T1", created_at_service="2026-06-20 10:00:00"))
    )
    bucket.put(inc_key("2026-06-22T12-00-00.csv"), csv_file(closed("T1", "2026-06-22 11:30:00", mttr="3090")))
    report = await drain(engine, inc)
    assert report.ok and report.files_applied == 2
    assert [e[:2] for e in await events(conn) if e[0] == "T1"] == [
        ("T1", "2026-06-22T07:01:00+00:00"),
        ("T1", "2026-06-22T08:30:00+00:00"),
    ]
    # The snapshot's closed count for 22 June is the four closures, however often seen.
    assert await conn.fetchval("SELECT closed FROM tickets.inc_daily_snapshot WHERE day = '2026-06-22'") == 4
    # T1, T2 and T3 were all opened on 20 June (T2/T3 via row()'s default service time).
    assert await conn.fetchval("SELECT opened FROM tickets.inc_daily_snapshot WHERE day = '2026-06-20'") == 3


async def test_dry_run_leaves_no_history(
    history_engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    bucket.put(inc_key("2026-06-22T10-05-00.csv"), csv_file(closed("T1", "2026-06-22 10:01:00")))
    report = await drain(history_engine, history_engine.config.dataset("inc"), dry_run=True)
    assert report.ok
    assert await conn.fetchval("SELECT count(*) FROM tickets.closure_events") == 0
    assert await conn.fetchval("SELECT count(*) FROM tickets.inc_daily_snapshot") == 0


HISTORY_DATASETS = {
    "inc": {"prefix": "automations/inc/", "table": "tickets.inc", "post_apply": ["capture_history"]},
    "crq": {"prefix": "automations/crq/", "table": "tickets.crq"},
}


async def snapshot_days(conn: asyncpg.Connection) -> dict[date, asyncpg.Record]:
    return {r["day"]: r for r in await conn.fetch("SELECT * FROM tickets.inc_daily_snapshot ORDER BY day")}


async def test_a_pass_without_files_writes_todays_snapshot(
    history_engine: Engine, conn: asyncpg.Connection
) -> None:
    """The loader wrote today's row on every run; so does every pass, with no file to
    apply. Breaches that come with the passing of time are counted; and no row is made
    up for the days between the tickets' clocks and today (nobody observed them)."""
    await put(conn, "OPEN-OK", created_at_service=ago("2 hours"))
    await put(conn, "OPEN-RISK", created_at_service=ago("40 hours"))
    await put(conn, "OPEN-BREACHED", created_at_service=ago("5 days"))
    await put(conn, "CLOSED", normalized_status="closed", created_at_service=ago("9 days"))
    assert await snapshot_days(conn) == {}
    report = await drain(history_engine, history_engine.config.dataset("inc"))
    assert report.ok and report.files_applied == 0
    today = await conn.fetchval("SELECT reporting.eat_day(now())")
    days = await snapshot_days(conn)
    assert list(days) == [today]
    row_today = days[today]
    assert (row_today["open_backlog"], row_today["breached"], row_today["at_risk"]) == (3, 1, 1)
    first_capture = row_today["captured_at"]
    assert first_capture is not None
    # The session's deferral ended with the pass.
    assert await conn.fetchval("SELECT count(*) FROM tickets.inc_history_days") == 0

    # Another pass without files: the same row, captured again.
    await put(conn, "OPEN-NEW", created_at_service=ago("1 minute"))
    assert (await drain(history_engine, history_engine.config.dataset("inc"))).ok
    days = await snapshot_days(conn)
    assert list(days) == [today] and days[today]["open_backlog"] == 4
    assert days[today]["captured_at"] > first_capture
    # A dataset without the hook gets no history pass.
    assert (await drain(history_engine, history_engine.config.dataset("crq"))).ok
    assert list(await snapshot_days(conn)) == [today]


def test_drain_command_writes_todays_snapshot(cli_env: Callable[..., dict[str, str]], db_url: str) -> None:
    """`fleetticketsd drain` runs the same pass (the daemon's passes are tested above)."""
    res = run_cli("drain", env=cli_env(datasets=HISTORY_DATASETS))
    assert res.returncode == 0, res.stderr

    async def check() -> tuple[int, int]:
        c = await asyncpg.connect(db_url)
        try:
            row = await c.fetchrow(
                "SELECT count(*) AS days, count(*) FILTER (WHERE day = reporting.eat_day(now())"
                " AND open_backlog = 0 AND captured_at IS NOT NULL) AS today FROM tickets.inc_daily_snapshot"
            )
            assert row is not None
            return row["days"], row["today"]
        finally:
            await c.close()

    assert asyncio.run(check()) == (1, 1)


async def test_per_file_hook_leaves_the_recount_to_the_pass_end(conn: asyncpg.Connection) -> None:
    """Inside a pass, capture_history() records the file's closures and notes its days;
    capture_history_pass() recounts them (a late file closing an earlier day included)."""
    await conn.execute(history.BEGIN_PASS)
    async with conn.transaction():
        await put(conn, "C-EARLIER", normalized_status="closed", created_at_service="2026-06-19 10:00:00",
                  closed_at="2026-06-20 12:00:00", mttr="1560")  # fmt: skip
        await put(conn, "O-1", created_at_service="2026-06-21 09:00:00")
        await conn.execute("SELECT tickets.capture_history()")
    assert [r["ticket_id"] for r in await conn.fetch("SELECT ticket_id FROM tickets.closure_events")] == [
        "C-EARLIER"
    ]
    assert await snapshot_days(conn) == {}
    noted = {r["day"] for r in await conn.fetch("SELECT day FROM tickets.inc_history_days")}
    assert noted == {date(2026, 6, 19), date(2026, 6, 20), date(2026, 6, 21)}
    assert await conn.fetchval("SELECT tickets.history_deferred()") is True

    await conn.execute("SELECT tickets.capture_history_pass()")
    today = await conn.fetchval("SELECT reporting.eat_day(now())")
    days = await snapshot_days(conn)
    assert {d: (r["opened"], r["closed"]) for d, r in days.items() if d != today} == {
        date(2026, 6, 19): (1, 0),
        date(2026, 6, 20): (0, 1),
        date(2026, 6, 21): (1, 0),
    }
    assert days[today]["open_backlog"] == 1 and days[date(2026, 6, 20)]["open_backlog"] is None
    assert await conn.fetchval("SELECT count(*) FROM tickets.inc_history_days") == 0
    assert await conn.fetchval("SELECT tickets.history_deferred()") is False


async def test_reader_role_without_the_ledger_gets_both_documents(
    conn: asyncpg.Connection, db_url: str
) -> None:
    """The dashboards' reader cannot read the ledger (tickets.ingest_files); freshness
    and the two documents run as their owner (SECURITY DEFINER, pinned search_path)."""
    role = f"reader_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_ADMIN_URL)
    await admin.execute(f"CREATE ROLE {role} LOGIN")
    try:
        await conn.execute(f"GRANT USAGE ON SCHEMA tickets, reporting TO {role}")
        await conn.execute("REVOKE ALL ON tickets.ingest_files FROM PUBLIC")
        await put(conn, "R-1", created_at_service=ago("3 hours"))
        await set_point(conn, "R-1")
        reader = await asyncpg.connect(db_url.replace("postgres@", f"{role}@"))
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await reader.fetchval("SELECT count(*) FROM tickets.ingest_files")
            await reader.execute("SET search_path = ''")
            m = json.loads(await reader.fetchval("SELECT reporting.fn_tickets_for_map()::text"))
            d = json.loads(await reader.fetchval("SELECT reporting.fn_inc_dashboard()::text"))
        finally:
            await reader.close()
        assert [f["id"] for f in m["features"]] == ["R-1"] and set(m["summary"]["freshness"]) == {
            "inc",
            "crq",
        }
        assert d["metrics"]["open"] == 1
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


# --------------------------------------------------------------------------- map


async def test_map_features_summary_and_freshness(
    history_engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    bucket.put(inc_key("2026-06-22T10-00-00.csv"), csv_file(row("T0")))
    assert (await drain(history_engine, history_engine.config.dataset("inc"))).ok
    async with conn.transaction():
        await put(conn, "I-OPEN", created_at_service=ago("40 hours"))
        await put(conn, "I-NOGEOM", created_at_service=ago("1 hour"))
        await put(conn, "I-CLOSED-NEW", normalized_status="closed", closed_at=ago("23 hours"))
        await put(conn, "I-CLOSED-OLD", normalized_status="closed", closed_at=ago("25 hours"))
        await put(conn, "C-OPEN", table="tickets.crq", created_at_service=ago("100 hours"))
        for t in ("I-OPEN", "I-CLOSED-NEW", "I-CLOSED-OLD"):
            await set_point(conn, t)
        await set_point(conn, "C-OPEN", table="tickets.crq")
        fc = await fetch_json(conn, "SELECT reporting.fn_tickets_for_map()")
    assert fc["type"] == "FeatureCollection"
    by_id = {f["id"]: f for f in fc["features"]}
    assert list(by_id) == ["C-OPEN", "I-CLOSED-NEW", "I-OPEN"]  # by dataset, then ticket id
    assert by_id["I-OPEN"]["geometry"] == {"type": "Point", "coordinates": [36.78, -1.29]}
    props = by_id["I-OPEN"]["properties"]
    assert props["dataset"] == "inc" and props["sla_state"] == "at_risk" and props["geo_source"] == "cluster"
    assert by_id["C-OPEN"]["properties"]["sla_state"] is None  # no CRQ SLA yet
    assert by_id["I-CLOSED-NEW"]["properties"]["sla_state"] is None
    assert by_id["I-CLOSED-NEW"]["properties"]["closed_at"] is not None
    assert fc["summary"]["inc"] == {
        "total": 5,
        "by_status": {"closed": 2, "open": 3},
        "on_map": 2,
        "on_map_by_status": {"closed": 1, "open": 1},
        "open_without_geometry": 2,  # T0 from the drain and I-NOGEOM
    }
    assert fc["summary"]["crq"]["total"] == 1 and fc["summary"]["crq"]["on_map"] == 1
    fresh = fc["freshness"]["inc"]
    assert fresh["watermark_key"] == inc_key("2026-06-22T10-00-00.csv")
    assert fresh["watermark_at"].startswith("2026-06-22T07:00:00")
    # Counted at listing time, before the file was applied; the ledger says it was.
    assert fresh["pending_files"] == 1 and fresh["pending_files_remaining"] == 0
    assert fresh["lag_seconds"] == 0
    assert fresh["last_applied_at"] is not None and fresh["source_checked_at"] is not None
    assert fc["freshness"]["crq"]["watermark_key"] is None


# --------------------------------------------------------------------------- dashboard


async def dashboard_fixture(conn: asyncpg.Connection) -> None:
    """Open: Kilimani ok/at_risk/breached, Westlands breached (no point).
    Closed in Kilimani: mttr 10, 20, 30, 40, 3000 min, 20 h and 2, 3, 4, 5 days ago;
    in Westlands: 50 min, 10 days ago. Points: O-OK, O-RISK, O-BR, C10, C20."""
    await put(conn, "O-OK", created_at_service=ago("1 hour"), owner="A", assigned_team="Alpha")
    await put(conn, "O-RISK", created_at_service=ago("40 hours"), owner="A", assigned_team="Alpha")
    await put(conn, "O-BR", created_at_service=ago("50 hours"), owner="B", assigned_team="")
    await put(conn, "W-BR", cluster="Westlands", created_at_service=ago("60 hours"), owner="B")
    closures = [
        ("C10", "10", "20 hours", "A"),
        ("C20", "20", "2 days", "A"),
        ("C30", "30", "3 days", "B"),
        ("C40", "40", "4 days", "B"),
        ("C3000", "3000", "5 days", "B"),
    ]
    for tid, mttr, when, owner in closures:
        await put(
            conn,
            tid,
            normalized_status="closed",
            closed_at=ago(when),
            mttr=mttr,
            owner=owner,
            assigned_team="Alpha",
        )
    await put(
        conn, "W-OLD", cluster="Westlands", normalized_status="closed", closed_at=ago("10 days"), mttr="50"
    )
    for t in ("O-OK", "O-RISK", "O-BR", "C10", "C20"):
        await set_point(conn, t)


async def test_dashboard_default_window_metrics_and_breakdowns(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await dashboard_fixture(conn)
        d = await fetch_json(conn, "SELECT reporting.fn_inc_dashboard()")
    m = d["metrics"]
    assert (m["open"], m["ok"], m["at_risk"], m["breached"], m["open_without_geometry"]) == (4, 1, 1, 2, 1)
    # 7 d: C10..C3000 (W-OLD is 10 days old). Median of 10,20,30,40,3000 = 30;
    # p90 (continuous): rank 0.9 * 4 = 3.6 → 40 + 0.6 * (3000 - 40) = 1816.
    assert m["closed"] == 5 and m["closed_sla_met"] == 4
    assert m["mttr_median_minutes"] == 30 and m["mttr_p90_minutes"] == 1816
    assert m["sla_compliance_pct"] == 80
    assert [f["id"] for f in d["open"]["features"]] == ["O-BR", "O-RISK", "O-OK"]  # oldest clock first
    assert [f["id"] for f in d["closed"]["features"]] == ["C10", "C20"]  # only those with a point
    assert d["window"]["label"] == "7d"
    owners = {b["owner"]: b for b in d["by_owner"]}
    assert owners["A"] == {
        "owner": "A",
        "open": 2,
        "breached": 0,
        "at_risk": 1,
        "closed": 2,
        "mttr_median_minutes": 15,
        "sla_compliance_pct": 100,
    }
    assert (owners["B"]["open"], owners["B"]["breached"], owners["B"]["closed"]) == (2, 2, 3)
    assert owners["B"]["mttr_median_minutes"] == 40 and owners["B"]["sla_compliance_pct"] == 66.7
    teams = {b["assigned_team"]: b for b in d["by_team"]}
    assert (teams["Alpha"]["open"], teams["Alpha"]["closed"]) == (2, 5)
    assert teams[None]["open"] == 2  # empty assigned_team is no team
    assert set(d["freshness"]) == {"inc", "crq"}


async def test_dashboard_windows(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await dashboard_fixture(conn)

        async def closed_ids(*args: Any) -> list[str]:
            ph = ", ".join(
                f"{n} => ${i + 1}" for i, n in enumerate(("p_window", "p_from", "p_to")[: len(args)])
            )
            d = await fetch_json(conn, f"SELECT reporting.fn_inc_dashboard({ph})", *args)
            ids = sorted(f["properties"]["ticket_id"] for f in d["closed"]["features"])
            return [*ids, d["metrics"]["closed"]]

        assert await closed_ids("24h") == ["C10", 1]
        assert await closed_ids("1w") == ["C10", "C20", 5]
        assert await closed_ids("30d") == ["C10", "C20", 6]
        now = await conn.fetchval("SELECT now()")
        # Explicit bounds win over the window: [now - 3.5 d, now - 1 d) holds C20 and C30.
        assert await closed_ids("7d", now - timedelta(days=3.5), now - timedelta(days=1)) == ["C20", 2]
        # Only p_to: the window before it. [now - 1 d - 36 h, now - 1 d) holds C20 only.
        d = await fetch_json(
            conn, "SELECT reporting.fn_inc_dashboard(p_window => '36h', p_to => $1)", now - timedelta(days=1)
        )
        assert d["metrics"]["closed"] == 1 and d["window"]["label"] == "36h"
        # Only p_from: up to now.
        d = await fetch_json(
            conn,
            "SELECT reporting.fn_inc_dashboard(p_window => NULL, p_from => $1)",
            now - timedelta(days=4.5),
        )
        assert d["metrics"]["closed"] == 4 and d["window"]["label"] is None


async def test_dashboard_filters(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await dashboard_fixture(conn)

        async def dash(**kw: Any) -> Any:
            names = list(kw)
            ph = ", ".join(f"{n} => ${i + 1}" for i, n in enumerate(names))
            return await fetch_json(conn, f"SELECT reporting.fn_inc_dashboard({ph})", *kw.values())

        west = await dash(p_cluster="Westlands", p_window="30d")
        assert (west["metrics"]["open"], west["metrics"]["breached"], west["metrics"]["closed"]) == (1, 1, 1)
        assert west["metrics"]["mttr_median_minutes"] == 50 and west["filters"]["cluster"] == "Westlands"
        only_open = await dash(p_status="open")
        assert only_open["metrics"]["open"] == 4 and only_open["metrics"]["closed"] == 0
        assert only_open["closed"]["features"] == [] and only_open["metrics"]["mttr_median_minutes"] is None
        only_closed = await dash(p_status="CLOSED")
        assert only_closed["metrics"]["open"] == 0 and only_closed["metrics"]["closed"] == 5
        breached = await dash(p_status="breached", p_cluster="Kilimani")
        assert breached["metrics"]["open"] == 1 and [f["id"] for f in breached["open"]["features"]] == [
            "O-BR"
        ]
        assert [b["owner"] for b in breached["by_owner"]] == ["B"]
        blank = await dash(p_cluster="", p_status=" ")
        assert blank["metrics"]["open"] == 4 and blank["filters"] == {"cluster": None, "status": None}


async def test_dashboard_mttr_falls_back_to_timestamps(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        # No feed mttr: closed_at - created_at_service = 49 h = 2940 min, a breach.
        await put(
            conn, "X", normalized_status="closed", created_at_service=ago("50 hours"), closed_at=ago("1 hour")
        )
        # No mttr and no service time: first_seen_at is the clock, 60 min.
        await put(
            conn,
            "Y",
            normalized_status="closed",
            created_at_service="",
            first_seen_at=ago("2 hours"),
            closed_at=ago("1 hour"),
        )
        d = await fetch_json(conn, "SELECT reporting.fn_inc_dashboard()")
    m = d["metrics"]
    assert (m["closed"], m["closed_sla_met"], m["sla_compliance_pct"]) == (2, 1, 50)
    assert m["mttr_median_minutes"] == 1500  # (60 + 2940) / 2
    assert m["mttr_p90_minutes"] == 2652  # 60 + 0.9 * 2880


@pytest.mark.parametrize(
    ("args", "argument"),
    [
        ({"p_window": "7"}, "p_window"),
        ({"p_window": "0d"}, "p_window"),
        ({"p_window": "1y"}, "p_window"),
        ({"p_window": "53w"}, "p_window"),
        ({"p_window": None}, "p_window"),
        ({"p_status": "pending"}, "p_status"),
        ({"p_cluster": "Atlantis"}, "p_cluster"),
        ({"p_from": "2026-06-22T00:00:00Z", "p_to": "2026-06-21T00:00:00Z"}, "p_from"),
        ({"p_from": "2026-06-22T00:00:00Z", "p_to": "2026-06-22T00:00:00Z"}, "p_from"),
    ],
)
async def test_dashboard_rejects_invalid_arguments(
    conn: asyncpg.Connection, args: dict[str, Any], argument: str
) -> None:
    await put(conn, "T", cluster="Kilimani")
    values = [datetime.fromisoformat(v) if k in ("p_from", "p_to") else v for k, v in args.items()]
    ph = ", ".join(f"{k} => ${i + 1}" for i, k in enumerate(args))
    with pytest.raises(asyncpg.InvalidParameterValueError) as err:
        await conn.fetchval(f"SELECT reporting.fn_inc_dashboard({ph})", *values)
    assert str(err.value).startswith(f"{argument}: ")

"""Today's snapshot row without counting the backlog (issue 16, migrations/0012).

capture_inc_today() reads open_backlog from a counter kept by triggers on tickets.inc
(tickets.inc_open_tally) and counts only the last 48 h of clocks. What readers see must
be what 0009's full count gave: every check below compares the snapshot row with a
count through tickets.inc_open_sla in the same transaction (now() is constant there).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from fleetticketsd.config import Config
from fleetticketsd.database import db, roles
from fleetticketsd.ingest.drain import Engine, drain
from fleetticketsd.ingest.source import S3Source
from fleetticketsd.metrics import Metrics

from .conftest import Bucket, csv_file, inc_key, row
from .test_read_side import ago, put

# What 0009's capture counted, through the view readers use.
BY_VIEW = """
SELECT count(*) AS open_backlog,
       count(*) FILTER (WHERE sla_state = 'breached') AS breached,
       count(*) FILTER (WHERE sla_state = 'at_risk') AS at_risk
FROM tickets.inc_open_sla
"""
SNAPSHOT_TODAY = """
SELECT open_backlog, breached, at_risk FROM tickets.inc_daily_snapshot
WHERE day = reporting.eat_day(now()) AND captured_at = now()
"""
TALLY = "SELECT open_count FROM tickets.inc_open_tally"
OPEN_COUNT = "SELECT count(*) FROM tickets.inc WHERE normalized_status = 'open'"
# Per day, what refresh_inc_days() counted before 0012, and what the counter holds.
DAYS_COUNTED = """
SELECT day, sum(opened) AS opened, sum(closed) AS closed
FROM (SELECT reporting.eat_day(coalesce(created_at_service, first_seen_at)) AS day, 1 AS opened, 0 AS closed
      FROM tickets.inc
      UNION ALL
      SELECT reporting.eat_day(closed_at), 0, 1 FROM tickets.closure_events) x
WHERE day IS NOT NULL GROUP BY day ORDER BY day
"""
DAYS_TALLIED = (
    "SELECT day, opened, closed FROM tickets.inc_day_tally WHERE (opened, closed) <> (0, 0) ORDER BY day"
)


async def capture(conn: asyncpg.Connection) -> tuple[int, int, int]:
    """A pass's end, then today's row beside the view's count, in one transaction."""
    async with conn.transaction():
        await conn.execute("SELECT tickets.capture_history_pass()")
        snap = await conn.fetchrow(SNAPSHOT_TODAY)
        view = await conn.fetchrow(BY_VIEW)
    assert snap is not None and view is not None
    assert tuple(snap) == tuple(view)
    return tuple(snap)  # type: ignore[return-value]


async def tally_is_exact(conn: asyncpg.Connection) -> int:
    """The counters hold what the counts they stand for give; returns the open count."""
    tally, counted = await conn.fetchval(TALLY), await conn.fetchval(OPEN_COUNT)
    assert tally == counted
    assert [tuple(r) for r in await conn.fetch(DAYS_TALLIED)] == [
        tuple(r) for r in await conn.fetch(DAYS_COUNTED)
    ]
    return int(tally)


async def days_are_exact(conn: asyncpg.Connection) -> None:
    """Every snapshot day's opened/closed are what counting that day gives now."""
    counted = {r["day"]: (r["opened"], r["closed"]) for r in await conn.fetch(DAYS_COUNTED)}
    snapshot = await conn.fetch("SELECT day, opened, closed FROM tickets.inc_daily_snapshot")
    assert snapshot
    for r in snapshot:
        assert (r["opened"], r["closed"]) == counted.get(r["day"], (0, 0)), r["day"]


def eat(delta: timedelta) -> str:
    """An EAT wall-clock time that long before now, as the feed writes it."""
    return (datetime.now(UTC) - delta + timedelta(hours=3)).strftime("%Y-%m-%d %H:%M:%S")


@pytest.fixture
async def history_engine(make_config: Callable[..., Config]) -> AsyncIterator[Engine]:
    cfg = make_config(
        datasets={
            "inc": {"prefix": "automations/inc/", "table": "tickets.inc", "post_apply": ["capture_history"]}
        }
    )
    pool = await db.create_pool(cfg.database)
    async with S3Source(cfg.s3) as source:
        yield Engine(cfg, pool, source, Metrics())
    await pool.close()


def closed_row(ticket_id: str, created: str, closed_at: str) -> str:
    return row(
        ticket_id,
        bucket="closed",
        raw_status="Closed",
        normalized_status="closed",
        created_at_service=created,
        closed_at=closed_at,
    )


async def test_snapshot_stays_exact_through_files_that_open_close_and_reopen(
    history_engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    engine, inc = history_engine, history_engine.config.dataset("inc")
    fresh, risk, old = eat(timedelta(hours=2)), eat(timedelta(hours=40)), eat(timedelta(days=5))
    bucket.put(
        inc_key("2026-06-22T10-00-00.csv"),
        csv_file(
            row("A", created_at_service=fresh),
            row("B", created_at_service=risk),
            row("C", created_at_service=old),
            row("D", created_at_service=old),
            # No service time: first_seen_at is the clock; neither: no state at all.
            row("E", created_at_service="", first_seen_at=risk),
            row("F", created_at_service="", first_seen_at=""),
            closed_row("G", old, fresh),
        ),
    )
    assert (await drain(engine, inc)).ok
    await days_are_exact(conn)
    assert await capture(conn) == (6, 2, 2)
    assert await tally_is_exact(conn) == 6

    # Close an at-risk and a breached ticket, reopen G, add a fresh one.
    bucket.put(
        inc_key("2026-06-22T11-00-00.csv"),
        csv_file(
            closed_row("B", risk, fresh),
            closed_row("C", old, fresh),
            row("G", created_at_service=old),
            row("H", created_at_service=fresh),
        ),
    )
    assert (await drain(engine, inc)).ok
    await days_are_exact(conn)
    assert await capture(conn) == (6, 2, 1)
    assert await tally_is_exact(conn) == 6

    # A late file (older than the watermark) whose stale rows the guard refuses, and a
    # re-applied identical file: no status moves, so nothing moves.
    bucket.put(inc_key("2026-06-22T10-30-00.csv"), csv_file(row("B", created_at_service=risk)))
    bucket.put(inc_key("2026-06-22T12-00-00.csv"), csv_file(row("H", created_at_service=fresh)))
    assert (await drain(engine, inc)).ok
    await days_are_exact(conn)
    assert await capture(conn) == (6, 2, 1)
    assert await tally_is_exact(conn) == 6

    # Closed again after the reopen; a ticket's status other than open or closed.
    bucket.put(
        inc_key("2026-06-22T13-00-00.csv"),
        csv_file(
            closed_row("G", old, eat(timedelta(minutes=5))),
            row("D", normalized_status="cancelled", created_at_service=old),
        ),
    )
    assert (await drain(engine, inc)).ok
    await days_are_exact(conn)
    assert await capture(conn) == (4, 0, 1)
    assert await tally_is_exact(conn) == 4
    # The per-file hook still recorded G's two closures (before and after the reopen).
    assert await conn.fetchval("SELECT count(*) FROM tickets.closure_events WHERE ticket_id = 'G'") == 2


async def test_tally_follows_every_kind_of_write(conn: asyncpg.Connection) -> None:
    """Inserts, status updates, updates that change no status, deletes and TRUNCATE."""
    for i in range(5):
        await put(conn, f"O{i}", created_at_service=ago(f"{i * 20} hours"))
    await put(conn, "X", normalized_status="closed", created_at_service=ago("3 days"))
    assert await tally_is_exact(conn) == 5
    await conn.execute(
        'UPDATE tickets.inc SET raw = raw || \'{"normalized_status": "closed"}\''
        " WHERE ticket_id IN ('O0', 'O1')"
    )
    assert await tally_is_exact(conn) == 3
    # Geocoding's kind of write: no status changes, the counter's row is not even written.
    before = await conn.fetchval("SELECT xmin::text FROM tickets.inc_open_tally")
    await conn.execute(
        "UPDATE tickets.inc SET geom = ST_SetSRID(ST_MakePoint(36.78, -1.29), 4326), geo_source = 'cluster'"
    )
    assert await conn.fetchval("SELECT xmin::text FROM tickets.inc_open_tally") == before
    await conn.execute("DELETE FROM tickets.inc WHERE ticket_id IN ('O2', 'X')")
    assert await tally_is_exact(conn) == 2
    assert await capture(conn) == (2, 2, 0)
    # A rolled-back write leaves the counter as it was.
    with pytest.raises(asyncpg.PostgresError, match="boom"):
        async with conn.transaction():
            await put(conn, "ROLLED", created_at_service=ago("1 hour"))
            await conn.execute("DO $$ BEGIN RAISE EXCEPTION 'boom'; END $$")
    assert await tally_is_exact(conn) == 2
    await conn.execute("TRUNCATE tickets.inc")
    assert await tally_is_exact(conn) == 0
    assert await capture(conn) == (0, 0, 0)


async def test_concurrent_writers_both_count(conn: asyncpg.Connection, db_url: str) -> None:
    """n = n + delta: a second writer queues on the counter's row and adds its own."""
    other = await asyncpg.connect(db_url)
    try:
        first = conn.transaction()
        await first.start()
        await put(conn, "W1", created_at_service=ago("1 hour"))

        async def second() -> None:
            async with other.transaction():
                await put(other, "W2", created_at_service=ago("50 hours"))
                await put(other, "W3", created_at_service=ago("40 hours"))

        task = asyncio.create_task(second())
        # The second writer waits on the counter's row until the first commits.
        deadline = time.monotonic() + 10
        while not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock')",
            other.get_server_pid(),
        ):
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.01)
        await first.commit()
        await asyncio.wait_for(task, 10)
    finally:
        await other.close()
    assert await tally_is_exact(conn) == 3
    assert await capture(conn) == (3, 1, 1)


async def test_time_alone_moves_a_ticket_across_the_48h_boundary(conn: asyncpg.Connection) -> None:
    """Breaches that come with time are counted by a pass without files: the ranges are
    read at each capture, not kept."""
    await put(conn, "EDGE", created_at_service=ago("47:59:58"))
    assert await capture(conn) == (1, 0, 1)
    deadline = time.monotonic() + 10
    while not await conn.fetchval(
        "SELECT now() - coalesce(created_at_service, first_seen_at) >= interval '48 hours' FROM tickets.inc"
    ):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert await capture(conn) == (1, 1, 0)


async def test_without_the_counters_row_the_capture_counts(conn: asyncpg.Connection) -> None:
    await put(conn, "O1", created_at_service=ago("50 hours"))
    await conn.execute("DELETE FROM tickets.inc_open_tally")
    await put(conn, "O2", created_at_service=ago("1 hour"))  # no row to keep: no error
    assert await capture(conn) == (2, 1, 0)


async def test_migration_counts_the_tickets_already_there(empty_db_url: str) -> None:
    """0012 applied to a database that holds tickets starts its counter from them."""
    conn = await asyncpg.connect(empty_db_url)
    try:
        available = db.load_migrations()
        before = [m for m in available if m.version < "0012"]
        await db.migrate(conn, before)
        async with conn.transaction():  # the hook takes the rows written in its transaction
            for i, status in enumerate(["open", "open", "closed", "open"]):
                await put(conn, f"T{i}", normalized_status=status, created_at_service=ago(f"{i} days"),
                          closed_at=ago("1 hour"))  # fmt: skip
            await conn.execute("SELECT tickets.capture_history()")  # T2's closure event
        assert await db.migrate(conn, available) == [m.version for m in available if m not in before]
        assert await tally_is_exact(conn) == 3
        assert (
            await conn.fetchval("SELECT sum(opened) || '/' || sum(closed) FROM tickets.inc_day_tally")
            == "4/1"
        )
        await put(conn, "T9", created_at_service=ago("1 hour"))
        assert await tally_is_exact(conn) == 4
    finally:
        await conn.close()


async def test_counter_is_the_runtimes_to_write_and_not_the_readers(conn: asyncpg.Connection) -> None:
    privilege = "SELECT has_table_privilege($1, $2, $3)"
    for table in ("tickets.inc_open_tally", "tickets.inc_day_tally"):
        assert await conn.fetchval(privilege, roles.RUNTIME, table, "UPDATE")
        assert await conn.fetchval(privilege, roles.RUNTIME, table, "INSERT")
        assert not await conn.fetchval(privilege, roles.READER, table, "SELECT")
    # The triggers run as their owner and with a fixed search_path (0006).
    for fn in ("tickets.inc_tally_sync()", "tickets.closure_tally_sync()"):
        got = await conn.fetchrow("SELECT prosecdef, proconfig FROM pg_proc WHERE oid = $1::regprocedure", fn)
        assert got["prosecdef"] and any(c.startswith("search_path=") for c in got["proconfig"]), fn

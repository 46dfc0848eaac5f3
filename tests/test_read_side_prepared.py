"""The read side built from prepared features (migration 0009) against a reference.

The reference is 0005's definition of both reporting functions, built live from the
ticket tables, created here under other names. Inside one transaction (now() constant)
the new documents must be, byte for byte, the reference's jsonb rendered as text plus
``summary.freshness``: over a varied feedgen load with edge cases, after the triggers
saw updates, deletes and a TRUNCATE, and for every kind of dashboard filter.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import asyncpg
import pytest

from fleetticketsd import feedgen
from fleetticketsd.ingest.feed import KEPT

from .test_read_side import ago, put, set_point

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"

RAW_EXPR = (
    "jsonb_build_object("
    + ", ".join(
        f"'{c}', " + {"region": "lower(region)", "raw_status": "upper(raw_status)"}.get(c, f'"{c}"')
        for c in KEPT
    )
    + ")"
)


def reference_functions() -> str:
    """0005's two reporting functions, renamed reporting.ref_map / reporting.ref_dashboard."""
    sql = (MIGRATIONS / "0005_read_side_speed.sql").read_text()
    blocks = re.findall(r"CREATE OR REPLACE FUNCTION reporting\.fn_\w+\(.*?\n\$\$;\n", sql, re.S)
    assert len(blocks) == 2
    out = "\n".join(blocks)
    out = out.replace("reporting.fn_tickets_for_map()", "reporting.ref_map()")
    return out.replace("reporting.fn_inc_dashboard(", "reporting.ref_dashboard(")


async def load(conn: asyncpg.Connection, dataset: str, rows: int, seed: int) -> None:
    spec = feedgen.FeedSpec(
        dataset=dataset, seed=seed, start=feedgen.now_eat(), sentinel=False, closed_share=0.5, history_days=10
    )
    buf = io.BytesIO()
    feedgen.write_rows(buf, spec, rows)
    buf.seek(0)
    cols = ", ".join(f'"{c}" text' for c in feedgen.COLUMNS)
    await conn.execute(f"DROP TABLE IF EXISTS stage; CREATE TEMP TABLE stage ({cols})")
    await conn.copy_to_table("stage", source=buf, format="csv", header=True)
    await conn.execute(
        f"INSERT INTO tickets.{dataset} (ticket_id, raw, source_key) "
        f"SELECT ticket_id, {RAW_EXPR}, 'automations/{dataset}/changes/2026-06-22T10-00-00.csv' "
        "FROM stage WHERE is_alarm <> 'true'"
    )
    # A point for most, through an UPDATE (the trigger's other path), as geocoding does.
    await conn.execute(
        f"UPDATE tickets.{dataset} SET geom = ST_SetSRID(ST_MakePoint("
        "36.6 + (abs(hashtext(ticket_id)) % 1000) / 1234.5678,"
        " -1.4 + (abs(hashtext(ticket_id || 'y')) % 1000) / 3000.0"
        "), 4326), geo_source = 'cluster' WHERE abs(hashtext(ticket_id)) % 7 <> 0"
    )


@pytest.fixture
async def loaded(conn: asyncpg.Connection) -> asyncpg.Connection:
    await conn.execute(reference_functions())
    await load(conn, "inc", 1500, seed=5)
    await load(conn, "crq", 300, seed=6)
    await conn.execute(
        "INSERT INTO tickets.import_meta (dataset, metadata, last_applied_at) VALUES ('inc', "
        "jsonb_build_object('source_max_key', 'automations/inc/changes/2026-06-22T10-00-00.csv', "
        "'newest_key', 'automations/inc/changes/2026-06-22T10-05-00.csv', 'pending_files', 1, "
        "'source_checked_at', now()), now())"
    )
    # Edge cases: SLA boundaries, no clock, an unknown status, closed just now and long
    # ago, closed without a time, names that need escaping, no owner or team.
    await put(conn, "E-RISK36", created_at_service=ago("36 hours"))
    await put(conn, "E-BREACH48", created_at_service=ago("48 hours"))
    await put(conn, "E-NOCLOCK", created_at_service="", first_seen_at="")
    await put(conn, "E-PENDING", normalized_status="pending", created_at_service=ago("5 hours"))
    await put(conn, "E-JUSTCLOSED", normalized_status="closed", created_at_service=ago("30 hours"),
              closed_at=ago("1 hour"))  # fmt: skip
    await put(conn, "E-CLOSEDNOTIME", normalized_status="closed", created_at_service=ago("30 hours"))
    await put(conn, "E-QUOTE", owner='O"Brien \\ \u00e9\u0001', cluster="Kilimani", assigned_team="T\tab")
    await put(conn, "E-NOOWNER", owner="", assigned_team="", created_at_service=ago("40 hours"))
    await put(conn, "E-CRQ", table="tickets.crq", normalized_status="closed", closed_at=ago("2 hours"))
    for t in ["E-RISK36", "E-BREACH48", "E-NOCLOCK", "E-PENDING", "E-JUSTCLOSED", "E-CLOSEDNOTIME",
              "E-QUOTE", "E-NOOWNER"]:  # fmt: skip
        await set_point(conn, t)
    await set_point(conn, "E-CRQ", table="tickets.crq")
    await conn.execute("VACUUM ANALYZE tickets.ticket_features")
    return conn


DASHBOARD_CALLS = [
    "",
    "p_cluster => 'Kilimani'",
    "p_status => 'open'",
    "p_status => 'closed'",
    "p_status => 'OK'",
    "p_status => 'at_risk'",
    "p_status => 'breached'",
    "p_window => '24h'",
    "p_window => '4w'",
    "p_from => now() - interval '3 days', p_to => now() - interval '1 day'",
    "p_cluster => 'Kilimani', p_status => 'breached', p_window => '2w'",
]


async def assert_same(conn: asyncpg.Connection) -> None:
    async with conn.transaction():  # one now() for both sides
        new_map = await conn.fetchval("SELECT reporting.fn_tickets_for_map()::text")
        expected = await conn.fetchval(
            "SELECT jsonb_set(r, '{summary,freshness}', r->'freshness')::text FROM reporting.ref_map() r"
        )
        assert new_map == expected
        for args in DASHBOARD_CALLS:
            new = await conn.fetchval(f"SELECT reporting.fn_inc_dashboard({args})::text")
            ref = await conn.fetchval(f"SELECT reporting.ref_dashboard({args})::text")
            assert new == ref, args


async def test_documents_are_byte_for_byte_the_reference(loaded: asyncpg.Connection) -> None:
    conn = loaded
    m = json.loads(await conn.fetchval("SELECT reporting.fn_tickets_for_map()::text"))
    assert len(m["features"]) > 500 and m["summary"]["crq"]["on_map"] > 0
    d = json.loads(await conn.fetchval("SELECT reporting.fn_inc_dashboard()::text"))
    assert len(d["open"]["features"]) > 100 and len(d["closed"]["features"]) > 50
    await assert_same(conn)


async def test_still_the_reference_after_updates_deletes_and_truncate(loaded: asyncpg.Connection) -> None:
    conn = loaded
    # Reopen some, close others, move or drop points, change owners, delete a few.
    await conn.execute(
        "UPDATE tickets.inc SET raw = raw || jsonb_build_object('normalized_status', "
        "CASE normalized_status WHEN 'open' THEN 'closed' ELSE 'open' END, 'owner', 'Someone Else') "
        "WHERE abs(hashtext(ticket_id)) % 5 = 0"
    )
    await conn.execute(
        "UPDATE tickets.inc SET geom = NULL, geo_source = NULL WHERE abs(hashtext(ticket_id)) % 11 = 0"
    )
    await conn.execute("DELETE FROM tickets.inc WHERE abs(hashtext(ticket_id)) % 13 = 0")
    await conn.execute(
        "UPDATE tickets.crq SET ticket_id = ticket_id || '-R' WHERE abs(hashtext(ticket_id)) % 4 = 0"
    )
    await assert_same(conn)
    assert await conn.fetchval(
        "SELECT count(*) FROM tickets.ticket_features WHERE dataset = 'crq'"
    ) == await conn.fetchval("SELECT count(*) FROM tickets.crq")
    await conn.execute("TRUNCATE tickets.crq")
    assert await conn.fetchval("SELECT count(*) FROM tickets.ticket_features WHERE dataset = 'crq'") == 0
    await assert_same(conn)


async def test_the_engine_upsert_keeps_features_current(
    loaded: asyncpg.Connection,
) -> None:
    """The engine's INSERT … ON CONFLICT DO UPDATE fires the insert and update triggers."""
    conn = loaded
    await conn.execute(
        "INSERT INTO tickets.inc AS t (ticket_id, raw, source_key) "
        "SELECT ticket_id, raw || jsonb_build_object('owner', 'Upserted'), "
        "'automations/inc/changes/2026-06-22T11-00-00.csv' FROM tickets.inc "
        "WHERE abs(hashtext(ticket_id)) % 3 = 0 "
        "UNION ALL SELECT 'NEW-1', jsonb_build_object('normalized_status', 'open', 'cluster', 'Nyali'), "
        "'automations/inc/changes/2026-06-22T11-00-00.csv' "
        "ON CONFLICT (ticket_id) DO UPDATE SET raw = EXCLUDED.raw, source_key = EXCLUDED.source_key"
    )
    assert (
        await conn.fetchval("SELECT count(*) FROM tickets.ticket_features WHERE owner = 'Upserted'")
        == await conn.fetchval("SELECT count(*) FROM tickets.inc WHERE owner = 'Upserted'")
        > 0
    )
    assert await conn.fetchval("SELECT count(*) FROM tickets.ticket_features WHERE ticket_id = 'NEW-1'") == 1
    await assert_same(conn)


async def test_timestamps_render_in_utc_whatever_the_session(loaded: asyncpg.Connection) -> None:
    """A prepared feature cannot follow the reader's TimeZone: the documents pin UTC."""
    conn = loaded
    await conn.execute("SET TimeZone = 'Africa/Nairobi'")
    d = json.loads(await conn.fetchval("SELECT reporting.fn_inc_dashboard()::text"))
    m = json.loads(await conn.fetchval("SELECT reporting.fn_tickets_for_map()::text"))
    assert d["generated_at"].endswith("+00:00") and m["closed_since"].endswith("+00:00")
    assert d["open"]["features"][0]["properties"]["sla_clock_start"].endswith("+00:00")
    await conn.execute("RESET TimeZone")
    await assert_same(conn)


async def test_summary_freshness_is_where_the_dashboards_read_it(loaded: asyncpg.Connection) -> None:
    conn = loaded
    m = json.loads(await conn.fetchval("SELECT reporting.fn_tickets_for_map()::text"))
    fresh = json.loads(await conn.fetchval("SELECT reporting.fn_freshness()::text"))
    assert m["summary"]["freshness"] == m["freshness"] == fresh
    inc = m["summary"]["freshness"]["inc"]
    assert inc["watermark_key"] == "automations/inc/changes/2026-06-22T10-00-00.csv"
    assert inc["newest_key"] == "automations/inc/changes/2026-06-22T10-05-00.csv"
    assert inc["pending_files"] == 1 and inc["pending_files_remaining"] == 1
    assert inc["lag_seconds"] == 300
    assert set(m["summary"]) == {"inc", "crq", "freshness"}
    assert m["summary"]["freshness"]["crq"]["watermark_key"] is None
    assert (
        await conn.fetchval(
            "SELECT pg_typeof(reporting.fn_tickets_for_map())::text || ' ' "
            "|| pg_typeof(reporting.fn_inc_dashboard())::text"
        )
        == "json json"
    )


async def test_the_map_sorts_by_ord_when_every_id_is_the_feeds(loaded: asyncpg.Connection) -> None:
    """With only feed-shaped ids (3 capitals, 12 digits) the map sorts one bigint (ord);
    ord must order exactly as the bytes of (dataset, ticket_id) do."""
    conn = loaded
    await conn.execute("DELETE FROM tickets.inc WHERE ticket_id LIKE 'E-%'")
    await conn.execute("DELETE FROM tickets.crq WHERE ticket_id LIKE 'E-%'")
    await put(conn, "ZZZ999999999999", normalized_status="closed", closed_at=ago("3 hours"))
    await put(conn, "AAA000000000000", table="tickets.crq")
    await set_point(conn, "ZZZ999999999999")
    await set_point(conn, "AAA000000000000", table="tickets.crq")
    assert await conn.fetchval("SELECT count(*) FROM tickets.ticket_features WHERE ord IS NULL") == 0
    by_ord = await conn.fetch("SELECT dataset, ticket_id FROM tickets.ticket_features ORDER BY ord")
    by_bytes = await conn.fetch(
        "SELECT dataset, ticket_id FROM tickets.ticket_features"
        ' ORDER BY dataset COLLATE "C", ticket_id COLLATE "C"'
    )
    assert [tuple(r) for r in by_ord] == [tuple(r) for r in by_bytes]
    await assert_same(conn)

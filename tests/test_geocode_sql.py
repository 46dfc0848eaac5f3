"""The gazetteer in SQL: location cleaning and the ticket resolution order.

Feed coordinates → geocoded location → cluster centroid → none, applied when a file is
upserted (tickets.resolve_ticket_geo) and whenever a gazetteer row lands or is
corrected (triggers), without a re-ingest. Tested against the real schema.
"""

from __future__ import annotations

import csv
import json
from typing import Any

import asyncpg
import pytest

from fleetticketsd.config import GeocoderConfig
from fleetticketsd.geocoding.geocode import (
    STORE_LOCATION,
    Judgement,
    build_query,
    set_gazetteer,
    unguarded_locations,
)

from .conftest import SAMPLE

KILIMANI = (-1.2921, 36.7856)
JOGOO = (-1.2950, 36.7900)
MOMBASA = (-4.0435, 39.6682)

# (location_name, cluster) → the place sent to the geocoder. Shapes of FEED.md and the sample.
CLEAN_CASES: list[tuple[str | None, str, str | None]] = [
    ("NW_KILIMANI_Jogoo Rd FDT1", "Kilimani", "Jogoo Rd"),
    ("SDUS KILIMANI_Jogoo Rd FDT21", "Kilimani", "Jogoo Rd"),
    ("ADR_MNT_KILIMANI_Kenyatta Ave FDT7", "Kilimani", "Kenyatta Ave"),
    ("NW_ADR_MNT_KITENGELA_Ngong Road FDT26", "Kitengela", "Ngong Road"),
    ("KASARANI_Argwings Kodhek Rd FDT20", "Kasarani", "Argwings Kodhek Rd"),
    ("EMBAKASI_Garden Estate, Thome FDT33", "Embakasi", "Garden Estate, Thome"),
    ("SDUS KISUMU_CBD_Kamakis – Eastern Bypass FDT12", "Kisumu CBD", "Kamakis – Eastern Bypass"),
    ("NW_NAKURU_EAST_Outering Rd FDT14", "Nakuru East", "Outering Rd"),
    ("NW_ADR_MNT_MURANG'A_Mombasa Rd FDT24", "Murang'a", "Mombasa Rd"),
    ("NW_QOA_Lang'ata Rd FDT20", "QOA", "Lang'ata Rd"),
    ("PTMP_Kamakis – Eastern Bypass FDT34", "PTMP", "Kamakis – Eastern Bypass"),
    # The cluster name is a code only in capitals: the place "Ngong Road" in Ngong stays.
    ("NW_ADR_MNT_NGONG_Ngong Road FDT11", "Ngong", "Ngong Road"),
    # Notes typed after the cabinet code or on a later line, with quotes and commas.
    ('NW_ADR_MNT_PTMP_Links Rd FDT12, near "Total" petrol station\nGate B', "PTMP", "Links Rd"),
    ('KILIMANI_Links Rd FDT3 (opp. "Naivas")', "Kilimani", "Links Rd"),
    ("KILIMANI_Jogoo Rd FDT9\nBlock C, 2nd floor", "Kilimani", "Jogoo Rd"),
    ('KILIMANI_Jogoo Rd FDT9 "ODF" cabinet,\nground floor', "Kilimani", "Jogoo Rd"),
    ("KILIMANI_Jogoo Rd\r\nBlock C", "Kilimani", "Jogoo Rd"),
    ('Jogoo Rd (opp. "Naivas")', "Kilimani", "Jogoo Rd"),
    ("Jogoo_Rd_FDT3", "Kilimani", "Jogoo Rd"),
    # Nothing but codes: no place, the ticket falls back to its cluster.
    ("NW_KILIMANI", "Kilimani", None),
    ("SDUS KILIMANI_FDT4", "Kilimani", None),
    ("", "Kilimani", None),
    (None, "Kilimani", None),
    ("Jogoo Rd", "", "Jogoo Rd"),
]


async def clean(conn: asyncpg.Connection, location: str | None, cluster: str) -> str | None:
    return await conn.fetchval("SELECT tickets.clean_location($1, $2)", location, cluster)  # type: ignore[no-any-return]


async def test_location_cleaner_on_feed_shapes(conn: asyncpg.Connection) -> None:
    got = {(loc, cl): await clean(conn, loc, cl) for loc, cl, _ in CLEAN_CASES}
    assert got == {(loc, cl): want for loc, cl, want in CLEAN_CASES}


async def test_location_cleaner_on_the_sample_is_clean_and_idempotent(conn: asyncpg.Connection) -> None:
    pairs = set()
    for path in sorted((SAMPLE / "inc" / "changes").glob("*.csv")):
        with path.open(encoding="utf-8-sig", newline="") as f:
            pairs |= {(r["location_name"], r["cluster"]) for r in csv.DictReader(f) if r["cluster"]}
    assert len(pairs) > 40
    for location, cluster in pairs:
        place = await clean(conn, location, cluster)
        assert place, location
        code = cluster.upper().replace(" ", "_")
        for noise in ("NW_", "ADR_MNT", "SDUS", "FDT", "_", code, "\n", '"'):
            assert noise not in place, (location, place)
        # Operators may pass the cleaned form back (gazetteer set): cleaning it is a no-op.
        assert await clean(conn, place, cluster) == place


def test_query_adds_cluster_region_and_country_context() -> None:
    assert build_query("Kilimani", "nairobi", "Kenya", "Jogoo Rd") == "Jogoo Rd, Kilimani, Nairobi, Kenya"
    assert build_query("QOA", "nairobi", "Kenya", alias="Quarry Road") == "Quarry Road, Nairobi, Kenya"
    assert build_query("Nairobi", "nairobi", "Kenya") == "Nairobi, Kenya"
    assert build_query("Nakuru East", "rift valley", "Kenya") == "Nakuru East, Rift Valley, Kenya"
    assert build_query("Kilimani", None, "Kenya") == "Kilimani, Kenya"


async def test_cluster_aliases_are_seeded_data(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch("SELECT cluster, place FROM tickets.geo_cluster_aliases ORDER BY cluster")
    assert {(r["cluster"], r["place"]) for r in rows} >= {("QOA", "Quarry Road"), ("PTMP", "Pipeline")}


# --- resolution ---------------------------------------------------------------------------


def raw(cluster: str, location: str, **extra: str) -> dict[str, Any]:
    return {
        "cluster": cluster,
        "region": "nairobi",
        "location_name": location,
        "is_actionable": "true",
        "normalized_status": "open",
        "latitude": "",
        "longitude": "",
        **extra,
    }


async def upsert(
    conn: asyncpg.Connection, ticket_id: str, key: str, table: str = "tickets.inc", **raw_: Any
) -> None:
    """What the engine does per file: upsert, then resolve that file's rows."""
    await conn.execute(
        f"INSERT INTO {table} (ticket_id, raw, source_key) VALUES ($1, $2::jsonb, $3) "
        "ON CONFLICT (ticket_id) DO UPDATE SET raw = EXCLUDED.raw, source_key = EXCLUDED.source_key",
        ticket_id,
        json.dumps(raw_),
        key,
    )
    await conn.execute("SELECT tickets.resolve_ticket_geo($1::regclass, $2)", table, key)


async def where(conn: asyncpg.Connection, ticket_id: str, table: str = "tickets.inc") -> tuple[Any, ...]:
    r = await conn.fetchrow(
        f"SELECT geo_source, round(latitude::numeric, 4) AS lat, round(longitude::numeric, 4) AS lon, "
        f"ST_Y(geog::geometry) AS glat FROM {table} WHERE ticket_id = $1",
        ticket_id,
    )
    assert r is not None
    if r["geo_source"] is not None:
        assert r["glat"] is not None  # geog follows geom
    return (
        r["geo_source"],
        None if r["lat"] is None else float(r["lat"]),
        None if r["lon"] is None else float(r["lon"]),
    )


async def put_cluster(
    conn: asyncpg.Connection, cluster: str, point: tuple[float, float] | None, status: str = "ok"
) -> None:
    await conn.execute(
        "INSERT INTO tickets.geo_clusters (cluster, geom, status) VALUES ($1, "
        "CASE WHEN $2::float8 IS NULL THEN NULL ELSE ST_SetSRID(ST_MakePoint($3, $2), 4326) END, $4) "
        "ON CONFLICT (cluster) DO UPDATE SET geom = EXCLUDED.geom, status = EXCLUDED.status",
        cluster,
        point[0] if point else None,
        point[1] if point else None,
        status,
    )


async def put_location(
    conn: asyncpg.Connection,
    cluster: str,
    location: str,
    point: tuple[float, float] | None,
    status: str = "ok",
) -> None:
    await conn.execute(
        "INSERT INTO tickets.geo_locations (cluster, location, geom, status) VALUES ($1, $2, "
        "CASE WHEN $3::float8 IS NULL THEN NULL ELSE ST_SetSRID(ST_MakePoint($4, $3), 4326) END, $5) "
        "ON CONFLICT (cluster, location) DO UPDATE SET geom = EXCLUDED.geom, status = EXCLUDED.status",
        cluster,
        location,
        point[0] if point else None,
        point[1] if point else None,
        status,
    )


async def test_resolution_order_follows_the_gazetteer_without_reingest(conn: asyncpg.Connection) -> None:
    k1 = "automations/inc/changes/2026-06-22T15-50-39.csv"
    await upsert(conn, "INC1", k1, **raw("Kilimani", "NW_KILIMANI_Jogoo Rd FDT1"))
    await upsert(conn, "INC2", k1, **raw("Kilimani", "SDUS KILIMANI_Kenyatta Ave FDT7"))
    await upsert(
        conn, "INC3", k1, **raw("Kilimani", "NW_KILIMANI_Jogoo Rd FDT2", latitude="-1.3", longitude="36.8")
    )
    await upsert(conn, "CRQ1", k1, table="tickets.crq", **raw("Kilimani", "ADR_MNT_KILIMANI_Jogoo Rd FDT5"))
    assert await where(conn, "INC1") == (None, None, None)
    assert await where(conn, "INC3") == ("feed", -1.3, 36.8)

    # A cluster centroid lands: every ticket of the cluster, in every table, falls back to it.
    await put_cluster(conn, "Kilimani", KILIMANI)
    assert await where(conn, "INC1") == ("cluster", -1.2921, 36.7856)
    assert await where(conn, "INC2") == ("cluster", -1.2921, 36.7856)
    assert await where(conn, "CRQ1", "tickets.crq") == ("cluster", -1.2921, 36.7856)

    # A location lands: its tickets (whatever the network-code noise) move to it.
    await put_location(conn, "Kilimani", "Jogoo Rd", JOGOO)
    assert await where(conn, "INC1") == ("location", -1.295, 36.79)
    assert await where(conn, "CRQ1", "tickets.crq") == ("location", -1.295, 36.79)
    assert await where(conn, "INC2") == ("cluster", -1.2921, 36.7856)
    assert await where(conn, "INC3") == ("feed", -1.3, 36.8)  # feed coordinates always win

    # A wrong-city answer is kept for review but not used: back to the centroid.
    await put_location(conn, "Kilimani", "Jogoo Rd", MOMBASA, status="rejected_distance")
    assert await where(conn, "INC1") == ("cluster", -1.2921, 36.7856)

    # A correction of the cluster moves the tickets that use it, and only those.
    await put_location(conn, "Kilimani", "Jogoo Rd", JOGOO)
    await conn.execute(
        "UPDATE tickets.geo_clusters SET geom = ST_SetSRID(ST_MakePoint(36.78, -1.29), 4326) "
        "WHERE cluster = 'Kilimani'"
    )
    assert await where(conn, "INC2") == ("cluster", -1.29, 36.78)
    assert await where(conn, "INC1") == ("location", -1.295, 36.79)

    # A later file that changes the location re-resolves the ticket in the same transaction.
    k2 = "automations/inc/changes/2026-06-22T17-10-50.csv"
    await upsert(conn, "INC1", k2, **raw("Kilimani", "NW_KILIMANI_Links Rd FDT1"))
    assert await where(conn, "INC1") == ("cluster", -1.29, 36.78)

    # Deleting the gazetteer rows leaves the tickets without a point, not a stale one.
    await conn.execute("DELETE FROM tickets.geo_locations")
    await conn.execute("DELETE FROM tickets.geo_clusters")
    assert await where(conn, "INC2") == (None, None, None)
    assert await where(conn, "INC3") == ("feed", -1.3, 36.8)


async def test_a_ticket_of_a_new_file_finds_the_cached_places(conn: asyncpg.Connection) -> None:
    await put_cluster(conn, "QOA", (-1.27, 36.85))
    await put_location(conn, "QOA", "Kiambu Rd", (-1.26, 36.84))
    await upsert(
        conn,
        "INC9",
        "automations/inc/changes/2026-06-22T15-50-39.csv",
        **raw("QOA", "ADR_MNT_QOA_Kiambu Rd FDT28"),
    )
    await upsert(
        conn, "INC8", "automations/inc/changes/2026-06-22T15-50-39.csv", **raw("QOA", "QOA_Elsewhere FDT1")
    )
    assert await where(conn, "INC9") == ("location", -1.26, 36.84)
    assert await where(conn, "INC8") == ("cluster", -1.27, 36.85)


async def test_no_match_and_errors_do_not_place_tickets(conn: asyncpg.Connection) -> None:
    await put_cluster(conn, "Kilimani", None, status="no_match")
    await put_location(conn, "Kilimani", "Jogoo Rd", None, status="error")
    await upsert(
        conn,
        "INC1",
        "automations/inc/changes/2026-06-22T15-50-39.csv",
        **raw("Kilimani", "NW_KILIMANI_Jogoo Rd FDT1"),
    )
    assert await where(conn, "INC1") == (None, None, None)


async def test_gazetteer_set_marks_verified_and_moves_tickets(conn: asyncpg.Connection) -> None:
    key = "automations/inc/changes/2026-06-22T15-50-39.csv"
    await upsert(conn, "INC1", key, **raw("Kilimani", "NW_KILIMANI_Jogoo Rd FDT1"))
    await upsert(conn, "INC2", key, **raw("Kilimani", "NW_KILIMANI_Moi Avenue FDT1"))
    assert (await set_gazetteer(conn, "Kilimani", None, -1.29, 36.78))[:2] == (None, 2)
    # The raw name as the ticket shows it is accepted and cleaned.
    assert (await set_gazetteer(conn, "Kilimani", "SDUS KILIMANI_Jogoo Rd FDT9", -1.295, 36.79))[:2] == (
        "Jogoo Rd",
        1,
    )
    assert await where(conn, "INC1") == ("location", -1.295, 36.79)
    assert await where(conn, "INC2") == ("cluster", -1.29, 36.78)
    row = await conn.fetchrow("SELECT verified, status, provider, distance_km FROM tickets.geo_locations")
    assert row is not None and row["verified"] and row["status"] == "ok" and row["provider"] == "manual"
    assert 1.1 < row["distance_km"] < 1.4  # haversine of 0.005° lat, 0.01° lon
    with pytest.raises(ValueError):
        await set_gazetteer(conn, "Kilimani", "NW_KILIMANI", -1.2, 36.7)
    with pytest.raises(ValueError):
        await set_gazetteer(conn, "Kilimani", None, 95, 36.7)


# --- the guard, judged again (issue 13) -------------------------------------------------------

NYALI = (-4.0300, 39.7000)  # ~3.5 km from MOMBASA, ~440 km from Kilimani


async def location_row(conn: asyncpg.Connection, cluster: str, location: str) -> asyncpg.Record:
    r = await conn.fetchrow(
        "SELECT status, verified, distance_km, retry_at FROM tickets.geo_locations "
        "WHERE cluster = $1 AND location = $2",
        cluster,
        location,
    )
    assert r is not None
    return r


async def test_a_corrected_centroid_rejudges_the_clusters_answers_and_tickets_follow(
    conn: asyncpg.Connection,
) -> None:
    """The provider put Kilimani's centroid in Mombasa: its right answers were rejected
    as too far, a wrong one (in Mombasa) passed. The operator's correction turns both."""
    key = "automations/inc/changes/2026-06-22T15-50-39.csv"
    await upsert(conn, "INC1", key, **raw("Kilimani", "NW_KILIMANI_Jogoo Rd FDT1"))
    await upsert(conn, "CRQ1", key, table="tickets.crq", **raw("Kilimani", "SDUS KILIMANI_Jogoo Rd FDT4"))
    await upsert(conn, "INC2", key, **raw("Kilimani", "NW_KILIMANI_Nyali Rd FDT2"))
    await upsert(conn, "INC3", key, **raw("Kilimani", "NW_KILIMANI_Moi Avenue FDT3"))
    await upsert(
        conn, "INC4", key, **raw("Kilimani", "NW_KILIMANI_Nyali Rd FDT5", latitude="-1.3", longitude="36.8")
    )
    await put_cluster(conn, "Kilimani", MOMBASA)
    await put_location(conn, "Kilimani", "Jogoo Rd", JOGOO, status="rejected_distance")
    await put_location(conn, "Kilimani", "Nyali Rd", NYALI)
    await set_gazetteer(conn, "Kilimani", "Moi Avenue", *MOMBASA)  # a person's point: it wins
    assert await where(conn, "INC1") == ("cluster", -4.0435, 39.6682)
    assert await where(conn, "INC2") == ("location", -4.03, 39.7)

    done = await set_gazetteer(conn, "Kilimani", None, *KILIMANI, GeocoderConfig(max_distance_km=25.0))
    assert done.judged == Judgement(accepted=1, rejected=1, unguarded=0)
    jogoo, nyali = (
        await location_row(conn, "Kilimani", "Jogoo Rd"),
        await location_row(conn, "Kilimani", "Nyali Rd"),
    )
    assert jogoo["status"] == "ok" and jogoo["distance_km"] < 1 and jogoo["retry_at"] is None
    assert nyali["status"] == "rejected_distance" and nyali["distance_km"] > 400
    assert nyali["retry_at"] is not None  # asked again later, like any rejected answer
    # The tickets followed, in every ticket table; the verified point and the feed's did not move.
    assert await where(conn, "INC1") == ("location", -1.295, 36.79)
    assert await where(conn, "CRQ1", "tickets.crq") == ("location", -1.295, 36.79)
    assert await where(conn, "INC2") == ("cluster", -1.2921, 36.7856)
    assert await where(conn, "INC3") == ("location", -4.0435, 39.6682)
    assert await where(conn, "INC4") == ("feed", -1.3, 36.8)
    moi = await location_row(conn, "Kilimani", "Moi Avenue")
    assert moi["verified"] and moi["status"] == "ok"
    assert done.tickets == 1  # INC2 stands on the new centroid

    # A tighter guard (a config change) is applied the same way; nothing else changes.
    again = await set_gazetteer(conn, "Kilimani", None, *KILIMANI, GeocoderConfig(max_distance_km=0.5))
    assert again.judged == Judgement(rejected=1)
    assert await where(conn, "INC1") == ("cluster", -1.2921, 36.7856)
    assert (await set_gazetteer(conn, "Kilimani", None, *KILIMANI)).judged == Judgement(accepted=1)


async def store_answer(
    conn: asyncpg.Connection, cluster: str, location: str, point: tuple[float, float]
) -> str:
    """The worker's store of one provider answer (fleetticketsd.geocoding.geocode.STORE_LOCATION)."""
    status: str = await conn.fetchval(
        STORE_LOCATION, cluster, f"{location}, {cluster}", "ok", point[0], point[1], "locationiq", None,
        None, None, None, 25.0, location,
    )  # fmt: skip
    return status


async def test_an_answer_without_a_centroid_is_unguarded_until_the_centroid_is_known(
    conn: asyncpg.Connection,
) -> None:
    key = "automations/inc/changes/2026-06-22T15-50-39.csv"
    await upsert(conn, "INC1", key, **raw("Karen", "KAREN_Jogoo Rd FDT1"))
    await upsert(conn, "INC2", key, **raw("Karen", "KAREN_Nyali Rd FDT1"))
    await put_cluster(conn, "Karen", None, status="no_match")  # the provider knows no "Karen"
    assert await store_answer(conn, "Karen", "Jogoo Rd", JOGOO) == "unguarded"
    assert await store_answer(conn, "Karen", "Nyali Rd", NYALI) == "unguarded"
    assert await unguarded_locations(conn) == (2, ["Karen"])
    # Not checked, but better than no point: the tickets use them.
    assert await where(conn, "INC1") == ("location", -1.295, 36.79)
    assert await where(conn, "INC2") == ("location", -4.03, 39.7)
    row = await location_row(conn, "Karen", "Jogoo Rd")
    assert row["distance_km"] is None and row["retry_at"] is None  # waits for a centroid, not for a retry

    # The centroid becomes known (here a person's): both answers are judged at last.
    done = await set_gazetteer(conn, "Karen", None, *KILIMANI)
    assert done.judged == Judgement(accepted=1, rejected=1)
    assert await unguarded_locations(conn) == (0, [])
    assert await where(conn, "INC1") == ("location", -1.295, 36.79)
    assert await where(conn, "INC2") == ("cluster", -1.2921, 36.7856)

    # Without a centroid again, an accepted answer is unguarded again; a rejected one
    # stays rejected (nothing to clear it against).
    await conn.execute("DELETE FROM tickets.geo_clusters WHERE cluster = 'Karen'")
    rows = await conn.fetch("SELECT location, was, status FROM tickets.judge_locations(25, 'Karen')")
    assert [(r["location"], r["was"], r["status"]) for r in rows] == [("Jogoo Rd", "ok", "unguarded")]
    assert (await location_row(conn, "Karen", "Nyali Rd"))["status"] == "rejected_distance"
    assert await where(conn, "INC1") == ("location", -1.295, 36.79)
    assert await where(conn, "INC2") == (None, None, None)
    # A judgement that finds nothing new writes nothing.
    assert await conn.fetch("SELECT * FROM tickets.judge_locations(25)") == []

"""The loader fleetticketsd replaces, as far as the adoption tests need it.

It builds the loader's database from ``schema.sql`` (its migrations, recorded in its own
ledger of file names) and writes data the way LEGACY.md says the loader did: every
file upserted on ticket_id with no stale-write guard, the watermark in
``import_meta.metadata->>'source_max_key'``, ``capture_history()`` after every run, and
each applied file moved from ``changes/`` to ``processed/``. Its cleaning is FEED.md's,
the same as the project's (the parser is shared here so that the two agree on every
quirk of the CSV; the loader's own parser is not what the tests are about).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import asyncpg

from fleetticketsd.ingest.feed import KEPT, FeedParser

SCHEMA = Path(__file__).with_name("schema.sql")
_SECTION = re.compile(r"^-- migration: (\S+)$", re.MULTILINE)

LEDGER = """
CREATE SCHEMA IF NOT EXISTS tickets;
CREATE TABLE IF NOT EXISTS tickets.schema_migrations (
    filename   text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""

# The loader's upsert: the last file wins, whatever its name (no guard).
UPSERT = """
INSERT INTO tickets.{table} AS t (ticket_id, raw)
SELECT r->>'ticket_id',
       r || jsonb_build_object('region', lower(r->>'region'), 'raw_status', upper(r->>'raw_status'))
FROM jsonb_array_elements($1::jsonb) AS r
ON CONFLICT (ticket_id) DO UPDATE SET raw = EXCLUDED.raw, ingested_at = now()
"""
SET_WATERMARK = """
INSERT INTO tickets.import_meta (dataset, metadata)
VALUES ($1, jsonb_build_object('source_max_key', $2::text, 'export_type', $3::text,
                               'source_etag', $4::text))
ON CONFLICT (dataset) DO UPDATE
SET metadata = tickets.import_meta.metadata || EXCLUDED.metadata, updated_at = now()
"""


def migrations(skip: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """The loader's migration files as (name, sql), in order."""
    text = SCHEMA.read_text(encoding="utf-8")
    parts = _SECTION.split(text)[1:]
    pairs = list(zip(parts[::2], parts[1::2], strict=True))
    return [(name, sql) for name, sql in pairs if name not in skip]


async def build_schema(conn: asyncpg.Connection, skip: frozenset[str] = frozenset()) -> None:
    """What the loader's run_migrations.py left: its layout and its ledger of file names."""
    await conn.execute(LEDGER)
    for name, sql in migrations(skip):
        async with conn.transaction():
            await conn.execute(sql)
            await conn.execute("INSERT INTO tickets.schema_migrations (filename) VALUES ($1)", name)


def records(data: bytes) -> list[dict[str, str]]:
    """The cleaned rows of one file, the last line of a ticket winning (FEED.md)."""
    parser = FeedParser()
    rows = [*parser.feed(data), *parser.finish()]
    by_id: dict[str, dict[str, str]] = {}
    for rec in rows:
        values = dict(zip(KEPT, rec[1:-1], strict=True))
        by_id[values["ticket_id"]] = values  # type: ignore[assignment]
    return list(by_id.values())


async def apply_file(conn: asyncpg.Connection, dataset: str, key: str, etag: str, data: bytes) -> int:
    """One of the loader's scheduled runs for one file: upsert, watermark, history."""
    rows = records(data)
    async with conn.transaction():
        if rows:
            await conn.execute(UPSERT.format(table=dataset), json.dumps(rows))
        await conn.execute(SET_WATERMARK, dataset, key, "baseline" if len(rows) > 100 else "delta", etag)
        if dataset == "inc":
            await conn.execute("SELECT tickets.capture_history()")
    return len(rows)


def location_key(name: str, cluster: str) -> str | None:
    """The loader's cleaned location (its tickets.location_key, in Python)."""
    s = re.sub(r"(^|[\s_,])FDT\s*\d+.*$", "", name, flags=re.DOTALL)
    s = re.sub(r"^(\s*(NW_|ADR_MNT_|SDUS[\s_]+))+", "", s)
    s = re.sub("^" + re.escape(cluster.upper().replace(" ", "_")) + "_", "", s)
    return s.strip() or None


# --- a live database, as the loader left it --------------------------------------------

GAZETTEER_CLUSTER = """
INSERT INTO tickets.geo_clusters (cluster, geom, verified, provider)
VALUES ($1, ST_SetSRID(ST_MakePoint($3, $2), 4326), $4, $5)
"""
GAZETTEER_LOCATION = """
INSERT INTO tickets.geo_locations (cluster, location, geom, verified, provider, display_name)
VALUES ($1, $2, CASE WHEN $3::float8 IS NULL THEN NULL ELSE ST_SetSRID(ST_MakePoint($4, $3), 4326) END,
        $5, $6, $7)
"""
SNAPSHOT = """
INSERT INTO tickets.inc_daily_snapshot (day, open_backlog, opened, closed, breached, captured_at)
VALUES ($1, $2, $3, $4, $5, $6)
"""

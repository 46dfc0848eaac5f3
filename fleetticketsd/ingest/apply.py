"""Applying one change file: parse → COPY → upsert → ledger → watermark, one transaction.

Everything a file changes commits together or not at all (CONTRACT.md semantic 2),
so a crash, a lost connection or a bad byte on line 30,000 leaves the database as
if the file had never been seen. The rows travel as a stream from the source through
the parser into COPY; the set-based upsert then runs once per file.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field

import asyncpg

from fleetticketsd.config import DatasetConfig
from fleetticketsd.database.db import qualified
from fleetticketsd.database.dbguard import guarded
from fleetticketsd.ingest import ledger
from fleetticketsd.ingest.feed import KEPT, RECORD_COLUMNS, FeedParser, ParseStats, Record

# Rows for this file only. The temp table lives as long as its connection and is
# empty between files: the upsert below deletes what it reads (and a file that fails
# rolls its COPY back with it), so one idempotent CREATE is the table's whole upkeep,
# one round trip, also inside a dry run's or a commit batch's outer transaction.
# Creating and dropping it per file cost ~2 ms of catalog churn each; asking whether it
# exists and emptying it cost two more round trips per file.
# Columns are the kept feed columns as text; `raw` is assembled from them in the upsert.
CREATE_INCOMING = (
    "CREATE TEMP TABLE IF NOT EXISTS fleet_incoming (line int NOT NULL, "
    + ", ".join(f'"{c}" text' for c in KEPT)
    + ", extras text) ON COMMIT DELETE ROWS"
)

# Whether this session has the temp table. "CREATE ... IF NOT EXISTS" costs 1.1-1.8 ms
# of server time even when the table is there (it analyses the whole definition
# first); this lookup costs 0.2.
INCOMING_EXISTS = "SELECT to_regclass('pg_temp.fleet_incoming') IS NOT NULL"


async def ensure_incoming(conn: asyncpg.Connection) -> None:
    """Create the session's temp table unless it has it (outside any file's savepoint:
    created inside one, it would go with the savepoint of a bad file)."""
    if not await conn.fetchval(INCOMING_EXISTS):
        await conn.execute(CREATE_INCOMING)


# The cleaned record as FEED.md defines it: the kept columns as given, region lower
# case, raw_status upper case, and any extra columns the export grew. Column names
# are the constants of feed.KEPT, not input.
_RAW_FIELDS = ", ".join(
    f"'{c}', " + {"region": "lower(region)", "raw_status": "upper(raw_status)"}.get(c, f'"{c}"') for c in KEPT
)
RAW_EXPR = f"jsonb_build_object({_RAW_FIELDS}) || coalesce(extras::jsonb, jsonb_build_object())"

# The stale-write guard (CONTRACT.md semantic 4): a row is only rewritten by a file at
# least as new as the last one that carried it. "Carried", not "changed": a strictly
# newer file with identical content still moves source_key forward, or a late file
# between the two could later overwrite the newer (identical) state with older
# content. That bump is the only write an unchanged row ever gets, and in this feed it
# is rare (every row carries its export time in last_seen_at/updated_at); re-applying
# the same key writes nothing, so unchanged rows leave no dead tuples. updated_at
# moves only with content (capture_history finds a file's changes by it), and only
# content changes count as updated. Within one file the last line of a ticket wins.
# {table} is a validated, quoted identifier (config.TABLE_RE, db.qualified).
GUARDED_CONFLICT = """
    ON CONFLICT (ticket_id) DO UPDATE
        SET raw = EXCLUDED.raw,
            source_key = EXCLUDED.source_key,
            updated_at = CASE WHEN t.raw IS DISTINCT FROM EXCLUDED.raw THEN now() ELSE t.updated_at END
        WHERE tickets.key_name(t.source_key) <= tickets.key_name(EXCLUDED.source_key)
          AND (t.raw IS DISTINCT FROM EXCLUDED.raw
               OR tickets.key_name(t.source_key) < tickets.key_name(EXCLUDED.source_key))
"""
UPSERT = (
    """
WITH taken AS (
    DELETE FROM pg_temp.fleet_incoming RETURNING *
), src AS MATERIALIZED (
    SELECT DISTINCT ON (ticket_id) ticket_id, """
    + RAW_EXPR
    + """ AS raw
    FROM taken
    ORDER BY ticket_id, line DESC
), up AS (
    INSERT INTO {table} AS t (ticket_id, raw, source_key)
    SELECT ticket_id, raw, $1 FROM src"""
    + GUARDED_CONFLICT
    + """    RETURNING (xmax = 0) AS inserted, t.updated_at = now() AS changed
)
SELECT (SELECT count(*) FROM src) AS distinct_rows,
       count(*) FILTER (WHERE inserted) AS inserted,
       count(*) FILTER (WHERE NOT inserted AND changed) AS updated
FROM up
"""
)
# Points for the rows this file wrote (feed coordinates, gazetteer, cluster centroid).
RESOLVE_GEO = "SELECT tickets.resolve_ticket_geo($1::regclass, $2)"
POST_APPLY = "SELECT {function}()"


@dataclass
class FileResult:
    key: str
    etag: str
    late: bool = False
    rows_read: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: int = 0
    dropped: int = 0
    extra_columns: tuple[str, ...] = ()
    reject_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def upserted(self) -> int:
        return self.inserted + self.updated

    def as_json(self) -> dict[str, object]:
        return {
            "key": self.key,
            "late": self.late,
            "rows_read": self.rows_read,
            "inserted": self.inserted,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "rejected": self.rejected,
        }


def reason_label(reason: str) -> str:
    """A bounded label for the rejects metric: the reason without its specifics."""
    return reason.split(":", 1)[0].replace(" ", "_")


async def _records(chunks: AsyncIterable[bytes], parser: FeedParser) -> AsyncIterator[Record]:
    async for chunk in chunks:
        for record in parser.feed(chunk):
            yield record
    for record in parser.finish():
        yield record


async def apply_file(
    conn: asyncpg.Connection,
    dataset: DatasetConfig,
    key: str,
    etag: str,
    chunks: AsyncIterable[bytes],
    *,
    late: bool,
    size_bytes: int | None = None,
    max_record_bytes: int = 16 * 1024 * 1024,
    statement_timeout_s: float = 600.0,
    incoming_ready: bool = False,
) -> FileResult:
    """Apply one file in one transaction (a savepoint if the caller holds one).

    ``incoming_ready``: the caller has created the session's temp table (CREATE_INCOMING).
    Raises BadFile (nothing applied) if the bytes are not the feed, DatabaseFault
    (the session terminated: the server rolls the file back) if the connection is
    lost or the COPY outlives ``statement_timeout_s``; any error leaves nothing applied.
    """
    parser = FeedParser(max_record_bytes)
    async with guarded(conn) as guard, conn.transaction():
        if not incoming_ready:
            # A drain pass makes sure of it once (``incoming_ready``), not once a file.
            await ensure_incoming(conn)
        # asyncpg leaves a COPY's wait for the socket to drain unbounded, and a server
        # error during COPY is read only once the whole file is sent: this bound is the
        # COPY's (the server bounds the statement by the same setting), and asyncpg's
        # own timer, a second later, never wins the race to say so.
        timed_out = f"COPY did not finish within {statement_timeout_s:g} s ([database] statement_timeout_s)"
        with guard.bound(statement_timeout_s, timed_out):
            await conn.copy_records_to_table(
                "fleet_incoming",
                records=_records(chunks, parser),
                columns=RECORD_COLUMNS,
                timeout=statement_timeout_s + 1,
            )
        stats = parser.stats
        if stats.rejects:
            await conn.execute(
                ledger.INSERT_REJECTS,
                dataset.name,
                key,
                etag,
                [r.line for r in stats.rejects],
                [r.reason for r in stats.rejects],
                [r.raw_line for r in stats.rejects],
            )
        row = await conn.fetchrow(
            UPSERT.format(table=qualified(dataset.table_schema, dataset.table_name)), key
        )
        assert row is not None
        await conn.execute(RESOLVE_GEO, qualified(dataset.table_schema, dataset.table_name), key)
        for hook in dataset.post_apply:
            await conn.execute(POST_APPLY.format(function=qualified(dataset.table_schema, hook)))
        result = _result(key, etag, late, stats, row)
        # The ledger row and the watermark in one statement: one round trip, not two.
        await conn.execute(
            ledger.RECORD_APPLIED,
            dataset.name,
            key,
            etag,
            size_bytes,
            result.rows_read,
            result.inserted,
            result.updated,
            result.unchanged,
            result.rejected,
            late,
        )
    return result


def _result(key: str, etag: str, late: bool, stats: ParseStats, row: asyncpg.Record) -> FileResult:
    reasons: dict[str, int] = {}
    for r in stats.rejects:
        label = reason_label(r.reason)
        reasons[label] = reasons.get(label, 0) + 1
    return FileResult(
        key=key,
        etag=etag,
        late=late,
        rows_read=stats.rows_read,
        inserted=row["inserted"],
        updated=row["updated"],
        unchanged=row["distinct_rows"] - row["inserted"] - row["updated"],
        rejected=len(stats.rejects),
        dropped=stats.dropped_alarm + stats.dropped_sentinel,
        extra_columns=stats.extra_columns,
        reject_reasons=reasons,
    )

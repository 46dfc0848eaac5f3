"""What the database remembers about each dataset: the file ledger and the watermark.

The ledger row, the watermark advance and the file's rows are written in one
transaction (CONTRACT.md semantic 2); these helpers take the connection that holds
it and never open one of their own. The watermark only moves forward, compared by
the timestamp in the file name (``tickets.key_name``), so a late file cannot lower it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from fleetticketsd.database.db import LOCK_NAMESPACE

ENSURE_META = """
INSERT INTO tickets.import_meta (dataset) VALUES ($1) ON CONFLICT (dataset) DO NOTHING
"""
GET_META = """
SELECT metadata->>'source_max_key' AS watermark, blocked_key, blocked_etag, blocked_reason,
       blocked_line, blocked_at, last_applied_at, metadata
FROM tickets.import_meta WHERE dataset = $1
"""
LEDGER_FOR_KEYS = """
SELECT key, etag, status, error FROM tickets.ingest_files WHERE dataset = $1 AND key = ANY($2::text[])
"""
RECORD_FILE = """
INSERT INTO tickets.ingest_files
    (dataset, key, etag, status, size_bytes, rows_read, rows_inserted, rows_updated,
     rows_unchanged, rows_rejected, late, error)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (dataset, key, etag) DO UPDATE
    SET status = EXCLUDED.status, error = EXCLUDED.error, applied_at = now()
"""
# Forward only, by the name's timestamp; also clears a block on this very key, since
# a file that applies is no longer bad.
ADVANCE_WATERMARK = """
UPDATE tickets.import_meta
SET metadata = CASE
        WHEN metadata->>'source_max_key' IS NULL
          OR tickets.key_name(metadata->>'source_max_key') < tickets.key_name($2)
        THEN jsonb_set(metadata, '{source_max_key}', to_jsonb($2::text))
        ELSE metadata END,
    blocked_key    = CASE WHEN blocked_key = $2 THEN NULL ELSE blocked_key END,
    blocked_etag   = CASE WHEN blocked_key = $2 THEN NULL ELSE blocked_etag END,
    blocked_reason = CASE WHEN blocked_key = $2 THEN NULL ELSE blocked_reason END,
    blocked_line   = CASE WHEN blocked_key = $2 THEN NULL ELSE blocked_line END,
    blocked_at     = CASE WHEN blocked_key = $2 THEN NULL ELSE blocked_at END,
    last_applied_at = now(),
    updated_at = now()
WHERE dataset = $1
"""
# A file's ledger row and the watermark advance (as the two statements above), in one
# statement: the apply path pays one round trip for both. Data-modifying CTEs always
# run to completion, whatever the outer statement reads of them.
RECORD_APPLIED = (
    """
WITH recorded AS (
    INSERT INTO tickets.ingest_files
        (dataset, key, etag, status, size_bytes, rows_read, rows_inserted, rows_updated,
         rows_unchanged, rows_rejected, late, error)
    VALUES ($1, $2, $3, 'applied', $4, $5, $6, $7, $8, $9, $10, NULL)
    ON CONFLICT (dataset, key, etag) DO UPDATE
        SET status = EXCLUDED.status, error = EXCLUDED.error, applied_at = now()
    RETURNING 1
)"""
    + ADVANCE_WATERMARK
)
SET_BLOCKED = """
UPDATE tickets.import_meta
SET blocked_key = $2, blocked_etag = $3, blocked_reason = $4, blocked_line = $5,
    blocked_at = CASE WHEN blocked_key IS DISTINCT FROM $2 THEN now() ELSE blocked_at END,
    updated_at = now()
WHERE dataset = $1
"""
CLEAR_BLOCKED = """
UPDATE tickets.import_meta
SET blocked_key = NULL, blocked_etag = NULL, blocked_reason = NULL, blocked_line = NULL, blocked_at = NULL,
    updated_at = now()
WHERE dataset = $1 AND ($2::text IS NULL OR blocked_key = $2)
"""
# Observations only (what a listing saw, how a pass ended) commit without waiting for
# the WAL flush: ~4 ms each, twice a pass, more than the database work of a 1-row
# delta. A server crash can lose the last one; nothing decides what to apply from
# them, and the next pass writes them again. set_config(..., true) lasts until the
# end of the statement's own transaction, so it covers exactly this commit.
_NO_FLUSH = "WITH no_flush AS (SELECT set_config('synchronous_commit', 'off', true))"
# What the last listing saw, for status readers (dashboards) that cannot list S3.
RECORD_SOURCE_SEEN = (
    _NO_FLUSH
    + """
UPDATE tickets.import_meta
SET metadata = metadata || jsonb_build_object(
        'newest_key', $2::text, 'pending_files', $3::int, 'source_checked_at', now()),
    updated_at = now()
FROM no_flush
WHERE dataset = $1
"""
)
# A streamed listing's totals, once it has ended: the pass recorded the pages read
# until its first apply (RECORD_SOURCE_SEEN); source_checked_at stays that instant,
# so the ledger rows written since it are still the files the pass dealt with.
RECORD_SOURCE_TOTAL = (
    _NO_FLUSH
    + """
UPDATE tickets.import_meta
SET metadata = metadata || jsonb_build_object('newest_key', $2::text, 'pending_files', $3::int),
    updated_at = now()
FROM no_flush
WHERE dataset = $1
"""
)
# The last drain listing's view of one dataset, net of the files applied since: the
# dashboards' freshness (migrations/0004_read_side.sql), for `status` while S3 is down.
LAST_LISTING = "SELECT reporting.fn_freshness() -> $1::text"
# How the last pass ended, for `status` on a terminal and for dashboards.
RECORD_PASS = (
    _NO_FLUSH
    + """
UPDATE tickets.import_meta
SET metadata = metadata || jsonb_build_object(
        'last_pass_at', now(), 'last_pass_outcome', $2::text, 'last_pass_files', $3::int)
        || CASE WHEN $2::text = 'ok' THEN jsonb_build_object('last_success_at', now())
                ELSE jsonb_build_object() END,
    updated_at = now()
FROM no_flush
WHERE dataset = $1
"""
)
RESEED = """
WITH gone AS (DELETE FROM tickets.ingest_files WHERE dataset = $1)
UPDATE tickets.import_meta
SET metadata = metadata - 'source_max_key',
    blocked_key = NULL, blocked_etag = NULL, blocked_reason = NULL, blocked_line = NULL,
    blocked_at = NULL, updated_at = now()
WHERE dataset = $1
"""
# Where a restarted daemon picks up "last successful pass" from, so the
# no-successful-pass alert keeps counting across restarts.
LAST_SUCCESS = """
SELECT dataset, (metadata->>'last_success_at')::timestamptz AS at
FROM tickets.import_meta WHERE metadata ? 'last_success_at'
"""
TRY_DATASET_LOCK = "SELECT pg_try_advisory_lock($1, hashtext($2))"
DATASET_LOCK = "SELECT pg_advisory_lock($1, hashtext($2))"
DATASET_UNLOCK = "SELECT pg_advisory_unlock($1, hashtext($2))"
# Who holds each dataset's lock ($1 LOCK_NAMESPACE, $2 dataset names): pg_locks shows a
# two-int advisory key as classid/objid (oids, so hashtext's int4 read unsigned) with
# objsubid 2; pg_stat_activity says which program that backend serves. Columns of
# another role's session are NULL unless this role may see them (pg_read_all_stats).
LOCK_HOLDERS = """
SELECT d.name AS dataset, l.pid, a.application_name, host(a.client_addr) AS client_addr,
       a.usename, a.backend_start, a.xact_start, a.state
FROM unnest($2::text[]) AS d(name)
JOIN pg_locks l
  ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
 AND l.classid::bigint = $1::bigint
 AND l.objid::bigint = (hashtext(d.name)::bigint & 4294967295)
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
"""
INSERT_REJECTS = """
INSERT INTO tickets.ingest_rejects (dataset, key, etag, line, reason, raw_line)
SELECT $1, $2, $3, r.line, r.reason, r.raw_line
FROM unnest($4::int[], $5::text[], $6::text[]) AS r(line, reason, raw_line)
"""


@dataclass(frozen=True)
class Blocked:
    key: str
    etag: str | None
    reason: str
    # Where reading the file failed, when known; not in `status --json` (CONTRACT.md
    # fixes `blocked` to key and reason), shown by the terminal view and the page.
    line: int | None = None

    def as_json(self) -> dict[str, str]:
        return {"key": self.key, "reason": self.reason}


@dataclass(frozen=True)
class DatasetState:
    watermark: str | None
    blocked: Blocked | None
    last_applied_at: datetime | None
    metadata: dict[str, Any]
    exists: bool = True  # whether import_meta has the dataset's row (ensure)


@dataclass(frozen=True)
class LedgerEntry:
    status: str  # applied | skipped | quarantined
    error: str | None


async def ensure(conn: asyncpg.Connection, dataset: str) -> None:
    await conn.execute(ENSURE_META, dataset)


async def state(conn: asyncpg.Connection, dataset: str) -> DatasetState:
    row = await conn.fetchrow(GET_META, dataset)
    if row is None:
        return DatasetState(None, None, None, {}, exists=False)
    blocked = (
        Blocked(row["blocked_key"], row["blocked_etag"], row["blocked_reason"] or "", row["blocked_line"])
        if row["blocked_key"]
        else None
    )
    return DatasetState(row["watermark"], blocked, row["last_applied_at"], row["metadata"] or {})


# Keys per ledger lookup: a backlog of 100,000 files is looked up in bounded queries
# (one array parameter of ~0.7 MB each), not in one of 7 MB.
LOOKUP_BATCH_KEYS = 10_000


async def entries(
    conn: asyncpg.Connection, dataset: str, keys: list[str]
) -> dict[tuple[str, str], LedgerEntry]:
    """Ledger rows for the listed keys: one query per 10,000 keys, not one per file."""
    found: dict[tuple[str, str], LedgerEntry] = {}
    for i in range(0, len(keys), LOOKUP_BATCH_KEYS):
        rows = await conn.fetch(LEDGER_FOR_KEYS, dataset, keys[i : i + LOOKUP_BATCH_KEYS])
        found.update({(r["key"], r["etag"]): LedgerEntry(r["status"], r["error"]) for r in rows})
    return found


async def try_lock(conn: asyncpg.Connection, dataset: str) -> bool:
    return bool(await conn.fetchval(TRY_DATASET_LOCK, LOCK_NAMESPACE, dataset))


async def lock(conn: asyncpg.Connection, dataset: str) -> None:
    await conn.execute(DATASET_LOCK, LOCK_NAMESPACE, dataset)


async def unlock(conn: asyncpg.Connection, dataset: str) -> None:
    await conn.execute(DATASET_UNLOCK, LOCK_NAMESPACE, dataset)

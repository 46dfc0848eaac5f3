"""A backlog longer than one listing page (issue 16): changes/ is streamed page by page.

The pass applies its first file while the bucket is still being listed, yet every
semantic of a whole listing holds: name order, each file once, already-decided files
archived without a second apply, replays from processed/ merged in name order, and
the listing's figures recorded for `status` once the listing has ended.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from fleetticketsd import feedgen
from fleetticketsd.config import Config
from fleetticketsd.ingest.drain import DrainReport, Engine, drain
from fleetticketsd.ingest.source import ChangeFile

from .conftest import Bucket, csv_file, engine_for, inc_key, row

START = datetime(2026, 7, 1, 8, 0, 0)
PAGE_KEYS = 4


def name(i: int) -> str:
    return feedgen.file_name(START + timedelta(minutes=i))


def body(i: int) -> bytes:
    return csv_file(row(f"INC{i:012d}", last_seen_at="2026-06-30 10:00:00")).encode()


def small_pages(make_config: Callable[..., Config]) -> Config:
    # A prefetch window of 2 and a commit per file: the pass needs only the first page
    # to start, and each commit is visible as it happens.
    return make_config(ingest={"read_chunk_bytes": 4096, "prefetch_files": 2, "commit_batch_files": 1})


async def drain_paged(config: Config) -> tuple[DrainReport, list[tuple[str, Any]], Engine]:
    """One pass with PAGE_KEYS keys a listing page; the events in the order they
    happened: each page of changes/ listed, the end of that listing, each commit."""
    events: list[tuple[str, Any]] = []
    async with engine_for(config) as engine:
        source = engine.source
        source.list_page_keys = PAGE_KEYS
        list_pages = source.list_pages

        async def recorded(prefix: str, start_after: str | None = None) -> AsyncIterator[list[ChangeFile]]:
            async for page in list_pages(prefix, start_after):
                if prefix.endswith("changes/"):
                    events.append(("page", [f.key for f in page]))
                yield page
            if prefix.endswith("changes/"):
                events.append(("listed", None))

        source.list_pages = recorded  # type: ignore[method-assign]
        report = await drain(
            engine,
            config.dataset("inc"),
            progress=lambda _ds, _done, _total, result: events.append(("commit", result.key)),
        )
    return report, events, engine


async def test_a_backlog_of_many_pages_commits_before_the_listing_ends_and_applies_each_once_in_order(
    make_config: Callable[..., Config], bucket: Bucket, conn: asyncpg.Connection
) -> None:
    config = small_pages(make_config)
    for i in range(3):
        bucket.put(inc_key(name(i)), body(i))
    first, _, _ = await drain_paged(config)
    assert first.ok and first.files_applied == 3, first
    # The first three are back under changes/ (a move an earlier pass did not finish),
    # beside 27 new ones: 30 keys, 8 listing pages.
    for i in range(30):
        bucket.put(inc_key(name(i)), body(i))

    report, events, engine = await drain_paged(config)

    assert report.ok and report.files_applied == 27, report
    kinds = [kind for kind, _ in events]
    assert kinds.count("page") == 8
    assert kinds.index("commit") < kinds.index("listed"), kinds
    listed = [k for kind, keys in events if kind == "page" for k in keys]
    assert listed == [inc_key(name(i)) for i in range(30)]
    # Applied in name order, each once; the three decided ones archived, not applied again.
    assert [key for kind, key in events if kind == "commit"] == [inc_key(name(i)) for i in range(3, 30)]
    rows = await conn.fetch("SELECT key, count(*) AS n FROM tickets.ingest_files GROUP BY key ORDER BY key")
    assert [(r["key"], r["n"]) for r in rows] == [(inc_key(name(i)), 1) for i in range(30)]
    assert await conn.fetchval("SELECT count(*) FROM tickets.inc") == 30
    assert bucket.keys("automations/inc/changes/") == []
    assert len(bucket.keys("automations/inc/processed/")) == 30
    assert report.watermark == inc_key(name(29))
    # The listing's figures, recorded once it ended: what status reads when S3 is down.
    meta = json.loads(await conn.fetchval("SELECT metadata FROM tickets.import_meta WHERE dataset = 'inc'"))
    assert (meta["newest_key"], meta["pending_files"]) == (inc_key(name(29)), 27)
    seen = json.loads(await conn.fetchval("SELECT reporting.fn_freshness() -> 'inc'"))
    assert seen["pending_files_remaining"] == 0
    gauge = engine.metrics.registry.get_sample_value("fleettickets_pending_files", {"dataset": "inc"})
    assert gauge == 0


async def test_replays_merge_in_name_order_with_a_streamed_listing(
    make_config: Callable[..., Config], bucket: Bucket, conn: asyncpg.Connection
) -> None:
    config = small_pages(make_config)
    evens = [i for i in range(0, 30, 2)]
    for i in evens:
        bucket.put(inc_key(name(i)), body(i))
    assert (await drain_paged(config))[0].files_applied == 15
    # As after a restore from a backup taken at file 10: the ledger lacks 12..28 and
    # the watermark is back at 10; those files are in processed/ only.
    await conn.execute("DELETE FROM tickets.ingest_files WHERE key > $1", inc_key(name(10)))
    await conn.execute(
        "UPDATE tickets.import_meta SET metadata = "
        "jsonb_set(metadata, '{source_max_key}', to_jsonb($1::text))",
        inc_key(name(10)),
    )
    # Meanwhile the odd ones land under changes/ (5 is late), and 20 is in both places.
    odds = [5, *range(11, 30, 2)]
    for i in [*odds, 20]:
        bucket.put(inc_key(name(i)), body(i))

    report, events, _ = await drain_paged(config)

    assert report.ok and report.files_replayed == 8, report  # 20 is the changes/ version
    applied = [key for kind, key in events if kind == "commit"]
    assert applied == [inc_key(name(i)) for i in [5, *range(11, 30)]]
    assert report.files_applied == len(applied) == 20
    rows = await conn.fetch("SELECT key, count(*) AS n FROM tickets.ingest_files GROUP BY key ORDER BY key")
    assert [(r["key"], r["n"]) for r in rows] == [(inc_key(name(i)), 1) for i in sorted([*evens, *odds])]
    assert bucket.keys("automations/inc/changes/") == []
    assert report.watermark == inc_key(name(29))

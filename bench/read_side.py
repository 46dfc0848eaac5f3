"""Benchmark of the read side (issue 5): both reporting functions over ~100k INC tickets.

Creates a scratch database, migrates it with the project's migrations, loads synthetic
tickets from fleetticketsd.feedgen (INC ~100k after the alarm rows are dropped, CRQ
~14k), gives ~90% of them a point, and then times

  reporting.fn_tickets_for_map()
  reporting.fn_inc_dashboard()              (and with a cluster, status or 24 h window filter)
  tickets.capture_history()                 (the per-file hook, after a 50-row delta)

several times each (median against the 300 ms target), and prints the nested plans'
scan nodes from auto_explain (EXPLAIN ANALYZE, BUFFERS) to show which indexes are used.
The database is dropped at the end, also on failure.

    /work/venv/bin/python bench/read_side.py [--inc-rows N] [--closed-share X] [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleetticketsd import db, feedgen
from fleetticketsd.feed import KEPT

ADMIN_URL = os.environ.get("FLEETTICKETSD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
TARGET_MS = 300.0
ALARM_SHARE = 0.30  # feedgen drops ~30% as alarms, as the real export has


def db_url(name: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + name


RAW_EXPR = (
    "jsonb_build_object("
    + ", ".join(
        f"'{c}', " + {"region": "lower(region)", "raw_status": "upper(raw_status)"}.get(c, f'"{c}"')
        for c in KEPT
    )
    + ")"
)


async def load(conn: asyncpg.Connection, dataset: str, rows: int, closed_share: float, seed: int) -> int:
    """Generate a baseline with feedgen and load it the way the engine cleans it."""
    spec = feedgen.FeedSpec(
        dataset=dataset, seed=seed, start=feedgen.now_eat(), sentinel=False, closed_share=closed_share
    )
    buf = io.BytesIO()
    feedgen.write_rows(buf, spec, rows)
    buf.seek(0)
    cols = ", ".join(f'"{c}" text' for c in feedgen.COLUMNS)
    await conn.execute(f"DROP TABLE IF EXISTS stage; CREATE TEMP TABLE stage ({cols})")
    await conn.copy_to_table("stage", source=buf, format="csv", header=True)
    key = f"automations/{dataset}/changes/{feedgen.file_name(spec.start)}"
    status = await conn.execute(
        f"INSERT INTO tickets.{dataset} (ticket_id, raw, source_key) "
        f"SELECT ticket_id, {RAW_EXPR}, $1 FROM stage WHERE is_alarm <> 'true'",
        key,
    )
    # A point for ~90%: a cluster centroid with some jitter (the gazetteer's fallback).
    await conn.execute(
        f"""
        UPDATE tickets.{dataset}
        SET geom = ST_SetSRID(ST_MakePoint(36.6 + (abs(hashtext(cluster)) % 1000) / 2000.0
                                               + (abs(hashtext(ticket_id)) % 100) / 10000.0,
                                           -1.4 + (abs(hashtext(cluster || 'y')) % 1000) / 2000.0
                                               + (abs(hashtext(ticket_id || 'y')) % 100) / 10000.0), 4326),
            geo_source = 'cluster'
        WHERE abs(hashtext(ticket_id)) % 10 <> 0
        """
    )
    await conn.execute(
        """
        INSERT INTO tickets.import_meta (dataset, metadata, last_applied_at)
        VALUES ($1, jsonb_build_object('source_max_key', $2::text, 'newest_key', $2::text,
                                       'pending_files', 0, 'source_checked_at', now()), now())
        ON CONFLICT (dataset) DO UPDATE SET metadata = EXCLUDED.metadata
        """,
        dataset,
        key,
    )
    return int(status.split()[-1])


async def timed(fn: Callable[[], Awaitable[Any]], runs: int) -> tuple[list[float], Any]:
    await fn()  # warm: plan caches, buffers
    times, result = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = await fn()
        times.append((time.perf_counter() - t0) * 1000)
    return times, result


SCAN = re.compile(r"(Seq Scan|Index Scan|Index Only Scan|Bitmap Index Scan|Bitmap Heap Scan)[^\n]*")


async def explain(conn: asyncpg.Connection, sql: str) -> list[str]:
    """Scan nodes of every statement the call runs, via auto_explain sent to the client."""
    lines: list[str] = []

    def on_log(_conn: Any, msg: Any) -> None:
        text = str(getattr(msg, "message", msg))
        if "Query Text" not in text:
            return
        query = text.split("Query Text:", 1)[1].strip().splitlines()[0][:70]
        head = re.search(r"duration: ([\d.]+) ms", text)
        lines.append(f"  statement ({head.group(1) if head else '?'} ms): {query}")
        for m in SCAN.finditer(text):
            node = re.sub(r"\s+\(cost=[^)]*\)", "", m.group(0))
            lines.append(f"      {node.strip()[:150]}")
        for b in re.findall(r"Buffers: [^\n]*", text)[:1]:
            lines.append(f"      top {b.strip()}")

    conn.add_log_listener(on_log)
    try:
        await conn.execute(
            "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0; SET auto_explain.log_analyze = on;"
            "SET auto_explain.log_buffers = on; SET auto_explain.log_nested_statements = on;"
            "SET auto_explain.log_timing = on; SET client_min_messages = log"
        )
        await conn.fetchval(sql)
    finally:
        await conn.execute("SET client_min_messages = notice; SET auto_explain.log_min_duration = -1")
        await asyncio.sleep(0.05)
        conn.remove_log_listener(on_log)
    # The outer "SELECT fn()" is one Result node: only the nested statements say anything.
    return [ln for ln in lines if "SELECT reporting.fn_" not in ln or "statement" not in ln]


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inc-rows", type=int, default=100_000, help="INC tickets after alarm rows are dropped")
    ap.add_argument("--crq-rows", type=int, default=14_000)
    ap.add_argument("--closed-share", type=float, default=0.85, help="share of tickets already closed")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = ap.parse_args()

    name = f"fleet_bench_read_{os.getpid()}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        conn = await asyncpg.connect(db_url(name))
        try:
            return await run(conn, args)
        finally:
            await conn.close()
    finally:
        if not args.keep:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def run(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    await db.migrate(conn)
    inc = await load(conn, "inc", round(args.inc_rows / (1 - ALARM_SHARE)), args.closed_share, seed=11)
    crq = await load(conn, "crq", round(args.crq_rows / (1 - ALARM_SHARE)), args.closed_share, seed=12)
    # What enabling the hook on a loaded system does: the migration's backfill, rerun.
    await conn.execute(
        "INSERT INTO tickets.closure_events (ticket_id, closed_at, observed_at, source_key, sla_clock_start,"
        " mttr_minutes, sla_status, feed_sla_status, owner, assigned_team, cluster)"
        " SELECT ticket_id, closed_at, updated_at, source_key, sla_clock_start, mttr_minutes, sla_status,"
        " feed_sla_status, owner, assigned_team, cluster FROM tickets.inc_closures ON CONFLICT DO NOTHING"
    )
    await conn.execute("VACUUM ANALYZE")
    stats = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE normalized_status = 'open') AS open,"
        " count(*) FILTER (WHERE normalized_status = 'closed'"
        "                  AND closed_at > now() - interval '7 days') AS c7,"
        " count(*) FILTER (WHERE geom IS NOT NULL) AS mapped FROM tickets.inc"
    )
    print(
        f"loaded in {time.perf_counter() - t0:.1f}s: INC {inc} tickets ({stats['open']} open, "
        f"{stats['c7']} closed in the last 7 days, {stats['mapped']} with a point), CRQ {crq}"
    )
    busiest = await conn.fetchval(
        "SELECT cluster FROM tickets.inc WHERE normalized_status = 'open'"
        " GROUP BY 1 ORDER BY count(*) DESC LIMIT 1"
    )

    cases = [
        ("fn_tickets_for_map()", "SELECT reporting.fn_tickets_for_map()::text"),
        ("fn_inc_dashboard()", "SELECT reporting.fn_inc_dashboard()::text"),
        (
            f"fn_inc_dashboard('{busiest}')",
            f"SELECT reporting.fn_inc_dashboard(p_cluster => '{busiest}')::text",
        ),
        ("fn_inc_dashboard(p_window=>'24h')", "SELECT reporting.fn_inc_dashboard(p_window => '24h')::text"),
        (
            "fn_inc_dashboard(p_status=>'breached')",
            "SELECT reporting.fn_inc_dashboard(p_status => 'breached')::text",
        ),
    ]
    results = []
    for label, sql in cases:
        times, payload = await timed(lambda sql=sql: conn.fetchval(sql), args.runs)
        features = payload.count('"type": "Feature"')
        results.append((label, times, len(payload), features))

    # The hook runs inside every INC file's transaction: its cost is added to each file.
    async def hook_once() -> None:
        async with conn.transaction():
            await conn.execute(
                "UPDATE tickets.inc SET raw = raw || jsonb_build_object('last_seen_at', now()::text),"
                " updated_at = now() WHERE ticket_id IN (SELECT ticket_id FROM tickets.inc"
                " ORDER BY md5(ticket_id || now()::text) LIMIT 50)"
            )
            t = time.perf_counter()
            await conn.execute("SELECT tickets.capture_history()")
            hook_times.append((time.perf_counter() - t) * 1000)

    hook_times: list[float] = []
    for _ in range(args.runs):
        await hook_once()

    print()
    print(
        f"{'call':<44} {'runs':>4} {'median ms':>10} {'min':>8} {'max':>8} {'features':>9} {'KB':>7}  target"
    )
    ok = True
    for label, times, size, features in results:
        med = statistics.median(times)
        ok &= med < TARGET_MS
        print(
            f"{label:<44} {len(times):>4} {med:>10.1f} {min(times):>8.1f} {max(times):>8.1f} "
            f"{features:>9} {size / 1024:>7.0f}  {'ok' if med < TARGET_MS else 'OVER'} (<{TARGET_MS:.0f})"
        )
    med = statistics.median(hook_times)
    print(
        f"{'capture_history() after a 50-row delta':<44} {len(hook_times):>4} {med:>10.1f} "
        f"{min(hook_times):>8.1f} {max(hook_times):>8.1f} {'':>9} {'':>7}  (per INC file)"
    )

    for label, sql in [cases[0], cases[2]]:
        print(f"\nplans of {label} (auto_explain, EXPLAIN ANALYZE BUFFERS; scan nodes only):")
        for line in await explain(conn, sql):
            print(line)
    print("\nall within target" if ok else "\nsome calls are OVER the target")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

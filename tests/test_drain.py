"""The drain against real PostgreSQL and a real S3 API: CONTRACT.md's semantics 1–7."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from fleetticketsd.config import Config
from fleetticketsd.ingest.drain import Engine, drain, status
from fleetticketsd.ingest.source import S3Source

from .conftest import SAMPLE, Bucket, csv_file, inc_key, row

# The S3-facing tests (listing, reading, archiving, quarantining) run against moto and
# against s3rver (conftest); the parser's and the database's, on moto only.
both_servers = pytest.mark.s3_servers


def upload_sample(bucket: Bucket) -> list[str]:
    keys = []
    for path in sorted((SAMPLE / "inc" / "changes").glob("*.csv")):
        key = inc_key(path.name)
        bucket.put(key, path.read_bytes())
        keys.append(key)
    return keys


async def ticket(
    conn: asyncpg.Connection, ticket_id: str, table: str = "tickets.inc"
) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT * FROM {table} WHERE ticket_id = $1", ticket_id)


@both_servers
async def test_sample_feed_drains_in_order_and_archives(
    engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    keys = upload_sample(bucket)
    report = await drain(engine, engine.config.dataset("inc"))
    assert report.ok, report
    assert report.files_applied == 4
    assert report.watermark == keys[-1]
    # The baseline's sentinel and alarm rows are dropped; the deltas then close tickets.
    t58 = await ticket(conn, "INC000000000058")
    assert t58 is not None
    assert t58["normalized_status"] == "closed"
    assert t58["source_key"] == inc_key("2026-06-22T17-10-50.csv")
    assert t58["mttr_minutes"] == 18735
    assert t58["raw"]  # jsonb
    raw = json.loads(t58["raw"]) if isinstance(t58["raw"], str) else t58["raw"]
    assert len(raw) == 25 and "week_start" not in raw and "department" not in raw
    assert raw["region"] == "coast" and raw["raw_status"] == "CLOSED"
    assert await conn.fetchval("SELECT count(*) FROM tickets.inc WHERE ticket_id LIKE 'EXPORT%'") == 0
    assert await ticket(conn, "INC000000000064") is None  # is_alarm = true
    # Typed columns: EAT wall-clock time → UTC.
    assert str(t58["closed_at"]) == "2026-06-22 13:36:50+00:00"
    assert bucket.keys("automations/inc/changes/") == []
    assert bucket.keys("automations/inc/processed/") == sorted(
        keys[i].replace("changes", "processed") for i in range(4)
    )
    ledger = await conn.fetch("SELECT key, status FROM tickets.ingest_files ORDER BY key")
    assert [r["key"] for r in ledger] == keys and {r["status"] for r in ledger} == {"applied"}
    wm = await conn.fetchval(
        "SELECT metadata->>'source_max_key' FROM tickets.import_meta WHERE dataset='inc'"
    )
    assert wm == keys[-1]
    m = engine.metrics
    assert m.files_applied.labels("inc")._value.get() == 4
    assert m.source_lag.labels("inc")._value.get() == 0


@both_servers
async def test_name_order_beats_last_modified(
    engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    # Upload the newest first: its LastModified is oldest, but its name wins.
    bucket.put(inc_key("2026-06-22T10-00-02.csv"), csv_file(row("T1", raw_status="third")))
    bucket.put(inc_key("2026-06-22T10-00-01.csv"), csv_file(row("T1", raw_status="second")))
    bucket.put(inc_key("2026-06-22T10-00-00.csv"), csv_file(row("T1", raw_status="first")))
    report = await drain(engine, engine.config.dataset("inc"))
    assert report.files_applied == 3
    t = await ticket(conn, "T1")
    assert t is not None and t["raw_status"] == "THIRD"
    order = await conn.fetch("SELECT key FROM tickets.ingest_files ORDER BY applied_at, key")
    assert [r["key"].rsplit("/", 1)[1] for r in order] == [
        "2026-06-22T10-00-00.csv",
        "2026-06-22T10-00-01.csv",
        "2026-06-22T10-00-02.csv",
    ]


@both_servers
async def test_other_objects_under_the_prefix_are_ignored(engine: Engine, bucket: Bucket) -> None:
    bucket.put("automations/inc/full/latest.csv", "junk")
    bucket.put(inc_key("notes.txt"), "junk")
    bucket.put(inc_key("2026-06-22T10-00-00.csv.bak"), "junk")
    bucket.put(inc_key("sub/2026-06-22T10-00-00.csv"), "junk")
    bucket.put(inc_key("2026-13-40T10-00-00.csv"), "junk")
    report = await drain(engine, engine.config.dataset("inc"))
    assert report.ok and report.files_applied == 0


@both_servers
async def test_already_applied_file_still_in_changes_is_only_archived(
    engine: Engine, bucket: Bucket, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = inc_key("2026-06-22T10-00-00.csv")
    bucket.put(key, csv_file(row("T1")))

    # Crash after commit, before archive: make the archive step fail.
    async def broken_archive(*args: object) -> bool:
        from botocore.exceptions import EndpointConnectionError

        from fleetticketsd.ingest.source import SourceError

        raise SourceError("copy", key, EndpointConnectionError(endpoint_url="x"))

    monkeypatch.setattr(S3Source, "copy_to_processed", broken_archive)
    first = await drain(engine, engine.config.dataset("inc"))
    assert first.files_applied == 1
    assert bucket.keys("automations/inc/changes/") == [key]
    assert engine.metrics.poll_failures.labels("inc", "archive")._value.get() == 1
    monkeypatch.undo()
    await conn.execute('UPDATE tickets.inc SET raw = raw || \'{"owner": "edited"}\'')
    second = await drain(engine, engine.config.dataset("inc"))
    assert second.ok and second.files_applied == 0
    assert bucket.keys("automations/inc/changes/") == []
    assert bucket.keys("automations/inc/processed/") == [key.replace("changes", "processed")]
    # Not re-applied: the edit survives and the ledger has one row.
    assert (await ticket(conn, "T1"))["owner"] == "edited"  # type: ignore[index]
    assert await conn.fetchval("SELECT count(*) FROM tickets.ingest_files") == 1


@both_servers
async def test_same_key_same_etag_is_never_applied_twice(
    engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    key = inc_key("2026-06-22T10-00-00.csv")
    body = csv_file(row("T1"))
    bucket.put(key, body)
    await drain(engine, engine.config.dataset("inc"))
    await conn.execute('UPDATE tickets.inc SET raw = raw || \'{"owner": "edited"}\'')
    bucket.put(key, body)  # re-landed, identical bytes → same ETag
    report = await drain(engine, engine.config.dataset("inc"))
    assert report.files_applied == 0
    assert (await ticket(conn, "T1"))["owner"] == "edited"  # type: ignore[index]
    assert bucket.keys("automations/inc/changes/") == []


@both_servers
async def test_same_key_new_etag_is_a_reexport_applied_again(
    engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    key = inc_key("2026-06-22T10-00-00.csv")
    bucket.put(key, csv_file(row("T1", owner="A")))
    await drain(engine, engine.config.dataset("inc"))
    bucket.put(key, csv_file(row("T1", owner="B"), row("T2")))
    report = await drain(engine, engine.config.dataset("inc"))
    assert report.files_applied == 1 and report.rows_upserted == 2
    assert (await ticket(conn, "T1"))["owner"] == "B"  # type: ignore[index]
    assert await conn.fetchval("SELECT count(*) FROM tickets.ingest_files WHERE key = $1", key) == 2


async def test_late_file_is_applied_under_the_guard(
    engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    bucket.put(inc_key("2026-06-22T12-00-00.csv"), csv_file(row("T1", owner="new"), row("T2", owner="new")))
    await drain(engine, engine.config.dataset("inc"))
    late_key = inc_key("2026-06-22T11-00-00.csv")
    bucket.put(late_key, csv_file(row("T1", owner="old"), row("T3", owner="old")))
    report = await drain(engine, engine.config.dataset("inc"))
    assert report.files_applied == 1
    assert (await ticket(conn, "T1"))["owner"] == "new"  # the guard held
    assert (await ticket(conn, "T3"))["owner"] == "old"  # a row only the late file has
    assert report.watermark == inc_key("2026-06-22T12-00-00.csv")  # never lowered
    assert engine.metrics.late_files.labels("inc")._value.get() == 1
    assert await conn.fetchval("SELECT late FROM tickets.ingest_files WHERE key = $1", late_key) is True


async def test_identical_rows_are_not_counted_or_rewritten(
    engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    bucket.put(inc_key("2026-06-22T10-00-00.csv"), csv_file(row("T1"), row("T2")))
    await drain(engine, engine.config.dataset("inc"))
    xmin = await conn.fetchval("SELECT xmin::text FROM tickets.inc WHERE ticket_id = 'T1'")
    # A re-export of the same key (new ETag): T1 identical, T2 changed, T3 new.
    bucket.put(inc_key("2026-06-22T10-00-00.csv"), csv_file(row("T1"), row("T2", owner="X"), row("T3")))
    report = await drain(engine, engine.config.dataset("inc"))
    assert report.rows_upserted == 2
    assert await conn.fetchval("SELECT xmin::text FROM tickets.inc WHERE ticket_id = 'T1'") == xmin


async def test_duplicate_ticket_in_one_file_last_wins(
    engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    bucket.put(inc_key("2026-06-22T10-00-00.csv"), csv_file(row("T1", owner="a"), row("T1", owner="b")))
    report = await drain(engine, engine.config.dataset("inc"))
    assert report.rows_upserted == 1
    assert (await ticket(conn, "T1"))["owner"] == "b"  # type: ignore[index]


async def test_bad_rows_go_to_rejects_and_the_rest_applies(
    engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    key = inc_key("2026-06-22T10-00-00.csv")
    short = '"T2","inc","FTTH"'
    bucket.put(key, csv_file(row("T1"), short, row(""), row("T3"), row("T4", owner="nul\x00here")))
    report = await drain(engine, engine.config.dataset("inc"))
    assert report.ok and report.files_applied == 1
    assert report.rows_upserted == 2 and report.rows_rejected == 3
    rejects = await conn.fetch("SELECT key, line, reason, raw_line FROM tickets.ingest_rejects ORDER BY line")
    assert [(r["line"], r["reason"].split(":")[0]) for r in rejects] == [
        (3, "wrong field count"),
        (4, "empty ticket_id"),
        (6, "NUL character in a field"),
    ]
    assert rejects[0]["raw_line"].strip() == short and rejects[0]["key"] == key
    assert engine.metrics.rows_rejected.labels("inc", "wrong_field_count")._value.get() == 1


async def test_empty_delta_counts_as_applied(
    engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    key = inc_key("2026-06-22T10-00-00.csv")
    bucket.put(key, csv_file())
    report = await drain(engine, engine.config.dataset("inc"))
    assert report.ok and report.files_applied == 1 and report.rows_upserted == 0
    assert report.watermark == key
    assert bucket.keys("automations/inc/processed/") == [key.replace("changes", "processed")]


async def test_bom_crlf_and_multiline_fields(
    engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    loc = 'Garden Estate, "Thome"\r\nnear the\nmall'
    body = "\ufeff" + csv_file(row("T1", location_name=loc), row("T2"), eol="\r\n")
    bucket.put(inc_key("2026-06-22T10-00-00.csv"), body.encode())
    report = await drain(engine, engine.config.dataset("inc"))
    assert report.ok and report.rows_upserted == 2
    assert (await ticket(conn, "T1"))["location_name"] == loc  # type: ignore[index]


@both_servers
async def test_field_larger_than_csv_default_limit(
    engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    huge = "x" * 300_000  # csv's default field limit is 131,072
    body = csv_file(row("T1", location_name=huge), row("T2", cluster=huge, normalized_status=huge))
    bucket.put(inc_key("2026-06-22T10-00-00.csv"), body)
    report = await drain(engine, engine.config.dataset("inc"))
    assert report.ok and report.rows_upserted == 2
    assert len((await ticket(conn, "T1"))["location_name"]) == 300_000  # type: ignore[index]
    # Indexed columns are capped (a btree entry must stay small); raw keeps the value.
    t2 = await ticket(conn, "T2")
    assert t2 is not None and len(t2["cluster"]) == 200 and len(t2["normalized_status"]) == 64
    assert (
        await conn.fetchval("SELECT length(raw->>'cluster') FROM tickets.inc WHERE ticket_id = 'T2'")
        == 300_000
    )


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty file"),
        (b'"ticket_id","owner"\n"T1","x"\n', "header lacks column(s)"),
        (csv_file(row("T1")).encode() + b'"T2","\xff\xfe"\n', "not UTF-8"),
        (b"\x1f\x8b\x08\x00binarygzip\x00\xff", "not UTF-8"),
        (csv_file(row("T1")).encode() + b'"T2","unterminated\n', "unterminated quoted field"),
    ],
    ids=["zero-byte", "missing-columns", "bad-utf8-late", "binary", "unterminated"],
)
@both_servers
async def test_bad_file_halts_the_dataset_and_nothing_of_it_applies(
    engine: Engine, bucket: Bucket, conn: asyncpg.Connection, body: bytes, reason: str
) -> None:
    good = inc_key("2026-06-22T09-00-00.csv")
    bad = inc_key("2026-06-22T10-00-00.csv")
    after = inc_key("2026-06-22T11-00-00.csv")
    bucket.put(good, csv_file(row("T0")))
    bucket.put(bad, body)
    bucket.put(after, csv_file(row("T9")))
    bucket.put("automations/crq/changes/2026-06-22T10-00-00.csv", csv_file(row("C1")))
    report = await drain(engine, engine.config.dataset("inc"))
    assert not report.ok and report.blocked is not None
    assert report.blocked.key == bad and reason in report.blocked.reason
    assert report.files_applied == 1 and report.watermark == good
    assert await ticket(conn, "T1") is None and await ticket(conn, "T9") is None
    assert bucket.keys("automations/inc/changes/") == [bad, after]
    assert engine.metrics.dataset_blocked.labels("inc")._value.get() == 1
    # Other datasets go on.
    crq = await drain(engine, engine.config.dataset("crq"))
    assert crq.ok and crq.files_applied == 1
    # Still blocked on the next pass: the blocked file is retried first and fails again.
    again = await drain(engine, engine.config.dataset("inc"))
    assert again.blocked is not None and again.blocked.key == bad and again.files_applied == 0
    # A fixed re-upload of the same key (new ETag) unblocks it and the rest follows.
    bucket.put(bad, csv_file(row("T1")))
    fixed = await drain(engine, engine.config.dataset("inc"))
    assert fixed.ok and fixed.files_applied == 2 and fixed.watermark == after
    assert await conn.fetchval("SELECT blocked_key FROM tickets.import_meta WHERE dataset='inc'") is None
    assert engine.metrics.dataset_blocked.labels("inc")._value.get() == 0


@both_servers
async def test_quarantine_moves_bad_file_aside_and_goes_on(
    make_config: object, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    from fleetticketsd.database import db
    from fleetticketsd.metrics import Metrics

    cfg: Config = make_config(
        datasets={  # type: ignore[operator]
            "inc": {
                "prefix": "automations/inc/",
                "table": "tickets.inc",
                "on_bad_file": "quarantine",
            }
        }
    )
    bad = inc_key("2026-06-22T10-00-00.csv")
    bucket.put(bad, b'"not","the","feed"\n')
    bucket.put(inc_key("2026-06-22T11-00-00.csv"), csv_file(row("T1")))
    pool = await db.create_pool(cfg.database)
    try:
        async with S3Source(cfg.s3) as source:
            engine = Engine(cfg, pool, source, Metrics())
            report = await drain(engine, cfg.dataset("inc"))
            assert report.ok and report.files_applied == 1
            assert engine.metrics.files_quarantined.labels("inc")._value.get() == 1
            assert bucket.keys("automations/inc/quarantine/") == [
                "automations/inc/quarantine/2026-06-22T10-00-00.csv",
                "automations/inc/quarantine/2026-06-22T10-00-00.csv.error.json",
            ]
            doc = json.loads(bucket.get("automations/inc/quarantine/2026-06-22T10-00-00.csv.error.json"))
            assert doc["key"] == bad and "header lacks" in doc["error"] and doc["line"] == 1
            # The same bytes re-landing go straight back to quarantine/, unparsed.
            bucket.put(bad, b'"not","the","feed"\n')
            again = await drain(engine, cfg.dataset("inc"))
            assert again.ok and again.files_applied == 0
            assert bucket.keys("automations/inc/changes/") == []
            status = await conn.fetchval("SELECT status FROM tickets.ingest_files WHERE key = $1", bad)
            assert status == "quarantined"
    finally:
        await pool.close()


async def test_dry_run_changes_nothing(engine: Engine, bucket: Bucket, conn: asyncpg.Connection) -> None:
    bucket.put(inc_key("2026-06-22T10-00-00.csv"), csv_file(row("T1"), row("T2")))
    bucket.put(inc_key("2026-06-22T10-05-00.csv"), csv_file(row("T1", owner="X"), row("T3")))
    bucket.put(inc_key("2026-06-22T10-10-00.csv"), b"")
    report = await drain(engine, engine.config.dataset("inc"), dry_run=True)
    assert report.files_applied == 0
    assert [(f["inserted"], f["updated"], f["unchanged"]) for f in report.files] == [
        (2, 0, 0),
        (1, 1, 0),
    ]
    assert report.blocked is not None and report.blocked.key.endswith("10-10-00.csv")
    assert await conn.fetchval("SELECT count(*) FROM tickets.inc") == 0
    assert await conn.fetchval("SELECT count(*) FROM tickets.ingest_files") == 0
    assert await conn.fetchval("SELECT blocked_key FROM tickets.import_meta") is None
    assert len(bucket.keys("automations/inc/changes/")) == 3


async def test_two_drains_at_once_one_applies_one_skips(
    engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    for i in range(5):
        bucket.put(inc_key(f"2026-06-22T10-00-0{i}.csv"), csv_file(*(row(f"T{i}-{j}") for j in range(200))))
    a, b = await asyncio.gather(
        drain(engine, engine.config.dataset("inc")), drain(engine, engine.config.dataset("inc"))
    )
    assert sorted([a.locked, b.locked]) == [False, True]
    assert a.files_applied + b.files_applied == 5
    assert await conn.fetchval("SELECT count(*) FROM tickets.ingest_files") == 5


@both_servers
async def test_reseed_reapplies_everything_under_changes(
    engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    key = inc_key("2026-06-22T10-00-00.csv")
    bucket.put(key, csv_file(row("T1")))
    await drain(engine, engine.config.dataset("inc"))
    bucket.put(key, csv_file(row("T1")))  # the cutover copies files back into changes/
    await conn.execute("DELETE FROM tickets.inc")
    report = await drain(engine, engine.config.dataset("inc"), reseed=True)
    assert report.files_applied == 1 and report.rows_upserted == 1
    assert await conn.fetchval("SELECT count(*) FROM tickets.ingest_files") == 1


async def test_extra_columns_are_kept_in_raw(
    engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    from .conftest import HEADER

    body = HEADER + ',"new_col"\n' + row("T1") + ',"extra value"\n'
    bucket.put(inc_key("2026-06-22T10-00-00.csv"), body)
    report = await drain(engine, engine.config.dataset("inc"))
    assert report.ok
    raw = await conn.fetchval("SELECT raw->>'new_col' FROM tickets.inc WHERE ticket_id = 'T1'")
    assert raw == "extra value"


async def test_unreachable_bucket_fails_the_pass_at_list(config: Config, tmp_path: Path) -> None:
    from dataclasses import replace

    from fleetticketsd.database import db
    from fleetticketsd.metrics import Metrics

    from .conftest import free_port

    cfg = replace(
        config,
        s3=replace(config.s3, endpoint_url=f"http://127.0.0.1:{free_port()}", connect_timeout_s=0.5),
    )
    pool = await db.create_pool(cfg.database)
    try:
        async with S3Source(cfg.s3, max_attempts=1) as source:
            engine = Engine(cfg, pool, source, Metrics())
            report = await drain(engine, cfg.dataset("inc"))
    finally:
        await pool.close()
    assert report.failed_stage == "list" and "127.0.0.1" in (report.failed or "")
    assert engine.metrics.poll_failures.labels("inc", "list")._value.get() == 1


@both_servers
async def test_reseed_with_nothing_under_changes_is_refused(
    engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    bucket.put(inc_key("2026-06-22T10-00-00.csv"), csv_file(row("T1")))
    await drain(engine, engine.config.dataset("inc"))
    report = await drain(engine, engine.config.dataset("inc"), reseed=True)
    assert report.failed is not None and "reseed refused" in report.failed
    assert await conn.fetchval("SELECT count(*) FROM tickets.ingest_files") == 1
    assert report.watermark is None or report.watermark.endswith("10-00-00.csv")
    wm = await conn.fetchval(
        "SELECT metadata->>'source_max_key' FROM tickets.import_meta WHERE dataset='inc'"
    )
    assert wm == inc_key("2026-06-22T10-00-00.csv")


async def test_identical_content_in_a_newer_file_still_guards_against_a_late_one(
    engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    ds = engine.config.dataset("inc")
    bucket.put(inc_key("2026-06-22T10-00-00.csv"), csv_file(row("T1", raw_status="open")))
    await drain(engine, ds)
    updated_at = await conn.fetchval("SELECT updated_at FROM tickets.inc WHERE ticket_id = 'T1'")
    # A newer export carries T1 unchanged: not counted, content untouched, but it is
    # now the newest file that carried T1.
    newer = inc_key("2026-06-22T10-40-00.csv")
    bucket.put(newer, csv_file(row("T1", raw_status="open")))
    report = await drain(engine, ds)
    assert report.files_applied == 1 and report.rows_upserted == 0
    t1 = await ticket(conn, "T1")
    assert t1 is not None and t1["source_key"] == newer and t1["updated_at"] == updated_at
    # A late file between the two must not bring back its older state.
    bucket.put(inc_key("2026-06-22T10-20-00.csv"), csv_file(row("T1", raw_status="closed")))
    late = await drain(engine, ds)
    assert late.files_applied == 1 and late.rows_upserted == 0
    assert (await ticket(conn, "T1"))["raw_status"] == "OPEN"  # type: ignore[index]


async def test_values_the_schema_cannot_hold_never_fail_a_file(
    engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    body = csv_file(
        row("T1", created_at="0000-01-01 00:00:00", closed_at="9999-12-31 23:59:59", mttr="1e999"),
        row("T" * 3000),
    )
    bucket.put(inc_key("2026-06-22T10-00-00.csv"), body)
    report = await drain(engine, engine.config.dataset("inc"))
    assert report.ok and report.rows_upserted == 1 and report.rows_rejected == 1
    t1 = await ticket(conn, "T1")
    assert t1 is not None and t1["source_created_at"] is None and t1["mttr_minutes"] is None
    reason = await conn.fetchval("SELECT reason FROM tickets.ingest_rejects")
    assert reason == "ticket_id longer than 256 characters"


async def test_a_file_the_database_refuses_blocks_at_its_key(
    engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    # A generated column this file's value cannot satisfy stands in for any value the
    # schema refuses (SQLSTATE class 22): the same bytes would fail on every retry.
    await conn.execute(
        "ALTER TABLE tickets.inc ADD COLUMN owner_no int GENERATED ALWAYS AS ((raw->>'owner')::int) STORED"
    )
    bad = inc_key("2026-06-22T10-00-00.csv")
    bucket.put(bad, csv_file(row("T1", owner="not a number")))
    report = await drain(engine, engine.config.dataset("inc"))
    assert report.blocked is not None and report.blocked.key == bad
    assert "database rejected the file" in report.blocked.reason and report.failed is None
    assert await conn.fetchval("SELECT blocked_key FROM tickets.import_meta WHERE dataset = 'inc'") == bad


@both_servers
async def test_a_version_uploaded_after_the_listing_is_neither_read_nor_archived(
    engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    """The ETag pin holds on servers that ignore If-Match and CopySourceIfMatch (s3rver)
    as on those that honour them (moto, AWS, MinIO, RustFS)."""
    from fleetticketsd.ingest.source import SourceError

    ds = engine.config.dataset("inc")
    key = inc_key("2026-06-22T10-00-00.csv")
    bucket.put(key, csv_file(row("T1")))
    [listed] = await engine.source.list_changes(ds)
    fixed = csv_file(row("T1", owner="fixed"))
    bucket.put(key, fixed)  # re-uploaded after the listing
    with pytest.raises(SourceError) as err:
        async with engine.source.open(listed, 4096) as chunks:
            async for _ in chunks:
                pass
    assert "PreconditionFailed" in str(err.value)
    assert await engine.source.archive(ds, listed) is False
    assert bucket.keys("automations/inc/processed/") == []
    assert bucket.get(key) == fixed.encode()
    # The next pass applies the version that is there now.
    report = await drain(engine, ds)
    assert report.files_applied == 1
    row_ = await ticket(conn, "T1")
    assert row_ is not None and row_["owner"] == "fixed"


async def test_last_success_follows_another_process_forward_never_back(
    engine: Engine, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    """The gauge alerts page on: a success recorded by another replica (or by a drain
    from a shell) moves it on when status reads the database; an older one never
    takes it back."""
    upload_sample(bucket)
    assert (await drain(engine, engine.config.dataset("inc"))).ok
    gauge = ("fleettickets_last_success_timestamp_seconds", {"dataset": "inc"})
    mine = engine.metrics.registry.get_sample_value(*gauge)
    assert mine is not None

    async def recorded_elsewhere(at: str) -> float | None:
        await conn.execute(
            "UPDATE tickets.import_meta"
            " SET metadata = metadata || jsonb_build_object('last_success_at', $1::text)"
            " WHERE dataset = 'inc'",
            at,
        )
        await status(engine, engine.config.dataset("inc"))
        return engine.metrics.registry.get_sample_value(*gauge)

    assert await recorded_elsewhere("2020-01-01T00:00:00+00:00") == mine
    later = datetime.fromtimestamp(mine + 3600, UTC)
    assert await recorded_elsewhere(later.isoformat()) == later.timestamp()
    assert await recorded_elsewhere("2020-01-01T00:00:00+00:00") == later.timestamp()

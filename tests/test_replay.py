"""Recovery from a database restore (CONTRACT.md): the files a restored backup lacks are
in processed/; every pass applies them again, in name order, without an operator. And
`drain --reseed --from-archive` rebuilds a dataset from nothing.

The restore is real: `pg_dump -Fc` of the test's database part-way through the feed,
the rest of the feed applied, then the database dropped and restored from the dump
with `pg_restore` under the same name. "Right" means equal, row for row, to a fresh
database that applied the whole feed in order.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog

from fleetticketsd import feedgen
from fleetticketsd.config import Config
from fleetticketsd.ingest.drain import DrainReport, Engine, drain

from .conftest import Bucket, admin_sql, cloned_db, csv_file, engine_for, inc_key, row, run_cli
from .s3_fault_proxy import FaultProxy, fault_proxy

PG_BIN = Path("/usr/lib/postgresql/15/bin")
INC = "automations/inc/"
HISTORY = {"post_apply": ["capture_history"]}  # order-sensitive: closures as they happened


@pytest.fixture(scope="module")
def feed() -> list[tuple[str, bytes]]:
    """A baseline and 20 deltas: 21 files, in name order."""
    spec = feedgen.FeedSpec(dataset="inc", seed=41, baseline_rows=400, deltas=20, delta_rows=30)
    files = list(feedgen.generate(spec))
    assert len(files) == 21
    return files


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    with fault_proxy(s3_endpoint) as p:  # no faults: it records what the daemon asks for
        yield p


@pytest.fixture
def fresh_db(template_db: str) -> Iterator[str]:
    with cloned_db(template_db) as url:
        yield url


async def drain_inc(config: Config, **kw: Any) -> tuple[DrainReport, Engine, list[dict[str, Any]]]:
    async with engine_for(config) as engine:
        with structlog.testing.capture_logs() as logs:
            report = await drain(engine, config.dataset("inc"), **kw)
    return report, engine, logs


async def fetch(url: str, sql: str) -> list[Any]:
    conn = await asyncpg.connect(url)
    try:
        return [r[0] if len(r) == 1 else tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


TICKETS = "SELECT to_jsonb(t) - 'ingested_at' - 'updated_at' FROM tickets.inc t ORDER BY ticket_id"
CLOSURES = (
    "SELECT to_jsonb(e) - 'id' - 'observed_at' FROM tickets.closure_events e ORDER BY ticket_id, closed_at"
)
LEDGER = "SELECT key, status FROM tickets.ingest_files WHERE dataset = 'inc' ORDER BY applied_at, key"


async def contents(url: str) -> tuple[list[Any], list[Any]]:
    return await fetch(url, TICKETS), await fetch(url, CLOSURES)


def tool(name: str, *args: str) -> None:
    res = subprocess.run([str(PG_BIN / name), *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and not res.stderr, f"{name}: {res.stderr}"


def restore_in_place(db_url: str, dump: Path) -> None:
    """What the runbook says: drop, re-create empty, pg_restore, under the same name."""
    name = db_url.rsplit("/", 1)[1]
    admin_sql(f"DROP DATABASE {name} WITH (FORCE)")
    admin_sql(f"CREATE DATABASE {name}")
    tool("pg_restore", "--exit-on-error", f"--dbname={db_url}", str(dump))


async def in_order(
    feed: list[tuple[str, bytes]], make_config: Callable[..., Config], bucket: Bucket, url: str
) -> tuple[list[Any], list[Any]]:
    """The whole feed applied in order into a fresh database, from a bucket of its own."""
    other = f"{bucket.name}-fresh"
    bucket.client.create_bucket(Bucket=other)
    for name, data in feed:
        bucket.client.put_object(Bucket=other, Key=f"{INC}changes/{name}", Body=data)
    config = make_config(
        database={"url": url},
        s3={"bucket": other},
        datasets={"inc": {"prefix": INC, "table": "tickets.inc", **HISTORY}},
    )
    report, _, _ = await drain_inc(config)
    assert report.ok and report.files_applied == len(feed), report
    return await contents(url)


def put(bucket: Bucket, files: list[tuple[str, bytes]], where: str = "changes") -> None:
    for name, data in files:
        bucket.put(f"{INC}{where}/{name}", data)


async def test_after_a_restore_from_an_older_backup_the_pass_replays_what_the_backup_lacks_in_order(
    make_config: Callable[..., Config],
    bucket: Bucket,
    db_url: str,
    fresh_db: str,
    proxy: FaultProxy,
    feed: list[tuple[str, bytes]],
    tmp_path: Path,
) -> None:
    config = make_config(
        s3={"endpoint_url": proxy.endpoint},
        datasets={"inc": {"prefix": INC, "table": "tickets.inc", **HISTORY}},
    )
    put(bucket, feed[:8])
    first, _, _ = await drain_inc(config)
    assert first.ok and first.files_applied == 8
    dump = tmp_path / "after-8.dump"
    tool("pg_dump", "--format=custom", f"--file={dump}", f"--dbname={db_url}")
    put(bucket, feed[8:])
    rest, _, _ = await drain_inc(config)
    assert rest.ok and rest.files_applied == 13 and rest.files_replayed == 0
    assert len(bucket.keys(f"{INC}processed/")) == 21

    await asyncio.to_thread(restore_in_place, db_url, dump)
    assert await fetch(db_url, "SELECT count(*) FROM tickets.ingest_files") == [8]
    before = len(proxy.requests("list"))
    report, engine, logs = await drain_inc(config)

    assert report.ok and report.files_applied == 13 and report.files_replayed == 13, report
    assert report.watermark == f"{INC}changes/{feed[-1][0]}"
    replayed = engine.metrics.registry.get_sample_value(
        "fleettickets_replayed_files_total", {"dataset": "inc"}
    )
    assert replayed == 13
    warned = [e for e in logs if e["event"].startswith("file replayed from processed/")]
    assert len(warned) == 13 and {e["log_level"] for e in warned} == {"warning"}
    # Each of the 21 once in the ledger, under its changes/ key, applied in name order.
    ledger = await fetch(db_url, LEDGER)
    assert ledger == [(f"{INC}changes/{name}", "applied") for name, _ in feed]
    # Replayed files stay where they are; nothing waits in changes/.
    assert bucket.keys(f"{INC}processed/") == [f"{INC}processed/{name}" for name, _ in feed]
    assert bucket.keys(f"{INC}changes/") == []
    # processed/ was listed from the restored watermark on, never whole.
    listings = [s.target for s in proxy.requests("list")[before:] if f"prefix={INC}processed/" in s.target]
    assert listings and all(f"start-after={INC}processed/{feed[7][0]}" in t for t in listings), listings

    assert await contents(db_url) == await in_order(feed, make_config, bucket, fresh_db)

    # Steady state: nothing left to replay, and the listing after the watermark is empty.
    again, _, _ = await drain_inc(config)
    assert again.ok and again.files_applied == 0 and again.files_replayed == 0
    assert await fetch(db_url, "SELECT count(*) FROM tickets.ingest_files") == [21]


def processed_listings(proxy: FaultProxy, since: int) -> list[str]:
    return [s.target for s in proxy.requests("list")[since:] if f"prefix={INC}processed/" in s.target]


async def test_a_long_running_process_lists_processed_only_when_the_watermark_went_back(
    make_config: Callable[..., Config],
    bucket: Bucket,
    db_url: str,
    proxy: FaultProxy,
    feed: list[tuple[str, bytes]],
    tmp_path: Path,
) -> None:
    """As the daemon runs: one engine for every pass. A restore takes the watermark back,
    which is what makes a pass look in processed/; a steady-state pass makes one request
    fewer; a pass stopped part-way through a replay leaves the next one to look again."""
    config = make_config(
        s3={"endpoint_url": proxy.endpoint},
        # One file a commit, so that the stop below falls inside the replay.
        ingest={"commit_batch_files": 1},
        datasets={"inc": {"prefix": INC, "table": "tickets.inc", **HISTORY}},
    )
    inc = config.dataset("inc")
    async with engine_for(config) as engine:
        put(bucket, feed[:8])
        before = len(proxy.requests("list"))
        assert (await drain(engine, inc)).files_applied == 8
        assert processed_listings(proxy, before), "a process's first pass looks"
        dump = tmp_path / "after-8.dump"
        tool("pg_dump", "--format=custom", f"--file={dump}", f"--dbname={db_url}")
        put(bucket, feed[8:])
        before = len(proxy.requests("list"))
        assert (await drain(engine, inc)).files_applied == 13
        assert (await drain(engine, inc)).files_applied == 0
        assert processed_listings(proxy, before) == [], "steady state: the watermark only moved on"

        await asyncio.to_thread(restore_in_place, db_url, dump)
        await engine.pool.expire_connections()
        stop = asyncio.Event()

        def progress(_ds: object, done: int, _total: int, _result: object) -> None:
            if done >= 5:
                stop.set()

        before = len(proxy.requests("list"))
        cut = await drain(engine, inc, stop=stop, progress=progress)
        assert cut.ok and 5 <= cut.files_replayed < 13, cut
        assert processed_listings(proxy, before), "the watermark went back: the pass looks"
        before = len(proxy.requests("list"))
        rest = await drain(engine, inc)
        assert rest.ok and cut.files_replayed + rest.files_replayed == 13, rest
        assert processed_listings(proxy, before), "the last pass stopped part-way: this one looks again"
        before = len(proxy.requests("list"))
        assert (await drain(engine, inc)).files_applied == 0
        assert processed_listings(proxy, before) == []
    ledger = await fetch(db_url, LEDGER)
    assert ledger == [(f"{INC}changes/{name}", "applied") for name, _ in feed]


async def test_replayed_files_merge_with_waiting_changes_in_name_order_and_a_name_in_both_is_applied_once(
    make_config: Callable[..., Config],
    bucket: Bucket,
    db_url: str,
    fresh_db: str,
    feed: list[tuple[str, bytes]],
    tmp_path: Path,
) -> None:
    files = feed[:10]
    config = make_config(datasets={"inc": {"prefix": INC, "table": "tickets.inc", **HISTORY}})
    put(bucket, files[:3])
    assert (await drain_inc(config))[0].files_applied == 3
    dump = tmp_path / "after-3.dump"
    tool("pg_dump", "--format=custom", f"--file={dump}", f"--dbname={db_url}")
    put(bucket, files[3:7])
    assert (await drain_inc(config))[0].files_applied == 4
    await asyncio.to_thread(restore_in_place, db_url, dump)
    # Meanwhile files 8-10 wait under changes/, and file 6 is in both places (a move
    # cut between its copy and its delete).
    put(bucket, files[7:])
    put(bucket, files[5:6])
    report, _, _ = await drain_inc(config)
    assert report.ok and report.files_applied == 7 and report.files_replayed == 3, report
    ledger = await fetch(db_url, LEDGER)
    assert ledger == [(f"{INC}changes/{n}", "applied") for n, _ in files]
    assert bucket.keys(f"{INC}changes/") == []
    assert bucket.keys(f"{INC}processed/") == [f"{INC}processed/{n}" for n, _ in files]
    assert await contents(db_url) == await in_order(files, make_config, bucket, fresh_db)


async def test_no_watermark_yet_does_not_replay_the_archive_and_names_the_command_that_would(
    make_config: Callable[..., Config], bucket: Bucket, db_url: str, feed: list[tuple[str, bytes]]
) -> None:
    put(bucket, feed[:3], "processed")  # a used bucket, a new database
    bucket.put(inc_key("2026-06-22T18-00-00.csv"), csv_file(row("NEW-1")))
    config = make_config()
    report, _, logs = await drain_inc(config)
    assert report.ok and report.files_applied == 1 and report.files_replayed == 0, report
    warned = [e for e in logs if e["event"].startswith("no watermark yet, but processed/ holds files")]
    assert len(warned) == 1 and warned[0]["log_level"] == "warning"
    assert "`fleetticketsd drain --reseed --from-archive --dataset inc`" in warned[0]["event"]
    assert await fetch(db_url, "SELECT ticket_id FROM tickets.inc") == ["NEW-1"]
    # From now on the watermark is newer than the whole archive: nothing to replay, no warning.
    report, _, logs = await drain_inc(config)
    assert report.files_applied == 0 and not [e for e in logs if e["event"].startswith("no watermark")]


def test_reseed_from_archive_rebuilds_the_dataset_from_nothing_from_processed_and_changes(
    make_config: Callable[..., Config],
    cli_env: Callable[..., dict[str, str]],
    bucket: Bucket,
    db_url: str,
    fresh_db: str,
    feed: list[tuple[str, bytes]],
) -> None:
    datasets = {"inc": {"prefix": INC, "table": "tickets.inc", **HISTORY}}
    env = cli_env(datasets=datasets)
    put(bucket, feed[:15])
    assert run_cli("drain", "--dataset", "inc", env=env).returncode == 0
    put(bucket, feed[15:])  # still waiting under changes/
    # The table went wrong (a bad manual fix, a buggy hook): rows lost and changed.
    asyncio.run(
        fetch(
            db_url,
            "DELETE FROM tickets.inc WHERE ticket_id IN "
            "(SELECT ticket_id FROM tickets.inc LIMIT 50) RETURNING 1",
        )
    )
    asyncio.run(fetch(db_url, 'UPDATE tickets.inc SET raw = raw || \'{"owner": "nobody"}\' RETURNING 1'))

    no = run_cli("drain", "--dataset", "inc", "--from-archive", env=env)
    assert no.returncode == 2 and "--from-archive goes with --reseed" in no.stderr

    dry = run_cli("drain", "--dataset", "inc", "--reseed", "--from-archive", "--dry-run", "--json", env=env)
    assert dry.returncode == 0, dry.stderr
    assert len(json.loads(dry.stdout)["datasets"]["inc"]["files"]) == 21
    assert asyncio.run(fetch(db_url, "SELECT count(*) FROM tickets.ingest_files")) == [15]

    res = run_cli("drain", "--dataset", "inc", "--reseed", "--from-archive", "--json", env=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)["datasets"]["inc"]
    assert out["files_applied"] == 21 and out["watermark"] == f"{INC}changes/{feed[-1][0]}", out
    assert "Traceback" not in res.stderr
    ledger = asyncio.run(fetch(db_url, LEDGER))
    assert ledger == [(f"{INC}changes/{name}", "applied") for name, _ in feed]
    assert bucket.keys(f"{INC}changes/") == []
    assert bucket.keys(f"{INC}processed/") == [f"{INC}processed/{name}" for name, _ in feed]
    assert asyncio.run(contents(db_url)) == asyncio.run(in_order(feed, make_config, bucket, fresh_db))


def test_reseed_from_archive_with_nothing_anywhere_is_refused_and_changes_nothing(
    cli_env: Callable[..., dict[str, str]], bucket: Bucket, db_url: str
) -> None:
    env = cli_env()
    bucket.put(inc_key("2026-06-22T10-00-00.csv"), csv_file(row("T1")))
    assert run_cli("drain", "--dataset", "inc", env=env).returncode == 0
    bucket.delete(f"{INC}processed/2026-06-22T10-00-00.csv")
    res = run_cli("drain", "--dataset", "inc", "--reseed", "--from-archive", env=env)
    assert res.returncode == 1
    assert f"FAILED (list): reseed refused: nothing under {INC}processed/ or {INC}changes/" in res.stdout
    assert asyncio.run(fetch(db_url, "SELECT count(*) FROM tickets.inc")) == [1]
    assert asyncio.run(fetch(db_url, "SELECT count(*) FROM tickets.ingest_files")) == [1]

"""Correctness under pipelining: prefetch ahead and archive behind never change the outcome."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from fleetticketsd.config import Config
from fleetticketsd.database import db
from fleetticketsd.ingest.drain import DrainReport, Engine, drain
from fleetticketsd.ingest.source import ChangeFile, S3Source, SourceError
from fleetticketsd.metrics import Metrics

from .conftest import REPO, Bucket, apoll, csv_file, inc_key, poll, row, spawn_cli

# The S3-facing core: every test here runs against moto and against s3rver (conftest).
pytestmark = pytest.mark.s3_servers


def name(i: int) -> str:
    return f"2026-06-22T10-{i // 60:02d}-{i % 60:02d}.csv"


@contextlib.asynccontextmanager
async def engine_with(make_config: Callable[..., Config], **ingest: int) -> AsyncIterator[Engine]:
    cfg = make_config(ingest={"read_chunk_bytes": 4096, **ingest})
    pool = await db.create_pool(cfg.database)
    try:
        async with S3Source(cfg.s3) as source:
            yield Engine(cfg, pool, source, Metrics())
    finally:
        await pool.close()


async def test_prefetch_never_reorders_applies(
    make_config: Callable[..., Config], bucket: Bucket, conn: asyncpg.Connection
) -> None:
    # Early files are big, later ones tiny: the later ones arrive first.
    n = 30
    for i in range(n):
        rows = [row(f"T{j}", owner=f"file-{i}") for j in range(300 if i % 3 == 0 else 1)]
        bucket.put(inc_key(name(i)), csv_file(*rows))
    async with engine_with(make_config, prefetch_files=8) as engine:
        report = await drain(engine, engine.config.dataset("inc"))
    assert report.ok and report.files_applied == n
    order = await conn.fetch("SELECT key FROM tickets.ingest_files ORDER BY applied_at, key")
    assert [r["key"] for r in order] == [inc_key(name(i)) for i in range(n)]
    # T0 is in every file: the last file's value won, so applies happened in name order.
    assert await conn.fetchval("SELECT owner FROM tickets.inc WHERE ticket_id = 'T0'") == f"file-{n - 1}"
    assert await conn.fetchval("SELECT owner FROM tickets.inc WHERE ticket_id = 'T299'") == "file-27"
    assert bucket.keys("automations/inc/changes/") == []
    assert len(bucket.keys("automations/inc/processed/")) == n


async def test_a_file_larger_than_the_window_is_streamed(
    make_config: Callable[..., Config], bucket: Bucket, conn: asyncpg.Connection
) -> None:
    bucket.put(inc_key(name(0)), csv_file(row("S")))
    bucket.put(inc_key(name(1)), csv_file(*(row(f"B{j}") for j in range(2000))))
    bucket.put(inc_key(name(2)), csv_file(row("S", owner="last")))
    async with engine_with(make_config, prefetch_bytes=50_000) as engine:
        report = await drain(engine, engine.config.dataset("inc"))
    assert report.ok and report.files_applied == 3
    assert await conn.fetchval("SELECT count(*) FROM tickets.inc") == 2001
    assert await conn.fetchval("SELECT owner FROM tickets.inc WHERE ticket_id = 'S'") == "last"


async def test_fetch_error_on_a_later_file_does_not_stop_earlier_ones(
    make_config: Callable[..., Config],
    bucket: Bucket,
    conn: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for i in range(4):
        bucket.put(inc_key(name(i)), csv_file(row(f"T{i}")))
    broken = inc_key(name(2))
    real_open = S3Source.open

    @contextlib.asynccontextmanager
    async def flaky_open(
        self: S3Source, f: ChangeFile, chunk_bytes: int
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        if f.key == broken:
            from botocore.exceptions import EndpointConnectionError

            raise SourceError("get", f.key, EndpointConnectionError(endpoint_url="s3"))
        async with real_open(self, f, chunk_bytes) as chunks:
            yield chunks

    monkeypatch.setattr(S3Source, "open", flaky_open)
    async with engine_with(make_config) as engine:
        report = await drain(engine, engine.config.dataset("inc"))
        assert report.failed_stage == "fetch" and broken in (report.failed or "")
        assert report.files_applied == 2 and report.watermark == inc_key(name(1))
        assert await conn.fetchval("SELECT count(*) FROM tickets.inc") == 2
        assert bucket.keys("automations/inc/changes/") == [broken, inc_key(name(3))]
        monkeypatch.undo()

        async def unlocked_pass() -> DrainReport | None:
            # The failed pass ended its session; the server frees that session's dataset
            # lock once the backend has gone, which can take a moment after the cut.
            report = await drain(engine, engine.config.dataset("inc"))
            return None if report.locked else report

        again = await apoll(unlocked_pass, what="a pass after the failed one's session ended")
    assert again.ok and again.files_applied == 2
    assert await conn.fetchval("SELECT count(*) FROM tickets.ingest_files") == 4


async def test_archive_failure_is_retried_next_pass_without_reapply(
    make_config: Callable[..., Config],
    bucket: Bucket,
    conn: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for i in range(6):
        bucket.put(inc_key(name(i)), csv_file(row(f"T{i}")))
    real_archive = S3Source.copy_to_processed
    failing = {inc_key(name(1)), inc_key(name(4))}

    async def flaky_archive(self: S3Source, dataset: object, f: ChangeFile) -> bool:
        if f.key in failing:
            from botocore.exceptions import EndpointConnectionError

            raise SourceError("copy", f.key, EndpointConnectionError(endpoint_url="s3"))
        return await real_archive(self, dataset, f)  # type: ignore[arg-type]

    monkeypatch.setattr(S3Source, "copy_to_processed", flaky_archive)
    async with engine_with(make_config) as engine:
        first = await drain(engine, engine.config.dataset("inc"))
        assert first.ok and first.files_applied == 6
        assert bucket.keys("automations/inc/changes/") == sorted(failing)
        assert engine.metrics.archive_pending.labels("inc")._value.get() == 2
        await conn.execute('UPDATE tickets.inc SET raw = raw || \'{"owner": "kept"}\'')
        monkeypatch.undo()
        second = await drain(engine, engine.config.dataset("inc"))
        assert second.ok and second.files_applied == 0
        assert engine.metrics.archive_pending.labels("inc")._value.get() == 0
    assert bucket.keys("automations/inc/changes/") == []
    assert len(bucket.keys("automations/inc/processed/")) == 6
    assert await conn.fetchval("SELECT count(*) FROM tickets.inc WHERE owner <> 'kept'") == 0
    assert await conn.fetchval("SELECT count(*) FROM tickets.ingest_files") == 6


def test_kill_during_a_pipelined_drain_then_the_next_pass_completes(
    cli_env: Callable[..., dict[str, str]], bucket: Bucket, db_url: str, tmp_path: Path
) -> None:
    from .test_cli import fetch

    n = 120
    for i in range(n):
        bucket.put(inc_key(name(i)), csv_file(*(row(f"T{i}-{j}", owner=str(i)) for j in range(50))))
    env = cli_env(logging={"format": "json"}, ingest={"prefetch_files": 8})
    log_path = tmp_path / "drain.log"
    proc = spawn_cli("drain", env=env, log_path=log_path)
    poll(lambda: log_path.read_text().count('"file applied"') >= 10, what="ten files applied")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    applied = fetch(db_url, "SELECT count(*) AS n FROM tickets.ingest_files")[0]["n"]
    assert 10 <= applied < n
    # Every committed file is whole: 50 rows per applied file, none of a half file.
    assert fetch(db_url, "SELECT count(*) AS n FROM tickets.inc")[0]["n"] == 50 * applied
    res = subprocess.run(
        [sys.executable, "-m", "fleetticketsd", "drain", "--json"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["datasets"]["inc"]["files_applied"] == n - applied
    assert fetch(db_url, "SELECT count(*) AS n FROM tickets.ingest_files")[0]["n"] == n
    assert fetch(db_url, "SELECT count(*) AS n FROM tickets.inc")[0]["n"] == 50 * n
    assert bucket.keys("automations/inc/changes/") == []


async def test_archive_deletes_are_batched_and_a_failed_delete_is_finished_next_pass(
    make_config: Callable[..., Config],
    bucket: Bucket,
    conn: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n = 40
    for i in range(n):
        bucket.put(inc_key(name(i)), csv_file(row(f"T{i}")))
    real_delete_many = S3Source.delete_many
    requests: list[list[str]] = []
    refused = inc_key(name(7))

    async def recording_delete_many(self: S3Source, keys: list[str]) -> dict[str, SourceError]:
        from botocore.exceptions import ClientError

        requests.append(keys)
        failed = await real_delete_many(self, [k for k in keys if k != refused])
        if refused in keys:
            error = {"Error": {"Code": "AccessDenied", "Message": "by the test"}}
            denied = ClientError(error, "DeleteObjects")
            failed[refused] = SourceError("delete", refused, denied)
        return failed

    monkeypatch.setattr(S3Source, "delete_many", recording_delete_many)
    async with engine_with(make_config) as engine:
        first = await drain(engine, engine.config.dataset("inc"))
        assert first.ok and first.files_applied == n
        # Every original deleted, in fewer requests than files; the refused one is
        # copied to processed/ but still under changes/, and counted as not moved.
        assert sorted(k for keys in requests for k in keys) == sorted(inc_key(name(i)) for i in range(n))
        assert len(requests) < n
        assert bucket.keys("automations/inc/changes/") == [refused]
        assert engine.metrics.archive_pending.labels("inc")._value.get() == 1
        monkeypatch.undo()
        second = await drain(engine, engine.config.dataset("inc"))
    assert second.ok and second.files_applied == 0
    assert bucket.keys("automations/inc/changes/") == []
    assert len(bucket.keys("automations/inc/processed/")) == n
    assert await conn.fetchval("SELECT count(*) FROM tickets.ingest_files") == n
    print(f"\n{n} moves, {len(requests)} delete requests")


async def test_endpoint_resolution_is_cached_across_keys_and_requests_still_reach_the_bucket(
    make_config: Callable[..., Config], bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore evaluates S3's endpoint rules behind a cache keyed by every parameter,
    Key included (source.cache_endpoints): with the parameters the rules never read left
    out, 40 objects cost one evaluation, and every request still lands where it should."""
    import botocore.endpoint_provider

    evaluations = 0
    real = botocore.endpoint_provider.RuleSet.evaluate

    def counted(self: object, *args: object, **kwargs: object) -> object:
        nonlocal evaluations
        evaluations += 1
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    for i in range(20):
        bucket.put(inc_key(name(i)), csv_file(row(f"T{i}")))
    # Counted from here: the test's own puts above go through boto3, uncached.
    monkeypatch.setattr(botocore.endpoint_provider.RuleSet, "evaluate", counted)
    async with engine_with(make_config) as engine:
        report = await drain(engine, engine.config.dataset("inc"))
    assert report.ok and report.files_applied == 20
    assert len(bucket.keys("automations/inc/processed/")) == 20
    assert bucket.keys("automations/inc/changes/") == []
    # Listings, 20 GETs, 20 copies, deletes: one evaluation per operation's distinct
    # parameters (a handful), not one per request.
    assert evaluations <= 8, evaluations

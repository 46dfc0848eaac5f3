"""`fleetticketsd run` as a process: probes, metrics, SIGHUP, SIGTERM, database outages."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fleetticketsd import feedgen

from .conftest import REPO, Bucket, Daemon, admin_sql, csv_file, inc_key, poll, row, to_toml


@pytest.mark.s3_servers
def test_drains_on_start_serves_probes_and_reports_lag(
    start_daemon: Callable[..., tuple[Daemon, dict[str, Any]]], bucket: Bucket, db_url: str
) -> None:
    bucket.put(inc_key("2026-06-22T10-00-00.csv"), csv_file(row("T1"), row("T2")))
    bucket.put(inc_key("2026-06-22T10-05-00.csv"), csv_file(row("T1", owner="X"), "bad,row"))
    # Files that land later wait for the cron (which sleeps here): drain_on_arrival off.
    d, _ = start_daemon(daemon={"drain_on_arrival": False})
    # The pass is over (not just its files) once its duration is observed.
    poll(lambda: d.metric("fleettickets_poll_duration_seconds_count", dataset="inc"), what="first pass")
    assert d.metric("fleettickets_files_applied_total", dataset="inc") == 2
    assert d.metric("fleettickets_rows_upserted_total", dataset="inc") == 3
    assert d.metric("fleettickets_rows_rejected_total", dataset="inc", reason="wrong_field_count") == 1
    assert d.metric("fleettickets_source_lag_seconds", dataset="inc") == 0
    assert d.metric("fleettickets_pending_files", dataset="inc") == 0
    assert d.metric("fleettickets_dataset_blocked", dataset="inc") == 0
    assert d.metric("fleettickets_last_success_timestamp_seconds", dataset="inc")
    assert d.metric("fleettickets_build_info", version="0.1.0") == 1
    wm = d.metric("fleettickets_watermark_timestamp_seconds", dataset="inc")
    assert wm == 1782111900.0  # 2026-06-22T10:05:00 EAT = 07:05 UTC
    status, body = d.get("/readyz")
    assert status == 200 and json.loads(body)["checks"] == {
        "config": "ok",
        "database": "ok",
        "migrations": "ok",
    }

    # A newer file lands: the source watcher reports lag while the cron sleeps.
    bucket.put(inc_key("2026-06-22T12-05-00.csv"), csv_file(row("T3")))
    poll(lambda: d.metric("fleettickets_source_lag_seconds", dataset="inc") == 7200, what="lag 2 h")
    assert d.metric("fleettickets_pending_files", dataset="inc") == 1
    assert d.metric("fleettickets_newest_source_timestamp_seconds", dataset="inc") == wm + 7200

    # Every line is JSON; every line of a pass carries its dataset, file lines their key.
    logs = d.logs()
    assert logs and not [e for e in logs if e.get("unparsed")]
    applied = d.logged("file applied")
    assert len(applied) == 2 and all(
        e["dataset"] == "inc" and e["key"].startswith("automations/inc/") for e in applied
    )
    assert all(e.get("dataset") for e in logs if e.get("logger") == "fleetticketsd.ingest.drain")


def test_metrics_pass_promtool_lint(start_daemon: Callable[..., tuple[Daemon, dict[str, Any]]]) -> None:
    import shutil

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    d, _ = start_daemon()
    poll(lambda: d.metric("fleettickets_poll_duration_seconds_count", dataset="inc"), what="first pass")
    _, body = d.get("/metrics")
    lint = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_sighup_broken_config_keeps_running_then_valid_reload_adds_dataset_and_cron(
    start_daemon: Callable[..., tuple[Daemon, dict[str, Any]]], bucket: Bucket
) -> None:
    d, data = start_daemon()
    poll(lambda: d.metric("fleettickets_poll_duration_seconds_count", dataset="inc"), what="first pass")
    assert d.metric("fleettickets_config_last_reload_successful") == 1

    d.config_path.write_text(to_toml(data) + "\n[datasets.inc\nbroken = \n")
    d.signal(signal.SIGHUP)
    poll(lambda: d.metric("fleettickets_config_last_reload_successful") == 0, what="reload failure")
    assert d.proc.poll() is None and d.get("/healthz")[0] == 200
    typo = {**data, "datasets": {**data["datasets"], "crq": {**data["datasets"]["crq"], "tabel": "x"}}}
    d.write_config(typo)
    d.signal(signal.SIGHUP)
    poll(
        lambda: d.logged("config reload failed; keeping the running configuration", key="datasets.crq.tabel")
    )

    # A table that does not exist fails the reload too, naming the key.
    missing = {
        **data,
        "datasets": {**data["datasets"], "crq": {**data["datasets"]["crq"], "table": "tickets.nosuch"}},
    }
    d.write_config(missing)
    d.signal(signal.SIGHUP)
    poll(
        lambda: d.logged("config reload failed; keeping the running configuration", key="datasets.crq.table")
    )
    assert d.metric("fleettickets_config_last_reload_successful") == 0

    # Valid: a new dataset drains at once, and a changed cron is rescheduled.
    bucket.put("automations/new/changes/2026-06-22T10-00-00.csv", csv_file(row("N1")))
    data["datasets"]["new"] = {"prefix": "automations/new/", "table": "tickets.newds"}
    data["datasets"]["crq"]["cron"] = "*/7 * * * *"
    _create_table("newds", data["database"]["url"])
    d.write_config(data)
    before = d.metric("fleettickets_config_last_reload_success_timestamp_seconds") or 0
    d.signal(signal.SIGHUP)
    poll(lambda: d.metric("fleettickets_config_last_reload_successful") == 1, what="reload ok")
    assert (d.metric("fleettickets_config_last_reload_success_timestamp_seconds") or 0) > before
    poll(lambda: d.metric("fleettickets_files_applied_total", dataset="new") == 1, what="new dataset drained")
    assert d.logged("rescheduled", dataset="crq", cron="*/7 * * * *")

    # Removing a dataset drops its series.
    del data["datasets"]["new"]
    d.write_config(data)
    d.signal(signal.SIGHUP)
    poll(lambda: d.metric("fleettickets_files_applied_total", dataset="new") is None, what="series removed")


def test_a_landed_file_is_committed_within_the_check_interval_and_its_delay_is_exported(
    start_daemon: Callable[..., tuple[Daemon, dict[str, Any]]], bucket: Bucket, db_url: str
) -> None:
    interval_s = 2.0
    d, _ = start_daemon(daemon={"source_check_interval_s": interval_s})  # the cron never fires
    poll(lambda: d.metric("fleettickets_poll_duration_seconds_count", dataset="inc"), what="first pass")
    assert d.metric("fleettickets_apply_delay_seconds_count", dataset="inc") == 0
    for n in range(2):  # the second lands while nothing runs, as the first did
        # Named as the export names it: its start time, in EAT, to the second.
        key = inc_key(feedgen.file_name(feedgen.now_eat()))
        landed = time.monotonic()
        bucket.put(key, csv_file(row(f"T{n}")))
        poll(
            lambda key=key: sql_rows(db_url, "SELECT 1 FROM tickets.ingest_files WHERE key = $1", key),
            timeout_s=interval_s + 10,
            interval_s=0.05,
            what=f"{key} committed",
        )
        took = time.monotonic() - landed
        assert took <= interval_s + 1, f"committed {took:.2f} s after it landed"
        poll(lambda n=n: d.metric("fleettickets_apply_delay_seconds_count", dataset="inc") == n + 1)
        # The name is the time to the second, before the put: the delay is the wait, and < 1 s more.
        delay = d.metric("fleettickets_apply_delay_seconds_sum", dataset="inc")
        assert delay is not None and delay <= (n + 1) * (interval_s + 2), delay
        # The next file needs a later name (names have one-second resolution).
        poll(lambda key=key: inc_key(feedgen.file_name(feedgen.now_eat())) != key, what="a new second")
    assert d.logged("files pending: draining now", dataset="inc")
    assert d.metric("fleettickets_files_applied_total", dataset="inc") == 2


def sql_rows(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    return asyncio.run(go())


@pytest.mark.s3_servers
def test_a_skip_from_a_shell_clears_the_daemons_blocked_gauge(
    start_daemon: Callable[..., tuple[Daemon, dict[str, Any]]], bucket: Bucket
) -> None:
    bad = inc_key("2026-06-22T10-00-00.csv")
    bucket.put(bad, b"not the feed")
    d, _ = start_daemon()
    poll(lambda: d.metric("fleettickets_dataset_blocked", dataset="inc") == 1, what="blocked")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "RUSTFS_"))}
    res = subprocess.run(
        [sys.executable, "-m", "fleetticketsd", "--config", str(d.config_path), "skip", "--dataset", "inc",
         bad, "--reason", "test"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    # The cron sleeps; the source watcher reads the block state from the database.
    poll(lambda: d.metric("fleettickets_dataset_blocked", dataset="inc") == 0, what="unblocked")


def _create_table(name: str, url: str) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("SELECT tickets.create_dataset_table($1)", name)
        finally:
            await conn.close()

    asyncio.run(go())


def test_database_outage_readyz_fails_then_pass_resumes(
    start_daemon: Callable[..., tuple[Daemon, dict[str, Any]]], bucket: Bucket, db_url: str
) -> None:
    dbname = db_url.rsplit("/", 1)[1]
    d, _ = start_daemon(schedule={"cron": "*/2 * * * * *"}, daemon={"pass_retry_attempts": 2})
    poll(lambda: d.metric("fleettickets_poll_duration_seconds_count", dataset="inc"), what="first pass")
    admin_sql(f"ALTER DATABASE {dbname} ALLOW_CONNECTIONS false")
    admin_sql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{dbname}'")
    try:
        status = poll(lambda: (s := d.get("/readyz"))[0] == 503 and s, what="readyz 503")
        assert json.loads(status[1])["checks"]["database"] != "ok"
        bucket.put(inc_key("2026-06-22T10-00-00.csv"), csv_file(row("T1")))
        poll(lambda: (d.metric("fleettickets_poll_failures_total", dataset="inc", stage="apply") or 0) >= 1)
        assert d.get("/healthz")[0] == 200  # liveness does not depend on the database
    finally:
        admin_sql(f"ALTER DATABASE {dbname} ALLOW_CONNECTIONS true")
    poll(lambda: d.get("/readyz")[0] == 200, what="readyz 200 again")
    poll(lambda: d.metric("fleettickets_files_applied_total", dataset="inc") == 1, what="file applied")
    # The archive move follows the commit the counter reports (pipeline.py): wait for it.
    poll(lambda: bucket.keys("automations/inc/changes/") == [], what="file archived")


def _big_file(tmp_path: Path, rows: int) -> bytes:
    spec = feedgen.FeedSpec(dataset="inc", seed=7, baseline_rows=rows, sentinel=False)
    path = tmp_path / "big.csv"
    with path.open("wb") as fh:
        feedgen.write_rows(fh, spec, rows)
    return path.read_bytes()


async def _counts(db_url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(db_url)
    try:
        return (
            await conn.fetchval("SELECT count(*) FROM tickets.inc"),
            await conn.fetchval("SELECT count(*) FROM tickets.ingest_files"),
        )
    finally:
        await conn.close()


@pytest.mark.parametrize("grace_s", [60.0, 0.2], ids=["finishes-in-grace", "rolled-back-after-grace"])
def test_sigterm_during_a_large_file_is_all_or_nothing(
    start_daemon: Callable[..., tuple[Daemon, dict[str, Any]]],
    bucket: Bucket,
    db_url: str,
    tmp_path: Path,
    grace_s: float,
) -> None:
    key = inc_key("2026-06-22T10-00-00.csv")
    bucket.put(key, _big_file(tmp_path, 150_000))
    bucket.put(inc_key("2026-06-22T10-05-00.csv"), csv_file(row("AFTER")))
    d, _ = start_daemon(daemon={"shutdown_grace_period_s": grace_s})
    poll(lambda: d.logged("applying file", key=key), what="file in flight")
    d.signal(signal.SIGTERM)
    assert d.proc.wait(90) == 0
    rows, files = asyncio.run(_counts(db_url))
    if grace_s > 1:
        assert files == 1 and rows > 50_000  # the file committed; the next one waits
    else:
        assert (rows, files) == (0, 0)  # cancelled: rolled back as a whole
    assert d.logged("stopped", exit_code=0)


def test_a_real_prometheus_scrapes_the_daemon(
    start_daemon: Callable[..., tuple[Daemon, dict[str, Any]]], bucket: Bucket, tmp_path: Path
) -> None:
    import shutil

    from .conftest import free_port

    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus not installed (Debian package prometheus)")
    bucket.put(inc_key("2026-06-22T10-00-00.csv"), csv_file(row("T1")))
    d, _ = start_daemon()
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: fleetticketsd\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{d.port}']\n"
    )
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def query(q: str) -> list[dict[str, Any]]:
            url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
            with urllib.request.urlopen(url, timeout=5) as resp:
                return list(json.load(resp)["data"]["result"])

        up = poll(lambda: query('up{job="fleetticketsd"} == 1'), timeout_s=60, what="prometheus scrape")
        assert up[0]["metric"]["instance"] == f"127.0.0.1:{d.port}"
        applied = poll(lambda: query('fleettickets_files_applied_total{dataset="inc"} == 1'), timeout_s=30)
        assert applied[0]["value"][1] == "1"
        assert query('fleettickets_source_lag_seconds{dataset="inc"}')[0]["value"][1] == "0"
    finally:
        proc.terminate()
        proc.wait(30)

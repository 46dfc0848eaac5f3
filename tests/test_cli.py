"""The command line as a user runs it: exit codes, JSON shapes, error messages."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fleetticketsd import feedgen

from .conftest import REPO, SAMPLE, Bucket, csv_file, inc_key, poll, row, run_cli, spawn_cli


async def _fetch(db_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def fetch(db_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    return asyncio.run(_fetch(db_url, sql, *args))


def test_drain_json_and_status_json(cli_env: Callable[..., dict[str, str]], bucket: Bucket) -> None:
    env = cli_env()
    for path in sorted((SAMPLE / "inc" / "changes").glob("*.csv")):
        bucket.put(inc_key(path.name), path.read_bytes())
    bucket.put(inc_key("2026-06-22T17-20-00.csv"), csv_file())  # header-only: counted
    res = run_cli("drain", "--json", env=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    inc = out["datasets"]["inc"]
    assert inc["files_applied"] == 5 and inc["blocked"] is None
    assert inc["watermark"] == inc_key("2026-06-22T17-20-00.csv")
    assert inc["rows_upserted"] > 40 and inc["rows_rejected"] == 0
    assert out["datasets"]["crq"] == {
        "files_applied": 0, "rows_upserted": 0, "rows_rejected": 0, "blocked": None, "watermark": None,
    }  # fmt: skip

    bucket.put(inc_key("2026-06-22T19-20-00.csv"), csv_file(row("T1")))
    st = run_cli("status", "--json", env=env)
    assert st.returncode == 0, st.stderr
    s = json.loads(st.stdout)["datasets"]["inc"]
    assert s["watermark"] == inc_key("2026-06-22T17-20-00.csv")
    assert s["newest_key"] == inc_key("2026-06-22T19-20-00.csv")
    assert s["pending_files"] == 1 and s["lag_seconds"] == 7200 and s["blocked"] is None
    assert s["last_applied_at"].startswith("20")
    human = run_cli("status", env=env)
    assert human.returncode == 0, human.stderr
    assert re.search(r"pending files\s+1\n", human.stdout) and re.search(r"lag\s+2\.0h\n", human.stdout)
    assert "last pass" in human.stdout and ", ok" in human.stdout


def test_status_without_the_bucket_reports_the_last_listing_and_exits_0(
    cli_env: Callable[..., dict[str, str]], bucket: Bucket
) -> None:
    from .conftest import free_port

    env = cli_env()
    bucket.put(inc_key("2026-06-22T10-00-00.csv"), csv_file(row("T0")))
    bad = inc_key("2026-06-22T12-00-00.csv")
    bucket.put(bad, b"\xff\xfe not csv")
    assert run_cli("drain", env=env).returncode == 1  # applies 10-00, blocks at 12-00

    gone = cli_env(s3={"endpoint_url": f"http://127.0.0.1:{free_port()}", "connect_timeout_s": 0.5})
    res = run_cli("status", "--json", env=gone)
    assert res.returncode == 0, res.stderr  # CONTRACT: status exits 0
    inc = json.loads(res.stdout)["datasets"]["inc"]
    assert inc == {
        "watermark": inc_key("2026-06-22T10-00-00.csv"),
        "newest_key": inc_key("2026-06-22T12-00-00.csv"),
        "pending_files": 1,
        "lag_seconds": 7200,
        "blocked": inc["blocked"],
        "last_applied_at": inc["last_applied_at"],
    }
    assert inc["blocked"]["key"] == bad and inc["last_applied_at"].startswith("20")
    # One line for the one unreachable bucket, naming the datasets it holds back.
    assert re.search(r"fleetticketsd: inc, crq: cannot reach bucket", res.stderr), res.stderr
    assert res.stderr.count("fleetticketsd: ") == 1 and "as the last listing saw them" in res.stderr
    assert "Traceback" not in res.stderr
    human = run_cli("status", env=gone)
    assert human.returncode == 0 and "UNREACHABLE; figures as last listed (" in human.stdout
    assert re.search(r"pending files\s+1\n", human.stdout)


def test_status_on_a_terminal_shows_geocode_queue_and_budget(
    cli_env: Callable[..., dict[str, str]], bucket: Bucket, db_url: str
) -> None:
    import re
    from datetime import UTC, datetime

    for path in sorted((SAMPLE / "inc" / "changes").glob("*.csv")):
        bucket.put(inc_key(path.name), path.read_bytes())
    env = cli_env(geocoder={"enabled": True, "daily_budget": 10})
    assert run_cli("drain", env=env).returncode == 0
    # Nothing geocoded yet: every wanted cluster waits (its locations wait for it).
    clusters = fetch(db_url, "SELECT count(DISTINCT cluster) AS n FROM tickets.geo_wanted()")[0]["n"]
    assert clusters > 0
    today = datetime.now(UTC).date()
    used = "INSERT INTO tickets.geo_budget (provider, day, requests) VALUES ('locationiq', $1, 3)"
    fetch(db_url, used, today)

    human = run_cli("status", env=env)
    assert human.returncode == 0, human.stderr
    assert re.search(rf"^geocode queue\s+{clusters} place\(s\) waiting$", human.stdout, re.M), human.stdout
    assert re.search(r"^geocode budget\s+7 of 10 requests left today", human.stdout, re.M), human.stdout
    assert re.search(r"^geocode unguarded\s+0 location\(s\)", human.stdout, re.M), human.stdout
    as_json = run_cli("status", "--json", env=env)
    assert as_json.returncode == 0
    # CONTRACT's "datasets" as before; the geocoder beside it (issue 13).
    assert list(json.loads(as_json.stdout)) == ["datasets", "geocoder"]
    assert json.loads(as_json.stdout)["geocoder"] == {
        "enabled": True,
        "provider": "locationiq",
        "error": None,
        "queue": clusters,
        "budget_remaining": 7,
        "daily_budget": 10,
        "unguarded_locations": 0,
        "unguarded_clusters": [],
    }

    off = run_cli("status", env=cli_env(geocoder={"enabled": False}))
    assert off.returncode == 0, off.stderr
    assert re.search(r"^geocoding\s+off", off.stdout, re.M) and "geocode queue" not in off.stdout


def test_drain_exit_1_when_blocked_skip_unblocks(
    cli_env: Callable[..., dict[str, str]], bucket: Bucket, db_url: str
) -> None:
    env = cli_env()
    bad = inc_key("2026-06-22T10-00-00.csv")
    bucket.put(bad, b"\xff\xfe not csv")
    bucket.put(inc_key("2026-06-22T11-00-00.csv"), csv_file(row("T1")))
    dry = run_cli("drain", "--dry-run", "--json", env=env)
    assert dry.returncode == 1
    assert json.loads(dry.stdout)["datasets"]["inc"]["blocked"]["key"] == bad
    assert fetch(db_url, "SELECT blocked_key FROM tickets.import_meta WHERE blocked_key IS NOT NULL") == []

    res = run_cli("drain", "--dataset", "inc", "--json", env=env)
    assert res.returncode == 1
    blocked = json.loads(res.stdout)["datasets"]["inc"]["blocked"]
    assert blocked["key"] == bad and "not UTF-8" in blocked["reason"]
    st = json.loads(run_cli("status", "--json", env=env).stdout)["datasets"]["inc"]
    assert st["blocked"]["key"] == bad and st["pending_files"] == 2

    sk = run_cli("skip", "--dataset", "inc", "2026-06-22T10-00-00.csv", "--reason", "garbage export", env=env)
    assert sk.returncode == 0, sk.stderr
    assert "unblocked" in sk.stdout
    assert bucket.keys("automations/inc/quarantine/") == [
        "automations/inc/quarantine/2026-06-22T10-00-00.csv",
        "automations/inc/quarantine/2026-06-22T10-00-00.csv.error.json",
    ]
    ledger = fetch(db_url, "SELECT status, error FROM tickets.ingest_files WHERE key = $1", bad)
    assert ledger[0]["status"] == "skipped" and "garbage export" in ledger[0]["error"]
    res = run_cli("drain", "--json", env=env)
    assert res.returncode == 0
    assert json.loads(res.stdout)["datasets"]["inc"]["files_applied"] == 1
    # The skipped bytes re-landing go straight back to quarantine/.
    bucket.put(bad, b"\xff\xfe not csv")
    res = run_cli("drain", "--json", env=env)
    assert res.returncode == 0 and bucket.keys("automations/inc/changes/") == []


def test_load_file(cli_env: Callable[..., dict[str, str]], db_url: str, tmp_path: Path) -> None:
    env = cli_env()
    good = tmp_path / "2026-06-22T10-00-00.csv"
    good.write_text(csv_file(row("L1"), row("L2")))
    res = run_cli("load-file", str(good), "--dataset", "inc", env=env)
    assert res.returncode == 0, res.stderr
    rows = fetch(db_url, "SELECT ticket_id, source_key FROM tickets.inc ORDER BY 1")
    assert [(r["ticket_id"], r["source_key"]) for r in rows] == [
        ("L1", inc_key(good.name)), ("L2", inc_key(good.name)),
    ]  # fmt: skip
    again = run_cli("load-file", str(good), "--dataset", "inc", env=env)
    assert again.returncode == 0 and "already applied" in again.stdout

    nameless = tmp_path / "latest.csv"
    nameless.write_text(csv_file(row("L3")))
    res = run_cli("load-file", str(nameless), "--dataset", "inc", env=env)
    assert res.returncode == 1 and "YYYY-MM-DDTHH-mm-ss.csv" in res.stderr

    bad = tmp_path / "2026-06-22T11-00-00.csv"
    bad.write_text('"ticket_id"\n"L4"\n')
    res = run_cli("load-file", str(bad), "--dataset", "inc", env=env)
    assert res.returncode == 1 and str(bad) in res.stderr and "header lacks" in res.stderr
    dry = tmp_path / "2026-06-22T12-00-00.csv"
    dry.write_text(csv_file(row("L5")))
    res = run_cli("load-file", str(dry), "--dataset", "inc", "--dry-run", env=env)
    assert res.returncode == 0 and '"inserted": 1' in res.stdout
    assert fetch(db_url, "SELECT ticket_id FROM tickets.inc WHERE ticket_id IN ('L4', 'L5')") == []


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda c: c["datasets"]["inc"].update(tabel="tickets.inc"), "datasets.inc.tabel"),
        (lambda c: c["s3"].update(bucket=5), "s3.bucket"),
        (lambda c: c["datasets"]["inc"].update(table="tickets.inc; drop table x"), "datasets.inc.table"),
        (lambda c: c["datasets"]["inc"].update(on_bad_file="ignore"), "datasets.inc.on_bad_file"),
        (lambda c: c["schedule"].update(cron="every day"), "schedule.cron"),
        (lambda c: c.update(databse={"url": "x"}), "databse"),
        (lambda c: c["s3"].update(secret_access_key="hunter2"), "s3.secret_access_key"),
        (lambda c: c["database"].update(url="postgresql://u:pw@h/db"), "database.url"),
    ],
    ids=["typo", "type", "table-injection", "enum", "cron", "section", "secret-in-file", "password-in-file"],
)
def test_config_errors_name_the_key(
    cli_env: Callable[..., dict[str, str]], mutate: Callable[[dict[str, Any]], None], key: str
) -> None:
    from .conftest import to_toml

    env = cli_env(schedule={"cron": "*/20 6-20 * * *"})
    path = Path(env["FLEETTICKETSD_CONFIG"])
    import tomllib

    data = tomllib.loads(path.read_text())
    mutate(data)
    path.write_text(to_toml(data))
    res = run_cli("check-config", env=env)
    assert res.returncode == 2
    assert key in res.stderr and "Traceback" not in res.stderr
    assert "hunter2" not in res.stderr + res.stdout and "pw@" not in res.stderr


def test_check_config_redacts_and_checks_tables(cli_env: Callable[..., dict[str, str]]) -> None:
    env = cli_env()
    env["RUSTFS_SECRET_ACCESS_KEY"] = "s3cr3t"
    res = run_cli("check-config", env=env)
    assert res.returncode == 0, res.stderr
    cfg = json.loads(res.stdout)
    assert cfg["s3"]["secret_access_key"] == "***" and "s3cr3t" not in res.stdout

    missing = cli_env(datasets={"inc": {"prefix": "automations/inc/", "table": "tickets.nosuch"}})
    res = run_cli("check-config", env=missing)
    assert res.returncode == 2 and "datasets.inc.table" in res.stderr and "tickets.nosuch" in res.stderr
    res = run_cli("drain", env=missing)
    assert res.returncode == 2 and "tickets.nosuch" in res.stderr


def test_unreachable_database_and_bucket_are_clear_errors(cli_env: Callable[..., dict[str, str]]) -> None:
    from .conftest import free_port

    env = cli_env(database={"url": f"postgresql://postgres@127.0.0.1:{free_port()}/x"})
    res = run_cli("drain", env=env)
    assert res.returncode == 1 and "cannot connect to the database" in res.stderr
    assert "Traceback" not in res.stderr
    env = cli_env(s3={"endpoint_url": f"http://127.0.0.1:{free_port()}", "connect_timeout_s": 0.5})
    res = run_cli("drain", env=env)
    assert res.returncode == 1 and "cannot reach bucket" in res.stderr and "Traceback" not in res.stderr


def test_migrate_check_and_apply(cli_env: Callable[..., dict[str, str]], empty_db_url: str) -> None:
    env = cli_env(database={"url": empty_db_url})
    res = run_cli("migrate", "--check", env=env)
    assert res.returncode == 1 and "pending: 0001_schema" in res.stdout
    res = run_cli("migrate", env=env)
    assert res.returncode == 0 and "applied: 0001_schema" in res.stdout
    res = run_cli("migrate", "--check", env=env)
    assert res.returncode == 0 and "schema is current" in res.stdout
    res = run_cli("migrate", env=env)
    assert res.returncode == 0 and "schema is current" in res.stdout


def test_kill_9_mid_file_then_clean_resume(
    cli_env: Callable[..., dict[str, str]], bucket: Bucket, db_url: str, tmp_path: Path
) -> None:
    env = cli_env(logging={"format": "json"})
    key = inc_key("2026-06-22T10-00-00.csv")
    path = tmp_path / "big.csv"
    with path.open("wb") as fh:
        feedgen.write_rows(fh, feedgen.FeedSpec(seed=3, baseline_rows=60_000, sentinel=False), 60_000)
    bucket.put(key, path.read_bytes())
    bucket.put(inc_key("2026-06-22T10-05-00.csv"), csv_file(row("AFTER")))
    log_path = tmp_path / "drain.log"
    proc = spawn_cli("drain", env=env, log_path=log_path)
    poll(lambda: "applying file" in log_path.read_text(), what="drain in the middle of the file")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert fetch(db_url, "SELECT count(*) AS n FROM tickets.inc")[0]["n"] == 0
    assert fetch(db_url, "SELECT count(*) AS n FROM tickets.ingest_files")[0]["n"] == 0
    assert bucket.keys("automations/inc/changes/") == [key, inc_key("2026-06-22T10-05-00.csv")]
    # The killed session's advisory lock went with its connection: the next drain runs.
    res = run_cli("drain", "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["datasets"]["inc"]["files_applied"] == 2
    assert fetch(db_url, "SELECT count(*) AS n FROM tickets.ingest_files")[0]["n"] == 2
    assert bucket.keys("automations/inc/changes/") == []


def test_drain_shows_progress_only_on_a_terminal(
    cli_env: Callable[..., dict[str, str]], bucket: Bucket
) -> None:
    import os
    import pty

    env = cli_env(logging={"level": "warning"})
    for i in range(3):
        bucket.put(inc_key(f"2026-06-22T10-00-0{i}.csv"), csv_file(row(f"T{i}")))
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetticketsd", "drain"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    out, _ = proc.communicate(timeout=60)
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    assert proc.returncode == 0
    assert b"inc: 3/3 files, 3 rows" in shown and b"rows/s" in shown
    assert b"rows/s" not in out  # stdout keeps the result only
    bucket.put(inc_key("2026-06-22T11-00-00.csv"), csv_file(row("T9")))
    piped = run_cli("drain", env=env)
    assert piped.returncode == 0 and "rows/s" not in piped.stderr + piped.stdout


def test_config_option_before_or_after_the_command(
    cli_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    env = cli_env()
    path = env.pop("FLEETTICKETSD_CONFIG")
    env["FLEETTICKETSD_CONFIG"] = str(tmp_path / "nowhere.toml")
    for args in (("--config", path, "check-config"), ("check-config", "--config", path)):
        res = run_cli(*args, env=env)
        assert res.returncode == 0, res.stderr
    res = run_cli("check-config", env=env)
    assert res.returncode == 2 and "nowhere.toml" in res.stderr


def test_skip_refuses_a_version_that_is_already_applied(
    cli_env: Callable[..., dict[str, str]], bucket: Bucket, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = cli_env()
    key = inc_key("2026-06-22T10-00-00.csv")
    body = csv_file(row("T1"))
    bucket.put(key, body)
    assert run_cli("drain", env=env).returncode == 0
    bucket.put(key, body)  # back under changes/ (say its archive failed), same bytes
    res = run_cli("skip", "--dataset", "inc", key, "--reason", "oops", env=env)
    assert res.returncode == 1 and "already applied" in res.stderr
    assert (
        fetch(db_url, "SELECT status FROM tickets.ingest_files WHERE key = $1", key)[0]["status"] == "applied"
    )

"""Least privilege (CONTRACT.md "TLS, secrets, roles"): the daemon's main scenario run as
a login role that holds only fleetticketsd_runtime, and a dashboards' login role that
holds only fleetticketsd_reader."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fleetticketsd.database import roles

from .conftest import Bucket, Daemon, admin_sql, csv_file, inc_key, poll, row, run_cli, to_toml


@contextlib.contextmanager
def login_role(member_of: str) -> Iterator[str]:
    name = f"fleet_login_{uuid.uuid4().hex[:8]}"
    admin_sql(f"CREATE ROLE {name} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE IN ROLE {member_of}")
    try:
        yield name
    finally:
        with contextlib.suppress(asyncpg.PostgresError):
            admin_sql(f"DROP ROLE IF EXISTS {name}")


@pytest.fixture
def runtime_url(db_url: str) -> Iterator[str]:
    with login_role(roles.RUNTIME) as name:
        yield db_url.replace("postgres@", f"{name}@", 1)


@pytest.fixture
def reader_url(db_url: str) -> Iterator[str]:
    with login_role(roles.READER) as name:
        yield db_url.replace("postgres@", f"{name}@", 1)


async def _run(url: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


def run(url: str, sql: str, *args: Any) -> Any:
    return asyncio.run(_run(url, sql, *args))


def refused(url: str, sql: str) -> bool:
    try:
        run(url, sql)
    except asyncpg.InsufficientPrivilegeError:
        return True
    return False


def test_daemon_drain_status_and_skip_as_a_role_holding_only_runtime(
    start_daemon: Callable[..., tuple[Daemon, dict[str, Any]]],
    bucket: Bucket,
    runtime_url: str,
    db_url: str,
    tmp_path: Path,
) -> None:
    bucket.put(inc_key("2026-06-22T10-00-00.csv"), csv_file(row("T1"), row("T2"), "bad,row"))
    blocked = inc_key("2026-06-22T11-00-00.csv")
    bucket.put(blocked, b"not the feed")
    bucket.put(inc_key("2026-06-22T12-00-00.csv"), csv_file(row("T3")))
    bucket.put("automations/crq/changes/2026-06-22T10-00-00.csv", csv_file(row("C1", source_type="crq")))
    d, data = start_daemon(
        database={"url": runtime_url},
        datasets={
            "inc": {"prefix": "automations/inc/", "table": "tickets.inc", "post_apply": ["capture_history"]},
            "crq": {"prefix": "automations/crq/", "table": "tickets.crq"},
        },
    )
    poll(lambda: d.metric("fleettickets_dataset_blocked", dataset="inc") == 1, what="blocked")
    assert d.metric("fleettickets_files_applied_total", dataset="inc") == 1
    status, body = d.get("/readyz")
    assert status == 200, body

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "RUSTFS_"))}
    env["FLEETTICKETSD_CONFIG"] = str(d.config_path)
    st = run_cli("status", "--json", env=env)
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["datasets"]["inc"]["blocked"]["key"] == blocked
    skip = run_cli("skip", "--dataset", "inc", blocked, "--reason", "not the feed", env=env)
    assert skip.returncode == 0, skip.stderr
    poll(lambda: d.metric("fleettickets_dataset_blocked", dataset="inc") == 0, what="unblocked")
    assert bucket.keys("automations/inc/quarantine/") == [
        "automations/inc/quarantine/2026-06-22T11-00-00.csv",
        "automations/inc/quarantine/2026-06-22T11-00-00.csv.error.json",
    ]
    # The one-shot commands, as the same role.
    local = tmp_path / "2026-06-22T13-00-00.csv"
    local.write_text(csv_file(row("T4")))
    for args in (
        ("drain", "--dataset", "inc"),
        ("drain", "--reseed", "--from-archive", "--dataset", "crq"),
        ("load-file", str(local), "--dataset", "inc"),
        ("gazetteer", "set", "Kilimani", "-1.29", "36.78"),
        ("geocode", "--limit", "0"),
        ("migrate", "--check"),
    ):
        res = run_cli(*args, env=env)
        assert res.returncode == 0, (args, res.stdout, res.stderr[-1500:])
        if args == ("drain", "--dataset", "inc"):  # the file after the skipped one
            assert run(db_url, "SELECT count(*) FROM tickets.inc") == 3
            assert run(db_url, "SELECT count(*) FROM tickets.ingest_rejects") == 1
            assert run(db_url, "SELECT count(*) FROM tickets.inc_daily_snapshot") >= 1
    denied = [e for e in d.logs() if "permission denied" in json.dumps(e)]
    assert not denied, denied
    assert [e["event"] for e in d.logs() if e.get("level") == "error"] == ["bad file: dataset blocked"]

    # Nothing beyond: no DDL, no TRUNCATE, nothing outside the project's schemas.
    admin_sql("CREATE TABLE IF NOT EXISTS public.not_ours (x int)", db_url)
    for sql in (
        "CREATE TABLE tickets.x (a int)",
        "TRUNCATE tickets.inc",
        "DROP TABLE tickets.ingest_files",
        "ALTER TABLE tickets.inc ADD COLUMN y int",
        "SELECT * FROM public.not_ours",
        "INSERT INTO tickets.schema_migrations (version, checksum) VALUES ('9999', 'x')",
        "SELECT tickets.grant_roles()",
    ):
        assert refused(runtime_url, sql), sql
    # migrate itself needs the owner.
    owner_only = run_cli("migrate", env={**env, "FLEETTICKETSD_CONFIG": str(_config_with(d, data, db_url))})
    assert owner_only.returncode == 0, owner_only.stderr


def _config_with(d: Daemon, data: dict[str, Any], url: str) -> Path:
    path = d.config_path.with_name("owner.toml")
    path.write_text(to_toml({**data, "database": {**data["database"], "url": url}}))
    return path


def test_a_dataset_table_made_later_is_the_runtimes_and_a_missing_grant_is_named(
    runtime_url: str, db_url: str, cli_env: Callable[..., dict[str, str]], bucket: Bucket
) -> None:
    # Made by the migrating role after migrate: the default privileges cover it at once.
    run(db_url, "SELECT tickets.create_dataset_table('later')")
    assert run(runtime_url, "SELECT has_table_privilege('tickets.later', 'INSERT')")
    # Made by someone else, elsewhere: named in the error, and granted by the next migrate.
    admin_sql("CREATE SCHEMA ops; CREATE TABLE ops.extra (LIKE tickets.inc INCLUDING ALL)", db_url)
    datasets = {"extra": {"prefix": "automations/extra/", "table": "ops.extra"}}
    env = cli_env(database={"url": runtime_url}, datasets=datasets)
    res = run_cli("drain", env=env)
    assert res.returncode == 2
    assert "may not use schema ops" in res.stderr and "fleetticketsd migrate" in res.stderr
    owner_env = cli_env(datasets=datasets)
    assert run_cli("migrate", env=owner_env).returncode == 0
    env = cli_env(database={"url": runtime_url}, datasets=datasets)
    res = run_cli("drain", env=env)
    assert res.returncode == 0, res.stderr


def test_reader_reads_the_map_and_tickets_and_nothing_else(reader_url: str, db_url: str) -> None:
    run(db_url, "INSERT INTO tickets.inc (ticket_id, raw, source_key) VALUES ('T1', '{}', 'k')")
    assert run(reader_url, "SELECT reporting.fn_tickets_for_map() IS NOT NULL")
    for relation in (
        "tickets.inc",
        "tickets.crq",
        "tickets.inc_open_sla",
        "tickets.closure_events",
        "tickets.inc_daily_snapshot",
        "tickets.import_meta",
    ):
        run(reader_url, f"SELECT count(*) FROM {relation}")
    assert run(reader_url, "SELECT count(*) FROM tickets.inc") == 1
    for sql in (
        "SELECT * FROM tickets.ingest_files",
        "SELECT * FROM tickets.ingest_rejects",
        "SELECT * FROM tickets.schema_migrations",
        "INSERT INTO tickets.inc (ticket_id, raw, source_key) VALUES ('T2', '{}', 'k')",
        "UPDATE tickets.inc SET raw = '{}'",
        "DELETE FROM tickets.import_meta",
        "DELETE FROM tickets.ingest_files",
        "CREATE TABLE tickets.mine (a int)",
    ):
        assert refused(reader_url, sql), sql


def test_grants_survive_a_function_replaced_by_a_later_migration(db_url: str, reader_url: str) -> None:
    """A CREATE OR REPLACE drops SECURITY DEFINER: the next migrate (a no-op one) restores it."""
    fn = "reporting.fn_freshness()"
    assert run(db_url, f"SELECT prosecdef FROM pg_proc WHERE oid = '{fn}'::regprocedure")
    run(db_url, f"ALTER FUNCTION {fn} SECURITY INVOKER")
    assert refused(reader_url, "SELECT reporting.fn_freshness()")

    async def migrate() -> None:
        from fleetticketsd.database import db

        conn = await asyncpg.connect(db_url)
        try:
            assert await db.migrate(conn) == []
        finally:
            await conn.close()

    asyncio.run(migrate())
    assert run(reader_url, "SELECT reporting.fn_freshness() IS NOT NULL")

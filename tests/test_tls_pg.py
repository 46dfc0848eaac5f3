"""PostgreSQL over TLS (CONTRACT.md "TLS, secrets, roles"): a cluster of the test's own
that accepts only TLS (hostssl, and hostnossl rejected), with a certificate from a CA
the test made. libpq's parameters in the URL: sslmode=verify-full with sslrootcert
works; a wrong CA is one clear line naming the host; a plain connection is refused;
the password appears nowhere. And `migrate` by a role that may not create roles."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from fleetticketsd.database import roles

from .conftest import (
    PG_MAJOR,
    Bucket,
    Cluster,
    admin_sql,
    create_migrated_db,
    csv_file,
    free_port,
    inc_key,
    row,
    run_cli,
)
from .tlsutil import CA, make_ca

PASSWORD = "s3cr3t-pw-never-printed"
USER = "fleet_tls"


@pytest.fixture(scope="module")
def pg_ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return make_ca(tmp_path_factory.mktemp("pg-ca"))


@pytest.fixture(scope="module")
def tls_cluster(pg_ca: CA) -> Iterator[Cluster]:
    """A cluster on a free port demanding TLS on TCP, its certificate for localhost."""
    name = f"fleettls{os.getpid()}"
    port = free_port()
    subprocess.run(["pg_dropcluster", "--stop", PG_MAJOR, name], capture_output=True)
    subprocess.run(
        ["pg_createcluster", PG_MAJOR, name, "-p", str(port), "-o", "fsync=off", "--",
         "--auth-local=trust", "--auth-host=reject"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    conf = Path(f"/etc/postgresql/{PG_MAJOR}/{name}")
    cert, key = pg_ca.issue("pg", ("localhost", "127.0.0.1"))
    for src, dst in ((cert, conf / "server.crt"), (key, conf / "server.key")):
        shutil.copy(src, dst)
        shutil.chown(dst, "postgres", "postgres")
    (conf / "server.key").chmod(0o600)
    with (conf / "postgresql.conf").open("a") as f:
        f.write(f"ssl = on\nssl_cert_file = '{conf}/server.crt'\nssl_key_file = '{conf}/server.key'\n")
    (conf / "pg_hba.conf").write_text(
        "local all all trust\n"
        "hostssl all postgres 127.0.0.1/32 trust\n"
        "hostssl all postgres ::1/128 trust\n"
        "hostssl all all 127.0.0.1/32 scram-sha-256\n"
        "hostssl all all ::1/128 scram-sha-256\n"
        "hostnossl all all all reject\n"
    )
    cluster = Cluster(
        name, port, f"postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=require", "fleet_tpl"
    )
    try:
        cluster.ctl("start")
        cluster.wait_ready()
        admin_sql(f"CREATE ROLE {USER} LOGIN SUPERUSER PASSWORD '{PASSWORD}'", cluster.admin_url)
        yield cluster
    finally:
        subprocess.run(["pg_dropcluster", "--stop", PG_MAJOR, name], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def tls_db(tls_cluster: Cluster) -> str:
    """A migrated database on the TLS cluster; its name."""
    name = f"fleet_tls_{uuid.uuid4().hex[:8]}"
    create_migrated_db(name, tls_cluster.admin_url.replace("/postgres?", "/postgres?", 1))
    return name


def url(cluster: Cluster, database: str, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"postgresql://{USER}:{PASSWORD}@localhost:{cluster.port}/{database}" + (
        f"?{query}" if query else ""
    )


def _env(cli_env: Callable[..., dict[str, str]], database_url: str) -> dict[str, str]:
    return {**cli_env(), "DATABASE_URL": database_url}


def _no_secret(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text
        assert "Traceback" not in text, text


def test_verify_full_against_the_test_ca_works(
    tls_cluster: Cluster, tls_db: str, pg_ca: CA, cli_env: Callable[..., dict[str, str]], bucket: Bucket
) -> None:
    bucket.put(inc_key("2026-06-22T10-00-00.csv"), csv_file(row("T1")))
    env = _env(cli_env, url(tls_cluster, tls_db, sslmode="verify-full", sslrootcert=str(pg_ca.cert)))
    res = run_cli("drain", "--dataset", "inc", env=env)
    assert res.returncode == 0, res.stderr
    assert "1 file(s), 1 row(s) upserted" in res.stdout
    check = run_cli("check-config", env=env)
    assert check.returncode == 0, check.stderr
    assert "sslmode=verify-full" in check.stdout and f"{USER}:***@localhost" in check.stdout
    _no_secret(res.stdout, res.stderr, check.stdout, check.stderr)

    async def session_is_tls() -> bool:
        conn = await asyncpg.connect(
            url(tls_cluster, tls_db, sslmode="verify-full", sslrootcert=str(pg_ca.cert))
        )
        try:
            return bool(await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))
        finally:
            await conn.close()

    assert asyncio.run(session_is_tls())


def test_wrong_ca_is_one_clear_error_naming_the_host(
    tls_cluster: Cluster, tls_db: str, cli_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    other = make_ca(tmp_path / "other", "other")
    env = _env(cli_env, url(tls_cluster, tls_db, sslmode="verify-full", sslrootcert=str(other.cert)))
    expected = f"the TLS certificate of the database server localhost:{tls_cluster.port} does not verify"
    for args, code in ((("drain",), 1), (("status",), 1), (("check-config",), 2)):
        res = run_cli(*args, env=env)
        assert res.returncode == code, (args, res.stderr)
        assert expected in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, (args, res.stderr)
        _no_secret(res.stdout, res.stderr)


def test_plain_connection_refused_where_the_server_demands_tls(
    tls_cluster: Cluster, tls_db: str, cli_env: Callable[..., dict[str, str]]
) -> None:
    env = _env(cli_env, url(tls_cluster, tls_db, sslmode="disable"))
    res = run_cli("status", env=env)
    assert res.returncode == 1
    assert "no encryption" in res.stderr, res.stderr
    assert f"{USER}:***@localhost" in res.stderr
    _no_secret(res.stdout, res.stderr)


def test_migrate_without_createrole_prints_the_statements_for_an_administrator(
    tls_cluster: Cluster, cli_env: Callable[..., dict[str, str]]
) -> None:
    """On a cluster without the roles, a migrating role that owns its database but may
    not create roles: exit 2 and the statements; once they are run, migrate completes."""
    admin = tls_cluster.admin_url
    dbs = [r for r in asyncio.run(_databases(admin))]
    # The roles are cluster-wide: take them away (other databases' grants first).
    for name in dbs:
        for role in roles.ROLES:
            admin_sql(
                f"DO $$ BEGIN IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN "
                f"EXECUTE 'DROP OWNED BY {role}'; END IF; END $$",
                admin.replace("/postgres?", f"/{name}?"),
            )
    for role in roles.ROLES:
        admin_sql(f"DROP ROLE IF EXISTS {role}", admin)
    owner, database = f"fleet_owner_{uuid.uuid4().hex[:6]}", f"fleet_nc_{uuid.uuid4().hex[:6]}"
    admin_sql(f"CREATE ROLE {owner} LOGIN NOCREATEROLE PASSWORD '{PASSWORD}'", admin)
    admin_sql(f"CREATE DATABASE {database} OWNER {owner}", admin)
    admin_sql("CREATE EXTENSION postgis", admin.replace("/postgres?", f"/{database}?"))
    env = {**cli_env(), "DATABASE_URL": url(tls_cluster, database, sslmode="require").replace(USER, owner)}
    res = run_cli("migrate", env=env)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "CREATE ROLE fleetticketsd_runtime NOLOGIN;" in res.stderr
    assert "CREATE ROLE fleetticketsd_reader NOLOGIN;" in res.stderr
    assert "applied: 0011_roles" in res.stdout  # the schema is migrated all the same
    _no_secret(res.stdout, res.stderr)
    statements = [
        line.strip() for line in res.stderr.splitlines() if line.strip().startswith(("CREATE", "GRANT"))
    ]
    for statement in statements:
        admin_sql(statement, admin.replace("/postgres?", f"/{database}?"))
    again = run_cli("migrate", env=env)
    assert again.returncode == 0, again.stderr
    assert "schema is current" in again.stdout

    async def runtime_may_write() -> bool:
        conn = await asyncpg.connect(admin.replace("/postgres?", f"/{database}?"))
        try:
            return bool(await conn.fetchval(
                "SELECT has_table_privilege('fleetticketsd_runtime', 'tickets.ingest_files', 'INSERT')"
            ))  # fmt: skip
        finally:
            await conn.close()

    assert asyncio.run(runtime_may_write())


async def _databases(admin_url: str) -> list[str]:
    conn = await asyncpg.connect(admin_url)
    try:
        return [r[0] for r in await conn.fetch("SELECT datname FROM pg_database WHERE datallowconn")]
    finally:
        await conn.close()

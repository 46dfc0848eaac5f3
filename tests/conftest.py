"""Test fixtures: real PostgreSQL+PostGIS and a real S3 API (moto in server mode).

Every test gets a database of its own, cloned from a template that was migrated once
per session (CREATE DATABASE … TEMPLATE is a file copy: milliseconds, not a
migration run), and a bucket of its own on one shared moto server. Nothing leaks
between tests, and tests can run in any order.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import boto3
import pytest
from moto.server import ThreadedMotoServer

from fleetticketsd import db
from fleetticketsd.config import Config, parse
from fleetticketsd.drain import Engine
from fleetticketsd.metrics import Metrics
from fleetticketsd.source import S3Source

PG_ADMIN_URL = os.environ.get("FLEETTICKETSD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO.parent / "shared" / "feed" / "sample" / "automations"
HEADER = (
    '"ticket_id","source_type","service_type","bucket","raw_status","normalized_status",'
    '"created_at_service","scheduled_at","closed_at","last_seen_at","first_seen_at","week_start",'
    '"week_end","cluster","region","location_name","latitude","longitude","department",'
    '"assigned_team","owner","sla_status","mttr","is_auto_created","is_auto_closed","is_alarm",'
    '"is_actionable","source_s3_bucket","source_s3_key","source_snapshot_id","created_at","updated_at"'
)

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(check: Callable[[], Any], timeout_s: float = 20.0, interval_s: float = 0.05, what: str = "") -> Any:
    """Wait for check() to return something truthy, or fail after the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # a probe that is not up yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out waiting for {what or check}: last result {last!r}")


async def apoll(check: Callable[[], Any], timeout_s: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or check}: last result {last!r}")


# --- S3 ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@dataclass
class Bucket:
    name: str
    endpoint: str
    client: Any

    def put(self, key: str, body: bytes | str) -> str:
        data = body.encode() if isinstance(body, str) else body
        return str(self.client.put_object(Bucket=self.name, Key=key, Body=data)["ETag"]).strip('"')

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(o["Key"] for p in pages for o in p.get("Contents", []))

    def get(self, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=self.name, Key=key)["Body"].read())

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.name, Key=key)


_bucket_ids = itertools.count()


@pytest.fixture
def bucket(s3_endpoint: str) -> Bucket:
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    name = f"t{os.getpid()}-{next(_bucket_ids)}"
    client.create_bucket(Bucket=name)
    return Bucket(name, s3_endpoint, client)


# --- PostgreSQL -----------------------------------------------------------------------------


def admin_sql(sql: str) -> None:
    """Run one statement as the server's superuser (CREATE/DROP DATABASE and the like)."""

    async def go() -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


def _db_url(name: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="session")
def template_db() -> Iterator[str]:
    name = f"fleet_tpl_{os.getpid()}"
    admin_sql(f"DROP DATABASE IF EXISTS {name}")
    admin_sql(f"CREATE DATABASE {name}")

    async def migrate() -> None:
        conn = await asyncpg.connect(_db_url(name))
        try:
            await db.migrate(conn)
        finally:
            await conn.close()

    asyncio.run(migrate())
    yield name
    admin_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def db_url(template_db: str) -> Iterator[str]:
    name = f"fleet_t_{uuid.uuid4().hex[:12]}"
    admin_sql(f"CREATE DATABASE {name} TEMPLATE {template_db}")
    yield _db_url(name)
    admin_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def empty_db_url() -> Iterator[str]:
    """A database with nothing in it, for migration tests."""
    name = f"fleet_e_{uuid.uuid4().hex[:12]}"
    admin_sql(f"CREATE DATABASE {name}")
    yield _db_url(name)
    admin_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# --- configuration and engine ------------------------------------------------------------


def config_dict(db_url: str, bucket: Bucket, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "database": {"url": db_url},
        "s3": {"endpoint_url": bucket.endpoint, "bucket": bucket.name, "region": "us-east-1"},
        "server": {"listen": f"127.0.0.1:{free_port()}"},
        "datasets": {
            "inc": {"prefix": "automations/inc/", "table": "tickets.inc"},
            "crq": {"prefix": "automations/crq/", "table": "tickets.crq"},
        },
        "ingest": {"read_chunk_bytes": 4096},
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **values}
        else:
            data[section] = values
    return data


@pytest.fixture
def make_config(db_url: str, bucket: Bucket) -> Callable[..., Config]:
    def make(**overrides: Any) -> Config:
        return parse(config_dict(db_url, bucket, **overrides), env={})

    return make


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config()


@pytest.fixture
async def engine(config: Config) -> AsyncIterator[Engine]:
    pool = await db.create_pool(config.database)
    async with S3Source(config.s3) as source:
        yield Engine(config, pool, source, Metrics())
    await pool.close()


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(db_url)
    yield c
    await c.close()


# --- feed helpers ---------------------------------------------------------------------------


def row(ticket_id: str, **values: str) -> str:
    """One CSV line with every column quoted; unspecified columns get plausible values."""
    base = {
        "ticket_id": ticket_id,
        "source_type": "inc",
        "service_type": "FTTH",
        "bucket": "pending",
        "raw_status": "Work in progress",
        "normalized_status": "open",
        "created_at_service": "2026-06-20 09:48:04",
        "last_seen_at": "2026-06-22 15:50:39",
        "first_seen_at": "2026-06-20 09:55:04",
        "cluster": "Kilimani",
        "region": "Nairobi",
        "location_name": "NW_KILIMANI_Jogoo Rd FDT1",
        "owner": "P. Wanjiru",
        "is_alarm": "false",
        "is_actionable": "true",
        "is_auto_created": "false",
        "is_auto_closed": "false",
    }
    base.update(values)
    cols = [c.strip('"') for c in HEADER.split(",")]
    return ",".join('"' + base.get(c, "").replace('"', '""') + '"' for c in cols)


def csv_file(*rows: str, header: str = HEADER, eol: str = "\n") -> str:
    return eol.join([header, *rows]) + eol


def inc_key(name: str) -> str:
    return f"automations/inc/changes/{name}"


@pytest.fixture
def cli_env(db_url: str, bucket: Bucket, tmp_path: Path) -> Callable[..., dict[str, str]]:
    """Environment and config file for running `fleetticketsd` as a subprocess."""

    def make(**overrides: Any) -> dict[str, str]:
        import tomllib  # noqa: F401 - config is written as TOML below

        cfg = config_dict(db_url, bucket, **overrides)
        path = tmp_path / "config.toml"
        path.write_text(to_toml(cfg))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "RUSTFS_"))}
        env.update({"FLEETTICKETSD_CONFIG": str(path), "PYTHONUNBUFFERED": "1"})
        return env

    return make


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((f"{prefix}{k}", v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for name, table in tables:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        nested = {k: v for k, v in table.items() if isinstance(v, dict)}
        if scalars or not nested:
            out += f"\n[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in scalars.items())
        for k, v in nested.items():
            out += to_toml({k: v}, prefix=f"{name}.")
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_cli(*args: str, env: dict[str, str], timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetticketsd", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO,
    )


def spawn_cli(*args: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`fleetticketsd ARGS` in the background, its logs (stderr) going to log_path."""
    with log_path.open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "fleetticketsd", *args],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )

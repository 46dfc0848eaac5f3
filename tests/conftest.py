"""Test fixtures: real PostgreSQL+PostGIS and a real S3 API (moto in server mode).

Every test gets a database of its own, cloned from a template that was migrated once
per session (CREATE DATABASE … TEMPLATE is a file copy: milliseconds, not a
migration run), and a bucket of its own on one shared moto server. Nothing leaks
between tests, and tests can run in any order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import boto3
import pytest
from moto.server import ThreadedMotoServer
from prometheus_client.parser import text_string_to_metric_families

from fleetticketsd.config import Config, parse
from fleetticketsd.database import db
from fleetticketsd.ingest.drain import Engine
from fleetticketsd.ingest.source import S3Source
from fleetticketsd.metrics import Metrics

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


# The second S3 implementation (README, "Testing"): s3rver, an npm package that .ci/run
# installs with `npm ci` from tests/s3rver/package-lock.json into .tools/s3rver/.
S3_SERVERS = ("moto", "s3rver")
S3RVER_DIR = REPO / "tests" / "s3rver"
S3RVER_MODULES = Path(
    os.environ.get("FLEETTICKETSD_S3RVER_MODULES", REPO / ".tools" / "s3rver" / "node_modules")
)
# Set by .ci/run: there a missing s3rver fails the run instead of skipping its half.
REQUIRE_S3RVER = os.environ.get("FLEETTICKETSD_REQUIRE_S3RVER") == "1"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``s3_servers`` (the S3-facing core: engine, pipeline, archive,
    quarantine, daemon) run once per server; the rest of the suite on moto only."""
    if metafunc.definition.get_closest_marker("s3_servers") and "s3_server" in metafunc.fixturenames:
        metafunc.parametrize("s3_server", S3_SERVERS, indirect=True)


@pytest.fixture(scope="session")
def s3rver_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    node = shutil.which("node")
    if node is None or not (S3RVER_MODULES / "s3rver").is_dir():
        message = (
            f"s3rver is not installed (looked in {S3RVER_MODULES}): run .ci/run, or "
            f"`mkdir -p .tools/s3rver && cp {S3RVER_DIR.relative_to(REPO)}/package*.json .tools/s3rver/ "
            "&& npm ci --prefix .tools/s3rver`"
        )
        if REQUIRE_S3RVER:
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    env = {**os.environ, "S3RVER_NODE_MODULES": str(S3RVER_MODULES)}
    # s3rver's continuation tokens use DES, which OpenSSL 3 keeps in its legacy provider:
    # without it, every truncated listing (MaxKeys, pagination) is an InternalError.
    proc = subprocess.Popen(
        [node, "--openssl-legacy-provider", str(S3RVER_DIR / "serve.js"), str(port),
         str(tmp_path_factory.mktemp("s3rver"))],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "ready", or why not (it exits)
        if line.strip() != "ready":
            raise RuntimeError(f"s3rver did not start: {line}{proc.stdout.read()}")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3_server(request: pytest.FixtureRequest) -> str:
    """Which S3 implementation this test's bucket lives on: moto unless parametrised."""
    return str(getattr(request, "param", "moto"))


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
def bucket(request: pytest.FixtureRequest, s3_server: str) -> Bucket:
    s3_endpoint = str(request.getfixturevalue("s3rver_endpoint" if s3_server == "s3rver" else "s3_endpoint"))
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    name = f"t{os.getpid()}-{next(_bucket_ids)}"
    client.create_bucket(Bucket=name)
    return Bucket(name, s3_endpoint, client)


# --- PostgreSQL -----------------------------------------------------------------------------


def admin_sql(sql: str, admin_url: str = PG_ADMIN_URL) -> None:
    """Run one statement as the server's superuser (CREATE/DROP DATABASE and the like)."""

    async def go() -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


def _db_url(name: str, admin_url: str = PG_ADMIN_URL) -> str:
    return admin_url.rsplit("/", 1)[0] + "/" + name


def create_migrated_db(name: str, admin_url: str = PG_ADMIN_URL) -> None:
    admin_sql(f"CREATE DATABASE {name}", admin_url)

    async def migrate() -> None:
        conn = await asyncpg.connect(_db_url(name, admin_url))
        try:
            await db.migrate(conn)
        finally:
            await conn.close()

    asyncio.run(migrate())


@pytest.fixture(scope="session")
def template_db() -> Iterator[str]:
    name = f"fleet_tpl_{os.getpid()}"
    admin_sql(f"DROP DATABASE IF EXISTS {name}")
    create_migrated_db(name)
    yield name
    admin_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def cloned_db(template_db: str) -> Iterator[str]:
    """A database of its own, cloned from the migrated template; dropped afterwards."""
    name = f"fleet_t_{uuid.uuid4().hex[:12]}"
    admin_sql(f"CREATE DATABASE {name} TEMPLATE {template_db}")
    yield _db_url(name)
    admin_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def db_url(template_db: str) -> Iterator[str]:
    with cloned_db(template_db) as url:
        yield url


@dataclass
class Cluster:
    """A PostgreSQL cluster of the test session's own, for faults the main one must
    never see: restarts, a server gone away. Same major version and PostGIS."""

    name: str
    port: int
    admin_url: str
    template: str

    def ctl(self, action: str, *args: str) -> None:
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", PG_MAJOR, self.name, action, *args],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        ready = ["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port)]
        poll(
            lambda: subprocess.run(ready).returncode == 0,
            timeout_s=timeout_s,
            interval_s=0.1,
            what=f"cluster {self.name} ready",
        )

    def new_db(self) -> str:
        """A database cloned from the migrated template; dropped with the cluster."""
        name = f"fleet_t_{uuid.uuid4().hex[:12]}"
        admin_sql(f"CREATE DATABASE {name} TEMPLATE {self.template}", self.admin_url)
        return _db_url(name, self.admin_url)


PG_MAJOR = os.environ.get("FLEETTICKETSD_TEST_PG_MAJOR", "15")


@pytest.fixture(scope="session")
def second_cluster() -> Iterator[Cluster]:
    """`pg_createcluster` on a free port, trust auth on loopback, a migrated template;
    stopped and dropped at the end of the session."""
    name = f"fleetfaults{os.getpid()}"
    port = free_port()
    subprocess.run(["pg_dropcluster", "--stop", PG_MAJOR, name], capture_output=True)
    # Scratch data: fsync off, so starts and stops take no disk flushes.
    subprocess.run(
        ["pg_createcluster", PG_MAJOR, name, "-p", str(port), "-o", "fsync=off", "--",
         "--auth-local=trust", "--auth-host=trust"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    cluster = Cluster(name, port, f"postgresql://postgres@127.0.0.1:{port}/postgres", "fleet_tpl")
    try:
        cluster.ctl("start")
        cluster.wait_ready()
        create_migrated_db(cluster.template, cluster.admin_url)
        yield cluster
    finally:
        subprocess.run(["pg_dropcluster", "--stop", PG_MAJOR, name], capture_output=True, timeout=120)


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


@contextlib.asynccontextmanager
async def engine_for(config: Config) -> AsyncIterator[Engine]:
    """An engine of its own for ``config`` (its S3 retries counted in its metrics)."""
    metrics = Metrics()
    pool = await db.create_pool(config.database)
    try:
        async with S3Source(config.s3, on_retry=metrics.s3_retry) as source:
            yield Engine(config, pool, source, metrics)
    finally:
        await pool.close()


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


# --- the daemon as a process ----------------------------------------------------------

NEVER = "0 0 1 1 *"  # a cron that will not fire during a test: only the start-up pass runs


@dataclass
class Daemon:
    proc: subprocess.Popen[str]
    port: int
    log_path: Path
    config_path: Path

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str, **labels: str) -> float | None:
        _, body = self.get("/metrics")
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return None

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"event": line, "unparsed": True})
        return out

    def logged(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.logs()
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        ]

    def write_config(self, data: dict[str, Any]) -> None:
        self.config_path.write_text(to_toml(data))

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)


@pytest.fixture
def start_daemon(
    db_url: str, bucket: Bucket, tmp_path: Path
) -> Iterator[Callable[..., tuple[Daemon, dict[str, Any]]]]:
    started: list[Daemon] = []

    def start(wrap: Sequence[str] = (), **overrides: Any) -> tuple[Daemon, dict[str, Any]]:
        """``wrap``: a command line the daemon's command is appended to (a namespace)."""
        overrides.setdefault("schedule", {"cron": NEVER})
        overrides.setdefault("logging", {"format": "json"})
        daemon_cfg = {"source_check_interval_s": 0.3, "pass_retry_max_wait_s": 1.0}
        overrides["daemon"] = {**daemon_cfg, **overrides.get("daemon", {})}
        data = config_dict(db_url, bucket, **overrides)
        port = int(data["server"]["listen"].rsplit(":", 1)[1])
        config_path = tmp_path / f"config-{len(started)}.toml"
        config_path.write_text(to_toml(data))
        log_path = tmp_path / f"daemon-{len(started)}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "RUSTFS_"))}
        proc = subprocess.Popen(
            [*wrap, sys.executable, "-m", "fleetticketsd", "--config", str(config_path), "run"],
            stdout=log_path.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            text=True,
        )
        d = Daemon(proc, port, log_path, config_path)
        started.append(d)
        poll(lambda: d.get("/healthz")[0] == 200, what="daemon /healthz")
        return d, data

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)

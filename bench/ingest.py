"""Ingest benchmarks: the engine against the floor, in one run, on this machine.

    .venv/bin/python bench/ingest.py [--quick]

Builds its own data with the project's feed generator, its own scratch database and
its own S3 server (moto, as a child process so its memory is not ours), and prints:

1. baseline  34,849 rows (~14 MB), S3 → committed, against the floor measured in the
             same run: `psql \\copy` of the same file into a temp table plus the same
             INSERT … SELECT … ON CONFLICT into tickets.inc. Target ≤ 1.3× the floor.
             Process start-up is excluded from both sides: ours is timed around one
             in-process `drain()` call with the pool and S3 client already open; the
             floor is one psql session (its ~10 ms start-up is left in: the floor only
             gets harder to beat).
2. catch-up  2,000-row baseline + 1,000 deltas of ~20 rows through a loopback proxy
             adding 25 ms each way (50 ms RTT). Target: all applied and archived ≤ 20 s.
3. memory    peak RSS of a `fleetticketsd drain` process over a ~500 MB file
             (1.2 M rows). Target ≤ 250 MB.
4. delta     a 1-row delta, one pass end to end (list, ledger, get, apply, archive) on
             loopback. Target ≤ 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import boto3

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleetticketsd import feedgen
from fleetticketsd.config import Config, parse
from fleetticketsd.database import db
from fleetticketsd.ingest.apply import GUARDED_CONFLICT, RAW_EXPR
from fleetticketsd.ingest.drain import Engine, drain
from fleetticketsd.ingest.feed import COLUMNS, SENTINEL_PREFIX
from fleetticketsd.ingest.source import S3Source
from fleetticketsd.metrics import Metrics

ADMIN_URL = os.environ.get("FLEETTICKETSD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
BUCKET = "bench"
PREFIX = "automations/inc/"
REPO = Path(__file__).resolve().parent.parent
PROXY_SCRIPT = Path(__file__).resolve().parent / "latency_proxy.py"

# The same cleaning and guarded upsert as apply.UPSERT, fed by psql's own CSV parser.
FLOOR_SQL = """
\\set ON_ERROR_STOP 1
BEGIN;
CREATE TEMP TABLE floor_in ({columns}) ON COMMIT DROP;
\\copy floor_in FROM '{path}' WITH (FORMAT csv, HEADER true)
INSERT INTO tickets.inc AS t (ticket_id, raw, source_key)
SELECT DISTINCT ON (ticket_id) ticket_id, {raw}, '{key}'
FROM (SELECT *, NULL::text AS extras FROM floor_in) f
WHERE lower(is_alarm) <> 'true' AND ticket_id NOT LIKE '{sentinel}%'
ORDER BY ticket_id
{guard};
COMMIT;
"""
RESET_SQL = (
    "TRUNCATE tickets.inc, tickets.ingest_files, tickets.ingest_rejects; DELETE FROM tickets.import_meta"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# moto's own server (werkzeug's) ends every response with "Connection: close", whatever
# the HTTP version, so each request would pay a TCP handshake (one more RTT through the
# latency proxy) and a thread start in moto. Real S3 endpoints keep connections alive;
# the bench's moto does too, by serving moto's WSGI app with waitress, which supports
# HTTP/1.1 keep-alive properly.
MOTO_KEEPALIVE = (
    "import sys, waitress; "
    "from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app; "
    "waitress.serve(DomainDispatcherApplication(create_backend_app), host='127.0.0.1', "
    "port=int(sys.argv[1]), threads=8, _quiet=True, ident=None)"
)


def _wait_for(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@contextlib.contextmanager
def moto_server(pids: list[int] | None = None) -> Iterator[str]:
    """moto on a free port; its process id is appended to ``pids`` (for CPU accounting)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", MOTO_KEEPALIVE, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if pids is not None:
        pids.append(proc.pid)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(url)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # holding 100k objects, it takes its time
            proc.kill()
            proc.wait(10)


@contextlib.asynccontextmanager
async def scratch_database(suffix: str = "") -> AsyncIterator[str]:
    name = f"fleet_bench_{os.getpid()}{suffix}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    await admin.execute(f"CREATE DATABASE {name}")
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    conn = await asyncpg.connect(url)
    await db.migrate(conn)
    await conn.close()
    try:
        yield url
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


def make_config(db_url: str, endpoint: str, **ingest: Any) -> Config:
    return parse(
        {
            "database": {"url": db_url},
            "s3": {"endpoint_url": endpoint, "bucket": BUCKET},
            "datasets": {"inc": {"prefix": PREFIX, "table": "tickets.inc"}},
            "ingest": ingest,
        },
        env={},
    )


@contextlib.asynccontextmanager
async def engine_for(config: Config) -> AsyncIterator[Engine]:
    pool = await db.create_pool(config.database)
    try:
        async with S3Source(config.s3) as source:
            yield Engine(config, pool, source, Metrics())
    finally:
        await pool.close()


def s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    )


async def reset(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    await conn.execute(RESET_SQL)
    await conn.close()


def key_of(name: str) -> str:
    return f"{PREFIX}changes/{name}"


# --- 1 + 4: baseline against the floor, and a 1-row delta -----------------------------


async def bench_baseline(db_url: str, endpoint: str, workdir: Path, runs: int) -> dict[str, float]:
    spec = feedgen.FeedSpec(dataset="inc", seed=11, baseline_rows=34_849)
    path = workdir / feedgen.file_name(spec.start)
    with path.open("wb") as fh:
        feedgen.write_rows(fh, spec, spec.baseline_rows)
    data = path.read_bytes()
    s3 = s3_client(endpoint)
    columns = ", ".join(f'"{c}" text' for c in COLUMNS)
    floor_sql = workdir / "floor.sql"
    floor_sql.write_text(
        FLOOR_SQL.format(
            columns=columns,
            path=path,
            raw=RAW_EXPR,
            key=key_of(path.name),
            sentinel=SENTINEL_PREFIX,
            guard=GUARDED_CONFLICT.strip(),
        )
    )
    psql = shutil.which("psql") or "psql"
    floors, ours, deltas = [], [], []
    config = make_config(db_url, endpoint)
    async with engine_for(config) as engine:
        for _ in range(runs):
            await reset(db_url)
            t = time.perf_counter()
            subprocess.run([psql, "-q", "-X", "-d", db_url, "-f", str(floor_sql)], check=True)  # noqa: ASYNC221 - timed on purpose
            floors.append(time.perf_counter() - t)

            await reset(db_url)
            s3.put_object(Bucket=BUCKET, Key=key_of(path.name), Body=data)
            t = time.perf_counter()
            report = await drain(engine, config.dataset("inc"))
            ours.append(time.perf_counter() - t)
            assert report.ok and report.files_applied == 1, report

            for i in range(3):
                when = spec.start + timedelta(minutes=5 + i)
                body = feedgen.generate(
                    feedgen.FeedSpec(dataset="inc", seed=100 + i, baseline_rows=1, deltas=0)
                )
                _, one = next(body)
                s3.put_object(Bucket=BUCKET, Key=key_of(feedgen.file_name(when)), Body=one)
                t = time.perf_counter()
                report = await drain(engine, config.dataset("inc"))
                deltas.append(time.perf_counter() - t)
                assert report.ok and report.files_applied == 1, report
    return {
        "rows": 34_849,
        "mb": len(data) / 1e6,
        "floor_s": statistics.median(floors),
        "ours_s": statistics.median(ours),
        "delta_ms": statistics.median(deltas) * 1000,
    }


# --- 2: catch-up over a 50 ms RTT ---------------------------------------------------------


async def bench_catch_up(db_url: str, endpoint: str, deltas: int) -> dict[str, float]:
    await reset(db_url)
    s3 = s3_client(endpoint)
    spec = feedgen.FeedSpec(
        dataset="inc", seed=5, baseline_rows=2_000, deltas=deltas, delta_rows=20, delta_interval_s=60
    )
    files = list(feedgen.generate(spec))
    for name, body in files:
        s3.put_object(Bucket=BUCKET, Key=key_of(name), Body=body)
    # The proxy runs as its own process, like a real network: its work is not ours.
    proxy_port = free_port()
    proxy = subprocess.Popen(  # noqa: ASYNC220 - started once, before the timed part
        [
            sys.executable,
            str(PROXY_SCRIPT),
            "--target",
            endpoint.split("//", 1)[1],
            "--port",
            str(proxy_port),
            "--delay-s",
            "0.025",
        ]
    )
    config = make_config(db_url, f"http://127.0.0.1:{proxy_port}")
    try:
        _wait_for(f"http://127.0.0.1:{proxy_port}")
        async with engine_for(config) as engine:
            t = time.perf_counter()
            report = await drain(engine, config.dataset("inc"))
            elapsed = time.perf_counter() - t
    finally:
        proxy.terminate()
        proxy.wait(10)
    assert report.ok and report.files_applied == len(files), report
    left = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}changes/").get("KeyCount", 0)
    assert left == 0, f"{left} files not archived"
    return {"files": len(files), "seconds": elapsed}


# --- 3: memory over a 500 MB file ------------------------------------------------------------

RSS_CHILD = """
import resource, sys
from fleetticketsd.cli import main
code = main(["--config", sys.argv[1], "drain", "--json"])
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


async def bench_memory(db_url: str, endpoint: str, workdir: Path, rows: int) -> dict[str, float]:
    await reset(db_url)
    spec = feedgen.FeedSpec(dataset="inc", seed=21, baseline_rows=rows, sentinel=False)
    path = workdir / "big.csv"
    with path.open("wb") as fh:
        size = feedgen.write_rows(fh, spec, rows)
    s3 = s3_client(endpoint)
    s3.upload_file(str(path), BUCKET, key_of(feedgen.file_name(datetime(2026, 7, 1, 8, 0, 0))))
    path.unlink()
    cfg = workdir / "memory.toml"
    cfg.write_text(
        f'[database]\nurl = "{db_url}"\n[s3]\nendpoint_url = "{endpoint}"\nbucket = "{BUCKET}"\n'
        f'[datasets.inc]\nprefix = "{PREFIX}"\ntable = "tickets.inc"\n[logging]\nformat = "json"\n'
    )
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    t = time.perf_counter()
    res = subprocess.run(  # noqa: ASYNC221 - the drain under test is this child
        [sys.executable, "-c", RSS_CHILD, str(cfg)], env=env, capture_output=True, text=True, cwd=REPO
    )
    elapsed = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"drain failed: {res.stderr[-2000:]}")
    kb = int(res.stderr.rsplit("MAXRSS_KB", 1)[1].split()[0])
    return {"mb": size / 1e6, "rows": rows, "rss_mb": kb / 1024, "seconds": elapsed}


# --- the run ------------------------------------------------------------------------------


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller catch-up and memory runs (smoke test)")
    ap.add_argument("--skip-memory", action="store_true", help="leave out the 500 MB run (two minutes)")
    args = ap.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    print(f"fleetticketsd ingest bench — {datetime.now():%Y-%m-%d %H:%M} — {platform.node()}")
    print(f"machine: {os.cpu_count()} cores, {_mem_gb():.0f} GiB, Python {platform.python_version()}\n")
    with moto_server() as endpoint, tempfile.TemporaryDirectory() as tmp:
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        async with scratch_database() as db_url:
            base = await bench_baseline(db_url, endpoint, Path(tmp), runs=3)
            catch = await bench_catch_up(db_url, endpoint, deltas=200 if args.quick else 1000)
            mem = (
                None
                if args.skip_memory
                else await bench_memory(
                    db_url, endpoint, Path(tmp), rows=100_000 if args.quick else 1_200_000
                )
            )
    ratio = base["ours_s"] / base["floor_s"]
    rows = [
        (
            f"1 baseline {base['rows']:,} rows / {base['mb']:.1f} MB",
            f"{base['ours_s']:.2f} s vs floor {base['floor_s']:.2f} s = {ratio:.2f}×",
            "≤ 1.3× floor",
            ratio <= 1.3,
        ),
        (
            f"2 catch-up {catch['files']:,} files, 50 ms RTT",
            f"{catch['seconds']:.1f} s",
            "≤ 20 s",
            catch["seconds"] <= 20,
        ),
        (
            f"3 memory {mem['mb']:.0f} MB / {mem['rows']:,} rows" if mem else "3 memory (skipped)",
            f"peak RSS {mem['rss_mb']:.0f} MB ({mem['seconds']:.0f} s)" if mem else "-",
            "≤ 250 MB",
            mem is None or mem["rss_mb"] <= 250,
        ),
        ("4 one-row delta, one pass", f"{base['delta_ms']:.0f} ms", "≤ 50 ms", base["delta_ms"] <= 50),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'benchmark':{width}}  {'measured':42}  {'target':14}  met")
    for name, measured, target, ok in rows:
        print(f"{name:{width}}  {measured:42}  {target:14}  {'yes' if ok else 'NO'}")


def _mem_gb() -> float:
    with open("/proc/meminfo") as fh:
        return int(fh.readline().split()[1]) / 1024 / 1024


if __name__ == "__main__":
    asyncio.run(main())

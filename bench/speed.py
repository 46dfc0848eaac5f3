"""Speed that does not grow with the table (issue 16): figures beside their targets, one run.

    .venv/bin/python bench/speed.py [--quick] [--only catchup,delta,datasets,backlog]

Builds its own scratch database and moto server (bench/ingest.py's helpers) and prints:

1. catch-up  1,000 deltas of 20 rows through a 50 ms RTT proxy (bench/latency_proxy.py),
             side by side: the shipped config (post_apply = ["capture_history"]) on a
             30,000-row table, no post_apply on 30,000, and no post_apply on 2,000.
             Targets: shipped at 30k ≤ 10 s and ≤ 1.3× no-post_apply at 2k.
2. delta     one 1-row delta, one pass end to end on loopback, at 10,000 and at 300,000
             rows, with the database's share (time awaiting PostgreSQL) printed beside
             the S3 share (time awaiting the bucket). Targets: 300k ≤ 1.25× 10k and ≤ 20 ms.
4. datasets  `fleetticketsd run` as a process with 1, then 20 datasets, 50 ms RTT; a
             20-row delta lands in every dataset at once, five times: the median pass
             time of a pass that applied a file, the daemon's CPU per file, its peak RSS.
             Targets: 20 datasets ≤ 1.2× one alone; peak RSS ≤ 300 MB.
5. backlog   100,000 tiny files pending under changes/ (created with concurrent puts);
             one pass, stopped after 2,000 commits: the time to its first commit, the
             apply's wait for prefetched bytes, the memory the pass added. Target: first
             commit ≤ 30 s.

Each catch-up uses its own prefix and an emptied table, so the variants share nothing
but the machine. The shares of 2 are wall time spent awaiting each side, measured by
wrapping asyncpg's and the S3 source's calls (they overlap a little: the two listings
of a pass run at once).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import (  # bench/ is not a package: found through sys.path
    BUCKET,
    PROXY_SCRIPT,
    _wait_for,
    engine_for,
    free_port,
    moto_server,
    s3_client,
    scratch_database,
)

from fleetticketsd import feedgen, logs
from fleetticketsd.config import Config, parse
from fleetticketsd.ingest.drain import Engine, drain
from fleetticketsd.ingest.source import S3Source

DISTINCT_SHARE = 0.7035  # distinct tickets per row of feedgen's baseline (seed 11)
SHIPPED_POST_APPLY = ["capture_history"]  # config.toml's [datasets.inc]
EMPTY_TABLE = (
    "TRUNCATE tickets.inc, tickets.ingest_files, tickets.ingest_rejects; DELETE FROM tickets.import_meta"
)
# The history hook's tables, when the schema has them: a catch-up starts from none.
EMPTY_HISTORY = """
DO $$ BEGIN
    IF to_regclass('tickets.closure_events') IS NOT NULL THEN TRUNCATE tickets.closure_events; END IF;
    IF to_regclass('tickets.inc_daily_snapshot') IS NOT NULL THEN TRUNCATE tickets.inc_daily_snapshot; END IF;
END $$
"""


def config_for(db_url: str, endpoint: str, prefix: str, post_apply: list[str]) -> Config:
    return parse(
        {
            "database": {"url": db_url},
            "s3": {"endpoint_url": endpoint, "bucket": BUCKET},
            "datasets": {"inc": {"prefix": prefix, "table": "tickets.inc", "post_apply": post_apply}},
        },
        env={},
    )


async def empty(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    await conn.execute(EMPTY_TABLE)
    await conn.execute(EMPTY_HISTORY)
    await conn.execute("VACUUM ANALYZE tickets.inc")
    await conn.close()


# What autovacuum does within a minute of a baseline landing in an empty table: a table
# users have has statistics that know its size. Without them, the planner takes the
# prepared-features table for a few rows, and the features trigger's DELETE of a
# 20-row file reads all of them (15.6 ms a file's upsert at 30k rows, not 7.9).
SETTLE = ("VACUUM ANALYZE tickets.inc", "VACUUM ANALYZE tickets.ticket_features")


async def settle(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    for statement in SETTLE:
        await conn.execute(statement)
    await conn.close()


def put_all(endpoint: str, items: list[tuple[str, bytes]]) -> None:
    """Upload concurrently: moto takes a few ms a put, and a backlog is thousands."""
    s3 = s3_client(endpoint)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: s3.put_object(Bucket=BUCKET, Key=kv[0], Body=kv[1]), items))


@contextlib.contextmanager
def latency_proxy(endpoint: str, delay_s: float = 0.025, pids: list[int] | None = None) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(PROXY_SCRIPT),
            "--target",
            endpoint.split("//", 1)[1],
            "--port",
            str(port),
            "--delay-s",
            str(delay_s),
        ]
    )
    if pids is not None:
        pids.append(proc.pid)
    try:
        _wait_for(f"http://127.0.0.1:{port}")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


# --- 1: catch-up ----------------------------------------------------------------------------


async def catch_up(
    db_url: str, endpoint: str, tag: str, baseline_rows: int, post_apply: list[str], deltas: int
) -> dict[str, float]:
    """The baseline applied on loopback (untimed), then the deltas over 50 ms RTT (timed)."""
    await empty(db_url)
    prefix = f"bench-{tag}/inc/"
    spec = feedgen.FeedSpec(
        dataset="inc", seed=5, baseline_rows=baseline_rows, deltas=deltas, delta_rows=20, delta_interval_s=60
    )
    files = list(feedgen.generate(spec))
    key = f"{prefix}changes/"
    put_all(endpoint, [(key + files[0][0], files[0][1])])
    config = config_for(db_url, endpoint, prefix, post_apply)
    async with engine_for(config) as engine:
        base = await drain(engine, config.dataset("inc"))
    assert base.ok and base.files_applied == 1, base
    await settle(db_url)
    put_all(endpoint, [(key + name, body) for name, body in files[1:]])
    proxy_pid: list[int] = []
    with latency_proxy(endpoint, pids=proxy_pid) as proxied:
        config = config_for(db_url, proxied, prefix, post_apply)
        async with engine_for(config) as engine:
            cpu = CpuShares({"fleetticketsd": os.getpid(), "moto": S3_PIDS[0], "proxy": proxy_pid[0]})
            t = time.perf_counter()
            report = await drain(engine, config.dataset("inc"))
            elapsed = time.perf_counter() - t
            used = cpu.since()
    assert report.ok and report.files_applied == deltas, report
    left = s3_client(endpoint).list_objects_v2(Bucket=BUCKET, Prefix=key).get("KeyCount", 0)
    assert left == 0, f"{left} files not archived"
    return {"seconds": elapsed, "files": deltas, "rows": baseline_rows, "cpu": used}


S3_PIDS: list[int] = []  # the bench's moto (main() starts it)


class CpuShares:
    """CPU seconds each named process used since creation, and the rest of the machine's
    (PostgreSQL, the kernel's loopback traffic, anything else): on 2 cores shared by
    the daemon, moto, the proxy and PostgreSQL, a catch-up is bound by their sum."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start = {name: process_cpu_s(pid) for name, pid in pids.items()}
        self.machine = machine_cpu_s()

    def since(self) -> dict[str, float]:
        used = {name: process_cpu_s(pid) - self.start[name] for name, pid in self.pids.items()}
        busy, total = (a - b for a, b in zip(machine_cpu_s(), self.machine, strict=True))
        used["rest"] = max(0.0, busy - sum(used.values()))
        used["busy_share"] = busy / total if total else 0.0
        return used


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


def cpu_note(c: dict[str, float]) -> str:
    return (
        f"CPU s: us {c['fleetticketsd']:.1f}, moto {c['moto']:.1f}, proxy {c['proxy']:.1f}, "
        f"PostgreSQL+rest {c['rest']:.1f}; cores {c['busy_share']:.0%} busy"
    )


# --- 2: a 1-row delta at 10k and 300k rows ------------------------------------------------------


class Shares:
    """Wall time spent awaiting the database and the bucket, by wrapping their calls."""

    DB_CALLS = ("execute", "fetch", "fetchrow", "fetchval", "copy_records_to_table")
    # Every S3Source call a pass makes (list_files reads through list_pages, timed there).
    S3_CALLS = ("any_file", "copy_to_processed", "delete_many", "_move", "head")

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._undo: list[Callable[[], None]] = []

    def _wrap(self, owner: Any, name: str, side: str) -> None:
        real = getattr(owner, name)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return await real(*args, **kwargs)
            finally:
                self.seconds[side] += time.perf_counter() - t

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, real))

    def _wrap_pages(self) -> None:
        real = S3Source.list_pages
        shares = self

        async def timed_pages(self: S3Source, *args: Any, **kwargs: Any) -> AsyncIterator[list[Any]]:
            pages = real(self, *args, **kwargs).__aiter__()
            while True:
                t = time.perf_counter()
                try:
                    page = await pages.__anext__()
                except StopAsyncIteration:
                    return
                finally:
                    shares.seconds["s3"] += time.perf_counter() - t
                yield page

        S3Source.list_pages = timed_pages  # type: ignore[method-assign]
        self._undo.append(lambda: setattr(S3Source, "list_pages", real))

    def _wrap_open(self) -> None:
        real = S3Source.open
        shares = self

        @contextlib.asynccontextmanager
        async def timed_open(self: S3Source, f: Any, chunk_bytes: int) -> AsyncIterator[AsyncIterator[bytes]]:
            t = time.perf_counter()
            async with real(self, f, chunk_bytes) as chunks:
                data = b"".join([c async for c in chunks])
            shares.seconds["s3"] += time.perf_counter() - t

            async def again() -> AsyncIterator[bytes]:
                yield data

            yield again()

        S3Source.open = timed_open  # type: ignore[method-assign]
        self._undo.append(lambda: setattr(S3Source, "open", real))

    def __enter__(self) -> Shares:
        for name in self.DB_CALLS:
            self._wrap(asyncpg.Connection, name, "db")
        for name in self.S3_CALLS:
            self._wrap(S3Source, name, "s3")
        self._wrap_pages()
        self._wrap_open()
        return self

    def __exit__(self, *_: object) -> None:
        for undo in reversed(self._undo):
            undo()


async def one_row_deltas(
    engine: Engine, endpoint: str, prefix: str, start: datetime, runs: int
) -> dict[str, float]:
    s3 = s3_client(endpoint)
    passes, dbs, s3s = [], [], []
    for i in range(runs + 1):  # the first warms the connection's statement cache
        when = start + timedelta(minutes=5 + i)
        body = feedgen.generate(feedgen.FeedSpec(dataset="inc", seed=100 + i, baseline_rows=1, deltas=0))
        _, one = next(body)
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}changes/{feedgen.file_name(when)}", Body=one)
        with Shares() as shares:
            t = time.perf_counter()
            report = await drain(engine, engine.config.dataset("inc"))
            elapsed = time.perf_counter() - t
        assert report.ok and report.files_applied == 1, report
        if i:
            passes.append(elapsed)
            dbs.append(shares.seconds["db"])
            s3s.append(shares.seconds["s3"])
    return {
        "pass_ms": statistics.median(passes) * 1000,
        "db_ms": statistics.median(dbs) * 1000,
        "s3_ms": statistics.median(s3s) * 1000,
    }


def upload_baseline(endpoint: str, spec: feedgen.FeedSpec, rows: int, key: str) -> None:
    path = Path(f"/tmp/fleet-bench-{os.getpid()}-{rows}.csv")
    with path.open("wb") as fh:
        feedgen.write_rows(fh, spec, rows)
    s3_client(endpoint).upload_file(str(path), BUCKET, key)
    path.unlink()


async def delta_at_sizes(
    db_url: str, endpoint: str, sizes: list[int], runs: int, post_apply: list[str], tag: str
) -> dict[int, dict[str, float]]:
    """Grow one table through the sizes (each baseline a newer full export of the
    same tickets and more) and time 1-row deltas at each."""
    await empty(db_url)
    prefix = f"bench-{tag}/inc/"
    config = config_for(db_url, endpoint, prefix, post_apply)
    out: dict[int, dict[str, float]] = {}
    start = datetime(2026, 7, 1, 8, 0, 0)
    async with engine_for(config) as engine:
        for n, rows in enumerate(sizes):
            at = start + timedelta(hours=n)
            # A full export repeats tickets (their earlier states): ~70% of its rows are
            # distinct tickets, so the export is sized for the table to hold ``rows``.
            export_rows = round(rows / DISTINCT_SHARE)
            spec = feedgen.FeedSpec(
                dataset="inc", seed=11, baseline_rows=export_rows, sentinel=False, start=at
            )
            upload_baseline(endpoint, spec, export_rows, f"{prefix}changes/{feedgen.file_name(at)}")
            base = await drain(engine, config.dataset("inc"))
            assert base.ok and base.files_applied == 1, base
            await settle(db_url)
            async with engine.pool.acquire() as conn:
                have = await conn.fetchval("SELECT count(*) FROM tickets.inc")
            out[rows] = await one_row_deltas(engine, endpoint, prefix, at, runs) | {"table_rows": have}
    return out


# --- 4: 20 datasets in one daemon --------------------------------------------------------------

NEVER = "0 0 1 1 *"  # the cron stays out of it: passes start on arrival


def daemon_toml(db_url: str, endpoint: str, names: list[str], port: int) -> str:
    lines = [
        f'[database]\nurl = "{db_url}"\npool_max_size = {len(names) + 2}',
        f'[s3]\nendpoint_url = "{endpoint}"\nbucket = "{BUCKET}"',
        f'[server]\nlisten = "127.0.0.1:{port}"',
        f'[schedule]\ncron = "{NEVER}"',
        "[daemon]\nsource_check_interval_s = 1.0",
        '[geocoder]\nenabled = false\nprovider = "nominatim"',
        '[logging]\nformat = "json"',
    ]
    lines += [f'[datasets.{n}]\nprefix = "bench-many{len(names)}/{n}/"\ntable = "tickets.{n}"' for n in names]
    return "\n".join(lines) + "\n"


def passes_done(log_path: Path) -> list[dict[str, Any]]:
    out = []
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            e = json.loads(line)
            if e.get("event") == "drain pass done":
                out.append(e)
    return out


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


async def prepare_many(db_url: str, names: list[str]) -> None:
    conn = await asyncpg.connect(db_url)
    for n in names:
        if await conn.fetchval("SELECT to_regclass($1)", f"tickets.{n}") is None:
            await conn.execute("SELECT tickets.create_dataset_table($1)", n)
        await conn.execute(f"TRUNCATE tickets.{n}")
    await conn.execute("DELETE FROM tickets.ingest_files WHERE dataset LIKE 'many%'")
    await conn.execute("DELETE FROM tickets.import_meta WHERE dataset LIKE 'many%'")
    await conn.close()


def many_names(count: int) -> list[str]:
    return [f"many{i:02d}" for i in range(count)]


def many_datasets(db_url: str, endpoint: str, count: int, rounds: int, workdir: Path) -> dict[str, float]:
    """``count`` datasets in one daemon process, one 20-row delta landing in each at once,
    ``rounds`` times: the median pass time of a pass that applied a file, and peak RSS.
    The tables must exist (prepare_many)."""
    names = many_names(count)
    port = free_port()
    cfg = workdir / f"many-{count}.toml"
    cfg.write_text(daemon_toml(db_url, endpoint, names, port))
    log_path = workdir / f"many-{count}.log"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    with log_path.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleetticketsd", "--config", str(cfg), "run"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
        )
    try:
        wait_until(lambda: len(passes_done(log_path)) >= count, 120, "the start-up passes")
        spec = feedgen.FeedSpec(dataset="inc", seed=5, baseline_rows=20, deltas=0, sentinel=False)
        _, body = next(feedgen.generate(spec))
        start = datetime(2026, 7, 1, 8, 0, 0)
        cpu_before = process_cpu_s(proc.pid)
        for r in range(rounds):
            name = feedgen.file_name(start + timedelta(minutes=r))
            put_all(endpoint, [(f"bench-many{count}/{n}/changes/{name}", body) for n in names])
            want = count * (r + 1)
            wait_until(
                lambda want=want: sum(1 for e in passes_done(log_path) if e["files_applied"]) >= want,
                120,
                f"round {r}",
            )
        cpu_s = process_cpu_s(proc.pid) - cpu_before
        status = Path(f"/proc/{proc.pid}/status").read_text()
        hwm_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    finally:
        proc.terminate()
        proc.wait(30)
    applied = [e["seconds"] for e in passes_done(log_path) if e["files_applied"]]
    return {
        "pass_ms": statistics.median(applied) * 1000,
        "rss_mb": hwm_kb / 1024,
        "passes": len(applied),
        # The daemon's CPU per applied file (its one event loop), source checks included.
        "cpu_ms_per_file": cpu_s * 1000 / (count * rounds),
    }


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- 5: a backlog of 100,000 files after a long outage ------------------------------------------


async def backlog(db_url: str, endpoint: str, files: int, apply_first: int) -> dict[str, float]:
    """``files`` tiny files under changes/; one pass, stopped after ``apply_first`` commits:
    the time to its first commit, the listing's memory, the prefetch's wait."""
    await empty(db_url)
    prefix = "bench-backlog/inc/"
    spec = feedgen.FeedSpec(dataset="inc", seed=7, baseline_rows=1, deltas=0, sentinel=False)
    _, body = next(feedgen.generate(spec))
    start = datetime(2026, 7, 1, 0, 0, 0)
    t = time.perf_counter()
    keys = [f"{prefix}changes/{feedgen.file_name(start + timedelta(seconds=i))}" for i in range(files)]
    s3 = s3_client(endpoint)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=BUCKET, Key=k, Body=body), keys))
    created_s = time.perf_counter() - t
    config = config_for(db_url, endpoint, prefix, [])
    stop = asyncio.Event()

    def progress(_ds: object, done: int, _total: int, _result: object) -> None:
        if done >= apply_first:
            stop.set()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with engine_for(config) as engine:
        t = time.perf_counter()
        report = await drain(engine, config.dataset("inc"), stop=stop, progress=progress)
        elapsed = time.perf_counter() - t
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert report.ok and report.files_applied >= apply_first, report
    first = report.first_commit_s or 0.0
    applying_s = elapsed - first
    return {
        "files": files,
        "created_s": created_s,
        "first_commit_s": first,
        "applied": report.files_applied,
        "files_per_s": report.files_applied / max(applying_s, 1e-9),
        "fetch_wait_share": report.fetch_wait_s / max(applying_s, 1e-9),
        "rss_growth_mb": (rss_after - rss_before) / 1024,
    }


# --- the run ----------------------------------------------------------------------------------------


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200 deltas, 100k rows (a smoke test)")
    ap.add_argument(
        "--only",
        default="catchup,delta,datasets,backlog",
        help="comma-separated: catchup, delta, datasets, backlog",
    )
    ap.add_argument("--keep", default=None, help="a directory to keep the daemons' logs in (debugging)")
    ap.add_argument("--log", default=None, help="where the drains' JSON log lines go (default: a temp file)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    # The drains log as the daemon does in a container (INFO, one JSON line per event):
    # unconfigured, structlog would render every line for a terminal, at another cost.
    log_path = Path(args.log) if args.log else Path(tempfile.gettempdir()) / f"fleet-speed-{os.getpid()}.log"
    log_file = log_path.open("w")
    logs.configure("info", "json", stream=log_file)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    deltas = 200 if args.quick else 1000
    big = 100_000 if args.quick else 300_000
    print(f"fleetticketsd speed bench — {datetime.now():%Y-%m-%d %H:%M} — {platform.node()}")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start\n")
    rows: list[tuple[str, str, str, bool]] = []
    with moto_server(S3_PIDS) as endpoint:
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        async with scratch_database("_speed") as db_url:
            if "catchup" in only:
                shipped = await catch_up(db_url, endpoint, "shipped30k", 30_000, SHIPPED_POST_APPLY, deltas)
                bare30 = await catch_up(db_url, endpoint, "bare30k", 30_000, [], deltas)
                bare2 = await catch_up(db_url, endpoint, "bare2k", 2_000, [], deltas)
                ratio = shipped["seconds"] / bare2["seconds"]
                runs = (shipped, bare30, bare2)
                rows += [
                    (
                        f"1a catch-up {deltas:,} deltas, 50 ms RTT, shipped config, 30k rows",
                        f"{shipped['seconds']:.1f} s",
                        "≤ 10 s",
                        shipped["seconds"] <= 10,
                    ),
                    (
                        "1b   the same, no post_apply, 30k rows",
                        f"{bare30['seconds']:.1f} s",
                        "-",
                        True,
                    ),
                    (
                        "1c   the same, no post_apply, 2k rows",
                        f"{bare2['seconds']:.1f} s",
                        "-",
                        True,
                    ),
                    ("1d   shipped 30k / no post_apply 2k", f"{ratio:.2f}×", "≤ 1.3×", ratio <= 1.3),
                    (
                        "1e   no post_apply 30k / 2k",
                        f"{bare30['seconds'] / bare2['seconds']:.2f}×",
                        "-",
                        True,
                    ),
                    # Where the two cores went during each timed catch-up.
                    *(
                        (f"1{t}   {cpu_note(r['cpu'])}", "", "-", True)
                        for t, r in zip("abc", runs, strict=True)
                    ),
                ]
            if "delta" in only:
                for label, post in (("no post_apply", []), ("shipped config", SHIPPED_POST_APPLY)):
                    tag = "delta-bare" if not post else "delta-shipped"
                    d = await delta_at_sizes(db_url, endpoint, [10_000, big], 5, post, tag)
                    small, large = d[10_000], d[big]
                    grow = large["pass_ms"] / small["pass_ms"]
                    for size, fig in ((10_000, small), (big, large)):
                        rows.append(
                            (
                                f"2 one-row delta, {label}, {fig['table_rows']:,.0f} rows",
                                f"{fig['pass_ms']:.1f} ms (db {fig['db_ms']:.1f}, s3 {fig['s3_ms']:.1f})",
                                "≤ 20 ms" if size == big else "-",
                                fig["pass_ms"] <= 20 if size == big else True,
                            )
                        )
                    name = f"2   {label}: {big // 1000}k / 10k"
                    rows.append((name, f"{grow:.2f}×", "≤ 1.25×", grow <= 1.25))
            if "datasets" in only:
                logs_dir = contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory()
                with latency_proxy(endpoint) as proxied, logs_dir as tmp:
                    await prepare_many(db_url, many_names(1))
                    alone = await asyncio.to_thread(many_datasets, db_url, proxied, 1, 5, Path(tmp))
                    await prepare_many(db_url, many_names(20))
                    many = await asyncio.to_thread(many_datasets, db_url, proxied, 20, 5, Path(tmp))
                ratio = many["pass_ms"] / alone["pass_ms"]
                rows += [
                    (
                        "4 one dataset, a 20-row delta per pass, 50 ms RTT",
                        f"{alone['pass_ms']:.0f} ms a pass, {alone['cpu_ms_per_file']:.0f} ms CPU a file",
                        "-",
                        True,
                    ),
                    (
                        "4 20 datasets in one daemon, the same per dataset",
                        f"{many['pass_ms']:.0f} ms ({ratio:.2f}×), "
                        f"{many['cpu_ms_per_file']:.0f} ms CPU a file",
                        "≤ 1.2×",
                        ratio <= 1.2,
                    ),
                    (
                        "4   peak RSS with 20 datasets",
                        f"{many['rss_mb']:.0f} MB",
                        "≤ 300 MB",
                        many["rss_mb"] <= 300,
                    ),
                ]
            if "backlog" in only:
                n = 10_000 if args.quick else 100_000
                b = await backlog(db_url, endpoint, n, 2_000)
                rows += [
                    (
                        f"5 {n:,} files pending: first commit",
                        f"{b['first_commit_s']:.1f} s (created in {b['created_s']:.0f} s)",
                        "≤ 30 s",
                        b["first_commit_s"] <= 30,
                    ),
                    (
                        f"5   then {b['applied']:,} files applied",
                        f"{b['files_per_s']:.0f} files/s, waiting for bytes {b['fetch_wait_share']:.0%}",
                        "-",
                        True,
                    ),
                    (
                        "5   memory the pass added (peak RSS growth)",
                        f"{b['rss_growth_mb']:.0f} MB",
                        "-",
                        True,
                    ),
                ]
    width = max(len(r[0]) for r in rows)
    print(f"{'benchmark':{width}}  {'measured':34}  {'target':8}  met")
    for name, measured, target, ok in rows:
        print(f"{name:{width}}  {measured:34}  {target:8}  {'yes' if ok else 'NO'}")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end (2 cores shared with other work)")
    print(f"drain logs: {log_path}")


if __name__ == "__main__":
    asyncio.run(main())

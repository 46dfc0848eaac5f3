"""Soak: the daemon as a process applies a few thousand files while the bucket misbehaves.

    .venv/bin/python bench/soak.py [--inc 2000] [--crq 1000] [--seconds 150]

A bench, not a test (minutes, not seconds; `make test` does not run it). It builds its
own scratch databases, its own moto server, and tests/s3_fault_proxy.py in front of it,
starts `fleetticketsd run` (cron every 2 s, geocoding off) and feeds it both datasets'
files in name order over ``--seconds``. Meanwhile, at random, the proxy answers 503
SlowDown with Retry-After, 500 InternalError, 403 InvalidAccessKeyId, stalls a body
after its headers, trickles one, cuts one, resets a connection, refuses connections
for a few seconds; as root the daemon runs in a mount namespace resolving the
endpoint's name from a hosts file, and the name stops resolving now and then; and the
daemon's busy database backend is terminated now and then.

It prints the daemon's RSS, open file descriptors, database connections and asyncio
tasks once warm and at the end (and every 30 s), the faults injected, the failed
passes by stage, and the files lost or doubled: the ledger must hold every uploaded
file exactly once, every file must be in processed/, the files-applied counter must
equal the ledger, and the tables must equal a fresh in-order drain of the same files.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from prometheus_client.parser import text_string_to_metric_families

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(BENCH), str(REPO)]

from ingest import free_port, moto_server, s3_client, scratch_database  # noqa: E402

from fleetticketsd import feedgen, logs  # noqa: E402
from fleetticketsd.config import parse  # noqa: E402
from fleetticketsd.database import db  # noqa: E402
from fleetticketsd.ingest.drain import Engine, drain  # noqa: E402
from fleetticketsd.ingest.source import S3Source  # noqa: E402
from fleetticketsd.metrics import Metrics  # noqa: E402
from tests.conftest import to_toml  # noqa: E402
from tests.s3_fault_proxy import FaultProxy, fault_proxy  # noqa: E402

BUCKET = "soak"
DATASETS = ("inc", "crq")
NAME = "s3.soak.test"
TABLE_ROWS = "SELECT to_jsonb(t) - 'ingested_at' - 'updated_at' FROM tickets.{table} t ORDER BY ticket_id"


def feeds(inc: int, crq: int) -> dict[str, list[tuple[str, bytes]]]:
    """Both datasets' files (a baseline and small deltas), interleaved by name later."""
    specs = {
        "inc": feedgen.FeedSpec(dataset="inc", seed=7, baseline_rows=1500, deltas=inc - 1, delta_rows=8),
        "crq": feedgen.FeedSpec(dataset="crq", seed=8, baseline_rows=500, deltas=crq - 1, delta_rows=4),
    }
    return {ds: list(feedgen.generate(spec)) for ds, spec in specs.items()}


# --- the daemon's resources -----------------------------------------------------------------


@dataclass
class Sample:
    at_s: float
    applied: int
    rss_mb: float
    fds: int
    db_conns: int
    tasks: int

    def row(self) -> str:
        return (
            f"{self.at_s:7.0f} s  {self.applied:5d} files  RSS {self.rss_mb:6.1f} MB  fds {self.fds:3d}  "
            f"db conns {self.db_conns:2d}  asyncio tasks {self.tasks:3d}"
        )


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def total(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in m.items() if n == name and want <= set(lab))


def rss_and_fds(pid: int) -> tuple[float, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


async def sample(pid: int, port: int, db_url: str, started: float) -> Sample:
    rss_mb, fds = rss_and_fds(pid)
    m = await asyncio.to_thread(metrics, port)
    conn = await asyncpg.connect(db_url)
    try:
        conns = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'fleetticketsd'"
        )
    finally:
        await conn.close()
    return Sample(
        time.monotonic() - started,
        int(total(m, "fleettickets_files_applied_total")),
        rss_mb,
        fds,
        int(conns),
        int(total(m, "fleettickets_asyncio_tasks")),
    )


# --- faults ---------------------------------------------------------------------------------


@dataclass
class Faults:
    proxy: FaultProxy
    hosts: Path | None
    db_url: str
    rng: random.Random
    injected: Counter[str] = field(default_factory=Counter)

    def s3_fault(self) -> None:
        """One fault, of one kind, drawn at random; most of them for a request or two."""
        r = self.rng
        changes = rf"prefix=automations/({'|'.join(DATASETS)})/changes/"
        kinds: list[tuple[str, Callable[[], None]]] = [
            ("503 SlowDown + Retry-After", lambda: self.proxy.add(
                op="list", key=changes, times=r.randint(1, 3), status=503, code="SlowDown",
                message="Please reduce your request rate.", headers={"Retry-After": "1"})),
            ("500 InternalError", lambda: self.proxy.add(
                op=r.choice(["list", "get", "copy", "delete"]), times=r.randint(1, 4), status=500,
                code="InternalError", message="We encountered an internal error.")),
            ("403 InvalidAccessKeyId", lambda: self.proxy.add(
                op="list", key=changes, times=1, status=403, code="InvalidAccessKeyId",
                message="The AWS Access Key Id you provided does not exist in our records.")),
            ("stall after headers", lambda: self.proxy.add(op="get", times=1, stall_after_s=30.0)),
            ("trickle", lambda: self.proxy.add(
                op="get", times=2, trickle_bytes=512, trickle_interval_s=0.2)),
            ("cut body", lambda: self.proxy.add(op="get", times=1, cut_after_bytes=r.randint(1, 300))),
            ("connection reset", lambda: self.proxy.add(op=r.choice(["get", "copy"]), times=1, reset=True)),
        ]  # fmt: skip
        name, add = r.choice(kinds)
        add()
        self.injected[name] += 1

    async def refused(self) -> None:
        self.proxy.down()
        self.injected["connection refused"] += 1
        await asyncio.sleep(self.rng.uniform(1, 3))
        self.proxy.up()

    async def unresolvable(self) -> None:
        """The name stops resolving: longer than aiohttp's 10 s DNS cache, and with the
        kept-alive connections dropped, so that new connections need the name."""
        assert self.hosts is not None
        self.hosts.write_text("127.0.0.1 localhost\n")
        self.proxy.down()
        self.proxy.up()
        self.injected["name does not resolve"] += 1
        await asyncio.sleep(12)
        self.hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {NAME}\n")

    async def terminate_backend(self) -> None:
        """The busy backend (a file in flight) if there is one, else an idle pooled one."""
        conn = await asyncpg.connect(self.db_url)
        try:
            rows = await conn.fetch(
                "SELECT pid, state FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'fleetticketsd' ORDER BY state = 'active' DESC, random() LIMIT 1"
            )
            for r in rows:
                await conn.execute("SELECT pg_terminate_backend($1)", r["pid"])
                self.injected[f"database backend terminated ({r['state']})"] += 1
        finally:
            await conn.close()

    def off(self) -> None:
        self.proxy.clear()
        self.proxy.up()
        if self.hosts is not None:
            self.hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {NAME}\n")

    async def run(self, until: asyncio.Event) -> None:
        dns_due = time.monotonic() + 25
        while not until.is_set():
            await asyncio.sleep(self.rng.uniform(0.3, 1.2))
            roll = self.rng.random()
            if roll < 0.70:
                await asyncio.to_thread(self.s3_fault)
            elif roll < 0.80:
                await self.refused()
            elif roll < 0.95:
                await self.terminate_backend()
            elif self.hosts is not None and time.monotonic() > dns_due:
                await self.unresolvable()
                dns_due = time.monotonic() + 30


# --- the run --------------------------------------------------------------------------------


def namespace(tmp: Path) -> tuple[list[str], Path] | None:
    """A command prefix resolving names from our hosts file only (root and unshare(1))."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        return None
    nss, hosts = tmp / "nsswitch.conf", tmp / "hosts"
    nss.write_text("hosts: files\n")
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {NAME}\n")
    script = f'mount --bind {nss} /etc/nsswitch.conf && mount --bind {hosts} /etc/hosts && exec "$@"'
    return [unshare, "--mount", "sh", "-c", script, "sh"], hosts


def daemon_config(db_url: str, endpoint: str, port: int) -> dict[str, Any]:
    return {
        "database": {"url": db_url, "pool_max_size": 4},
        "s3": {
            "endpoint_url": endpoint,
            "bucket": BUCKET,
            "region": "us-east-1",
            "read_timeout_s": 2.0,
            "connect_timeout_s": 1.0,
            "max_attempts": 3,
        },
        "server": {"listen": f"127.0.0.1:{port}"},
        "schedule": {"cron": "*/2 * * * * *"},
        "datasets": {
            "inc": {"prefix": "automations/inc/", "table": "tickets.inc", "post_apply": ["capture_history"]},
            "crq": {"prefix": "automations/crq/", "table": "tickets.crq"},
        },
        "geocoder": {"enabled": False},
        "daemon": {
            "pass_retry_attempts": 3,
            "pass_retry_max_wait_s": 1.0,
            "source_check_interval_s": 5.0,
            "shutdown_grace_period_s": 10.0,
        },
        "logging": {"format": "json", "level": "info"},
    }


async def feed_files(files: list[tuple[str, str, bytes]], seconds: float, endpoint: str) -> None:
    """Upload in name order, evenly over ``seconds`` (straight to moto: the export's side)."""
    client = s3_client(endpoint)
    start = time.monotonic()
    for i, (ds, name, data) in enumerate(files):
        due = start + seconds * i / len(files)
        if (wait := due - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        await asyncio.to_thread(
            client.put_object, Bucket=BUCKET, Key=f"automations/{ds}/changes/{name}", Body=data
        )


async def in_order_tables(
    files: dict[str, list[tuple[str, bytes]]], endpoint: str, db_url: str
) -> dict[str, list[Any]]:
    """The same files applied in order by one in-process drain into a fresh database."""

    client = s3_client(endpoint)
    client.create_bucket(Bucket="soak-fresh")
    for ds, ds_files in files.items():
        for name, data in ds_files:
            client.put_object(Bucket="soak-fresh", Key=f"automations/{ds}/changes/{name}", Body=data)
    cfg = daemon_config(db_url, endpoint, free_port())
    cfg["s3"] = {"endpoint_url": endpoint, "bucket": "soak-fresh", "region": "us-east-1"}
    config = parse(cfg, env={})
    pool = await db.create_pool(config.database)
    try:
        async with S3Source(config.s3) as source:
            engine = Engine(config, pool, source, Metrics())
            for ds in DATASETS:
                report = await drain(engine, config.dataset(ds))
                assert report.ok and report.files_applied == len(files[ds]), report
    finally:
        await pool.close()
    return await tables(db_url)


async def tables(db_url: str) -> dict[str, list[Any]]:
    conn = await asyncpg.connect(db_url)
    try:
        return {ds: [r[0] for r in await conn.fetch(TABLE_ROWS.format(table=ds))] for ds in DATASETS}
    finally:
        await conn.close()


async def ledger(db_url: str) -> list[tuple[str, str, int]]:
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch(
            "SELECT dataset, key, count(*) AS n FROM tickets.ingest_files WHERE status = 'applied' "
            "GROUP BY 1, 2"
        )
        return [(r["dataset"], r["key"], r["n"]) for r in rows]
    finally:
        await conn.close()


@dataclass
class Outcome:
    first: Sample
    last: Sample
    final: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    exit_code: int


async def soak(
    ordered: list[tuple[str, str, bytes]],
    seconds: float,
    faults: Faults,
    proc: subprocess.Popen[bytes],
    port: int,
    upstream: str,
) -> Outcome:
    db_url, started = faults.db_url, time.monotonic()
    await until_up(port, proc)
    feeder = asyncio.create_task(feed_files(ordered, seconds, upstream))
    # Warm (pool, client and caches built) before the first figures, and before faults.
    first = await sample(proc.pid, port, db_url, started)
    while first.applied < 50:
        await asyncio.sleep(0.5)
        first = await sample(proc.pid, port, db_url, started)
    print(first.row(), " <- warm")
    stop_faults = asyncio.Event()
    injector = asyncio.create_task(faults.run(stop_faults))
    next_print = time.monotonic() + 30
    while not feeder.done():
        await asyncio.sleep(1)
        await check_alive(proc, port)
        if time.monotonic() >= next_print:
            print((await sample(proc.pid, port, db_url, started)).row())
            next_print += 30
    await feeder
    stop_faults.set()
    await injector
    faults.off()
    # Faults off: every file must arrive, by the daemon's own passes.
    deadline = time.monotonic() + 300
    while (await sample(proc.pid, port, db_url, started)).applied < len(ordered):
        await check_alive(proc, port)
        if time.monotonic() > deadline:
            raise SystemExit("not every file was applied within 300 s of the faults ending")
        await asyncio.sleep(1)
    await asyncio.sleep(5)  # quiet: the last passes' tasks and connections settle
    last = await sample(proc.pid, port, db_url, started)
    final = await asyncio.to_thread(metrics, port)
    proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(proc.wait, 60)
    return Outcome(first, last, final, code)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--inc", type=int, default=2000, help="INC files (a baseline and deltas)")
    p.add_argument("--crq", type=int, default=1000, help="CRQ files")
    p.add_argument("--seconds", type=float, default=150.0, help="upload the files over this long")
    p.add_argument("--seed", type=int, default=15)
    args = p.parse_args()

    logs.configure("warning", "console")  # the in-order drain at the end: quiet
    files = feeds(args.inc, args.crq)
    ordered = sorted(((ds, n, d) for ds, fs in files.items() for n, d in fs), key=lambda f: (f[1], f[0]))
    expected = {(ds, f"automations/{ds}/changes/{n}") for ds, n, _ in ordered}
    tmp = Path(tempfile.mkdtemp(prefix="fleet-soak-"))
    wrap = namespace(tmp)
    dns = "on" if wrap else "off (needs root and unshare)"
    print(f"soak: {len(ordered)} files ({args.inc} inc, {args.crq} crq) over {args.seconds:.0f} s; "
          f"DNS faults {dns}; logs in {tmp}")  # fmt: skip

    with moto_server() as upstream, fault_proxy(upstream) as proxy:
        s3_client(upstream).create_bucket(Bucket=BUCKET)
        async with scratch_database() as db_url, scratch_database("_fresh") as fresh_url:
            port = free_port()
            host = NAME if wrap else "127.0.0.1"
            (tmp / "config.toml").write_text(
                to_toml(daemon_config(db_url, f"http://{host}:{proxy.port}", port))
            )
            env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "RUSTFS_"))}
            env |= {"AWS_ACCESS_KEY_ID": "soak", "AWS_SECRET_ACCESS_KEY": "soak", "PYTHONUNBUFFERED": "1"}
            command = [sys.executable, "-m", "fleetticketsd", "--config", str(tmp / "config.toml"), "run"]
            faults = Faults(proxy, wrap[1] if wrap else None, db_url, random.Random(args.seed))
            with (tmp / "daemon.log").open("w") as log:
                proc = spawn([*(wrap[0] if wrap else []), *command], log, env)
                try:
                    out = await soak(ordered, args.seconds, faults, proc, port, upstream)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait(10)
            applied = await ledger(db_url)
            ours = await tables(db_url)
            fresh = await in_order_tables(files, upstream, fresh_url)
            processed = {
                (ds, k.replace("/processed/", "/changes/"))
                for ds in DATASETS
                for k in list_keys(upstream, f"automations/{ds}/processed/")
            }
            waiting = sum(len(list_keys(upstream, f"automations/{ds}/changes/")) for ds in DATASETS)

    keys = {(ds, k) for ds, k, _ in applied}
    lost = len(expected - keys)
    counted = int(total(out.final, "fleettickets_files_applied_total"))
    doubled = sum(n - 1 for *_, n in applied) + counted - len(keys)
    log_text = (tmp / "daemon.log").read_text()
    first, last, final = out.first, out.last, out.final
    print(last.row(), " <- end")
    print()
    print(f"duration {last.at_s:.0f} s; daemon exit code on SIGTERM {out.exit_code}")
    print("faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(faults.injected.items())))
    stages = ("list", "fetch", "parse", "apply", "archive")
    failed = ", ".join(
        f"{s} {int(total(final, 'fleettickets_poll_failures_total', stage=s))}" for s in stages
    )
    print(f"failed passes by stage: {failed}")
    print(f"S3 requests retried by botocore: {int(total(final, 'fleettickets_s3_retries_total'))}; "
          f"passes: {int(total(final, 'fleettickets_poll_duration_seconds_count'))}; "
          f"late files {int(total(final, 'fleettickets_late_files_total'))}; "
          f"replayed {int(total(final, 'fleettickets_replayed_files_total'))}")  # fmt: skip
    print(f"files lost {lost}, doubled {doubled}; in processed/ {len(processed & expected)} "
          f"of {len(expected)}, left under changes/ {waiting}; "
          f"tables equal to an in-order drain: {ours == fresh}")  # fmt: skip
    crashed = log_text.count("drain crashed")
    print(f"tracebacks in the log {log_text.count('Traceback')}, 'drain crashed' {crashed}")
    print(f"flat: RSS {first.rss_mb:.1f} -> {last.rss_mb:.1f} MB, fds {first.fds} -> {last.fds}, "
          f"db conns {first.db_conns} -> {last.db_conns}, "
          f"asyncio tasks {first.tasks} -> {last.tasks}")  # fmt: skip
    ok = lost == 0 and doubled == 0 and ours == fresh and waiting == 0 and out.exit_code == 0
    raise SystemExit(0 if ok else 1)


def list_keys(endpoint: str, prefix: str) -> list[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def spawn(command: list[str], log: Any, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def healthz(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        return int(resp.status)


async def until_up(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            await asyncio.to_thread(healthz, port)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"daemon did not come up (exit code {proc.poll()})") from None
            await asyncio.sleep(0.2)


async def check_alive(proc: subprocess.Popen[bytes], port: int) -> None:
    if proc.poll() is not None:
        raise SystemExit(f"daemon exited with {proc.returncode} during the soak")
    if (status := await asyncio.to_thread(healthz, port)) != 200:
        raise SystemExit(f"/healthz answered {status}")


if __name__ == "__main__":
    asyncio.run(main())

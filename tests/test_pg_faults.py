"""Faults a real PostgreSQL produces, at the worst moments of a file: each must cost at
most a failed pass (stage `apply`), a clear error naming the file and the cause, and a
retry that applies the file exactly once, with the pool recovering by itself.

The moments are made real, not simulated: test-only triggers in the test's own
database hold the backend inside the COPY, the upsert or the COMMIT (`pg_sleep`, once
per database: a sequence, which no rollback or restart takes back), and the test ends
that backend as an operator would (`pg_terminate_backend`), or restarts the server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog

from fleetticketsd import feedgen
from fleetticketsd.config import Config
from fleetticketsd.database import db
from fleetticketsd.ingest.drain import DrainReport, Engine, drain
from fleetticketsd.ingest.source import S3Source
from fleetticketsd.metrics import Metrics

from .conftest import PG_ADMIN_URL, Bucket, Cluster, Daemon, apoll, csv_file, inc_key, poll, row, run_cli

BIG = inc_key("2026-06-22T10-00-00.csv")
AFTER = inc_key("2026-06-22T10-05-00.csv")
BIG_ROWS = 60_000  # ~25 MB: more than the socket buffers between a client and its backend

# Only the first pass through a trap stalls (nextval is not rolled back); the retry
# goes through. 60 s by default: far longer than any test waits, cut short by the fault.
STALL_ONCE = """
CREATE SEQUENCE public.fleet_test_stalls;
CREATE FUNCTION public.fleet_test_stall_once() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('public.fleet_test_stalls') = 1 THEN
        PERFORM pg_sleep({sleep_s});
    END IF;
END $$;
CREATE FUNCTION public.fleet_test_stall() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM public.fleet_test_stall_once();
    RETURN NULL;
END $$;
"""
COPY_TRAP = """
CREATE FUNCTION public.fleet_test_stall_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.line = 100 THEN
        PERFORM public.fleet_test_stall_once();
    END IF;
    RETURN NEW;
END $$;
CREATE FUNCTION public.fleet_test_trap_incoming() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT FROM pg_event_trigger_ddl_commands()
               WHERE object_identity LIKE '%.fleet_incoming') THEN
        {server_timeout}
        CREATE TRIGGER fleet_test_stall BEFORE INSERT ON pg_temp.fleet_incoming
            FOR EACH ROW EXECUTE FUNCTION public.fleet_test_stall_row();
    END IF;
END $$;
CREATE EVENT TRIGGER fleet_test_trap_incoming ON ddl_command_end WHEN TAG IN ('CREATE TABLE')
    EXECUTE FUNCTION public.fleet_test_trap_incoming();
"""
TRAPS = {
    # The temp table is created by the drain's session, so a ddl event trigger puts a
    # row trigger on it: the backend stops reading at line 100 of the file, and the
    # client's socket buffers fill behind it.
    "copy": COPY_TRAP.replace("{server_timeout}", ""),
    # The same, in a session whose server enforces no statement_timeout (a server that
    # is stuck, not slow): only the client's own bound can end that COPY.
    "copy_unbounded": COPY_TRAP.replace(
        "{server_timeout}", "PERFORM set_config('statement_timeout', '0', false);"
    ),
    "upsert": """
CREATE TRIGGER fleet_test_stall AFTER INSERT ON tickets.inc
    FOR EACH STATEMENT EXECUTE FUNCTION public.fleet_test_stall();
""",
    # Deferred to COMMIT: the backend sleeps inside the COMMIT itself.
    "commit": """
CREATE CONSTRAINT TRIGGER fleet_test_stall AFTER INSERT ON tickets.ingest_files
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.fleet_test_stall();
""",
}
# What the drain's backend runs at each moment (pg_stat_activity.query).
STATEMENT = {
    "copy": "COPY %fleet_incoming%",
    "upsert": "%DELETE FROM pg_temp.fleet_incoming RETURNING%",
    "commit": "COMMIT%",
}


async def _sql(url: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql, *args) if args or not sql.count(";") > 1 else await conn.execute(sql)
    finally:
        await conn.close()


def sql(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    result: list[asyncpg.Record] = asyncio.run(_sql(url, query, *args))
    return result


async def set_trap(db_url: str, moment: str, sleep_s: float = 60) -> None:
    await _sql(db_url, STALL_ONCE.replace("{sleep_s}", str(sleep_s)) + TRAPS[moment])


def _send_queue(port: int) -> int | None:
    """Bytes the client has written to its socket that the server has not read."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            return int(fields[4].split(":")[0], 16)
    return None


class Moment:
    """Finds the drain's backend stalled at a moment; then ends it."""

    def __init__(self, db_url: str, moment: str, admin_url: str = PG_ADMIN_URL) -> None:
        self.dbname = db_url.rsplit("/", 1)[1]
        self.moment = moment
        self.admin_url = admin_url
        self.pid: int | None = None
        self.port: int | None = None
        self._queue: list[int | None] = []

    async def reached(self) -> bool:
        rows = await _sql(
            self.admin_url,
            "SELECT pid, client_port FROM pg_stat_activity WHERE datname = $1 "
            "AND application_name = 'fleetticketsd' AND state = 'active' "
            "AND wait_event = 'PgSleep' AND query LIKE $2",
            self.dbname,
            STATEMENT[self.moment],
        )
        if not rows:
            return False
        self.pid, self.port = rows[0]["pid"], rows[0]["client_port"]
        if self.moment != "copy":
            return True
        # The defect of 2026-12-02 needs the client waiting for its socket to drain:
        # its send queue full, no longer growing.
        self._queue = [*self._queue[-4:], _send_queue(self.port)]
        return len(self._queue) == 5 and len(set(self._queue)) == 1 and bool(self._queue[0])

    async def wait(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not await self.reached():
            assert time.monotonic() < deadline, f"the drain never stalled in its {self.moment}"
            await asyncio.sleep(0.1)

    async def terminate(self) -> None:
        await self.wait()
        await _sql(self.admin_url, "SELECT pg_terminate_backend($1)", self.pid)


def big_file(tmp_path: Path, rows: int = BIG_ROWS) -> bytes:
    path = tmp_path / "big.csv"
    with path.open("wb") as fh:
        feedgen.write_rows(
            fh, feedgen.FeedSpec(dataset="inc", seed=11, baseline_rows=rows, sentinel=False), rows
        )
    return path.read_bytes()


async def table_and_ledger(db_url: str) -> tuple[int, list[tuple[str, int]]]:
    rows = await _sql(db_url, "SELECT count(*) AS n FROM tickets.inc")
    ledger = await _sql(db_url, "SELECT key, rows_inserted FROM tickets.ingest_files ORDER BY key")
    return rows[0]["n"], [(r["key"], r["rows_inserted"]) for r in ledger]


async def lock_free(db_url: str) -> bool:
    """No session holds an advisory lock in this database: no dataset is locked."""
    rows = await _sql(
        db_url,
        "SELECT count(*) AS n FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
        "WHERE l.locktype = 'advisory' AND d.datname = current_database()",
    )
    return rows[0]["n"] == 0


def failures(engine: Engine) -> float:
    value = engine.metrics.registry.get_sample_value(
        "fleettickets_poll_failures_total", {"dataset": "inc", "stage": "apply"}
    )
    return value or 0.0


async def drain_with_fault(
    engine: Engine, fault: Callable[[], Any]
) -> tuple[DrainReport, list[dict[str, Any]]]:
    """One pass while ``fault`` strikes; the pass must end by itself, soon after."""
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(drain(engine, engine.config.dataset("inc")))
        await fault()
        struck = time.monotonic()
        report = await asyncio.wait_for(task, timeout=15)
    assert time.monotonic() - struck < 5, "the pass outlived the fault"
    return report, logs


def assert_failed_at(report: DrainReport, logs: list[dict[str, Any]], key: str, cause: str) -> None:
    error = report.as_json()["error"]  # what `drain --json` prints
    assert error["stage"] == "apply" and error["key"] == key, error
    assert error["message"].startswith(f"{key}: {cause}"), error
    logged = [e for e in logs if e["event"] == "drain pass failed"]
    assert logged and logged[0]["key"] == key and logged[0]["error"] == error["message"], logs
    assert logged[0]["log_level"] == "error"


@pytest.mark.parametrize("moment", ["copy", "upsert", "commit"])
async def test_backend_terminated_mid_file_fails_the_pass_and_the_retry_applies_it_once(
    engine: Engine, bucket: Bucket, db_url: str, tmp_path: Path, moment: str
) -> None:
    started = time.monotonic()
    key = BIG if moment == "copy" else inc_key("2026-06-22T10-00-00.csv")
    bucket.put(key, big_file(tmp_path) if moment == "copy" else csv_file(row("T1"), row("T2"), row("T3")))
    bucket.put(AFTER, csv_file(row("T9")))
    await set_trap(db_url, moment)
    trap = Moment(db_url, moment)

    report, logs = await drain_with_fault(engine, trap.terminate)

    # Not torn: nothing of the file, its ledger row or the watermark; lock freed.
    # Mid-statement the server's last words come through; a COPY never reads them.
    said = "" if moment == "copy" else " (terminating connection due to administrator command)"
    assert_failed_at(report, logs, key, "connection lost" + said)
    assert await table_and_ledger(db_url) == (0, [])
    assert await lock_free(db_url)
    assert failures(engine) == 1
    assert report.files_applied == 0 and report.watermark is None
    assert bucket.keys("automations/inc/changes/") == [key, AFTER]

    # The next pass, on the same pool, applies it exactly once.
    again = await drain(engine, engine.config.dataset("inc"))
    assert again.ok and again.files_applied == 2, again
    rows, ledger = await table_and_ledger(db_url)
    assert [k for k, _ in ledger] == [key, AFTER]
    assert rows == sum(n for _, n in ledger) == again.rows_upserted
    assert again.watermark == AFTER
    assert bucket.keys("automations/inc/changes/") == []
    assert await lock_free(db_url)
    print(f"\n{moment}: {time.monotonic() - started:.1f} s")


@pytest.mark.parametrize(
    ("trap", "cause"),
    [
        # A huge file, a small bound: the upsert outlives it, and the server says so.
        (None, "statement timeout ([database] statement_timeout_s): canceling statement due to statement"),
        # A COPY the server does not bound: the client's own bound ends it.
        ("copy_unbounded", "COPY did not finish within 1 s ([database] statement_timeout_s)"),
    ],
    ids=["server-bound", "client-bound"],
)
async def test_statement_timeout_on_a_huge_file_fails_it_whole_then_a_larger_bound_applies_it_once(
    config: Config, bucket: Bucket, db_url: str, tmp_path: Path, trap: str | None, cause: str
) -> None:
    started = time.monotonic()
    # ~6 MB: its COPY takes ~0.2 s here, its upsert ~1 s.
    bucket.put(BIG, big_file(tmp_path, rows=15_000))
    if trap:
        # Stuck for 4 s, then it reads on, finds its client gone and rolls back.
        await set_trap(db_url, trap, sleep_s=4)
    timeout_s = 1.0 if trap else 0.5
    short = replace(config, database=replace(config.database, statement_timeout_s=timeout_s))
    metrics = Metrics()
    async with S3Source(short.s3) as source:
        pool = await db.create_pool(short.database)
        engine = Engine(short, pool, source, metrics)
        with structlog.testing.capture_logs() as logs:
            report = await asyncio.wait_for(drain(engine, short.dataset("inc")), timeout=30)
        await pool.close()
        assert_failed_at(report, logs, BIG, cause)
        assert time.monotonic() - started < 3.5  # not one wait longer than the bound
        assert await table_and_ledger(db_url) == (0, [])
        await apoll(lambda: lock_free(db_url), what="dataset lock released")
        assert failures(engine) == 1

        # The operator raises the bound (as the error says): applied once, whole.
        pool = await db.create_pool(config.database)
        again = await drain(Engine(config, pool, source, metrics), config.dataset("inc"))
        await pool.close()
    assert again.ok and again.files_applied == 1, again
    rows, ledger = await table_and_ledger(db_url)
    assert [k for k, _ in ledger] == [BIG] and rows == ledger[0][1] == again.rows_upserted
    print(f"\nstatement timeout {trap}: {time.monotonic() - started:.1f} s")


async def test_no_free_pooled_connection_fails_the_pass_within_acquire_timeout(
    make_config: Callable[..., Config], bucket: Bucket, db_url: str
) -> None:
    bucket.put(AFTER, csv_file(row("T9")))
    cfg = make_config(database={"pool_min_size": 0, "pool_max_size": 2, "acquire_timeout_s": 0.5})
    pool = await db.create_pool(cfg.database)
    async with S3Source(cfg.s3) as source:
        engine = Engine(cfg, pool, source, Metrics())
        held = [await pool.acquire() for _ in range(2)]  # e.g. probes and a stuck status
        before = time.monotonic()
        with structlog.testing.capture_logs() as logs:
            report = await drain(engine, cfg.dataset("inc"))
        # Twice the bound: the pass, then its best-effort outcome record.
        assert time.monotonic() - before < 2
        error = report.as_json()["error"]
        assert error == {
            "stage": "apply",
            "key": None,
            "message": "database: no database connection within 0.5 s ([database] acquire_timeout_s)",
        }
        assert [e["error"] for e in logs if e["event"] == "drain pass failed"] == [error["message"]]
        for conn in held:
            await pool.release(conn)
        again = await drain(engine, cfg.dataset("inc"))
    await pool.close()
    assert again.ok and again.files_applied == 1
    assert await table_and_ledger(db_url) == (1, [(AFTER, 1)])


class CommitCutter:
    """A TCP proxy in front of PostgreSQL that, once armed, drops the connection in place
    of the server's reply to a COMMIT: the server has committed, the client never hears."""

    COMMIT_DONE = b"C\x00\x00\x00\x0bCOMMIT\x00"  # CommandComplete "COMMIT"

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.armed = False
        self.cut = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, replies: bool) -> None:
            tail = b""
            while data := await src.read(65536):
                if replies and self.armed and self.COMMIT_DONE in tail + data:
                    self.armed, self.cut = False, self.cut + 1
                    client_w.transport.abort()
                    server_w.transport.abort()
                    return
                tail = data[-16:]
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(
            pipe(client_r, server_w, False), pipe(server_r, client_w, True), return_exceptions=True
        )


async def lost_commit_pass(
    config: Config, bucket: Bucket, db_url: str, batch_files: int
) -> tuple[DrainReport, list[dict[str, Any]], DrainReport, list[dict[str, Any]], Engine]:
    """A pass whose first COMMIT reply is lost, then a second pass; both reports and logs."""
    upstream = int(db_url.rsplit(":", 1)[1].split("/", 1)[0])
    cutter = CommitCutter(upstream)
    async with cutter as port, S3Source(config.s3) as source:
        proxied = replace(config.database, url=db_url.replace(f":{upstream}/", f":{port}/"))
        ingest = replace(config.ingest, commit_batch_files=batch_files)
        cfg = replace(config, database=proxied, ingest=ingest)
        pool = await db.create_pool(cfg.database)
        engine = Engine(cfg, pool, source, Metrics())
        cutter.armed = True
        with structlog.testing.capture_logs() as logs:
            report = await asyncio.wait_for(drain(engine, cfg.dataset("inc")), timeout=15)
        assert cutter.cut == 1
        with structlog.testing.capture_logs() as again_logs:
            again = await drain(engine, cfg.dataset("inc"))
        await pool.close()
    return report, logs, again, again_logs, engine


async def test_a_commit_whose_reply_is_lost_is_decided_by_the_ledger_never_applied_twice(
    config: Config, bucket: Bucket, db_url: str
) -> None:
    started = time.monotonic()
    key = inc_key("2026-06-22T10-00-00.csv")
    bucket.put(key, csv_file(row("T1"), row("T2")))
    bucket.put(AFTER, csv_file(row("T9")))
    # One file per commit: the commit of the first file is the one cut.
    report, logs, again, again_logs, engine = await lost_commit_pass(config, bucket, db_url, 1)
    # The outcome is unknown to the pass, which fails; the server did commit.
    assert_failed_at(report, logs, key, "connection lost")
    assert failures(engine) == 1
    # The next pass finds the file in the ledger: archived, not applied again.
    assert again.ok and again.files_applied == 1 and again.rows_upserted == 1, again  # AFTER only
    assert [e["event"] for e in again_logs if e["event"].startswith("already applied")] == [
        "already applied; archiving only"
    ]
    assert await table_and_ledger(db_url) == (3, [(key, 2), (AFTER, 1)])
    assert bucket.keys("automations/inc/changes/") == []
    assert again.watermark == AFTER
    print(f"\nlost commit reply: {time.monotonic() - started:.1f} s")


async def test_a_batch_commit_whose_reply_is_lost_is_decided_by_the_ledger_file_by_file(
    config: Config, bucket: Bucket, db_url: str
) -> None:
    # Small files commit in batches: the cut reply may cover several files. Whichever
    # the server committed, the ledger says so, and the next pass applies only the rest.
    keys = [inc_key(f"2026-06-22T10-0{i}-00.csv") for i in range(6)]
    for i, key in enumerate(keys):
        bucket.put(key, csv_file(row(f"T{i}"), row(f"U{i}")))
    report, _, again, again_logs, _ = await lost_commit_pass(config, bucket, db_url, 32)
    assert report.failed is not None and "connection lost" in report.failed, report
    assert report.files_applied == 0  # none heard committed, none counted
    _, ledger = await table_and_ledger(db_url)
    first = len(ledger)
    print(f"\nfiles in the cut batch: {first}")
    assert first >= 1 and [k for k, _ in ledger] == keys[:first]  # a prefix, each file whole
    assert again.ok and again.files_applied == len(keys) - first, again
    archived_only = [e for e in again_logs if e["event"] == "already applied; archiving only"]
    assert len(archived_only) == first
    assert await table_and_ledger(db_url) == (12, [(k, 2) for k in keys])
    assert bucket.keys("automations/inc/changes/") == []
    assert again.watermark == keys[-1]


# --- the daemon as a process ---------------------------------------------------------------


def watch_health(d: Daemon, until: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    """Poll ``until`` while checking that /healthz answers 200 at every step."""

    def check() -> Any:
        status, body = d.get("/healthz")
        assert status == 200, body
        return until()

    return poll(check, timeout_s=timeout_s, interval_s=0.2, what=what)


def failed_pass_logged(d: Daemon, key: str, cause: str) -> list[dict[str, Any]]:
    return [
        e
        for e in d.logged("drain pass failed", key=key, stage="apply", dataset="inc")
        if e["error"].startswith(f"{key}: {cause}")
    ]


def test_daemon_backend_terminated_in_copy_retries_by_itself_and_applies_once(
    start_daemon: Callable[..., tuple[Daemon, dict[str, Any]]], bucket: Bucket, db_url: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    bucket.put(BIG, big_file(tmp_path))
    bucket.put(AFTER, csv_file(row("T9")))
    asyncio.run(set_trap(db_url, "copy"))
    d, _ = start_daemon()  # cron never fires: only the start-up pass and its retries
    trap = Moment(db_url, "copy")
    watch_health(d, lambda: asyncio.run(trap.reached()), "drain stalled in COPY")
    sql(PG_ADMIN_URL, "SELECT pg_terminate_backend($1)", trap.pid)

    watch_health(d, lambda: failed_pass_logged(d, BIG, "connection lost"), "failed pass logged")
    watch_health(d, lambda: d.metric("fleettickets_files_applied_total", dataset="inc") == 2, "retry applied")
    assert d.metric("fleettickets_poll_failures_total", dataset="inc", stage="apply") == 1
    rows, ledger = asyncio.run(table_and_ledger(db_url))
    assert [k for k, _ in ledger] == [BIG, AFTER] and rows == sum(n for _, n in ledger)
    watch_health(d, lambda: bucket.keys("automations/inc/changes/") == [], "files archived")
    assert d.get("/readyz")[0] == 200
    assert d.proc.poll() is None
    print(f"\ndaemon copy: {time.monotonic() - started:.1f} s")


def test_daemon_server_restart_mid_copy_readyz_says_so_then_applies_once_by_itself(
    start_daemon: Callable[..., tuple[Daemon, dict[str, Any]]],
    bucket: Bucket,
    second_cluster: Cluster,
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    url = second_cluster.new_db()
    bucket.put(BIG, big_file(tmp_path))
    bucket.put(AFTER, csv_file(row("T9")))
    asyncio.run(set_trap(url, "copy"))
    d, _ = start_daemon(
        database={"url": url}, daemon={"pass_retry_attempts": 30, "pass_retry_max_wait_s": 1.0}
    )
    trap = Moment(url, "copy", admin_url=second_cluster.admin_url)
    watch_health(d, lambda: asyncio.run(trap.reached()), "drain stalled in COPY")

    second_cluster.ctl("stop", "-m", "fast")
    try:
        down = watch_health(d, lambda: (s := d.get("/readyz"))[0] == 503 and json.loads(s[1]), "readyz 503")
        assert down["checks"]["database"] != "ok" and down["checks"]["migrations"] != "ok", down
        watch_health(d, lambda: failed_pass_logged(d, BIG, "connection lost"), "failed pass logged")
    finally:
        second_cluster.ctl("start")
    watch_health(d, lambda: d.metric("fleettickets_files_applied_total", dataset="inc") == 2, "retry applied")
    assert (d.metric("fleettickets_poll_failures_total", dataset="inc", stage="apply") or 0) >= 1
    rows, ledger = asyncio.run(table_and_ledger(url))
    assert [k for k, _ in ledger] == [BIG, AFTER] and rows == sum(n for _, n in ledger)
    watch_health(d, lambda: bucket.keys("automations/inc/changes/") == [], "files archived")
    watch_health(d, lambda: d.get("/readyz")[0] == 200, "readyz 200 again")
    assert not d.logged("drain crashed")
    print(f"\ndaemon restart: {time.monotonic() - started:.1f} s")


def test_read_only_database_after_failover_fails_naming_the_file_readyz_says_read_only_then_recovers(
    start_daemon: Callable[..., tuple[Daemon, dict[str, Any]]],
    cli_env: Callable[..., dict[str, str]],
    bucket: Bucket,
    db_url: str,
) -> None:
    started = time.monotonic()
    dbname = db_url.rsplit("/", 1)[1]
    key = inc_key("2026-06-22T10-00-00.csv")
    bucket.put(key, csv_file(row("T1"), row("T2")))
    # What a demoted primary looks like to a client: it answers, and refuses every write.
    sql(PG_ADMIN_URL, f"ALTER DATABASE {dbname} SET default_transaction_read_only = on")

    res = run_cli("drain", "--json", env=cli_env())
    assert res.returncode == 1, res.stderr
    error = json.loads(res.stdout)["datasets"]["inc"]["error"]
    assert error["stage"] == "apply" and error["key"] == key
    assert error["message"].startswith(f"{key}: the database is read-only (SQLSTATE 25006"), error
    assert "Traceback" not in res.stderr

    d, _ = start_daemon(daemon={"pass_retry_attempts": 30, "pass_retry_max_wait_s": 1.0})

    def read_only_probe() -> Any:
        # 503 also means "not connected yet" on a slow start: wait for the read-only verdict.
        code, body = d.get("/readyz")
        return code == 503 and "read-only" in json.loads(body)["checks"]["database"] and json.loads(body)

    status = watch_health(d, read_only_probe, "readyz 503, read-only")
    assert status["checks"]["database"].startswith("read-only (transaction_read_only is on)"), status
    watch_health(d, lambda: failed_pass_logged(d, key, "the database is read-only"), "failed pass logged")
    assert asyncio.run(table_and_ledger(db_url)) == (0, [])

    # Writable again (the new primary): no restart, the retries and the probe reconnect.
    sql(PG_ADMIN_URL, f"ALTER DATABASE {dbname} RESET default_transaction_read_only")
    watch_health(d, lambda: d.metric("fleettickets_files_applied_total", dataset="inc") == 1, "retry applied")
    watch_health(d, lambda: d.get("/readyz")[0] == 200, "readyz 200 again")
    assert asyncio.run(table_and_ledger(db_url)) == (2, [(key, 2)])
    print(f"\nread-only: {time.monotonic() - started:.1f} s")

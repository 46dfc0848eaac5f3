"""Faults a real bucket across the internet produces, at the HTTP level (tests/s3_fault_proxy.py
in front of moto): each must cost at most a retry and a clear log line. Nothing lost,
nothing applied twice, no pass that hangs, a daemon that stays live.

What botocore's standard mode retries (throttling, 5xx, connection errors, timeouts) is
retried, with Retry-After honoured; what it cannot help (a refused key) fails at once
and says what to fix; a body that stalls after its headers is cut by `read_timeout_s`,
one that trickles completes. Else the pass fails at its stage and the next one resumes.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog

from fleetticketsd.config import Config
from fleetticketsd.ingest.drain import DrainReport, Engine, drain

from .conftest import REPO, Bucket, Daemon, config_dict, csv_file, engine_for, inc_key, poll, row, to_toml
from .s3_fault_proxy import FaultProxy, fault_proxy

F1 = inc_key("2026-06-22T10-00-00.csv")
F2 = inc_key("2026-06-22T10-05-00.csv")
CHANGES_LIST = r"prefix=automations/inc/changes/"
# Bounds small enough for a test, the same mechanisms as the defaults.
FAST = {"read_timeout_s": 1.0, "connect_timeout_s": 1.0, "max_attempts": 3}
STREAMED = {"prefetch_bytes": 1}  # nothing fits the window: each file streams at its turn
SLOW_DOWN = {"status": 503, "code": "SlowDown", "message": "Please reduce your request rate."}
INTERNAL = {"status": 500, "code": "InternalError", "message": "We encountered an internal error."}


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    with fault_proxy(s3_endpoint) as p:
        yield p


def via(proxy: FaultProxy, bucket: Bucket, **s3: Any) -> dict[str, Any]:
    return {"endpoint_url": proxy.endpoint, "bucket": bucket.name, "region": "us-east-1", **FAST, **s3}


def two_files(bucket: Bucket) -> None:
    bucket.put(F1, csv_file(row("T1"), row("T2")))
    bucket.put(F2, csv_file(row("T1", owner="X"), row("T3")))


async def rows(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM tickets.inc"))


async def ledger_keys(conn: asyncpg.Connection) -> list[str]:
    return [r["key"] for r in await conn.fetch("SELECT key FROM tickets.ingest_files ORDER BY key")]


def sample(engine: Engine, name: str, **labels: str) -> float:
    return engine.metrics.registry.get_sample_value(name, labels) or 0.0


def failures(engine: Engine) -> dict[str, float]:
    stages = ("list", "fetch", "parse", "apply", "archive")
    return {s: sample(engine, "fleettickets_poll_failures_total", dataset="inc", stage=s) for s in stages}


ADVISORY_LOCKS = """
SELECT count(*) FROM pg_locks
WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
NO_FAILURES = dict.fromkeys(("list", "fetch", "parse", "apply", "archive"), 0.0)


async def timed_drain(engine: Engine, **kw: Any) -> tuple[DrainReport, float, list[dict[str, Any]]]:
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        report = await asyncio.wait_for(drain(engine, engine.config.dataset("inc"), **kw), timeout=30)
    return report, time.monotonic() - started, logs


async def assert_applied_once(engine: Engine, bucket: Bucket, conn: asyncpg.Connection) -> None:
    assert await ledger_keys(conn) == [F1, F2]
    raw = await conn.fetch("SELECT ticket_id, raw->>'owner' AS owner FROM tickets.inc ORDER BY 1")
    assert [(r["ticket_id"], r["owner"]) for r in raw] == [
        ("T1", "X"),
        ("T2", "P. Wanjiru"),
        ("T3", "P. Wanjiru"),
    ]
    assert bucket.keys("automations/inc/changes/") == []
    assert bucket.keys("automations/inc/processed/") == [
        "automations/inc/processed/2026-06-22T10-00-00.csv",
        "automations/inc/processed/2026-06-22T10-05-00.csv",
    ]


# --- the drain, in-process -------------------------------------------------------------------


async def test_throttling_5xx_and_resets_are_retried_honouring_retry_after_and_cost_nothing(
    make_config: Callable[..., Config], proxy: FaultProxy, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    two_files(bucket)
    proxy.add(op="list", key=CHANGES_LIST, times=2, headers={"Retry-After": "1"}, **SLOW_DOWN)
    proxy.add(op="get", key="10-00-00", times=1, **INTERNAL)
    proxy.add(op="get", key="10-05-00", times=1, reset=True)
    proxy.add(op="copy", times=1, **SLOW_DOWN)
    proxy.add(op="delete", times=1, **INTERNAL)
    config = make_config(s3=via(proxy, bucket))
    async with engine_for(config) as engine:
        report, took, logs = await timed_drain(engine)
        assert report.ok and report.files_applied == 2, report
        assert failures(engine) == NO_FAILURES
        await assert_applied_once(engine, bucket, conn)

        # The server asked for 1 s twice; botocore alone would have waited rand(0, 1) s
        # and rand(0, 2) s.
        listed = [s.at for s in proxy.requests("list", CHANGES_LIST)]
        assert len(listed) == 3 and all(b - a >= 0.95 for a, b in itertools.pairwise(listed))
        retried = {
            (op, why): sample(engine, "fleettickets_s3_retries_total", operation=op, reason=why)
            for op, why in [
                ("ListObjectsV2", "SlowDown"),
                ("GetObject", "InternalError"),
                ("CopyObject", "SlowDown"),
                ("DeleteObjects", "InternalError"),  # the archive's deletes go in batches
            ]
        }
        assert retried == dict.fromkeys(retried, 1.0) | {("ListObjectsV2", "SlowDown"): 2.0}
        # A connection reset on a kept-alive connection is retried by aiohttp itself.
        assert len(proxy.requests("get", "10-05-00")) == 2
        lines = [e for e in logs if e["event"] == "S3 request retried"]
        assert len(lines) == 5 and {e["log_level"] for e in lines} == {"warning"}
        assert any(e["url"].endswith("/automations/inc/changes/2026-06-22T10-00-00.csv") for e in lines)
    print(f"\nthrottling/5xx/reset: {took:.1f} s")


@pytest.mark.parametrize(
    ("op", "key", "stage"),
    [("list", CHANGES_LIST, "list"), ("get", "10-00-00", "fetch"), ("copy", ".", "archive")],
)
async def test_a_fault_that_outlasts_the_retries_fails_at_its_stage_and_the_next_pass_resumes(
    make_config: Callable[..., Config],
    proxy: FaultProxy,
    bucket: Bucket,
    conn: asyncpg.Connection,
    op: str,
    key: str,
    stage: str,
) -> None:
    two_files(bucket)
    proxy.add(op=op, key=key, times=None, **INTERNAL)
    config = make_config(s3=via(proxy, bucket))
    async with engine_for(config) as engine:
        report, took, logs = await timed_drain(engine)
        assert took < 15, "a pass must not outlive its retries"
        expected_failures = NO_FAILURES | {stage: 2.0 if stage == "archive" else 1.0}
        assert failures(engine) == expected_failures
        if stage == "archive":
            # Committed, then the move failed: not fatal, nothing to apply again.
            assert report.ok and await ledger_keys(conn) == [F1, F2]
            assert bucket.keys("automations/inc/changes/") == [F1, F2]
            warned = [e for e in logs if e["event"] == "archive failed; next pass retries it"]
            assert sorted(e["error"].split(":")[0] for e in warned) == [f"S3 copy {F1}", f"S3 copy {F2}"]
            assert f"InternalError (HTTP 500, 3 attempts): {INTERNAL['message']}" in warned[0]["error"]
        else:
            where = "automations/inc/changes/" if stage == "list" else F1
            op_name = "list" if stage == "list" else "get"
            error = report.as_json()["error"]
            assert error["stage"] == stage
            assert error["message"] == (
                f"S3 {op_name} {where}: InternalError (HTTP 500, 3 attempts): {INTERNAL['message']}"
            ), error
            assert report.retryable
            logged = [e for e in logs if e["event"] == "drain pass failed"]
            assert logged and logged[0]["error"] == error["message"] and logged[0]["stage"] == stage
            assert await ledger_keys(conn) == [] and await rows(conn) == 0
        # botocore's attempts, no more: max_attempts counts the first.
        assert len(proxy.requests(op, key)) in (3, 6, 9)

        proxy.clear()
        with structlog.testing.capture_logs() as logs:
            again = await drain(engine, config.dataset("inc"))
        assert again.ok and again.files_applied == (0 if stage == "archive" else 2), again
        if stage == "archive":
            assert len([e for e in logs if e["event"] == "already applied; archiving only"]) == 2
        await assert_applied_once(engine, bucket, conn)
    print(f"\n{op} outlasting retries: {took:.1f} s")


@pytest.mark.parametrize(
    ("op", "code", "message"),
    [
        ("list", "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."),
        (
            "list",
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
        ),
        ("get", "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."),
    ],
)
async def test_a_refused_key_fails_at_once_says_it_is_a_credentials_problem_and_is_not_retried(
    make_config: Callable[..., Config],
    proxy: FaultProxy,
    bucket: Bucket,
    conn: asyncpg.Connection,
    op: str,
    code: str,
    message: str,
) -> None:
    two_files(bucket)
    key = CHANGES_LIST if op == "list" else "10-00-00"
    proxy.add(op=op, key=key, times=None, status=403, code=code, message=message)
    config = make_config(s3=via(proxy, bucket))
    async with engine_for(config) as engine:
        report, took, _ = await timed_drain(engine)
        assert took < 2
        error = report.as_json()["error"]
        stage, where = ("list", "automations/inc/changes/") if op == "list" else ("fetch", F1)
        assert error["stage"] == stage, error
        assert error["message"].startswith(
            f"S3 {op} {where}: {code} (HTTP 403): {message}; a credentials problem"
        ), error
        assert "RUSTFS_ACCESS_KEY_ID" in error["message"]
        assert not report.retryable  # the daemon waits for the next cron fire
        # Not one retry: 1 request (a GET is tried once ahead and once at its turn).
        assert len(proxy.requests(op, key)) == (1 if op == "list" else 2)
        assert sample(engine, "fleettickets_s3_retries_total", operation="ListObjectsV2", reason=code) == 0
        assert await ledger_keys(conn) == []
    print(f"\n403 {code} on {op}: {took:.2f} s")


@pytest.mark.parametrize("fault", ["stall", "cut"])
@pytest.mark.parametrize("path", ["prefetched", "streamed"])
async def test_a_body_that_stalls_or_is_cut_after_its_headers_costs_a_fetch_not_a_hang(
    make_config: Callable[..., Config],
    proxy: FaultProxy,
    bucket: Bucket,
    conn: asyncpg.Connection,
    db_url: str,
    fault: str,
    path: str,
) -> None:
    two_files(bucket)
    rule = {"stall_after_s": 60.0} if fault == "stall" else {"cut_after_bytes": 100}
    proxy.add(op="get", key="10-00-00", times=1, **rule)
    ingest = STREAMED if path == "streamed" else {}
    config = make_config(s3=via(proxy, bucket), ingest=ingest)
    why = (
        "no data from http://127.0.0.1"
        if fault == "stall"
        else "ClientPayloadError: Response payload is not completed"
    )
    async with engine_for(config) as engine:
        report, took, logs = await timed_drain(engine)
        assert took < 1.0 + 3, "cut by read_timeout_s (1 s), not hung"
        if path == "prefetched":
            # Fetched ahead of its turn: fetched again at its turn, and applied.
            assert report.ok and report.files_applied == 2, report
            warned = [e for e in logs if e["event"] == "prefetch failed; fetching again at its turn"]
            assert [e["key"] for e in warned] == [F1] and f"S3 read {F1}: {why}" in warned[0]["error"]
            assert failures(engine) == NO_FAILURES
        else:
            # In the middle of its COPY: the file rolls back whole, the pass fails at fetch.
            error = report.as_json()["error"]
            assert error["stage"] == "fetch" and error["key"] == F1, error
            assert error["message"].startswith(f"S3 read {F1}: {why}"), error
            if fault == "stall":
                assert "within [s3] read_timeout_s" in error["message"]
            assert failures(engine) == NO_FAILURES | {"fetch": 1.0}
            assert await ledger_keys(conn) == [] and await rows(conn) == 0
            assert await conn.fetchval(ADVISORY_LOCKS) == 0
            again = await drain(engine, config.dataset("inc"))
            assert again.ok and again.files_applied == 2, again
        assert len(proxy.requests("get", "10-00-00")) == 2
        await assert_applied_once(engine, bucket, conn)
    print(f"\n{fault} {path}: {took:.1f} s")


async def test_a_trickling_body_is_slow_but_progressing_and_completes(
    make_config: Callable[..., Config], proxy: FaultProxy, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    body = csv_file(*(row(f"T{i}", location_name=f"Site {i} " + "x" * 60) for i in range(40)))
    bucket.put(F1, body)
    # ~1 KB every 0.25 s: each read well inside read_timeout_s (1 s), the whole body ~3x it.
    proxy.add(op="get", key="10-00-00", times=None, trickle_bytes=1024, trickle_interval_s=0.25)
    config = make_config(s3=via(proxy, bucket), ingest=STREAMED)
    async with engine_for(config) as engine:
        report, took, logs = await timed_drain(engine)
        assert report.ok and report.files_applied == 1 and report.rows_upserted == 40, report
        assert took >= 0.25 * (len(body) // 1024), "the body really trickled"
        assert took > 3 * config.s3.read_timeout_s
        assert not [e for e in logs if e["event"] in ("S3 request retried", "drain pass failed")]
        assert len(proxy.requests("get", "10-00-00")) == 1
        assert await ledger_keys(conn) == [F1]
    print(f"\ntrickle of {len(body)} bytes: {took:.1f} s")


async def test_connection_refused_fails_the_pass_at_list_naming_the_endpoint_then_the_next_resumes(
    make_config: Callable[..., Config], proxy: FaultProxy, bucket: Bucket, conn: asyncpg.Connection
) -> None:
    two_files(bucket)
    config = make_config(s3=via(proxy, bucket))
    async with engine_for(config) as engine:
        proxy.down()
        report, took, logs = await timed_drain(engine)
        assert took < 1 + 2 + 1, "botocore's backoff over 3 attempts, no more"
        error = report.as_json()["error"]
        assert error["stage"] == "list" and report.retryable
        assert error["message"] == (
            f"S3 list automations/inc/changes/: cannot connect to {proxy.endpoint}: "
            "connection refused (EndpointConnectionError)"
        )
        # Each listing (changes/, and processed/ beside it) retried twice, 3 attempts each.
        retried = [e for e in logs if e["event"] == "S3 request retried"]
        assert len([e for e in retried if "changes%2F" in e["url"]]) == 2
        assert failures(engine) == NO_FAILURES | {"list": 1.0}
        proxy.up()
        again = await drain(engine, config.dataset("inc"))
        assert again.ok and again.files_applied == 2, again
        await assert_applied_once(engine, bucket, conn)
    print(f"\nconnection refused: {took:.1f} s")


# --- a name that does not resolve ---------------------------------------------------------
# Without sending a DNS query off the machine: the process runs in a mount namespace of
# its own whose resolver reads only a hosts file of the test's (nsswitch `hosts: files`).

UNSHARE = shutil.which("unshare")
needs_namespace = pytest.mark.skipif(
    UNSHARE is None or os.geteuid() != 0, reason="needs root and unshare(1) for a private mount namespace"
)
S3_NAME = "s3.fleet-faults.test"


def hosts_only(tmp_path: Path) -> tuple[list[str], Path]:
    """A command prefix that runs its command resolving names from ``hosts`` only."""
    nss, hosts = tmp_path / "nsswitch.conf", tmp_path / "hosts"
    nss.write_text("hosts: files\n")
    hosts.write_text("127.0.0.1 localhost\n")
    script = f'mount --bind {nss} /etc/nsswitch.conf && mount --bind {hosts} /etc/hosts && exec "$@"'
    return [str(UNSHARE), "--mount", "sh", "-c", script, "sh"], hosts


@needs_namespace
def test_a_name_that_does_not_resolve_fails_naming_the_host_without_a_traceback(
    db_url: str, bucket: Bucket, proxy: FaultProxy, tmp_path: Path
) -> None:
    two_files(bucket)
    wrap, _ = hosts_only(tmp_path)
    endpoint = f"http://{S3_NAME}:{proxy.port}"
    cfg = config_dict(db_url, bucket, s3={**via(proxy, bucket), "endpoint_url": endpoint})
    (tmp_path / "config.toml").write_text(to_toml(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "RUSTFS_"))}
    started = time.monotonic()
    res = subprocess.run(
        [*wrap, sys.executable, "-m", "fleetticketsd", "--config", str(tmp_path / "config.toml"), "drain"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    took = time.monotonic() - started
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert (
        f"cannot reach bucket {bucket.name!r} at {endpoint}: S3 head_bucket {bucket.name}: cannot connect to "
        f"{endpoint}: the name {S3_NAME} does not resolve (Name or service not known)"
    ) in res.stderr, res.stderr
    assert proxy.requests() == []
    print(f"\nname does not resolve (drain): {took:.1f} s")


@needs_namespace
def test_daemon_a_name_that_stops_resolving_fails_passes_at_list_then_resumes_when_it_resolves(
    start_daemon: Callable[..., tuple[Daemon, dict[str, Any]]],
    bucket: Bucket,
    proxy: FaultProxy,
    db_url: str,
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    two_files(bucket)
    wrap, hosts = hosts_only(tmp_path)
    d, _ = start_daemon(
        wrap=wrap,
        s3={**via(proxy, bucket), "endpoint_url": f"http://{S3_NAME}:{proxy.port}"},
        daemon={"pass_retry_attempts": 50, "pass_retry_max_wait_s": 0.5, "source_check_interval_s": 60},
    )
    failed = watch_health(d, lambda: d.logged("drain pass failed", dataset="inc", stage="list"), "list fails")
    assert failed[0]["error"] == (
        f"S3 list automations/inc/changes/: cannot connect to http://{S3_NAME}:{proxy.port}: "
        f"the name {S3_NAME} does not resolve (Name or service not known) (EndpointConnectionError)"
    )
    # The name resolves again (DNS fixed): the daemon's own retries get through.
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {S3_NAME}\n")
    watch_health(d, lambda: d.metric("fleettickets_files_applied_total", dataset="inc") == 2, "applied")
    assert (d.metric("fleettickets_poll_failures_total", dataset="inc", stage="list") or 0) >= 1
    assert ledger_of(db_url) == [F1, F2]
    watch_health(d, lambda: bucket.keys("automations/inc/changes/") == [], "archived")
    print(f"\ndaemon name does not resolve: {time.monotonic() - started:.1f} s")


# --- the daemon, as a process ------------------------------------------------------------------


def watch_health(d: Daemon, until: Callable[[], Any], what: str, timeout_s: float = 60.0) -> Any:
    """Poll ``until`` while checking that /healthz answers 200 at every step."""

    def check() -> Any:
        status, body = d.get("/healthz")
        assert status == 200, body
        assert d.proc.poll() is None, "daemon exited"
        return until()

    return poll(check, timeout_s=timeout_s, interval_s=0.1, what=what)


def ledger_of(db_url: str) -> list[str]:
    async def go() -> list[str]:
        c = await asyncpg.connect(db_url)
        try:
            return await ledger_keys(c)
        finally:
            await c.close()

    return asyncio.run(go())


def test_daemon_rides_out_throttling_5xx_stalls_and_an_endpoint_that_goes_away(
    start_daemon: Callable[..., tuple[Daemon, dict[str, Any]]], bucket: Bucket, proxy: FaultProxy, db_url: str
) -> None:
    started = time.monotonic()
    two_files(bucket)
    proxy.add(op="list", key=CHANGES_LIST, times=2, headers={"Retry-After": "1"}, **SLOW_DOWN)
    proxy.add(op="get", key="10-00-00", times=1, **INTERNAL)
    proxy.add(op="get", key="10-05-00", times=1, stall_after_s=60.0)
    proxy.add(op="copy", times=1, reset=True)
    d, _ = start_daemon(
        s3=via(proxy, bucket),
        schedule={"cron": "*/2 * * * * *"},
        daemon={"pass_retry_attempts": 2, "pass_retry_max_wait_s": 0.5},
    )
    watch_health(d, lambda: d.metric("fleettickets_files_applied_total", dataset="inc") == 2, "applied")
    for stage in ("list", "fetch", "parse", "apply", "archive"):
        assert d.metric("fleettickets_poll_failures_total", dataset="inc", stage=stage) == 0, stage
    assert d.metric("fleettickets_s3_retries_total", operation="ListObjectsV2", reason="SlowDown") == 2
    assert d.metric("fleettickets_s3_retries_total", operation="GetObject", reason="InternalError") == 1
    assert d.logged("prefetch failed; fetching again at its turn", key=F2)
    assert ledger_of(db_url) == [F1, F2]
    watch_health(d, lambda: bucket.keys("automations/inc/changes/") == [], "archived")

    # The endpoint goes away: each pass fails at list, naming it; the daemon stays live.
    proxy.down()
    bucket.put(inc_key("2026-06-22T10-10-00.csv"), csv_file(row("T4")))
    watch_health(
        d,
        lambda: [
            e
            for e in d.logged("drain pass failed", dataset="inc", stage="list")
            if f"cannot connect to {proxy.endpoint}: connection refused" in e["error"]
        ],
        "a failed pass at list",
    )
    assert d.get("/readyz")[0] == 200  # the database is fine; S3 is not a readiness check
    proxy.up()
    watch_health(d, lambda: d.metric("fleettickets_files_applied_total", dataset="inc") == 3, "resumed")
    assert ledger_of(db_url) == [F1, F2, inc_key("2026-06-22T10-10-00.csv")]
    assert not d.logged("drain crashed")
    print(f"\ndaemon throttling/5xx/stall/refused: {time.monotonic() - started:.1f} s")


def test_daemon_a_refused_key_fails_each_pass_once_and_waits_for_the_next_cron_fire(
    start_daemon: Callable[..., tuple[Daemon, dict[str, Any]]], bucket: Bucket, proxy: FaultProxy, db_url: str
) -> None:
    started = time.monotonic()
    two_files(bucket)
    refused = proxy.add(
        op="list",
        key=CHANGES_LIST,
        times=None,
        status=403,
        code="InvalidAccessKeyId",
        message="The AWS Access Key Id you provided does not exist in our records.",
    )
    d, _ = start_daemon(
        s3=via(proxy, bucket),
        schedule={"cron": "*/3 * * * * *"},
        # The watcher lists too: keep it out of the count.
        daemon={"pass_retry_attempts": 5, "pass_retry_max_wait_s": 0.2, "source_check_interval_s": 600},
    )
    not_retried = "drain pass not retried: retrying cannot help until someone fixes the cause; " \
        "the next cron fire tries again"  # fmt: skip
    watch_health(d, lambda: len(d.logged(not_retried, dataset="inc")) >= 2, "2 passes failed, not retried")
    failed = d.logged("drain pass failed", dataset="inc")
    assert {e["stage"] for e in failed} == {"list"}
    assert "InvalidAccessKeyId (HTTP 403)" in failed[0]["error"]
    assert "a credentials problem" in failed[0]["error"]
    # One request per pass: no botocore retry, no pass retry (a next pass may be under way).
    passes = len(d.logged(not_retried, dataset="inc"))
    assert passes <= refused.hits <= passes + 1 and passes <= 3
    assert passes <= (d.metric("fleettickets_poll_failures_total", dataset="inc", stage="list") or 0)

    proxy.clear()  # the key is fixed
    watch_health(d, lambda: d.metric("fleettickets_files_applied_total", dataset="inc") == 2, "applied")
    assert ledger_of(db_url) == [F1, F2]
    print(f"\ndaemon refused key: {time.monotonic() - started:.1f} s")


def test_daemon_a_stall_in_a_streamed_body_fails_one_pass_at_fetch_and_its_retry_applies_once(
    start_daemon: Callable[..., tuple[Daemon, dict[str, Any]]], bucket: Bucket, proxy: FaultProxy, db_url: str
) -> None:
    started = time.monotonic()
    two_files(bucket)
    proxy.add(op="get", key="10-00-00", times=1, stall_after_s=60.0)
    d, _ = start_daemon(s3=via(proxy, bucket), ingest=STREAMED, daemon={"pass_retry_max_wait_s": 0.5})
    failed = watch_health(d, lambda: d.logged("drain pass failed", dataset="inc"), "failed pass")
    assert failed[0]["stage"] == "fetch" and failed[0]["key"] == F1
    assert failed[0]["error"].startswith(
        f"S3 read {F1}: no data from {proxy.endpoint} within [s3] read_timeout_s"
    )
    watch_health(d, lambda: d.metric("fleettickets_files_applied_total", dataset="inc") == 2, "retry applied")
    assert d.metric("fleettickets_poll_failures_total", dataset="inc", stage="fetch") == 1
    assert ledger_of(db_url) == [F1, F2]
    print(f"\ndaemon stalled body: {time.monotonic() - started:.1f} s")

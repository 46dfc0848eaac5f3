"""README command 1 (`make run` → scripts/run.py), end to end, as a new user would run it.

No bucket is reachable (the config points at an unused port and RUSTFS_* is unset), so
the script must pick the embedded demo S3, seed it, keep a feeder running and start the
daemon against a database it creates itself; GEOCODER_API_KEY is unset too, so it must
geocode against its local fake provider. The test watches the result only from the
outside — /metrics and the database — then presses "Ctrl-C" and checks that nothing the
script started outlives it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

try:
    import psutil
except ImportError:  # optional: /proc is scanned instead
    psutil = None

from .conftest import PG_ADMIN_URL, REPO, admin_sql, free_port, to_toml

SCRIPT = REPO / "scripts" / "run.py"
DEADLINE_S = 90.0  # start-up, seeded drain, and a fed delta drained by a later cron fire
STOP_DEADLINE_S = 60.0


@pytest.fixture
def database_url() -> Iterator[str]:
    """A name that does not exist yet: the script has to create the database itself."""
    name = f"fleet_run_{uuid.uuid4().hex[:12]}"
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    admin_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def query(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(go())


def metric(base: str, name: str, dataset: str | None = None, **labels: str) -> float | None:
    """A sample's value from /metrics, found by its labels in any order."""
    if dataset is not None:
        labels["dataset"] = dataset
    with urllib.request.urlopen(f"{base}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    for m in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.M):
        if dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))) == labels:
            return float(m.group(2))
    return None


def descendants(pid: int) -> dict[int, str]:
    """pid -> cmdline of every live process below ``pid``."""
    if psutil is not None:
        try:
            return {p.pid: " ".join(p.cmdline()) for p in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            return {}
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The command name (field 2) may contain spaces; fields after ")" are fixed.
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[1])
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = cmdline(child) or "?"
                frontier.append(child)
    return found


def cmdline(pid: int) -> str | None:
    """The command line of a live (not zombie) process, else None."""
    if psutil is not None:
        try:
            p = psutil.Process(pid)
            return None if p.status() == psutil.STATUS_ZOMBIE else " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            return None
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return None if state == "Z" else raw.replace(b"\0", b" ").decode(errors="replace").strip()


def processes_mentioning(needle: str) -> dict[int, str]:
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            line = cmdline(int(entry.name))
            if line and needle in line:
                found[int(entry.name)] = line
    return found


def test_run_script_drains_seeded_and_fed_files_then_stops_cleanly(tmp_path: Path, database_url: str) -> None:
    listen = f"127.0.0.1:{free_port()}"
    base = f"http://{listen}"
    config = tmp_path / "config.toml"
    config.write_text(
        to_toml(
            {
                "database": {"url": database_url},
                # Nothing listens there: "no bucket configured" on a fresh machine.
                "s3": {"endpoint_url": f"http://127.0.0.1:{free_port()}", "bucket": "isptickets"},
                "server": {"listen": listen},
                "schedule": {"timezone": "Africa/Nairobi", "cron": "*/20 6-20 * * *"},
                "datasets": {
                    "inc": {"prefix": "automations/inc/", "table": "tickets.inc", "on_bad_file": "halt"},
                    "crq": {"prefix": "automations/crq/", "table": "tickets.crq"},
                },
                "geocoder": {"enabled": True},
                "daemon": {"shutdown_grace_period_s": 10},
            }
        )
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RUSTFS_", "GEOCODER_")) and k not in ("DATABASE_URL", "FLEETTICKETSD_CONFIG")
    }
    env.update(DATABASE_URL=database_url, FLEETTICKETSD_DEMO_FEED_INTERVAL_S="2", PYTHONUNBUFFERED="1")
    log = tmp_path / "run.log"
    started = time.monotonic()
    with log.open("wb") as out:
        # cwd is tmp_path: .run/ must land under the caller's directory, not the repo.
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--config", str(config)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    children: dict[int, str] = {}

    def output() -> str:
        return log.read_text(errors="replace")

    def until(check: Callable[[], Any], deadline: float, what: str) -> Any:
        last: Any = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(
                    f"run.py exited ({proc.returncode}) while waiting for {what}:\n{output()[-6000:]}"
                )
            children.update(descendants(proc.pid))
            try:
                last = check()
            except (OSError, asyncpg.PostgresError) as exc:  # not up yet
                last = exc
            if last and not isinstance(last, Exception):
                return last
            time.sleep(0.25)
        pytest.fail(f"timed out waiting for {what} (last: {last!r}):\n{output()[-6000:]}")

    try:
        deadline = started + DEADLINE_S
        until(lambda: "Ctrl-C stops everything" in output(), deadline, "the banner")
        text = output()
        assert "embedded demo S3 (moto), seeded with synthetic data" in text
        assert re.search(r"^ *geocoding +LOCAL FAKE provider \(not real coordinates\)", text, re.M), text
        assert f"{base}/metrics" in text and f"{base}/readyz" in text
        status_line = re.search(r"^ *(.*fleetticketsd --config \.run/config\.toml status)$", text, re.M)
        assert status_line, text
        seeded = re.search(r"^ *inc: \d+ seeded files, newest (\S+)$", text, re.M)
        assert seeded, text
        newest_seeded = seeded.group(1)

        demo = tomllib.loads((tmp_path / ".run" / "config.toml").read_text())
        assert demo["schedule"]["cron"] == "* * * * *"
        assert demo["daemon"]["source_check_interval_s"] == 10
        moto_endpoint = demo["s3"]["endpoint_url"]
        assert moto_endpoint.startswith("http://127.0.0.1:")
        geocoder = demo["geocoder"]
        assert geocoder["enabled"] is True and geocoder["provider"] == "locationiq"
        assert 0 < geocoder["rate_per_second"] <= 2
        fake_url = geocoder["base_url"]
        assert fake_url.startswith("http://127.0.0.1:") and fake_url != moto_endpoint

        # The seeded feed is drained.
        first = until(lambda: metric(base, "fleettickets_files_applied_total", "inc"), deadline, "inc files")
        until(lambda: query(database_url, "SELECT 1 FROM tickets.inc LIMIT 1"), deadline, "tickets.inc rows")
        until(lambda: query(database_url, "SELECT 1 FROM tickets.crq LIMIT 1"), deadline, "tickets.crq rows")

        # A delta the feeder dropped after start-up is drained too, so the counter moves.
        def fed_delta_applied() -> list[asyncpg.Record]:
            fed = re.findall(r"^feeder: new delta s3://[^/]+/(\S+)$", output(), re.M)
            applied = metric(base, "fleettickets_files_applied_total", "inc")
            if not fed or applied is None or applied <= first:
                return []
            return query(
                database_url,
                "SELECT key, applied_at FROM tickets.ingest_files"
                " WHERE dataset = 'inc' AND status = 'applied' AND key = ANY($1::text[]) AND key > $2",
                fed,
                newest_seeded,
            )

        rows = until(fed_delta_applied, deadline, "a fed inc delta applied and the counter increased")
        seeded_done = query(
            database_url,
            "SELECT max(applied_at) AS at FROM tickets.ingest_files WHERE dataset = 'inc' AND key <= $1",
            newest_seeded,
        )
        assert seeded_done[0]["at"] is not None and rows[0]["applied_at"] >= seeded_done[0]["at"]
        with urllib.request.urlopen(f"{base}/readyz", timeout=2) as resp:
            assert resp.status == 200

        # The fake provider answered the geocoder, and tickets got plausible Kenyan points.
        def geocoded_ok() -> bool:
            ok = metric(base, "fleettickets_geocode_requests_total", provider="locationiq", outcome="ok")
            return ok is not None and ok > 0

        until(geocoded_ok, deadline, "a geocode request answered ok by the fake provider")
        placed = until(
            lambda: query(
                database_url,
                "SELECT geo_source, ST_Y(geom) AS lat, ST_X(geom) AS lon FROM tickets.inc"
                " WHERE geom IS NOT NULL AND geo_source IN ('location', 'cluster') LIMIT 50",
            ),
            deadline,
            "tickets.inc rows placed by the geocoder",
        )
        assert all(-5 < r["lat"] < 5 and 33.5 < r["lon"] < 42 for r in placed), placed  # Kenya

        # The printed status command works as pasted, without the script's environment.
        argv = shlex.split(status_line.group(1))
        assignments = dict(a.split("=", 1) for a in argv if re.match(r"^[A-Z_]+=", a))
        bare_env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RUSTFS_", "AWS_")) and k not in ("DATABASE_URL", "FLEETTICKETSD_CONFIG")
        }
        status = subprocess.run(
            argv[len(assignments) :],
            cwd=tmp_path,
            env={**bare_env, **assignments},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        assert "watermark" in status.stdout and status.stdout.startswith("inc")
        assert "geocode queue" in status.stdout and "geocode budget" in status.stdout

        # "Ctrl-C": everything it started stops, and it exits 0.
        children.update(descendants(proc.pid))
        lines = children.values()
        assert any("moto.server" in line for line in lines), children
        assert any("fleetticketsd.feedgen" in line for line in lines), children
        assert any(line.endswith(" run") for line in lines), children
        assert any("fake_geocoder.py" in line for line in lines), children
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"run.py did not stop within {STOP_DEADLINE_S} s:\n{output()[-6000:]}")
        assert code == 0, output()[-6000:]
        left = {pid: line for pid, line in children.items() if cmdline(pid) == line}
        port = moto_endpoint.rsplit(":", 1)[1]
        left.update(processes_mentioning(f"-p {port}"))
        left.update(processes_mentioning(moto_endpoint))
        left.update(processes_mentioning(f"--port {fake_url.rsplit(':', 1)[1]} "))
        assert not left, f"processes left running: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid, line in {**children, **descendants(proc.pid)}.items():
            if cmdline(pid) == line:
                os.kill(pid, signal.SIGKILL)

"""Taking over the legacy loader's live database (`migrate --adopt`, LEGACY.md).

The fixture builds the loader's database from tests/legacy/schema.sql and writes data
the loader's way (baseline and deltas upserted without a guard, the watermark, files
moved to processed/, a gazetteer with verified and unverified points, closure history,
snapshots). Every test then runs the real command line against it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fleetticketsd import feedgen
from fleetticketsd.geocoding.geocode import build_query

from . import fake_geocoder as fg
from .conftest import REPO, Bucket, admin_sql, csv_file, poll, row, run_cli
from .legacy import loader

INC, CRQ = "automations/inc/", "automations/crq/"
# How many files of each feed the loader had applied before the cutover.
LOADER_APPLIED = {"inc": 9, "crq": 4}


@dataclass
class Legacy:
    url: str
    files: dict[str, list[tuple[str, bytes]]]  # dataset -> (name, bytes), in name order
    watermark: dict[str, str]
    verified_clusters: dict[str, tuple[float, float]] = field(default_factory=dict)
    verified_locations: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    places: set[str] = field(default_factory=set)  # queries the loader had answered

    def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return asyncio.run(_fetch(self.url, sql, *args))

    def execute(self, sql: str) -> None:
        """One or more statements, in one implicit transaction."""

        async def go() -> None:
            conn = await asyncpg.connect(self.url)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        asyncio.run(go())

    def value(self, sql: str, *args: Any) -> Any:
        rows = self.fetch(sql, *args)
        return rows[0][0] if rows else None


async def _fetch(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def feeds() -> dict[str, list[tuple[str, bytes]]]:
    inc = feedgen.FeedSpec(dataset="inc", seed=21, baseline_rows=600, deltas=12, delta_rows=30)
    crq = feedgen.FeedSpec(dataset="crq", seed=22, baseline_rows=150, deltas=5, delta_rows=10)
    return {"inc": list(feedgen.generate(inc)), "crq": list(feedgen.generate(crq))}


def hand_checked(point: tuple[float, float]) -> tuple[float, float]:
    """A person's correction: near, but not what the provider says."""
    return round(point[0] + 0.0042, 6), round(point[1] - 0.0031, 6)


async def build_legacy(url: str, bucket: Bucket, skip: frozenset[str] = frozenset()) -> Legacy:
    files = feeds()
    legacy = Legacy(url, files, {})
    conn = await asyncpg.connect(url)
    try:
        await loader.build_schema(conn, skip)
        # The gazetteer the loader geocoded: every cluster and location its tickets
        # name, as its provider answered (the fake answers the same queries alike), and
        # a share corrected by hand and marked verified.
        seen: dict[str, str] = {}
        places: dict[tuple[str, str], str] = {}
        for dataset, ds_files in files.items():
            for _, data in ds_files[: LOADER_APPLIED[dataset]]:
                for rec in loader.records(data):
                    cluster, region = rec["cluster"], rec["region"].lower()
                    seen.setdefault(cluster, region)
                    key = loader.location_key(rec["location_name"], cluster)
                    if key:
                        places.setdefault((cluster, key), region)
        for i, (cluster, region) in enumerate(sorted(seen.items())):
            q = build_query(cluster, region, "Kenya")
            point = fg.kenya_point(q)
            verified = i % 2 == 0
            if verified:
                point = hand_checked(point)
                legacy.verified_clusters[cluster] = point
            legacy.places.add(q)
            await conn.execute(loader.GAZETTEER_CLUSTER, cluster, *point, verified, "locationiq")
        for i, ((cluster, location), region) in enumerate(sorted(places.items())):
            q = build_query(cluster, region, "Kenya", location)
            point = fg.kenya_point(q)
            verified = i % 3 == 0
            if verified:
                point = hand_checked(point)
                legacy.verified_locations[(cluster, location)] = point
            legacy.places.add(q)
            await conn.execute(
                loader.GAZETTEER_LOCATION, cluster, location, *point, verified, "locationiq", q
            )
        # A place the provider did not know, and a name the loader stored uncleaned.
        await conn.execute(loader.GAZETTEER_LOCATION, "Karen", "Nowhere Lane", None, None, False, None, None)
        await conn.execute(
            loader.GAZETTEER_LOCATION,
            "Kilimani",
            "KILIMANI_Jogoo Rd FDT7",
            -1.3,
            36.79,
            False,
            "locationiq",
            None,
        )
        for dataset, ds_files in files.items():
            prefix = f"automations/{dataset}/"
            for i, (name, data) in enumerate(ds_files):
                if i < LOADER_APPLIED[dataset]:
                    etag = bucket.put(f"{prefix}processed/{name}", data)
                    await loader.apply_file(conn, dataset, f"{prefix}changes/{name}", etag, data)
                    legacy.watermark[dataset] = f"{prefix}changes/{name}"
                else:
                    bucket.put(f"{prefix}changes/{name}", data)
        # Days before the files: the loader wrote one snapshot a day.
        for back in range(1, 6):
            day = date.today() - timedelta(days=back)
            await conn.execute(
                loader.SNAPSHOT, day, 300 + back, 20, 18, 7, datetime.combine(day, time(17, 40), tzinfo=UTC)
            )
    finally:
        await conn.close()
    return legacy


@pytest.fixture
def legacy(empty_db_url: str, bucket: Bucket) -> Legacy:
    return asyncio.run(build_legacy(empty_db_url, bucket))


@pytest.fixture
def env_for(cli_env: Callable[..., dict[str, str]]) -> Callable[..., dict[str, str]]:
    """A CLI environment whose database is the given URL."""

    def make(url: str, **overrides: Any) -> dict[str, str]:
        return cli_env(database={"url": url}, **overrides)

    return make


# Every table of the loader's, with its contents, as a comparable value.
SNAPSHOT_TABLES = (
    "schema_migrations", "import_meta", "geo_clusters", "geo_locations", "inc", "crq",
    "closure_events", "inc_daily_snapshot",
)  # fmt: skip


def contents(legacy: Legacy, schema: str = "tickets") -> dict[str, list[str]]:
    out = {}
    for table in SNAPSHOT_TABLES:
        rows = legacy.fetch(f"SELECT to_jsonb(t)::text AS j FROM {schema}.{table} t ORDER BY 1")
        out[table] = [r["j"] for r in rows]
    return out


def layout_of(legacy: Legacy) -> list[str]:
    rows = legacy.fetch(
        "SELECT n.nspname || '.' || c.relname || ':' || c.relkind::text AS r FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname LIKE 'tickets%' "
        "OR n.nspname = 'reporting' UNION ALL SELECT n.nspname || '.' || p.proname FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname LIKE 'tickets%' "
        "OR n.nspname = 'reporting' ORDER BY 1"
    )
    return [r["r"] for r in rows]


# --- detection: nothing touches the loader's database by accident -------------------------


def test_every_command_refuses_the_legacy_layout_and_names_what_it_found(
    legacy: Legacy, env_for: Callable[..., dict[str, str]]
) -> None:
    env = env_for(legacy.url)
    before, shape = contents(legacy), layout_of(legacy)
    res = run_cli("migrate", env=env)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert "legacy loader's database" in res.stderr and "migrate --adopt" in res.stderr
    assert "tickets.schema_migrations" in res.stderr and "columns filename, applied_at" in res.stderr
    inc_rows = len(before["inc"])
    assert f"tickets.inc ({inc_rows} row(s), without source_key)" in res.stderr
    for args in (("migrate", "--check"), ("drain",), ("status",), ("drain", "--dry-run")):
        res = run_cli(*args, env=env)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert "migrate --adopt" in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
    assert contents(legacy) == before and layout_of(legacy) == shape  # nothing changed


# --- the dry run and the takeover ---------------------------------------------------------


def test_dry_run_prints_the_plan_and_changes_nothing(
    legacy: Legacy, env_for: Callable[..., dict[str, str]]
) -> None:
    env = env_for(legacy.url)
    before, shape = contents(legacy), layout_of(legacy)
    dry = run_cli("migrate", "--adopt", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("adoption plan (dry run: nothing was changed)")
    assert contents(legacy) == before and layout_of(legacy) == shape
    real = run_cli("migrate", "--adopt", env=env)
    assert real.returncode == 0, real.stderr
    # The same plan, line for line, but its first.
    assert real.stdout.splitlines()[1:] == dry.stdout.splitlines()[1:]


def test_adoption_keeps_every_row_and_the_watermark(
    legacy: Legacy, env_for: Callable[..., dict[str, str]]
) -> None:
    env = env_for(legacy.url)
    before = contents(legacy)
    res = run_cli("migrate", "--adopt", env=env)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    n_inc, n_crq = len(before["inc"]), len(before["crq"])
    assert f"{n_inc} of {n_inc} ticket row(s) kept, raw unchanged" in out
    assert f"{n_crq} of {n_crq} ticket row(s) kept, raw unchanged" in out
    assert f"source_key = {legacy.watermark['inc']}" in out
    assert "tickets_legacy (never dropped)" in out

    # The loader's objects, whole, in tickets_legacy.
    assert contents(legacy, "tickets_legacy") == before
    # Tickets: raw as it was, source_key = the dataset's watermark.
    for table in ("inc", "crq"):
        legacy_rows = {
            r["ticket_id"]: r["raw"] for r in legacy.fetch(f"SELECT * FROM tickets_legacy.{table}")
        }
        ours = legacy.fetch(f"SELECT ticket_id, raw, source_key FROM tickets.{table}")
        assert {r["ticket_id"]: r["raw"] for r in ours} == legacy_rows
        assert {r["source_key"] for r in ours} == {legacy.watermark[table]}
    # The watermark, and the rest of the loader's metadata.
    meta = {
        r["dataset"]: json.loads(r["metadata"]) for r in legacy.fetch("SELECT * FROM tickets.import_meta")
    }
    assert {d: m["source_max_key"] for d, m in meta.items()} == legacy.watermark
    assert all(m["export_type"] and m["source_etag"] for m in meta.values())
    # History: every closure and every day.
    assert legacy.value("SELECT count(*) FROM tickets.closure_events") == len(before["closure_events"])
    legacy_days = legacy.fetch(
        "SELECT day, open_backlog, opened, closed, breached FROM tickets_legacy.inc_daily_snapshot"
    )
    our_days = legacy.fetch(
        "SELECT day, open_backlog, opened, closed, breached FROM tickets.inc_daily_snapshot"
    )
    assert sorted(map(tuple, our_days)) == sorted(map(tuple, legacy_days))
    assert legacy.value(
        "SELECT count(*) FROM tickets.closure_events e JOIN tickets_legacy.closure_events l "
        "USING (ticket_id, closed_at) WHERE e.mttr_minutes IS NOT DISTINCT FROM l.mttr "
        "AND e.feed_sla_status IS NOT DISTINCT FROM l.sla_status"
    ) == len(before["closure_events"])
    # Afterwards migrate is a no-op and --check says so.
    again = run_cli("migrate", env=env)
    assert again.returncode == 0 and "schema is current" in again.stdout, again.stdout + again.stderr
    check = run_cli("migrate", "--check", env=env)
    assert check.returncode == 0, check.stdout
    # Idempotent: a second --adopt changes nothing and says so.
    second = run_cli("migrate", "--adopt", env=env)
    assert second.returncode == 0 and "already adopted" in second.stdout, second.stdout + second.stderr


def test_gazetteer_verified_points_stay_verified_and_unverified_become_cached_answers(
    legacy: Legacy, env_for: Callable[..., dict[str, str]]
) -> None:
    env = env_for(legacy.url)
    assert run_cli("migrate", "--adopt", env=env).returncode == 0
    clusters = {
        r["cluster"]: r
        for r in legacy.fetch(
            "SELECT cluster, status, verified, ST_Y(geom) AS lat, ST_X(geom) AS lon FROM tickets.geo_clusters"
        )
    }
    for cluster, (lat, lon) in legacy.verified_clusters.items():
        c = clusters[cluster]
        assert (
            c["verified"] and c["status"] == "ok" and (round(c["lat"], 6), round(c["lon"], 6)) == (lat, lon)
        )
    assert all(c["status"] == "ok" for c in clusters.values())
    assert not any(c["verified"] for name, c in clusters.items() if name not in legacy.verified_clusters)
    locations = {
        (r["cluster"], r["location"]): r
        for r in legacy.fetch(
            "SELECT cluster, location, status, verified, ST_Y(geom) AS lat, ST_X(geom) AS lon "
            "FROM tickets.geo_locations"
        )
    }
    for place, (lat, lon) in legacy.verified_locations.items():
        loc = locations[place]
        assert loc["verified"] and (round(loc["lat"], 6), round(loc["lon"], 6)) == (lat, lon)
    # The uncleaned legacy name was merged into its clean place (verified or not, one row).
    assert ("Kilimani", "KILIMANI_Jogoo Rd FDT7") not in locations
    assert locations[("Karen", "Nowhere Lane")]["status"] == "no_match"
    # Every ticket with a verified place stands on the person's point.
    on_verified = legacy.fetch(
        "SELECT t.cluster, t.location_key, t.geo_source, ST_Y(t.geom) AS lat, ST_X(t.geom) AS lon "
        "FROM tickets.inc t JOIN tickets.geo_locations l ON l.cluster = t.cluster "
        "AND l.location = t.location_key AND l.verified"
    )
    assert on_verified
    for t in on_verified:
        assert t["geo_source"] == "location"
        assert (round(t["lat"], 6), round(t["lon"], 6)) == legacy.verified_locations[
            (t["cluster"], t["location_key"])
        ]


# --- after the takeover: the daemon's own drain and geocoding ------------------------------


def test_drain_applies_only_newer_files_and_equals_in_order_application_of_the_whole_feed(
    legacy: Legacy, bucket: Bucket, env_for: Callable[..., dict[str, str]], db_url: str, s3_endpoint: str
) -> None:
    env = env_for(legacy.url)
    # The loader crashed once between its commit and its move: a file it applied is
    # still under changes/. It is late (before the watermark) and changes nothing.
    name, data = legacy.files["inc"][LOADER_APPLIED["inc"] - 2]
    bucket.put(f"{INC}changes/{name}", data)
    processed_before = {
        k: bucket.client.head_object(Bucket=bucket.name, Key=k)["ETag"]
        for k in bucket.keys(f"{INC}processed/")
    }
    assert run_cli("migrate", "--adopt", env=env).returncode == 0
    res = run_cli("drain", "--json", env=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)["datasets"]
    # The loader's files in processed/ sort at or before the adopted watermark: the
    # replay's listing starts after it, and none of them is applied again.
    assert "file replayed from processed/" not in res.stderr
    assert "no watermark yet" not in res.stderr
    newer = {d: len(files) - LOADER_APPLIED[d] for d, files in legacy.files.items()}
    assert out["inc"]["files_applied"] == newer["inc"] + 1  # the late one, under the guard
    assert out["crq"]["files_applied"] == newer["crq"]
    assert out["inc"]["watermark"] == f"{INC}changes/{legacy.files['inc'][-1][0]}"
    ledger = legacy.fetch(
        "SELECT dataset, key, late, rows_inserted + rows_updated AS n FROM tickets.ingest_files"
    )
    late = [r for r in ledger if r["late"]]
    assert [r["key"] for r in late] == [f"{INC}changes/{name}"] and late[0]["n"] == 0
    applied = sorted(r["key"].rsplit("/", 1)[1] for r in ledger if r["dataset"] == "crq")
    assert applied == [n for n, _ in legacy.files["crq"][LOADER_APPLIED["crq"] :]]
    # The loader's archive is untouched: nothing of it was applied again.
    for key, etag in processed_before.items():
        assert bucket.client.head_object(Bucket=bucket.name, Key=key)["ETag"] == etag
    assert bucket.keys(f"{INC}changes/") == [] and bucket.keys(f"{CRQ}changes/") == []

    # The same feed applied in order, from the start, by fleetticketsd alone.
    import boto3

    fresh = Bucket(
        f"fresh-{uuid.uuid4().hex[:8]}",
        s3_endpoint,
        boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1"),
    )
    fresh.client.create_bucket(Bucket=fresh.name)
    for dataset, files in legacy.files.items():
        for n, d in files:
            fresh.put(f"automations/{dataset}/changes/{n}", d)
    fresh_env = env_for(db_url, s3={"endpoint_url": s3_endpoint, "bucket": fresh.name, "region": "us-east-1"})
    assert run_cli("drain", env=fresh_env).returncode == 0
    for table in ("inc", "crq"):
        ours = {r["ticket_id"]: r["raw"] for r in legacy.fetch(f"SELECT ticket_id, raw FROM tickets.{table}")}
        in_order = {
            r["ticket_id"]: r["raw"]
            for r in asyncio.run(_fetch(db_url, f"SELECT ticket_id, raw FROM tickets.{table}"))
        }
        assert ours == in_order, table


def test_verified_points_win_after_a_drain_and_no_request_is_spent_on_an_adopted_place(
    legacy: Legacy, bucket: Bucket, env_for: Callable[..., dict[str, str]]
) -> None:
    fake = fg.FakeGeocoder(default_point=True).start()
    try:
        env = env_for(
            legacy.url,
            geocoder={
                "enabled": True,
                "provider": "locationiq",
                "base_url": fake.url,
                "rate_per_second": 50.0,
            },
        )
        env["GEOCODER_API_KEY"] = fg.KEY
        assert run_cli("migrate", "--adopt", env=env).returncode == 0
        # A delta that moves a ticket onto a verified place, and one ticket at a new place.
        (cluster, location), point = sorted(legacy.verified_locations.items())[0]
        code = cluster.upper().replace(" ", "_")
        bucket.put(
            f"{INC}changes/2026-06-23T08-00-00.csv",
            csv_file(
                row(
                    "INC-MOVED", cluster=cluster, region="Nairobi", location_name=f"NW_{code}_{location} FDT3"
                ),
                row(
                    "INC-NEW-PLACE",
                    cluster=cluster,
                    region="Nairobi",
                    location_name=f"NW_{code}_Brand New Rd FDT1",
                ),
            ),
        )
        assert run_cli("drain", env=env).returncode == 0
        moved = legacy.fetch(
            "SELECT geo_source, ST_Y(geom) AS lat, ST_X(geom) AS lon FROM tickets.inc "
            "WHERE ticket_id = 'INC-MOVED'"
        )[0]
        assert moved["geo_source"] == "location" and (round(moved["lat"], 6), round(moved["lon"], 6)) == point
        res = run_cli("geocode", "--json", env=env)
        assert res.returncode == 0, res.stderr
        asked = {r.q for r in fake.requests}
        assert not asked & legacy.places  # nothing the loader had geocoded was asked again
        assert any("Brand New Rd" in q for q in asked)
        # ... and the tickets of adopted places all stand on adopted points.
        assert (
            legacy.value(
                "SELECT count(*) FROM tickets.inc t WHERE t.geom IS NULL AND t.is_actionable "
                "AND t.normalized_status = 'open'"
            )
            == 0
        )
    finally:
        fake.stop()


# --- refusals: a layout that differs where it matters ---------------------------------------

DIFFERENCES = {
    "no_raw": (
        "ALTER TABLE tickets.inc RENAME COLUMN raw TO payload",
        "tickets.inc: no column raw",
    ),
    "raw_json": (
        "DROP TABLE tickets.crq; CREATE TABLE tickets.crq (ticket_id text PRIMARY KEY, raw json NOT NULL)",
        "tickets.crq.raw: type json, expected jsonb",
    ),
    "no_watermark": (
        "UPDATE tickets.import_meta SET metadata = metadata - 'source_max_key' WHERE dataset = 'inc'",
        "tickets.inc: 460 row(s) but tickets.import_meta has no source_max_key for dataset 'inc'",
    ),
    "dashboard_signature": (
        "DROP FUNCTION reporting.fn_inc_dashboard; CREATE FUNCTION reporting.fn_inc_dashboard"
        "(p_cluster text, p_window interval) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$",
        "reporting.fn_inc_dashboard(p_cluster text, p_window interval): the project's function takes",
    ),
    "outside_view": (
        "CREATE VIEW public.ops_open AS SELECT ticket_id FROM tickets.inc",
        "view public.ops_open reads tickets.inc",
    ),
    "gazetteer_without_point": (
        "ALTER TABLE tickets.geo_clusters DROP COLUMN geom",
        "tickets.geo_clusters: no point",
    ),
    "name_collision": (
        "CREATE TABLE tickets.ingest_files (id int)",
        "tickets.ingest_files: not part of the loader's layout in LEGACY.md, and fleetticketsd creates",
    ),
}


@pytest.mark.parametrize("case", sorted(DIFFERENCES))
def test_a_layout_that_differs_essentially_is_refused_naming_it(
    case: str, legacy: Legacy, env_for: Callable[..., dict[str, str]]
) -> None:
    change, expected = DIFFERENCES[case]
    legacy.execute(change)
    before, shape = contents(legacy), layout_of(legacy)
    for args in (("migrate", "--adopt", "--dry-run"), ("migrate", "--adopt")):
        res = run_cli(*args, env=env_for(legacy.url))
        assert res.returncode == 2, (case, res.stdout, res.stderr)
        assert "cannot adopt this database, nothing was changed" in res.stderr
        assert expected.replace("460", str(len(before["inc"]))) in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    assert contents(legacy) == before and layout_of(legacy) == shape


def test_missing_migrations_and_extra_columns_are_carried_not_refused(
    empty_db_url: str, bucket: Bucket, env_for: Callable[..., dict[str, str]]
) -> None:
    # A live database that never ran 07 (service_type still there) and that grew columns.
    legacy = asyncio.run(build_legacy(empty_db_url, bucket, skip=frozenset({"07_inc_drop_service_type.sql"})))
    legacy.execute(
        "ALTER TABLE tickets.inc ADD COLUMN dispatch_note text, "
        "ADD COLUMN priority int NOT NULL DEFAULT 3, "
        "ADD COLUMN region_upper text GENERATED ALWAYS AS (upper(raw->>'region')) STORED; "
        "UPDATE tickets.inc SET dispatch_note = 'call first' WHERE ticket_id IN "
        "(SELECT ticket_id FROM tickets.inc ORDER BY 1 LIMIT 5); "
        "ALTER TABLE tickets.geo_locations ADD COLUMN reviewer text; "
        "UPDATE tickets.geo_locations SET reviewer = 'ops' WHERE verified"
    )
    env = env_for(legacy.url)
    res = run_cli("migrate", "--adopt", env=env)
    assert res.returncode == 0, res.stderr
    assert "carried: dispatch_note text" in res.stdout and "carried: priority integer" in res.stdout
    assert "carried: region_upper text, generated as before" in res.stdout
    assert "carried: reviewer text" in res.stdout
    notes = legacy.fetch(
        "SELECT ticket_id, dispatch_note, priority, region_upper, raw->>'region' AS r FROM tickets.inc"
    )
    assert sum(1 for r in notes if r["dispatch_note"] == "call first") == 5
    assert {r["priority"] for r in notes} == {3}
    assert all(r["region_upper"] == r["r"].upper() for r in notes)
    assert legacy.value("SELECT count(*) FROM tickets.geo_locations WHERE reviewer = 'ops'") == len(
        legacy.verified_locations
    )
    # service_type is raw's business: it stays in the loader's copy only.
    assert legacy.value("SELECT to_regclass('tickets.inc') IS NOT NULL") is True
    assert (
        legacy.value(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'tickets' "
            "AND table_name = 'inc' AND column_name = 'service_type'"
        )
        == 0
    )
    # New rows get the carried default; the drain does not trip over the new columns.
    assert run_cli("drain", env=env).returncode == 0
    assert legacy.value("SELECT count(*) FROM tickets.inc WHERE priority IS NULL") == 0


DASHBOARD = "reporting.fn_inc_dashboard(text, text, text, timestamptz, timestamptz)"


def test_grants_of_the_replaced_objects_are_carried(
    legacy: Legacy, env_for: Callable[..., dict[str, str]]
) -> None:
    role = f"dash_{uuid.uuid4().hex[:8]}"
    admin_sql(f"CREATE ROLE {role} LOGIN")
    try:
        legacy.execute(
            f"GRANT USAGE ON SCHEMA tickets, reporting TO {role}; GRANT SELECT ON tickets.inc TO {role}; "
            f"REVOKE EXECUTE ON FUNCTION {DASHBOARD} FROM PUBLIC; "
            f"GRANT EXECUTE ON FUNCTION {DASHBOARD} TO {role}"
        )
        res = run_cli("migrate", "--adopt", env=env_for(legacy.url))
        assert res.returncode == 0, res.stderr
        assert f"SELECT on tickets.inc to {role}" in res.stdout
        as_dashboard = legacy.url.replace("postgres@", f"{role}@")
        got = asyncio.run(_fetch(as_dashboard, "SELECT count(*) FROM tickets.inc"))
        assert got[0][0] == legacy.value("SELECT count(*) FROM tickets.inc")
        assert legacy.value(
            "SELECT has_function_privilege($1, 'reporting.fn_inc_dashboard(text, text, text, timestamptz, "
            "timestamptz)', 'EXECUTE')",
            role,
        )
    finally:
        admin_sql(f"DROP DATABASE IF EXISTS {legacy.url.rsplit('/', 1)[1]} WITH (FORCE)")
        admin_sql(f"DROP ROLE IF EXISTS {role}")


def test_the_stored_rollback_puts_the_loader_layout_back(
    legacy: Legacy, env_for: Callable[..., dict[str, str]]
) -> None:
    before, shape = contents(legacy), layout_of(legacy)
    env = env_for(legacy.url)
    assert run_cli("migrate", "--adopt", env=env).returncode == 0
    assert run_cli("drain", env=env).returncode == 0
    rollback = legacy.value("SELECT rollback_sql FROM tickets.adoption")
    legacy.execute(rollback)
    assert contents(legacy) == before
    # The loader's objects are where they were; fleetticketsd's are kept aside.
    assert [r for r in layout_of(legacy) if not r.startswith("tickets_legacy")] == shape
    res = run_cli("migrate", env=env)
    assert res.returncode == 2 and "migrate --adopt" in res.stderr


# --- crash safety ----------------------------------------------------------------------------------


def test_kill_9_in_the_middle_of_adoption_leaves_the_database_unchanged(
    legacy: Legacy, env_for: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    env = env_for(legacy.url)
    before, shape = contents(legacy), layout_of(legacy)

    async def hold_a_table() -> None:
        # The takeover moves the loader's tables one by one; holding the last of them
        # stops it there, half-way through its transaction, until the kill.
        conn = await asyncpg.connect(legacy.url)
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE tickets.inc_daily_snapshot IN ACCESS SHARE MODE")
                proc = subprocess.Popen(  # noqa: ASYNC220 - started, not waited for, here
                    [sys.executable, "-m", "fleetticketsd", "migrate", "--adopt"],
                    env=env,
                    cwd=REPO,
                    stdout=subprocess.DEVNULL,
                    stderr=(tmp_path / "adopt.log").open("w"),
                )
                try:
                    waiting = (
                        "SELECT count(*) FROM pg_locks WHERE NOT granted "
                        "AND relation = 'tickets.inc_daily_snapshot'::regclass"
                    )
                    deadline = asyncio.get_running_loop().time() + 60
                    while not await conn.fetchval(waiting):
                        assert asyncio.get_running_loop().time() < deadline, "adoption never reached the lock"
                        await asyncio.sleep(0.05)
                    moved = await conn.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'fleetticketsd' "
                        "AND wait_event_type = 'Lock' AND datname = current_database()"
                    )
                    assert moved == 1
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
                finally:
                    if proc.poll() is None:
                        proc.kill()
        finally:
            await conn.close()

    asyncio.run(hold_a_table())
    # The server rolls the dead session's transaction back once it notices.
    poll(
        lambda: (
            legacy.value(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'fleetticketsd' "
                "AND datname = current_database()"
            )
            == 0
        ),
        what="the killed adoption's backend to go",
    )
    assert contents(legacy) == before and layout_of(legacy) == shape
    res = run_cli("migrate", "--adopt", env=env)
    assert res.returncode == 0, res.stderr
    assert contents(legacy, "tickets_legacy") == before


# --- the daemon, and the loader left running ------------------------------------------------


def test_the_daemon_on_the_legacy_database_is_live_not_ready_and_touches_nothing(
    legacy: Legacy,
    start_daemon: Callable[..., tuple[Any, dict[str, Any]]],
) -> None:
    before, shape = contents(legacy), layout_of(legacy)
    d, _ = start_daemon(database={"url": legacy.url})
    # /healthz answers before the pool is up: on a loaded machine /readyz first says
    # "database not connected"; wait for the verdict on the layout.
    status, body = poll(
        lambda: (r := d.get("/readyz")) and "not connected" not in r[1] and r,
        what="readyz's verdict on the layout",
    )
    assert status == 503, body
    why = json.loads(body)["checks"]["migrations"]
    assert "legacy loader's database" in why and "migrate --adopt" in why
    poll(lambda: d.logged("dataset not drained: configuration error"), what="the refused pass")
    assert d.get("/healthz")[0] == 200
    assert not [e for e in d.logs() if "Traceback" in str(e)]
    assert contents(legacy) == before and layout_of(legacy) == shape


def test_a_loader_left_running_after_the_cutover_is_stopped_by_the_schema_and_warned_about(
    legacy: Legacy,
    bucket: Bucket,
    env_for: Callable[..., dict[str, str]],
    start_daemon: Callable[..., tuple[Any, dict[str, Any]]],
) -> None:
    env = env_for(legacy.url)
    assert run_cli("migrate", "--adopt", env=env).returncode == 0
    st = run_cli("status", env=env)
    assert st.returncode == 0 and "other writers" not in st.stdout and "WARNING" not in st.stderr

    async def loader_runs() -> None:
        conn = await asyncpg.connect(legacy.url)  # the loader's own connection
        try:
            # Its upsert names no source_key, which the takeover made NOT NULL: a delta
            # with rows fails whole, and writes nothing.
            name, data = legacy.files["inc"][LOADER_APPLIED["inc"]]
            with pytest.raises(asyncpg.NotNullViolationError):
                await loader.apply_file(conn, "inc", f"{INC}changes/{name}", "etag", data)
            # A header-only delta has nothing to upsert: only its watermark write lands.
            await loader.apply_file(
                conn, "inc", f"{INC}changes/2026-06-23T06-00-00.csv", "etag", csv_file().encode()
            )
        finally:
            await conn.close()

    asyncio.run(loader_runs())
    st = run_cli("status", env=env)
    assert st.returncode == 0, st.stderr
    assert "WARNING: another program writes the tables fleetticketsd took over" in st.stderr
    # (An upsert counts twice: statement triggers fire for its INSERT and its UPDATE.)
    assert re.search(
        r"tickets\.import_meta written \d time\(s\) by \(no application_name\) as role postgres", st.stdout
    )
    d, _ = start_daemon(database={"url": legacy.url})
    poll(
        lambda: [e for e in d.logs() if str(e.get("event", "")).startswith("another program writes")],
        what="warning",
    )
    assert (d.metric("fleettickets_foreign_writes") or 0) >= 1


def test_the_runtime_and_reader_roles_work_after_adoption(
    legacy: Legacy, env_for: Callable[..., dict[str, str]]
) -> None:
    from fleetticketsd.database import roles

    from .test_roles import login_role, refused

    res = run_cli("migrate", "--adopt", env=env_for(legacy.url))
    assert res.returncode == 0, res.stderr
    with login_role(roles.RUNTIME) as runtime:
        drain = run_cli("drain", env=env_for(legacy.url.replace("postgres@", f"{runtime}@")))
        assert drain.returncode == 0, drain.stderr
        assert "permission denied" not in drain.stderr
    with login_role(roles.READER) as reader:
        as_reader = legacy.url.replace("postgres@", f"{reader}@")
        assert asyncio.run(_fetch(as_reader, "SELECT reporting.fn_tickets_for_map() IS NOT NULL"))[0][0]
        got = asyncio.run(_fetch(as_reader, "SELECT count(*) FROM tickets.inc"))
        assert got[0][0] == legacy.value("SELECT count(*) FROM tickets.inc")
        assert refused(as_reader, "SELECT * FROM tickets.ingest_files")
        assert refused(as_reader, "SELECT * FROM tickets_legacy.inc")

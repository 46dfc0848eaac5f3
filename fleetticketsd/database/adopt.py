"""`migrate --adopt`: take over the legacy loader's database (LEGACY.md).

The users arrive with a live database: ~21k tickets, their closure history, and a
gazetteer whose points people checked by hand. The takeover keeps every bit of it and
drops nothing:

1. **Check first.** Every expectation of LEGACY.md this code relies on (tables, the
   columns it reads, their types) is checked against the catalog, and all differences
   are reported together, before anything changes. Only what the takeover needs is
   required: the typed columns the loader derived from ``raw`` are rebuilt from ``raw``.
2. **One transaction.** PostgreSQL DDL is transactional, so the loader's objects move to
   schema ``tickets_legacy``, the project's migrations build its own layout beside
   them, and the data is copied across, all in one transaction. A crash or ``kill -9``
   at any point leaves the database as it was; ``--dry-run`` is the same run, rolled
   back, so the plan it prints is exactly what a real run does.
3. **Copy, do not convert.** The project's tables are created by its own migrations, so
   afterwards ``migrate`` is a no-op and no column differs silently from a fresh
   install. The loader's tables stay whole in ``tickets_legacy`` (an operator can still
   read them, and the stored rollback moves them back).

What is carried over and how:
- tickets: every row, ``raw`` as it is, ``source_key`` = the dataset's legacy watermark
  key (so a late file older than it cannot overwrite an adopted row); columns someone
  added to the loader's tables are carried along; geometry is resolved afterwards by
  the project's own resolution, from the adopted gazetteer;
- the watermark (``import_meta.metadata``, whole);
- the gazetteer: verified points stay verified (they win over any provider answer and
  over centroids); unverified answers become cached answers, re-judged by the project's
  25 km guard; locations are keyed by the project's own cleaning of their name, so the
  tickets find them and no request is spent on a place the loader already geocoded;
- closure events and daily snapshots, as recorded;
- grants on the replaced tables and functions, so the dashboards keep their access.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from fleetticketsd.config import GeocoderConfig
from fleetticketsd.database import db, layout
from fleetticketsd.ingest.feed import key_timestamp

LEGACY_SCHEMA = "tickets_legacy"
# Relations of the loader's schema that LEGACY.md does not describe (another
# application's, most likely) wait here while the migrations run, then go back: a
# name the project also creates is a collision, found exactly, and refused.
HOLD_SCHEMA = "fleetticketsd_adopt_hold"
# Where the stored rollback puts the project's objects (kept, for inspection).
ROLLED_BACK = "fleetticketsd_rolled_back"

# The loader's tables (LEGACY.md). Only inc is required; the rest may be missing from a
# live database that skipped a migration, and then there is nothing to carry.
TICKET_TABLES = ("inc", "crq")
LEGACY_TABLES = (
    "schema_migrations",
    "import_meta",
    "geo_clusters",
    "geo_locations",
    *TICKET_TABLES,
    "closure_events",
    "inc_daily_snapshot",
)

# Columns of the loader's tables that the project replaces rather than copies: the
# typed columns derived from raw (rebuilt by the project's generated columns), the
# geometry (re-resolved), the constants its migrations 06/07 dropped (a database that
# missed those still has them), and what the mappings below read. Anything else is a
# column someone added to the live database: carried along into the new table.
KNOWN_COLUMNS: dict[str, frozenset[str]] = {
    "ticket": frozenset(
        {
            "ticket_id", "raw", "normalized_status", "raw_status", "bucket", "is_actionable",
            "cluster", "region", "location_name", "assigned_team", "owner", "sla_status",
            "mttr", "created_at_service", "scheduled_at", "closed_at", "first_seen_at",
            "last_seen_at", "source_created_at", "source_updated_at", "latitude", "longitude",
            "geom", "geog", "geo_source", "ingested_at", "updated_at", "is_alarm",
            "is_auto_created", "is_auto_closed", "service_type",
        }
    ),
    "import_meta": frozenset({"dataset", "metadata", "updated_at"}),
    "geo_clusters": frozenset(
        {"id", "cluster", "geom", "latitude", "longitude", "lat", "lon", "lng", "verified",
         "provider", "source", "display_name", "query", "updated_at", "geocoded_at", "created_at"}
    ),
    "geo_locations": frozenset(
        {"id", "cluster", "location", "location_key", "geom", "latitude", "longitude", "lat",
         "lon", "lng", "verified", "provider", "source", "display_name", "query", "distance_km",
         "updated_at", "geocoded_at", "created_at"}
    ),
    "closure_events": frozenset(
        {"id", "ticket_id", "closed_at", "observed_at", "source_key", "sla_clock_start",
         "mttr_minutes", "mttr", "sla_status", "feed_sla_status", "owner", "assigned_team",
         "cluster"}
    ),
    "inc_daily_snapshot": frozenset(
        {"day", "open_backlog", "opened", "closed", "breached", "at_risk", "captured_at", "updated_at"}
    ),
}  # fmt: skip

TEXT = frozenset({"text", "varchar", "bpchar"})
NUMBER = frozenset({"int2", "int4", "int8", "numeric", "float4", "float8"})
TIMESTAMPTZ = frozenset({"timestamptz"})
# The dashboards call these; the project's must take the same argument types.
DASHBOARD_SIGNATURES = {
    "fn_tickets_for_map": "",
    "fn_inc_dashboard": "text, text, text, timestamp with time zone, timestamp with time zone",
}

DASHBOARD_ARGUMENTS = {
    "fn_tickets_for_map": "",
    "fn_inc_dashboard": (
        "p_cluster text, p_status text, p_window text, p_from timestamp with time zone, "
        "p_to timestamp with time zone"
    ),
}

# --- catalog queries -------------------------------------------------------------------

# Names reaching these are quoted identifiers and signatures from the catalog.
MOVE_RELATION = "ALTER {kind} {relation} SET SCHEMA {schema}"
MOVE_FUNCTION = "ALTER {kind} {function} SET SCHEMA {schema}"

COLUMNS = """
SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS type,
       t.typname::text AS base, a.attnotnull AS not_null, a.attgenerated::text AS generated,
       pg_get_expr(d.adbin, d.adrelid) AS expr
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
# Relations and functions that belong to an extension (PostGIS's, say) never move, nor
# do those that move with their owner (a column's sequence). A partitioned table's
# dependency on its own partition key, and a partition's on its parent, do not count:
# each partition is a table of its own and moves on its own (0009's ticket_features).
RELATIONS_IN = """
SELECT c.oid, n.nspname::text AS schema, c.relname::text AS name, c.relkind::text AS kind,
       format('%I.%I', n.nspname, c.relname) AS qualified
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY($1::text[]) AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                    AND d.deptype IN ('e', 'a', 'i')
                    AND NOT (d.refclassid = 'pg_class'::regclass AND d.refobjid = c.oid)
                    AND NOT (c.relispartition AND d.deptype = 'a' AND d.refclassid = 'pg_class'::regclass))
ORDER BY n.nspname, c.relname
"""
FUNCTIONS_IN = """
SELECT p.oid, n.nspname::text AS schema, p.proname::text AS name, p.prokind::text AS kind,
       pg_get_function_identity_arguments(p.oid) AS args,
       format('%I.%I(%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid)) AS signature,
       pg_get_function_result(p.oid) AS result
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = ANY($1::text[])
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
ORDER BY n.nspname, p.proname, args
"""
# Views (anywhere) reading the given relations: they would go on reading the loader's
# copy after the move, silently frozen.
DEPENDENT_VIEWS = """
SELECT DISTINCT v.oid, format('%I.%I', vn.nspname, v.relname) AS view, vn.nspname::text AS schema,
       d.refobjid::regclass::text AS reads
FROM pg_depend d
JOIN pg_rewrite r ON r.oid = d.objid
JOIN pg_class v ON v.oid = r.ev_class
JOIN pg_namespace vn ON vn.oid = v.relnamespace
WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
  AND d.refobjid = ANY($1::oid[]) AND v.oid <> d.refobjid
ORDER BY 1
"""
FOREIGN_KEYS_INTO = """
SELECT format('%s on %s', c.conname, c.conrelid::regclass) AS constraint_name,
       c.confrelid::regclass::text AS refers_to
FROM pg_constraint c
WHERE c.contype = 'f' AND c.confrelid = ANY($1::oid[]) AND NOT c.conrelid = ANY($1::oid[])
"""
GRANTS_ON_RELATION = """
SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END AS grantee,
       a.privilege_type AS privilege
FROM pg_class c, aclexplode(c.relacl) a
LEFT JOIN pg_roles r ON r.oid = a.grantee
WHERE c.oid = $1 AND a.grantee <> c.relowner
ORDER BY 1, 2
"""
GRANTS_ON_FUNCTION = """
SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END AS grantee,
       a.privilege_type AS privilege
FROM pg_proc p, aclexplode(p.proacl) a
LEFT JOIN pg_roles r ON r.oid = a.grantee
WHERE p.oid = $1 AND a.grantee <> p.proowner
ORDER BY 1, 2
"""
TRIGGERS_ON = """
SELECT format('%s on %s', t.tgname, t.tgrelid::regclass) AS trigger_name
FROM pg_trigger t WHERE t.tgrelid = ANY($1::oid[]) AND NOT t.tgisinternal ORDER BY 1
"""
SCHEMA_OBJECTS = """
SELECT (SELECT count(*) FROM pg_class c WHERE c.relnamespace = n.oid)
     + (SELECT count(*) FROM pg_proc p WHERE p.pronamespace = n.oid)
FROM pg_namespace n WHERE n.nspname = $1
"""
ROWS = "SELECT count(*) FROM {table}"
LEGACY_LEDGER = "SELECT * FROM tickets.schema_migrations"
ADOPTION = "SELECT adopted_at, report FROM tickets.adoption"
RECORD_ADOPTION = """
INSERT INTO tickets.adoption (legacy_migrations, watermarks, report, rollback_sql)
VALUES ($1::text[], $2::jsonb, $3::jsonb, $4)
"""
WATCH_WRITES = """
CREATE TRIGGER fleet_foreign_write AFTER INSERT OR UPDATE OR DELETE ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION tickets.note_foreign_write()
"""
FOREIGN_WRITES = """
SELECT w.relation, w.application_name, w.role, w.statements, w.first_at, w.last_at
FROM tickets.foreign_writes w
WHERE EXISTS (SELECT 1 FROM tickets.adoption)
ORDER BY w.last_at DESC
"""
RESOLVE_ALL = (
    "SELECT coalesce(sum(tickets.resolve_geo(t, NULL, NULL, NULL)), 0) FROM tickets.ticket_tables() t"
)
GEO_SOURCES = "SELECT geo_source, count(*) AS n FROM {table} GROUP BY 1 ORDER BY 1 NULLS LAST"
WATERMARKS = """
SELECT l.dataset::text AS dataset, l.metadata->>'source_max_key' AS watermark
FROM tickets.import_meta AS l
"""

# --- the result ------------------------------------------------------------------------


class AdoptionRefused(Exception):
    """The database cannot be taken over as it is; nothing was changed."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class ObjectReport:
    name: str
    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line)


@dataclass
class AdoptionReport:
    dry_run: bool
    already: datetime | None = None
    objects: list[ObjectReport] = field(default_factory=list)
    migrations: list[str] = field(default_factory=list)
    legacy_kept: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def object(self, name: str) -> ObjectReport:
        obj = ObjectReport(name)
        self.objects.append(obj)
        return obj

    def as_json(self) -> dict[str, Any]:
        return {
            "objects": {o.name: o.lines for o in self.objects},
            "migrations": self.migrations,
            "legacy_kept": self.legacy_kept,
            "notes": self.notes,
        }

    def render(self) -> str:
        if self.already is not None:
            return f"already adopted on {self.already.isoformat()}; nothing to do"
        head = "adoption plan (dry run: nothing was changed)" if self.dry_run else "adopted"
        out = [head]
        for o in self.objects:
            out.append(f"  {o.name}")
            out.extend(f"      {line}" for line in o.lines)
        out.append(f"  kept in {LEGACY_SCHEMA} (never dropped):")
        out.extend(f"      {name}" for name in self.legacy_kept)
        out.append(f"  migrations applied: {', '.join(self.migrations) or 'none'}")
        out.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(out)


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # as format_type prints it, e.g. geometry(Point,4326)
    base: str  # pg_type.typname, e.g. geometry
    not_null: bool
    generated: bool
    expr: str | None  # default or generation expression


@dataclass(frozen=True)
class ForeignWrite:
    relation: str
    application_name: str
    role: str
    statements: int
    last_at: datetime

    def describe(self) -> str:
        app = self.application_name or "(no application_name)"
        return (
            f"{self.relation} written {self.statements} time(s) by {app} as role {self.role}, "
            f"last at {self.last_at.isoformat(timespec='seconds')}"
        )


# --- entry points ----------------------------------------------------------------------


async def adopt(conn: asyncpg.Connection, geocoder: GeocoderConfig, *, dry_run: bool) -> AdoptionReport:
    """Take the loader's database over, or (dry run) do it all and roll back.

    Raises AdoptionRefused naming every difference, having changed nothing."""
    await conn.execute("SELECT pg_advisory_lock($1, $2)", db.LOCK_NAMESPACE, db.MIGRATION_LOCK_ITEM)
    try:
        found = await layout.inspect(conn)
        if found.kind is layout.Kind.PROJECT:
            row = await conn.fetchrow(ADOPTION) if await _has_adoption_table(conn) else None
            if row is not None:
                return AdoptionReport(dry_run, already=row["adopted_at"])
            raise AdoptionRefused(["nothing to adopt: the database already has fleetticketsd's layout"])
        if found.kind is layout.Kind.EMPTY:
            raise AdoptionRefused(["nothing to adopt: the database is empty; run `fleetticketsd migrate`"])
        if found.kind is layout.Kind.FOREIGN:
            raise AdoptionRefused([f"the database holds {found.found}, not the legacy loader's layout"])
        tx = conn.transaction()
        await tx.start()
        try:
            report = await _Takeover(conn, geocoder, dry_run).run()
        except BaseException:
            await tx.rollback()
            raise
        if dry_run:
            await tx.rollback()
        else:
            await tx.commit()
        return report
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1, $2)", db.LOCK_NAMESPACE, db.MIGRATION_LOCK_ITEM)


async def foreign_writes(conn: asyncpg.Connection) -> list[ForeignWrite]:
    """Writes by other programs to the loader's old tables since the adoption (none
    before one): the legacy loader still running, most likely."""
    if not await _has_adoption_table(conn):
        return []
    return [
        ForeignWrite(r["relation"], r["application_name"], r["role"], r["statements"], r["last_at"])
        for r in await conn.fetch(FOREIGN_WRITES)
    ]


def foreign_write_warning(writes: list[ForeignWrite]) -> str:
    return (
        "another program writes the tables fleetticketsd took over from the legacy loader ("
        + "; ".join(w.describe() for w in writes[:3])
        + "): if the loader's scheduled tasks still run, stop them (docs/operations.md, cutover); "
        "once you know the writer, DELETE FROM tickets.foreign_writes"
    )


async def _has_adoption_table(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass('tickets.adoption') IS NOT NULL"))


# --- the takeover ----------------------------------------------------------------------


class _Takeover:
    """One adoption, inside the caller's transaction: check, move, migrate, copy."""

    def __init__(self, conn: asyncpg.Connection, geocoder: GeocoderConfig, dry_run: bool) -> None:
        self.conn = conn
        self.geocoder = geocoder
        self.report = AdoptionReport(dry_run)
        self.problems: list[str] = []
        self.columns: dict[str, list[Column]] = {}  # legacy table -> its columns
        self.watermarks: dict[str, str] = {}
        self.rollback: list[str] = []  # statements that move the loader's objects back
        self.held: list[asyncpg.Record] = []  # relations that are not the loader's (_move_aside)

    async def run(self) -> AdoptionReport:
        await self._check()
        if self.problems:
            raise AdoptionRefused(self.problems)
        legacy_migrations = await self._legacy_migrations()
        await self._move_aside()
        self.report.migrations = await db.apply_migrations(self.conn, db.load_migrations())
        await self._return_held()
        if self.problems:
            raise AdoptionRefused(self.problems)
        await self._copy_import_meta()
        await self._copy_clusters()
        await self._copy_locations()
        for table in TICKET_TABLES:
            if table in self.columns:
                await self._copy_tickets(table)
        await self._copy_closures()
        await self._copy_snapshots()
        await self._carry_grants()
        await self._resolve_geometry()
        for table in ("import_meta", *TICKET_TABLES):
            await self.conn.execute(WATCH_WRITES.format(table=f"tickets.{table}"))
        await self.conn.execute(
            RECORD_ADOPTION,
            legacy_migrations,
            json.dumps(self.watermarks),
            json.dumps(self.report.as_json()),
            await self._rollback_sql(),
        )
        return self.report

    # --- 1. expectations ------------------------------------------------------------------

    async def _check(self) -> None:
        for table in LEGACY_TABLES:
            cols = [Column(**dict(r)) for r in await self.conn.fetch(COLUMNS, f"tickets.{table}")]
            if cols:
                self.columns[table] = cols
        if "inc" not in self.columns:
            self.problems.append("tickets.inc: missing (LEGACY.md: the INC tickets table)")
        for table in TICKET_TABLES:
            if table in self.columns:
                self._need(table, "ticket_id", TEXT, "the ticket key")
                self._need(
                    table, "raw", frozenset({"jsonb"}), "the cleaned record every column is rebuilt from"
                )
        if "import_meta" in self.columns:
            self._need("import_meta", "dataset", TEXT, "one row per dataset")
            self._need("import_meta", "metadata", frozenset({"jsonb"}), "holds the watermark")
        for table in ("geo_clusters", "geo_locations"):
            if table in self.columns:
                self._need(table, "cluster", TEXT, "the gazetteer key")
                self._need(table, "verified", frozenset({"bool"}), "marks points a person checked")
                if self._point(table) is None:
                    self.problems.append(
                        f"tickets.{table}: no point (LEGACY.md: one coordinate per row): expected a "
                        "geometry column geom, or latitude/longitude (lat/lon) numbers"
                    )
        if (
            "geo_locations" in self.columns
            and self._pick("geo_locations", ("location", "location_key")) is None
        ):
            self.problems.append("tickets.geo_locations: no column location (the cleaned location name)")
        if "closure_events" in self.columns:
            self._need("closure_events", "ticket_id", TEXT, "the closed ticket")
            self._need("closure_events", "closed_at", TIMESTAMPTZ, "when it closed")
        if "inc_daily_snapshot" in self.columns:
            self._need("inc_daily_snapshot", "day", frozenset({"date"}), "the EAT day")
        if self.problems:
            return  # the checks below read the columns checked above
        await self._check_points()
        await self._check_watermarks()
        await self._check_keys()
        await self._check_functions()
        await self._check_dependents()
        if await self.conn.fetchval(SCHEMA_OBJECTS, LEGACY_SCHEMA):
            self.problems.append(
                f"schema {LEGACY_SCHEMA} already holds objects (an earlier adoption rolled back by hand?): "
                "move them elsewhere first"
            )

    def _col(self, table: str, name: str) -> Column | None:
        return next((c for c in self.columns.get(table, []) if c.name == name), None)

    def _pick(self, table: str, names: tuple[str, ...], types: frozenset[str] | None = None) -> Column | None:
        for name in names:
            col = self._col(table, name)
            if col is not None and (types is None or col.base in types):
                return col
        return None

    def _need(self, table: str, name: str, types: frozenset[str], why: str) -> None:
        col = self._col(table, name)
        if col is None:
            self.problems.append(f"tickets.{table}: no column {name} ({why})")
        elif col.base not in types:
            self.problems.append(
                f"tickets.{table}.{name}: type {col.type}, expected {' or '.join(sorted(types))} ({why})"
            )

    def _point(self, table: str) -> str | None:
        """The SQL for a row's point in SRID 4326 (alias l), or None if it has none."""
        geom = self._col(table, "geom")
        if geom is not None and geom.base == "geometry":
            return "l.geom"
        lat = self._pick(table, ("latitude", "lat"), NUMBER)
        lon = self._pick(table, ("longitude", "lon", "lng"), NUMBER)
        if lat is None or lon is None:
            return None
        la, lo = f"l.{db.quote_ident(lat.name)}", f"l.{db.quote_ident(lon.name)}"
        return (
            f"CASE WHEN {la} BETWEEN -90 AND 90 AND {lo} BETWEEN -180 AND 180 "
            f"THEN ST_SetSRID(ST_MakePoint({lo}::float8, {la}::float8), 4326) END"
        )

    def _point_source(self, table: str) -> str:
        point = self._point(table) or ""
        return ", ".join(sorted({m.strip('"') for m in _LEGACY_REF.findall(point)}))

    async def _check_points(self) -> None:
        for table in ("geo_clusters", "geo_locations"):
            col = self._col(table, "geom")
            if col is None or col.base != "geometry" or col.type == "geometry(Point,4326)":
                continue
            bad = await self.conn.fetchval(
                f"SELECT count(*) FROM tickets.{table} "
                "WHERE geom IS NOT NULL AND (GeometryType(geom) <> 'POINT' OR ST_SRID(geom) <> 4326)"
            )
            if bad:
                self.problems.append(
                    f"tickets.{table}.geom: {bad} value(s) that are not points in SRID 4326 (type {col.type})"
                )

    async def _check_watermarks(self) -> None:
        if "import_meta" in self.columns:
            for r in await self.conn.fetch(WATERMARKS):
                if r["watermark"]:
                    self.watermarks[r["dataset"]] = r["watermark"]
        for table in TICKET_TABLES:
            if table not in self.columns:
                continue
            rows = await self.conn.fetchval(ROWS.format(table=f"tickets.{table}"))
            key = self.watermarks.get(table)
            if rows and key is None:
                self.problems.append(
                    f"tickets.{table}: {rows} row(s) but tickets.import_meta has no source_max_key for "
                    f"dataset {table!r}: the stale-write guard needs the key that wrote them"
                )
            elif key is not None and key_timestamp(key) is None:
                self.problems.append(
                    f"tickets.import_meta: watermark {key!r} of {table!r} is not a change-file name "
                    "(YYYY-MM-DDTHH-mm-ss.csv)"
                )

    async def _check_keys(self) -> None:
        for table in TICKET_TABLES:
            if table not in self.columns:
                continue
            bad = await self.conn.fetchrow(
                f"SELECT count(*) FILTER (WHERE ticket_id IS NULL OR raw IS NULL) AS nulls, "
                f"count(*) - count(DISTINCT ticket_id) AS dupes FROM tickets.{table}"
            )
            assert bad is not None
            if bad["nulls"] or bad["dupes"]:
                self.problems.append(
                    f"tickets.{table}: {bad['nulls']} row(s) without ticket_id or raw, "
                    f"{bad['dupes']} duplicate ticket_id(s)"
                )

    async def _check_functions(self) -> None:
        for f in await self.conn.fetch(FUNCTIONS_IN, ["reporting"]):
            want = DASHBOARD_SIGNATURES.get(f["name"])
            if want is None:
                continue
            if _arg_types(f["args"]) != want:
                self.problems.append(
                    f"reporting.{f['name']}({f['args']}): the project's function takes ({want}); "
                    "the dashboards' calls would no longer match"
                )
            elif f["args"] != DASHBOARD_ARGUMENTS[f["name"]]:
                self.report.notes.append(
                    f"reporting.{f['name']} took arguments ({f['args']}); the project's are named "
                    f"({DASHBOARD_ARGUMENTS[f['name']]}): calls by position are unchanged, "
                    "calls by name must change"
                )

    async def _check_dependents(self) -> None:
        moved = await self._legacy_relations()
        oids = [r["oid"] for r in moved]
        for r in await self.conn.fetch(DEPENDENT_VIEWS, oids):
            if r["schema"] not in ("tickets", "reporting"):
                self.problems.append(
                    f"view {r['view']} reads {r['reads']}: after the takeover it would go on reading the "
                    f"loader's copy in {LEGACY_SCHEMA}; drop it before adopting and create it again after"
                )
        for r in await self.conn.fetch(FOREIGN_KEYS_INTO, oids):
            self.problems.append(
                f"foreign key {r['constraint_name']} refers to {r['refers_to']}: it would go on "
                f"referring to the loader's copy in {LEGACY_SCHEMA}; drop it before adopting"
            )

    async def _legacy_relations(self) -> list[asyncpg.Record]:
        """What moves to tickets_legacy: the loader's tables and the views over them (and
        over those) in its schemas; the project creates its own under the same names."""
        rels = {r["oid"]: r for r in await self.conn.fetch(RELATIONS_IN, ["tickets", "reporting"])}
        chosen = [r for r in rels.values() if r["schema"] == "tickets" and r["name"] in self.columns]
        frontier = [r["oid"] for r in chosen]
        while frontier:
            deps = await self.conn.fetch(DEPENDENT_VIEWS, frontier)
            frontier = [d["oid"] for d in deps if d["oid"] in rels and rels[d["oid"]] not in chosen]
            chosen.extend(rels[oid] for oid in dict.fromkeys(frontier))
        return chosen

    async def _legacy_migrations(self) -> list[str]:
        if "schema_migrations" not in self.columns:
            return []
        text_cols = [c.name for c in self.columns["schema_migrations"] if c.base in TEXT]
        names = [str(r[text_cols[0]]) for r in await self.conn.fetch(LEGACY_LEDGER)] if text_cols else []
        obj = self.report.object("tickets.schema_migrations (the loader's ledger)")
        obj.add(f"{len(names)} migration(s) recorded: {', '.join(sorted(names)) or '-'}")
        obj.add(f"replaced by fleetticketsd's ledger; kept as {LEGACY_SCHEMA}.schema_migrations")
        return sorted(names)

    # --- 2. move the loader's objects aside ----------------------------------------------------

    async def _move_aside(self) -> None:
        await self.conn.execute(f"CREATE SCHEMA {LEGACY_SCHEMA}")
        await self.conn.execute(f"CREATE SCHEMA {HOLD_SCHEMA}")
        moved = await self._legacy_relations()
        moved_oids = {r["oid"] for r in moved}
        for r in moved:
            await self._set_schema(r, LEGACY_SCHEMA)
            self.report.legacy_kept.append(
                f"{r['name']} ({_KINDS[r['kind']]}, was {r['schema']}.{r['name']})"
            )
        triggers = [r["trigger_name"] for r in await self.conn.fetch(TRIGGERS_ON, list(moved_oids))]
        if triggers:
            self.report.notes.append(
                "triggers stay on the loader's tables and no longer see new data: " + ", ".join(triggers)
            )
        # Every function of the loader's two schemas is the loader's: its generated
        # columns and triggers follow them by OID, and the project creates its own.
        seen: set[tuple[str, str]] = set()
        for f in await self.conn.fetch(FUNCTIONS_IN, ["tickets", "reporting"]):
            name, kind = f["name"], _ROUTINE[f["kind"]]
            if (name, _arg_types(f["args"])) in seen:  # the same name and types in both schemas
                name = f"{f['schema']}_{name}"
                await self.conn.execute(f"ALTER {kind} {f['signature']} RENAME TO {db.quote_ident(name)}")
            seen.add((name, _arg_types(f["args"])))
            here, there = _function(f["schema"], name, f["args"]), _function(LEGACY_SCHEMA, name, f["args"])
            await self.conn.execute(MOVE_FUNCTION.format(kind=kind, function=here, schema=LEGACY_SCHEMA))
            self.rollback.append(MOVE_FUNCTION.format(kind=kind, function=there, schema=f["schema"]) + ";")
            if name != f["name"]:
                self.rollback.append(f"ALTER {kind} {here} RENAME TO {db.quote_ident(f['name'])};")
            self.report.legacy_kept.append(f"{name}({f['args']}) (function, was {f['schema']}.{f['name']})")
        # Anything else in schema tickets is not the loader's documented layout: it
        # waits in the hold schema and goes back after the migrations (_return_held).
        self.held = [
            r for r in await self.conn.fetch(RELATIONS_IN, ["tickets"]) if r["oid"] not in moved_oids
        ]
        for r in self.held:
            await self._set_schema(r, HOLD_SCHEMA, record=False)

    async def _set_schema(self, rel: asyncpg.Record, schema: str, *, record: bool = True) -> None:
        kind = _ALTER[rel["kind"]]
        await self.conn.execute(MOVE_RELATION.format(kind=kind, relation=rel["qualified"], schema=schema))
        if record:
            moved = db.qualified(schema, rel["name"])
            self.rollback.append(
                MOVE_RELATION.format(kind=kind, relation=moved, schema=db.quote_ident(rel["schema"])) + ";"
            )

    async def _return_held(self) -> None:
        kept: list[str] = []
        for r in self.held:
            try:
                async with self.conn.transaction():
                    held = db.qualified(HOLD_SCHEMA, r["name"])
                    await self.conn.execute(
                        MOVE_RELATION.format(kind=_ALTER[r["kind"]], relation=held, schema="tickets")
                    )
                kept.append(r["qualified"])
            except (asyncpg.DuplicateTableError, asyncpg.DuplicateObjectError):
                self.problems.append(
                    f"{r['qualified']}: not part of the loader's layout in LEGACY.md, and fleetticketsd "
                    "creates a relation of that name; rename or move it, then adopt"
                )
        if not self.problems:
            await self.conn.execute(f"DROP SCHEMA {HOLD_SCHEMA}")  # empty: every relation went back
        if kept:
            self.report.notes.append(
                f"left in place (not part of the loader's layout in LEGACY.md): {', '.join(kept)}"
            )

    # --- 3. copy -------------------------------------------------------------------------

    async def _copy(
        self,
        table: str,
        kind: str,
        targets: dict[str, str],
        *,
        source: str = "",
        conflict: str = "",
        args: tuple[Any, ...] = (),
        explain: dict[str, str] | None = None,
    ) -> tuple[int, int, list[str]]:
        """INSERT the legacy rows of ``table`` into the project's, through ``targets``
        (project column -> SQL over alias l), carrying extra columns along.
        Returns (legacy rows, rows inserted, notes on columns)."""
        extras, notes = await self._carry_columns(table, kind, set(targets))
        taken, derived, used = _mapping(targets, explain or {})
        used |= {m.strip('"') for m in _LEGACY_REF.findall(source)}
        notes.insert(0, f"columns taken: {taken}" + (f"; set by fleetticketsd: {derived}" if derived else ""))
        unused = [c.name for c in self.columns[table] if c.name not in used and c.name not in extras]
        if unused:
            notes.insert(1, f"not used (rebuilt from raw, or no longer needed): {', '.join(unused)}")
        cols = {**targets, **{db.quote_ident(c): f"l.{db.quote_ident(c)}" for c in extras}}
        sql = (
            f"INSERT INTO tickets.{table} ({', '.join(cols)}) "
            f"SELECT {', '.join(cols.values())} FROM {source or f'{LEGACY_SCHEMA}.{table} AS l'} {conflict}"
        )
        status = await self.conn.execute(sql, *args)
        legacy_rows = await self.conn.fetchval(ROWS.format(table=f"{LEGACY_SCHEMA}.{table}"))
        return int(legacy_rows), int(status.rsplit(" ", 1)[-1]), notes

    async def _carry_columns(self, table: str, kind: str, mapped: set[str]) -> tuple[list[str], list[str]]:
        """Columns someone added to the loader's table, added to the project's too.
        A generated one keeps its expression where the project's table can compute it."""
        known = KNOWN_COLUMNS[kind] | mapped
        ours = {r["name"] for r in await self.conn.fetch(COLUMNS, f"tickets.{table}")}
        carried: list[str] = []
        notes: list[str] = []
        for col in self.columns[table]:
            if col.name in known:
                continue
            if col.name in ours:
                notes.append(f"not carried: {col.name} (fleetticketsd has a column of that name)")
                continue
            ddl = f"ALTER TABLE tickets.{table} ADD COLUMN {db.quote_ident(col.name)} {col.type}"
            if col.generated:
                ddl += f" GENERATED ALWAYS AS ({col.expr}) STORED"
            elif col.expr is not None:
                ddl += f" DEFAULT {col.expr}"
            try:
                async with self.conn.transaction():
                    await self.conn.execute(ddl)
            except asyncpg.PostgresError as exc:
                notes.append(f"not carried: {col.name} {col.type} ({exc}); kept in {LEGACY_SCHEMA}.{table}")
                continue
            if col.generated:
                notes.append(f"carried: {col.name} {col.type}, generated as before")
            else:
                carried.append(col.name)
                notes.append(f"carried: {col.name} {col.type}" + (" (now nullable)" if col.not_null else ""))
        return carried, notes

    def _as(self, table: str, names: tuple[str, ...], types: frozenset[str], fallback: str) -> str:
        col = self._pick(table, names, types)
        return f"l.{db.quote_ident(col.name)}" if col is not None else fallback

    def _count(self, table: str, name: str) -> str:
        return f"round({self._as(table, (name,), NUMBER, 'NULL')})::int"

    async def _copy_import_meta(self) -> None:
        if "import_meta" not in self.columns:
            return
        legacy, inserted, notes = await self._copy(
            "import_meta",
            "import_meta",
            {
                "dataset": "l.dataset::text",
                "metadata": "l.metadata || jsonb_build_object('adopted_at', now())",
                "last_applied_at": self._as("import_meta", ("updated_at",), TIMESTAMPTZ, "NULL"),
            },
        )
        obj = self.report.object("tickets.import_meta")
        obj.add(f"{inserted} of {legacy} dataset row(s) kept, metadata whole")
        for dataset, key in sorted(self.watermarks.items()):
            obj.add(f"watermark {dataset}: {key}")
        obj.lines.extend(notes)

    async def _copy_clusters(self) -> None:
        if "geo_clusters" not in self.columns:
            return
        point = self._point("geo_clusters")
        legacy, inserted, notes = await self._copy(
            "geo_clusters",
            "geo_clusters",
            {
                "cluster": "l.cluster::text",
                "geom": "p.g",
                "status": "CASE WHEN p.g IS NULL THEN 'no_match' ELSE 'ok' END",
                "verified": "coalesce(l.verified, false) AND p.g IS NOT NULL",
                "provider": self._provider("geo_clusters"),
                "display_name": self._as("geo_clusters", ("display_name",), TEXT, "NULL"),
                "attempts": "1",
                "geocoded_at": self._as("geo_clusters", ("geocoded_at", "updated_at"), TIMESTAMPTZ, "now()"),
                "retry_at": "CASE WHEN p.g IS NULL THEN now() + $1::float8 * interval '1 day' END",
            },
            source=f"{LEGACY_SCHEMA}.geo_clusters AS l CROSS JOIN LATERAL (SELECT {point} AS g) AS p",
            args=(self.geocoder.no_match_retry_days,),
            explain={
                "geom": self._point_source("geo_clusters"),
                "status": "the point",
                "retry_at": "the point",
            },
        )
        counts = await self.conn.fetchrow(
            "SELECT count(*) FILTER (WHERE verified) AS verified, "
            "count(*) FILTER (WHERE NOT verified AND status = 'ok') AS cached, "
            "count(*) FILTER (WHERE status <> 'ok') AS without FROM tickets.geo_clusters"
        )
        assert counts is not None
        obj = self.report.object("tickets.geo_clusters")
        obj.add(
            f"{inserted} of {legacy} centroid(s) kept: {counts['verified']} verified (win over any "
            f"provider answer), {counts['cached']} cached answers, {counts['without']} without a point"
        )
        obj.lines.extend(notes)

    async def _copy_locations(self) -> None:
        if "geo_locations" not in self.columns:
            return
        point = self._point("geo_locations")
        loc = self._pick("geo_locations", ("location", "location_key"))
        assert loc is not None
        # Keyed by the project's cleaning of the name, which the tickets' location_key
        # uses (idempotent on a clean name); where two legacy rows clean to one key, a
        # verified one wins, then the newest.
        updated = self._as("geo_locations", ("updated_at", "geocoded_at"), TIMESTAMPTZ, "NULL::timestamptz")
        source = f"""(
            SELECT DISTINCT ON (l.cluster, k.key) l.*, k.key AS fleet_key, p.g AS fleet_geom
            FROM {LEGACY_SCHEMA}.geo_locations AS l
            CROSS JOIN LATERAL (SELECT left(tickets.clean_location(l.{db.quote_ident(loc.name)}::text,
                                                                   l.cluster::text), 200) AS key) AS k
            CROSS JOIN LATERAL (SELECT {point} AS g) AS p
            WHERE k.key IS NOT NULL
            ORDER BY l.cluster, k.key, coalesce(l.verified, false) DESC, p.g IS NOT NULL DESC,
                     {updated} DESC NULLS LAST
        ) AS l
        LEFT JOIN tickets.geo_clusters AS c ON c.cluster = l.cluster AND c.status = 'ok'
        CROSS JOIN LATERAL (
            SELECT coalesce(l.verified, false) AND l.fleet_geom IS NOT NULL AS verified,
                   ST_Distance(l.fleet_geom::geography, c.geom::geography) / 1000.0 AS km
        ) AS v"""
        legacy, inserted, notes = await self._copy(
            "geo_locations",
            "geo_locations",
            {
                "cluster": "l.cluster::text",
                "location": "l.fleet_key",
                "geom": "l.fleet_geom",
                "distance_km": "v.km",
                # The project's guard re-judges the loader's unverified answers; a
                # person's point is never second-guessed.
                "status": "CASE WHEN l.fleet_geom IS NULL THEN 'no_match' "
                "WHEN NOT v.verified AND v.km > $2::float8 THEN 'rejected_distance' "
                "WHEN NOT v.verified AND v.km IS NULL THEN 'unguarded' ELSE 'ok' END",
                "verified": "v.verified",
                "provider": self._provider("geo_locations"),
                "display_name": self._as("geo_locations", ("display_name",), TEXT, "NULL"),
                "attempts": "1",
                "geocoded_at": self._as("geo_locations", ("geocoded_at", "updated_at"), TIMESTAMPTZ, "now()"),
                "retry_at": "CASE WHEN l.fleet_geom IS NULL OR (NOT v.verified AND v.km > $2::float8) "
                "THEN now() + $1::float8 * interval '1 day' END",
            },
            source=source,
            args=(self.geocoder.no_match_retry_days, self.geocoder.max_distance_km),
            explain={
                "location": f"{loc.name}, cleaned as the tickets' location_key",
                "geom": self._point_source("geo_locations"),
                "status": "the point, and the 25 km guard for unverified ones",
                "retry_at": "the point",
                "verified": "verified",
            },
        )
        counts = await self.conn.fetchrow(
            "SELECT count(*) FILTER (WHERE verified) AS verified, "
            "count(*) FILTER (WHERE NOT verified AND status = 'ok') AS cached, "
            "count(*) FILTER (WHERE status = 'rejected_distance') AS rejected, "
            "count(*) FILTER (WHERE status = 'unguarded') AS unguarded, "
            "count(*) FILTER (WHERE status = 'no_match') AS without FROM tickets.geo_locations"
        )
        assert counts is not None
        obj = self.report.object("tickets.geo_locations")
        obj.add(
            f"{inserted} of {legacy} location(s) kept: {counts['verified']} verified, "
            f"{counts['cached']} cached answers, {counts['rejected']} farther than "
            f"{self.geocoder.max_distance_km:g} km from their "
            f"centroid (kept for review, not used), {counts['without']} without a point"
            + (
                f", {counts['unguarded']} unguarded (no centroid to check them against; used)"
                if counts["unguarded"]
                else ""
            )
        )
        if inserted < legacy:
            obj.add(
                f"{legacy - inserted} legacy row(s) merged: the same place once network codes are "
                f"stripped, or no place at all (all kept in {LEGACY_SCHEMA}.geo_locations)"
            )
        obj.lines.extend(notes)

    def _provider(self, table: str) -> str:
        col = self._pick(table, ("provider", "source"), TEXT)
        if col is None:
            return "'legacy'"
        return f"coalesce('legacy:' || nullif(l.{db.quote_ident(col.name)}::text, ''), 'legacy')"

    async def _copy_tickets(self, table: str) -> None:
        key = self.watermarks.get(table)
        ingested = self._as(table, ("ingested_at",), TIMESTAMPTZ, "now()")
        legacy, inserted, notes = await self._copy(
            table,
            "ticket",
            {
                "ticket_id": "l.ticket_id::text",
                "raw": "l.raw",
                "source_key": "$1::text",
                "ingested_at": f"coalesce({ingested}, now())",
                "updated_at": f"coalesce({self._as(table, ('updated_at',), TIMESTAMPTZ, ingested)}, now())",
            },
            args=(key,),
        )
        if inserted != legacy:  # cannot happen after _check_keys; never commit a loss
            raise AdoptionRefused([f"tickets.{table}: copied {inserted} of {legacy} rows"])
        obj = self.report.object(f"tickets.{table}")
        obj.add(f"{inserted} of {legacy} ticket row(s) kept, raw unchanged")
        if key:
            obj.add(f"source_key = {key} (the watermark: an older late file cannot overwrite them)")
        obj.add(
            "typed columns and geometry rebuilt from raw and the gazetteer; the loader's "
            f"stay in {LEGACY_SCHEMA}.{table}"
        )
        obj.lines.extend(notes)

    async def _copy_closures(self) -> None:
        if "closure_events" not in self.columns:
            return
        t = "closure_events"
        clock = self._as(
            t, ("sla_clock_start",), TIMESTAMPTZ, "coalesce(i.created_at_service, i.first_seen_at)"
        )
        mttr = (
            f"round({self._as(t, ('mttr_minutes', 'mttr'), NUMBER, 'NULL')})::int, "
            f"CASE WHEN i.closed_at = l.closed_at THEN i.mttr_minutes END, "
            f"round(extract(epoch FROM l.closed_at - {clock}) / 60)::int"
        )
        legacy, inserted, notes = await self._copy(
            t,
            t,
            {
                "ticket_id": "l.ticket_id::text",
                "closed_at": "l.closed_at",
                "observed_at": self._as(t, ("observed_at",), TIMESTAMPTZ, "l.closed_at"),
                "source_key": self._as(t, ("source_key",), TEXT, "coalesce($1::text, 'tickets_legacy')"),
                "sla_clock_start": clock,
                "mttr_minutes": "m.minutes",
                # Met or breached against the project's 48 h, from the minutes; the
                # loader kept the export's own verdict, which uses another target.
                "sla_status": "CASE WHEN m.minutes < 48 * 60 THEN 'met' "
                "WHEN m.minutes >= 48 * 60 THEN 'breached' END",
                "feed_sla_status": self._as(t, ("feed_sla_status", "sla_status"), TEXT, "i.sla_status"),
                "owner": self._as(t, ("owner",), TEXT, "i.owner"),
                "assigned_team": self._as(t, ("assigned_team",), TEXT, "i.assigned_team"),
                "cluster": self._as(t, ("cluster",), TEXT, "i.cluster"),
            },
            source=(
                f"{LEGACY_SCHEMA}.closure_events AS l "
                "LEFT JOIN tickets.inc AS i ON i.ticket_id = l.ticket_id::text "
                f"CROSS JOIN LATERAL (SELECT coalesce({mttr}) AS minutes) AS m"
            ),
            conflict="ON CONFLICT ON CONSTRAINT closure_events_ticket_closed_key DO NOTHING",
            args=(self.watermarks.get("inc"),),
        )
        obj = self.report.object("tickets.closure_events")
        obj.add(f"{inserted} of {legacy} closure(s) kept")
        if inserted < legacy:
            obj.add(
                f"{legacy - inserted} duplicate(s) of (ticket_id, closed_at) kept only in {LEGACY_SCHEMA}"
            )
        obj.lines.extend(notes)

    async def _copy_snapshots(self) -> None:
        if "inc_daily_snapshot" not in self.columns:
            return
        t = "inc_daily_snapshot"
        legacy, inserted, notes = await self._copy(
            t,
            t,
            {
                "day": "l.day",
                "open_backlog": self._count(t, "open_backlog"),
                "opened": f"coalesce({self._count(t, 'opened')}, 0)",
                "closed": f"coalesce({self._count(t, 'closed')}, 0)",
                "breached": self._count(t, "breached"),
                "at_risk": self._count(t, "at_risk"),
                "captured_at": self._as(t, ("captured_at",), TIMESTAMPTZ, "NULL"),
            },
        )
        span = await self.conn.fetchrow(
            "SELECT min(day) AS first, max(day) AS last FROM tickets.inc_daily_snapshot"
        )
        assert span is not None
        obj = self.report.object("tickets.inc_daily_snapshot")
        obj.add(f"{inserted} of {legacy} day(s) kept ({span['first'] or '-'} to {span['last'] or '-'})")
        obj.lines.extend(notes)

    # --- 4. grants, geometry, rollback ------------------------------------------------------

    async def _carry_grants(self) -> None:
        """Roles that could read or call the loader's objects can read or call their
        replacements (the dashboards' API, typically)."""
        granted: list[str] = []
        for r in await self.conn.fetch(RELATIONS_IN, [LEGACY_SCHEMA]):
            if r["kind"] == "S" or not await self.conn.fetchval(
                "SELECT to_regclass($1)", f"tickets.{r['name']}"
            ):
                continue
            for g in await self.conn.fetch(GRANTS_ON_RELATION, r["oid"]):
                await self.conn.execute(
                    f"GRANT {g['privilege']} ON tickets.{db.quote_ident(r['name'])} TO {g['grantee']}"
                )
                granted.append(f"{g['privilege']} on tickets.{r['name']} to {g['grantee']}")
        for f in await self.conn.fetch(FUNCTIONS_IN, [LEGACY_SCHEMA]):
            target = f"reporting.{db.quote_ident(f['name'])}({f['args']})"
            if f["name"] not in DASHBOARD_SIGNATURES:
                continue
            for g in await self.conn.fetch(GRANTS_ON_FUNCTION, f["oid"]):
                await self.conn.execute(f"GRANT {g['privilege']} ON FUNCTION {target} TO {g['grantee']}")
                granted.append(f"{g['privilege']} on {target} to {g['grantee']}")
        if granted:
            self.report.notes.append("grants carried over: " + "; ".join(granted))

    async def _resolve_geometry(self) -> None:
        moved = await self.conn.fetchval(RESOLVE_ALL)
        obj = self.report.object("geometry")
        obj.add(f"{moved} ticket(s) placed by the project's resolution from the adopted gazetteer")
        for table in TICKET_TABLES:
            if table in self.columns:
                counts = {
                    r["geo_source"]: r["n"]
                    for r in await self.conn.fetch(GEO_SOURCES.format(table=f"tickets.{table}"))
                }
                shown = ", ".join(f"{k or 'no point'} {v}" for k, v in counts.items()) or "no tickets"
                obj.add(f"tickets.{table}: {shown}")

    async def _rollback_sql(self) -> str:
        """SQL that puts the loader's layout back: the project's objects move to a schema
        of their own (kept for inspection), the loader's return to their schemas."""
        lines = ["BEGIN;", f"CREATE SCHEMA {ROLLED_BACK};"]
        held = {r["qualified"] for r in self.held}
        for r in await self.conn.fetch(RELATIONS_IN, ["tickets"]):
            if r["qualified"] not in held:
                kind = _ALTER[r["kind"]]
                lines.append(
                    MOVE_RELATION.format(kind=kind, relation=r["qualified"], schema=ROLLED_BACK) + ";"
                )
        for f in await self.conn.fetch(FUNCTIONS_IN, ["tickets", "reporting"]):
            kind = _ROUTINE[f["kind"]]
            lines.append(MOVE_FUNCTION.format(kind=kind, function=f["signature"], schema=ROLLED_BACK) + ";")
        lines.extend(self.rollback)
        lines.append("COMMIT;")
        return "\n".join(lines)


_ALTER = {
    "r": "TABLE",
    "p": "TABLE",
    "v": "VIEW",
    "m": "MATERIALIZED VIEW",
    "f": "FOREIGN TABLE",
    "S": "SEQUENCE",
}
_ROUTINE = {"f": "FUNCTION", "w": "FUNCTION", "p": "PROCEDURE", "a": "AGGREGATE"}
_KINDS = {
    "r": "table",
    "p": "table",
    "v": "view",
    "m": "materialized view",
    "f": "foreign table",
    "S": "sequence",
}


_LEGACY_REF = re.compile(r'\bl\.("(?:[^"]|"")+"|\w+)')


def _mapping(targets: dict[str, str], explain: dict[str, str]) -> tuple[str, str, set[str]]:
    """Which legacy column feeds each target: ('ticket_id ← ticket_id, ...', 'source_key, ...',
    the legacy columns read)."""
    taken, derived, used = [], [], set()
    for target, expr in targets.items():
        refs = sorted({m.strip('"') for m in _LEGACY_REF.findall(expr)})
        used.update(refs)
        if target in explain:
            taken.append(f"{target} ← {explain[target]}")
        elif refs:
            taken.append(f"{target} ← {', '.join(refs)}")
        else:
            derived.append(target)
    return ", ".join(taken), ", ".join(derived), used


def _function(schema: str, name: str, args: str) -> str:
    return f"{db.qualified(schema, name)}({args})"


def _arg_types(args: str) -> str:
    """'p_cluster text, p_to timestamp with time zone' -> 'text, timestamp with time zone'."""
    out = []
    for arg in args.split(", ") if args else []:
        words = arg.split(" DEFAULT ")[0].split()
        out.append(" ".join(words[1:]) if len(words) > 1 else words[0])
    return ", ".join(out)

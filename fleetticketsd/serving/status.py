"""Where each dataset and the geocoder stand: assembled here for `fleetticketsd status`
and for the status page, so the two can never disagree.

The per-dataset figures are drain.py's ``status`` (the bucket listed) or
``status_as_last_seen`` (the bucket unreachable: the last drain's listing, from the
database). The page must not list the bucket per request, since browsers left open reload it
every few seconds: it reads the listing the daemon's source watcher keeps (``Listings``)
and only asks the database, which the page's own cache (page.py) limits to one
assembly per few seconds whatever the number of browsers.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from fleetticketsd.config import Config, DatasetConfig
from fleetticketsd.database import adopt
from fleetticketsd.database.db import LOCK_NAMESPACE
from fleetticketsd.ingest import ledger
from fleetticketsd.ingest.drain import Engine, status, status_as_last_seen
from fleetticketsd.ingest.source import ChangeFile, SourceError

# Open tickets of a dataset by where their point comes from ('none': no point yet).
COVERAGE = """
SELECT coalesce(geo_source, 'none') AS source, count(*) AS n
FROM {table} WHERE normalized_status = 'open' GROUP BY 1
"""
# The map's marks: located open tickets, SLA state only for the incident table (the
# 48 h clock of tickets.inc_open_sla), at most $1 of them.
MAP_POINTS = """
SELECT ticket_id, ST_X(geom) AS lon, ST_Y(geom) AS lat, geo_source, cluster,
       CASE WHEN $2 THEN reporting.sla_state(coalesce(created_at_service, first_seen_at), now()) END
           AS sla_state
FROM {table} WHERE normalized_status = 'open' AND geom IS NOT NULL
ORDER BY ticket_id LIMIT $1
"""
MAP_MAX_POINTS = 5000
UNGUARDED_SHOWN = 3  # clusters named in the unguarded line; the rest are counted
SLA_TABLE = "tickets.inc"
NOT_LISTED = "the source watcher has not listed it yet"


def unreachable(config: Config, exc: SourceError) -> str:
    return f"cannot reach bucket {config.s3.bucket!r} at {config.s3.endpoint_url}: {exc}"


# --- the source listing the daemon keeps -------------------------------------------------


@dataclass(frozen=True)
class Listing:
    files: list[ChangeFile] | None  # None: the last attempt failed
    error: str | None
    at: datetime


class Listings:
    """The latest listing of each dataset's changes/, made by the source watcher."""

    def __init__(self) -> None:
        self._latest: dict[str, Listing] = {}

    def get(self, dataset: str) -> Listing | None:
        return self._latest.get(dataset)

    async def refresh(self, engine: Engine, dataset: DatasetConfig) -> dict[str, Any]:
        """List the bucket once, keep the result, refresh the gauges from it; returns
        the dataset's status as of this listing."""
        try:
            files = await engine.source.list_changes(dataset)
        except SourceError as exc:
            self._latest[dataset.name] = Listing(None, str(exc), datetime.now(UTC))
            raise
        self._latest[dataset.name] = Listing(files, None, datetime.now(UTC))
        return await status(engine, dataset, listed=files)


# --- datasets ---------------------------------------------------------------------------------


@dataclass
class DatasetsReport:
    datasets: dict[str, dict[str, Any]]
    # dataset -> why its newest key, pending files and lag are as the last drain saw them
    source_errors: dict[str, str] = field(default_factory=dict)


async def datasets(
    engine: Engine, config: Config, listings: Listings | None = None, *, detailed: bool
) -> DatasetsReport:
    """Each enabled dataset's status; ``listings`` None lists the bucket now (the CLI)."""
    report = DatasetsReport({})
    live_error: str | None = None
    if listings is None:
        try:
            await engine.source.check()
        except SourceError as exc:
            live_error = unreachable(config, exc)
    for ds in config.enabled_datasets:
        if listings is None:
            if live_error is None:
                try:
                    report.datasets[ds.name] = await status(engine, ds, detailed=detailed)
                    continue
                except SourceError as exc:
                    live_error = str(exc)
            error = live_error
        else:
            seen = listings.get(ds.name)
            if seen is not None and seen.files is not None:
                st = await status(engine, ds, detailed=detailed, listed=seen.files)
                if detailed:
                    st["source_checked_at"] = seen.at.isoformat()
                report.datasets[ds.name] = st
                continue
            error = NOT_LISTED if seen is None else seen.error or "listing failed"
        report.datasets[ds.name] = await status_as_last_seen(engine, ds, error, detailed=detailed)
        report.source_errors[ds.name] = error
    return report


# --- geocoder ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeocoderStatus:
    enabled: bool
    provider: str
    daily_budget: int
    queue: int | None = None
    budget_left: int | None = None
    error: str | None = None
    # Answers placed without a centroid to check them (issue 13), and their clusters.
    unguarded: int | None = None
    unguarded_clusters: tuple[str, ...] = ()

    def rows(self) -> list[tuple[str, str]]:
        """Label and value, as the terminal and the page both show them."""
        if not self.enabled:
            return [("geocoding", "off ([geocoder] enabled = false)")]
        if self.error is not None:
            return [("geocoding", f"unknown ({self.error})")]
        return [
            ("geocode queue", f"{self.queue} place(s) waiting"),
            (
                "geocode budget",
                f"{self.budget_left} of {self.daily_budget} requests left today (UTC, {self.provider})",
            ),
            ("geocode unguarded", self.unguarded_text()),
        ]

    def unguarded_text(self) -> str:
        if not self.unguarded:
            return "0 location(s): every geocoded location was checked against its cluster centroid"
        shown = ", ".join(self.unguarded_clusters[:UNGUARDED_SHOWN])
        more = len(self.unguarded_clusters) - UNGUARDED_SHOWN
        clusters = shown + (f" and {more} more" if more > 0 else "")
        return (
            f"{self.unguarded} location(s) placed without a cluster centroid to check them "
            f"(cluster(s) {clusters}): fleetticketsd gazetteer set CLUSTER LAT LON"
        )

    def as_json(self) -> dict[str, Any]:
        """`status --json`'s "geocoder" object."""
        out: dict[str, Any] = {"enabled": self.enabled, "provider": self.provider}
        if self.enabled:
            out.update(
                error=self.error,
                queue=self.queue,
                budget_remaining=self.budget_left,
                daily_budget=self.daily_budget,
                unguarded_locations=self.unguarded,
                unguarded_clusters=list(self.unguarded_clusters),
            )
        return out


async def geocoder(engine: Engine, config: Config) -> GeocoderStatus:
    # The worker's HTTP stack: not for every command.
    from fleetticketsd.geocoding.geocode import budget_left, pending_places, unguarded_locations

    geo = config.geocoder
    out = GeocoderStatus(geo.enabled, geo.provider, geo.daily_budget)
    if not geo.enabled:
        return out
    try:
        async with engine.pool.acquire() as conn:
            waiting = await pending_places(conn)
            left = await budget_left(conn, geo)
            unguarded, clusters = await unguarded_locations(conn)
    except asyncpg.PostgresError as exc:  # e.g. the geocoding migration is not applied yet
        return GeocoderStatus(geo.enabled, geo.provider, geo.daily_budget, error=str(exc))
    return GeocoderStatus(
        geo.enabled, geo.provider, geo.daily_budget, waiting, left, None, unguarded, tuple(clusters)
    )


async def other_writers(engine: Engine) -> list[adopt.ForeignWrite]:
    async with engine.pool.acquire() as conn:
        return await adopt.foreign_writes(conn)


# --- what only the page shows ------------------------------------------------------------------


@dataclass(frozen=True)
class LockHolder:
    pid: int
    application_name: str | None
    client_addr: str | None
    role: str | None
    backend_start: datetime | None
    xact_start: datetime | None
    state: str | None


@dataclass(frozen=True)
class MapPoint:
    dataset: str
    ticket_id: str
    lon: float
    lat: float
    geo_source: str | None
    cluster: str | None
    sla_state: str | None


@dataclass
class Snapshot:
    """Everything the page shows, taken at one moment."""

    taken_at: datetime
    datasets: DatasetsReport
    geocoder: GeocoderStatus
    coverage: dict[str, dict[str, int]]  # dataset -> geo_source (or 'none') -> open tickets
    points: list[MapPoint]
    points_total: int  # located open tickets; more than len(points) when capped
    lock_holders: dict[str, LockHolder]
    draining_here: frozenset[str]
    writers: list[adopt.ForeignWrite]
    took_s: float = 0.0


def _table(ds: DatasetConfig) -> str:
    # config.py allows only plain identifiers here; quoted anyway, as SQL built from text.
    return f'"{ds.table_schema}"."{ds.table_name}"'


async def snapshot(
    engine: Engine, config: Config, listings: Listings, draining_here: Collection[str]
) -> Snapshot:
    started = time.monotonic()
    enabled = config.enabled_datasets
    report = await datasets(engine, config, listings, detailed=True)
    geo = await geocoder(engine, config)
    coverage: dict[str, dict[str, int]] = {}
    points: list[MapPoint] = []
    total = 0
    async with engine.pool.acquire() as conn:
        holders = {
            r["dataset"]: LockHolder(
                r["pid"],
                r["application_name"],
                r["client_addr"],
                r["usename"],
                r["backend_start"],
                r["xact_start"],
                r["state"],
            )
            for r in await conn.fetch(ledger.LOCK_HOLDERS, LOCK_NAMESPACE, [d.name for d in enabled])
        }
        for ds in enabled:
            counts = {r["source"]: r["n"] for r in await conn.fetch(COVERAGE.format(table=_table(ds)))}
            coverage[ds.name] = counts
            total += sum(n for src, n in counts.items() if src != "none")
            room = MAP_MAX_POINTS - len(points)
            if room <= 0:
                continue
            rows = await conn.fetch(MAP_POINTS.format(table=_table(ds)), room, ds.table == SLA_TABLE)
            points.extend(
                MapPoint(
                    ds.name, r["ticket_id"], r["lon"], r["lat"], r["geo_source"], r["cluster"], r["sla_state"]
                )
                for r in rows
            )
        writers = await adopt.foreign_writes(conn)
    return Snapshot(
        taken_at=datetime.now(UTC),
        datasets=report,
        geocoder=geo,
        coverage=coverage,
        points=points,
        points_total=total,
        lock_holders=holders,
        draining_here=frozenset(draining_here),
        writers=writers,
        took_s=time.monotonic() - started,
    )

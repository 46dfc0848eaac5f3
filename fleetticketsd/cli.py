"""The command line (CONTRACT.md): argument parsing, exit codes, output.

Each command is a thin shell around the engine: build the dependencies from the
config, call one function, print its result. Expected failures (bad config, an
unreachable database, a blocked dataset) end with one clear line on stderr and a
documented exit code; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from fleetticketsd import __version__, logs
from fleetticketsd.config import Config, ConfigError, DatasetConfig, load, redacted, resolve_path
from fleetticketsd.database import db, roles
from fleetticketsd.database.adopt import foreign_write_warning
from fleetticketsd.database.layout import LayoutError
from fleetticketsd.ingest.actions import ActionError, load_file, skip
from fleetticketsd.ingest.drain import DrainReport, Engine, drain
from fleetticketsd.ingest.s3errors import tls_failed as futile_tls
from fleetticketsd.ingest.source import S3Source, SourceError
from fleetticketsd.metrics import Metrics
from fleetticketsd.serving import status
from fleetticketsd.serving.terminal import DrainProgress, render_status

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


class CommandError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleetticketsd", description=__doc__.splitlines()[0] if __doc__ else None
    )
    config_help = "config file (default: $FLEETTICKETSD_CONFIG, else ./config.toml)"
    p.add_argument("--config", help=config_help)
    p.add_argument("--version", action="version", version=f"fleetticketsd {__version__}")
    # `fleetticketsd drain --config x` is as natural as `fleetticketsd --config x drain`:
    # accept it after the command too, without letting a default there clobber the other.
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", parents=[after], help="the daemon: scheduled drains, geocoding, HTTP endpoint")

    m = sub.add_parser("migrate", parents=[after], help="apply pending migrations")
    m.add_argument("--check", action="store_true", help="only report; exit 1 if any are pending")
    m.add_argument("--adopt", action="store_true", help="take over the legacy loader's database (LEGACY.md)")
    m.add_argument("--dry-run", action="store_true", help="with --adopt: print the plan, change nothing")

    d = sub.add_parser("drain", parents=[after], help="one pass over the datasets, then exit")
    d.add_argument("--dataset", action="append", default=[], metavar="NAME")
    d.add_argument("--dry-run", action="store_true", help="parse and upsert, then roll back")
    d.add_argument("--reseed", action="store_true", help="forget ledger and watermark; re-apply changes/")
    d.add_argument(
        "--from-archive",
        action="store_true",
        help="with --reseed: rebuild the dataset from nothing, from processed/ and changes/ in name order",
    )
    d.add_argument("--json", action="store_true")

    s = sub.add_parser("status", parents=[after], help="per-dataset watermark, lag, pending files, block")
    s.add_argument("--json", action="store_true")

    lf = sub.add_parser(
        "load-file", parents=[after], help="apply one local CSV through the same engine and ledger"
    )
    lf.add_argument("path", type=Path)
    lf.add_argument("--dataset", required=True, metavar="NAME")
    lf.add_argument("--dry-run", action="store_true")

    sk = sub.add_parser(
        "skip", parents=[after], help="set a blocking file aside (to quarantine/) and unblock"
    )
    sk.add_argument("key", metavar="KEY")
    sk.add_argument("--dataset", required=True, metavar="NAME")
    sk.add_argument("--reason", required=True)

    sub.add_parser(
        "check-config", parents=[after], help="validate the configuration and print it, secrets redacted"
    )

    # --- geocoding (issue 4) ---
    g = sub.add_parser(
        "geocode", parents=[after], help="one geocoding pass (clusters, then locations), then exit"
    )
    g.add_argument("--clusters", action="store_true", help="only cluster centroids")
    g.add_argument("--locations", action="store_true", help="only locations (of clusters already known)")
    g.add_argument("--limit", type=int, metavar="N", help="send at most N requests")
    g.add_argument("--json", action="store_true")
    gz = sub.add_parser("gazetteer", parents=[after], help="operators' corrections to the gazetteer")
    gz_sub = gz.add_subparsers(dest="gazetteer_command", required=True, metavar="ACTION")
    gs = gz_sub.add_parser(
        "set", parents=[after], help="set CLUSTER [LOCATION] to LAT LON, verified; tickets follow"
    )
    gs.add_argument("values", nargs="+", metavar="CLUSTER [LOCATION] LAT LON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = resolve_path(args.config, os.environ)
    try:
        config = load(path)
    except ConfigError as exc:
        print(f"fleetticketsd: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "run":
        from fleetticketsd.daemon import run_daemon

        return run_daemon(config, path)
    # One-shot commands keep stdout for their result; logs go to stderr.
    logs.configure(config.logging.level, config.logging.format, stream=sys.stderr)
    try:
        code: int = asyncio.run(COMMANDS[args.command](config, args))
        return code
    except CommandError as exc:
        print(f"fleetticketsd: {exc}", file=sys.stderr)
        return exc.code
    except LayoutError as exc:
        # Any command on a database fleetticketsd did not lay out: what was found, what to run.
        print(f"fleetticketsd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


async def _pool(config: Config) -> asyncpg.Pool:
    try:
        return await db.create_pool(config.database)
    except db.DatabaseError as exc:
        raise CommandError(str(exc)) from exc


@contextlib.asynccontextmanager
async def engine_for(config: Config, *, need_source: bool = True) -> AsyncIterator[Engine]:
    pool = await _pool(config)
    try:
        async with pool.acquire() as conn:
            await db.require_layout(conn)
        async with S3Source(config.s3) as source:
            if need_source:
                try:
                    await source.check()
                except SourceError as exc:
                    raise CommandError(status.unreachable(config, exc)) from exc
            yield Engine(config, pool, source, Metrics())
    finally:
        await pool.close()


async def _check_datasets(engine: Engine, datasets: list[DatasetConfig]) -> None:
    async with engine.pool.acquire() as conn:
        pending = await db.pending_migrations(conn, db.load_migrations())
        if pending:
            raise CommandError(
                f"database schema is behind: run `fleetticketsd migrate` ({len(pending)} pending)"
            )
        for ds in datasets:
            problem = await db.check_dataset(conn, ds)
            if problem:
                raise CommandError(problem, EXIT_CONFIG)


def _datasets(config: Config, names: list[str]) -> list[DatasetConfig]:
    try:
        return [config.dataset(n) for n in names] if names else config.enabled_datasets
    except ConfigError as exc:
        raise CommandError(str(exc), EXIT_CONFIG) from exc


async def cmd_migrate(config: Config, args: argparse.Namespace) -> int:
    if args.dry_run and not args.adopt:
        raise CommandError("--dry-run goes with --adopt (`migrate --adopt --dry-run`)", EXIT_CONFIG)
    if args.adopt and args.check:
        raise CommandError("--check and --adopt do not go together", EXIT_CONFIG)
    if args.adopt:
        return await cmd_adopt(config, dry_run=args.dry_run)
    pool = await _pool(config)
    try:
        async with pool.acquire() as conn:
            available = db.load_migrations()
            for version in await db.changed_migrations(conn, available):
                # Editing an applied migration leaves databases that differ silently.
                print(f"warning: migration {version} changed after it was applied", file=sys.stderr)
            if args.check:
                pending = await db.pending_migrations(conn, available)
                for m in pending:
                    print(f"pending: {m.version}")
                print(f"{len(pending)} pending migration(s)" if pending else "schema is current")
                return EXIT_FAIL if pending else EXIT_OK
            applied = await db.migrate(conn, available, _dataset_tables(config))
    except roles.RolesMissing as exc:
        # The schema is migrated; only the cluster-wide roles need an administrator.
        for v in exc.applied:
            print(f"applied: {v}")
        raise CommandError(
            f"the migrating role may not create roles; {exc}\nthen run `fleetticketsd migrate` again",
            EXIT_CONFIG,
        ) from exc
    except db.DatabaseError as exc:
        raise CommandError(str(exc)) from exc
    finally:
        await pool.close()
    for v in applied:
        print(f"applied: {v}")
    print(f"{len(applied)} migration(s) applied" if applied else "schema is current")
    return EXIT_OK


def _dataset_tables(config: Config) -> list[str]:
    return [ds.table for ds in config.datasets.values()]


async def cmd_adopt(config: Config, *, dry_run: bool) -> int:
    from fleetticketsd.database.adopt import AdoptionRefused, adopt  # only this command needs the takeover

    pool = await _pool(config)
    try:
        async with pool.acquire() as conn:
            try:
                report = await adopt(conn, config.geocoder, dry_run=dry_run)
            except AdoptionRefused as exc:
                problems = "\n".join(f"  - {p}" for p in exc.problems)
                raise CommandError(
                    f"cannot adopt this database, nothing was changed:\n{problems}", EXIT_CONFIG
                ) from exc
            except (asyncpg.PostgresError, db.DatabaseError) as exc:
                raise CommandError(f"adoption failed, nothing was changed: {exc}") from exc
            print(report.render())
            if dry_run:
                return EXIT_OK
            # The takeover replaced the tables: the roles' grants follow them (also on
            # an adopted database, where this is a no-op migrate). The adoption itself
            # is committed whatever happens here.
            try:
                await db.migrate(conn, dataset_tables=_dataset_tables(config))
            except roles.RolesMissing as exc:
                raise CommandError(
                    f"adopted; but the migrating role may not create roles; {exc}\n"
                    "then run `fleetticketsd migrate`",
                    EXIT_CONFIG,
                ) from exc
            except (asyncpg.PostgresError, db.DatabaseError) as exc:
                raise CommandError(f"adopted; but granting the roles' rights failed: {exc}") from exc
    finally:
        await pool.close()
    return EXIT_OK


async def cmd_drain(config: Config, args: argparse.Namespace) -> int:
    if args.from_archive and not args.reseed:
        raise CommandError("--from-archive goes with --reseed (`drain --reseed --from-archive`)", EXIT_CONFIG)
    if args.reseed and not args.dataset:
        # Forgetting every dataset's ledger at once is never what a cutover of one needs.
        raise CommandError("--reseed needs --dataset NAME (one per dataset to reseed)", EXIT_CONFIG)
    datasets = _datasets(config, args.dataset)
    async with engine_for(config) as engine:
        await _check_datasets(engine, datasets)
        reports: list[DrainReport] = []
        # Progress only for a person watching: logs and --json stay clean otherwise.
        progress = DrainProgress() if sys.stderr.isatty() and not args.json else None
        for ds in datasets:
            reports.append(
                await drain(
                    engine,
                    ds,
                    dry_run=args.dry_run,
                    reseed=args.reseed,
                    from_archive=args.from_archive,
                    progress=progress,
                )
            )
    if args.json:
        print(json.dumps({"datasets": {r.dataset: r.as_json() for r in reports}}))
    else:
        for r in reports:
            print(_drain_line(r))
    return EXIT_OK if all(r.ok for r in reports) else EXIT_FAIL


def _drain_line(r: DrainReport) -> str:
    prefix = f"{r.dataset}: " + ("(dry run) " if r.dry_run else "")
    if r.locked:
        return prefix + "skipped, another process is draining it"
    parts = [
        f"{r.files_applied if not r.dry_run else len(r.files)} file(s)",
        f"{r.rows_upserted} row(s) upserted",
        f"{r.rows_rejected} rejected",
        f"watermark {r.watermark or '-'}",
    ]
    if r.files_replayed:
        parts.insert(1, f"{r.files_replayed} of them replayed from processed/")
    line = prefix + ", ".join(parts)
    if r.blocked:
        line += f"\n  BLOCKED at {r.blocked.key}: {r.blocked.reason}"
    if r.failed:
        line += f"\n  FAILED ({r.failed_stage}): {r.failed}"
    for f in r.files if r.dry_run else []:
        line += "\n  " + json.dumps(f)
    return line


async def cmd_status(config: Config, args: argparse.Namespace) -> int:
    detailed = not args.json
    async with engine_for(config, need_source=False) as engine:
        report = await status.datasets(engine, config, detailed=detailed)
        geo = await status.geocoder(engine, config)
        extra = dict(geo.rows()) if detailed else {}
        writers = await status.other_writers(engine)
    # One line per distinct failure: a bucket that is down (or a certificate that does
    # not verify) is one problem, not one per dataset.
    by_error: dict[str, list[str]] = {}
    for name, error in report.source_errors.items():
        by_error.setdefault(str(error), []).append(name)
    for error, names in by_error.items():
        # CONTRACT: status exits 0. Without the bucket it still says what the database
        # knows, and says on stderr that the source half is as last seen.
        print(
            f"fleetticketsd: {', '.join(names)}: {error}; newest key, pending files and lag "
            "are as the last listing saw them",
            file=sys.stderr,
        )
    if writers:
        # The one way to defeat the stale-write guard: two writers without a shared lock.
        print(f"fleetticketsd: WARNING: {foreign_write_warning(writers)}", file=sys.stderr)
        extra["other writers"] = "; ".join(w.describe() for w in writers[:3])
    if args.json:
        print(json.dumps({"datasets": report.datasets, "geocoder": geo.as_json()}))
        return EXIT_OK
    print(render_status(report.datasets, extra))
    return EXIT_OK


async def cmd_load_file(config: Config, args: argparse.Namespace) -> int:
    ds = _datasets(config, [args.dataset])[0]
    async with engine_for(config, need_source=False) as engine:
        await _check_datasets(engine, [ds])
        try:
            res = await load_file(engine, ds, args.path, dry_run=args.dry_run)
        except ActionError as exc:
            raise CommandError(str(exc)) from exc
    if res.already_applied:
        print(f"{res.key}: already applied (same content); nothing to do")
        return EXIT_OK
    if res.error:
        print(f"fleetticketsd: rejected: {res.error}", file=sys.stderr)
        return EXIT_FAIL
    assert res.result is not None
    print(("(dry run) " if args.dry_run else "") + json.dumps(res.result.as_json()))
    return EXIT_OK


async def cmd_skip(config: Config, args: argparse.Namespace) -> int:
    ds = _datasets(config, [args.dataset])[0]
    async with engine_for(config) as engine:
        try:
            res = await skip(engine, ds, args.key, args.reason)
        except (ActionError, SourceError) as exc:
            raise CommandError(str(exc)) from exc
    print(
        f"{res.key}: recorded as skipped"
        + ("; moved to quarantine/" if res.moved else "")
        + (f"; {ds.name} unblocked" if res.unblocked else "")
    )
    return EXIT_OK


async def cmd_check_config(config: Config, args: argparse.Namespace) -> int:
    print(json.dumps(redacted(config), indent=2))
    # A certificate that does not verify is the configuration's fault (a CA not set):
    # an error. An endpoint that does not answer is reported but does not make a valid
    # file invalid; tables can only be checked against a live database.
    async with S3Source(config.s3, max_attempts=1) as source:
        try:
            await source.check()
        except SourceError as exc:
            if futile_tls(exc):
                raise CommandError(
                    f"configuration error: {status.unreachable(config, exc)}", EXIT_CONFIG
                ) from exc
            print(f"note: {status.unreachable(config, exc)}", file=sys.stderr)
        except Exception as exc:
            # (half a key pair raises a TypeError while signing); the file is still valid.
            print(f"note: bucket not checked: {type(exc).__name__}: {exc}", file=sys.stderr)
    try:
        pool = await db.create_pool(config.database)
    except db.DatabaseError as exc:
        if exc.tls:
            raise CommandError(f"configuration error: {exc}", EXIT_CONFIG) from exc
        print(f"note: database not reachable, tables not checked: {exc}", file=sys.stderr)
        return EXIT_OK
    try:
        async with pool.acquire() as conn:
            for ds in config.datasets.values():
                problem = await db.check_dataset(conn, ds)
                if problem:
                    raise CommandError(f"configuration error: {problem}", EXIT_CONFIG)
    finally:
        await pool.close()
    print("configuration valid; dataset tables exist", file=sys.stderr)
    return EXIT_OK


# --- geocoding (issue 4) ---------------------------------------------------------------


async def cmd_geocode(config: Config, args: argparse.Namespace) -> int:
    from fleetticketsd.geocoding.geocode import Geocoder

    if args.limit is not None and args.limit < 0:
        raise CommandError("--limit must not be negative", EXIT_CONFIG)
    both = args.clusters == args.locations
    pool = await _pool(config)
    try:
        async with pool.acquire() as conn:
            if await db.pending_migrations(conn, db.load_migrations()):
                raise CommandError("database schema is behind: run `fleetticketsd migrate`")
        async with Geocoder(config.geocoder, pool, Metrics()) as geocoder:
            report = await geocoder.run_pass(
                clusters=both or args.clusters, locations=both or args.locations, limit=args.limit
            )
            remaining = await geocoder.budget_remaining()
    finally:
        await pool.close()
    if args.json:
        print(json.dumps({**report.as_json(), "budget_remaining": remaining}))
    else:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(report.outcomes.items())) or "none"
        print(
            f"geocode: {report.requests} request(s) ({outcomes}), {report.cache_hits} cached, "
            f"{report.left} left in queue, budget remaining today {remaining}"
            + (f"; stopped: {report.stopped}" if report.stopped else "")
        )
    return EXIT_OK


async def cmd_gazetteer(config: Config, args: argparse.Namespace) -> int:
    from fleetticketsd.geocoding.geocode import set_gazetteer

    values = args.values
    if len(values) not in (3, 4):
        raise CommandError("usage: gazetteer set CLUSTER [LOCATION] LAT LON", EXIT_CONFIG)
    try:
        lat, lon = float(values[-2]), float(values[-1])
    except ValueError:
        raise CommandError(f"LAT LON must be numbers: {values[-2]!r} {values[-1]!r}", EXIT_CONFIG) from None
    cluster, location = values[0], (values[1] if len(values) == 4 else None)
    pool = await _pool(config)
    try:
        async with pool.acquire() as conn:
            await db.require_layout(conn)
            done = await set_gazetteer(conn, cluster, location, lat, lon, config.geocoder)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_CONFIG) from exc
    finally:
        await pool.close()
    what = f"{cluster} / {done.location}" if done.location else cluster
    print(f"{what}: set to {lat}, {lon} (verified); {done.tickets} ticket(s) now use it")
    if location is None:
        print(
            f"{cluster}: its geocoded locations judged against the new centroid "
            f"({config.geocoder.max_distance_km:g} km): {done.judged.describe()}"
        )
    return EXIT_OK


COMMANDS: dict[str, Any] = {
    "geocode": cmd_geocode,
    "gazetteer": cmd_gazetteer,
    "migrate": cmd_migrate,
    "drain": cmd_drain,
    "status": cmd_status,
    "load-file": cmd_load_file,
    "skip": cmd_skip,
    "check-config": cmd_check_config,
}

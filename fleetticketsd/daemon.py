"""`fleetticketsd run`: the always-on service around the engine.

One asyncio process. The main loop waits for a stop signal while named side tasks
run beside it: the HTTP endpoint, the source watcher (keeps lag honest while the
cron sleeps) and the reload handler. A side task that dies stops the daemon — a
half-alive process that answers /healthz but no longer drains is worse than a
restart. Drains run as APScheduler cron jobs, one job per dataset, so one dataset
never waits for another; the dataset's advisory lock keeps replicas apart.

Shutdown (SIGTERM/SIGINT): stop triggering, let each drain finish the file it is
in, and after ``shutdown_grace_period_s`` cancel what is left — a cancelled file
rolls back as a whole. Then close the pool and exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
from datetime import datetime
from typing import Any

import asyncpg
import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_result,
    stop_after_attempt,
    wait_exponential,
)

from fleetticketsd import logs
from fleetticketsd.config import Config, ConfigError, DatasetConfig, cron_trigger, load
from fleetticketsd.database import adopt, db, dbguard
from fleetticketsd.database.layout import LayoutError
from fleetticketsd.geocoding.geocode import Geocoder
from fleetticketsd.ingest import ledger
from fleetticketsd.ingest.drain import DrainReport, Engine, drain
from fleetticketsd.ingest.source import S3Source, SourceError
from fleetticketsd.metrics import Metrics
from fleetticketsd.serving import http as http_endpoint
from fleetticketsd.serving.page import StatusPage
from fleetticketsd.serving.status import Listings

log = structlog.get_logger("fleetticketsd.daemon")


def run_daemon(config: Config, config_path: str) -> int:
    logs.configure(config.logging.level, config.logging.format)
    return asyncio.run(Daemon(config, config_path).run())


class Daemon:
    def __init__(self, config: Config, config_path: str, metrics: Metrics | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics = metrics or Metrics()
        self.stopping = asyncio.Event()
        self.engine: Engine | None = None
        self.scheduler: AsyncIOScheduler | None = None
        self._running: dict[str, asyncio.Task[Any]] = {}
        # Datasets whose watcher saw files while their pass ran: another pass follows.
        self._again: set[str] = set()
        self._reload_requested = asyncio.Event()
        self._side_tasks: dict[str, asyncio.Task[None]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.geocoder: Geocoder | None = None
        self._foreign_write_seen: datetime | None = None
        # The source watcher's listings: the status page reads them instead of the bucket.
        self.listings = Listings()

    # --- lifecycle -------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # Before anything slow: a SIGTERM during start-up must still stop us cleanly.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)
        self.metrics.config_reload_ts.set(time.time())
        # Counted at scrape time, from the loop that serves the scrape: free between scrapes.
        self.metrics.asyncio_tasks.set_function(lambda: len(asyncio.all_tasks(loop)))
        for ds in self.config.enabled_datasets:
            self.metrics.init_dataset(ds.name)

        page = StatusPage(
            lambda: self.engine,
            self.listings,
            lambda: [n for n, t in self._running.items() if not t.done()],
            lambda: getattr(self, "_last_db_error", "not connected yet"),
            self.config_path,
        )
        runner = await http_endpoint.start(
            http_endpoint.make_app(self.metrics.registry, self._liveness, self._readiness, page.handle),
            self.config.server.host,
            self.config.server.port,
        )
        log.info("listening", address=self.config.server.listen, version=_version())
        exit_code = 0
        try:
            self.engine = await self._build_engine(self.config, None)
            if self.engine is None:
                return 0  # stopped while waiting for the database
            await self._restore_last_success()
            await self._check_foreign_writes()
            self.scheduler = AsyncIOScheduler(timezone=self.config.schedule.timezone)
            self.scheduler.start()
            for ds in self.config.enabled_datasets:
                self._schedule(ds, run_now=True)
            self._side_tasks = {
                "source-watcher": asyncio.create_task(self._watch_source(), name="source-watcher"),
                "reloader": asyncio.create_task(self._reloader(), name="reloader"),
            }
            if self.config.geocoder.enabled:
                # Geocoding (issue 4): a side task over the current engine's pool (a reload
                # may replace it). It refills its queue from the database at start-up and
                # after each drain pass (see _drain_job), not per file: drain.py stays
                # untouched, and one refill query covers every file the pass applied.
                self.geocoder = Geocoder(self.config.geocoder, self._geocoder_pool, self.metrics)
                self._side_tasks["geocoder"] = asyncio.create_task(
                    self.geocoder.run(self.stopping), name="geocoder"
                )
            exit_code = await self._monitor()
        finally:
            await self._shutdown()
            await runner.cleanup()
        log.info("stopped", exit_code=exit_code)
        return exit_code

    def _request_stop(self, sig: signal.Signals) -> None:
        if not self.stopping.is_set():
            log.info("stop requested", signal=sig.name)
        self.stopping.set()

    async def _monitor(self) -> int:
        """Wait for a stop request; a side task that ends by itself is a failure."""
        stop = asyncio.create_task(self.stopping.wait(), name="stop")
        try:
            done, _ = await asyncio.wait(
                [stop, *self._side_tasks.values()], return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stop.cancel()
        for name, task in self._side_tasks.items():
            if task in done:
                exc = task.exception() if not task.cancelled() else None
                log.error("side task stopped unexpectedly; shutting down", task=name, error=repr(exc))
                self.stopping.set()
                return 1
        return 0

    async def _shutdown(self) -> None:
        self.stopping.set()
        # Pause, not shut down, first: APScheduler's shutdown cancels the coroutines
        # of running jobs, and a drain must get its grace period.
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.pause()
        for task in self._side_tasks.values():
            task.cancel()
        running = [t for t in self._running.values() if not t.done()]
        if running:
            grace = self.config.daemon.shutdown_grace_period_s
            log.info("waiting for in-flight drains", count=len(running), grace_s=grace)
            _, late = await asyncio.wait(running, timeout=grace)
            for task in late:
                log.warning("grace period over: cancelling drain; its file rolls back", task=task.get_name())
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=10)
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        await asyncio.gather(*self._side_tasks.values(), return_exceptions=True)
        if self._closing:
            await asyncio.wait(self._closing, timeout=10)
        if self.engine is not None:
            await self._close_engine(self.engine, self.engine)

    # --- dependencies ----------------------------------------------------------------

    async def _build_engine(self, config: Config, old: Engine | None) -> Engine | None:
        """Pool and S3 client for ``config``, reusing ``old``'s where settings are unchanged.

        At start-up (no ``old``) the database may not be up yet (compose starts
        everything at once): keep trying, with the daemon alive and /readyz saying
        why. On a reload, one attempt: a new database that does not answer fails the
        reload (DatabaseError) and the daemon stays on the old one.
        """
        pool = old.pool if old is not None and old.config.database == config.database else None
        attempt = 0
        while pool is None:
            try:
                pool = await db.create_pool(config.database)
            except db.DatabaseError as exc:
                if old is not None:
                    raise
                attempt += 1
                self._last_db_error = str(exc)
                log.warning("database not reachable; retrying", error=str(exc), attempt=attempt)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), timeout=min(30.0, 2.0**attempt))
                if self.stopping.is_set():
                    return None
        if old is not None and old.config.s3 == config.s3:
            source = old.source
        else:
            source = S3Source(config.s3, on_retry=self.metrics.s3_retry)
            await source.__aenter__()
        drift = old.drift_logged if old is not None else set()
        engine = Engine(config, pool, source, self.metrics, drift)
        if old is not None and old.config.database == config.database and old.source is source:
            # Same database, same bucket: what the last passes saw of each watermark
            # still holds (another database's or bucket's would not).
            engine.replays = old.replays
        return engine

    async def _restore_last_success(self) -> None:
        """Start the no-successful-pass clock where the last process left it (or now),
        so a daemon that never succeeds after a restart still trips the alert."""
        assert self.engine is not None
        known: dict[str, float] = {}
        with contextlib.suppress(*DB_ERRORS):
            async with self.engine.pool.acquire() as conn:
                known = {r["dataset"]: r["at"].timestamp() for r in await conn.fetch(ledger.LAST_SUCCESS)}
        for ds in self.config.enabled_datasets:
            self.metrics.succeeded_at(ds.name, known.get(ds.name, time.time()))

    async def _check_foreign_writes(self) -> None:
        """Warn while another program writes the tables taken over from the legacy loader:
        at start, and again whenever it has written since the last warning."""
        assert self.engine is not None
        try:
            async with self.engine.pool.acquire() as conn:
                writes = await adopt.foreign_writes(conn)
        except DB_ERRORS as exc:
            log.warning("could not check for other writers", error=str(exc))
            return
        self.metrics.foreign_writes.set(sum(w.statements for w in writes))
        newest = max((w.last_at for w in writes), default=None)
        if newest is not None and newest != self._foreign_write_seen:
            self._foreign_write_seen = newest
            log.warning(adopt.foreign_write_warning(writes))

    async def _table_problem(self, engine: Engine, ds: DatasetConfig) -> str | None:
        async with dbguard.acquire(engine.pool, engine.config.database.acquire_timeout_s) as conn:
            return await db.check_dataset(conn, ds)

    async def _close_engine(self, engine: Engine, keep: Engine) -> None:
        if engine.pool is not keep.pool or engine is keep:
            try:
                # close() waits for every connection to be released; a rollback stuck
                # on a dead database must not hang the shutdown.
                await asyncio.wait_for(engine.pool.close(), timeout=10)
            except TimeoutError:
                engine.pool.terminate()
        if engine.source is not keep.source or engine is keep:
            await engine.source.__aexit__(None, None, None)

    # --- drains ------------------------------------------------------------------------

    def _schedule(self, ds: DatasetConfig, run_now: bool) -> None:
        assert self.scheduler is not None
        cfg = self.config
        trigger = cron_trigger(cfg.cron_for(ds), cfg.schedule.timezone)
        kwargs: dict[str, Any] = {}
        if run_now:
            # Catch up right after a deploy instead of waiting for the first cron fire.
            kwargs["next_run_time"] = datetime.now(trigger.timezone)
        self.scheduler.add_job(
            self._drain_job,
            trigger,
            args=[ds.name],
            id=ds.name,
            name=f"drain {ds.name}",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=int(cfg.daemon.misfire_grace_time_s),
            replace_existing=True,
            **kwargs,
        )
        log.info("scheduled", dataset=ds.name, cron=cfg.cron_for(ds), timezone=cfg.schedule.timezone)

    def _drain_now(self, name: str) -> None:
        """Start the dataset's pass now (drain_on_arrival): through the scheduler, so it
        stays the one pass of that dataset at a time; if one runs, another follows it."""
        if self.scheduler is None or self.stopping.is_set():
            return
        running = self._running.get(name)
        if running is not None and not running.done():
            self._again.add(name)  # files that landed after its listing
            return
        job = self.scheduler.get_job(name)
        if job is None:
            return
        now = datetime.now(job.trigger.timezone)
        if job.next_run_time is not None and job.next_run_time <= now:
            return  # due already
        log.info("files pending: draining now", dataset=name)
        job.modify(next_run_time=now)

    async def _drain_job(self, name: str) -> None:
        if self.stopping.is_set() or self.engine is None:
            return
        task = asyncio.current_task()
        assert task is not None
        self._running[name] = task
        self._again.discard(name)
        try:
            await self._drain_with_retries(name)
        except asyncio.CancelledError:
            log.warning("drain cancelled", dataset=name)
        except Exception:  # a bug: keep the daemon and the other datasets alive
            log.exception("drain crashed", dataset=name)
            self.metrics.poll_failures.labels(name, "apply").inc()
        finally:
            self._running.pop(name, None)
            if self.geocoder is not None:
                self.geocoder.notify()  # new tickets may need places
            if name in self._again:
                # Released by the scheduler only once this returns: run from the loop.
                asyncio.get_running_loop().call_soon(self._drain_now, name)

    async def _drain_with_retries(self, name: str) -> DrainReport | None:
        cfg = self.config.daemon

        def failed(report: DrainReport | None) -> bool:
            return (
                report is not None
                and report.failed is not None
                and report.retryable
                and not self.stopping.is_set()
            )

        report: DrainReport | None = None
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_result(failed),
                stop=stop_after_attempt(cfg.pass_retry_attempts),
                wait=wait_exponential(multiplier=1, max=cfg.pass_retry_max_wait_s),
                sleep=self._interruptible_sleep,
            ):
                with attempt:
                    engine = self.engine  # a reload may swap it between attempts
                    ds = self.config.datasets.get(name)
                    if engine is None or ds is None or not ds.enabled:
                        return None
                    # Checked per pass, not once: a table created by a later
                    # `migrate` heals the dataset without a restart.
                    try:
                        problem = await self._table_problem(engine, ds)
                    except DB_ERRORS:
                        problem = None  # the database failed: the pass will say why, and is retried
                    if problem:
                        log.error("dataset not drained: configuration error", dataset=name, error=problem)
                        self.metrics.poll_failures.labels(name, "apply").inc()
                        return None
                    report = await drain(engine, ds, stop=self.stopping)
                # The documented way to let retry_if_result see the block's result.
                if attempt.retry_state.outcome is not None and not attempt.retry_state.outcome.failed:
                    attempt.retry_state.set_result(report)
        except RetryError:
            log.error("drain pass failed after retries; next cron fire tries again", dataset=name)
        if report is not None and report.failed is not None and not report.retryable:
            log.error(
                "drain pass not retried: retrying cannot help until someone fixes the cause; "
                "the next cron fire tries again",
                dataset=name,
                stage=report.failed_stage,
            )
        return report

    async def _interruptible_sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)

    # --- side tasks ----------------------------------------------------------------------

    async def _watch_source(self) -> None:
        """List changes/ on a short interval so lag and pending files stay current."""
        while not self.stopping.is_set():
            await self._interruptible_sleep(self.config.daemon.source_check_interval_s)
            if self.stopping.is_set() or self.engine is None:
                return
            await self._check_foreign_writes()
            # Datasets are checked a few at a time: with many datasets and a distant
            # bucket, one after another would make the last one's check (and its
            # drain on arrival) wait for all the others' round trips.
            limit = asyncio.Semaphore(WATCH_CONCURRENCY)
            await asyncio.gather(*(self._check_dataset(ds, limit) for ds in self.config.enabled_datasets))

    async def _check_dataset(self, ds: DatasetConfig, limit: asyncio.Semaphore) -> None:
        engine = self.engine
        if engine is None:
            return
        async with limit:
            with structlog.contextvars.bound_contextvars(dataset=ds.name):
                try:
                    seen = await self.listings.refresh(engine, ds)
                    # A blocked dataset always has pending files: its retries
                    # stay with the cron, not with every listing.
                    on_arrival = self.config.daemon.drain_on_arrival
                    if on_arrival and seen["pending_files"] and not seen["blocked"]:
                        self._drain_now(ds.name)
                except WATCH_ERRORS as exc:
                    log.warning("source check failed", error=str(exc))
                except Exception:  # e.g. a client closed under it by a reload
                    # Only gauges ride on this; it must never take the daemon down.
                    log.exception("source check failed unexpectedly")

    async def _reloader(self) -> None:
        while not self.stopping.is_set():
            await self._reload_requested.wait()
            self._reload_requested.clear()
            if self.stopping.is_set():
                return
            await self.reload()

    async def reload(self) -> bool:
        """SIGHUP: re-read the config; on any error keep running on the old one."""
        try:
            new = load(self.config_path)
        except ConfigError as exc:
            self.metrics.config_reload_ok.set(0)
            log.error(
                "config reload failed; keeping the running configuration",
                key=exc.key,
                error=str(exc),
            )
            return False
        old_config, old_engine = self.config, self.engine
        assert old_engine is not None and self.scheduler is not None
        if new.server != old_config.server:
            log.warning("server.listen changed: takes effect on restart", listen=new.server.listen)
            new = dataclasses.replace(new, server=old_config.server)
        engine: Engine | None = None
        try:
            engine = await self._build_engine(new, old_engine)
            assert engine is not None
            for ds in new.enabled_datasets:
                problem = await self._table_problem(engine, ds)
                if problem:
                    raise ConfigError(f"datasets.{ds.name}.table", problem.split(": ", 1)[-1])
        except RELOAD_ERRORS as exc:
            self.metrics.config_reload_ok.set(0)
            log.error(
                "config reload failed; keeping the running configuration",
                key=getattr(exc, "key", "database"),
                error=str(exc),
            )
            if engine is not None:
                await self._close_engine(engine, old_engine)
            return False
        self.config, self.engine = new, engine
        if new.logging != old_config.logging:
            logs.configure(new.logging.level, new.logging.format)
        # Pool or client replaced: close the old ones once drains using them finish.
        if engine.pool is not old_engine.pool or engine.source is not old_engine.source:
            running = [t for t in self._running.values() if not t.done()]
            closing = asyncio.create_task(self._close_later(old_engine, engine, running))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        old_ds = {d.name: d for d in old_config.enabled_datasets}
        new_ds = {d.name: d for d in new.enabled_datasets}
        for name in old_ds.keys() - new_ds.keys():
            with contextlib.suppress(Exception):
                self.scheduler.remove_job(name)
            self.metrics.remove_dataset(name)
            log.info("dataset removed", dataset=name)
        tz_changed = new.schedule.timezone != old_config.schedule.timezone
        for name, ds in new_ds.items():
            if name not in old_ds:
                self.metrics.init_dataset(name)
                self._schedule(ds, run_now=True)
            elif tz_changed or new.cron_for(ds) != old_config.cron_for(old_ds[name]):
                self.scheduler.reschedule_job(
                    name,
                    trigger=cron_trigger(new.cron_for(ds), new.schedule.timezone),
                )
                log.info("rescheduled", dataset=name, cron=new.cron_for(ds))
        if new.geocoder.enabled != old_config.geocoder.enabled:
            log.warning("geocoder.enabled changed: takes effect on restart", enabled=new.geocoder.enabled)
        if self.geocoder is not None and new.geocoder != old_config.geocoder:
            self.geocoder.reconfigure(new.geocoder)  # rate, budget, distance: from the next request
        self.metrics.config_reload_ok.set(1)
        self.metrics.config_reload_ts.set(time.time())
        log.info("configuration reloaded", datasets=sorted(new_ds))
        return True

    async def _close_later(self, old: Engine, new: Engine, running: list[asyncio.Task[Any]]) -> None:
        if running:
            await asyncio.wait(running)
        await self._close_engine(old, new)

    def _geocoder_pool(self) -> asyncpg.Pool:
        assert self.engine is not None
        return self.engine.pool

    # --- probes ----------------------------------------------------------------------------

    def _liveness(self) -> str | None:
        if self.scheduler is not None and not self.scheduler.running and not self.stopping.is_set():
            return "scheduler is not running"
        dead = [n for n, t in self._side_tasks.items() if t.done()]
        if dead and not self.stopping.is_set():
            return f"side task stopped: {', '.join(dead)}"
        return None

    async def _readiness(self) -> dict[str, str | None]:
        checks: dict[str, str | None] = {"config": None, "database": None, "migrations": None}
        engine = self.engine
        if engine is None:
            checks["database"] = getattr(self, "_last_db_error", "not connected yet")
            checks["migrations"] = "unknown: database not connected"
            return checks
        try:
            async with asyncio.timeout(3):
                async with engine.pool.acquire() as conn:
                    read_only = await dbguard.read_only_reason(conn)
                    pending = await db.pending_migrations(conn, db.load_migrations())
            if read_only:
                checks["database"] = f"read-only ({read_only}): every file fails until it accepts writes"
                await engine.pool.expire_connections()  # the next probe and pass reconnect
            if pending:
                checks["migrations"] = f"{len(pending)} pending: run `fleetticketsd migrate`"
        except LayoutError as exc:
            checks["migrations"] = str(exc)
        except READY_ERRORS as exc:
            checks["database"] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            checks["migrations"] = "unknown: database not reachable"
        return checks


# Failures of the database or the network, as opposed to bugs.
DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    db.DatabaseError,
    dbguard.DatabaseFault,
)


def _version() -> str:
    from fleetticketsd import __version__

    return __version__


WATCH_ERRORS: tuple[type[BaseException], ...] = (SourceError, *DB_ERRORS)
# Source checks in flight at once (each holds a pooled connection for its status query).
WATCH_CONCURRENCY = 4
READY_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *DB_ERRORS)
RELOAD_ERRORS: tuple[type[BaseException], ...] = (ConfigError, *DB_ERRORS)

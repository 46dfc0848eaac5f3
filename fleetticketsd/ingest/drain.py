"""A dataset's drain: one pass that applies every pending change file, in name order.

The pass, top to bottom:
  1. take the dataset's advisory lock (semantic 7) — another process draining it
     means this pass has nothing to do;
  2. list ``changes/`` page by page in the background and ``processed/`` after the
     watermark for files a restored database lacks (replay.py); each page is looked up
     in the ledger as the pass reaches it (stream.py), so a 100,000-file backlog starts
     applying after its first page;
  3. finish what an earlier pass decided but did not get to move: applied files
     still in ``changes/`` are archived, never re-applied (semantic 3); skipped or
     quarantined ones go back to ``quarantine/``;
  4. apply the rest oldest name first — a blocked key first of all — each in its own
     transaction (apply.py), archiving each after its commit.
A bad file either blocks the dataset at its key or is quarantined (semantic 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog

from fleetticketsd.config import Config, DatasetConfig
from fleetticketsd.database.dbguard import (
    DatabaseFault,
    acquire,
    describe,
    end_session,
    guarded,
    is_read_only,
    session_ended,
)
from fleetticketsd.ingest import history, ledger, replay
from fleetticketsd.ingest.apply import FileResult, apply_file, ensure_incoming
from fleetticketsd.ingest.feed import BadFile, file_name, key_timestamp
from fleetticketsd.ingest.ledger import Blocked
from fleetticketsd.ingest.pipeline import Archiver, Deletes, Prefetcher
from fleetticketsd.ingest.s3errors import futile
from fleetticketsd.ingest.source import ChangeFile, S3Source, SourceError
from fleetticketsd.ingest.stream import PageReader, PassFiles
from fleetticketsd.metrics import Metrics

log = structlog.get_logger("fleetticketsd.ingest.drain")

# The database refusing a value (class 22) or hitting a limit (class 54, e.g. a btree
# entry too large): deterministic for the same bytes, unlike a lost connection.
DATA_ERRORS: tuple[type[BaseException], ...] = (asyncpg.DataError, asyncpg.ProgramLimitExceededError)

# Errors that mean "the database or the network failed", not "this code is wrong".
DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # A pooled session the server just ended can trip asyncpg's own state checks.
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
    DatabaseFault,
)


@dataclass
class Engine:
    """What a drain needs, passed in: nothing here is reached through a global."""

    config: Config
    pool: asyncpg.Pool
    source: S3Source
    metrics: Metrics
    # Schema drift is logged once per dataset and process, not once per file.
    drift_logged: set[tuple[str, tuple[str, ...]]] = field(default_factory=set)
    # When a pass must look in processed/ for files a restore took away (replay.py).
    replays: replay.Watch = field(default_factory=replay.Watch)


class DrainFailed(Exception):
    """``retryable`` is False when retrying the pass soon cannot help (the bucket refused
    the credentials): the daemon then waits for the next cron fire."""

    def __init__(self, stage: str, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.stage = stage
        self.retryable = retryable


def source_failed(stage: str, exc: SourceError) -> DrainFailed:
    return DrainFailed(stage, str(exc), retryable=not (futile(exc) or futile(exc.__cause__)))


PASS_ERRORS: tuple[type[BaseException], ...] = (DrainFailed, *DB_ERRORS)


@dataclass
class DrainReport:
    dataset: str
    files_applied: int = 0
    rows_upserted: int = 0
    rows_rejected: int = 0
    blocked: Blocked | None = None
    watermark: str | None = None
    locked: bool = False
    failed: str | None = None
    failed_stage: str | None = None
    retryable: bool = True
    # Files applied again from processed/ (a restored database lacked them).
    files_replayed: int = 0
    # The file the pass is at: the one in flight, else the next one due.
    at_key: str | None = None
    dry_run: bool = False
    files: list[dict[str, Any]] = field(default_factory=list)
    # Time the applies waited for prefetched bytes, and the first commit's time since
    # the pass began (None: nothing committed): what bench/speed.py reports.
    fetch_wait_s: float = 0.0
    first_commit_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.failed is None and self.blocked is None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "files_applied": self.files_applied,
            "rows_upserted": self.rows_upserted,
            "rows_rejected": self.rows_rejected,
            "blocked": self.blocked.as_json() if self.blocked else None,
            "watermark": self.watermark,
        }
        if self.locked:
            out["skipped"] = "another process is draining this dataset"
        if self.failed:
            out["error"] = {"stage": self.failed_stage, "key": self.at_key, "message": self.failed}
        if self.dry_run:
            out["files"] = self.files
        return out


Progress = Callable[[DatasetConfig, int, int, FileResult], None]


def is_late(key: str, watermark: str | None) -> bool:
    return watermark is not None and file_name(key) < file_name(watermark)


def lag_seconds(newest: ChangeFile | None, watermark: str | None, pending: list[ChangeFile]) -> float:
    """Newest key's time minus the watermark's; 0 when nothing newer waits.

    With no watermark yet (first run), the oldest pending file stands in for it, so
    a fresh install that has not caught up does not report 0.
    """
    return _lag(newest, watermark, pending[0] if pending else None)


def _lag(newest: ChangeFile | None, watermark: str | None, oldest_pending: ChangeFile | None) -> float:
    if newest is None or oldest_pending is None:
        return 0.0
    reference = key_timestamp(watermark) if watermark else oldest_pending.timestamp
    if reference is None:
        return 0.0
    return max(0.0, (newest.timestamp - reference).total_seconds())


def error_document(dataset: DatasetConfig, file: ChangeFile, reason: str, line: int | None) -> dict[str, Any]:
    return {
        "dataset": dataset.name,
        "key": file.key,
        "etag": file.etag,
        "error": reason,
        "line": line,
        "quarantined_at": datetime.now(UTC).isoformat(),
    }


async def drain(
    engine: Engine,
    dataset: DatasetConfig,
    *,
    dry_run: bool = False,
    reseed: bool = False,
    from_archive: bool = False,
    progress: Progress | None = None,
    stop: asyncio.Event | None = None,
) -> DrainReport:
    """One pass over one dataset. Never raises for an operational failure: the report says.

    ``reseed`` forgets the ledger and watermark and re-applies changes/; with
    ``from_archive`` the dataset is rebuilt from nothing, from processed/ and changes/.
    ``stop`` is checked between files: a shutdown lets the file in flight commit and
    leaves the rest for the next start.
    """
    report = DrainReport(dataset.name, dry_run=dry_run)
    reseed_from = ("archive" if from_archive else "changes") if reseed or from_archive else None
    started = time.monotonic()
    with structlog.contextvars.bound_contextvars(dataset=dataset.name):
        try:
            async with acquire(engine.pool, engine.config.database.acquire_timeout_s) as conn:
                if not await ledger.try_lock(conn, dataset.name):
                    log.info("drain skipped: another process holds the dataset lock")
                    report.locked = True
                    return report
                try:
                    if dry_run:
                        # Everything, ledger and block included, happens in one
                        # transaction that is rolled back: later files see the effect
                        # of earlier ones, and nothing stays.
                        tx = conn.transaction()
                        await tx.start()
                        try:
                            await _pass(engine, conn, dataset, report, dry_run, reseed_from, progress, stop)
                        finally:
                            if not session_ended(conn):
                                await tx.rollback()
                    else:
                        await history.begin_pass(conn, dataset)
                        await _pass(engine, conn, dataset, report, dry_run, reseed_from, progress, stop)
                        await history.end_pass(conn, dataset)
                except BaseException:
                    # A pass that stops on an error may stop mid-statement. Ending the
                    # session (not unlocking it and handing it back to the pool as it is)
                    # makes the server roll back whatever was open and free the lock.
                    end_session(conn)
                    raise
                with contextlib.suppress(*DB_ERRORS):
                    await ledger.unlock(conn, dataset.name)
        except PASS_ERRORS as exc:
            if isinstance(exc, DrainFailed):
                report.failed, report.failed_stage = str(exc), exc.stage
                report.retryable = exc.retryable
            else:
                where = report.at_key or "database"
                report.failed, report.failed_stage = f"{where}: {describe(exc)}", "apply"
            if is_read_only(exc):
                # Every pooled session may be on the server that turned read-only (a
                # failover): reconnect them all, wherever the URL now leads.
                await engine.pool.expire_connections()
        if report.failed:
            engine.metrics.poll_failures.labels(dataset.name, report.failed_stage or "apply").inc()
            log.error("drain pass failed", stage=report.failed_stage, error=report.failed, key=report.at_key)
        if not dry_run and not report.locked:
            await _record_pass(engine, report)
        elapsed = time.monotonic() - started
        if not dry_run and not report.locked:
            engine.metrics.poll_duration.labels(dataset.name).observe(elapsed)
            if report.ok:
                engine.metrics.succeeded_at(dataset.name, time.time())
        log.info(
            "drain pass done" if report.ok else "drain pass stopped",
            files_applied=report.files_applied,
            rows_upserted=report.rows_upserted,
            rows_rejected=report.rows_rejected,
            watermark=report.watermark,
            blocked=report.blocked.key if report.blocked else None,
            dry_run=dry_run,
            seconds=round(elapsed, 3),
        )
    return report


async def _record_pass(engine: Engine, report: DrainReport) -> None:
    if report.failed:
        outcome = f"failed at {report.failed_stage}: {report.failed}"
    elif report.blocked:
        outcome = f"blocked at {file_name(report.blocked.key)}"
    else:
        outcome = "ok"
    # Best effort: when the database is what failed, there is nowhere to write this.
    with contextlib.suppress(*DB_ERRORS):
        async with acquire(engine.pool, engine.config.database.acquire_timeout_s) as conn:
            await conn.execute(ledger.RECORD_PASS, report.dataset, outcome[:500], report.files_applied)


async def _pass(
    engine: Engine,
    conn: asyncpg.Connection,
    dataset: DatasetConfig,
    report: DrainReport,
    dry_run: bool,
    reseed: str | None,
    progress: Progress | None,
    stop: asyncio.Event | None,
) -> None:
    m = engine.metrics
    pass_started = time.monotonic()
    source = engine.source
    replayed: list[ChangeFile] = []
    # changes/ as listing pages, read from the start (stream.py): streamed, unless the
    # pass must see the whole listing before its first file (a reseed, or a block
    # whose key goes first).
    listed: list[ChangeFile] = []
    async with contextlib.AsyncExitStack() as stack:
        if reseed is None:
            # The watermark moves only under the lock this pass holds: read it first, and
            # list processed/ after it while changes/ is listed.
            state = await ledger.state(conn, dataset.name)
            look_back = dry_run or engine.replays.due(dataset, state.watermark)
            after: list[ChangeFile] = []
            if state.blocked is None:
                reader = await stack.enter_async_context(
                    PageReader(source.list_pages(dataset.changes_prefix), LISTING_PAGES_AHEAD)
                )
                try:
                    if look_back:
                        (after,) = await _list(replay.candidates(source, dataset, state.watermark))
                except DrainFailed:
                    # As with whole listings, changes/'s error first when both failed.
                    if isinstance(error := await reader.first_error(), SourceError):
                        raise source_failed("list", error) from error
                    raise
            else:
                listed, *rest = await _list(
                    source.list_changes(dataset),
                    *([replay.candidates(source, dataset, state.watermark)] if look_back else []),
                )
                after = rest[0] if rest else []
                reader = await stack.enter_async_context(PageReader(_one_page(listed), LISTING_PAGES_AHEAD))
            replayed = await replay.not_in_ledger(conn, dataset, after)
        else:
            listed, replayed = await _reseed(engine, conn, dataset, reseed)
            reader = await stack.enter_async_context(PageReader(_one_page(listed), LISTING_PAGES_AHEAD))
            state = await ledger.state(conn, dataset.name)
        report.watermark = state.watermark

        first: ChangeFile | None = None
        if state.blocked is not None:
            blocked_key = state.blocked.key
            candidates = [f for f in (*listed, *replayed) if f.key == blocked_key]
            if candidates and candidates[0] in replayed:
                first = candidates[0]
            elif candidates:
                known = await ledger.entries(conn, dataset.name, [blocked_key])
                first = None if (blocked_key, candidates[0].etag) in known else candidates[0]
            if not candidates:
                # The bad file vanished without `skip`: its rows are unaccounted for, so
                # the dataset stays blocked until an operator decides.
                known = await ledger.entries(conn, dataset.name, [f.key for f in listed])
                waiting = [f for f in listed if (f.key, f.etag) not in known]
                due = replay.merge(waiting, replayed)
                report.at_key = due[0].key if due else None
                _observe_source(
                    engine,
                    dataset,
                    listed[-1] if listed else None,
                    len(waiting),
                    waiting[0] if waiting else None,
                    state.watermark,
                )
                await ledger.ensure(conn, dataset.name)
                if not dry_run:
                    await _record_listing(conn, dataset, listed[-1].key if listed else None, len(waiting))
                report.blocked = Blocked(
                    blocked_key,
                    state.blocked.etag,
                    f"{state.blocked.reason} (file no longer under changes/; use `fleetticketsd skip`)",
                    state.blocked.line,
                )
                m.dataset_blocked.labels(dataset.name).set(1)
                return

        ingest = engine.config.ingest
        # Files an earlier pass decided on but did not get to move (semantic 3) are
        # archived as their page is read, each file this pass applies right after its commit.
        decided_now: dict[str, ledger.LedgerEntry] = {}
        deletes = Deletes(source.delete_many)
        archiver = Archiver(
            lambda f: _finish_move(engine, dataset, f, decided_now.get(f.key), deletes),
            ingest.archive_concurrency,
        )

        def decided(f: ChangeFile, entry: ledger.LedgerEntry) -> None:
            if not dry_run:
                decided_now[f.key] = entry
                archiver.submit(f)

        prefetch = Prefetcher(
            source,
            [],
            max_files=ingest.prefetch_files,
            max_bytes=ingest.prefetch_bytes,
            chunk_bytes=ingest.read_chunk_bytes,
        )
        files = PassFiles(
            reader,
            lambda keys: ledger.entries(conn, dataset.name, keys),
            replayed,
            first=first,
            on_decided=decided,
            on_due=prefetch.add,
        )
        # Enough files known ahead to keep the prefetch window full.
        ahead = ingest.prefetch_files + 1
        watermark = state.watermark
        # Files applied but not yet committed: a real pass commits small files in batches
        # (each in its own savepoint, each with its ledger row and watermark advance); a
        # dry run has its one outer transaction already. Only what a commit made durable
        # is counted, logged, reported and archived.
        batch = None if dry_run else _Batch(conn, ingest.commit_batch_files, ingest.commit_batch_s)
        observed = False  # the listing's totals, once it has ended
        seen = False  # the listing as of the first apply, recorded
        total_due = False  # the totals' record, written after that, when no batch is open

        async def record_total() -> None:
            nonlocal total_due
            if seen and total_due and batch is not None and not batch.is_open:
                total_due = False
                await conn.execute(
                    ledger.RECORD_SOURCE_TOTAL, dataset.name, _newest_key(files), files.waiting
                )

        async def commit() -> None:
            if batch is None:
                return
            committed = await batch.commit(report)
            if committed and report.first_commit_s is None:
                report.first_commit_s = time.monotonic() - pass_started
            for a in committed:
                _record_applied(engine, dataset, a, report)
                if progress is not None:
                    progress(dataset, a.number, files.taken + files.known, a.result)
                if not a.replayed:  # a replayed file stays in processed/
                    archiver.submit(a.file)
            await record_total()

        async def take(n: int, wait: bool = True) -> None:
            """More of the listing, when it is there (or ``wait``); its totals at its end."""
            nonlocal observed, total_due
            try:
                await files.fill(n, wait)
            except SourceError as exc:
                await commit()  # the bucket failed, not the database: keep what applied
                raise source_failed("list", exc) from exc
            if files.listed_all and not observed:
                observed = True
                _observe_listing(engine, dataset, files, state.watermark)
                total_due = not dry_run
                await record_total()

        try:
            await take(ahead)
            head = files.peek()
            report.at_key = head.key if head is not None else None
            # The first write of the pass comes only now, so that a database that cannot
            # write (read-only after a failover) fails naming the file that waits. A
            # dataset that has its row is only updated (the listing, just below).
            if dry_run or not state.exists:
                await ledger.ensure(conn, dataset.name)
            if not dry_run:
                # When the pass began to apply: the ledger rows written from now on are the
                # files it dealt with (reporting.fn_freshness). The listing's totals follow
                # when it ends (RECORD_SOURCE_TOTAL); until then, the pages read so far.
                await _record_listing(conn, dataset, _newest_key(files), files.waiting)
                seen, total_due = True, False
                if state.blocked is not None and first is None:
                    # Decided elsewhere (skipped and since moved): nothing blocks any more.
                    await conn.execute(ledger.CLEAR_BLOCKED, dataset.name, state.blocked.key)
            if not observed:
                _observe_listing(engine, dataset, files, state.watermark)
            done = 0
            incoming_ready = False
            while True:
                await take(1)
                f = await files.next()
                if f is None:
                    break
                done += 1
                if stop is not None and stop.is_set():
                    await commit()
                    log.info("stopping between files", remaining=files.known + 1, listed_all=files.listed_all)
                    return
                report.at_key = f.key
                with structlog.contextvars.bound_contextvars(key=f.key):
                    again = files.is_replay(f)
                    if not incoming_ready:
                        # The files' temp table, once a pass rather than once a file, and
                        # before any batch or savepoint is open (apply.py).
                        await ensure_incoming(conn)
                        incoming_ready = True
                    if batch is not None:
                        await batch.open()
                    try:
                        result = await _apply_one(
                            engine, conn, dataset, f, prefetch, watermark, report, dry_run, again
                        )
                    except BadFile as exc:
                        # Its savepoint is rolled back; what came before it commits first,
                        # so that a quarantine move only ever follows a committed ledger row.
                        await commit()
                        await _bad_file(engine, conn, dataset, f, exc, report, dry_run)
                        if report.blocked is not None:
                            return
                        continue
                    except DrainFailed as exc:
                        if exc.stage == "fetch":
                            await commit()  # the bucket failed, not the database: keep what applied
                        raise
                    if batch is None:
                        if progress is not None:
                            progress(dataset, done, files.taken + files.known, result)
                    else:
                        batch.add(_Applied(f, result, watermark, again, done))
                    if not is_late(f.key, watermark):
                        watermark = replay.ledger_key(dataset, f) if again else f.key
                    if batch is None:
                        report.watermark = watermark
                    else:
                        # Pages already listed are looked up now, between files; the bucket
                        # is waited for only when nothing else is due.
                        await take(ahead, wait=False)
                        following = files.peek()
                        if batch.due(following is not None and prefetch.ready(following)):
                            await commit()
        finally:
            report.fetch_wait_s = prefetch.waited_s
            await prefetch.close()
            archiver_failed = await archiver.wait()
            await deletes.close()
            m.archive_pending.labels(dataset.name).set(archiver_failed)
        if not dry_run:
            m.dataset_blocked.labels(dataset.name).set(0)
            _observe_source(engine, dataset, files.newest, 0, None, watermark)
            await record_total()
            engine.replays.finished(dataset, watermark)


LISTING_PAGES_AHEAD = 2  # listing pages read ahead of the pass: 2,000 files at most


async def _one_page(files: list[ChangeFile]) -> AsyncIterator[list[ChangeFile]]:
    """A listing already made whole, as the pages PassFiles takes."""
    if files:
        yield files


def _newest_key(files: PassFiles) -> str | None:
    return files.newest.key if files.newest else None


async def _record_listing(
    conn: asyncpg.Connection, dataset: DatasetConfig, newest_key: str | None, waiting: int | None
) -> None:
    await conn.execute(ledger.RECORD_SOURCE_SEEN, dataset.name, newest_key, waiting)


@dataclass
class _Applied:
    """A file applied in the open batch, waiting for its commit."""

    file: ChangeFile
    result: FileResult
    watermark_before: str | None
    replayed: bool
    number: int  # its place in the pass, for progress


class _Batch:
    """The open transaction of a pass and the files applied in it, each in a savepoint.

    Each file still commits together with its ledger row and watermark advance
    (CONTRACT.md semantic 2): they are in the same transaction, and a file that fails
    rolls back its own savepoint only. A crash or a lost session before the commit
    rolls back the whole batch; none of its files was archived or counted (both wait
    for the commit), so the next pass applies them, each once. The batch commits at
    ``max_files``, after ``max_s``, or when the next file's bytes are not fetched yet:
    batching never makes a file wait for data, only for its neighbours' apply.
    """

    def __init__(self, conn: asyncpg.Connection, max_files: int, max_s: float) -> None:
        self._conn = conn
        self._max_files = max_files
        self._max_s = max_s
        self._tx: Any = None
        self._opened = 0.0
        self._files: list[_Applied] = []

    async def open(self) -> None:
        if self._tx is None:
            tx = self._conn.transaction()
            async with guarded(self._conn):
                await tx.start()
            self._tx, self._opened = tx, time.monotonic()

    def add(self, applied: _Applied) -> None:
        self._files.append(applied)

    @property
    def is_open(self) -> bool:
        return self._tx is not None

    def due(self, next_ready: bool) -> bool:
        return (
            not next_ready
            or len(self._files) >= self._max_files
            or time.monotonic() - self._opened >= self._max_s
        )

    async def commit(self, report: DrainReport) -> list[_Applied]:
        if self._tx is None:
            return []
        tx, self._tx = self._tx, None
        at_key = report.at_key
        if self._files:
            # Until the commit answers, every file of the batch is undecided: a failure
            # names the first (the ledger decides them all on the next pass).
            report.at_key = self._files[0].file.key
        async with guarded(self._conn):
            await tx.commit()
        report.at_key = at_key
        done, self._files = self._files, []
        return done


async def _list(*listings: Coroutine[Any, Any, list[ChangeFile]]) -> list[list[ChangeFile]]:
    """Listings at once, each to its end (each is bounded by the S3 timeouts and
    retries); a failure fails the pass at ``list``, the first listing's error first."""
    results = await asyncio.gather(*listings, return_exceptions=True)
    for result in results:
        if isinstance(result, SourceError):
            raise source_failed("list", result) from result
        if isinstance(result, BaseException):
            raise result
    return [r for r in results if not isinstance(r, BaseException)]


async def _reseed(
    engine: Engine, conn: asyncpg.Connection, dataset: DatasetConfig, reseed: str
) -> tuple[list[ChangeFile], list[ChangeFile]]:
    """Forget the dataset's ledger and watermark (and, from the archive, its rows); return
    the files to apply again: under changes/, and under processed/ from the archive."""
    if reseed == "archive":
        listed, archived = await _list(
            engine.source.list_changes(dataset), engine.source.list_files(dataset.processed_prefix)
        )
        if not listed and not archived:
            raise DrainFailed(
                "list",
                f"reseed refused: nothing under {dataset.processed_prefix} or {dataset.changes_prefix}",
            )
        async with conn.transaction():
            await replay.clear_dataset(conn, dataset)
            await conn.execute(ledger.RESEED, dataset.name)
        log.warning(
            "reseed from the archive: the dataset's rows, rejects, ledger and watermark forgotten; "
            "re-applying processed/ and changes/ in name order",
            processed=len(archived),
            changes=len(listed),
        )
        return listed, archived
    (listed,) = await _list(engine.source.list_changes(dataset))
    if not listed:
        # A reseed re-applies what is under changes/; with nothing there it
        # would only throw the ledger and the watermark away.
        raise DrainFailed("list", f"reseed refused: nothing under {dataset.changes_prefix}")
    await conn.execute(ledger.RESEED, dataset.name)
    log.warning("reseed: ledger and watermark forgotten; re-applying every file under changes/")
    return listed, []


async def _apply_one(
    engine: Engine,
    conn: asyncpg.Connection,
    dataset: DatasetConfig,
    f: ChangeFile,
    prefetch: Prefetcher,
    watermark: str | None,
    report: DrainReport,
    dry_run: bool,
    replayed: bool = False,
) -> FileResult:
    """Apply one file (in a savepoint of the pass's open transaction); raises BadFile if
    it is bad. ``replayed``: read from processed/, recorded under its changes/ key.
    A dry run is reported here; a real file once its batch commits (_record_applied)."""
    m = engine.metrics
    late = is_late(f.key, watermark)
    log.info("applying file", size_bytes=f.size, late=late)
    try:
        async with prefetch.open(f) as chunks:
            result = await apply_file(
                conn,
                dataset,
                replay.ledger_key(dataset, f) if replayed else f.key,
                f.etag,
                chunks,
                late=late,
                size_bytes=f.size,
                max_record_bytes=engine.config.ingest.max_record_bytes,
                statement_timeout_s=engine.config.database.statement_timeout_s,
                incoming_ready=True,
            )
    except BadFile:
        m.poll_failures.labels(dataset.name, "parse").inc()
        raise
    except DATA_ERRORS as exc:
        # The database refused a value in this file (SQLSTATE classes 22 and 54). The
        # schema is built so that this should not happen; if it does, the same bytes
        # will fail the same way on every retry, so it is a bad file, not an outage:
        # block (or quarantine) at this key with the reason, instead of retrying forever.
        m.poll_failures.labels(dataset.name, "apply").inc()
        raise BadFile(f"database rejected the file: {type(exc).__name__}: {exc}") from exc
    except SourceError as exc:
        raise source_failed("fetch", exc) from exc
    except DB_ERRORS as exc:
        raise DrainFailed("apply", f"{f.key}: {describe(exc)}") from exc
    if dry_run:
        report.rows_upserted += result.upserted
        report.rows_rejected += result.rejected
        report.files.append(result.as_json())
        log.info("dry run: file would apply", **result.as_json())
    return result


def _record_applied(engine: Engine, dataset: DatasetConfig, a: _Applied, report: DrainReport) -> None:
    """Count, log and report a file its batch's commit made durable."""
    m = engine.metrics
    f, result, watermark = a.file, a.result, a.watermark_before
    report.files_applied += 1
    report.rows_upserted += result.upserted
    report.rows_rejected += result.rejected
    if not is_late(f.key, watermark):
        report.watermark = replay.ledger_key(dataset, f) if a.replayed else f.key
    m.files_applied.labels(dataset.name).inc()
    m.rows_upserted.labels(dataset.name).inc(result.upserted)
    for reason, n in result.reject_reasons.items():
        m.rows_rejected.labels(dataset.name, reason).inc(n)
    with structlog.contextvars.bound_contextvars(key=f.key):
        if result.late:
            m.late_files.labels(dataset.name).inc()
            log.warning("late file applied under the stale-write guard", watermark=watermark)
        if a.replayed:
            report.files_replayed += 1
            m.replayed_files.labels(dataset.name).inc()
            log.warning(
                "file replayed from processed/: the ledger did not hold it (database restored from "
                "an older backup?); applied under the stale-write guard, left in processed/",
                watermark=watermark,
            )
        else:
            # How stale the data was when it reached the table; a replayed file had
            # reached it before the restore, so it says nothing about freshness.
            m.apply_delay.labels(dataset.name).observe(max(0.0, time.time() - f.timestamp.timestamp()))
        if result.extra_columns and (dataset.name, result.extra_columns) not in engine.drift_logged:
            engine.drift_logged.add((dataset.name, result.extra_columns))
            log.warning("schema drift: extra columns kept in raw", columns=list(result.extra_columns))
        log.info(
            "file applied",
            rows_read=result.rows_read,
            inserted=result.inserted,
            updated=result.updated,
            unchanged=result.unchanged,
            rejected=result.rejected,
            late=result.late,
        )


async def _bad_file(
    engine: Engine,
    conn: asyncpg.Connection,
    dataset: DatasetConfig,
    f: ChangeFile,
    exc: BadFile,
    report: DrainReport,
    dry_run: bool,
) -> None:
    reason = str(exc)
    if dataset.on_bad_file == "halt":
        report.blocked = Blocked(f.key, f.etag, reason, exc.line)
        log.error("bad file: dataset blocked", reason=reason, dry_run=dry_run)
        if not dry_run:
            await conn.execute(ledger.SET_BLOCKED, dataset.name, f.key, f.etag, reason, exc.line)
            engine.metrics.dataset_blocked.labels(dataset.name).set(1)
        return
    log.error("bad file: quarantined", reason=reason, dry_run=dry_run)
    report.files.append({"key": f.key, "quarantined": reason})
    if dry_run:
        return
    engine.metrics.files_quarantined.labels(dataset.name).inc()
    # Ledger first: if the move below fails, the next pass finishes it (_finish_move).
    await conn.execute(
        ledger.RECORD_FILE,
        dataset.name,
        f.key,
        f.etag,
        "quarantined",
        f.size,
        0,
        0,
        0,
        0,
        0,
        False,
        reason,
    )
    await conn.execute(ledger.CLEAR_BLOCKED, dataset.name, f.key)
    try:
        await engine.source.quarantine(dataset, f, error_document(dataset, f, reason, exc.line))
    except SourceError as err:
        engine.metrics.poll_failures.labels(dataset.name, "archive").inc()
        log.warning("quarantine move failed; next pass retries it", error=str(err))


async def _finish_move(
    engine: Engine,
    dataset: DatasetConfig,
    f: ChangeFile,
    entry: ledger.LedgerEntry | None,
    deletes: Deletes,
) -> bool:
    """Move a decided file out of changes/. ``entry`` is its ledger row if an earlier
    pass decided it (then nothing is applied again), None if this pass applied it."""
    with structlog.contextvars.bound_contextvars(key=f.key):
        if entry is None or entry.status == "applied":
            if entry is not None:
                log.info("already applied; archiving only")
            return await _archive(engine, dataset, f, deletes)
        log.info("already set aside; back to quarantine/", status=entry.status)
        try:
            await engine.source.quarantine(
                dataset, f, error_document(dataset, f, entry.error or entry.status, None)
            )
            return True
        except SourceError as exc:
            engine.metrics.poll_failures.labels(dataset.name, "archive").inc()
            log.warning("quarantine move failed; next pass retries it", error=str(exc))
            return False


async def _archive(engine: Engine, dataset: DatasetConfig, f: ChangeFile, deletes: Deletes) -> bool:
    # The file is committed; a failure here only delays the move to the next pass,
    # which finds it in the ledger and archives it without re-applying. The copy is
    # pinned to the applied version; the delete follows it within one request's time
    # (batched with its neighbours'), as it followed a single copy before.
    try:
        moved = await engine.source.copy_to_processed(dataset, f)
        if moved:
            await deletes.delete(f.key)
    except SourceError as exc:
        engine.metrics.poll_failures.labels(dataset.name, "archive").inc()
        log.warning("archive failed; next pass retries it", error=str(exc))
        return False
    if not moved:
        log.info("key was re-uploaded since it was applied; new version left in changes/")
    return True


def _observe_source(
    engine: Engine,
    dataset: DatasetConfig,
    newest: ChangeFile | None,
    pending: int,
    oldest_pending: ChangeFile | None,
    watermark: str | None,
) -> None:
    m = engine.metrics
    m.pending_files.labels(dataset.name).set(pending)
    m.source_lag.labels(dataset.name).set(_lag(newest, watermark, oldest_pending if pending else None))
    if newest is not None:
        m.newest_source_ts.labels(dataset.name).set(newest.timestamp.timestamp())
    wm_ts = key_timestamp(watermark) if watermark else None
    if wm_ts is not None:
        m.watermark_ts.labels(dataset.name).set(wm_ts.timestamp())
        if newest is None or newest.timestamp < wm_ts:
            m.newest_source_ts.labels(dataset.name).set(wm_ts.timestamp())


def _observe_listing(engine: Engine, dataset: DatasetConfig, files: PassFiles, watermark: str | None) -> None:
    _observe_source(engine, dataset, files.newest, files.waiting, files.oldest_waiting, watermark)


def _observe_shared_state(engine: Engine, dataset: DatasetConfig, state: ledger.DatasetState) -> None:
    """Gauges whose truth is in the database, not in this process: with several
    replicas (or after `skip` from a shell) the one that last drained is not
    necessarily this one, and its alerts must not go stale here."""
    m = engine.metrics
    m.dataset_blocked.labels(dataset.name).set(1 if state.blocked else 0)
    last = state.metadata.get("last_success_at")
    if last:
        m.succeeded_at(dataset.name, datetime.fromisoformat(last).timestamp())


# --- status ----------------------------------------------------------------------------


async def status(
    engine: Engine, dataset: DatasetConfig, detailed: bool = False, listed: list[ChangeFile] | None = None
) -> dict[str, Any]:
    """What `status --json` prints for one dataset (CONTRACT.md: exactly these keys);
    ``detailed`` adds what the terminal view shows beside them. Also refreshes the
    source gauges. ``listed``: a listing of changes/ made earlier (the daemon's source
    watcher keeps one), instead of listing the bucket now."""
    async with engine.pool.acquire() as conn:
        state = await ledger.state(conn, dataset.name)
        if listed is None:
            listed = await engine.source.list_changes(dataset)
        known = await ledger.entries(conn, dataset.name, [f.key for f in listed])
    pending = [f for f in listed if (f.key, f.etag) not in known]
    _observe_source(
        engine,
        dataset,
        listed[-1] if listed else None,
        len(pending),
        pending[0] if pending else None,
        state.watermark,
    )
    _observe_shared_state(engine, dataset, state)
    out: dict[str, Any] = {
        "watermark": state.watermark,
        "newest_key": listed[-1].key if listed else None,
        "pending_files": len(pending),
        "lag_seconds": lag_seconds(listed[-1] if listed else None, state.watermark, pending),
        "blocked": state.blocked.as_json() if state.blocked else None,
        "last_applied_at": state.last_applied_at.isoformat() if state.last_applied_at else None,
    }
    return _with_details(out, state) if detailed else out


async def status_as_last_seen(
    engine: Engine, dataset: DatasetConfig, error: str, detailed: bool = False
) -> dict[str, Any]:
    """status() when the bucket cannot be listed: the same keys, with newest key, pending
    files and lag as the last drain pass's listing recorded them. An S3 outage is when
    an operator most needs the database's half of the picture.

    Only a drain records its listing: it records it before it applies anything (the
    pages read so far; the totals once a streamed listing ends, with the same
    instant), so every ledger row written after that instant is a file it dealt with. An observer listing
    beside a file in flight could not tell (a file's applied_at is its transaction's
    start), and would leave a pending count that never goes down."""
    async with engine.pool.acquire() as conn:
        state = await ledger.state(conn, dataset.name)
        seen = await conn.fetchval(ledger.LAST_LISTING, dataset.name) or {}
    never_listed = seen.get("pending_files") is None
    out: dict[str, Any] = {
        "watermark": state.watermark,
        "newest_key": seen.get("newest_key"),
        "pending_files": None if never_listed else seen["pending_files_remaining"],
        "lag_seconds": float(seen.get("lag_seconds") or 0),
        "blocked": state.blocked.as_json() if state.blocked else None,
        "last_applied_at": state.last_applied_at.isoformat() if state.last_applied_at else None,
    }
    if not detailed:
        return out
    return _with_details(out, state) | {
        "source_error": error,
        "source_checked_at": seen.get("source_checked_at"),
    }


def _with_details(out: dict[str, Any], state: ledger.DatasetState) -> dict[str, Any]:
    """What the terminal view shows beside the contract's keys."""
    wm_ts = key_timestamp(state.watermark) if state.watermark else None
    return out | {
        "watermark_age_seconds": (datetime.now(UTC) - wm_ts).total_seconds() if wm_ts else None,
        "last_pass_at": state.metadata.get("last_pass_at"),
        "last_pass_outcome": state.metadata.get("last_pass_outcome"),
        "blocked_line": state.blocked.line if state.blocked else None,
    }

"""Operator actions beside the drain: set a bad file aside, apply a local file.

Both take the dataset's advisory lock, like a drain, so they never interleave with
one; both go through the same ledger, so a drain afterwards sees what they did.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from fleetticketsd.config import DatasetConfig
from fleetticketsd.database.dbguard import session_ended
from fleetticketsd.ingest import ledger
from fleetticketsd.ingest.apply import FileResult, apply_file
from fleetticketsd.ingest.drain import Engine, error_document, is_late
from fleetticketsd.ingest.feed import BadFile, file_name, key_timestamp

LOCK_WAIT_S = 30.0


class ActionError(Exception):
    """The action cannot be done; the message says why and what to do instead."""


async def _wait_lock(conn: asyncpg.Connection, dataset: str, wait_s: float = LOCK_WAIT_S) -> None:
    deadline = time.monotonic() + wait_s
    while not await ledger.try_lock(conn, dataset):
        if time.monotonic() > deadline:
            raise ActionError(f"dataset {dataset} is being drained by another process; try again later")
        await asyncio.sleep(0.5)


def resolve_key(dataset: DatasetConfig, key_or_name: str) -> str:
    return key_or_name if "/" in key_or_name else dataset.changes_prefix + key_or_name


@dataclass(frozen=True)
class SkipResult:
    key: str
    etag: str | None
    moved: bool
    unblocked: bool


async def skip(engine: Engine, dataset: DatasetConfig, key_or_name: str, reason: str) -> SkipResult:
    """Record KEY as skipped, move it to quarantine/, and unblock the dataset if it blocked it."""
    key = resolve_key(dataset, key_or_name)
    if key_timestamp(key) is None or not key.startswith(dataset.changes_prefix):
        raise ActionError(
            f"{key_or_name!r} is not a change file of dataset {dataset.name} ({dataset.changes_prefix}…)"
        )
    async with engine.pool.acquire() as conn:
        await _wait_lock(conn, dataset.name)
        try:
            # Looked at only under the lock: a drain running meanwhile may have applied
            # a fixed re-upload of this very key.
            f = await engine.source.head(key)
            await ledger.ensure(conn, dataset.name)
            state = await ledger.state(conn, dataset.name)
            blocked_here = state.blocked is not None and state.blocked.key == key
            if f is None and not blocked_here:
                raise ActionError(f"{key} is not under changes/ and does not block {dataset.name}")
            if f is not None:
                entry = (await ledger.entries(conn, dataset.name, [key])).get((key, f.etag))
                if entry is not None and entry.status == "applied":
                    raise ActionError(f"{key} (this version) is already applied; nothing to skip")
            etag = f.etag if f is not None else (state.blocked.etag if state.blocked else None) or ""
            async with conn.transaction():
                await conn.execute(
                    ledger.RECORD_FILE,
                    dataset.name,
                    key,
                    etag,
                    "skipped",
                    f.size if f else None,
                    0,
                    0,
                    0,
                    0,
                    0,
                    False,
                    f"skipped by operator: {reason}",
                )
                await conn.execute(ledger.CLEAR_BLOCKED, dataset.name, key)
        finally:
            await ledger.unlock(conn, dataset.name)
    moved = False
    if f is not None:
        doc = error_document(dataset, f, f"skipped by operator: {reason}", None)
        moved = await engine.source.quarantine(dataset, f, doc)
    if blocked_here:
        engine.metrics.dataset_blocked.labels(dataset.name).set(0)
    return SkipResult(key, etag, moved, blocked_here)


@dataclass
class LoadResult:
    key: str
    already_applied: bool = False
    result: FileResult | None = None
    error: str | None = None


async def _file_chunks(path: Path, chunk_bytes: int) -> AsyncIterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(chunk_bytes):
            yield chunk
            await asyncio.sleep(0)  # let the COPY writer drain between chunks


def _fingerprint(path: Path) -> tuple[str, int]:
    """MD5 and size. The MD5 is what S3 reports as the ETag of a single-part upload of
    the same bytes, so a later drain of this file from the bucket sees it as applied."""
    h = hashlib.md5(usedforsecurity=False)
    size = 0
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise ActionError(f"{path}: {exc.strerror or exc}") from None
    return h.hexdigest(), size


async def load_file(engine: Engine, dataset: DatasetConfig, path: Path, dry_run: bool = False) -> LoadResult:
    """Apply a local CSV as if it were ``<prefix>changes/<its name>``."""
    name = file_name(str(path))
    if key_timestamp(name) is None:
        raise ActionError(f"{path}: file name must be YYYY-MM-DDTHH-mm-ss.csv (its EAT export time)")
    key = dataset.changes_prefix + name
    etag, size = await asyncio.to_thread(_fingerprint, path)
    out = LoadResult(key)
    async with engine.pool.acquire() as conn:
        await _wait_lock(conn, dataset.name)
        try:
            await ledger.ensure(conn, dataset.name)
            if (key, etag) in await ledger.entries(conn, dataset.name, [key]):
                out.already_applied = True
                return out
            state = await ledger.state(conn, dataset.name)
            tx = conn.transaction()
            await tx.start()
            try:
                out.result = await apply_file(
                    conn,
                    dataset,
                    key,
                    etag,
                    _file_chunks(path, engine.config.ingest.read_chunk_bytes),
                    late=is_late(key, state.watermark),
                    size_bytes=size,
                    max_record_bytes=engine.config.ingest.max_record_bytes,
                    statement_timeout_s=engine.config.database.statement_timeout_s,
                )
            except BadFile as exc:
                out.error = f"{path}: {exc}"
                await tx.rollback()
                return out
            except BaseException:
                if not session_ended(conn):  # a DatabaseFault ended it: nothing to roll back
                    await tx.rollback()
                raise
            if dry_run:
                await tx.rollback()
            else:
                await tx.commit()
        finally:
            if not session_ended(conn):
                await ledger.unlock(conn, dataset.name)
    if not dry_run and out.result is not None:
        m = engine.metrics
        m.files_applied.labels(dataset.name).inc()
        m.rows_upserted.labels(dataset.name).inc(out.result.upserted)
    return out

"""Recovery from a database restore (CONTRACT.md): files in ``processed/`` the ledger lacks.

A restored backup knows every file up to the moment it was taken; the bucket's
``processed/`` holds every file applied since. The files to apply again are exactly
those whose names sort after the restored watermark and that the restored ledger
does not hold, so each pass lists ``processed/`` from the watermark's name on
(StartAfter: the server skips the archive's history, and in steady state the listing
is empty) and applies what the ledger lacks, in name order with the files waiting
under ``changes/``, under the stale-write guard. They stay in ``processed/``.

A restore moves the watermark back, so a process that has looked once need not look
again while the watermark has not gone back from what it last saw (``Watch``): a
steady-state pass then makes one request fewer. A pass that did not finish (an
error, a stop, a block) forgets what it saw, so the next one looks again.

With no watermark there is nothing to restore *to*: a database that has never
applied a file while ``processed/`` holds files is a new database beside an old
archive (a fresh install on a used bucket, or a backup older than the first file),
and replaying years of archive unasked is not what either wants. The pass says so
and names the command that does it: ``drain --reseed --from-archive``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg
import structlog

from fleetticketsd.config import DatasetConfig
from fleetticketsd.database.db import qualified
from fleetticketsd.ingest import ledger
from fleetticketsd.ingest.feed import file_name
from fleetticketsd.ingest.source import ChangeFile, S3Source

log = structlog.get_logger("fleetticketsd.ingest.drain")

# `--reseed --from-archive`: the dataset from nothing. Its rows and rejects go with its
# ledger (ledger.RESEED, in the same transaction); the read side's history
# (closure_events, daily snapshots) is kept: it is written idempotently, and may hold
# what the archive cannot give back (the legacy loader's years).
CLEAR_ROWS = "DELETE FROM {table}"
CLEAR_REJECTS = "DELETE FROM tickets.ingest_rejects WHERE dataset = $1"


@dataclass
class Watch:
    """The watermark each dataset had when this process last finished a pass that looked
    in processed/ (or had no need to), by dataset and archive prefix.

    Files after the watermark reach processed/ only through a restore, and a restore
    takes the watermark back with it: while the watermark read at the start of a pass
    is not older than the one seen at the end of the last finished pass, processed/
    holds nothing new after it, and the pass need not list it. Another process's passes
    only move the watermark forward (and list processed/ themselves when theirs went
    back). A new process starts empty, so its first pass always looks.
    """

    seen: dict[tuple[str, str], str | None] = field(default_factory=dict)

    def due(self, dataset: DatasetConfig, watermark: str | None) -> bool:
        """Whether this pass must list processed/ after ``watermark``; if so, the dataset
        is forgotten until the pass finishes (``finished``)."""
        key = (dataset.name, dataset.processed_prefix)
        if key in self.seen and _name(watermark) >= _name(self.seen[key]):
            return False
        self.seen.pop(key, None)
        return True

    def finished(self, dataset: DatasetConfig, watermark: str | None) -> None:
        """The pass dealt with every file it found, replays included."""
        self.seen[(dataset.name, dataset.processed_prefix)] = watermark


def _name(key: str | None) -> str:
    return file_name(key) if key else ""


def ledger_key(dataset: DatasetConfig, f: ChangeFile) -> str:
    """The key a file is recorded (and its rows sourced) under: its changes/ key,
    wherever it was read from, as the pass that first applied it recorded it."""
    return dataset.changes_prefix + f.name


async def candidates(source: S3Source, dataset: DatasetConfig, watermark: str | None) -> list[ChangeFile]:
    """Files under processed/ after the watermark, in name order (S3 only: this runs
    beside the listing of changes/, and the pass's connection is not for sharing)."""
    if watermark is None:
        if await source.any_file(dataset.processed_prefix):
            log.warning(
                "no watermark yet, but processed/ holds files: not replaying them. If this database "
                "was restored from a backup taken before its first file, rebuild it with "
                f"`fleetticketsd drain --reseed --from-archive --dataset {dataset.name}`",
                prefix=dataset.processed_prefix,
            )
        return []
    return await source.list_processed_after(dataset, file_name(watermark))


async def not_in_ledger(
    conn: asyncpg.Connection, dataset: DatasetConfig, files: list[ChangeFile]
) -> list[ChangeFile]:
    """Those the ledger does not hold, by name under any ETag (a copy's ETag can differ
    from its source's)."""
    if not files:
        return []
    held = await ledger.entries(conn, dataset.name, [ledger_key(dataset, f) for f in files])
    keys = {key for key, _ in held}
    return [f for f in files if ledger_key(dataset, f) not in keys]


def merge(pending: list[ChangeFile], replay: list[ChangeFile]) -> list[ChangeFile]:
    """One name-ordered list. A name in both places is the changes/ version: applying
    it archives it, over the copy in processed/."""
    waiting = {f.name for f in pending}
    return sorted([*pending, *(f for f in replay if f.name not in waiting)], key=lambda f: f.name)


async def clear_dataset(conn: asyncpg.Connection, dataset: DatasetConfig) -> None:
    await conn.execute(CLEAR_ROWS.format(table=qualified(dataset.table_schema, dataset.table_name)))
    await conn.execute(CLEAR_REJECTS, dataset.name)

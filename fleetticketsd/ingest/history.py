"""The pass-level half of INC's history hook (docs/read_side.md, History).

``capture_history`` runs in each file's transaction (``post_apply``); what does not
depend on the file — recounting the days the pass's files touched and today's (EAT)
point-in-time backlog — is done once, at the end of every pass, with or without files,
by ``capture_history_pass()`` (migrations/0009_read_side_prepared.sql). A session-level
setting tells the per-file hook that a pass is running and will do that part; a pass
that stops on an error ends its session (drain.py), and the setting with it.
"""

from __future__ import annotations

import asyncpg

from fleetticketsd.config import DatasetConfig
from fleetticketsd.database.db import qualified

HOOK = "capture_history"
PASS_FUNCTION = "capture_history_pass"
BEGIN_PASS = "SELECT set_config('fleetticketsd.history_pass', 'on', false)"
END_PASS = "SELECT {function}()"


def wanted(dataset: DatasetConfig) -> bool:
    return HOOK in dataset.post_apply


async def begin_pass(conn: asyncpg.Connection, dataset: DatasetConfig) -> None:
    """Tell this session's per-file hook that the pass's end does the recounts."""
    if wanted(dataset):
        await conn.execute(BEGIN_PASS)


async def end_pass(conn: asyncpg.Connection, dataset: DatasetConfig) -> None:
    """Today's snapshot row and the recount of the days the pass's files touched."""
    if wanted(dataset):
        await conn.execute(END_PASS.format(function=qualified(dataset.table_schema, PASS_FUNCTION)))

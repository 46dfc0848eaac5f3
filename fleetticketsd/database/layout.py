"""What kind of database this is, decided before anything writes to it.

fleetticketsd replaces a loader that is in production (LEGACY.md), so the database a
new user points it at is often not empty and not ours: the loader's tables sit in the
same schema under the same names, with a ledger of its own in the table name ours
uses. Running our migrations over that would half-work (``CREATE TABLE IF NOT EXISTS``
skips the loader's tables) and corrupt it silently; reading our ledger columns from its
ledger raises a raw SQL error. So every command that needs our schema asks here first,
and on anything but our layout (or an empty database, for ``migrate``) it stops with
what it found and what to run.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import asyncpg

# Our ledger is recognised by its columns, not its name: the loader's has the same name.
LEDGER_COLUMNS = """
SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum), '{}')
FROM pg_attribute a
WHERE a.attrelid = to_regclass('tickets.schema_migrations') AND a.attnum > 0 AND NOT a.attisdropped
"""
# Relations in schema tickets (tables, views, sequences not owned by a table...).
TICKETS_RELATIONS = """
SELECT c.relname::text AS name, c.relkind::text AS kind
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'tickets' AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
ORDER BY c.relname
"""
COLUMN_NAMES = """
SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum), '{}')
FROM pg_attribute a
WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
"""
# The loader's ledger has one text column of file names; which one is not documented.
LEGACY_LEDGER_ROWS = "SELECT count(*) AS n FROM tickets.schema_migrations"
ROW_COUNT = "SELECT count(*) FROM {table}"


class Kind(enum.Enum):
    EMPTY = "empty"  # nothing in schema tickets: `migrate` builds it
    PROJECT = "project"  # our ledger: migrations decide
    LEGACY = "legacy"  # the loader's layout (LEGACY.md): `migrate --adopt`
    FOREIGN = "foreign"  # tables in schema tickets that neither of us made


@dataclass(frozen=True)
class Layout:
    kind: Kind
    found: str  # what was found, for a person: names, columns, row counts

    @property
    def advice(self) -> str:
        if self.kind is Kind.LEGACY:
            return (
                "this is the legacy loader's database; run `fleetticketsd migrate --adopt --dry-run`, "
                "then `fleetticketsd migrate --adopt` (docs/operations.md, cutover)"
            )
        if self.kind is Kind.FOREIGN:
            return "fleetticketsd did not create these; point [database] url at its own database"
        return ""


class LayoutError(Exception):
    """The database holds a layout this command must not touch."""

    def __init__(self, layout: Layout) -> None:
        super().__init__(f"database holds {layout.found}: {layout.advice}")
        self.layout = layout


async def ledger_is_ours(conn: asyncpg.Connection) -> bool | None:
    """True: our ledger; False: a ledger by that name that is not ours; None: no ledger."""
    cols = set(await conn.fetchval(LEDGER_COLUMNS))
    if not cols:
        return None
    return {"version", "checksum"} <= cols


async def inspect(conn: asyncpg.Connection) -> Layout:
    ours = await ledger_is_ours(conn)
    if ours:
        return Layout(Kind.PROJECT, "fleetticketsd's layout")
    relations = [r["name"] for r in await conn.fetch(TICKETS_RELATIONS)]
    if ours is None and not relations:
        return Layout(Kind.EMPTY, "no fleetticketsd tables")
    inc_cols = set(await conn.fetchval(COLUMN_NAMES, "tickets.inc"))
    looks_legacy = ours is False or ("raw" in inc_cols and "source_key" not in inc_cols)
    parts: list[str] = []
    if ours is False:
        ledger_cols = await conn.fetchval(LEDGER_COLUMNS)
        n = await conn.fetchval(LEGACY_LEDGER_ROWS)
        parts.append(
            f"a migration ledger tickets.schema_migrations that is not fleetticketsd's "
            f"(columns {', '.join(ledger_cols)}; {n} row(s))"
        )
    for table in ("inc", "crq"):
        if table in relations:
            cols = set(await conn.fetchval(COLUMN_NAMES, f"tickets.{table}"))
            rows = await conn.fetchval(ROW_COUNT.format(table=f"tickets.{table}"))
            guard = "with" if "source_key" in cols else "without"
            parts.append(f"tickets.{table} ({rows} row(s), {guard} source_key)")
    others = [r for r in relations if r not in ("inc", "crq", "schema_migrations")]
    if others:
        shown = ", ".join(others[:8]) + (f" and {len(others) - 8} more" if len(others) > 8 else "")
        parts.append(f"other relations in schema tickets: {shown}")
    return Layout(Kind.LEGACY if looks_legacy else Kind.FOREIGN, "; ".join(parts))

"""Database plumbing: the connection pool, migrations, and checks of configured tables.

Migrations are plain SQL files applied in name order, each once, each in its own
transaction, recorded in ``tickets.schema_migrations``. A PostgreSQL advisory lock
makes concurrent ``migrate`` runs (several replicas starting at once) take turns.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import unquote, urlsplit

import asyncpg

from fleetticketsd.config import DatabaseConfig, DatasetConfig
from fleetticketsd.database import layout, roles

# Two-int advisory lock keys: (namespace, item). The namespace keeps ours apart from
# any other application sharing the database.
LOCK_NAMESPACE = 0x46_4C_54  # "FLT"
MIGRATION_LOCK_ITEM = 0

CREATE_LEDGER = """
CREATE SCHEMA IF NOT EXISTS tickets;
CREATE TABLE IF NOT EXISTS tickets.schema_migrations (
    version    text PRIMARY KEY,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
APPLIED_MIGRATIONS = "SELECT version, checksum FROM tickets.schema_migrations"
RECORD_MIGRATION = "INSERT INTO tickets.schema_migrations (version, checksum) VALUES ($1, $2)"
TABLE_COLUMNS = """
SELECT a.attname
FROM pg_attribute a
WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
"""
# What the engine writes (apply.py) and resolves geometry into (tickets.resolve_ticket_geo):
# a table made with tickets.create_dataset_table has all of them.
REQUIRED_TABLE_COLUMNS = frozenset({"ticket_id", "raw", "source_key", "updated_at", "geom", "geo_source"})
# NULL when there is no such schema (the table check then says it does not exist).
SCHEMA_USABLE = "SELECT has_schema_privilege(oid, 'USAGE') FROM pg_namespace WHERE nspname = $1"
# NULL when the session's role may do all a drain does to the table, else its name.
MAY_WRITE_TABLE = """
SELECT CASE WHEN has_table_privilege($1, 'SELECT') AND has_table_privilege($1, 'INSERT')
             AND has_table_privilege($1, 'UPDATE') AND has_table_privilege($1, 'DELETE')
            THEN NULL ELSE current_user::text END
"""
FUNCTION_EXISTS = """
SELECT EXISTS (
    SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = $1 AND p.proname = $2 AND p.pronargs = 0
)
"""


class DatabaseError(Exception):
    """The database is unreachable or not in the shape this version needs; ``tls``: its
    certificate did not verify (a configuration problem, not an outage)."""

    def __init__(self, message: str, *, tls: bool = False) -> None:
        super().__init__(message)
        self.tls = tls


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb arrives as text by default; callers that read it want objects.
    import json

    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(config: DatabaseConfig) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(
            config.url,
            min_size=config.pool_min_size,
            max_size=config.pool_max_size,
            timeout=config.connect_timeout_s,
            # The server's statement_timeout answers first, cleanly; this only catches
            # a server that does not answer at all.
            command_timeout=config.statement_timeout_s + 1,
            init=_init_connection,
            server_settings={
                "application_name": "fleetticketsd",
                "statement_timeout": str(int(config.statement_timeout_s * 1000)),
            },
        )
    except ssl.SSLCertVerificationError as exc:
        raise DatabaseError(tls_failure(config.url, exc), tls=True) from exc
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise DatabaseError(f"cannot connect to the database ({describe_url(config.url)}): {exc}") from exc
    assert pool is not None
    return pool


def tls_failure(url: str, exc: ssl.SSLCertVerificationError) -> str:
    """One line for a server certificate that does not verify: the host, why, what to fix."""
    reason = exc.verify_message or exc.reason or str(exc)
    return (
        f"the TLS certificate of the database server {database_host(url)} does not verify ({reason}): "
        "set sslrootcert in the URL to the CA that signed it (and, with sslmode=verify-full, "
        "connect by a name the certificate holds)"
    )


def database_host(url: str) -> str:
    """host:port the URL connects to (libpq's ``host``/``port`` parameters win), for errors."""
    parts = urlsplit(url)
    query = dict(p.partition("=")[::2] for p in parts.query.split("&") if p)
    host = unquote(query.get("host", "")) or parts.hostname or "localhost"
    try:
        url_port = parts.port
    except ValueError:  # several hosts: host1:5432,host2:5432
        url_port = None
    port = unquote(query.get("port", "")) or (str(url_port) if url_port else "5432")
    return f"{host}:{port}"


def describe_url(url: str) -> str:
    from fleetticketsd.config import redact_url

    return redact_url(url)


# --- migrations ---------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    version: str  # file name without .sql
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations_dir() -> Path:
    """Installed wheels carry migrations inside the package; a checkout has them at the top."""
    packaged = Path(str(resources.files("fleetticketsd"))) / "migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "migrations"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or migrations_dir()
    return [Migration(p.stem, p.read_text(encoding="utf-8")) for p in sorted(directory.glob("*.sql"))]


async def _applied(conn: asyncpg.Connection) -> dict[str, str]:
    """Applied migrations; raises LayoutError on a database fleetticketsd did not lay out
    (the legacy loader's, or anyone's), so no command reads or builds over it."""
    if await layout.ledger_is_ours(conn):
        return {r["version"]: r["checksum"] for r in await conn.fetch(APPLIED_MIGRATIONS)}
    found = await layout.inspect(conn)
    if found.kind is layout.Kind.EMPTY:
        return {}
    raise layout.LayoutError(found)


async def require_layout(conn: asyncpg.Connection) -> None:
    """Raise LayoutError unless the database is fleetticketsd's (or still empty)."""
    await _applied(conn)


async def pending_migrations(conn: asyncpg.Connection, available: list[Migration]) -> list[Migration]:
    applied = await _applied(conn)
    return [m for m in available if m.version not in applied]


async def changed_migrations(conn: asyncpg.Connection, available: list[Migration]) -> list[str]:
    """Applied migrations whose file changed since: databases that differ silently."""
    applied = await _applied(conn)
    return [m.version for m in available if m.version in applied and applied[m.version] != m.checksum]


async def migrate(
    conn: asyncpg.Connection, available: list[Migration] | None = None, dataset_tables: Sequence[str] = ()
) -> list[str]:
    """Apply pending migrations in order, then make the roles' grants current (every
    time, also when nothing was pending: roles.py); return the versions applied.

    Raises LayoutError, having changed nothing, on a database laid out by someone else;
    roles.RolesMissing, with the migrations applied, when an administrator must create
    the roles."""
    available = load_migrations() if available is None else available
    await conn.execute("SELECT pg_advisory_lock($1, $2)", LOCK_NAMESPACE, MIGRATION_LOCK_ITEM)
    try:
        pending = await pending_migrations(conn, available)  # checks the layout first
        done = await apply_migrations(conn, pending)
        try:
            await roles.ensure(conn, dataset_tables)
        except roles.RolesMissing as exc:
            exc.applied = done
            raise
        except asyncpg.PostgresError as exc:
            raise DatabaseError(f"granting the roles' rights failed: {exc}") from exc
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1, $2)", LOCK_NAMESPACE, MIGRATION_LOCK_ITEM)


async def apply_migrations(conn: asyncpg.Connection, pending: list[Migration]) -> list[str]:
    """Apply ``pending`` in order, each in its own transaction (a savepoint when the
    caller holds one, as adoption does); the caller holds the migration lock."""
    await conn.execute(CREATE_LEDGER)
    done: list[str] = []
    for m in pending:
        try:
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(RECORD_MIGRATION, m.version, m.checksum)
        except asyncpg.PostgresError as exc:
            raise DatabaseError(f"migration {m.version} failed: {exc}") from exc
        done.append(m.version)
    return done


# --- checks of the configuration against the database -------------------------------


async def check_dataset(conn: asyncpg.Connection, dataset: DatasetConfig) -> str | None:
    """Why this dataset cannot be drained into its table, or None if it can."""
    if not await layout.ledger_is_ours(conn):
        found = await layout.inspect(conn)
        if found.kind is not layout.Kind.EMPTY:
            return f"database holds {found.found}: {found.advice}"
    if await conn.fetchval(SCHEMA_USABLE, dataset.table_schema) is False:
        return (
            f"datasets.{dataset.name}.table: role {await conn.fetchval('SELECT current_user')} may not use "
            f"schema {dataset.table_schema}: run `fleetticketsd migrate`, which grants {roles.RUNTIME} "
            "every configured dataset table and its schema"
        )
    cols = {r["attname"] for r in await conn.fetch(TABLE_COLUMNS, dataset.table)}
    if not cols:
        return f"datasets.{dataset.name}.table: table {dataset.table} does not exist (run migrate?)"
    missing = REQUIRED_TABLE_COLUMNS - cols
    if missing:
        return (
            f"datasets.{dataset.name}.table: {dataset.table} is not a ticket table "
            f"(lacks {', '.join(sorted(missing))})"
        )
    user = await conn.fetchval(MAY_WRITE_TABLE, dataset.table)
    if user is not None:
        return (
            f"datasets.{dataset.name}.table: role {user} may not write {dataset.table} "
            f"(needs SELECT, INSERT, UPDATE, DELETE): run `fleetticketsd migrate`, which grants "
            f"{roles.RUNTIME} every configured dataset table, and make {user} a member of it"
        )
    for hook in dataset.post_apply:
        if not await conn.fetchval(FUNCTION_EXISTS, dataset.table_schema, hook):
            return (
                f"datasets.{dataset.name}.post_apply: function {dataset.table_schema}.{hook}() does not exist"
            )
    return None


def quote_ident(name: str) -> str:
    # Names reaching here already passed config's identifier patterns; quoting is
    # the second line of defence, not the first.
    return '"' + name.replace('"', '""') + '"'


def qualified(schema: str, name: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(name)}"

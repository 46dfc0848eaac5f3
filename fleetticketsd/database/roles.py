"""The two NOLOGIN roles of CONTRACT.md ("TLS, secrets, roles") and their grants.

``fleetticketsd_runtime`` holds what the daemon and its commands need, and the
dashboards' ``fleetticketsd_reader`` holds SELECT on their tables and EXECUTE on the
reporting functions. Operators give login roles membership. Roles are cluster-wide,
so creating them needs CREATEROLE; a migrating role without it gets the statements
an administrator must run (RolesMissing), after which `migrate` completes the grants.

The object grants are made by ``tickets.grant_roles`` (migrations/0011_roles.sql),
driven by the catalog, after every `migrate` (one that applied nothing included):
see that file for why it is not each migration's job.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

RUNTIME = "fleetticketsd_runtime"
READER = "fleetticketsd_reader"
ROLES = (RUNTIME, READER)

EXISTING_ROLES = "SELECT rolname, rolcanlogin FROM pg_catalog.pg_roles WHERE rolname = ANY($1::text[])"
MAY_CREATE_ROLES = "SELECT rolsuper OR rolcreaterole FROM pg_catalog.pg_roles WHERE rolname = current_user"
# The database owner (or a holder WITH GRANT OPTION) may grant on it; others ask an admin.
# CONNECT and TEMPORARY are PUBLIC's by default: only a database that revoked them
# needs grants, which its owner (or a holder WITH GRANT OPTION) may make.
HAS_DATABASE_PRIVILEGE = "SELECT pg_catalog.has_database_privilege($1, current_database(), $2)"
CURRENT_DATABASE = "SELECT current_database()"
CURRENT_USER = "SELECT current_user"
HAS_GRANT_FUNCTION = "SELECT to_regprocedure('tickets.grant_roles(regclass[])') IS NOT NULL"
GRANT_ROLES = "SELECT * FROM tickets.grant_roles($1::text[]::regclass[])"
EXISTING_TABLES = "SELECT t FROM unnest($1::text[]) t WHERE to_regclass(t) IS NOT NULL"


class RolesMissing(Exception):
    """The migrating role may not do some of it: ``statements`` are for an administrator."""

    def __init__(self, statements: list[str]) -> None:
        super().__init__("an administrator must run:\n" + "\n".join(f"  {s}" for s in statements))
        self.statements = statements
        self.applied: list[str] = []  # the migrations applied before the roles were asked for


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def create_statement(role: str) -> str:
    return f"CREATE ROLE {role} NOLOGIN;"


# What each role needs on the database itself (TEMPORARY: apply.py stages each file
# in a temp table).
DATABASE_PRIVILEGES = ((RUNTIME, "CONNECT"), (RUNTIME, "TEMPORARY"), (READER, "CONNECT"))


def database_statement(database: str, role: str, privilege: str) -> str:
    return f"GRANT {privilege} ON DATABASE {_ident(database)} TO {role};"


async def ensure(conn: asyncpg.Connection, dataset_tables: Sequence[str] = ()) -> list[str]:
    """Create the roles if missing, keep them NOLOGIN, make their grants current.

    Returns what was granted (one line per object). Raises RolesMissing, after doing
    all it may, when an administrator has to run statements first."""
    may_create = bool(await conn.fetchval(MAY_CREATE_ROLES))
    existing = {r["rolname"]: r["rolcanlogin"] for r in await conn.fetch(EXISTING_ROLES, list(ROLES))}
    admin: list[str] = []
    for role in ROLES:
        if role not in existing:
            if not may_create:
                admin.append(create_statement(role))
                continue
            try:
                async with conn.transaction():
                    await conn.execute(create_statement(role).rstrip(";"))
            except asyncpg.DuplicateObjectError:
                pass  # another database's migrate on this cluster created it meanwhile
        elif existing[role]:
            # Members log in as themselves; the role itself never does.
            if may_create:
                await conn.execute(f"ALTER ROLE {role} NOLOGIN")
            else:
                admin.append(f"ALTER ROLE {role} NOLOGIN;")
    database = str(await conn.fetchval(CURRENT_DATABASE))
    me = await conn.fetchval(CURRENT_USER)
    if any(s.startswith("CREATE ROLE") for s in admin):
        # The database grants only where this role could not make them itself next time.
        if not await conn.fetchval(HAS_DATABASE_PRIVILEGE, me, "CONNECT WITH GRANT OPTION"):
            admin.extend(database_statement(database, role, priv) for role, priv in DATABASE_PRIVILEGES)
        raise RolesMissing(admin)
    granted: list[str] = []
    async with conn.transaction():
        for role, privilege in DATABASE_PRIVILEGES:
            if await conn.fetchval(HAS_DATABASE_PRIVILEGE, role, privilege):
                continue
            if await conn.fetchval(HAS_DATABASE_PRIVILEGE, me, f"{privilege} WITH GRANT OPTION"):
                await conn.execute(database_statement(database, role, privilege).rstrip(";"))
            else:
                admin.append(database_statement(database, role, privilege))
        if await conn.fetchval(HAS_GRANT_FUNCTION):
            tables = [r["t"] for r in await conn.fetch(EXISTING_TABLES, list(dataset_tables))]
            granted = [r[0] for r in await conn.fetch(GRANT_ROLES, tables)]
    if admin:
        raise RolesMissing(admin)
    return granted

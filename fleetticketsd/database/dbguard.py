"""Database waits on the apply path: bounded, and failing at once when the session dies.

asyncpg bounds every statement (``command_timeout``) and fails it when the connection
drops, with one gap that matters here: a COPY fed from an async iterator waits for
the socket to drain with no timeout, and a connection lost during that wait never
wakes it. A drain whose backend was terminated at the start of COPY hung forever,
holding its dataset (2026-12-02). So a file's transaction runs under ``guarded``:

* a lost connection (asyncpg's termination listener) cancels the block at once:
  one ``asyncio.timeout`` whose deadline the listener moves to now, so cancellation
  by anyone else (a shutdown) still propagates as a cancellation;
* a stretch that outlives its bound (``Guard.bound``) ends the session: the server
  rolls back and releases the session's advisory lock, and the loss then cancels
  the block as above;
* a block that fails mid-statement (lost, timed out client-side) leaves the
  session in a state nobody knows, so it is terminated, never handed back to the
  pool as it is.

Either way the block raises DatabaseFault, whose message is the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import asyncpg

# Why a session can no longer be trusted after an error: the reply never came, or
# came over a connection that is gone. A server error (PostgresError) is different:
# the server answered, and the transaction is rolled back cleanly.
MID_STATEMENT_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
)

# For /readyz: a standby (after a failover, the old primary often comes back as
# one) or a database set read-only accepts connections and reads, and fails
# every file with SQLSTATE 25006.
READ_ONLY_CHECK = """
SELECT CASE WHEN pg_is_in_recovery() THEN 'the server is a standby (in recovery)'
            WHEN current_setting('transaction_read_only') = 'on' THEN 'transaction_read_only is on'
       END
"""


class DatabaseFault(Exception):
    """A database wait that was lost or outlived its bound; its session is gone."""


class Guard:
    """The state of one guarded block; see ``guarded``."""

    def __init__(self, conn: asyncpg.Connection, scope: asyncio.Timeout) -> None:
        self._conn = conn
        self._scope = scope
        self._loop = asyncio.get_running_loop()
        self._active = True
        self.fault: str | None = None

    @contextlib.contextmanager
    def bound(self, timeout_s: float, fault: str) -> Iterator[None]:
        """End the session if this part of the block still runs after ``timeout_s``;
        the block then fails with DatabaseFault(``fault``)."""
        handle = self._loop.call_later(timeout_s, self._expire, fault)
        try:
            yield
        finally:
            handle.cancel()

    def _expire(self, fault: str) -> None:
        self.fault = fault
        end_session(self._conn)  # calls the termination listener: _on_lost

    def _on_lost(self, _conn: object) -> None:
        # Called soon after the loss, maybe once the block is over: then it is
        # none of this block's business.
        if not self._active:
            return
        self.fault = self.fault or "connection lost"
        if not self._scope.expired():
            self._scope.reschedule(self._loop.time())

    def _close(self) -> None:
        self._active = False
        if not session_ended(self._conn):
            self._conn.remove_termination_listener(self._on_lost)


def session_ended(conn: asyncpg.Connection) -> bool:
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True  # a pooled connection that dies detaches itself from its proxy


def end_session(conn: asyncpg.Connection) -> None:
    """Terminate the session, if it has not ended already. The server then rolls back
    what it had open and releases its session-level (advisory) locks."""
    if not session_ended(conn):
        conn.terminate()


@contextlib.asynccontextmanager
async def guarded(conn: asyncpg.Connection) -> AsyncIterator[Guard]:
    """Run database work on ``conn`` that must fail, not hang, when the session dies.

    Raises DatabaseFault (the session terminated) if the connection was lost, a
    ``Guard.bound`` ran out, or the block failed mid-statement; other errors pass
    through as they are, with the session intact.
    """
    guard: Guard | None = None
    try:
        async with asyncio.timeout(None) as scope:
            guard = Guard(conn, scope)
            conn.add_termination_listener(guard._on_lost)
            try:
                yield guard
            finally:
                guard._close()
    except Exception as exc:
        # Caught outside the scope: its deadline turns our cancellation into TimeoutError,
        # while anyone else's cancellation (a shutdown) passes through as it is.
        if guard is None or (guard.fault is None and not isinstance(exc, MID_STATEMENT_ERRORS)):
            raise
        end_session(conn)
        raise DatabaseFault(_fault_text(guard.fault, exc)) from exc


@contextlib.asynccontextmanager
async def acquire(pool: asyncpg.Pool, timeout_s: float) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection, or DatabaseFault once ``timeout_s`` has passed (pool busy,
    or the server not answering the connect)."""
    try:
        conn = await pool.acquire(timeout=timeout_s)
    except TimeoutError:
        raise DatabaseFault(
            f"no database connection within {timeout_s:g} s ([database] acquire_timeout_s)"
        ) from None
    try:
        yield conn
    finally:
        await pool.release(conn)


def _fault_text(fault: str | None, exc: BaseException) -> str:
    # The server's own words when it sent any ("terminating connection due to
    # administrator command"): asyncpg puts them in the lost connection's message.
    lost = next((e for e in _chain(exc) if isinstance(e, asyncpg.ConnectionDoesNotExistError)), None)
    said = str(lost).partition(": ")[2] if lost is not None else ""
    if fault is None:
        if lost is not None:
            fault = "connection lost"
        elif isinstance(exc, TimeoutError):
            fault = "no reply within [database] statement_timeout_s"
        else:
            fault = f"session failed mid-statement: {type(exc).__name__}: {exc}"
    return f"{fault} ({said})" if said and fault == "connection lost" else fault


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def describe(exc: BaseException) -> str:
    """One line for an operator: what the database failure means, then its text."""
    if isinstance(exc, DatabaseFault):
        return str(exc)
    if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
        return (
            f"the database is read-only (SQLSTATE 25006: {exc}): a standby, or a primary "
            "demoted by a failover? Point [database] url at the primary"
        )
    if isinstance(exc, asyncpg.QueryCanceledError) and "statement timeout" in str(exc):
        return f"statement timeout ([database] statement_timeout_s): {exc}"
    if isinstance(exc, asyncpg.CannotConnectNowError):
        return f"the database is not accepting connections (SQLSTATE {exc.sqlstate}: {exc})"
    if isinstance(exc, asyncpg.ConnectionDoesNotExistError):
        return _fault_text(None, exc)
    if isinstance(exc, TimeoutError):
        return "no reply from the database within [database] statement_timeout_s"
    if isinstance(exc, asyncpg.PostgresError):
        return f"{exc} (SQLSTATE {exc.sqlstate})"
    if isinstance(exc, OSError):
        return f"cannot reach the database: {exc}"
    return f"{type(exc).__name__}: {exc}"


def is_read_only(exc: BaseException) -> bool:
    return any(isinstance(e, asyncpg.ReadOnlySQLTransactionError) for e in _chain(exc))


async def read_only_reason(conn: asyncpg.Connection) -> str | None:
    """Why this session cannot write, or None if it can."""
    reason: str | None = await conn.fetchval(READ_ONLY_CHECK)
    return reason

"""Spacing of a provider's requests, measured where the provider measures it.

Why not ``aiolimiter.AsyncLimiter(1, 1 / rate)``, which spaces *acquisitions* evenly:
what the provider counts are *arrivals*, and between acquiring and sending there is
the connection set-up of the first request (and of any request after the keep-alive
expired) and an event loop busy with something else: at start-up, the drains that
parse and COPY the baseline. Measured on `make run`'s start-up at 2/s: the first
request left 160 ms after its acquisition, the next ones 1 ms after theirs, so three
requests arrived within 0.84 s and the provider (2/s) answered the third with
``429 Rate Limited Second``. At 8/s a 63 ms delay of one request already puts the next
one less than half an interval behind it. A rate equal to the provider's own limit
leaves no room at all for such jitter.

So a :class:`Pacer` gives one turn at a time (one request in flight per provider) and
starts the next turn ``interval_s`` after the previous turn *ended*, i.e. after its
response arrived (or it failed). The provider received request n before it answered
it, so request n+1 reaches it at least ``interval_s`` later, whatever the connection
or the event loop did meanwhile: the spacing holds by causality, not by timing. It
costs the response time on each interval, which is the margin below the provider's
limit. A provider's "slow down" (429, ``Retry-After``) pushes the next turn of every
caller sharing the pacer, not only the caller that was told.

The worker owns one pacer for its whole life (a SIGHUP changes its interval but keeps
its clock), and every geocoding pass of the process goes through it. Other processes
(a second replica, a `fleetticketsd geocode` run beside the daemon, whichever starts
first) take the same turn through :class:`DatabaseTurns`: a PostgreSQL advisory lock
per provider held while the request is in flight, and the provider's next send time
in ``tickets.geo_pacer`` on the database's clock, which every process shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import asyncpg

# Advisory lock keys (namespace, hashtext(provider)): a namespace of its own, apart from
# the datasets' and the migrations' (db.LOCK_NAMESPACE), so a dataset named like a
# provider cannot collide and the status page's lock holders stay the datasets'.
GEOCODER_LOCK_NAMESPACE = 0x46_4C_47  # "FLG"
TRY_PROVIDER_LOCK = "SELECT pg_try_advisory_lock($1, hashtext($2))"
PROVIDER_UNLOCK = "SELECT pg_advisory_unlock($1, hashtext($2))"
# Seconds until the provider's next request may leave, on the database's clock.
PROVIDER_WAIT_S = """
SELECT greatest(0, extract(epoch FROM next_send_at - clock_timestamp()))::float8
FROM tickets.geo_pacer WHERE provider = $1
"""
# After a turn: not before $2 seconds from now (never earlier than already set).
PROVIDER_PUSH = """
INSERT INTO tickets.geo_pacer AS p (provider, next_send_at)
VALUES ($1, clock_timestamp() + make_interval(secs => $2::float8))
ON CONFLICT (provider) DO UPDATE SET next_send_at = greatest(p.next_send_at, EXCLUDED.next_send_at)
"""
# How often a process waiting for another's turn looks again. Polled rather than a
# blocking pg_advisory_lock, which statement_timeout would cut short while another
# process waits out a long Retry-After.
LOCK_POLL_S = 0.05


async def _wait(seconds: float, stop: asyncio.Event | None) -> None:
    """Sleep, or less if ``stop`` is set meanwhile."""
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


@dataclass
class _Held:
    pool: asyncpg.Pool
    conn: asyncpg.Connection  # holds the provider's advisory lock
    key: str


class DatabaseTurns:
    """The pacer's turn across processes sharing one database (and so one provider key)."""

    def __init__(self, pool: Callable[[], asyncpg.Pool], key: Callable[[], str]) -> None:
        self._pool = pool
        self._key = key

    async def acquire(self, stop: asyncio.Event | None, interval_s: float) -> _Held | None:
        """Wait for the provider's turn; None if ``stop`` was set first."""
        pool, key = self._pool(), self._key()
        conn = await pool.acquire()
        try:
            while not await conn.fetchval(TRY_PROVIDER_LOCK, GEOCODER_LOCK_NAMESPACE, key):
                await _wait(LOCK_POLL_S, stop)
                if stop is not None and stop.is_set():
                    await pool.release(conn)
                    return None
            # A loop for the same reason as Pacer.turn's; only we can push it now, though.
            while wait := await conn.fetchval(PROVIDER_WAIT_S, key) or 0.0:
                await _wait(wait, stop)
                if stop is not None and stop.is_set():
                    break
            # Pushed once before the send as well: a process that dies with its request
            # in flight (no release) still leaves the interval behind it.
            await conn.execute(PROVIDER_PUSH, key, interval_s)
        except BaseException:
            await pool.release(conn)  # the pool's reset unlocks: nothing is left held
            raise
        return _Held(pool, conn, key)

    async def release(self, held: _Held, after_s: float) -> None:
        """End the turn: no process sends before ``after_s`` from now."""
        try:
            await held.conn.execute(PROVIDER_PUSH, held.key, after_s)
            await held.conn.fetchval(PROVIDER_UNLOCK, GEOCODER_LOCK_NAMESPACE, held.key)
        finally:
            await held.pool.release(held.conn)


class Pacer:
    """One request at a time, each turn starting ``interval_s`` after the previous one ended."""

    def __init__(
        self,
        interval_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        shared: DatabaseTurns | None = None,
    ) -> None:
        if not interval_s > 0:
            raise ValueError("interval_s must be positive")
        self.interval_s = interval_s
        self.shared = shared  # None: this process only (tests, tools)
        self._clock = clock
        self._lock = asyncio.Lock()
        self._next_at = float("-inf")  # no turn yet: the first one may start at once

    def set_rate(self, rate: float) -> None:
        """A new rate from the next turn on; a pending hold is kept."""
        self.interval_s = 1.0 / rate

    def hold(self, seconds: float) -> None:
        """No turn starts before ``seconds`` from now (a provider's Retry-After)."""
        self._next_at = max(self._next_at, self._clock() + max(0.0, seconds))

    def wait_s(self) -> float:
        """How long the next turn would wait now (0: it could start at once)."""
        return max(0.0, self._next_at - self._clock())

    @contextlib.asynccontextmanager
    async def turn(self, stop: asyncio.Event | None = None) -> AsyncIterator[bool]:
        """Wait for the turn, then hold it until the block ends; yields False if ``stop``
        was set meanwhile (send nothing then). The next turn starts ``interval_s`` after
        the block ends, or later if :meth:`hold` says so."""
        async with self._lock:
            # A loop, not one sleep: a hold() may push the time while we wait.
            while (wait := self._next_at - self._clock()) > 0:
                await _wait(wait, stop)
                if stop is not None and stop.is_set():
                    break
            shared, held = self.shared, None
            if shared is not None and not (stop is not None and stop.is_set()):
                held = await shared.acquire(stop, self.interval_s)  # other processes' turns
            try:
                yield (stop is None or not stop.is_set()) and (shared is None or held is not None)
            finally:
                now = self._clock()
                self._next_at = max(self._next_at, now + self.interval_s)
                if shared is not None and held is not None:  # the same pause for every process
                    await shared.release(held, self._next_at - now)

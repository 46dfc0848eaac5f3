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
its clock), and every geocoding pass of the process goes through it; several workers
in one process share one by passing it in. Another process (a second replica, a
`fleetticketsd geocode` run beside the daemon) is not covered: see docs/geocoding.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable


class Pacer:
    """One request at a time, each turn starting ``interval_s`` after the previous one ended."""

    def __init__(self, interval_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not interval_s > 0:
            raise ValueError("interval_s must be positive")
        self.interval_s = interval_s
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
                if stop is None:
                    await asyncio.sleep(wait)
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=wait)
                if stop.is_set():
                    break
            try:
                yield stop is None or not stop.is_set()
            finally:
                self._next_at = max(self._next_at, self._clock() + self.interval_s)

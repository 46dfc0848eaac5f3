"""The I/O around a serial apply: fetch ahead, archive behind.

Files must be applied one at a time, in name order; nothing forces the network
round trips around them to wait. A real bucket is tens of milliseconds away, and a
catch-up after an outage is hundreds of small deltas, so a serial
list/get/apply/copy/delete loop spends almost all its time waiting. The prefetcher
downloads the next files while the current one is applied (bounded in files and
bytes: memory stays flat however long the backlog), and the archiver moves applied
files to processed/ in the background (bounded concurrency). Neither can reorder an
apply: the drain asks for files in its own order, and a file is archived only after
its transaction committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog

from fleetticketsd.ingest.source import ChangeFile, S3Source, SourceError

log = structlog.get_logger("fleetticketsd.ingest.pipeline")


async def _chunks_of(data: bytes, chunk_bytes: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), chunk_bytes):
        yield data[i : i + chunk_bytes]
        # Bytes in memory never make the COPY await: without this, a 25 MB file held
        # the event loop (and /healthz, and every other dataset) for its whole COPY.
        await asyncio.sleep(0)


class Prefetcher:
    """Fetches the files of one pass ahead of their turn.

    A file larger than the whole byte window is never prefetched: it is streamed
    from S3 through the parser into COPY when its turn comes, so memory is bounded
    by the window, not by the largest file.
    """

    def __init__(
        self,
        source: S3Source,
        files: list[ChangeFile],
        *,
        max_files: int,
        max_bytes: int,
        chunk_bytes: int,
    ) -> None:
        self._source = source
        self._queue: deque[ChangeFile] = deque(files)
        self._tasks: dict[str, asyncio.Task[bytes]] = {}
        self._bytes = 0
        self._max_files = max_files
        self._max_bytes = max_bytes
        self._chunk_bytes = chunk_bytes
        # Time the apply spent waiting for prefetched bytes: near 0 while the
        # prefetch keeps ahead (bench/speed.py reports it).
        self.waited_s = 0.0
        self._fill()

    def add(self, files: list[ChangeFile]) -> None:
        """More files, after those already given, in the order they will be applied."""
        self._queue.extend(files)
        self._fill()

    def _fill(self) -> None:
        while self._queue and len(self._tasks) < self._max_files:
            f = self._queue[0]
            if f.size > self._max_bytes or (self._tasks and self._bytes + f.size > self._max_bytes):
                return  # the window is full, or this one will be streamed at its turn
            self._queue.popleft()
            self._bytes += f.size
            self._tasks[f.key] = asyncio.create_task(self._fetch(f), name=f"prefetch {f.name}")

    async def _fetch(self, f: ChangeFile) -> bytes:
        async with self._source.open(f, self._chunk_bytes) as chunks:
            return b"".join([c async for c in chunks])

    def ready(self, f: ChangeFile) -> bool:
        """Whether ``f``'s fetch has finished (its bytes, or its error, are here)."""
        task = self._tasks.get(f.key)
        return task is not None and task.done()

    @contextlib.asynccontextmanager
    async def open(self, f: ChangeFile) -> AsyncIterator[AsyncIterator[bytes]]:
        """The file's bytes: from the prefetch if it got them, else streamed now."""
        task = self._tasks.pop(f.key, None)
        if task is not None:
            waiting_since = time.monotonic()
            try:
                data: bytes | None = await task
            except SourceError as exc:
                # Transient trouble ahead of time is no verdict: fetch again now, and
                # only a failure at the file's own turn stops the pass.
                log.warning("prefetch failed; fetching again at its turn", key=f.key, error=str(exc))
                data = None
            finally:
                self._bytes -= f.size
                self.waited_s += time.monotonic() - waiting_since
            if data is not None:
                self._fill()
                yield _chunks_of(data, self._chunk_bytes)
                return
        elif self._queue and self._queue[0].key == f.key:
            self._queue.popleft()
        self._fill()  # keep fetching ahead while this one streams
        async with self._source.open(f, self._chunk_bytes) as chunks:
            yield chunks

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()


class Archiver:
    """Runs archive moves in the background, at most ``concurrency`` at a time.

    A failed move is not retried here beyond botocore's own retries: the file is
    in the ledger, so the next pass archives it without applying it again.
    """

    def __init__(self, move: Callable[[ChangeFile], Awaitable[bool]], concurrency: int) -> None:
        self._move = move
        self._limit = asyncio.Semaphore(concurrency)
        self._tasks: list[asyncio.Task[bool]] = []

    def submit(self, f: ChangeFile) -> None:
        self._tasks.append(asyncio.create_task(self._run(f), name=f"archive {f.name}"))

    async def _run(self, f: ChangeFile) -> bool:
        async with self._limit:
            return await self._move(f)

    async def wait(self) -> int:
        """Wait for every move; return how many did not complete."""
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        return sum(1 for r in results if r is not True)


class Deletes:
    """Deletes of archived originals, coalesced into DeleteObjects requests.

    Each caller awaits its own key. The first key goes at once, alone; keys that
    arrive while a request is in flight go together in the next one (up to 1,000):
    a catch-up pays one delete request per batch of moves instead of one per file,
    and no delete waits longer than the request ahead of it. A failed key raises
    SourceError for its caller only.
    """

    MAX_KEYS = 1000  # S3's limit per DeleteObjects

    def __init__(self, delete_many: Callable[[list[str]], Awaitable[dict[str, SourceError]]]) -> None:
        self._delete_many = delete_many
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._runner: asyncio.Task[None] | None = None

    async def delete(self, key: str) -> None:
        fut = self._waiting.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._waiting[key] = fut
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="archive deletes")
        await asyncio.shield(fut)

    async def _run(self) -> None:
        while self._waiting:
            keys = list(self._waiting)[: self.MAX_KEYS]
            batch = {k: self._waiting.pop(k) for k in keys}
            try:
                failed = await self._delete_many(keys)
            except Exception as exc:
                for fut in batch.values():
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for key, fut in batch.items():
                if fut.done():
                    continue
                if key in failed:
                    fut.set_exception(failed[key])
                else:
                    fut.set_result(None)

    async def close(self) -> None:
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)

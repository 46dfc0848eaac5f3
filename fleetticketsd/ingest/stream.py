"""A pass's files as a stream: changes/ listed page by page, looked up, merged with replays.

After a long outage ``changes/`` holds 100,000 files; listing them all before the
first apply took minutes (a listing page costs the server the same however far in it
is) and held every file in memory. Here a background task reads listing pages (at
most ``window_pages`` ahead of the pass), and the pass takes them as it needs files:
each page is looked up in the ledger on the pass's own connection (between two
files; nothing else uses it then), its decided files handed to the archiver, its
pending ones merged by name with the processed/ files to replay. Both listings are
name-ordered, so the merge is a streaming one and the order is exactly the one the
whole lists gave (semantic 1); a name in both is the changes/ version.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

from fleetticketsd.ingest.ledger import LedgerEntry
from fleetticketsd.ingest.source import ChangeFile

Lookup = Callable[[list[str]], Awaitable[dict[tuple[str, str], LedgerEntry]]]


class PageReader:
    """Reads a listing's pages in the background, at most ``window_pages`` ahead of
    the pass: started first, so the listing runs while the pass does its other reads."""

    def __init__(self, pages: AsyncIterator[list[ChangeFile]], window_pages: int) -> None:
        self._pages: asyncio.Queue[list[ChangeFile] | BaseException | None] = asyncio.Queue(window_pages)
        self._answered = asyncio.Event()  # the first page, the end, or the error is in
        self._error: Exception | None = None
        self._task = asyncio.create_task(self._read(pages), name="listing pages")

    async def _read(self, pages: AsyncIterator[list[ChangeFile]]) -> None:
        try:
            async for page in pages:
                self._answered.set()
                await self._pages.put(page)
        except Exception as exc:  # handed to the pass, which fails at "list"
            self._error = exc
            self._answered.set()
            await self._pages.put(exc)
            return
        self._answered.set()
        await self._pages.put(None)

    async def first_error(self) -> Exception | None:
        """The listing's error if its first request failed (waits for that answer):
        when both listings of a pass fail, changes/'s error is the one reported."""
        await self._answered.wait()
        return self._error

    async def get(self) -> list[ChangeFile] | None:
        """The next page; None at the end of the listing. Raises what the listing raised."""
        item = await self._pages.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def ready(self) -> bool:
        return not self._pages.empty()

    async def __aenter__(self) -> PageReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class PassFiles:
    """The files one pass applies, in order: ``first`` (a blocked key), then the
    pending files of ``pages`` merged with ``replayed``. Also counts what the listing
    saw: ``newest``, ``waiting`` (pending under changes/), ``oldest_waiting``."""

    def __init__(
        self,
        pages: PageReader,
        lookup: Lookup,
        replayed: list[ChangeFile],
        *,
        first: ChangeFile | None,
        on_decided: Callable[[ChangeFile, LedgerEntry], None],
        on_due: Callable[[list[ChangeFile]], None],
    ) -> None:
        self._lookup = lookup
        self._replay = deque(replayed)
        self._replay_keys = {f.key for f in replayed}
        self._first = first
        self._on_decided = on_decided
        self._on_due = on_due
        self._pages = pages
        self._due: deque[ChangeFile] = deque()
        self.newest: ChangeFile | None = None
        self.waiting = 0
        self.oldest_waiting: ChangeFile | None = None
        self.listed_all = False
        self.pages_taken = 0
        self.taken = 0  # files handed to the pass
        if first is not None:
            self._emit([first])

    def is_replay(self, f: ChangeFile) -> bool:
        return f.key in self._replay_keys

    def _emit(self, files: list[ChangeFile]) -> None:
        self._due.extend(files)
        self._on_due(files)

    async def _take_page(self) -> None:
        item = await self._pages.get()
        if item is None:
            self.listed_all = True
            rest = [f for f in self._replay if self._first is None or f.key != self._first.key]
            self._replay.clear()
            if rest:
                self._emit(rest)
            return
        self.pages_taken += 1
        self.newest = item[-1]
        known = await self._lookup([f.key for f in item])
        out: list[ChangeFile] = []
        for f in item:
            entry = known.get((f.key, f.etag))
            if entry is not None:
                self._on_decided(f, entry)
                continue
            self.waiting += 1
            if self.oldest_waiting is None:
                self.oldest_waiting = f
            while self._replay and self._replay[0].name < f.name:
                out.append(self._replay.popleft())
            if self._replay and self._replay[0].name == f.name:
                self._replay.popleft()  # applying the changes/ version archives it
            out.append(f)
        if self._first is not None:
            out = [f for f in out if f.key != self._first.key]
        if out:
            self._emit(out)

    async def fill(self, files: int, wait: bool = True) -> None:
        """Take pages until ``files`` are due or the listing has ended; without
        ``wait``, only the pages already read from the bucket."""
        while len(self._due) < files and not self.listed_all and (wait or self._pages.ready()):
            await self._take_page()

    def peek(self) -> ChangeFile | None:
        """The next file, if it is known without waiting."""
        return self._due[0] if self._due else None

    async def next(self) -> ChangeFile | None:
        """The next file to apply; None when the listing has ended and all are taken."""
        await self.fill(1)
        if not self._due:
            return None
        self.taken += 1
        return self._due.popleft()

    @property
    def known(self) -> int:
        """Files due and not yet taken, as far as the pages taken show."""
        return len(self._due)

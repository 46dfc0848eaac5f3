"""An HTTP proxy in front of the moto server that injects the faults a real bucket
across the internet produces, by rule.

Each request is classified (``list``, ``get``, ``head``, ``put``, ``copy``,
``delete``) and matched against the rules in the order they were added; the first
rule that matches and has uses left decides what the client gets:

- ``status`` (with ``code``/``message`` and ``headers``, e.g. Retry-After): an S3
  error document instead of the real answer; nothing reaches moto;
- ``stall_after_s``: the real answer's headers, then nothing for that long (a body
  that stalls after its headers);
- ``trickle_bytes`` / ``trickle_interval_s``: the real body, slowly but steadily;
- ``cut_after_bytes``: the real headers and that many body bytes, then the
  connection closes (a body cut off mid-stream);
- ``reset``: the connection closes before any answer.

``down()`` closes the listening socket (connection refused) and ``up()`` opens it
again on the same port. Every request is recorded in ``seen``. The proxy runs its
own event loop in a thread, so sync tests (a daemon as a process) and async tests
(an in-process drain on the test's loop) use it alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import aiohttp
from aiohttp import web

# Hop-by-hop and framing headers: each side of the proxy sets its own.
_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "expect"}
ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<Resource>{resource}</Resource><RequestId>fault-proxy</RequestId></Error>"
)


@dataclass
class Fault:
    op: str | None = None  # list | get | head | put | copy | delete; None: any
    key: str | None = None  # regex searched in "PATH?QUERY", unquoted (a listing's prefix is in its query)
    times: int | None = 1  # uses left; None: until removed
    status: int | None = None
    code: str = ""
    message: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    stall_after_s: float | None = None
    trickle_bytes: int = 0
    trickle_interval_s: float = 0.0
    cut_after_bytes: int | None = None
    reset: bool = False
    hits: int = 0

    def matches(self, op: str, target: str) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.op is not None and self.op != op:
            return False
        return self.key is None or re.search(self.key, target) is not None


@dataclass(frozen=True)
class Seen:
    at: float  # time.monotonic()
    op: str
    target: str  # "PATH?QUERY", unquoted
    fault: Fault | None


def classify(method: str, path: str, headers: Any, query: str = "") -> str:
    parts = path.strip("/").split("/", 1)
    if method == "POST" and query.split("&", 1)[0].split("=", 1)[0] == "delete":
        return "delete"  # DeleteObjects: several keys in one request
    if method == "GET" and (len(parts) < 2 or not parts[1]):
        return "list"
    if method == "PUT" and "x-amz-copy-source" in headers:
        return "copy"
    return {"GET": "get", "HEAD": "head", "PUT": "put", "DELETE": "delete"}.get(method, method.lower())


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults: list[Fault] = []
        self.seen: deque[Seen] = deque(maxlen=200_000)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="s3-fault-proxy", daemon=True)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._session: aiohttp.ClientSession | None = None
        self._release: asyncio.Event | None = None
        self.port = 0

    # --- control, from any thread ------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def add(self, fault: Fault | None = None, **rule: Any) -> Fault:
        f = fault or Fault(**rule)
        with self._lock:
            self.faults.append(f)
        return f

    def clear(self) -> None:
        """Drop every rule and let any stalled answer go (its connection closes)."""
        with self._lock:
            self.faults.clear()
        self._call(self._release_stalls())

    def down(self) -> None:
        """Stop listening: every new connection is refused until up()."""
        self._call(self._down())

    def up(self) -> None:
        self._call(self._up())

    def requests(self, op: str | None = None, key: str | None = None) -> list[Seen]:
        with self._lock:
            seen = list(self.seen)
        return [s for s in seen if (op is None or s.op == op) and (key is None or re.search(key, s.target))]

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    # --- the server, on its own loop ---------------------------------------------------

    async def _start(self) -> None:
        # No pooled upstream connections: a stall or a cut must not poison the next request.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True), auto_decompress=False
        )
        self._release = asyncio.Event()
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await self._up()

    async def _up(self) -> None:
        assert self._runner is not None
        if self._site is not None:
            return
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        if not self.port:
            self.port = int(self._runner.addresses[0][1])

    async def _down(self) -> None:
        if self._site is not None:
            await self._site.stop()
            self._site = None
        # Kept-alive connections would carry on past a closed listener.
        server = self._runner.server if self._runner is not None else None
        for conn in list(server.connections if server is not None else []):
            if conn.transport is not None:
                conn.transport.abort()

    async def _release_stalls(self) -> None:
        assert self._release is not None
        self._release.set()
        self._release = asyncio.Event()

    async def _stop(self) -> None:
        await self._release_stalls()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _match(self, op: str, target: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.matches(op, target):
                    f.hits += 1
                    if f.times is not None:
                        f.times -= 1
                    return f
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        path = unquote(request.path)
        op = classify(request.method, path, request.headers, request.query_string)
        target = f"{path}?{unquote(request.query_string)}"
        fault = self._match(op, target)
        with self._lock:
            self.seen.append(Seen(time.monotonic(), op, target, fault))
        if fault is not None and fault.reset:
            _close(request, abort=True)
            return web.Response(status=500)  # never reaches the client
        if fault is not None and fault.status is not None:
            text = (
                ""
                if request.method == "HEAD"
                else ERROR_XML.format(code=fault.code, message=fault.message, resource=path)
            )
            return web.Response(
                status=fault.status, text=text, content_type="application/xml", headers=fault.headers
            )
        try:
            return await self._forward(request, body, fault)
        except (ConnectionError, aiohttp.ClientConnectionError):
            # The client went away, or down() cut the connection: nobody to answer.
            _close(request, abort=True)
            return web.Response(status=500)

    async def _forward(self, request: web.Request, body: bytes, fault: Fault | None) -> web.StreamResponse:
        assert self._session is not None and self._release is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        url = self.upstream + request.raw_path
        async with self._session.request(
            request.method, url, headers=headers, data=body or None, allow_redirects=False
        ) as up:
            out = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():
                if k.lower() not in _HOP:
                    out.headers[k] = v
            if up.content_length is not None:
                out.content_length = up.content_length
            await out.prepare(request)
            if request.method == "HEAD":
                return out
            if fault is not None and fault.stall_after_s is not None:
                release = self._release
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(release.wait(), fault.stall_after_s)
                _close(request)
                return out
            sent = 0
            async for chunk in _pieces(up, fault):
                if fault is not None and fault.cut_after_bytes is not None:
                    room = fault.cut_after_bytes - sent
                    if room <= len(chunk):
                        await out.write(chunk[:room])
                        _close(request)
                        return out
                await out.write(chunk)
                sent += len(chunk)
            await out.write_eof()
            return out


def _close(request: web.Request, abort: bool = False) -> None:
    transport = request.transport
    if transport is not None:  # None: the client already went away
        transport.abort() if abort else transport.close()


async def _pieces(up: aiohttp.ClientResponse, fault: Fault | None) -> Any:
    if fault is not None and fault.trickle_bytes:
        while chunk := await up.content.read(fault.trickle_bytes):
            yield chunk
            await asyncio.sleep(fault.trickle_interval_s)
        return
    async for chunk in up.content.iter_chunked(1 << 16):
        yield chunk


@contextlib.contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream).start()
    try:
        yield proxy
    finally:
        proxy.stop()

"""A loopback TCP proxy that adds a fixed one-way delay in each direction.

It makes a local S3 server behave like a bucket across the internet: every byte
arrives ``delay_s`` later than it was sent, in order, without limiting throughput
(a queue per direction, not a sleep per read). 25 ms each way gives a 50 ms RTT.
"""

from __future__ import annotations

import asyncio
import contextlib
import time


class LatencyProxy:
    def __init__(self, target_host: str, target_port: int, delay_s: float) -> None:
        self.target = (target_host, target_port)
        self.delay_s = delay_s
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            self._pipe(client_r, upstream_w), self._pipe(upstream_r, client_w), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            with contextlib.suppress(Exception):
                writer.close()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((time.monotonic() + self.delay_s, data))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait((time.monotonic() + self.delay_s, b""))
            with contextlib.suppress(Exception):
                await sender


def main() -> None:
    """Run as its own process, so proxying costs the measured process nothing."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--port", type=int, required=True, help="loopback port to listen on")
    ap.add_argument("--delay-s", type=float, default=0.025, help="one-way delay")
    args = ap.parse_args()
    host, port = args.target.rsplit(":", 1)

    async def serve() -> None:
        proxy = LatencyProxy(host, int(port), args.delay_s)
        server = await asyncio.start_server(proxy._handle, "127.0.0.1", args.port)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()

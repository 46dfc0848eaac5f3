"""Headless Chromium (Debian's `chromium`), driven over the DevTools protocol.

A few dozen lines over aiohttp's websocket client instead of a browser-automation
package: those bring their own browser builds or drivers (which this network cannot
fetch), and the tests need only navigate, evaluate, screenshot and the console.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

# As root, without these Chromium refuses to start (sandbox) or reaches for the network
# (component updates, sync, QUIC probes), which is closed here.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-port=0",
)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One tab: commands by id, events kept for the test to read."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self._waiting:
                self._waiting.pop(data["id"]).set_result(data)
            else:
                self.events.append(data)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[n] = fut
        await self.ws.send_str(json.dumps({"id": n, "method": method, "params": params}))
        reply = await asyncio.wait_for(fut, 30)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return dict(reply.get("result", {}))

    async def goto(self, url: str) -> None:
        seen = len(self.events)
        await self.send("Page.navigate", url=url)
        deadline = time.monotonic() + 30
        while not any(ev.get("method") == "Page.loadEventFired" for ev in self.events[seen:]):
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not load")
            await asyncio.sleep(0.05)

    async def eval(self, expression: str) -> Any:
        out = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in out:
            raise AssertionError(f"{expression}: {out['exceptionDetails']}")
        return out["result"].get("value")

    async def screenshot(self) -> bytes:
        """The whole page as PNG."""
        out = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        return base64.b64decode(out["data"])

    def console_errors(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions, failed loads."""
        found = []
        for ev in self.events:
            method, p = ev.get("method"), ev.get("params", {})
            if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                found.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                found.append(json.dumps(p.get("exceptionDetails")))
            elif method == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
                found.append(f"{p['entry'].get('text')} ({p['entry'].get('url')})")
        return found

    def requested_urls(self) -> list[str]:
        return [
            ev["params"]["request"]["url"]
            for ev in self.events
            if ev.get("method") == "Network.requestWillBeSent"
        ]


def _launch(profile: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start Chromium on a fresh profile; its DevTools port, from the file it writes there."""
    exe = chromium()
    assert exe, "chromium is not installed (Debian package chromium; .ci/run installs it)"
    profile.mkdir(parents=True, exist_ok=True)
    log_path = profile / "chromium.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"], stdout=log, stderr=subprocess.STDOUT
        )
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"chromium did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc, int(port_file.read_text().split()[0])


@contextlib.asynccontextmanager
async def open_page(profile: Path, width: int = 1280, height: int = 900) -> AsyncIterator[Page]:
    proc, port = _launch(profile)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with http.ws_connect(url, max_msg_size=0) as ws:
                page = Page(ws)
                for domain in ("Page", "Runtime", "Log", "Network"):
                    await page.send(f"{domain}.enable")
                await page.send(
                    "Emulation.setDeviceMetricsOverride",
                    width=width,
                    height=height,
                    deviceScaleFactor=1,
                    mobile=False,
                )
                yield page
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

"""Headless Chromium driven over the DevTools protocol, for the tests that check a page in a real browser."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest


def find_browser() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


@contextlib.asynccontextmanager
async def devtools_page(browser: str, profile: Path, *flags: str
                        ) -> AsyncIterator[tuple[Callable[..., Awaitable[dict]], Callable[[str], Awaitable[None]]]]:
    """A fresh headless Chromium (``flags`` added) and its one page: yields ``call(method, **params)`` and
    ``wait_event(method)``; the browser is killed on the way out."""
    aiohttp = pytest.importorskip("aiohttp", reason="the browser test talks to Chromium with aiohttp's websockets")
    proc = await asyncio.create_subprocess_exec(
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0", *flags,
        f"--user-data-dir={profile}", "about:blank", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        ws_url = None
        while ws_url is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
            if not line:
                raise AssertionError("chromium exited before opening its DevTools port")
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            ws_url = m.group(1) if m else None
        port = re.search(r":(\d+)/", ws_url).group(1)
        async with aiohttp.ClientSession() as s:
            targets = await (await s.get(f"http://127.0.0.1:{port}/json/list")).json()
            page = next(t for t in targets if t["type"] == "page")
            async with s.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                ids = iter(range(1, 1_000_000))
                seen: set[str] = set()  # events that arrived while waiting for answers

                async def receive() -> dict:
                    msg = json.loads((await asyncio.wait_for(ws.receive(), 60)).data)
                    if "method" in msg:
                        seen.add(msg["method"])
                    return msg

                async def call(method: str, **params) -> dict:
                    i = next(ids)
                    await ws.send_json({"id": i, "method": method, "params": params})
                    while True:
                        msg = await receive()
                        if msg.get("id") == i:
                            assert "error" not in msg, msg
                            return msg["result"]

                async def wait_event(method: str) -> None:
                    while method not in seen:
                        await receive()

                yield call, wait_event
    finally:
        proc.kill()
        await proc.wait()

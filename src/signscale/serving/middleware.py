"""The ASGI layers around the service's FastAPI app: the body cap, request metrics, the outer shell.

They are pure ASGI rather than FastAPI middleware because they must see a request before FastAPI
does: the body cap refuses a declared ``Content-Length`` over the limit before a byte of the body
is read, and the observer, outermost, counts those refusals too. The shell is what uvicorn runs;
its ``.app`` gives back the FastAPI object (whose ``state`` holds the service's state).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["KNOWN_PATHS", "BodyLimit", "Observe", "Outer", "drain", "drain_limit", "error_body"]

# request metrics carry these paths as labels; any other path is "other" (or "/static"), so a scan of
# random URLs cannot grow the number of series without bound
KNOWN_PATHS = ("/", "/v1/classify", "/v1/detect", "/v1/model", "/healthz", "/readyz", "/metrics")


def error_body(status: int, reason: str, message: str) -> dict[str, Any]:
    """The one JSON shape of every refusal, here and in the app's error handlers (docs/serving.md)."""
    return {"error": {"status": status, "reason": reason, "message": message}}


class BodyLimit:
    """Pure ASGI middleware: 413 for a declared body over the cap, before the app reads anything."""

    def __init__(self, app: Any, max_bytes: int, on_refuse: Callable[[str], None]) -> None:
        self.app, self.max_bytes, self.on_refuse = app, max_bytes, on_refuse

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            declared = dict(scope.get("headers") or ()).get(b"content-length")
            reason = None
            if declared is not None:
                text = declared.decode("latin-1").strip()
                if not text.isdigit():
                    reason, status, msg = "bad_content_length", 400, f"Content-Length {text[:40]!r} is not a number"
                elif int(text) > self.max_bytes:
                    reason, status, msg = "body_too_large", 413, (f"request body of {int(text)} bytes exceeds the "
                                                                   f"limit of {self.max_bytes} bytes")
            if reason is not None:
                self.on_refuse(reason)
                await drain(receive, drain_limit(self.max_bytes))
                await send_json(send, status, error_body(status, reason, msg), {"Connection": "close"})
                return
        await self.app(scope, receive, send)


def drain_limit(max_bytes: int) -> int:
    """How much of a refused body to read before closing anyway: a generous multiple of the cap."""
    return max(8 * max_bytes, 64 << 20)


async def drain(receive: Any, limit: int) -> None:
    """Read and drop up to ``limit`` body bytes before refusing a request.

    Closing a socket with unread data makes the kernel send a reset, which destroys the refusal
    the client has not read yet; the client then sees "connection reset" instead of a 413 that
    says why. Beyond ``limit`` the connection is closed anyway (a lingering close, as nginx does).
    """
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def send_json(send: Any, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
    import json

    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class Observe:
    """Pure ASGI middleware: request count and latency per known path and status."""

    def __init__(self, app: Any, metrics: Any) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        label = path if path in KNOWN_PATHS else ("/static" if path.startswith("/static/") else "other")
        status = {"code": 500}
        started = time.perf_counter()

        async def send_(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_)
        finally:
            self.metrics.requests.labels(label, str(status["code"])).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - started)


class Outer:
    """The ASGI callable uvicorn runs: middlewares around FastAPI; ``.app`` is the FastAPI object."""

    def __init__(self, asgi: Any, app: Any) -> None:
        self.asgi, self.app = asgi, app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await self.asgi(scope, receive, send)

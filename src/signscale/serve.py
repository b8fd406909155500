"""``signscale serve``: a FastAPI app, thin over :class:`signscale.predict.Predictor`, run by uvicorn.

Endpoints: ``POST /v1/classify`` (one or more images, multipart or a raw body), ``POST /v1/detect``
(one scene; needs a detector), ``GET /v1/model``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics``
(Prometheus), ``GET /docs`` (OpenAPI) and ``GET /``, a page to try the model in a browser.

How a request flows, and why:

1. **Body cap before parsing.** An ASGI middleware refuses a ``Content-Length`` over the cap with
   413 before a byte of the body is read; a chunked body is counted while it streams and refused
   the moment it passes the cap. Only then is multipart parsed.
2. **Decode in a thread**, with the pixel cap checked from the header (:func:`images.decode`), the
   full decode forced so truncated files fail here, and every failure mapped to a 4xx JSON error
   naming the reason (PIL reports non-images and truncation as ``OSError``, lazily; a service that
   lets those escape answers 500 to bad input).
3. **Dynamic batching.** Decoded images wait in one bounded queue; one runner thread takes up to
   ``max_batch`` images, waiting at most ``max_wait_ms`` for the batch to fill, and runs them in one
   forward pass. On a CPU the per-call overhead of a small CNN is most of its cost, so batching
   concurrent requests multiplies throughput. A full queue answers 503 with ``Retry-After``; a
   request waiting longer than ``request_timeout_s`` answers 503 too (the service is overloaded:
   the client should retry, not fix its request).
4. **Hot reload.** With a registry alias (or any *model source*: a callable returning
   ``(version, url)``), a poller thread resolves the alias every ``reload_interval_s``; a new
   version is loaded, checksum-verified and warmed up beside the serving one, then swapped in
   with one reference assignment. Each queued image remembers the predictor that prepared it and
   is run by that one, so in-flight requests finish on the old model; a model that fails to load
   or warm up is logged, counted and never serves (Triton's model-control bar).

A 5xx from this service is a bug in it, never a bad request; tests fuzz that with malformed input.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import numpy as np

from signscale import config, images

try:  # the serve extra; without it create_app() says which extra to install
    from starlette.requests import Request
except ImportError:  # pragma: no cover
    Request = Any  # type: ignore[misc,assignment]
from signscale.predict import DEFAULT_MAX_PIXELS, PredictConfig, Predictor, resolve_model

__all__ = ["ApiError", "Batcher", "ModelSlot", "ServeConfig", "ServeError", "Service", "bind", "create_app", "running",
           "serve"]

log = logging.getLogger("signscale.serve")

ModelSource = Callable[[], tuple[str, str]]  # () -> (version, model URL)
KNOWN_PATHS = ("/", "/v1/classify", "/v1/detect", "/v1/model", "/healthz", "/readyz", "/metrics")
RAW_TYPES = ("application/octet-stream",)


class ServeError(ValueError):
    """A service that cannot start as configured; the message names the option and the fix."""


@dataclass(frozen=True)
class ServeConfig:
    """Everything the service does that a deployment may want to change; nothing is hard-coded."""

    model: str  # model folder, ONNX export folder, or REGISTRY_URL@ALIAS (reloaded when the alias moves)
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (read it back from the bound socket)
    workers: int = 1  # server processes sharing the socket (each loads the model)
    backend: Literal["auto", "torch", "onnx"] = "auto"
    device: str = "cpu"
    threads: int = 0  # intra-op threads of the model runner (0: the back-end's default)
    detector: str = ""  # detector model URL: enables POST /v1/detect
    detect_threshold: float = 0.3  # detector score below which a box is dropped
    top_k: int = 5
    batching: bool = True  # False: every image is its own forward pass (a baseline)
    max_batch: int = 32  # images per forward pass
    max_wait_ms: float = 2.0  # how long the first image of a batch waits for company
    max_queue: int = 256  # images waiting for the model; beyond this: 503 + Retry-After
    max_body_bytes: int = 8 << 20  # request bodies above this: 413 before parsing
    max_pixels: int = DEFAULT_MAX_PIXELS  # per image, from the header: 413 (below Pillow's bomb limit)
    max_images: int = 64  # images per classify request
    request_timeout_s: float = 30.0  # waiting for the model beyond this: 503
    read_timeout_s: float = 30.0  # receiving the body beyond this: 408
    retry_after_s: int = 1
    reload_interval_s: float = 30.0  # poll the model source for a new version (0: never)
    log_level: str = "warning"

    def __post_init__(self) -> None:
        if not self.model:
            raise config.ConfigError("model: give a model folder, an ONNX export folder or REGISTRY_URL@ALIAS")
        if not 0 <= self.port <= 65535:
            raise config.ConfigError(f"port: expected 0..65535, got {self.port}")
        for name in ("workers", "top_k", "max_batch", "max_queue", "max_body_bytes", "max_pixels", "max_images",
                     "retry_after_s"):
            if getattr(self, name) < 1:
                raise config.ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_wait_ms", "reload_interval_s", "threads"):
            if getattr(self, name) < 0:
                raise config.ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("request_timeout_s", "read_timeout_s"):
            if not getattr(self, name) > 0:
                raise config.ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.max_queue < self.max_images:
            raise config.ConfigError(f"max_queue ({self.max_queue}) must be >= max_images ({self.max_images}), "
                                     "or a full-size request could never be queued")
        PredictConfig(model=self.model, top_k=self.top_k, backend=self.backend, max_pixels=self.max_pixels)

    def predict_config(self) -> PredictConfig:
        return PredictConfig(model=self.model, top_k=self.top_k, batch_size=self.effective_batch(),
                             backend=self.backend, device=self.device, threads=self.threads,
                             max_pixels=self.max_pixels, detector=self.detector,
                             detect_threshold=self.detect_threshold)

    def effective_batch(self) -> int:
        return self.max_batch if self.batching else 1


class ApiError(Exception):
    """A request the service refuses: becomes ``{"error": {"status", "reason", "message"}}``."""

    def __init__(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.headers = status, reason, message, headers or {}


class Overloaded(ApiError):
    def __init__(self, reason: str, message: str, retry_after_s: int) -> None:
        super().__init__(503, reason, message, {"Retry-After": str(retry_after_s)})


# Image failures -> (status, what the client should do)
_IMAGE_STATUS = {"too_many_pixels": 413, "bad_size": 400, "empty": 400}


# ---------------------------------------------------------------------------------------------
# The serving model and its hot reload


class ModelSlot:
    """Holds the serving :class:`Predictor`; :meth:`poll` loads a new version beside it and swaps.

    Generic over the *source* (a callable returning ``(version, url)``), so a registry alias, a
    pointer file or a test can drive it. The swap is one attribute assignment (atomic in Python);
    readers take ``slot.current`` once per batch and keep that reference.
    """

    def __init__(self, source: ModelSource, load: Callable[[str, str], Predictor], *,
                 on_event: Callable[[str, str, str], None] | None = None) -> None:
        self._source = source
        self._load = load
        self._on_event = on_event or (lambda result, version, detail: None)
        self._lock = threading.Lock()  # one reload at a time
        self._refused: dict[str, str] = {}  # version -> why it never served
        self.current: Predictor | None = None

    def start(self) -> Predictor:
        """Load the first model; unlike a reload, a failure here stops the service from starting."""
        version, url = self._source()
        self.current = self._prepare(url, version)
        self._on_event("loaded", version, url)
        return self.current

    def _prepare(self, url: str, version: str) -> Predictor:
        predictor = self._load(url, version)
        predictor.warmup()
        return predictor

    def poll(self) -> str:
        """Check the source once: ``unchanged``, ``swapped``, ``refused`` (load/warm-up failed) or ``error``."""
        with self._lock:
            try:
                version, url = self._source()
            except Exception as exc:  # noqa: BLE001 - a flaky registry must not stop the service
                self._on_event("source_error", "", f"{type(exc).__name__}: {exc}")
                return "error"
            current = self.current
            if (current is not None and version == current.version) or version in self._refused:
                return "unchanged"
            try:
                fresh = self._prepare(url, version)
            except Exception as exc:  # noqa: BLE001 - whatever broke, the old model keeps serving
                if not isinstance(exc, OSError):  # transient reads are retried at the next poll
                    self._refused[version] = f"{type(exc).__name__}: {exc}"
                self._on_event("refused", version, f"{type(exc).__name__}: {exc}")
                return "refused"
            self.current = fresh
            self._on_event("swapped", version, url)
            return "swapped"

    def refused(self) -> dict[str, str]:
        return dict(self._refused)


class _Poller:
    """A daemon thread calling ``slot.poll()`` every ``interval`` seconds until stopped."""

    def __init__(self, slot: ModelSlot, interval: float) -> None:
        self._slot, self._interval = slot, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="signscale-model-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._slot.poll()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------
# Dynamic batching


@dataclass
class _Item:
    arrays: list[np.ndarray]
    predictor: Predictor
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Groups images of concurrent requests into forward passes of up to ``max_batch`` images.

    Runs in the event loop; the forward pass runs on one dedicated thread (the network is the
    bottleneck, and two passes at once on a small CPU only contend for its cores).
    """

    def __init__(self, *, max_batch: int, max_wait_s: float, max_queue: int, retry_after_s: int,
                 observe: Callable[[int], None] | None = None) -> None:
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.retry_after_s = retry_after_s
        self._observe = observe or (lambda n: None)
        self._items: deque[_Item] = deque()
        self.queued = 0  # images waiting
        self.incoming = 0  # requests decoding, about to submit
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="signscale-runner")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=True)

    def enqueue(self, arrays: list[np.ndarray], predictor: Predictor) -> asyncio.Future:
        """Queue ``arrays`` (prepared by ``predictor``, and to be run by it); 503 when the queue is full."""
        if self.queued + len(arrays) > self.max_queue:
            raise Overloaded("queue_full", f"{self.queued} images are waiting for the model (limit "
                             f"{self.max_queue}); retry after {self.retry_after_s}s", self.retry_after_s)
        item = _Item(arrays, predictor, asyncio.get_running_loop().create_future())
        self._items.append(item)
        self.queued += len(arrays)
        self._wake.set()
        return item.future

    async def result(self, future: asyncio.Future, timeout_s: float) -> np.ndarray:
        """The probabilities for a queued request; 503 when the model does not get to it in time."""
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise Overloaded("timeout", f"the model did not answer within {timeout_s:g}s (the service is "
                             f"overloaded); retry after {self.retry_after_s}s", self.retry_after_s) from None

    async def submit(self, arrays: list[np.ndarray], predictor: Predictor, timeout_s: float) -> np.ndarray:
        return await self.result(self.enqueue(arrays, predictor), timeout_s)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._items:
                self._wake.clear()
                await self._wake.wait()
            batch = await self._collect(loop)
            if not batch:
                continue
            predictor = batch[0].predictor
            x = np.stack([a for it in batch for a in it.arrays])
            self._observe(len(x))
            try:
                probs = await loop.run_in_executor(self._pool, predictor.probabilities, x)
            except Exception as exc:  # noqa: BLE001 - delivered to each waiting request (a 500: a bug)
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(exc)
                continue
            start = 0
            for it in batch:
                n = len(it.arrays)
                if not it.future.done():
                    it.future.set_result(probs[start:start + n])
                start += n

    async def _collect(self, loop: asyncio.AbstractEventLoop) -> list[_Item]:
        """Up to ``max_batch`` images of one predictor.

        Waits at most ``max_wait_s`` for more, and only while some request is still decoding: with
        nobody on the way, waiting would only add latency (a lone client pays nothing for batching).
        """
        deadline = loop.time() + self.max_wait_s
        batch: list[_Item] = []
        n = 0
        while True:
            while self._items:
                head = self._items[0]
                if head.future.done():  # timed out: skip its work
                    self._items.popleft()
                    self.queued -= len(head.arrays)
                    continue
                if batch and (head.predictor is not batch[0].predictor or n + len(head.arrays) > self.max_batch):
                    return batch
                self._items.popleft()
                self.queued -= len(head.arrays)
                batch.append(head)
                n += len(head.arrays)
                if n >= self.max_batch:
                    return batch
            remaining = deadline - loop.time()
            if not batch or remaining <= 0 or self.incoming == 0:
                return batch
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return batch

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Marks a request as on its way (decoding), so a forming batch waits for it."""
        self.incoming += 1
        try:
            yield
        finally:
            self.incoming -= 1
            self._wake.set()


# ---------------------------------------------------------------------------------------------
# Metrics


class _Metrics:
    """Prometheus series in a registry of this app's own (several apps in one process stay apart)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("signscale_requests", "HTTP requests by path and status", ["path", "status"],
                                registry=r)
        self.latency = Histogram("signscale_request_seconds", "request latency", ["path"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.errors = Counter("signscale_errors", "refused or failed requests by reason", ["reason"], registry=r)
        self.batch = Histogram("signscale_batch_images", "images per forward pass", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue = Gauge("signscale_queue_images", "images waiting for the model", registry=r)
        self.reloads = Counter("signscale_model_reloads", "model source events", ["result"], registry=r)
        self.model = Gauge("signscale_model_info", "the serving model (value 1)", ["version", "backend"],
                           registry=r)

    def serving(self, predictor: Predictor) -> None:
        self.model.clear()
        self.model.labels(predictor.version, predictor.backend).set(1)


# ---------------------------------------------------------------------------------------------
# The app


def _error_body(status: int, reason: str, message: str) -> dict[str, Any]:
    return {"error": {"status": status, "reason": reason, "message": message}}


class _BodyLimit:
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
                await _drain(receive, _drain_limit(self.max_bytes))
                await _send_json(send, status, _error_body(status, reason, msg), {"Connection": "close"})
                return
        await self.app(scope, receive, send)


def _drain_limit(max_bytes: int) -> int:
    return max(8 * max_bytes, 64 << 20)


async def _drain(receive: Any, limit: int) -> None:
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


async def _send_json(send: Any, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
    import json

    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class _Observe:
    """Pure ASGI middleware: request count and latency per known path and status."""

    def __init__(self, app: Any, metrics: _Metrics) -> None:
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


@dataclass
class _State:
    cfg: ServeConfig
    slot: ModelSlot
    metrics: _Metrics
    batcher: Batcher | None = None
    poller: _Poller | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    startup_error: BaseException | None = None


def _fastapi() -> Any:
    try:
        import fastapi
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ServeError("serving needs FastAPI, uvicorn and prometheus_client: pip install 'signscale[serve]'") \
            from None
    return fastapi


def create_app(cfg: ServeConfig, *, source: ModelSource | None = None) -> Any:
    """The ASGI app. ``source`` overrides where versions come from (default: resolve ``cfg.model``)."""
    fastapi = _fastapi()
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    metrics = _Metrics()
    pcfg = cfg.predict_config()

    def on_event(result: str, version: str, detail: str) -> None:
        metrics.reloads.labels(result).inc()
        if result in ("loaded", "swapped") and slot.current is not None:
            metrics.serving(slot.current)
            log.info("serving model version %s (%s)", version, detail)
        elif result != "unchanged":
            log.warning("model %s %s: %s; the serving model is unchanged", version or "source", result, detail)

    load = functools.partial(_load_predictor, pcfg)
    slot = ModelSlot(source or functools.partial(resolve_model, cfg.model), load, on_event=on_event)
    state = _State(cfg=cfg, slot=slot, metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        try:
            await asyncio.get_running_loop().run_in_executor(None, slot.start)
            state.batcher = Batcher(max_batch=cfg.effective_batch(), max_wait_s=cfg.max_wait_ms / 1000 if cfg.batching
                                    else 0.0, max_queue=cfg.max_queue, retry_after_s=cfg.retry_after_s,
                                    observe=metrics.batch.observe)
            state.batcher.start()
            if cfg.reload_interval_s > 0:
                state.poller = _Poller(slot, cfg.reload_interval_s)
                state.poller.start()
        except BaseException as exc:
            state.startup_error = exc
            state.ready.set()
            raise
        state.ready.set()
        try:
            yield
        finally:
            if state.poller is not None:
                state.poller.stop()
            if state.batcher is not None:
                await state.batcher.stop()

    app = fastapi.FastAPI(title="signscale", version=_version(), lifespan=lifespan,
                          description="Traffic-sign recognition: classify sign crops, detect signs in scenes.")
    app.state.signscale = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Any, exc: ApiError) -> Any:
        metrics.errors.labels(exc.reason).inc()
        return JSONResponse(_error_body(exc.status, exc.reason, exc.message), exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Any, exc: Any) -> Any:
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        metrics.errors.labels(reason).inc()
        return JSONResponse(_error_body(exc.status_code, reason, str(exc.detail)), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Any, exc: Any) -> Any:
        metrics.errors.labels("bad_parameter").inc()
        return JSONResponse(_error_body(400, "bad_parameter", str(exc.errors())[:500]), 400)

    @app.exception_handler(Exception)
    async def _bug(request: Any, exc: Exception) -> Any:
        log.exception("internal error on %s", request.url.path)
        metrics.errors.labels("internal").inc()
        return JSONResponse(_error_body(500, "internal", f"internal error ({type(exc).__name__}); this is a bug "
                                        "in signscale, please report it"), 500)

    image_body = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {
            "type": "array", "items": {"type": "string", "format": "binary"}}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}

    @app.post("/v1/classify", openapi_extra=image_body, summary="Classify sign crops (top-k per image)")
    async def classify(request: Request) -> Any:
        predictor = _serving(state)
        top_k = _top_k(request, predictor, cfg.top_k)
        blobs = await _images_in(request, cfg)
        batcher = state.batcher
        assert batcher is not None
        with batcher.expecting():
            arrays = await _prepare(predictor, blobs)
            started = time.perf_counter()
            future = batcher.enqueue(arrays, predictor)
        probs = await batcher.result(future, cfg.request_timeout_s)
        # a JSONResponse, not a dict: FastAPI would walk the plain dict with jsonable_encoder first
        return JSONResponse({"model": {"version": predictor.version, "backend": predictor.backend},
                             "results": [{"index": i, "filename": name, "top_k": top}
                                         for i, ((name, _), top) in enumerate(zip(blobs, predictor.top(probs, top_k)))],
                             "model_ms": round((time.perf_counter() - started) * 1000, 3)})

    @app.post("/v1/detect", openapi_extra=image_body, summary="Detect and classify the signs in one scene")
    async def detect(request: Request) -> Any:
        predictor = _serving(state)
        if not cfg.detector:
            raise ApiError(404, "detect_disabled", "detection is not enabled on this service; start it with "
                           "`signscale serve MODEL --detector DETECTOR_URL`")
        blobs = await _images_in(request, cfg)
        if len(blobs) != 1:
            raise ApiError(400, "one_scene", f"send exactly one scene image, got {len(blobs)}")
        scene = await _decode(blobs[0], cfg.max_pixels, index=0)
        boxes = await asyncio.get_running_loop().run_in_executor(None, predictor.detect, [scene])
        return {"model": {"version": predictor.version}, "width": int(scene.shape[1]),
                "height": int(scene.shape[0]), "boxes": _plain(boxes[0])}

    @app.get("/v1/model", summary="The serving model: version, label space, preprocessing, metrics")
    async def model_info() -> Any:
        predictor = _serving(state)
        return {**predictor.info(), "serving": {
            "batching": cfg.batching, "max_batch": cfg.effective_batch(), "max_wait_ms": cfg.max_wait_ms,
            "max_queue": cfg.max_queue, "max_body_bytes": cfg.max_body_bytes, "max_pixels": cfg.max_pixels,
            "max_images": cfg.max_images, "detect": bool(cfg.detector), "refused_versions": slot.refused()}}

    @app.get("/v1/pictogram/{key}.png", summary="A clean drawing of a sign class (for the page)")
    async def pictogram(key: str) -> Any:
        png = _pictogram(key)
        if png is None:
            raise ApiError(404, "no_pictogram", f"no pictogram for class {key!r}")
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=86400"})

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> Any:
        return {"status": "ok"}

    @app.get("/readyz", summary="A model is loaded and warmed up")
    async def readyz() -> Any:
        if slot.current is None or state.batcher is None:
            raise ApiError(503, "not_ready", "no model is loaded yet", {"Retry-After": str(cfg.retry_after_s)})
        return {"status": "ready", "version": slot.current.version}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Any:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if state.batcher is not None:
            metrics.queue.set(state.batcher.queued)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    web = resources.files("signscale") / "web"

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> Any:
        return HTMLResponse((web / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=str(web)), name="static")
    wrapped = _BodyLimit(app, cfg.max_body_bytes, lambda reason: metrics.errors.labels(reason).inc())
    return _Outer(_Observe(wrapped, metrics), app)  # observing outermost: it sees body-limit refusals too


class _Outer:
    """The ASGI callable uvicorn runs: middlewares around FastAPI; ``.app`` is the FastAPI object."""

    def __init__(self, asgi: Any, app: Any) -> None:
        self.asgi, self.app = asgi, app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await self.asgi(scope, receive, send)


def _version() -> str:
    import signscale

    return signscale.__version__


def _load_predictor(pcfg: PredictConfig, url: str, version: str) -> Predictor:
    return Predictor.load_url(url, version=version, cfg=pcfg)


def _serving(state: _State) -> Predictor:
    predictor = state.slot.current
    if predictor is None or state.batcher is None:
        raise ApiError(503, "not_ready", "no model is loaded yet", {"Retry-After": str(state.cfg.retry_after_s)})
    return predictor


def _top_k(request: Any, predictor: Predictor, default: int) -> int:
    raw = request.query_params.get("top_k")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= len(predictor.label_space):
        raise ApiError(400, "bad_parameter", f"top_k: expected an integer 1..{len(predictor.label_space)}, "
                       f"got {raw[:20]!r}")
    return int(raw)


async def _read_body(request: Any, cfg: ServeConfig) -> bytes:
    """The body, refused with 413 the moment it passes the cap (chunked bodies declare no length)."""
    chunks, total = [], 0

    async def read() -> None:
        nonlocal total
        while True:
            message = await request.receive()
            if message["type"] != "http.request":  # the client went away mid-body
                raise ApiError(400, "incomplete_body", "the client disconnected before sending the whole body")
            chunk, more = message.get("body", b""), message.get("more_body", False)
            total += len(chunk)
            if total > cfg.max_body_bytes:
                if more:
                    await _drain(request.receive, _drain_limit(cfg.max_body_bytes))
                raise ApiError(413, "body_too_large", f"request body exceeds the limit of {cfg.max_body_bytes} bytes")
            chunks.append(chunk)
            if not more:
                return

    try:
        await asyncio.wait_for(read(), cfg.read_timeout_s)
    except TimeoutError:
        raise ApiError(408, "read_timeout", f"the request body did not arrive within {cfg.read_timeout_s:g}s") \
            from None
    body = b"".join(chunks)
    request._body = body  # starlette's own cache: request.form() now parses these bytes, not the stream
    return body


async def _images_in(request: Any, cfg: ServeConfig) -> list[tuple[str | None, bytes]]:
    """(filename, bytes) of each image in a multipart body, or the one raw-body image."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await _read_body(request, cfg)
    if not body:
        raise ApiError(400, "empty", "the request body is empty; send an image")
    if ctype == "multipart/form-data":
        blobs = await _multipart(request, cfg)
    elif not ctype or ctype.startswith("image/") or ctype in RAW_TYPES:
        blobs = [(None, body)]
    else:
        raise ApiError(415, "unsupported_media_type", f"content type {ctype[:60]!r} is not accepted; send the image "
                       "as the body (Content-Type: image/png, image/jpeg or application/octet-stream) or as "
                       "multipart/form-data file fields")
    if len(blobs) > cfg.max_images:
        raise ApiError(413, "too_many_images", f"{len(blobs)} images in one request; the limit is {cfg.max_images}")
    return blobs


async def _multipart(request: Any, cfg: ServeConfig) -> list[tuple[str | None, bytes]]:
    from starlette.datastructures import UploadFile

    try:
        form = await request.form(max_files=cfg.max_images, max_fields=cfg.max_images + 16)
    except Exception as exc:  # noqa: BLE001 - any parse failure of untrusted multipart is a bad request
        detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        raise ApiError(400, "bad_multipart", f"the multipart body cannot be parsed: {detail}") from None
    try:
        blobs = []
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                blobs.append((value.filename, await value.read()))
    finally:
        await form.close()
    if not blobs:
        raise ApiError(400, "no_image", "the multipart body has no file part; send each image as a file field, "
                       "e.g. curl -F file=@sign.png")
    return blobs


async def _decode(blob: tuple[str | None, bytes], max_pixels: int, *, index: int) -> np.ndarray:
    try:
        return await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(images.decode, blob[1], max_pixels=max_pixels))
    except images.ImageError as exc:
        raise _image_error(exc, blob[0], index) from None


# Bodies below this are decoded in the event loop: a sign crop decodes in ~0.1 ms, less than the
# hand-off to a worker thread and back costs; larger images go to a thread so the loop keeps serving.
INLINE_DECODE_BYTES = 32 << 10


async def _prepare(predictor: Predictor, blobs: list[tuple[str | None, bytes]]) -> list[np.ndarray]:
    """Decode and resize every image (small ones inline, others in a thread); the first bad one refuses."""

    def work() -> list[np.ndarray]:
        out = []
        for i, (name, data) in enumerate(blobs):
            try:
                out.append(predictor.prepare(data))
            except images.ImageError as exc:
                raise _image_error(exc, name, i) from None
        return out

    if sum(len(data) for _, data in blobs) <= INLINE_DECODE_BYTES:
        return work()
    return await asyncio.get_running_loop().run_in_executor(None, work)


def _image_error(exc: images.ImageError, name: str | None, index: int) -> ApiError:
    which = f"image {index}" + (f" ({name[:80]!r})" if name else "")
    return ApiError(_IMAGE_STATUS.get(exc.reason, 400), exc.reason, f"{which}: {exc}")


def _plain(value: Any) -> Any:
    """numpy scalars and arrays in a detector's output -> JSON-able Python values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


@functools.lru_cache(maxsize=128)
def _pictogram(key: str) -> bytes | None:
    """A clean rendering of the class with this semantic key, from the synthetic source's drawings."""
    from signscale.labels import LabelError, LabelSpace
    from signscale.sources.synthetic import render_clean

    try:
        label = LabelSpace.for_country("de").index(key)
    except LabelError:
        return None
    return images.encode_png(render_clean(label, 64))


# ---------------------------------------------------------------------------------------------
# Running it


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one (read it back with ``sock.getsockname()``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they
    # are TCP, and without it every keep-alive response stalls ~40 ms on the client's delayed ACK
    # (uvicorn writes headers and body separately). Accepted sockets inherit NODELAY on Linux too.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"host/port: cannot listen on {host}:{port} ({exc}); pick another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app: Any, cfg: ServeConfig) -> Any:
    try:
        import uvicorn
    except ImportError:
        raise ServeError("serving needs uvicorn: pip install 'signscale[serve]'") from None
    return uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level, lifespan="on", access_log=False,
                                         timeout_graceful_shutdown=5, backlog=2048))


@dataclass(frozen=True)
class Service:
    """A service started by :func:`running`: its base URL and its model slot (``poll()`` reloads now)."""

    url: str
    slot: ModelSlot

    def poll(self) -> str:
        return self.slot.poll()


@contextlib.contextmanager
def running(cfg: ServeConfig, *, source: ModelSource | None = None) -> Iterator[Service]:
    """Serve in a background thread of this process; yields the :class:`Service` once the model is ready."""
    sock = bind(cfg.host, cfg.port)
    app = create_app(cfg, source=source)
    server = _uvicorn_server(app, cfg)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="signscale-serve", daemon=True)
    thread.start()
    state: _State = app.app.state.signscale
    try:
        while not state.ready.wait(0.5):  # startup loads and warms the model; a dead thread means it failed
            if not thread.is_alive():
                break
        if state.startup_error is not None or not thread.is_alive():
            raise ServeError(f"the service did not start: {state.startup_error!r}")
        host, port = sock.getsockname()[:2]
        yield Service(url=f"http://{host if ':' not in host else f'[{host}]'}:{port}", slot=state.slot)
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


def serve_socket(cfg: ServeConfig, sock: socket.socket) -> None:
    """Run the service on an already-bound socket in this process until interrupted."""
    logging.basicConfig(level=getattr(logging, cfg.log_level.upper(), logging.WARNING))
    _uvicorn_server(create_app(cfg), cfg).run(sockets=[sock])


def serve(cfg: ServeConfig, *, on_listening: Callable[[str], None] | None = None) -> None:
    """Serve until interrupted; ``workers`` > 1 runs that many processes on one shared socket."""
    _fastapi()
    resolve_model(cfg.model)  # a wrong path or alias: one clear error now, not a traceback from each worker
    sock = bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    if on_listening is not None:
        on_listening(f"http://{host}:{port}")
    if cfg.workers == 1:
        serve_socket(cfg, sock)
        return
    import multiprocessing as mp
    import signal

    ctx = mp.get_context("spawn")  # a fresh interpreter each: no forked torch thread pools
    procs = [ctx.Process(target=serve_socket, args=(cfg, sock), name=f"signscale-serve-{i}")
             for i in range(cfg.workers)]
    for p in procs:
        p.start()

    def stop(signum: int, frame: Any) -> None:  # SIGTERM (a process manager) stops the workers too
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join()
    finally:
        sock.close()

"""``signscale serve``: a FastAPI app, thin over :class:`signscale.serving.predict.Predictor`, run by uvicorn.

Endpoints: ``POST /v1/classify`` (one or more images, multipart or a raw body), ``POST /v1/detect``
(one scene; needs a detector), ``GET /v1/model``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics``
(Prometheus), ``GET /docs`` (OpenAPI) and ``GET /``, a page to try the model in a browser.

How a request flows, and why:

1. **Body cap before parsing.** An ASGI middleware refuses a ``Content-Length`` over the cap with
   413 before a byte of the body is read; a chunked body is counted while it streams and refused
   the moment it passes the cap. Only then is multipart parsed.
2. **Budget, then decode in a thread.** Every image's header is read first (PIL's lazy open: no
   pixel decoded) and the request is refused with 413 when one image is over ``max_pixels`` or all
   of them together over ``max_request_pixels``; decoding then runs image by image, its CPU time
   checked against ``decode_budget_s`` and its wall time against the request's deadline, so one
   request cannot cost more than ~2 CPU-seconds by default. The full decode is forced
   (:func:`images.decode`) so truncated files fail here, and every failure maps to a 4xx JSON error
   naming the reason (PIL reports non-images and truncation as ``OSError``, lazily; a service that
   lets those escape answers 500 to bad input).
3. **Dynamic batching.** Decoded images wait in one bounded queue; one runner thread takes up to
   ``max_batch`` images, waiting at most ``max_wait_ms`` for the batch to fill, and runs them in one
   forward pass. On a CPU the per-call overhead of a small CNN is most of its cost, so batching
   concurrent requests multiplies throughput. A full queue answers 503 with ``Retry-After``; a
   request not answered within ``request_timeout_s`` of its body arriving (decoding included)
   answers 503 too (the service is overloaded: the client should retry, not fix its request).
4. **Hot reload.** With a registry alias (or any *model source*: a callable returning
   ``(version, url)``), a poller thread resolves the alias every ``reload_interval_s``; a new
   version is loaded, checksum-verified and warmed up beside the serving one, then swapped in
   with one reference assignment. Each queued image remembers the predictor that prepared it and
   is run by that one, so in-flight requests finish on the old model; a model that fails to load
   or warm up is logged, counted, reported by ``/healthz`` and never serves (Triton's model-control
   bar). It is tried again when its folder's listing (names, sizes, times) changes, so a folder
   caught mid-update is served once the update completes.

A 5xx from this service is a bug in it, never a bad request; tests fuzz that with malformed input.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import numpy as np

from signscale import config, images

try:  # the serve extra; without it create_app() says which extra to install
    from starlette.requests import Request
except ImportError:  # pragma: no cover
    Request = Any  # type: ignore[misc,assignment]
from signscale.serving.batcher import Batcher
from signscale.serving.decode import INLINE_DECODE_BYTES, INLINE_DECODE_PIXELS, Limits, check_pixels, decode_all
from signscale.serving.http_errors import ApiError
from signscale.serving.middleware import BodyLimit, Observe, Outer, drain, drain_limit, error_body
from signscale.serving.predict import DEFAULT_MAX_PIXELS, PredictConfig, Predictor, check_min_confidence, resolve_model
from signscale.serving.reload import ModelSlot, ModelSource, _Poller

__all__ = ["ServeConfig", "ServeError", "create_app", "require_serve_extra"]

log = logging.getLogger("signscale.serving.serve")

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
    # below this top-class probability a result says "unsure": true (per request: ?min_confidence=0.9)
    min_confidence: float = 0.0
    tta: bool = False  # flip-rule test-time augmentation (signscale.tta): twice the compute per image
    batching: bool = True  # False: every image is its own forward pass (a baseline)
    max_batch: int = 32  # images per forward pass
    max_wait_ms: float = 2.0  # how long the first image of a batch waits for company
    max_queue: int = 256  # images waiting for the model; beyond this: 503 + Retry-After
    max_body_bytes: int = 8 << 20  # request bodies above this: 413 before parsing
    max_pixels: int = DEFAULT_MAX_PIXELS  # per image, from the header: 413 (below Pillow's bomb limit)
    max_images: int = 64  # images per classify request
    # Per request, so one request cannot cost more than ~2 CPU-seconds: the pixels of all its images
    # (from the headers, before any decoding: 413 too_many_pixels; decode + resize cost ~15-25 ns per
    # pixel on the 2-core dev machine, so 64M pixels is ~1.5 CPU-s), and the CPU time spent decoding
    # and resizing them (a backstop for formats slower per pixel: 413 decode_budget_exceeded).
    max_request_pixels: int = 64_000_000
    decode_budget_s: float = 2.0  # CPU seconds (the decoding thread's own), checked after each image
    request_timeout_s: float = 30.0  # decoding + waiting for the model, from the moment the body is in: 503
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
                     "max_request_pixels", "retry_after_s"):
            if getattr(self, name) < 1:
                raise config.ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_wait_ms", "reload_interval_s", "threads"):
            if getattr(self, name) < 0:
                raise config.ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("request_timeout_s", "read_timeout_s", "decode_budget_s"):
            if not getattr(self, name) > 0:
                raise config.ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.max_queue < self.max_images:
            raise config.ConfigError(f"max_queue ({self.max_queue}) must be >= max_images ({self.max_images}), "
                                     "or a full-size request could never be queued")
        if self.max_request_pixels < self.max_pixels:
            raise config.ConfigError(f"max_request_pixels ({self.max_request_pixels}) must be >= max_pixels "
                                     f"({self.max_pixels}), or an image within its own limit could never be served")
        if self.decode_budget_s > self.request_timeout_s:
            raise config.ConfigError(f"decode_budget_s ({self.decode_budget_s:g}) must be <= request_timeout_s "
                                     f"({self.request_timeout_s:g}): decoding happens inside the request's time")
        PredictConfig(model=self.model, top_k=self.top_k, backend=self.backend, max_pixels=self.max_pixels,
                      min_confidence=self.min_confidence)

    def predict_config(self) -> PredictConfig:
        return PredictConfig(model=self.model, top_k=self.top_k, batch_size=self.effective_batch(),
                             backend=self.backend, device=self.device, threads=self.threads,
                             max_pixels=self.max_pixels, detector=self.detector,
                             detect_threshold=self.detect_threshold, min_confidence=self.min_confidence,
                             tta=self.tta)

    def effective_batch(self) -> int:
        return self.max_batch if self.batching else 1


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
        self.decoded = Counter("signscale_decode_images", "images whose decoding started", registry=r)
        self.decode_cpu = Counter("signscale_decode_cpu_seconds", "CPU time spent decoding and resizing images",
                                  registry=r)
        self.model = Gauge("signscale_model_info", "the serving model (value 1)", ["version", "backend"],
                           registry=r)

    def serving(self, predictor: Predictor) -> None:
        self.model.clear()
        self.model.labels(predictor.version, predictor.backend).set(1)


# ---------------------------------------------------------------------------------------------
# The app


@dataclass
class AppState:
    cfg: ServeConfig
    slot: ModelSlot
    metrics: _Metrics
    batcher: Batcher | None = None
    poller: _Poller | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    startup_error: BaseException | None = None


def require_serve_extra() -> Any:
    try:
        import fastapi
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ServeError("serving needs FastAPI, uvicorn and prometheus_client: pip install 'signscale[serve]'") \
            from None
    return fastapi


def create_app(cfg: ServeConfig, *, source: ModelSource | None = None) -> Any:
    """The ASGI app. ``source`` overrides where versions come from (default: resolve ``cfg.model``).

    Wiring only, so the whole app reads on one screen: each part (state, lifespan, error handlers,
    routes, middlewares) is built by a function of its own below.
    """
    fastapi = require_serve_extra()
    state = _app_state(cfg, source)
    app = fastapi.FastAPI(title="signscale", version=_version(), lifespan=functools.partial(_lifespan, state),
                          docs_url=None,
                          description="Traffic-sign recognition: classify sign crops, detect signs in scenes.")
    app.state.signscale = state
    from signscale.serving.apidocs import add_docs

    add_docs(app, title="signscale")  # /docs with Swagger UI served from the package, no CDN (apidocs.py)
    _add_error_handlers(app, state.metrics)
    # registration order is the OpenAPI page's order: the model's routes first, then status, then the page
    _add_model_routes(app, state)
    _add_info_routes(app, state)
    _add_health_routes(app, state)
    _add_page(app)
    wrapped = BodyLimit(app, cfg.max_body_bytes, lambda reason: state.metrics.errors.labels(reason).inc())
    return Outer(Observe(wrapped, state.metrics), app)  # observing outermost: it sees body-limit refusals too


def _app_state(cfg: ServeConfig, source: ModelSource | None) -> AppState:
    """The app's state: its metrics and the model slot, whose load and reload events are counted and logged.

    Nothing is loaded here; the lifespan loads the model, so creating an app stays cheap and a bad
    model fails at startup, where ``running()`` reports it.
    """
    metrics = _Metrics()

    def on_event(result: str, version: str, detail: str) -> None:
        metrics.reloads.labels(result).inc()
        if result in ("loaded", "swapped") and slot.current is not None:
            metrics.serving(slot.current)
            log.info("serving model version %s (%s)", version, detail)
        elif result != "unchanged":
            log.warning("model %s %s: %s; the serving model is unchanged", version or "source", result, detail)

    load = functools.partial(_load_predictor, cfg.predict_config())
    slot = ModelSlot(source or functools.partial(resolve_model, cfg.model), load, on_event=on_event)
    return AppState(cfg=cfg, slot=slot, metrics=metrics)


@contextlib.asynccontextmanager
async def _lifespan(state: AppState, app: Any) -> Any:
    """Load and warm the model before the first request; stop the poller and the batcher after the last.

    ``state.ready`` is set whether startup succeeds or fails, so a caller waiting on it never hangs on
    a service that cannot start; the failure is kept in ``state.startup_error`` for it to report.
    """
    try:
        await asyncio.get_running_loop().run_in_executor(None, state.slot.start)  # loading blocks: not on the loop
        _start_workers(state)
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


def _start_workers(state: AppState) -> None:
    """The batcher (its runner is a task of the running loop) and, when reloading is on, the poller thread."""
    cfg = state.cfg
    state.batcher = Batcher(max_batch=cfg.effective_batch(), max_wait_s=cfg.max_wait_ms / 1000 if cfg.batching
                            else 0.0, max_queue=cfg.max_queue, retry_after_s=cfg.retry_after_s,
                            observe=state.metrics.batch.observe)
    state.batcher.start()
    if cfg.reload_interval_s > 0:
        state.poller = _Poller(state.slot, cfg.reload_interval_s)
        state.poller.start()


def _add_error_handlers(app: Any, metrics: _Metrics) -> None:
    """Every refusal and failure answers the one JSON error shape, counted by reason.

    FastAPI's own 404, 405 and validation errors would answer ``{"detail": ...}`` and an unexpected
    exception a bare 500; clients parse one shape, and ``signscale_errors`` says what was refused and why.
    """
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def _api_error(request: Any, exc: ApiError) -> Any:
        metrics.errors.labels(exc.reason).inc()
        return JSONResponse(error_body(exc.status, exc.reason, exc.message), exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Any, exc: Any) -> Any:
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        metrics.errors.labels(reason).inc()
        return JSONResponse(error_body(exc.status_code, reason, str(exc.detail)), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Any, exc: Any) -> Any:
        metrics.errors.labels("bad_parameter").inc()
        return JSONResponse(error_body(400, "bad_parameter", str(exc.errors())[:500]), 400)

    @app.exception_handler(Exception)
    async def _bug(request: Any, exc: Exception) -> Any:
        log.exception("internal error on %s", request.url.path)
        metrics.errors.labels("internal").inc()
        return JSONResponse(error_body(500, "internal", f"internal error ({type(exc).__name__}); this is a bug "
                                        "in signscale, please report it"), 500)


def _image_body() -> dict[str, Any]:
    """The OpenAPI request body of the image routes: the handlers read the raw request, so FastAPI cannot infer it.

    A fresh dict per app: FastAPI merges it into the generated schema, and apps must not share it.
    """
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {
            "type": "array", "items": {"type": "string", "format": "binary"}}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def _add_model_routes(app: Any, state: AppState) -> None:
    """POST /v1/classify and /v1/detect, thin over :func:`_classify` and :func:`_detect`.

    The endpoint functions keep their names: FastAPI derives the OpenAPI operation ids from them.
    """
    image_body = _image_body()

    @app.post("/v1/classify", openapi_extra=image_body, summary="Classify sign crops (top-k per image)")
    async def classify(request: Request) -> Any:
        return await _classify(state, request)

    @app.post("/v1/detect", openapi_extra=image_body, summary="Detect and classify the signs in one scene")
    async def detect(request: Request) -> Any:
        return await _detect(state, request)


async def _classify(state: AppState, request: Any) -> Any:
    """Top-k per image: read and check the request, decode within its limits, one batched forward pass.

    The predictor is taken once, so the images are prepared, run and answered by the same model even
    when a reload swaps in another meanwhile; the deadline covers decoding and the model's answer both.
    """
    from fastapi.responses import JSONResponse

    cfg = state.cfg
    predictor = _serving(state)
    top_k = _top_k(request, predictor, cfg.top_k)
    min_confidence = _min_confidence(request, cfg.min_confidence)
    blobs = await _images_in(request, cfg)
    deadline = time.monotonic() + cfg.request_timeout_s  # decoding and the model's answer, both inside
    batcher = state.batcher
    assert batcher is not None
    with batcher.expecting():
        arrays = await _prepare(predictor.prepare, blobs, Limits.of(cfg, deadline), state.metrics)
        started = time.perf_counter()
        future = batcher.enqueue(arrays, predictor)
    probs = await batcher.result(future, max(0.0, deadline - time.monotonic()), cfg.request_timeout_s)
    # a JSONResponse, not a dict: FastAPI would walk the plain dict with jsonable_encoder first
    return JSONResponse({"model": {"version": predictor.version, "backend": predictor.backend},
                         "results": [{"index": i, "filename": name, **answer} for i, ((name, _), answer)
                                     in enumerate(zip(blobs, predictor.answers(probs, top_k, min_confidence)))],
                         "min_confidence": min_confidence,
                         "model_ms": round((time.perf_counter() - started) * 1000, 3)})


async def _detect(state: AppState, request: Any) -> Any:
    """The boxes of one scene, decoded at full size (the pipeline finds and crops the signs itself).

    Detection runs in a worker thread, outside the batcher, so the event loop keeps answering other
    requests while a scene is being searched.
    """
    cfg = state.cfg
    predictor = _serving(state)
    if not cfg.detector:
        raise ApiError(404, "detect_disabled", "detection is not enabled on this service; start it with "
                       "`signscale serve MODEL --detector DETECTOR_URL`")
    blobs = await _images_in(request, cfg)
    if len(blobs) != 1:
        raise ApiError(400, "one_scene", f"send exactly one scene image, got {len(blobs)}")
    limits = Limits.of(cfg, time.monotonic() + cfg.request_timeout_s)
    scene = (await _prepare(functools.partial(images.decode, max_pixels=cfg.max_pixels), blobs, limits,
                            state.metrics))[0]
    boxes = await asyncio.get_running_loop().run_in_executor(None, predictor.detect, [scene])
    return {"model": {"version": predictor.version}, "width": int(scene.shape[1]),
            "height": int(scene.shape[0]), "boxes": _plain(boxes[0])}


def _add_info_routes(app: Any, state: AppState) -> None:
    """GET /v1/model (what is served and under which limits) and the class pictograms the page shows."""
    from fastapi.responses import Response

    @app.get("/v1/model", summary="The serving model: version, label space, preprocessing, metrics")
    async def model_info() -> Any:
        predictor = _serving(state)
        return {**predictor.info(), "serving": _serving_limits(state)}

    @app.get("/v1/pictogram/{key}.png", summary="A clean drawing of a sign class (for the page)")
    async def pictogram(key: str) -> Any:
        png = _pictogram(key)
        if png is None:
            raise ApiError(404, "no_pictogram", f"no pictogram for class {key!r}")
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=86400"})


def _serving_limits(state: AppState) -> dict[str, Any]:
    """The options a client needs to shape its requests (batching, sizes, budgets), and the refused versions."""
    cfg = state.cfg
    return {"batching": cfg.batching, "max_batch": cfg.effective_batch(), "max_wait_ms": cfg.max_wait_ms,
            "max_queue": cfg.max_queue, "max_body_bytes": cfg.max_body_bytes, "max_pixels": cfg.max_pixels,
            "max_images": cfg.max_images, "max_request_pixels": cfg.max_request_pixels,
            "decode_budget_s": cfg.decode_budget_s, "request_timeout_s": cfg.request_timeout_s,
            "detect": bool(cfg.detector), "refused_versions": state.slot.refused()}


def _add_health_routes(app: Any, state: AppState) -> None:
    """GET /healthz (liveness), /readyz (readiness) and /metrics (Prometheus), for orchestrators and monitoring."""
    from fastapi.responses import Response

    cfg, slot, metrics = state.cfg, state.slot, state.metrics

    @app.get("/healthz", summary="The process is alive; the serving version and any refused versions")
    async def healthz() -> Any:
        # Always 200 while the process answers (a liveness probe must not restart a service whose old
        # model still serves); a refused version is reported here so an operator sees why an update
        # did not take: which version, why, since when, how often tried.
        current = slot.current
        return {"status": "ok", "serving": current.version if current is not None else None,
                "refused": [r.to_dict() for r in slot.refusals()]}

    @app.get("/readyz", summary="A model is loaded and warmed up")
    async def readyz() -> Any:
        if slot.current is None or state.batcher is None:
            raise ApiError(503, "not_ready", "no model is loaded yet", {"Retry-After": str(cfg.retry_after_s)})
        return {"status": "ready", "version": slot.current.version}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Any:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if state.batcher is not None:
            metrics.queue.set(state.batcher.queued)  # a gauge read at scrape time, not updated per image
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _add_page(app: Any) -> None:
    """GET / (the page to try the model) and /static: files inside the package, so the page needs no network."""
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    web = resources.files("signscale.serving") / "web"

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> Any:
        return HTMLResponse((web / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=str(web)), name="static")


def _version() -> str:
    import signscale

    return signscale.__version__


def _load_predictor(pcfg: PredictConfig, url: str, version: str) -> Predictor:
    return Predictor.load_url(url, version=version, cfg=pcfg)


def _serving(state: AppState) -> Predictor:
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


def _min_confidence(request: Any, default: float) -> float:
    raw = request.query_params.get("min_confidence")
    if raw is None:
        return default
    try:
        return check_min_confidence(float(raw))
    except (ValueError, config.ConfigError):
        raise ApiError(400, "bad_parameter", f"min_confidence: expected a probability in [0, 1], got {raw[:20]!r}"
                       ) from None


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
                    await drain(request.receive, drain_limit(cfg.max_body_bytes))
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
        raise ApiError(413, "too_many_images", f"{len(blobs)} images in one request; the limit is {cfg.max_images} "
                       "(max_images): split it into several requests")
    return blobs


async def _multipart(request: Any, cfg: ServeConfig) -> list[tuple[str | None, bytes]]:
    from starlette.datastructures import UploadFile

    try:
        form = await request.form(max_files=cfg.max_images, max_fields=cfg.max_images + 16)
    except Exception as exc:  # noqa: BLE001 - any parse failure of untrusted multipart is a bad request
        detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        if str(detail).lower().startswith("too many files"):
            # starlette stops at the (max_images + 1)-th file part, before spooling it: the parse fails,
            # but the request is well-formed and too big, which the API documents as 413
            raise ApiError(413, "too_many_images", f"more than {cfg.max_images} images in one request; the limit "
                           f"is {cfg.max_images} (max_images): split it into several requests") from None
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


async def _prepare(convert: Callable[[bytes], np.ndarray], blobs: list[tuple[str | None, bytes]], limits: Limits,
                   metrics: _Metrics) -> list[np.ndarray]:
    """Decode (and resize, for classify) every image (small ones inline, others in a thread) within the limits."""
    if sum(len(data) for _, data in blobs) <= INLINE_DECODE_BYTES:  # headers of a few KB: read them here
        if check_pixels(blobs, limits) <= INLINE_DECODE_PIXELS:
            return decode_all(convert, blobs, limits, metrics, checked=True)
        work = functools.partial(decode_all, convert, blobs, limits, metrics, checked=True)
    else:
        work = functools.partial(decode_all, convert, blobs, limits, metrics)
    return await asyncio.get_running_loop().run_in_executor(None, work)


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
    from signscale.data.sources.pictograms import render_clean
    from signscale.labels import LabelError, LabelSpace

    try:
        label = LabelSpace.for_country("de").index(key)
    except LabelError:
        return None
    return images.encode_png(render_clean(label, 64))



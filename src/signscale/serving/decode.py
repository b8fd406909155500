"""Decoding a request's images within its budgets: pixels claimed by the headers are checked before a
byte is decoded, decoding runs off the event loop (small requests inline) and stops at the request's
CPU-time budget, so no request can make the service burn CPU."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from signscale import images

try:  # the serve extra; without it create_app() says which extra to install
    from starlette.requests import Request
except ImportError:  # pragma: no cover
    Request = Any  # type: ignore[misc,assignment]
from signscale.serving.http_errors import ApiError, Overloaded

# Image failures -> (status, what the client should do)
IMAGE_STATUS = {"too_many_pixels": 413, "bad_size": 400, "empty": 400}


@dataclass(frozen=True)
class Limits:
    """What one request may cost to decode: pixels (from headers), CPU seconds, and its deadline."""

    max_pixels: int  # per image
    max_request_pixels: int  # all its images together
    decode_budget_s: float
    deadline: float  # time.monotonic() by which the request must be answered
    timeout_s: float  # the configured request timeout (for the message)
    retry_after_s: int

    @classmethod
    def of(cls, cfg: Any, deadline: float) -> Limits:  # cfg: a ServeConfig
        return cls(cfg.max_pixels, cfg.max_request_pixels, cfg.decode_budget_s, deadline, cfg.request_timeout_s,
                   cfg.retry_after_s)


def check_pixels(blobs: list[tuple[str | None, bytes]], limits: Limits) -> int:
    """Refuse the request from its images' headers alone when all of them together are too many pixels.

    PIL's ``open`` reads only the header, so this costs microseconds per image however large it claims
    to be; a request of 64 PNGs of 4900x4900 (4.5 MB on the wire) would otherwise cost ~30 CPU-seconds.
    """
    total = 0
    for i, (name, data) in enumerate(blobs):
        try:
            w, h = images.open_checked(data, max_pixels=limits.max_pixels).size
        except images.ImageError as exc:
            raise image_error(exc, name, i) from None
        total += w * h
    if total > limits.max_request_pixels:
        raise ApiError(413, "too_many_pixels", f"the {len(blobs)} image(s) of this request have {total} pixels in "
                       f"all; the limit per request is {limits.max_request_pixels} (max_request_pixels): send "
                       "fewer or smaller images per request")
    return total


def decode_all(convert: Callable[[bytes], np.ndarray], blobs: list[tuple[str | None, bytes]], limits: Limits,
                metrics: Any, *, checked: bool = False) -> list[np.ndarray]:
    """Check the pixel budget, then decode image by image within the CPU budget and the request's deadline.

    The budget is this thread's CPU time (not wall time), so a busy machine does not refuse honest
    requests; it is checked after each image, so a request costs at most the budget plus one image,
    and that one is bounded by ``max_pixels``.
    """
    if not checked:
        check_pixels(blobs, limits)
    out: list[np.ndarray] = []
    started = time.thread_time()
    try:
        for i, (name, data) in enumerate(blobs):
            if time.monotonic() > limits.deadline:
                raise Overloaded("timeout", f"no answer within {limits.timeout_s:g}s: image {i} of {len(blobs)} "
                                 f"was still waiting to be decoded (the service is overloaded); retry after "
                                 f"{limits.retry_after_s}s", limits.retry_after_s)
            metrics.decoded.inc()
            try:
                out.append(convert(data))
            except images.ImageError as exc:
                raise image_error(exc, name, i) from None
            used = time.thread_time() - started
            if used > limits.decode_budget_s:
                raise ApiError(413, "decode_budget_exceeded", f"decoding image {i} of {len(blobs)} brought this "
                               f"request to {used:.3f} CPU-seconds, over its budget of {limits.decode_budget_s:g}s "
                               "(decode_budget_s): send fewer or smaller images, or a format that decodes faster")
    finally:
        metrics.decode_cpu.inc(time.thread_time() - started)
    return out


# Requests this small are decoded in the event loop: a sign crop decodes in ~0.1 ms, less than the
# hand-off to a worker thread and back costs; larger ones go to a thread so the loop keeps serving.
# Both bounds matter: a 12 KB PNG can claim 25M pixels of one colour (~0.3 CPU-s to decode).
INLINE_DECODE_BYTES = 32 << 10


INLINE_DECODE_PIXELS = 1 << 16


def image_error(exc: images.ImageError, name: str | None, index: int) -> ApiError:
    which = f"image {index}" + (f" ({name[:80]!r})" if name else "")
    return ApiError(IMAGE_STATUS.get(exc.reason, 400), exc.reason, f"{which}: {exc}")

"""The service over real sockets: uvicorn on a free port, httpx (and headless Chromium) as clients."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

# modules these tests exercise through the ones they import (tests/test_layout.py)
COVERS = ("signscale.serving.decode", "signscale.serving.reload", "signscale.serving.middleware")

httpx = pytest.importorskip("httpx", reason="service tests need httpx (pip install 'signscale[serve,test]')")
pytest.importorskip("fastapi", reason="service tests need the serve extra (pip install 'signscale[serve]')")
pytest.importorskip("uvicorn", reason="service tests need the serve extra (pip install 'signscale[serve]')")

from devtools import devtools_page, find_browser
from PIL import Image

from signscale import images
from signscale.data.sources.pictograms import render_clean
from signscale.labels import LabelSpace
from signscale.models import create_model, model_config
from signscale.serving.batcher import Batcher
from signscale.serving.http_errors import ApiError
from signscale.serving.predict import Predictor, resolve_model
from signscale.serving.serve import ServeConfig
from signscale.serving.service import running
from signscale.training import checkpoint
from signscale.transforms import Preprocess

SIZE = 24
MAX_BODY = 256 << 10
MAX_PIXELS = 4_000_000
MAX_REQUEST_PIXELS = 6_000_000


def make_model(url: str, seed: int) -> str:
    torch.manual_seed(seed)
    model = create_model("small_cnn", 43, widths=[8, 16, 16])
    with torch.no_grad():  # random BN statistics: two seeds give clearly different probabilities
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    checkpoint.save_model(
        url,
        state_dict=model.state_dict(),
        model_config=model_config(model),
        label_space=LabelSpace.for_country("de").to_dict(),
        preprocess=Preprocess(image_size=SIZE).to_dict(),
    )
    return url


def corrupt_copy(src: str, dst: Path) -> str:
    """A model folder whose weights no longer match model.json's sha256."""
    shutil.copytree(src, dst)
    data = bytearray((dst / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (dst / "model.pt").write_bytes(bytes(data))
    return str(dst)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    a, b = make_model(str(root / "a"), 0), make_model(str(root / "b"), 1)
    return {"a": a, "b": b, "corrupt": corrupt_copy(a, root / "corrupt")}


def cfg(model: str, **kw) -> ServeConfig:
    base = {"model": model, "port": 0, "reload_interval_s": 0, "max_body_bytes": MAX_BODY, "max_pixels": MAX_PIXELS,
            "max_request_pixels": MAX_REQUEST_PIXELS, "max_images": 8, "max_queue": 512}
    return ServeConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def service(models):
    with running(cfg(models["a"])) as svc:
        yield svc


def png(label: int, size: int = 40) -> bytes:
    return images.encode_png(render_clean(label, size))


def expected_top(model: str, data: bytes, k: int = 5) -> list[dict]:
    return Predictor.load(model).classify([data], top_k=k)[0]


def same_top(got: list[dict], want: list[dict]) -> bool:
    return [g["key"] for g in got] == [w["key"] for w in want] and \
        max(abs(g["probability"] - w["probability"]) for g, w in zip(got, want)) < 1e-5


# --------------------------------------------------------------------------------------------- round trips


def test_classify_multipart_raw_and_several_images(service, models) -> None:
    stop, keep = png(14), png(38, 64)
    with httpx.Client(base_url=service.url, timeout=30) as c:
        r = c.post("/v1/classify", files={"file": ("stop.png", stop, "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["version"] == Predictor.load(models["a"]).version
        assert body["results"][0]["filename"] == "stop.png"
        assert same_top(body["results"][0]["top_k"], expected_top(models["a"], stop))
        r = c.post("/v1/classify", content=keep, headers={"content-type": "image/png"})
        assert r.status_code == 200 and same_top(r.json()["results"][0]["top_k"], expected_top(models["a"], keep))
        r = c.post("/v1/classify?top_k=2", files=[("file", ("a.png", stop, "image/png")),
                                                  ("file", ("b.png", keep, "image/png"))])
        results = r.json()["results"]
        assert [x["filename"] for x in results] == ["a.png", "b.png"] and all(len(x["top_k"]) == 2 for x in results)
        assert same_top(results[1]["top_k"], expected_top(models["a"], keep, 2))


def test_model_health_metrics_openapi_and_page(service) -> None:
    with httpx.Client(base_url=service.url, timeout=30) as c:
        info = c.get("/v1/model").json()
        assert info["num_classes"] == 43 and info["preprocess"]["image_size"] == SIZE
        assert info["label_space"]["classes"][14]["key"] == "stop" and info["serving"]["max_body_bytes"] == MAX_BODY
        assert c.get("/healthz").json() == {"status": "ok", "serving": info["version"], "refused": []}
        assert c.get("/readyz").json()["status"] == "ready"
        c.post("/v1/classify", content=png(1), headers={"content-type": "image/png"})
        metrics = c.get("/metrics").text
        assert re.search(r'signscale_requests_total\{path="/v1/classify",status="200"\} [1-9]', metrics)
        assert "signscale_request_seconds_bucket" in metrics and "signscale_batch_images_count" in metrics
        spec = c.get("/openapi.json").json()
        assert "/v1/classify" in spec["paths"] and "multipart/form-data" in json.dumps(spec["paths"]["/v1/classify"])
        assert c.get("/docs").status_code == 200
        page = c.get("/")
        assert page.status_code == 200 and 'id="file"' in page.text
        assert c.get("/static/app.js").status_code == 200
        pict = c.get("/v1/pictogram/stop.png")
        assert pict.headers["content-type"] == "image/png" and Image.open(io.BytesIO(pict.content)).size == (64, 64)
        assert c.get("/v1/pictogram/nope.png").status_code == 404


def test_detect_without_a_detector_is_a_clear_404(service) -> None:
    r = httpx.post(f"{service.url}/v1/detect", content=png(1), headers={"content-type": "image/png"}, timeout=30)
    assert r.status_code == 404 and "--detector" in r.json()["error"]["message"]


def test_detect_round_trip(models, tmp_path: Path) -> None:
    from signscale.detection import detect

    try:
        from signscale.detection.detector import build_detector, make_config
        from signscale.detection.train import save_detector
    except ImportError as exc:
        pytest.skip(f"the detector model code is not usable here ({exc}): the detect round trip was not run")
    torch.manual_seed(0)  # an untrained FCOS on a small classifier's stages (as tests/test_detect.py makes one)
    clf = create_model("small_cnn", 43, widths=[8, 16, 32])
    det = build_detector(make_config(model_config(clf), preprocess=Preprocess().to_dict(), fpn_channels=32), clf)
    detector = save_detector(str(tmp_path / "detector"), det, LabelSpace.for_country("de"))
    scene = np.full((96, 128, 3), 90, np.uint8)
    scene[30:70, 40:80] = render_clean(14, 40)
    want = detect.load_pipeline(detector, models["a"], score_thresh=0.0).detect([scene])[0]
    with running(cfg(models["a"], detector=detector, detect_threshold=0.0)) as svc, \
            httpx.Client(base_url=svc.url, timeout=60) as c:
        r = c.post("/v1/detect", content=images.encode_png(scene), headers={"content-type": "image/png"})
        assert c.get("/v1/model").json()["serving"]["detect"] is True
        bad = c.post("/v1/detect", content=b"not a scene", headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    # an untrained detector may box nothing; the service must return exactly what the pipeline finds
    assert body["width"] == 128 and body["height"] == 96 and len(body["boxes"]) == len(want)
    for got, exp in zip(body["boxes"], want):
        assert {"box", "score", "key", "name", "country", "confidence"} <= set(got)
        assert got["key"] == exp["key"] and np.allclose(got["box"], exp["box"], atol=0.2)
    assert bad.status_code == 400 and bad.json()["error"]["reason"] == "not_an_image"


# --------------------------------------------------------------------------------------------- bad input


def _png_header(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h, followed by a tiny IDAT: a decompression-bomb header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def _encoded(label: int, fmt: str, size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(render_clean(label, size)).save(buf, format=fmt)
    return buf.getvalue()


def fuzz_corpus(seed: int = 0) -> list[tuple[str, dict]]:
    """(name, httpx request kwargs) for >= 200 malformed requests, each of which must get a 4xx."""
    rng = np.random.default_rng(seed)
    corpus: list[tuple[str, dict]] = []

    def raw(name: str, body: bytes, ctype: str | None = "image/png", path: str = "/v1/classify",
            method: str = "POST") -> None:
        headers = {"content-type": ctype} if ctype else {}
        corpus.append((name, {"method": method, "url": path, "content": body, "headers": headers}))

    def multi(name: str, files: list, path: str = "/v1/classify") -> None:
        corpus.append((name, {"method": "POST", "url": path, "files": files}))

    sources = [_encoded(i, fmt) for i, fmt in ((1, "PNG"), (14, "JPEG"), (33, "BMP"), (25, "GIF"), (12, "WEBP"),
                                               (3, "PPM"), (9, "TIFF"))]
    for src in sources:  # truncated at several points (headers intact, data cut)
        for frac in (0.05, 0.3, 0.6, 0.9):
            cut = max(1, int(len(src) * frac))
            raw(f"truncated-{cut}", src[:cut])
    for i in range(50):  # corrupted: bytes overwritten in the header or anywhere (may still decode: then 200)
        src = bytearray(sources[i % len(sources)])
        for pos in rng.integers(0, min(len(src), 64 if i % 2 else len(src)), size=8):
            src[pos] = int(rng.integers(0, 256))
        raw(f"corrupt-{i}", bytes(src))
        corpus[-1][1]["may_decode"] = True
    for ctype in ("image/png", "image/jpeg", "application/octet-stream", None, "multipart/form-data; boundary=x"):
        raw(f"empty-{ctype}", b"", ctype)
    for i in range(50):
        raw(
            f"random-{i}", rng.bytes(int(rng.integers(1, 4000))), ("image/png", "application/octet-stream", None)[i % 3]
        )
    for w, h in ((100_000, 100_000), (70_000, 70_000), (50_000, 1), (3000, 3000), (1, 4_000_001), (0, 10), (10, 0)):
        raw(f"huge-{w}x{h}", _png_header(w, h))
    bomb = io.BytesIO()
    Image.new("L", (2500, 2000)).save(bomb, format="PNG")  # 5M pixels > MAX_PIXELS, a few KB on the wire
    raw("bomb-5mpx", bomb.getvalue())
    for ctype in ("text/plain", "application/json", "application/x-www-form-urlencoded", "text/html", "video/mp4",
                  "application/xml", "audio/wav", "font/woff", "foo", "application/pdf"):
        raw(f"ctype-{ctype}", sources[0], ctype)
    for i in range(6):  # over the body cap: declared, and chunked (no Content-Length)
        raw(f"oversized-{i}", b"\x00" * (MAX_BODY + 1 + i * 50_000))
    for i in range(6):
        size = MAX_BODY + 1 + i * 30_000

        def gen(n: int = size):
            for start in range(0, n, 16_384):
                yield b"\x89" * min(16_384, n - start)

        corpus.append((f"chunked-oversized-{i}", {"method": "POST", "url": "/v1/classify", "content": gen(),
                                                  "headers": {"content-type": "image/png"}}))
    boundary_bodies = [
        b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n" + sources[0][:50],
        b"garbage without boundaries",
        b"--x\r\n\r\n--x--\r\n",
        b"--x\r\nContent-Disposition: form-data; name=\"field\"\r\n\r\nvalue\r\n--x--\r\n",
        b"--y\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\nabc\r\n--y--\r\n",
        b"--x--\r\n",
        b"--x\r\nContent-Disposition: form-data; filename=\"a.png\"\r\n\r\n" + sources[1] + b"\r\n--x--\r\n",
        b"--x\r\nContent-Type: image/png\r\n\r\n" + sources[0] + b"\r\n--x--\r\n",
    ]
    for i, body in enumerate(boundary_bodies):
        for ctype in ("multipart/form-data; boundary=x", "multipart/form-data"):
            raw(f"multipart-{i}-{ctype[-2:]}", body, ctype)
    for i, src in enumerate(sources[:4]):  # multipart with bad files
        multi(f"mp-truncated-{i}", [("file", ("t.png", src[: len(src) // 3], "image/png"))])
        multi(f"mp-random-{i}", [("file", ("r.bin", rng.bytes(500), "application/octet-stream"))])
        multi(f"mp-empty-{i}", [("file", ("e.png", b"", "image/png"))])
        multi(
            f"mp-one-bad-of-two-{i}",
            [("file", ("ok.png", src, "image/png")), ("file", ("bad.png", b"xx", "image/png"))],
        )
    multi("mp-too-many", [("file", (f"{i}.png", sources[0], "image/png")) for i in range(9)])
    multi("mp-fields-only", [])
    corpus.append(("mp-data-no-file", {"method": "POST", "url": "/v1/classify", "data": {"a": "b"},
                                       "files": {"x": ("x.txt", b"", "text/plain")}}))
    for q in ("abc", "0", "-1", "44", "1000000", "1.5", "", "%00"):
        corpus.append((f"top_k={q}", {"method": "POST", "url": f"/v1/classify?top_k={q}", "content": sources[0],
                                      "headers": {"content-type": "image/png"}}))
    for method, path in (
        ("GET", "/v1/classify"),
        ("PUT", "/v1/classify"),
        ("DELETE", "/v1/model"),
        ("POST", "/v1/model"),
        ("GET", "/v1/nothing"),
        ("POST", "/"),
        ("GET", "/static/../../etc/passwd"),
        ("GET", "/v1/pictogram/..%2f..%2fx.png"),
        ("PATCH", "/healthz"),
        ("GET", "/static/nope.js"),
    ):
        corpus.append((f"{method} {path}", {"method": method, "url": path}))
    for i in range(5):
        raw(f"detect-garbage-{i}", rng.bytes(100), path="/v1/detect")
    return corpus


def test_fuzz_corpus_gets_only_4xx_and_the_service_still_answers(service, models) -> None:
    corpus = fuzz_corpus()
    assert len(corpus) >= 200, len(corpus)
    before = expected_top(models["a"], png(14))
    statuses: Counter = Counter()
    bad: list[str] = []
    with httpx.Client(base_url=service.url, timeout=60) as c:
        for name, kw in corpus:
            kw = dict(kw)
            may_decode = kw.pop("may_decode", False)
            r = c.request(**kw)
            statuses[r.status_code] += 1
            if may_decode and r.status_code == 200:
                continue
            if r.status_code >= 500 or r.status_code < 400:
                bad.append(f"{name}: {r.status_code} {r.text[:200]}")
                continue
            err = r.json()["error"]
            if not (err["reason"] and err["message"] and err["status"] == r.status_code):
                bad.append(f"{name}: unhelpful error {err}")
        assert not bad, "\n".join(bad)
        assert {400, 404, 405, 413, 415} <= set(statuses), statuses
        r = c.post("/v1/classify", content=png(14), headers={"content-type": "image/png"})
        assert r.status_code == 200 and same_top(r.json()["results"][0]["top_k"], before)
        metrics = c.get("/metrics").text
    assert 'reason="internal"' not in metrics
    for reason in ("truncated", "not_an_image", "too_many_pixels", "body_too_large", "unsupported_media_type", "empty"):
        assert f'signscale_errors_total{{reason="{reason}"}}' in metrics, reason


def _metric(metrics: str, name: str) -> float:
    """A series' value; 0 when absent (each test also checks that a real decode moves it)."""
    m = re.search(rf"^{name} (\S+)$", metrics, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def _decoding(c: httpx.Client) -> tuple[float, float]:
    """(images whose decoding started, CPU seconds spent decoding) as the service counts them."""
    metrics = c.get("/metrics").text
    return _metric(metrics, "signscale_decode_images_total"), _metric(metrics, "signscale_decode_cpu_seconds_total")


def _flat_png(w: int, h: int) -> bytes:
    """A real, fully decodable PNG of one colour: a few KB on the wire for millions of pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


def test_one_image_over_max_images_is_the_documented_413(service) -> None:
    one = png(14)
    with httpx.Client(base_url=service.url, timeout=60) as c:
        for n in (9, 40):  # max_images + 1 (starlette's parser stops there), and well over
            r = c.post("/v1/classify", files=[("file", (f"{i}.png", one, "image/png")) for i in range(n)])
            assert r.status_code == 413, (n, r.text)
            assert r.json()["error"]["reason"] == "too_many_images" and "max_images" in r.json()["error"]["message"]
        r = c.post("/v1/classify", files=[("file", (f"{i}.png", one, "image/png")) for i in range(8)])
        assert r.status_code == 200 and len(r.json()["results"]) == 8


def test_pixels_of_a_whole_request_over_the_budget_are_413_before_any_decoding(service) -> None:
    big = _flat_png(2000, 2000)  # 4M pixels: within max_pixels alone, two of them over max_request_pixels
    with httpx.Client(base_url=service.url, timeout=60) as c:
        decoded, cpu = _decoding(c)
        r = c.post("/v1/classify", files=[("file", ("a.png", big, "image/png")), ("file", ("b.png", big, "image/png"))])
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["reason"] == "too_many_pixels" and "max_request_pixels" in err["message"], err
        assert "8000000" in err["message"]
        assert _decoding(c) == (decoded, cpu)  # refused from the headers: not one image decoded, no decode CPU
        r = c.post("/v1/classify", files=[("file", ("a.png", big, "image/png"))])  # one alone is served
        assert r.status_code == 200, r.text
        after, after_cpu = _decoding(c)
        assert after == decoded + 1 and after_cpu > cpu  # the counters do count a decode


def test_the_issue_request_of_64_large_pngs_is_refused_by_default_limits(models) -> None:
    """The filed fault: 64 PNGs of 4900x4900 (~5 MB) cost 27 CPU-seconds; now a 413 before decoding."""
    big = _flat_png(4900, 4900)
    with running(ServeConfig(model=models["a"], port=0, reload_interval_s=0)) as svc, \
            httpx.Client(base_url=svc.url, timeout=120) as c:
        decoded, cpu = _decoding(c)
        r = c.post("/v1/classify", files=[("file", (f"{i}.png", big, "image/png")) for i in range(64)])
        assert r.status_code == 413 and r.json()["error"]["reason"] == "too_many_pixels", r.text
        assert _decoding(c) == (decoded, cpu)


def test_decode_cpu_over_the_budget_is_413_decode_budget_exceeded(models) -> None:
    # a budget of 1 microsecond of CPU: any real decode passes it, so the refusal is deterministic
    with running(cfg(models["a"], decode_budget_s=1e-6)) as svc, httpx.Client(base_url=svc.url, timeout=60) as c:
        for body in (png(14), _flat_png(600, 600)):  # decoded in the event loop, and in a worker thread
            decoded, cpu = _decoding(c)
            r = c.post("/v1/classify", content=body, headers={"content-type": "image/png"})
            assert r.status_code == 413, r.text
            err = r.json()["error"]
            assert err["reason"] == "decode_budget_exceeded" and "decode_budget_s" in err["message"], err
            after, after_cpu = _decoding(c)
            assert after == decoded + 1 and after_cpu > cpu
        r = c.post("/v1/classify", files=[("file", (f"{i}.png", png(i), "image/png")) for i in range(3)])
        assert r.status_code == 413 and "image 0 of 3" in r.json()["error"]["message"]  # stops at the first
        assert _decoding(c)[0] == after + 1


def test_budget_options_are_checked(models) -> None:
    with pytest.raises(ValueError, match="max_request_pixels"):
        ServeConfig(model=models["a"], max_pixels=1000, max_request_pixels=999)
    with pytest.raises(ValueError, match="decode_budget_s"):
        ServeConfig(model=models["a"], decode_budget_s=31, request_timeout_s=30)
    with pytest.raises(ValueError, match="decode_budget_s"):
        ServeConfig(model=models["a"], decode_budget_s=0)


def test_odd_but_valid_images_are_classified(service, models) -> None:
    def enc(img: Image.Image, fmt: str) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        return buf.getvalue()

    base = Image.fromarray(render_clean(14, 40))
    odd = {"palette": enc(base.convert("P"), "PNG"), "grey+alpha": enc(base.convert("LA"), "PNG"),
           "cmyk-jpeg": enc(base.convert("CMYK"), "JPEG"), "1x1": enc(Image.new("RGB", (1, 1)), "PNG"),
           "16-bit": enc(base.convert("I;16"), "PNG"), "rgba": enc(base.convert("RGBA"), "PNG"),
           "ppm": enc(base, "PPM")}
    with httpx.Client(base_url=service.url, timeout=30) as c:
        for name, data in odd.items():
            r = c.post("/v1/classify", content=data, headers={"content-type": "application/octet-stream"})
            assert r.status_code == 200, (name, r.text)


# --------------------------------------------------------------------------------------------- load


def test_fifty_concurrent_requests_all_succeed_with_their_own_answers(service, models) -> None:
    bodies = [png(i % 43, 30 + i) for i in range(50)]
    want = Predictor.load(models["a"]).classify(bodies)

    async def fire() -> list:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=service.url, timeout=60, limits=limits) as c:
            return await asyncio.gather(*(c.post("/v1/classify", content=b, headers={"content-type": "image/png"})
                                          for b in bodies))

    with httpx.Client(base_url=service.url) as c:
        batches_before = _batch_count(c.get("/metrics").text)
    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * 50
    for r, w in zip(responses, want):  # batching must not mix up or change anyone's answer
        assert same_top(r.json()["results"][0]["top_k"], w)
    with httpx.Client(base_url=service.url) as c:
        batches = _batch_count(c.get("/metrics").text) - batches_before
    assert batches < 50, f"{batches} forward passes for 50 concurrent requests: nothing was batched"


def _batch_count(metrics: str) -> float:
    return float(re.search(r"^signscale_batch_images_count (\S+)$", metrics, re.MULTILINE).group(1))


def _gated_predictor(gate: threading.Event) -> Predictor:
    def run(batch: np.ndarray) -> np.ndarray:
        gate.wait(30)
        return np.full((len(batch), 43), 1 / 43, np.float32)

    meta = {"label_space": LabelSpace.for_country("de").to_dict(), "preprocess": Preprocess(image_size=8).to_dict()}
    return Predictor(run=run, backend="gated", meta=meta, url="gated", version="1")


def test_full_queue_is_503_with_retry_after_and_slow_model_times_out() -> None:
    gate = threading.Event()
    p = _gated_predictor(gate)
    img = np.zeros((8, 8, 3), np.uint8)

    async def scenario() -> None:
        b = Batcher(max_batch=4, max_wait_s=0.0, max_queue=2, retry_after_s=7)
        b.start()
        try:
            first, second = b.enqueue([img], p), b.enqueue([img], p)  # the runner holds at most the first
            with pytest.raises(ApiError) as exc:
                b.enqueue([img, img], p)
            assert exc.value.status == 503 and exc.value.headers == {"Retry-After": "7"}
            assert exc.value.reason == "queue_full"
            with pytest.raises(ApiError) as exc:
                await b.result(second, 0.05)
            assert exc.value.status == 503 and exc.value.reason == "timeout"
            gate.set()
            assert (await b.result(first, 30)).shape == (1, 43)
            assert (await b.submit([img, img], p, 30)).shape == (2, 43)  # room again
        finally:
            gate.set()
            await b.stop()

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------- hot reload


def test_twenty_alias_changes_under_load_one_corrupt(models, tmp_path: Path) -> None:
    pointer = tmp_path / "production.json"

    def point(version: str, url: str) -> None:
        tmp = pointer.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": version, "url": url}))
        os.replace(tmp, pointer)

    def source() -> tuple[str, str]:
        d = json.loads(pointer.read_text())
        return d["version"], d["url"]

    body = png(14)
    want = {url: expected_top(url, body) for url in (models["a"], models["b"])}
    assert not same_top(want[models["a"]], want[models["b"]])  # the two models are told apart by their answers
    url_of = {"v00": models["a"]}
    point("v00", models["a"])
    outcomes, seen, failures = [], Counter(), []
    with running(cfg(models["a"]), source=source) as svc:
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=svc.url, timeout=60) as c:
                while not stop.is_set():
                    r = c.post("/v1/classify", content=body, headers={"content-type": "image/png"})
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                        continue
                    version = r.json()["model"]["version"]
                    seen[version] += 1
                    if not same_top(r.json()["results"][0]["top_k"], want[url_of[version]]):
                        failures.append(f"version {version} answered with another model's probabilities")

        clients = [threading.Thread(target=client) for _ in range(3)]
        for t in clients:
            t.start()
        try:
            for i in range(1, 21):
                version = f"v{i:02d}"
                url = models["corrupt"] if i == 10 else (models["b"] if i % 2 else models["a"])
                url_of[version] = url
                point(version, url)
                outcomes.append(svc.poll())
                with httpx.Client(base_url=svc.url, timeout=60) as c:  # at least one request per version
                    serving = c.post("/v1/classify", content=body, headers={"content-type": "image/png"})
                    assert serving.status_code == 200
                    expect = "v09" if i == 10 else version
                    assert serving.json()["model"]["version"] == expect
                    seen[expect] += 1
        finally:
            stop.set()
            for t in clients:
                t.join()
        info = httpx.get(f"{svc.url}/v1/model", timeout=30).json()
        metrics = httpx.get(f"{svc.url}/metrics", timeout=30).text
    assert outcomes == ["refused" if i == 10 else "swapped" for i in range(1, 21)]
    assert not failures, failures[:5]
    assert "v10" not in seen and "v10" in info["serving"]["refused_versions"]
    assert "sha256" in info["serving"]["refused_versions"]["v10"]
    assert set(seen) >= {f"v{i:02d}" for i in range(1, 21) if i != 10} and sum(seen.values()) > 20, seen
    assert 'signscale_model_reloads_total{result="refused"} 1.0' in metrics


def test_a_folder_updated_non_atomically_is_refused_then_served_once_consistent(models, tmp_path: Path) -> None:
    """model.json of the new version lands before its weights: refused, reported, then served after the fix."""
    folder = tmp_path / "model"
    shutil.copytree(models["a"], folder)
    new = Path(models["b"])
    va, vb = resolve_model(models["a"])[0], resolve_model(models["b"])[0]
    body = png(14)
    with running(cfg(str(folder))) as svc, httpx.Client(base_url=svc.url, timeout=60) as c:
        def serving() -> str:
            r = c.post("/v1/classify", content=body, headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            return r.json()["model"]["version"]

        assert serving() == va
        (folder / "model.json").write_bytes((new / "model.json").read_bytes())  # half of the update
        assert svc.poll() == "refused"
        health = c.get("/healthz").json()
        assert health["status"] == "ok" and health["serving"] == va and serving() == va
        [refusal] = health["refused"]
        assert refusal["version"] == vb and "sha256" in refusal["reason"] and refusal["attempts"] == 1
        assert datetime.fromisoformat(refusal["since"]).tzinfo is not None
        assert svc.poll() == "unchanged"  # nothing changed in the folder: not loaded again
        assert c.get("/healthz").json()["refused"] == [refusal]
        (folder / "model.pt").write_bytes((new / "model.pt").read_bytes())  # the update completes
        assert svc.poll() == "swapped"
        assert serving() == vb
        assert same_top(c.post("/v1/classify", content=body, headers={"content-type": "image/png"}).json()
                        ["results"][0]["top_k"], expected_top(models["b"], body))
        assert c.get("/healthz").json() == {"status": "ok", "serving": vb, "refused": []}
        metrics = c.get("/metrics").text
    assert 'signscale_model_reloads_total{result="refused"} 1.0' in metrics


def test_registry_alias_promotion_reloads_and_a_corrupt_version_never_serves(models, tmp_path: Path) -> None:
    from signscale.serving import registry

    reg = registry.Registry(str(tmp_path / "reg"))
    va, vb, vc = reg.register(models["a"]), reg.register(models["b"]), reg.register(models["a"])
    reg.promote(va.id)
    stored = Path(vc.model_url) / "model.pt"  # damage the registered copy after registration
    data = bytearray(stored.read_bytes())
    data[100] ^= 0xFF
    stored.write_bytes(bytes(data))
    body = png(14)
    with running(cfg(f"{tmp_path / 'reg'}@production")) as svc:
        def version() -> str:
            r = httpx.post(f"{svc.url}/v1/classify", content=body, headers={"content-type": "image/png"}, timeout=30)
            assert r.status_code == 200
            return r.json()["model"]["version"]

        assert version() == va.id
        assert svc.poll() == "unchanged"
        reg.promote(vb.id)
        assert svc.poll() == "swapped" and version() == vb.id
        reg.promote(vc.id)
        assert svc.poll() == "refused" and version() == vb.id


# --------------------------------------------------------------------------------------------- the page


async def _upload_in_browser(browser: str, page_url: str, image: Path, profile: Path) -> dict:
    """Drive headless Chromium over the DevTools protocol: open the page, set the file input, read the result."""
    async with devtools_page(browser, profile) as (call, wait_event):
        await call("Page.enable")
        await call("Page.navigate", url=page_url)
        await wait_event("Page.loadEventFired")
        root = (await call("DOM.getDocument"))["root"]["nodeId"]
        node = (await call("DOM.querySelector", nodeId=root, selector="#file"))["nodeId"]
        await call("DOM.setFileInputFiles", nodeId=node, files=[str(image)])
        done = await call("Runtime.evaluate", awaitPromise=True, returnByValue=True, expression="""
            new Promise((resolve) => {
              const el = document.getElementById('results');
              const check = () => {
                if (el.dataset.state !== 'done' && el.dataset.state !== 'error') return false;
                if (document.getElementById('model').textContent.startsWith('loading')) return false;
                resolve({state: el.dataset.state, text: el.textContent, unsure: !!el.querySelector('.unsure'),
                         rows: [...el.querySelectorAll('.prediction')].map(
                           (p) => [p.dataset.key, p.querySelector('.prob').textContent]),
                         model: document.getElementById('model').textContent,
                         canvas: document.getElementById('preview').width});
                return true;
              };
              if (!check()) new MutationObserver(check).observe(document.body, {
                attributes: true, childList: true, subtree: true, characterData: true});
            })""")
        return done["result"]["value"]


def test_page_uploads_an_image_and_shows_the_prediction(service, models, tmp_path: Path) -> None:
    browser = find_browser()
    if browser is None:
        pytest.skip("no chromium/chromium-browser/google-chrome on PATH: the page was not checked in a browser")
    image = tmp_path / "stop.png"
    image.write_bytes(png(14, 48))
    result = asyncio.run(_upload_in_browser(browser, service.url + "/", image, tmp_path / "profile"))
    assert result["state"] == "done", result
    want = expected_top(models["a"], image.read_bytes())
    assert [key for key, _ in result["rows"]] == [w["key"] for w in want]
    assert result["rows"][0][1] == f"{100 * want[0]['probability']:.1f}%"
    assert "43 classes" in result["model"] and result["canvas"] > 0 and not result["unsure"]
    # the same image on a page asking for more confidence than the model has: it says unsure, guesses below
    strict = asyncio.run(_upload_in_browser(browser, service.url + "/?min_confidence=0.9999", image,
                                            tmp_path / "profile2"))
    assert want[0]["probability"] < 0.9999
    assert strict["state"] == "done" and strict["unsure"] and "unsure: the top answer is below" in strict["text"]
    assert [key for key, _ in strict["rows"]] == [w["key"] for w in want]


# --------------------------------------------------------------------------------------------- the command


def test_cli_serve_runs_a_real_process(models) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "signscale", "serve", models["a"], "--port", "0",
                             "--reload-interval", "0", "max_batch=8"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r" on (http://\S+) ", line).group(1)
        r = httpx.get(f"{url}/readyz", timeout=120)  # waits in the listen backlog until the model is warm
        assert r.status_code == 200
        r = httpx.post(f"{url}/v1/classify", content=png(14), headers={"content-type": "image/png"}, timeout=60)
        assert r.status_code == 200 and same_top(r.json()["results"][0]["top_k"], expected_top(models["a"], png(14)))
        assert httpx.get(f"{url}/v1/model", timeout=30).json()["serving"]["max_batch"] == 8
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) in (0, -15)  # uvicorn shuts down cleanly, then re-raises SIGTERM


def test_config_errors_name_the_option(models) -> None:
    with pytest.raises(ValueError, match="max_queue"):
        ServeConfig(model=models["a"], max_queue=2, max_images=8)
    with pytest.raises(ValueError, match="max_batch"):
        ServeConfig(model=models["a"], max_batch=0)
    with pytest.raises(ValueError, match="max_pixels"):
        ServeConfig(model=models["a"], max_pixels=10**9)


@pytest.mark.slow
def test_bench_serve_measures_every_row(models) -> None:
    from signscale.bench.serve import BenchServeConfig, bench_serve

    result = bench_serve(BenchServeConfig(model=models["a"], rows=("reference", "torch+batch"), concurrency=(1, 4),
                                          seconds=0.4, rounds=1, warmup_s=0.05), show=False)
    assert [(c.row, c.concurrency) for c in result.cells] == [("reference", 1), ("reference", 4),
                                                             ("torch+batch", 1), ("torch+batch", 4)]
    for cell in result.cells:
        assert cell.requests > 0 and cell.errors == 0 and cell.pct(50) <= cell.pct(99)
    assert "the reference" in result.verdict(4)

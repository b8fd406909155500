"""``signscale bench serve``: requests/s and latency percentiles of the service, side by side.

Rows (each a server in its own process, measured one at a time by the same client):

* ``reference``: what a user writes without signscale: one FastAPI endpoint taking an
  ``UploadFile``, PIL decode and resize, one PyTorch forward pass per request, in FastAPI's
  thread pool (:func:`reference_app`);
* ``torch`` / ``onnx``: ``signscale serve`` with each back-end, one image per forward pass;
* ``torch+batch`` / ``onnx+batch``: the same with dynamic batching.

The client is a minimal HTTP/1.1 keep-alive client on asyncio (pre-built request bytes, one
connection per concurrent caller), so that on a small machine its own cost stays well below the
servers' and the figures compare servers, not clients. Every row gets the same request: one
multipart upload of a PNG sign. Each cell runs a short warm-up, then ``seconds`` of closed-loop load.

Module note: no ``from __future__ import annotations`` here, because FastAPI reads the reference
endpoint's parameter annotations at runtime.
"""

import asyncio
import io
import multiprocessing as mp
import os
import socket
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from signscale import config

ROWS = ("reference", "torch", "torch+batch", "onnx", "onnx+batch")
BOUNDARY = "signscalebenchboundary"


@dataclass(frozen=True)
class BenchServeConfig:
    model: str = ""  # model folder; empty: a fresh msnet at 32 px (speed does not depend on the weights)
    concurrency: tuple[int, ...] = (1, 8, 32)
    seconds: float = 3.0  # measured seconds per cell, split over the rounds
    rounds: int = 3  # interleaved passes over all rows (spreads background-load changes evenly)
    warmup_s: float = 0.25  # unmeasured load before each measured slice
    rows: tuple[str, ...] = ROWS
    threads: int = 1  # model threads in signscale's servers (0: the back-end's default)
    reference_threads: int = 0  # torch threads in the reference app (0: torch's default, what a user gets)
    max_batch: int = 32
    max_wait_ms: float = 2.0
    image_px: int = 48  # side of the PNG sign sent with each request

    def __post_init__(self) -> None:
        bad = [r for r in self.rows if r not in ROWS]
        if bad or not self.rows:
            raise config.ConfigError(f"rows: unknown {bad}; choose from {', '.join(ROWS)}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise config.ConfigError(f"concurrency: positive integers, got {list(self.concurrency)}")
        if self.rounds < 1:
            raise config.ConfigError(f"rounds: must be >= 1, got {self.rounds}")
        if self.seconds <= 0 or self.warmup_s < 0:
            raise config.ConfigError("seconds: must be > 0 (and warmup_s >= 0)")


@dataclass(frozen=True)
class Cell:
    row: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: tuple[float, ...] = field(repr=False)
    server_cpu_s: float = float("nan")  # CPU time the server process used while measured

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.server_cpu_s / self.requests if self.requests else float("nan")

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


@dataclass(frozen=True)
class BenchServeResult:
    cells: tuple[Cell, ...]

    def cell(self, row: str, c: int) -> Cell | None:
        return next((x for x in self.cells if x.row == row and x.concurrency == c), None)

    def verdict(self, c: int = 32) -> str:
        ref = self.cell("reference", c)
        ours = [x for x in self.cells if x.row != "reference" and x.concurrency == c]
        if ref is None or not ours:
            return ""
        best = max(ours, key=lambda x: x.rps)
        ok = best.rps >= 2 * ref.rps and best.pct(99) <= ref.pct(99)
        return (f"at concurrency {c}: {best.row} {best.rps:.0f} req/s = {best.rps / ref.rps:.2f}x the reference "
                f"({ref.rps:.0f} req/s); p99 {best.pct(99):.1f} ms vs {ref.pct(99):.1f} ms: "
                f"goal (>= 2x, p99 no worse) {'met' if ok else 'NOT met'}")


# ---------------------------------------------------------------------------------------------
# The reference: a plain one-endpoint FastAPI + PyTorch app


def reference_app(model_url: str) -> Any:
    """What a user writes without signscale: decode, resize, normalise, forward, top-5, per request."""
    import torch
    from fastapi import FastAPI, File, UploadFile
    from PIL import Image

    from signscale.labels import LabelSpace
    from signscale.training import checkpoint
    from signscale.transforms import Preprocess

    model, meta = checkpoint.load_model(model_url)
    keys = LabelSpace.from_dict(meta["label_space"]).keys
    size = Preprocess.from_dict(meta["preprocess"]).image_size
    mean = torch.tensor(meta["preprocess"]["mean"]).view(3, 1, 1)
    std = torch.tensor(meta["preprocess"]["std"]).view(3, 1, 1)
    app = FastAPI()

    @app.post("/predict")
    def predict(file: UploadFile = File(...)) -> dict[str, Any]:  # noqa: B008 - FastAPI's idiom
        img = Image.open(io.BytesIO(file.file.read())).convert("RGB").resize((size, size), Image.BILINEAR)
        x = (torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255 - mean) / std
        with torch.no_grad():
            probs = model(x[None]).softmax(1)[0]
        top = probs.topk(5)
        return {"top_k": [{"key": keys[int(i)], "probability": float(p)} for p, i in zip(top.values, top.indices)]}

    return app


# ---------------------------------------------------------------------------------------------
# Servers in their own processes


def _server_main(row: str, model_url: str, cfg: BenchServeConfig, sock: socket.socket) -> None:
    import uvicorn

    if row == "reference":
        if cfg.reference_threads:
            import torch

            torch.set_num_threads(cfg.reference_threads)
        app = reference_app(model_url)
    else:
        from signscale.serving.serve import ServeConfig, create_app

        backend, _, batch = row.partition("+")
        app = create_app(ServeConfig(model=model_url, port=0, backend=backend, batching=bool(batch),  # type: ignore
                                     max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms, threads=cfg.threads,
                                     reload_interval_s=0, max_queue=4096))
    uvicorn.Server(uvicorn.Config(app, log_level="error", access_log=False, backlog=2048)).run(sockets=[sock])


class _Server:
    def __init__(self, row: str, model_url: str, cfg: BenchServeConfig) -> None:
        from signscale.serving.service import bind

        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.proc = mp.get_context("spawn").Process(target=_server_main, args=(row, model_url, cfg, self.sock),
                                                    daemon=True)
        self.proc.start()

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux /proc; NaN elsewhere)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return float("nan")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.join(30)
        self.sock.close()


# ---------------------------------------------------------------------------------------------
# The client


def _request(path: str, png: bytes) -> bytes:
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"sign.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{BOUNDARY}--\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


class _CpuWindow:
    """Server CPU seconds between the end of the warm-up and the end of the measured slice."""

    def __init__(self, server: "_Server", warmup_s: float) -> None:
        self.server, self.begin = server, float("nan")

    def start(self) -> None:
        self.begin = self.server.cpu_seconds()

    def stop(self) -> float:
        return self.server.cpu_seconds() - self.begin


async def _load(port: int, request: bytes, concurrency: int, warmup_s: float, seconds: float,
                on_start: Any = None) -> tuple[int, int, float, list[float]]:
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup_s
    end = start + seconds
    if on_start is not None:
        loop.call_at(start, on_start)

    async def caller() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while True:
                t0 = loop.time()
                if t0 >= end:
                    return
                status = await _one(reader, writer, request)
                t1 = loop.time()
                if t0 >= start:  # only requests started in the measured window count
                    if status == 200:
                        latencies.append((t1 - t0) * 1000)
                    else:
                        errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return len(latencies), errors, seconds, latencies


async def _ready(server: "_Server", request: bytes) -> None:
    """Wait until the server answers a valid request (it loads its model first); fail if it dies."""
    while True:
        if not server.proc.is_alive():
            raise RuntimeError(f"the benchmark server exited with code {server.proc.exitcode} before answering")
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)  # queued in the backlog
        try:
            status = await asyncio.wait_for(_one(reader, writer, request), 5)
        except TimeoutError:
            continue  # still starting (or the machine is busy): check that it lives, then ask again
        finally:
            writer.close()
        if status != 200:
            raise RuntimeError(f"the benchmark server answered {status} to a valid request")
        return


# ---------------------------------------------------------------------------------------------
# The command


def _default_model(root: str) -> str:
    import torch

    from signscale.labels import LabelSpace
    from signscale.models import create_model, model_config
    from signscale.training import checkpoint
    from signscale.transforms import Preprocess

    torch.manual_seed(0)
    model = create_model("msnet", 43)
    url = f"{root}/msnet"
    checkpoint.save_model(
        url,
        state_dict=model.state_dict(),
        model_config=model_config(model),
        label_space=LabelSpace.for_country("de").to_dict(),
        preprocess=Preprocess(image_size=32).to_dict(),
    )
    return url


def bench_serve(cfg: BenchServeConfig, *, show: bool = True, console: Any = None) -> BenchServeResult:
    """Run every row x concurrency cell; print the table (and the verdict at c=32) when ``show``.

    All servers start at once and stay up; the cells are measured in ``rounds`` interleaved
    passes (row after row, a slice of ``seconds`` each), so a change in background load during
    the run spreads over every row instead of landing on one.
    """
    from signscale import images
    from signscale.data.sources.pictograms import render_clean

    png = images.encode_png(render_clean(14, cfg.image_px))
    counts: dict[tuple[str, int], list[Any]] = {}
    with tempfile.TemporaryDirectory(prefix="signscale-bench-serve-") as tmp:
        model = cfg.model or _default_model(tmp)
        requests = {row: _request("/predict" if row == "reference" else "/v1/classify", png) for row in cfg.rows}
        servers: dict[str, _Server] = {}
        try:
            for row in cfg.rows:
                servers[row] = _Server(row, model, cfg)
            for row in cfg.rows:
                asyncio.run(_ready(servers[row], requests[row]))
            slice_s = cfg.seconds / cfg.rounds
            for _ in range(cfg.rounds):
                for c in cfg.concurrency:
                    for row in cfg.rows:
                        cpu = _CpuWindow(servers[row], cfg.warmup_s)
                        n, errors, secs, lat = asyncio.run(_load(servers[row].port, requests[row], c,
                                                                 cfg.warmup_s, slice_s, on_start=cpu.start))
                        acc = counts.setdefault((row, c), [0, 0, 0.0, [], 0.0])
                        acc[0] += n
                        acc[1] += errors
                        acc[2] += secs
                        acc[3].extend(lat)
                        acc[4] += cpu.stop()
        finally:
            for server in servers.values():
                server.close()
    cells = tuple(Cell(row, c, *counts[(row, c)][:3], tuple(counts[(row, c)][3]), counts[(row, c)][4])  # type: ignore
                  for row in cfg.rows for c in cfg.concurrency)
    result = BenchServeResult(cells)
    if show:
        _print(result, cfg, console)
    return result


def _print(result: BenchServeResult, cfg: BenchServeConfig, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None or not console.is_terminal:  # piped into a file or a note: never wrap or truncate the table
        console = Console(highlight=False, width=200)
    threads = lambda n: str(n) if n else "default"
    table = Table(title=f"signscale bench serve: {cfg.seconds:g}s per cell, one {cfg.image_px}px PNG per request; "
                        f"model threads: signscale {threads(cfg.threads)}, reference {threads(cfg.reference_threads)}")
    for col in ("server", "concurrency", "req/s", "x reference", "p50 ms", "p95 ms", "p99 ms", "server CPU ms/req",
                "errors"):
        table.add_column(col, justify="left" if col == "server" else "right")
    for x in result.cells:
        ref = result.cell("reference", x.concurrency)
        ratio = f"{x.rps / ref.rps:.2f}x" if ref and ref.rps else "-"
        table.add_row(x.row, str(x.concurrency), f"{x.rps:.0f}", ratio, f"{x.pct(50):.1f}", f"{x.pct(95):.1f}",
                      f"{x.pct(99):.1f}", f"{x.cpu_ms_per_request:.2f}", str(x.errors))
    console.print(table)
    if 32 in cfg.concurrency:
        console.print(result.verdict(32))

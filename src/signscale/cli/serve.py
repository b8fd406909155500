"""Using a model: ``predict``, ``serve``, ``export`` and ``bench serve``."""

from __future__ import annotations

import argparse
import json

from signscale.cli._commands import Commands, add_config, config_args, console


def errors() -> tuple[type[BaseException], ...]:
    from signscale.config import ConfigError
    from signscale.serving.export import ExportError
    from signscale.serving.predict import PredictError
    from signscale.serving.runtime import BackendError
    from signscale.serving.serve import ServeError
    from signscale.training.checkpoint import CheckpointError

    return (BackendError, CheckpointError, ConfigError, ExportError, PredictError, ServeError)


def _predict(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from signscale import config
    from signscale.serving.predict import PredictConfig, Predictor, collect_inputs

    cfg = config.load(PredictConfig, None, config_args(args), base={"model": args.model})
    predictor = Predictor.load(cfg)
    inputs = collect_inputs(args.inputs)
    results = _scenes(predictor, inputs) if cfg.detector else predictor.classify_files(inputs)
    failed = unsure = 0
    for r in results:
        failed += "error" in r
        unsure += bool(r.get("unsure"))
        if args.json:
            print(json.dumps(r), flush=False)
        elif "error" in r:
            console.print(f"{escape(r['input'])}: [red]{r['error']['reason']}[/] {escape(r['error']['message'])}")
        elif "boxes" in r:
            found = ", ".join(f"{b.get('key')} {100 * float(b.get('confidence', b.get('score', 0))):.0f}% "
                              f"at {[round(float(v)) for v in b['box']]}" for b in r["boxes"])
            console.print(f"{escape(r['input'])}: {escape(found) or 'no sign found'}")
        else:
            tops = ", ".join(f"{t['key']} {100 * t['probability']:.1f}%" for t in r["top_k"])
            flag = f"[yellow]unsure[/] (below {cfg.min_confidence:.0%}; best guesses: " if r.get("unsure") else ""
            console.print(f"{escape(r['input'])}: {flag}{escape(tops)}{')' if flag else ''}")
    if not args.json:
        console.print(
            f"{len(results) - failed} of {len(results)} image(s) classified with model "
            f"{predictor.version} ({predictor.backend})" + (f"; {failed} could not be read" if failed else "")
            + (f"; {unsure} unsure (below --min-confidence {cfg.min_confidence:g})" if unsure else "")
        )
    return 0 if len(results) > failed else 1  # 1: nothing usable came out (no image could be classified)


def _scenes(predictor, inputs: list[str]) -> list[dict]:
    from signscale import images, storage
    from signscale.serving.serve import _plain

    out = []
    for url in inputs:
        try:
            scene = images.decode(storage.read_bytes(url), max_pixels=predictor.max_pixels)
        except (images.ImageError, OSError) as exc:
            out.append({"input": url, "error": {"reason": getattr(exc, "reason", "unreadable"), "message": str(exc)}})
            continue
        out.append({"input": url, "boxes": _plain(predictor.detect([scene])[0])})
    return out


def _serve(args: argparse.Namespace) -> int:
    import logging

    from signscale import config
    from signscale.serving.serve import ServeConfig
    from signscale.serving.service import serve

    cfg = config.load(ServeConfig, args.config, config_args(args), base={"model": args.model})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    serve(cfg, on_listening=lambda url: print(f"serving {cfg.model} on {url} (page: {url}/, API: {url}/docs)",
                                              flush=True))
    return 0


def _export(args: argparse.Namespace) -> int:
    from signscale.serving.export import ExportConfig, export

    result = export(ExportConfig(model=args.model, out=args.out or "", format=args.format, opset=args.opset,
                                 exporter=args.exporter, samples=args.samples, tolerance=args.tolerance))
    console.print(result.summary())
    return 0


def _bench_serve(args: argparse.Namespace) -> int:
    from signscale.bench.serve import BenchServeConfig, bench_serve

    bench_serve(BenchServeConfig(model=args.model or "", concurrency=tuple(int(c) for c in args.concurrency.split(",")),
                                 seconds=args.seconds, rows=tuple(args.rows.split(",")), threads=args.threads,
                                 reference_threads=args.reference_threads, rounds=args.rounds), console=console)
    return 0


def register(r: Commands) -> None:
    p = r.add("predict", _predict, help="classify images (files, folders, globs, URLs) with a model")
    p.add_argument("model", help="model folder, ONNX export folder, or REGISTRY_URL@ALIAS")
    p.add_argument("inputs", nargs="+", metavar="PATH_OR_URL", help="image files, folders, globs or URLs")
    p.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    add_config(p, "signscale.serving.predict:PredictConfig", skip=("model",), rest=False)

    p = r.add("serve", _serve, help="HTTP service and a page to try the model (FastAPI + uvicorn)")
    p.add_argument("model", help="model folder, ONNX export folder, or REGISTRY_URL@ALIAS (reloaded when it moves)")
    p.add_argument("--config", help="YAML file with ServeConfig keys")
    add_config(
        p, "signscale.serving.serve:ServeConfig", skip=("model",), aliases={"reload_interval_s": ["--reload-interval"]}
    )

    p = r.add("export", _export, help="export a model to ONNX and check parity with PyTorch")
    p.add_argument("model", help="model artefact folder")
    p.add_argument("--format", default="onnx", choices=("onnx",))
    p.add_argument("--out", help="export folder (default: MODEL-onnx)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--exporter", default="torchscript", choices=("torchscript", "dynamo"))
    p.add_argument("--samples", type=int, default=64, help="inputs for the parity check")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed probability difference")

    p = r.add("serve", _bench_serve, parent="bench",
              help="service req/s and p50/p95/p99: PyTorch vs onnxruntime, batching on/off, vs a plain FastAPI app")
    p.add_argument("--model", help="model folder (default: a fresh msnet at 32 px)")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per cell")
    p.add_argument("--rounds", type=int, default=3, help="interleaved passes over the rows")
    p.add_argument("--rows", default="reference,torch,torch+batch,onnx,onnx+batch")
    p.add_argument("--threads", type=int, default=1, help="model threads in signscale's servers (0: default)")
    p.add_argument("--reference-threads", type=int, default=0, help="torch threads in the reference app (0: default)")

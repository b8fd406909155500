"""The core commands: sources, show, pack, data, train, evaluate, compare, demo."""

from __future__ import annotations

import argparse

from rich.table import Table

from signscale.cli._registry import Registry, console


def errors() -> tuple[type[BaseException], ...]:
    from signscale.checkpoint import CheckpointError
    from signscale.config import ConfigError
    from signscale.evaluate import CompareError, EvalError
    from signscale.labels import LabelError
    from signscale.shards import ShardError
    from signscale.sources import SourceError
    from signscale.storage import StorageError
    from signscale.train import TrainError

    return (ConfigError, SourceError, ShardError, LabelError, StorageError, CheckpointError, EvalError,
            CompareError, TrainError)


def _version(args: argparse.Namespace) -> int:
    import signscale

    console.print(f"signscale {signscale.__version__}")
    return 0


def _sources(args: argparse.Namespace) -> int:
    from signscale.sources import SOURCES

    table = Table(title="sources (use as KIND:LOCATION?options)")
    for col in ("kind", "what", "example"):
        table.add_column(col)
    for kind, info in SOURCES.items():
        table.add_row(kind, info.help, info.example)
    console.print(table)
    return 0


def _show(args: argparse.Namespace) -> int:
    from signscale.show import show

    s = show(args.source, out=args.out or "", per_class=args.per_class)
    table = Table(title=f"{args.source}: {s.unit} per class")
    table.add_column("id", justify="right")
    table.add_column("key")
    table.add_column(s.unit, justify="right")
    from signscale.sources import open_source

    space = open_source(args.source).label_space
    for i, n in enumerate(s.per_class):
        table.add_row(str(i), space[i].key, f"{n:,}")
    if not args.quiet:
        console.print(table)
    console.print(s.summary())
    return 0


def _pack(args: argparse.Namespace) -> int:
    from signscale import config
    from signscale.pack import PackConfig, pack

    opts = {k: v for k, v in {"encoding": args.encoding, "size": args.size, "shard_mb": args.shard_mb,
                              "workers": args.workers, "strict": args.strict, "crop": args.crop,
                              "name": args.name, "rank": args.rank, "world_size": args.world_size}.items()
            if v is not None}
    cfg = config.load(PackConfig, args.config, args.overrides, base={"source": args.source, "out": args.out, **opts})
    from signscale import distributed

    distributed.init()
    result = pack(cfg)
    console.print(result.summary())
    if result.quarantined:
        console.print(f"[yellow]warning:[/] {result.quarantined} sample(s) quarantined; see "
                      f"{cfg.out.rstrip('/')}/quarantine.jsonl")
        if cfg.strict:
            return 3
    return 0


def _data(args: argparse.Namespace) -> int:
    from signscale import shards, show

    if args.data_cmd == "info":
        info = show.dataset_info(args.url, histogram=args.histogram or "")
        table = Table(title=f"{args.url}")
        table.add_column("field")
        table.add_column("value")
        m = info.manifest
        for k in ("name", "version", "created", "encoding", "image_shape"):
            table.add_row(k, str(m.get(k)))
        table.add_row("samples", f"{info.count:,}")
        table.add_row("shards", str(info.shards))
        table.add_row("bytes", f"{info.bytes:,}")
        table.add_row("label space", f"{m['label_space']['name']} ({len(m['label_space']['classes'])} classes)")
        table.add_row("quarantined", str(m["quarantine"]))
        table.add_row("source", str(m["source"]))
        console.print(table)
        console.print(info.summary())
        return 0
    if args.data_cmd == "verify":
        m = shards.Manifest.load(args.url)
        problems = shards.verify(args.url)
        if problems:
            for p in problems:
                console.print(f"[red]BAD[/] {p}")
            console.print(f"{args.url}: {len(problems)} of {len(m.shards)} shard(s) failed verification")
            return 1
        console.print(f"{args.url}: all {len(m.shards)} shard(s) verified ({m.count:,} samples, sha256 OK)")
        return 0
    if args.data_cmd == "sample":
        out = show.dataset_sample(args.url, n=args.n, out=args.out, seed=args.seed)
        console.print(f"wrote {out}")
        return 0
    raise AssertionError(args.data_cmd)


def _train(args: argparse.Namespace) -> int:
    from signscale import config
    from signscale.train import TrainConfig, train

    path = args.items[0] if args.items and not args.items[0].startswith("-") and "=" not in args.items[0] else None
    overrides = [a for a in args.items if a != path] + args.extra
    cfg = config.load(TrainConfig, path, overrides)
    result = train(cfg)
    from signscale import distributed

    if distributed.rank() == 0:
        console.print(result.summary())
    distributed.shutdown()
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from signscale import config, distributed
    from signscale.evaluate import EvalConfig, evaluate
    from signscale.sources.scenes import is_scene_dataset, is_scene_spec

    if is_scene_dataset(args.data) or is_scene_spec(args.data):  # a detector on road scenes
        from signscale.detect_eval import SceneEvalConfig, evaluate_scenes

        rep = evaluate_scenes(SceneEvalConfig(detector=args.model, data=args.data, classifier=args.classifier or "",
                                              out=args.out or ""))
        console.print(rep.summary())
        return 0

    items = [f"model={args.model}", f"data={args.data}", f"out={args.out or ''}"]
    if args.corruptions:
        items.append(f"corruptions={args.corruptions}")
    if args.severity:
        items.append(f"severities={args.severity}")
    cfg = config.load(EvalConfig, args.config, items + args.overrides)
    distributed.init()
    report = evaluate(cfg)
    if distributed.rank() == 0:
        console.print(report.summary())
        if cfg.out:
            console.print(f"report: {cfg.out.rstrip('/')}/report.html")
    distributed.shutdown()
    return 0


def _compare(args: argparse.Namespace) -> int:
    from signscale.evaluate import compare

    c = compare(args.a, args.b, tolerance=args.tolerance, require_same_data=not args.any_data)
    console.print("\n".join(c.lines(verbose=args.verbose)))
    return 1 if c.worse else 0


def _demo(args: argparse.Namespace) -> int:
    from signscale.demo import DemoConfig, run_demo

    result = run_demo(DemoConfig(out=args.out, samples=args.samples, epochs=args.epochs,
                                 detection=not args.no_detection))
    console.print(result.summary())
    return 0


# ---------------------------------------------------------------------------------------------


def register(r: Registry) -> None:
    r.add("version", _version, "print the version")
    r.add("sources", _sources, "list the data sources and their spec syntax")

    s = r.add("show", _show, "count a source's samples per class and write a contact sheet")
    s.add_argument("source", help="e.g. gtsrb:GTSRB_Final_Training_Images.zip")
    s.add_argument("--out", help="contact sheet PNG path or URL")
    s.add_argument("--per-class", type=int, default=2)
    s.add_argument("-q", "--quiet", action="store_true", help="only the one-line summary, no per-class table")

    s = r.add("pack", _pack, "pack a source into checksummed shards at any storage URL")
    s.add_argument("source")
    s.add_argument("out", help="dataset folder: local path, s3://, gs://, az://")
    s.add_argument("--config", help="YAML file with PackConfig keys")
    s.add_argument("--encoding", choices=["raw", "encoded"])
    s.add_argument("--size", type=int)
    s.add_argument("--crop", choices=["none", "roi"])
    s.add_argument("--shard-mb", type=float)
    s.add_argument("--workers", type=int)
    s.add_argument("--name")
    s.add_argument("--strict", action="store_true", default=None, help="exit non-zero if anything is quarantined")
    s.add_argument("--rank", type=int, help="this rank (without torchrun)")
    s.add_argument("--world-size", type=int)
    s.add_argument("overrides", nargs="*", default=[], help="key=value config overrides")

    x = r.add("info", _data, "summary of a dataset", parent="data")
    x.add_argument("url")
    x.add_argument("--histogram", help="write a class-histogram PNG here")
    x = r.add("verify", _data, "re-hash every shard; non-zero exit naming a bad shard", parent="data")
    x.add_argument("url")
    x = r.add("sample", _data, "a picture of what the loader yields", parent="data")
    x.add_argument("url")
    x.add_argument("--n", type=int, default=16)
    x.add_argument("--out", default="grid.png")
    x.add_argument("--seed", type=int, default=0)

    s = r.add("train", _train, "train a classifier on packed datasets (also under torchrun)",
              description="signscale train [CONFIG.yaml] [--key=value ...]: keys of TrainConfig, e.g. "
                          "--data=runs/gtsrb/train --val=runs/gtsrb/val --model=msnet --epochs=10 "
                          "--precision=bf16 --augment.flip=0.5")
    s.add_argument("items", nargs="*", help="optional YAML config, then key=value overrides")
    s.set_defaults(extra=[])

    s = r.add("evaluate", _evaluate, "score a model on a dataset or source; HTML report, metrics.json")
    s.add_argument("model", help="model artefact folder (local or any storage URL)")
    s.add_argument("data", help="packed dataset URL or a source, e.g. gtsrb-test:GTSRB_Final_Test_Images.zip")
    s.add_argument("--out", help="report folder")
    s.add_argument("--corruptions", help="comma list of snow,rain,fog,night,glare,blur,noise,contrast or 'all'")
    s.add_argument("--severity", help="comma list of severities 1..5 (default 3)")
    s.add_argument("--classifier", help="scene datasets: classifier model for the end-to-end (fine class) score")
    s.add_argument("--config", help="YAML with EvalConfig keys")
    s.add_argument("overrides", nargs="*", default=[], help="key=value EvalConfig overrides")

    s = r.add("compare", _compare, "differences between two reports; exit 1 when B is worse than A")
    s.add_argument("a", help="report folder or metrics.json of the reference")
    s.add_argument("b", help="report folder or metrics.json of the candidate")
    s.add_argument("--tolerance", type=float, default=0.005)
    s.add_argument("--any-data", action="store_true", help="allow comparing reports of different data")
    s.add_argument("-v", "--verbose", action="store_true")

    s = r.add("demo", _demo, "the main job on the built-in synthetic data, end to end")
    s.add_argument("--out", default="signscale-demo")
    s.add_argument("--samples", type=int, default=8000, help="synthetic training signs")
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--no-detection", action="store_true", help="skip the road-scene detection leg")

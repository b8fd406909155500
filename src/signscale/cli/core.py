"""The core commands: sources, show, pack, data, train, evaluate, calibrate, compare, demo."""

from __future__ import annotations

import argparse

from rich.markup import escape
from rich.table import Table

from signscale.cli._commands import Commands, add_config, config_args, console


def errors() -> tuple[type[BaseException], ...]:
    from signscale.calibration import CalibrationError
    from signscale.config import ConfigError
    from signscale.data.shards import ShardError
    from signscale.data.sources import SourceError
    from signscale.evaluation.compare import CompareError
    from signscale.evaluation.evaluate import EvalError
    from signscale.labels import LabelError
    from signscale.storage import StorageError
    from signscale.training.checkpoint import CheckpointError
    from signscale.training.train import TrainError

    return (ConfigError, SourceError, ShardError, LabelError, StorageError, CheckpointError, EvalError,
            CompareError, TrainError, CalibrationError)


def _version(args: argparse.Namespace) -> int:
    import signscale

    console.print(f"signscale {signscale.__version__}")
    return 0


def _sources(args: argparse.Namespace) -> int:
    import inspect

    from signscale.config import ConfigError, closest
    from signscale.data.sources import SOURCES

    kinds = list(SOURCES)
    if args.kind:
        if args.kind not in SOURCES:
            near = closest(args.kind, kinds)
            raise ConfigError(f"unknown source kind {args.kind!r}" + (f"; did you mean {near!r}?" if near else "")
                              + f" Kinds: {', '.join(kinds)}")
        kinds = [args.kind]
    else:
        console.print("sources: give one as KIND:LOCATION?option=value&... wherever a command takes a SOURCE\n")
    # plain lines, not a table: a table at 80 columns cuts the examples, which are meant to be copied
    for i, kind in enumerate(kinds):
        info = SOURCES[kind]
        console.print(("\n" if i else "") + f"[bold]{kind}[/]  {escape(info.help)}")
        console.print(f"  example: {escape(info.example)}", markup=True)
        params = [p for p in inspect.signature(info.load()).parameters.values()
                  if p.kind is p.KEYWORD_ONLY and p.name != "spec"]
        if params:
            opts = ", ".join(f"{p.name}={'(none)' if p.default in (None, '') else p.default}" for p in params)
            console.print(f"  options (defaults): {escape(opts)}")
        else:
            console.print("  options: none")
        doc = (inspect.getdoc(info.load()) or "").split("\n\n", 1)
        if len(doc) > 1:  # the docstring's paragraphs after the first explain the options
            console.print("  " + escape(" ".join(doc[1].split())))
    return 0


def _show(args: argparse.Namespace) -> int:
    from signscale.data.show import show

    s = show(args.source, out=args.out or "", per_class=args.per_class)
    table = Table(title=f"{args.source}: {s.unit} per class")
    table.add_column("id", justify="right")
    table.add_column("key")
    table.add_column(s.unit, justify="right")
    from signscale.data.sources import open_source

    space = open_source(args.source).label_space
    for i, n in enumerate(s.per_class):
        table.add_row(str(i), space[i].key, f"{n:,}")
    if not args.quiet:
        console.print(table)
    console.print(s.summary())
    return 0


def _pack(args: argparse.Namespace) -> int:
    from signscale import config
    from signscale.data.pack import PackConfig, pack

    cfg = config.load(PackConfig, args.config, config_args(args), base={"source": args.source, "out": args.out})
    from signscale.training import distributed

    distributed.init()
    result = pack(cfg)
    console.print(result.summary(), markup=False)
    if result.quarantined:
        console.print(f"[yellow]warning:[/] {result.quarantined} sample(s) quarantined; see "
                      f"{cfg.out.rstrip('/')}/quarantine.jsonl")
        if cfg.strict:
            return 3
    if result.finalized and result.count == 0:  # nothing usable came out: a dataset of no samples trains nothing
        console.print(f"[red]error:[/] no sample of {escape(cfg.source)} could be packed")
        return 1
    return 0


def _plain(value: object) -> str:
    """A manifest value as a person reads it: key=value pairs, not a Python dict's repr."""
    if isinstance(value, dict):
        return "; ".join(f"{k}={_plain(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return ",".join(_plain(v) for v in value) or "-"
    return escape(str(value))


def _data(args: argparse.Namespace) -> int:
    from signscale.data import show
    from signscale.data.manifest import Manifest, verify

    if args.data_cmd == "info":
        info = show.dataset_info(args.url, histogram=args.histogram or "")
        table = Table(title=f"{args.url}")
        table.add_column("field")
        table.add_column("value", overflow="fold")  # wrapped, never cut with an ellipsis
        m = info.manifest
        for k in ("name", "version", "created", "encoding", "image_shape"):
            table.add_row(k, str(m.get(k)))
        table.add_row("samples", f"{info.count:,}")
        table.add_row("shards", str(info.shards))
        table.add_row("bytes", f"{info.bytes:,}")
        table.add_row("label space", f"{m['label_space']['name']} ({len(m['label_space']['classes'])} classes)")
        for name in ("quarantine", "source"):  # nested mappings: one row per key
            value = m.get(name)
            items = value.items() if isinstance(value, dict) else [("", value)]
            for k, v in items:
                table.add_row(f"{name} {k}".strip(), _plain(v))
        console.print(table)
        console.print(info.summary())
        return 0
    if args.data_cmd == "verify":
        m = Manifest.load(args.url)
        problems = verify(args.url)
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


def yaml_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(YAML path, key=value overrides) of a command taking ``[CONFIG.yaml] [key=value ...] [--key value ...]``."""
    from signscale.config import ConfigError

    items = list(args.overrides)
    path = None
    if items and "=" not in items[0]:
        path = items.pop(0)
    bare = [i for i in items if "=" not in i]
    if bare:
        raise ConfigError(f"{bare[0]!r}: expected key=value (or --key value); only the first item may be a YAML "
                          "config file")
    return path, [*items, *args.config_items]


def check_model(name: str, option: str = "--model") -> None:
    """An unknown architecture fails now, in one line, not after the data has been opened."""
    from signscale.config import ConfigError
    from signscale.models import MODELS

    if name not in MODELS:
        raise ConfigError(f"{option}={name}: unknown model; the known models are {', '.join(MODELS)}")


def _train(args: argparse.Namespace) -> int:
    from signscale import config
    from signscale.training.train import TrainConfig, train

    path, overrides = yaml_and_overrides(args)
    cfg = config.load(TrainConfig, path, overrides)
    check_model(cfg.model)
    result = train(cfg)
    from signscale.training import distributed

    if distributed.rank() == 0:
        console.print(result.summary(), markup=False)
    distributed.shutdown()
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from signscale import config
    from signscale.data.scene_shards import is_scene_dataset
    from signscale.data.sources.scenes import is_scene_spec
    from signscale.evaluation.evaluate import EvalConfig, evaluate
    from signscale.training import distributed

    if is_scene_dataset(args.data) or is_scene_spec(args.data):  # a detector on road scenes
        from signscale.detection.evaluate import SceneEvalConfig, evaluate_scenes

        out = next((i.split("=", 1)[1] for i in reversed(config_args(args)) if i.startswith("out=")), "")
        rep = evaluate_scenes(SceneEvalConfig(detector=args.model, data=args.data, classifier=args.classifier or "",
                                              out=out))
        console.print(rep.summary())
        return 0

    items = [f"model={args.model}", f"data={args.data}"]
    cfg = config.load(EvalConfig, args.config, items + config_args(args))
    distributed.init()
    report = evaluate(cfg)
    if distributed.rank() == 0:
        console.print(report.summary())
        if cfg.out:
            console.print(f"report: {cfg.out.rstrip('/')}/report.html")
    distributed.shutdown()
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from signscale import config
    from signscale.evaluation.calibrate import CalibrateConfig, calibrate

    cfg = config.load(CalibrateConfig, None, [f"model={args.model}", f"data={args.data}", *config_args(args)])
    console.print(calibrate(cfg).summary(), markup=False)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from signscale.evaluation.compare import compare

    c = compare(args.a, args.b, tolerance=args.tolerance, require_same_data=not args.any_data)
    console.print("\n".join(c.lines(verbose=args.verbose)))
    return 1 if c.worse else 0


def _demo(args: argparse.Namespace) -> int:
    from signscale import config
    from signscale.demos.first_run import DemoConfig, run_demo

    cfg = config.load(DemoConfig, None, config_args(args))
    check_model(cfg.model)
    result = run_demo(cfg, say=lambda text: console.print(text, markup=False))
    console.print(result.summary(), markup=False)
    return 0


# ---------------------------------------------------------------------------------------------


def register(r: Commands) -> None:
    """The core commands in the order of the pipeline: look at data, pack it, train, evaluate."""
    _register_data(r)
    _register_model(r)
    s = r.add("demo", _demo, "the main job on the built-in synthetic data, end to end")
    add_config(s, "signscale.demos.first_run:DemoConfig")


def _register_data(r: Commands) -> None:
    r.add("version", _version, "print the version")
    s = r.add("sources", _sources, "list the data sources, their options and defaults")
    s.add_argument("kind", nargs="?", help="one source kind, e.g. gtsrb")

    s = r.add("show", _show, "count a source's samples per class and write a contact sheet")
    s.add_argument("source", help="e.g. gtsrb:GTSRB_Final_Training_Images.zip")
    s.add_argument("--out", help="contact sheet PNG path or URL")
    s.add_argument("--per-class", type=int, default=2)
    s.add_argument("-q", "--quiet", action="store_true", help="only the one-line summary, no per-class table")

    s = r.add("pack", _pack, "pack a source into checksummed shards at any storage URL")
    s.add_argument("source", help="KIND:LOCATION?options, see `signscale sources`")
    s.add_argument("out", help="dataset folder: local path, s3://, gs://, az://")
    s.add_argument("--config", help="YAML file with PackConfig keys")
    add_config(s, "signscale.data.pack:PackConfig", skip=("source", "out"))

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


def _register_model(r: Commands) -> None:
    s = r.add("train", _train, "train a classifier on packed datasets (also under torchrun)",
              description="signscale train [CONFIG.yaml] [--key value | --key=value | key=value ...]\n"
                          "e.g. signscale train --data runs/gtsrb/train --val runs/gtsrb/val --model msnet "
                          "--epochs 10 --precision bf16 --augment.flip 0.5 --country-weights.cn 4")
    add_config(
        s,
        "signscale.training.train:TrainConfig",
        yaml_first=True,
        rest_help="an optional YAML file of TrainConfig keys first, then key=value overrides (the same as --key value)",
    )

    s = r.add("evaluate", _evaluate, "score a model on a dataset or source; HTML report, metrics.json")
    s.add_argument("model", help="model artefact folder (local or any storage URL)")
    s.add_argument("data", help="packed dataset URL or a source, e.g. gtsrb-test:GTSRB_Final_Test_Images.zip")
    s.add_argument("--classifier", help="scene datasets: classifier model for the end-to-end (fine class) score")
    s.add_argument("--config", help="YAML with EvalConfig keys")
    add_config(
        s, "signscale.evaluation.evaluate:EvalConfig", skip=("model", "data"), aliases={"severities": ["--severity"]}
    )

    s = r.add("calibrate", _calibrate, "fit a model's temperature on held-out data; predict/serve/evaluate use it")
    s.add_argument("model", help="model artefact folder: its model.json gains the temperature")
    s.add_argument("data", help="held-out data (the validation split), a packed dataset URL or a source")
    add_config(s, "signscale.evaluation.calibrate:CalibrateConfig", skip=("model", "data"))

    s = r.add("compare", _compare, "differences between two reports; exit 1 when B is worse than A")
    s.add_argument("a", help="report folder or metrics.json of the reference")
    s.add_argument("b", help="report folder or metrics.json of the candidate")
    s.add_argument("--tolerance", type=float, default=0.005)
    s.add_argument("--any-data", action="store_true", help="allow comparing reports of different data")
    s.add_argument("-v", "--verbose", action="store_true")

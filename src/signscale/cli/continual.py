"""``signscale registry|ingest|data versions|continual ...``: model registry, ingest, dataset versions, the loop."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from signscale.cli._commands import Commands, add_config, config_args, console


def _say(text: str) -> None:
    """Print library text as is: summaries hold [brackets] that rich would take for markup."""
    console.print(text, markup=False, highlight=False)


def errors() -> tuple[type[BaseException], ...]:
    from signscale.config import ConfigError
    from signscale.continual.ingest import IngestError
    from signscale.continual.loop import ContinualError
    from signscale.data.datasets import DatasetVersionError
    from signscale.data.shards import ShardError
    from signscale.serving.registry import RegistryError
    from signscale.storage import StorageError

    return (ConfigError, ContinualError, DatasetVersionError, IngestError, RegistryError, ShardError, StorageError)


# ---------------------------------------------------------------------------------------------
# registry


def _registry_list(args: argparse.Namespace) -> int:
    from signscale.serving.registry import Registry

    reg = Registry(args.url)
    aliases = {a: reg.alias(a) for a in reg.aliases()}
    by_version: dict[str, list[str]] = {}
    for name, a in aliases.items():
        if a is not None:
            by_version.setdefault(a.version, []).append(name)
            if name == "production" and a.previous:
                by_version.setdefault(a.previous[0], []).append("previous")
    table = Table(title=f"model versions in {args.url}")
    for col in ("version", "aliases", "created", "parent", "dataset", "metrics", "note"):
        table.add_column(col)
    for vid in reg.version_ids():
        v = reg.get(vid)
        ds = f"v{v.dataset.get('version')}" + (f"+{v.dataset['batch']}" if v.dataset.get("batch") else "") \
            if v.dataset else "-"
        metrics = ", ".join(f"{k} {x:.2%}" for k, x in v.metrics.items() if isinstance(x, float))
        table.add_row(vid, ", ".join(by_version.get(vid, [])), v.created, v.parent or "-", ds, metrics, v.note)
    console.print(table)
    return 0


def _registry_show(args: argparse.Namespace) -> int:
    from signscale.serving.registry import Registry, describe_event

    reg = Registry(args.url)
    if args.version:
        v = reg.get(reg.ref(args.version))
        console.print_json(json.dumps({**v.to_dict(), "model_url": v.model_url}))
    for name in reg.aliases():
        a = reg.alias(name)
        if a is not None:
            prev = f" (previous: {a.previous[0]})" if a.previous else ""
            console.print(f"[bold]{name}[/] -> {a.version}{prev}, since {a.changed}: {a.reason}")
    console.print("[bold]history[/]")
    for e in reg.history():
        if args.version and e.get("version") != reg.ref(args.version):
            continue
        _say("  " + describe_event(e))
        if args.verbose and e.get("evidence", {}).get("gate"):
            for c in e["evidence"]["gate"]["checks"]:
                if not c["passed"] or args.verbose > 1:
                    console.print(f"      {'ok  ' if c['passed'] else 'FAIL'} {c['check']:<13} {c['slice']:<34} "
                                  + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in c.items() if k not in ("check", "slice", "passed")))
    return 0


def _registry_promote(args: argparse.Namespace) -> int:
    from signscale.serving.registry import CURRENT, Registry

    reg = Registry(args.url)
    expect = CURRENT if args.expect is None else (None if args.expect == "none" else args.expect)
    a = reg.promote(reg.ref(args.version), expect=expect, reason=args.reason or "manual promotion")
    console.print(f"production -> {a.version} (previous: {a.previous[0] if a.previous else '-'})")
    return 0


def _registry_rollback(args: argparse.Namespace) -> int:
    from signscale.serving.registry import Registry

    a = Registry(args.url).rollback(reason=args.reason or "manual rollback")
    console.print(f"production rolled back to {a.version}")
    return 0


def _registry_register(args: argparse.Namespace) -> int:
    from signscale.serving.registry import Registry

    v = Registry(args.url).register(args.model, parent=args.parent, note=args.note or "")
    console.print(f"registered {args.model} as {v.id}")
    return 0


# ---------------------------------------------------------------------------------------------
# ingest, data versions


def _ingest(args: argparse.Namespace) -> int:
    from signscale.continual.ingest import IngestConfig, ingest

    cfg = IngestConfig(inbox=args.inbox, dataset=args.dataset, max_objects=args.max_objects, chunk=args.chunk,
                       protected=tuple(args.protected or ()), publish=not args.stage_only, model=args.model or "",
                       max_quarantine=args.max_quarantine, max_noise=args.max_noise)
    r = ingest(cfg, on_chunk=(lambda d, t: console.print(f"chunk {d}/{t}")) if args.verbose else None)
    _say(r.summary())
    if r.queue:
        console.print(f"labelling queue: {r.queue}")
    return 1 if r.state == "rejected" else 0


def _import_labels(args: argparse.Namespace) -> int:
    from signscale.continual.labelling import import_labels

    n = import_labels(args.queue, args.inbox)
    console.print(f"{n} labelled image(s) re-imported into {args.inbox}/relabelled/ (the next ingest picks them up)")
    return 0


def _data_versions(args: argparse.Namespace) -> int:
    from signscale.data import datasets

    vs = datasets.versions(args.url)
    head = vs[-1].version
    table = Table(title=f"versions of {args.url} (head: v{head})")
    for col in ("version", "samples", "added by", "created", "checksum", "conditions", "countries", "classes"):
        table.add_column(col)
    for v in vs:
        cond = ", ".join(f"{k} {n:,}" for k, n in sorted(v.counts.get("condition", {}).items(), key=lambda x: -x[1]))
        ctry = ", ".join(f"{k} {n:,}" for k, n in sorted(v.counts.get("country", {}).items(), key=lambda x: -x[1]))
        cls = v.counts.get("class", {})
        cls_s = f"{len(cls)} classes" + (f", e.g. {', '.join(f'{k} {n}' for k, n in list(cls.items())[:3])}"
                                         if args.classes else "")
        table.add_row(f"v{v.version}", f"{v.count:,}", v.batch or "pack", v.created, v.checksum[:12], cond, ctry,
                      cls_s)
    console.print(table)
    if args.classes:
        for v in vs:
            console.print(f"v{v.version}: " + ", ".join(f"{k} {n}" for k, n in v.counts.get("class", {}).items()))
    return 0


# ---------------------------------------------------------------------------------------------
# continual


def _load_cfg(args: argparse.Namespace) -> object:
    from signscale import config as config_mod
    from signscale.continual.loop import ContinualConfig

    return config_mod.load(ContinualConfig, args.config, config_args(args))


def _continual_run(args: argparse.Namespace) -> int:
    from signscale.continual.loop import run_cycle

    r = run_cycle(_load_cfg(args), log=_say)  # type: ignore[arg-type]
    _say(r.summary())
    return 0 if r.outcome in ("promoted", "nothing") else 1


def _continual_watch(args: argparse.Namespace) -> int:
    from signscale.continual.loop import watch

    watch(_load_cfg(args), max_cycles=args.max_cycles, log=_say)  # type: ignore[arg-type]
    return 0


def _continual_demo(args: argparse.Namespace) -> int:
    from signscale import config as config_mod
    from signscale.demos.continual import SYNTHETIC_PRESET, DemoConfig, run_demo

    items = config_args(args)
    gtsrb = any(i.startswith("gtsrb=") and i != "gtsrb=" for i in items)
    cfg = config_mod.load(DemoConfig, None, items, base={} if gtsrb else dict(SYNTHETIC_PRESET))
    r = run_demo(cfg, log=_say)
    _say(r.summary())
    console.print(
        f"inspect: signscale registry show {cfg.out}/registry -v ; signscale data versions {cfg.out}/data/signs"
    )
    return 0


def register(r: Commands) -> None:
    x = r.add("list", _registry_list, "model versions with their aliases, lineage and metrics", parent="registry")
    x.add_argument("url", help="registry URL (local path, s3://, gs://, az://)")
    x = r.add("show", _registry_show, "aliases and the full history of promotions, rejections and rollbacks",
              parent="registry")
    x.add_argument("url")
    x.add_argument("version", nargs="?", help="a version id or alias: its metadata and events only")
    x.add_argument("-v", "--verbose", action="count", default=0, help="-v: failed gate checks; -vv: every check")
    x = r.add("promote", _registry_promote, "point production at a version (atomic; previous kept for rollback)",
              parent="registry")
    x.add_argument("url")
    x.add_argument("version", help="version id or alias, e.g. v000003 or candidate")
    x.add_argument("--expect", help="the version production must point to now ('none': unset); refuses otherwise")
    x.add_argument("--reason", help="recorded in the history")
    x = r.add("rollback", _registry_rollback, "point production back at the previous version", parent="registry")
    x.add_argument("url")
    x.add_argument("--reason")
    x = r.add("register", _registry_register, "copy a model artefact into the registry as a new version",
              parent="registry")
    x.add_argument("url")
    x.add_argument("model", help="model artefact folder (model.json + model.pt)")
    x.add_argument("--parent")
    x.add_argument("--note")

    x = r.add("ingest", _ingest, "new inbox uploads -> validated, deduplicated batch -> new dataset version")
    x.add_argument("inbox", help="inbox prefix (local path or any storage URL) with images and JSON sidecars")
    x.add_argument("--dataset", required=True, help="packed dataset to append to (see `signscale data versions`)")
    x.add_argument("--model", help="model artefact or REGISTRY@production: label-noise check and labelling queue")
    x.add_argument("--protected", action="append", help="evaluation set uploads may never enter (repeatable)")
    x.add_argument("--stage-only", action="store_true", help="validate and stage, do not publish")
    x.add_argument("--max-objects", type=int, default=0)
    x.add_argument("--chunk", type=int, default=256)
    x.add_argument("--max-quarantine", type=float, default=0.5)
    x.add_argument("--max-noise", type=float, default=0.1)
    x.add_argument("-v", "--verbose", action="store_true")
    x = r.add("import-labels", _import_labels, "re-import a labelled queue (JSONL) into the inbox")
    x.add_argument("queue")
    x.add_argument("inbox")

    x = r.add("versions", _data_versions, "published versions of a dataset with counts per condition/country/class",
              parent="data")
    x.add_argument("url")
    x.add_argument("--classes", action="store_true", help="also print counts per class")

    for name, fn, what in (("run", _continual_run, ("one cycle: ingest, retrain with replay, evaluate, gate, "
                                                    "promote or reject")),
                           ("watch", _continual_watch, "poll the inbox and run a cycle when enough data arrived")):
        x = r.add(name, fn, what, parent="continual",
                  description=f"signscale continual {name} CONFIG.yaml [key=value ...]: keys of ContinualConfig")
        x.add_argument("config", help="YAML with registry, dataset, inbox, golden, slices, ... (docs/continual.md)")
        if name == "watch":
            x.add_argument("--max-cycles", type=int, default=0, help="stop after this many cycles (0: run forever)")
        add_config(x, "signscale.continual.loop:ContinualConfig",
                   rest_help="key=value overrides, e.g. steps=400 gate.min_improvement=0.05 (or --steps 400)")
    x = r.add("demo", _continual_demo, "the scenario: snow upload promoted, poison and backdoor rejected, rollback",
              parent="continual")
    add_config(
        x, "signscale.demos.continual:DemoConfig", rest_help="DemoConfig key=value, e.g. epochs=6 steps=300 s3=false"
    )

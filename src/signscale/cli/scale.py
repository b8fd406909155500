"""``signscale plan`` (capacity model) and ``signscale bench scale`` (cost per image vs dataset size)."""

from __future__ import annotations

import argparse

from signscale.cli._commands import Commands, console


def _bench_scale(args: argparse.Namespace) -> int:
    from signscale.bench.scale import BenchScaleConfig, bench_scale, parse_sizes

    bench_scale(BenchScaleConfig(sizes=parse_sizes(args.sizes), image_size=args.image_size, workers=args.workers,
                                 batch_size=args.batch_size, shard_mb=args.shard_mb, pack_workers=args.pack_workers,
                                 remote=not args.no_remote, workdir=args.workdir or ""))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from rich.table import Table

    from signscale.bench.capacity import CheckConfig, PlanConfig, check, load_rates, plan, plan_rows
    from signscale.bench.scale import parse_count

    if args.check:
        rows = check(CheckConfig(images=parse_count(args.check_images, name="check-images"),
                                 train_steps=args.check_steps, workers=args.check_workers, rates=args.rates or "",
                                 save_rates=args.save_rates or ""),
                     say=lambda m: console.print(f"[dim]{m}[/]"))
        table = Table(title="plan --check: predicted (from the rates table) vs measured here")
        for col in ("figure", "predicted", "measured", "error", "model"):
            table.add_column(col, justify="left" if col in ("figure", "model") else "right")
        for r in rows:
            table.add_row(r.what, f"{r.predicted:,.3g} {r.unit}".strip(), f"{r.measured:,.3g} {r.unit}".strip(),
                          f"{r.error:+.1%}", r.how)
        console.print(table)
        worst = max(rows, key=lambda r: abs(r.error))
        console.print(f"{len(rows)} predictions checked; largest error {worst.error:+.1%} ({worst.what})")
        return 0
    cfg = PlanConfig(images=parse_count(args.images, name="images"), gpus=args.gpus, gpus_per_node=args.gpus_per_node,
                     model=args.model, precision=args.precision, device=args.device, image_size=args.image_size,
                     batch_size=args.batch_size, shard_mb=args.shard_mb, cores_per_node=args.cores_per_node,
                     pack_cores=args.pack_cores, workers_per_gpu=args.workers_per_gpu, augment_on=args.augment_on,
                     source=args.source, epochs=args.epochs, rates=args.rates or "")
    p = plan(cfg, load_rates(cfg.rates))
    table = Table(title=f"plan: {cfg.images:,} images, {cfg.gpus} x {cfg.device}, {cfg.model} {cfg.precision}")
    table.add_column("figure")
    table.add_column("prediction")
    for k, v in plan_rows(p):
        table.add_row(k, v)
    console.print(table)
    for note in p.notes:
        console.print(f"note: {note}")
    console.print(p.summary())
    return 0


def errors() -> tuple[type[BaseException], ...]:
    from signscale.config import ConfigError

    return (ConfigError,)


def register(r: Commands) -> None:
    x = r.add("scale", _bench_scale, parent="bench",
              help="pack and stream growing datasets: cost per image, throughput, worker memory, requests")
    x.add_argument("--sizes", default="50k,500k,2m", help="dataset sizes to compare, e.g. 50k,500k,2m")
    x.add_argument("--image-size", type=int, default=32, help="image side of the generated raw records")
    x.add_argument("--workers", type=int, default=2, help="loader worker processes")
    x.add_argument("--batch-size", type=int, default=256)
    x.add_argument("--shard-mb", type=float, default=64.0)
    x.add_argument("--pack-workers", type=int, default=0, help="pack processes (0: one core, in process)")
    x.add_argument("--no-remote", action="store_true", help="skip the ranged-read (object-store path) epoch")
    x.add_argument("--workdir", default="", help="keep the datasets here (default: temp, removed)")

    p = r.add("plan", _plan, help="capacity model: storage, pack time, epoch time, bottleneck, workers per GPU",
              description="signscale plan --images 50m --gpus 64 --model msnet --precision bf16; "
                          "signscale plan --check compares the model's predictions with runs on this machine")
    p.add_argument("--images", default="50m", help="dataset size, e.g. 50m")
    p.add_argument("--gpus", type=int, default=64)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--model", default="msnet")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default="h100", help="row of the rates table's train_samples_per_s (h100, cpu, ...)")
    p.add_argument("--image-size", type=int, default=32, help="image side in the shards")
    p.add_argument("--batch-size", type=int, default=256, help="per GPU")
    p.add_argument("--shard-mb", type=float, default=64.0)
    p.add_argument("--cores-per-node", type=int, default=96)
    p.add_argument("--pack-cores", type=int, default=0, help="cores packing (0: all cores of all nodes)")
    p.add_argument("--workers-per-gpu", type=int, default=0, help="loader workers per GPU (0: as many as needed)")
    p.add_argument("--augment-on", default="gpu", choices=("gpu", "cpu"))
    p.add_argument("--source", default="object-store", choices=("object-store", "cache"),
                   help="loader reads ranged from the bucket, or from a local shard cache")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--rates", default="", help="JSON/YAML file of rates merged over the packaged table")
    p.add_argument("--check", action="store_true", help="compare predictions with runs on this machine")
    p.add_argument("--check-images", default="200k", help="records packed and streamed by --check")
    p.add_argument("--check-steps", type=int, default=40, help="CPU training steps in --check (0: skip)")
    p.add_argument("--check-workers", type=int, default=1)
    p.add_argument("--save-rates", default="", help="with --check: write the rates measured here to this file")

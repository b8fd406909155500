"""``signscale bench ...``: io, train, synthetic (each prints its figures side by side)."""

from __future__ import annotations

import argparse

from signscale.cli._commands import Commands, add_config, config_args


def _io(args: argparse.Namespace) -> int:
    from signscale.bench.io import BenchIOConfig, bench_io, parse_workers

    bench_io(
        BenchIOConfig(
            source=args.source,
            image_size=args.image_size,
            workers=parse_workers(args.workers),
            limit=args.limit,
            no_s3=args.no_s3,
            stores=tuple(args.stores.split(",")),
            batch_size=args.batch_size,
            workdir=args.workdir or "",
        )
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from signscale import config
    from signscale.bench.train import BenchTrainConfig, bench_train

    bench_train(config.load(BenchTrainConfig, None, config_args(args)))
    return 0


def _synthetic(args: argparse.Namespace) -> int:
    from signscale.bench.io import BenchSyntheticConfig, bench_synthetic

    bench_synthetic(BenchSyntheticConfig(n=args.n, image_size=args.image_size))
    return 0


def register(r: Commands) -> None:
    x = r.add("io", _io, parent="bench", help="pack and read throughput: raw files vs shards vs loader, local vs S3")
    x.add_argument("--source", default="synthetic:?n=20000&size=32",
                   help="what to benchmark on, e.g. gtsrb:../shared/data/GTSRB_Final_Training_Images.zip")
    x.add_argument("--image-size", type=int, default=32)
    x.add_argument("--workers", default="0,2", help="DataLoader worker counts to try")
    x.add_argument("--limit", type=int, default=0, help="use only the first N samples (0: all)")
    x.add_argument("--no-s3", action="store_true", help="skip every object-store row")
    x.add_argument("--stores", default="s3", help="object stores to measure on local emulators: s3,gcs,azure")
    x.add_argument("--batch-size", type=int, default=256)
    x.add_argument("--workdir", default="", help="where to write the benchmark data (default: a temp dir)")
    x = r.add("train", _train, parent="bench",
              help="training samples/s and peak memory per model x precision; --vs-peer: seconds to 99%% held-out "
                   "accuracy, the plain PyTorch peer vs the recipe")
    add_config(x, "signscale.bench.train:BenchTrainConfig")
    x = r.add("synthetic", _synthetic, parent="bench", help="synthetic render rate on one core")
    x.add_argument("--n", type=int, default=5000)
    x.add_argument("--image-size", type=int, default=32)


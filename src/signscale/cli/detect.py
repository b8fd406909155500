"""Detection commands: pack-scenes, train-detector, detect, evaluate-scenes."""

from __future__ import annotations

import argparse

from signscale.cli._commands import Commands, add_config, console


def errors() -> tuple[type[BaseException], ...]:
    from signscale.config import ConfigError
    from signscale.data.shards import ShardError
    from signscale.data.sources import SourceError
    from signscale.detection.detector import DetectorError
    from signscale.detection.evaluate import SceneEvalError
    from signscale.detection.train import DetTrainError
    from signscale.images import ImageError
    from signscale.storage import StorageError
    from signscale.training.checkpoint import CheckpointError

    return (ConfigError, SourceError, ShardError, StorageError, CheckpointError, DetectorError, DetTrainError,
            SceneEvalError, ImageError)


def _pack_scenes(args: argparse.Namespace) -> int:
    from signscale.data.scene_shards import ScenePackConfig, pack_scenes

    result = pack_scenes(ScenePackConfig(source=args.source, out=args.out, shard_mb=args.shard_mb,
                                         image_format=args.format))
    console.print(result.summary())
    return 0


def _train_detector(args: argparse.Namespace) -> int:
    from signscale import config
    from signscale.cli.core import yaml_and_overrides
    from signscale.detection.train import DetTrainConfig, train_detector
    from signscale.training import distributed

    path, overrides = yaml_and_overrides(args)
    cfg = config.load(DetTrainConfig, path, overrides)
    result = train_detector(cfg)
    if distributed.rank() == 0:
        console.print(result.summary())
    distributed.shutdown()
    return 0


def _classifier_for(detector: str, given: str) -> str:
    """The classifier to name signs with: the one given, else the one the detector's backbone came from."""
    if given:
        return given
    from signscale.training import checkpoint

    _, meta = checkpoint.load_model_artefact(detector)
    backbone = (meta.get("train_config") or {}).get("backbone", "")
    if not backbone:
        from signscale.config import ConfigError

        raise ConfigError(f"{detector} was not initialised from a classifier; give one with --classifier MODEL")
    return backbone


def _detect(args: argparse.Namespace) -> int:
    from signscale.detection.detect import detect_files, load_pipeline

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, _classifier_for(args.model, args.classifier), score_thresh=args.score_thresh,
                         margin=args.margin, device=args.device)
    rows = detect_files(pipe, args.images, args.out)
    for r in rows:
        console.print(f"{r['image']}: {r['signs']} sign(s) -> {r['json']}")
    console.print(
        f"{len(rows)} image(s), {sum(r['signs'] for r in rows)} sign(s); annotated images and JSON in {args.out}"
    )
    return 0


def _evaluate_scenes(args: argparse.Namespace) -> int:
    from signscale.detection.evaluate import SceneEvalConfig, evaluate_scenes

    clf = "" if args.no_classifier else _classifier_for(args.model, args.classifier)
    report = evaluate_scenes(SceneEvalConfig(detector=args.model, data=args.data, classifier=clf, out=args.out or "",
                                             score_thresh=args.score_thresh, limit=args.limit, device=args.device,
                                             threads=args.threads, batch=args.batch, corruptions=args.corruptions,
                                             severity=args.severity, seed=args.seed, mine_thresh=args.mine_thresh,
                                             crops=args.crops))
    console.print(report.summary())
    return 0


def register(r: Commands) -> None:
    s = r.add("pack-scenes", _pack_scenes, "pack a scene source (boxes as record metadata) into encoded shards",
              description="signscale pack-scenes SOURCE OUT, e.g. 'scenes-synthetic:?n=3000&seed=1&signs=gtsrb:"
                          "GTSRB_Final_Training_Images.zip?split=train' or gtsdb:FullIJCNN2013.zip?split=train")
    s.add_argument("source")
    s.add_argument("out")
    s.add_argument("--shard-mb", type=float, default=64.0)
    s.add_argument("--format", default="jpeg", choices=("jpeg", "png", "original"))

    s = r.add("train-detector", _train_detector, "train the FCOS sign detector on packed scenes (also under torchrun)",
              description="signscale train-detector [CONFIG.yaml] [--key value | --key=value | key=value ...]\n"
                          "e.g. signscale train-detector --data data/scenes-train --backbone runs/gtsrb/model "
                          "--max-steps 170 --tile 224,160 --precision bf16 --resume auto")
    add_config(s, "signscale.detection.train:DetTrainConfig", yaml_first=True,
               rest_help="an optional YAML file of DetTrainConfig keys first, then key=value overrides")

    s = r.add("detect", _detect, "find and name every sign in images: annotated PNGs + one JSON per image")
    s.add_argument("model", help="detector model folder")
    s.add_argument("images", nargs="+", help="image files (local or any storage URL)")
    s.add_argument("--out", required=True, help="folder for NAME.det.png and NAME.json")
    s.add_argument("--classifier", default="", help="classifier model folder (default: the detector's backbone)")
    s.add_argument("--score-thresh", type=float, default=0.3)
    s.add_argument("--margin", type=float, default=None,
                   help="relative margin around each box before classifying (default: 0 for a classifier trained on "
                        "ROI crops, else 0.1)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--threads", type=int, default=0)

    s = r.add("evaluate-scenes", _evaluate_scenes, "score detector + classifier on scenes: mAP, recall by size, "
                                                   "end-to-end accuracy, report with overlays")
    s.add_argument("model", help="detector model folder")
    s.add_argument("data", help="packed scene dataset or a scene source (gtsdb:..., scenes-synthetic:...)")
    s.add_argument("--classifier", default="", help="classifier model folder (default: the detector's backbone)")
    s.add_argument("--no-classifier", action="store_true", help="score the detector only")
    s.add_argument("--out", help="report folder")
    s.add_argument("--score-thresh", type=float, default=0.3)
    s.add_argument("--limit", type=int, default=0)
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--device", default="cpu")
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--corruptions", default="",
                   help="also score every frame under these, e.g. snow,fog,night,rain,blur (or all): one table")
    s.add_argument("--severity", type=int, default=3, help="of the corruptions, 1..5")
    s.add_argument("--seed", type=int, default=0, help="the corruptions' randomness")
    s.add_argument("--mine-thresh", type=float, default=0.2,
                   help="false_alarms.json lists detections at or above this score that overlap no sign")
    s.add_argument("--crops", type=int, default=48, help="miss crops and false-alarm crops in the report, each")

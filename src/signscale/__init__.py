"""signscale: traffic-sign recognition from a laptop to a GPU cluster.

The package is laid out in wings, in the order data flows (each imports only wings below it):

    data/        sources -> pack (shards on any storage URL) -> stream (exactly-once loader)
    training/    train: DDP, precision, checkpoints
    evaluation/  evaluate and its report; detection/ beside it (road scenes)
    serving/     Predictor, the service, ONNX export, the model registry
    continual/   ingest -> retrain -> gate -> promote
    bench/, demos/, cli/ on top; testing/ (local object-store servers) for tests and benchmarks

with the ground floor (storage, labels, images, config, transforms, kernels, models/) under them all.

The public names below are imported lazily, so ``import signscale`` (and ``signscale --help``) stays
fast: ``from signscale import pack, train, evaluate, open_stream, Predictor``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "LabelSpace": "signscale.labels",
    "open_source": "signscale.data.sources",
    "pack": "signscale.data.pack",
    "PackConfig": "signscale.data.pack",
    "Manifest": "signscale.data.shards",
    "open_stream": "signscale.data.stream",
    "ShardStream": "signscale.data.stream",
    "StreamConfig": "signscale.data.stream",
    "StreamLoader": "signscale.data.stream",
    "create_model": "signscale.models",
    "train": "signscale.training.train",
    "TrainConfig": "signscale.training.train",
    "evaluate": "signscale.evaluation.evaluate",
    "EvalConfig": "signscale.evaluation.evaluate",
    "compare": "signscale.evaluation.compare",
    "TransferConfig": "signscale.evaluation.transfer",
    "load_pipeline": "signscale.detection.detect",
    "Registry": "signscale.serving.registry",
    "Predictor": "signscale.serving.predict",
    "ServeConfig": "signscale.serving.serve",
    "IngestConfig": "signscale.continual.ingest",
    "ContinualConfig": "signscale.continual.loop",
    "run_cycle": "signscale.continual.loop",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'signscale' has no attribute {name!r}")

"""signscale: traffic-sign recognition from a laptop to a GPU cluster.

The pipeline, in the order data flows: ``sources`` -> ``pack`` (shards on any ``storage`` URL)
-> ``stream`` (exactly-once loader) -> ``models`` -> ``train`` -> ``evaluate`` / ``reports`` ->
``registry`` -> ``predict`` / ``serve``; beside them ``detect`` (road scenes) and ``ingest`` /
``continual`` (the learning loop).

The public names below are imported lazily, so ``import signscale`` (and ``signscale --help``)
stays fast. The entry points share their module's name, so they are called through it:
``from signscale.pack import pack``, ``from signscale.train import train``,
``from signscale.evaluate import evaluate``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "LabelSpace": "signscale.labels",
    "open_source": "signscale.sources",
    "PackConfig": "signscale.pack",
    "Manifest": "signscale.shards",
    "open_stream": "signscale.stream",
    "ShardStream": "signscale.stream",
    "StreamConfig": "signscale.stream",
    "StreamLoader": "signscale.stream",
    "create_model": "signscale.models",
    "TrainConfig": "signscale.train",
    "EvalConfig": "signscale.evaluate",
    "compare": "signscale.evaluate",
    "TransferConfig": "signscale.transfer",
    "Registry": "signscale.registry",
    "IngestConfig": "signscale.ingest",
    "ContinualConfig": "signscale.continual",
    "Predictor": "signscale.predict",
    "ServeConfig": "signscale.serve",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'signscale' has no attribute {name!r}")

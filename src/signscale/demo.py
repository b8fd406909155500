"""``signscale demo``: the whole system on built-in synthetic data, in minutes on 2 CPU cores.

Each stage is a library call a user could make: render a synthetic set, pack it into shards,
stream it back through the exactly-once loader, and write pictures of both.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from signscale import storage
from signscale.pack import PackConfig, pack
from signscale.show import dataset_info, dataset_sample, show


@dataclass(frozen=True)
class DemoConfig:
    out: str = "signscale-demo"
    samples: int = 4000
    size: int = 32
    seed: int = 0


@dataclass
class DemoResult:
    out: str
    samples: int = 0
    shards: int = 0
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        files = ", ".join(f"{k}: {v}" for k, v in self.files.items())
        return (f"demo: rendered and packed {self.samples:,} synthetic signs into {self.shards} shard(s), streamed "
                f"them back, in {self.seconds:.1f}s; {files}")


def run_demo(cfg: DemoConfig) -> DemoResult:
    started = time.perf_counter()
    out = cfg.out.rstrip("/")
    storage.makedirs(out)
    spec = f"synthetic:?n={cfg.samples}&size={cfg.size}&seed={cfg.seed}"
    result = DemoResult(out=out)
    src = show(spec, out=storage.join(out, "synthetic_sheet.png"))
    result.files["contact sheet"] = src.sheet
    data = storage.join(out, "data", "synthetic")
    packed = pack(PackConfig(source=spec, out=data, size=cfg.size, shard_mb=4, workers=min(2, os.cpu_count() or 1)))
    result.samples, result.shards = packed.count, packed.shards
    info = dataset_info(data, histogram=storage.join(out, "class_histogram.png"))
    result.files["class histogram"] = info.histogram
    result.files["loader sample"] = dataset_sample(data, n=32, out=storage.join(out, "loader_sample.png"))
    result.seconds = time.perf_counter() - started
    return result

"""Looking at data: what a source or a packed dataset holds, as counts and as pictures.

``show`` reads a source's cheap listing (no decode) for the counts, then decodes a few samples
per class for the contact sheet. ``dataset_info`` and ``dataset_sample`` do the same for packed
datasets, the latter through the real streaming loader, so the picture is what training sees.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from signscale import images, reports, shards
from signscale.sources import Problem, Sample, open_source


@dataclass
class SourceSummary:
    spec: str
    samples: int
    classes: int
    tracks: int
    problems: int
    per_class: list[int]
    conditions: dict[str, int]
    problem_reasons: dict[str, int] = field(default_factory=dict)
    sheet: str = ""

    def summary(self) -> str:
        bad = f", {self.problems} problem(s): {dict(self.problem_reasons)}" if self.problems else ""
        sheet = f"; contact sheet: {self.sheet}" if self.sheet else ""
        return (f"{self.spec}: {self.samples:,} samples, {self.classes} classes, {self.tracks:,} tracks"
                f"{bad}{sheet}")


def show(spec: str, *, out: str = "", per_class: int = 2, cell: int = 48) -> SourceSummary:
    """Count a source's samples per class and track; optionally write a contact sheet PNG."""
    source = open_source(spec)
    entries = source.entries()
    good = [e for e in entries if isinstance(e, Sample)]
    bad = [e for e in entries if isinstance(e, Problem)]
    counts = Counter(s.label for s in good)
    n_classes = len(source.label_space)
    summary = SourceSummary(
        spec=spec, samples=len(good), classes=len(counts), tracks=len({s.track for s in good if s.track}),
        problems=len(bad), per_class=[counts.get(i, 0) for i in range(n_classes)],
        conditions=dict(Counter(s.condition for s in good)), problem_reasons=dict(Counter(p.reason for p in bad)))
    if out:
        picks: dict[int, list[int]] = {}
        for i, e in enumerate(entries):
            if isinstance(e, Sample) and len(picks.setdefault(e.label, [])) < per_class:
                picks[e.label].append(i)
        tiles, caps = [], []
        for label in sorted(picks):
            for i in picks[label]:
                s = source.read(i)
                if isinstance(s, Problem):
                    continue
                arr = s.image if isinstance(s.image, np.ndarray) else images.decode(s.image)  # type: ignore[arg-type]
                tiles.append(arr)
                caps.append(f"{label} {source.label_space[label].key}")
        sheet = reports.contact_sheet(tiles, caps, cell=cell, title=f"{spec}: {len(good):,} samples")
        summary.sheet = reports.save_image(sheet, out)
    return summary


@dataclass
class DatasetInfo:
    url: str
    manifest: dict[str, Any]
    count: int
    shards: int
    bytes: int
    per_class: list[int]
    names: list[str]
    histogram: str = ""

    def summary(self) -> str:
        q = self.manifest.get("quarantine", {}).get("count", 0)
        return (f"{self.url}: {self.count:,} samples in {self.shards} shard(s), {self.bytes / 2**20:.1f} MiB, "
                f"{self.manifest['encoding']} encoding, {sum(1 for c in self.per_class if c)} classes, "
                f"{q} quarantined" + (f"; histogram: {self.histogram}" if self.histogram else ""))


def dataset_info(url: str, *, histogram: str = "") -> DatasetInfo:
    m = shards.Manifest.load(url)
    hist = [int(x) for x in m.class_histogram()]
    info = DatasetInfo(url=url, manifest=m.data, count=m.count, shards=len(m.shards),
                       bytes=int(m.data["totals"]["bytes"]), per_class=hist, names=m.label_space.names)
    if histogram:
        info.histogram = reports.class_histogram_png(hist, m.label_space.keys, histogram, title=url)
    return info


def dataset_sample(url: str, *, n: int = 16, out: str = "grid.png", seed: int = 0) -> str:
    """A grid of what the streaming loader yields from ``url`` (first batch of a seeded epoch)."""
    from signscale.stream import open_stream

    loader = open_stream(url, num_workers=0, batch_size=n, seed=seed)
    batch = next(iter(loader))
    space = loader.stream.label_space
    m = loader.stream.manifests[0]
    caps = [f"{int(lbl)} {space[int(lbl)].key} {m.conditions[int(c)]}"
            for lbl, c in zip(batch["label"], batch["condition"])]
    sheet = reports.contact_sheet(list(batch["image"].numpy()), caps, cell=64, title=f"{url}: {n} samples")
    return reports.save_image(sheet, out)

"""Data sources by name: ``open_source("gtsrb:/data/GTSRB.zip?split=train")``.

A spec is ``KIND:LOCATION[?key=value&...]``. ``LOCATION`` is a local path or any fsspec URL;
options are source-specific (``split``, ``val_fraction``, ``seed``, ``n``, ``size``, ...).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass
from typing import Callable
from urllib.parse import parse_qsl

from signscale.data.sources.base import CONDITIONS, Problem, Sample, Source, SourceError, Subset

__all__ = ["CONDITIONS", "Problem", "Sample", "Source", "SourceError", "Subset", "SOURCES", "open_source",
           "parse_spec"]


@dataclass(frozen=True)
class SourceKind:
    module: str  # imported lazily so that `signscale --help` stays fast
    factory: str
    help: str
    example: str

    def load(self) -> Callable[..., Source]:
        return getattr(importlib.import_module(self.module), self.factory)


SOURCES: dict[str, SourceKind] = {
    "synthetic": SourceKind(
        "signscale.data.sources.synthetic",
        "open_synthetic",
        "procedurally rendered signs of all 43 GTSRB classes, with weather; no data needed",
        "synthetic:?n=2000&size=32&seed=0",
    ),
    "gtsrb": SourceKind(
        "signscale.data.sources.gtsrb",
        "open_gtsrb_train",
        "GTSRB official training layout (folder or zip), with a track-aware split",
        "gtsrb:GTSRB_Final_Training_Images.zip?split=train&val_fraction=0.1",
    ),
    "gtsrb-test": SourceKind(
        "signscale.data.sources.gtsrb",
        "open_gtsrb_test",
        "GTSRB official test layout: Final_Test/Images/*.ppm + GT-final_test.csv",
        "gtsrb-test:GTSRB_Final_Test_Images.zip",
    ),
    "tsrd23": SourceKind(
        "signscale.data.sources.countries",
        "open_tsrd23",
        "Chinese sign crops TSRD23/{label}_{index}.png (cn catalogue), split by index blocks",
        "tsrd23:TSRD23_crops_64px.zip?split=train&val_fraction=0.2&block=10",
    ),
    "tt100k": SourceKind("signscale.data.sources.tt100k", "open_tt100k",
                         "Chinese TT100K crops TT100K_train/<code>/<panorama>_<n>.jpg (tt100k catalogue + not-a-sign), "
                         "panorama-held-out split", "tt100k:TT100K_crops_train_64px.zip?split=train&val_fraction=0.2"),
    "belgiumtsc": SourceKind(
        "signscale.data.sources.countries",
        "open_belgiumtsc",
        "BelgiumTSC official layout (be catalogue; its swapped CSV axes put right), pole-held-out split",
        "belgiumtsc:BelgiumTSC_Training.zip?split=train",
    ),
    "scenes-synthetic": SourceKind(
        "signscale.data.sources.scenes",
        "open_scenes_synthetic",
        "procedural road scenes with boxed signs (renderer or real crops); detection default",
        "scenes-synthetic:?n=1000&seed=0&signs=gtsrb:GTSRB_Final_Training_Images.zip",
    ),
    "scene-crops": SourceKind(
        "signscale.data.sources.scene_crops",
        "open_scene_crops",
        "the boxed signs of a packed scene dataset, cut out as the detect pipeline does "
        "(jittered boxes, margin): train the second stage on scene crops",
        "scene-crops:/data/det/scenes-train?margin=0&jitter=0.1&copies=2&seed=0&min_px=6",
    ),
    "gtsdb": SourceKind(
        "signscale.data.sources.gtsdb",
        "open_gtsdb",
        "GTSDB scenes + gt.txt (folder or zip), official split",
        "gtsdb:FullIJCNN2013.zip?split=train&val_block=450-599",
    ),
    "yolo": SourceKind(
        "signscale.data.sources.annotations",
        "open_yolo",
        "YOLO export: images/ + labels/ + names",
        "yolo:/data/export?split=train",
    ),
    "coco": SourceKind(
        "signscale.data.sources.annotations",
        "open_coco",
        "COCO detection JSON + images",
        "coco:/data/instances.json?images=/data/images",
    ),
    "folder": SourceKind(
        "signscale.data.sources.folder",
        "open_folder",
        "one sub-folder per class (key or id), or a CSV/JSONL list of path,label",
        "folder:/data/my_signs  or  folder:/data/list.csv",
    ),
}


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """Split ``KIND:LOCATION?opts`` into its parts; the error names the closest known kind."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in SOURCES:
        close = difflib.get_close_matches(kind, SOURCES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise SourceError(f"unknown source {spec!r}: expected KIND:LOCATION with KIND one of "
                          f"{', '.join(SOURCES)}.{hint} Run `signscale sources` for examples.")
    location, _, query = rest.partition("?")
    return kind, location, dict(parse_qsl(query, keep_blank_values=True))


def open_source(spec: str) -> Source:
    """Open a source from its spec string."""
    kind, location, options = parse_spec(spec)
    factory = SOURCES[kind].load()
    try:
        inspect.signature(factory).bind(location, spec=spec, **options)
    except TypeError as exc:  # an option the source does not take
        valid = [p for p in inspect.signature(factory).parameters if p not in ("location", "spec")]
        raise SourceError(f"{spec!r}: {exc}; options of {kind!r}: {', '.join(valid) or 'none'}") from None
    return factory(location, spec=spec, **options)

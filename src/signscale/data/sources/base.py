"""What every source yields, and how a source is named on the command line.

A source is *index-addressable*: ``len(source)`` samples, ``source.read(i)`` returns sample ``i``.
That makes packing parallel (workers read disjoint index ranges), distributed (ranks do too) and
resumable (index ranges map to shards), and keeps a source picklable: file handles are opened
lazily in whichever process reads.

Bad entries are data, not crashes: ``read(i)`` returns a :class:`Problem` naming the entry and the
reason, and the caller decides whether to raise, skip or quarantine it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import numpy as np

from signscale.corruptions import CORRUPTIONS
from signscale.images import ImageError, image_size
from signscale.labels import LabelSpace

# Shards store a condition as its index here: append only.
CONDITIONS: tuple[str, ...] = ("clear", *CORRUPTIONS)


@dataclass(frozen=True)
class Sample:
    """One labelled image with what is known about where it came from.

    ``image`` is the original encoded bytes (PPM/PNG/JPEG as stored) or an HxWx3 uint8 array;
    it is ``None`` in the cheap listing returned by :meth:`Source.entries`.
    """

    key: str  # unique within the source, e.g. the relative path in the archive
    label: int  # id in the source's label space
    image: bytes | np.ndarray | None = None
    source: str = ""
    track: str | None = None  # physical sign id; frames of one track are near-duplicates
    roi: tuple[int, int, int, int] | None = None  # x1, y1, x2, y2 in decoded-image pixels
    condition: str = "clear"
    country: str = "de"
    meta: dict[str, Any] = field(default_factory=dict)

    def without_image(self) -> "Sample":
        return replace(self, image=None)


@dataclass(frozen=True)
class Problem:
    """An entry a source could not turn into a sample; ``reason`` is a short machine-readable code."""

    key: str
    reason: str  # e.g. missing_file, unreadable_image, label_out_of_range, bad_csv_row
    detail: str = ""
    source: str = ""

    def __str__(self) -> str:
        return f"{self.key}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


class SourceError(ValueError):
    """A source cannot be opened at all (missing path, wrong layout); the message says what to do."""


class Source(abc.ABC):
    """Base of all sources. Subclasses set ``kind`` and implement ``__len__`` and ``read``."""

    kind: str = ""

    def __init__(self, label_space: LabelSpace, spec: str = "") -> None:
        self.label_space = label_space
        self.spec = spec

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def read(self, index: int) -> Sample | Problem:
        """Sample ``index`` with its image, or the problem that prevents reading it."""

    def entries(self) -> list[Sample | Problem]:
        """All samples without images; sources override this when metadata is cheaper than pixels."""
        return [s.without_image() if isinstance(s, Sample) else s for s in self]

    def __iter__(self) -> Iterator[Sample | Problem]:
        for i in range(len(self)):
            yield self.read(i)

    def describe(self) -> dict[str, Any]:
        """Plain data recorded in manifests: enough to know what was packed."""
        return {"kind": self.kind, "spec": self.spec, "size": len(self), "label_space": self.label_space.name}


class Subset(Source):
    """A view of another source restricted to some indices (e.g. one side of a split)."""

    def __init__(self, base: Source, indices: np.ndarray | list[int], name: str) -> None:
        super().__init__(base.label_space, f"{base.spec}#{name}")
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.kind = base.kind
        self.subset_name = name

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, index: int) -> Sample | Problem:
        return self.base.read(int(self.indices[index]))

    def entries(self) -> list[Sample | Problem]:
        all_entries = self.base.entries()
        return [all_entries[i] for i in self.indices]

    def describe(self) -> dict[str, Any]:
        return {**self.base.describe(), "subset": self.subset_name, "size": len(self)}


class TreeCrops(Source):
    """Sign crops listed from a folder or zip (a tree with ``read(name)``): the listing found their
    names, labels and problems; reading checks the image's header, so a missing or undecodable file
    is a :class:`Problem` naming it (and ``_what``, e.g. its code), never a guessed sample.

    Subclasses set ``tree``, ``names``, ``problems``, ``location`` and implement ``_sample``."""

    tree: Any
    names: list[str]
    problems: dict[int, Problem]
    location: str

    def __len__(self) -> int:
        return len(self.names)

    def _what(self, index: int) -> str:
        """How a problem names the crop (subclasses add what else identifies it)."""
        return self.names[index]

    @abc.abstractmethod
    def _sample(self, index: int, image: bytes | None = None) -> Sample: ...

    def read(self, index: int) -> Sample | Problem:
        if index in self.problems:
            return self.problems[index]
        name = self.names[index]
        try:
            data = self.tree.read(name)
            image_size(data)
        except FileNotFoundError:
            return Problem(name, "missing_file", f"{self._what(index)} is gone from {self.location}", self.kind)
        except ImageError as exc:
            return Problem(name, exc.reason, f"{self._what(index)}: {exc.detail}", self.kind)
        return self._sample(index, data)

    def entries(self) -> list[Sample | Problem]:
        return [self.problems.get(i) or self._sample(i) for i in range(len(self))]


def one_side(source: Source, split: str, sides: Callable[[], tuple[np.ndarray, np.ndarray]]) -> Source:
    """``split=all``: the source itself; ``train`` / ``val``: that side of its held-out split, whose
    (train, val) indices ``sides`` computes only when a side is asked for."""
    if split == "all":
        return source
    train_idx, val_idx = sides()
    return Subset(source, train_idx if split == "train" else val_idx, split)

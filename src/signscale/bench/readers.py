"""The ways of reading a dataset that ``signscale bench io`` compares (plain files, shard blocks,
per-sample augmentation) and the counters it measures them with (storage requests, CPU time of
the loader's worker processes)."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import resource
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from signscale import images, storage


class PlainFiles(Dataset):
    """One file per sample, decoded and resized per sample: the baseline without shards."""

    def __init__(self, paths: list[str], labels: list[int], size: int, *, remote: bool) -> None:
        self.paths, self.labels, self.size, self.remote = paths, labels, size, remote

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.remote:
            data = storage.read_bytes(self.paths[i])  # one GET per sample
        else:
            with open(self.paths[i], "rb") as f:
                data = f.read()
        img = images.resize(images.decode(data), self.size)
        if not img.flags.writeable:  # PIL's buffer when no resize was needed; torch wants its own
            img = img.copy()
        return {"image": torch.from_numpy(img), "label": self.labels[i]}


class ShardBlocks(IterableDataset):
    """Shards read directly: consecutive blocks of records, one ranged read per block, no plan.

    Workers take contiguous runs of blocks. ``encoded`` shards decode and resize each blob.
    """

    def __init__(self, urls: list[str], counts: list[int], block: int, size: int) -> None:
        super().__init__()
        self.urls, self.counts, self.block, self.size = urls, counts, block, size

    def blocks(self) -> list[tuple[int, int, int]]:
        return [(s, lo, min(lo + self.block, n)) for s, n in enumerate(self.counts) for lo in range(0, n, self.block)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from signscale.data.shards import ShardReader

        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        blocks = self.blocks()
        q, rem = divmod(len(blocks), nw)
        lo = w * q + min(w, rem)
        readers: dict[int, ShardReader] = {}
        for s, a, b in blocks[lo:lo + q + (1 if w < rem else 0)]:
            r = readers.get(s)
            if r is None:
                r = readers[s] = ShardReader(self.urls[s])
            recs = r.records(a, b)
            if r.encoding == "raw":
                img = np.ascontiguousarray(recs["image"])
                if img.shape[1] != self.size:
                    img = np.stack([images.resize(im, self.size) for im in img])
            else:
                img = np.stack([images.resize(images.decode(blob), self.size) for blob in r.blobs(a, b)])
            yield {"image": torch.from_numpy(img), "label": torch.from_numpy(recs["label"].astype(np.int64))}


class PerSampleAugment(Dataset):
    """Raw-shard records augmented one at a time with torchvision v2, as a torchvision recipe would.

    Random affine (the same rotation, shift and zoom ranges as :class:`AugmentConfig`), colour
    jitter, a horizontal flip that obeys the label space's flip rules, then float conversion and
    normalisation; the DataLoader collates the per-sample tensors into a batch.
    """

    def __init__(self, url: str, size: int) -> None:
        from signscale.data.manifest import Manifest
        from signscale.training.augment import AugmentConfig
        from signscale.transforms import Preprocess

        m = Manifest.load(url)
        self.urls = [m.shard_url(i) for i in range(len(m.shards))]
        self.starts = np.concatenate([[0], np.cumsum([s.count for s in m.shards])])
        self.flip_map = m.label_space.flip_map()
        self.aug, self.pre, self.size = AugmentConfig(), Preprocess(image_size=size), size
        self._readers: dict[int, Any] = {}
        self._tf: Any = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _transform(self) -> Any:
        if self._tf is None:  # built lazily: torchvision is imported in the process that augments
            from torchvision.transforms import v2

            a = self.aug
            self._tf = v2.Compose([
                v2.RandomAffine(degrees=a.rotate, translate=(a.translate, a.translate), scale=a.scale),
                v2.ColorJitter(brightness=a.brightness, contrast=a.contrast, saturation=a.saturation),
                v2.Resize(self.size, antialias=True),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(self.pre.mean), std=list(self.pre.std)),
            ])
        return self._tf

    def __getitem__(self, i: int) -> dict[str, Any]:
        from signscale.data.shards import ShardReader

        s = int(np.searchsorted(self.starts, i, side="right") - 1)
        r = self._readers.get(s)
        if r is None:
            r = self._readers[s] = ShardReader(self.urls[s])
        rec = r.records(i - int(self.starts[s]), i - int(self.starts[s]) + 1)[0]
        img = torch.from_numpy(np.array(rec["image"])).permute(2, 0, 1)  # uint8 CHW
        label = int(rec["label"])
        x = self._transform()(img)
        if self.flip_map[label] >= 0 and torch.rand(()) < self.aug.flip:
            x, label = x.flip(-1), int(self.flip_map[label])
        return {"image": x, "label": label}


def loader_augment(size: int, flip_map: np.ndarray, *, compiled: bool | None = None) -> Any:
    """The training augmentation as ``signscale train`` runs it in loader workers on a CPU host
    (``compiled=False``: with the torch ops instead of the compiled kernel)."""
    from signscale.training.augment import AugmentConfig, BatchAugment, LoaderAugment
    from signscale.transforms import Preprocess

    return LoaderAugment(BatchAugment(AugmentConfig(), Preprocess(image_size=size), torch.as_tensor(flip_map),
                                      compiled=compiled))


def normalised(loader: Iterable[dict[str, Any]], size: int) -> Iterator[dict[str, Any]]:
    """What the training loop does with the workers' 8-bit augmented batches: :func:`to_input`."""
    from signscale.transforms import Preprocess, to_input

    pre, it = Preprocess(image_size=size), iter(loader)
    try:
        for b in it:
            b["image"] = to_input(b["image"], pre)
            yield b
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def children_cpu() -> float:
    """CPU seconds of this process's finished children (DataLoader workers, once joined)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def mp_context() -> str | None:
    # fork, as StreamLoader uses: workers inherit the request counters (spawn would not count them)
    return "fork" if "fork" in mp.get_all_start_methods() else None


def dataloader(ds: Dataset, workers: int, **kw: Any) -> DataLoader:
    extra: dict[str, Any] = {"multiprocessing_context": mp_context()} if workers > 0 else {}
    return DataLoader(ds, num_workers=workers, pin_memory=False, **extra, **kw)


class RequestCounter:
    """Counts calls to (and bytes from) ``storage.read_bytes`` in this process and its forked workers."""

    def __init__(self) -> None:
        ctx = mp.get_context(mp_context() or "spawn")
        self.calls = ctx.Value("q", 0)
        self.nbytes = ctx.Value("q", 0)

    def snapshot(self) -> tuple[int, int]:
        return int(self.calls.value), int(self.nbytes.value)

    def reset(self) -> None:
        with self.calls.get_lock():
            self.calls.value = 0
        with self.nbytes.get_lock():
            self.nbytes.value = 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[RequestCounter]:
        original = storage.read_bytes
        calls, nbytes = self.calls, self.nbytes

        def counting_read_bytes(url: str, start: int | None = None, end: int | None = None) -> bytes:
            data = original(url, start, end)
            with calls.get_lock():
                calls.value += 1
            with nbytes.get_lock():
                nbytes.value += len(data)
            return data

        storage.read_bytes = counting_read_bytes  # type: ignore[assignment]
        try:
            yield self
        finally:
            storage.read_bytes = original  # type: ignore[assignment]

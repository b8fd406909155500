"""Near-duplicate detection for ingest: 64-bit perceptual hashes (dHash) of every image, an index
that finds any stored hash within a few bits, and the hashes of a dataset's records and of the
protected evaluation sets, so an upload that copies a test image never reaches training."""

from __future__ import annotations

import numpy as np

from signscale.data import shards
from signscale.data.manifest import Manifest


def dhash(images_nhwc: np.ndarray) -> np.ndarray:
    """64-bit difference hashes of a uint8 NxHxWx3 batch: robust to re-encoding and small resizes."""
    import torch
    import torch.nn.functional as F

    if len(images_nhwc) == 0:
        return np.zeros(0, dtype=np.uint64)
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc)).float().mean(-1, keepdim=True).permute(0, 3, 1, 2)
    small = F.interpolate(x, size=(8, 9), mode="area")[:, 0]
    bits = (small[:, :, 1:] > small[:, :, :-1]).reshape(len(x), 64).numpy().astype(np.uint64)
    return (bits << np.arange(64, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)


class HashIndex:
    """Near-duplicate lookup of 64-bit hashes within a Hamming distance, by band (pigeonhole) matching.

    With ``bits`` <= 3, two hashes that close agree exactly on at least one of four 16-bit bands, so
    candidates come from four sorted arrays and only they are compared in full.
    """

    def __init__(self, hashes: np.ndarray) -> None:
        self.hashes = np.asarray(hashes, dtype=np.uint64)
        self.bands = []
        for b in range(4):
            band = ((self.hashes >> np.uint64(16 * b)) & np.uint64(0xFFFF)).astype(np.int64)
            order = np.argsort(band, kind="stable")
            self.bands.append((band[order], order))

    def __len__(self) -> int:
        return len(self.hashes)

    def near(self, h: int, bits: int) -> bool:
        if bits < 0 or not len(self.hashes):
            return False
        for b, (sorted_band, order) in enumerate(self.bands):
            v = (int(h) >> (16 * b)) & 0xFFFF
            lo, hi = np.searchsorted(sorted_band, v), np.searchsorted(sorted_band, v, side="right")
            if hi > lo:
                cand = self.hashes[order[lo:hi]] ^ np.uint64(h)
                if int(popcount(cand).min()) <= bits:
                    return True
        return False


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 (np.bitwise_count needs numpy >= 2; the project allows 1.26)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return np.unpackbits(np.ascontiguousarray(x, dtype="<u8").view(np.uint8)).reshape(-1, 64).sum(1)


def dataset_hashes(manifest: Manifest, chunk: int = 8192) -> np.ndarray:
    out = []
    for i in range(len(manifest.shards)):
        r = shards.ShardReader(manifest.shard_url(i))
        for s in range(0, r.count, chunk):
            out.append(dhash(np.asarray(r.records(s, s + chunk)["image"])))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.uint64)


def protected_index(urls: tuple[str, ...]) -> HashIndex:
    """Hashes of the evaluation sets uploads may never enter."""
    hashes = [dataset_hashes(Manifest.load(u)) for u in urls]
    return HashIndex(np.concatenate(hashes) if hashes else np.zeros(0, np.uint64))

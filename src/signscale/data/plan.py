"""The epoch plan: pure functions of (config, dataset sizes, epoch) that every rank and worker computes
alike, so they agree on who reads what without talking; and the intervals of positions not yet
consumed, which make a mid-epoch resume exact."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from signscale.data import permutation

Intervals = list[tuple[int, int]]


@dataclass(frozen=True)
class StreamConfig:
    """How to read one or more packed datasets."""

    datasets: tuple[str, ...]
    weights: tuple[float, ...] = ()  # empty: every sample of every dataset once per epoch
    epoch_size: int = 0  # with weights: samples per epoch (0: the datasets' total)
    batch_size: int = 256
    shuffle: bool = True
    seed: int = 0
    block_size: int = 256
    window_blocks: int = 8
    remainder: Literal["drop", "pad"] = "drop"
    image_size: int = 0  # encoded datasets: decode and resize to this (0: the raw shards' size)
    cache_dir: str = ""  # remote shards: whole-shard cache; empty: ranged reads
    cache_bytes: int = 8 << 30
    rank_layout: Literal["contiguous", "interleaved"] = "contiguous"  # see RankShare
    # A block whose bytes fail their checksum (or a record whose label is out of range): "raise"
    # stops the run naming dataset, shard and block; "skip" leaves its records out of their
    # batches, records it in StreamLoader.quarantine and reports the count at the epoch's end.
    on_corrupt: Literal["raise", "skip"] = "raise"
    check_sums: bool = True  # False: read without checking the block sums (to measure what they cost)

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("datasets: give at least one manifest URL")
        if self.weights and len(self.weights) != len(self.datasets):
            raise ValueError(f"weights: {len(self.weights)} weights for {len(self.datasets)} datasets")
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) <= 0):
            raise ValueError("weights: must be >= 0 and not all zero")
        if self.rank_layout not in ("contiguous", "interleaved"):
            raise ValueError(f"rank_layout: expected contiguous or interleaved, got {self.rank_layout!r}")
        if self.batch_size < 1 or self.block_size < 1 or self.window_blocks < 1:
            raise ValueError("batch_size, block_size and window_blocks must be >= 1")
        if self.remainder not in ("drop", "pad"):
            raise ValueError(f"remainder: expected drop or pad, got {self.remainder!r}")
        if self.on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt: expected raise or skip, got {self.on_corrupt!r}")


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


@dataclass
class EpochPlan:
    """Segments of the global sequence for one epoch; positions map to (dataset, record)."""

    seg_ds: np.ndarray  # dataset of each segment, in sequence order
    seg_start: np.ndarray  # first record of each segment within its dataset
    seg_pos: np.ndarray  # first global position of each segment (len = segments + 1)
    window: int  # window size in positions (0: no shuffle)
    seed: int
    epoch: int
    _perms: "collections.OrderedDict[int, np.ndarray]" = field(default_factory=collections.OrderedDict)

    @property
    def total(self) -> int:
        return int(self.seg_pos[-1])

    def _last_window_perm(self, w: int) -> np.ndarray:
        perm = self._perms.get(w)
        if perm is None:
            perm = _rng(self.seed, self.epoch, 7, w).permutation(self.total - w * self.window)
            self._perms[w] = perm
        return perm

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, record) for global positions (vectorised: no loop over windows)."""
        pos = np.asarray(positions, dtype=np.int64)
        if self.window > 0 and len(pos):
            W = self.window
            wins = pos // W
            off = pos - wins * W
            full = self.total // W  # windows [0, full) are complete; a last, shorter one is permuted apart
            src = pos.copy()
            inside = wins < full
            if inside.any():
                key = np.random.SeedSequence([self.seed, self.epoch, 7]).generate_state(1, np.uint64)[0]
                keys = (wins[inside].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ key
                src[inside] = wins[inside] * W + permutation.permute(off[inside], W, keys).astype(np.int64)
            if (~inside).any():
                src[~inside] = full * W + self._last_window_perm(full)[off[~inside]]
            pos = src
        seg = np.searchsorted(self.seg_pos, pos, side="right") - 1
        return self.seg_ds[seg], self.seg_start[seg] + (pos - self.seg_pos[seg])


def plan_epoch(sizes: Sequence[int], cfg: StreamConfig, epoch: int) -> EpochPlan:
    """Build the epoch's segment order: O(blocks) memory, never O(samples)."""
    B = cfg.block_size
    per_ds = _samples_per_dataset(sizes, cfg)
    seg_ds, seg_start, seg_len, times = [], [], [], []
    for d, (n, want) in enumerate(zip(sizes, per_ds)):
        if n == 0 or want == 0:
            continue
        nb = -(-n // B)
        starts_all, lens_all = [], []
        taken, cycle = 0, 0
        while taken < want:  # oversampled datasets cycle through fresh block orders
            order = _rng(cfg.seed, epoch, 1, d, cycle).permutation(nb) if cfg.shuffle else np.arange(nb)
            starts = order * B
            lens = np.minimum(B, n - starts)
            cum = np.cumsum(lens)
            k = int(np.searchsorted(cum, want - taken, side="left")) + 1
            starts, lens = starts[:k], lens[:k].copy()
            over = int(lens.sum()) - (want - taken)
            if over > 0:
                lens[-1] -= over
            starts_all.append(starts)
            lens_all.append(lens)
            taken += int(lens.sum())
            cycle += 1
        st, ln = np.concatenate(starts_all), np.concatenate(lens_all)
        m = len(st)
        jitter = _rng(cfg.seed, epoch, 2, d).random(m) if cfg.shuffle else np.full(m, 0.5)
        times.append((np.arange(m) + jitter) / m)
        seg_ds.append(np.full(m, d, dtype=np.int32))
        seg_start.append(st.astype(np.int64))
        seg_len.append(ln.astype(np.int64))
    if not seg_ds:
        z = np.zeros(0, np.int64)
        return EpochPlan(z.astype(np.int32), z, np.zeros(1, np.int64), 0, cfg.seed, epoch)
    t = np.concatenate(times)
    order = np.argsort(t, kind="stable") if len(seg_ds) > 1 else np.arange(len(t))
    ds, start, ln = np.concatenate(seg_ds)[order], np.concatenate(seg_start)[order], np.concatenate(seg_len)[order]
    pos = np.concatenate([[0], np.cumsum(ln)]).astype(np.int64)
    window = cfg.window_blocks * B if cfg.shuffle else 0
    return EpochPlan(ds, start, pos, window, cfg.seed, epoch)


def _samples_per_dataset(sizes: Sequence[int], cfg: StreamConfig) -> list[int]:
    if not cfg.weights:
        return list(sizes)
    total = cfg.epoch_size or sum(sizes)
    w = np.asarray(cfg.weights, dtype=np.float64) / sum(cfg.weights)
    exact = w * total
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts))[: total - int(counts.sum())]] += 1  # largest remainders
    return [int(c) for c in counts]


def interval_lengths(iv: Intervals) -> np.ndarray:
    return np.array([b - a for a, b in iv], dtype=np.int64)


def virtual_to_global(iv: Intervals, virtual: np.ndarray) -> np.ndarray:
    """Map positions in the end-to-end concatenation of ``iv`` to global positions."""
    starts = np.array([a for a, _ in iv], dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(interval_lengths(iv))])
    k = np.searchsorted(cum, virtual, side="right") - 1
    return starts[k] + (virtual - cum[k])


def virtual_range_to_intervals(iv: Intervals, a: int, b: int) -> Intervals:
    """Global intervals covered by virtual positions [a, b)."""
    out: Intervals = []
    cum = 0
    for s, e in iv:
        n = e - s
        lo, hi = max(a, cum), min(b, cum + n)
        if lo < hi:
            out.append((s + lo - cum, s + hi - cum))
        cum += n
        if cum >= b:
            break
    return out


def subtract(iv: Intervals, cut: Intervals) -> Intervals:
    """``iv`` minus ``cut`` (both lists of half-open intervals)."""
    points = sorted(cut)
    out: Intervals = []
    for a, b in iv:
        cur = a
        for c, d in points:
            if d <= cur or c >= b:
                continue
            if c > cur:
                out.append((cur, c))
            cur = max(cur, d)
        if cur < b:
            out.append((cur, b))
    return out


@dataclass(frozen=True)
class RankShare:
    """The virtual positions one rank owns, and how its batches are split among workers.

    ``contiguous`` (default): rank ``r`` owns one run of positions, so each rank reads a compact
    region of the shards. ``interleaved``: global batch ``g`` (``batch_size`` consecutive positions)
    goes to rank ``g % world_size``, so one process with ``accumulate = world_size`` sees exactly
    the global batches a ``world_size``-rank run sees: results that do not depend on the GPU count,
    paid for with more scattered reads.
    """

    start: int  # first virtual position of this rank (contiguous layout; pad positions wrap around)
    count: int  # positions this rank yields, including pad
    real: int  # of which real (the rest are padding)
    batch_size: int
    num_workers: int
    rank: int = 0
    world_size: int = 1
    interleaved: bool = False

    @property
    def num_batches(self) -> int:
        return -(-self.count // self.batch_size)

    def worker_batches(self, w: int) -> range:
        """Batches of worker ``w``: every ``num_workers``-th, the order in which DataLoader collects them.

        So the loader yields batch 0, 1, 2, ... whatever the worker count: the sample order of a run
        does not depend on ``num_workers``, and what was consumed is always a prefix.
        """
        return range(w, self.num_batches, self.num_workers)

    def batch_range(self, j: int) -> tuple[int, int]:
        """Virtual positions [lo, hi) of this rank's batch ``j`` (hi may pass ``real``: padding)."""
        if self.interleaved:
            lo = (j * self.world_size + self.rank) * self.batch_size
            return lo, lo + self.batch_size
        lo = j * self.batch_size
        return self.start + lo, self.start + min(lo + self.batch_size, self.count)

    def batch_positions(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(virtual positions, pad flags) of batch ``j``."""
        lo, hi = self.batch_range(j)
        virtual = np.arange(lo, hi, dtype=np.int64)
        limit = lo + self.batch_size if self.interleaved else self.start + self.real
        return virtual, virtual >= limit

    def consumed(self, w: int, n: int) -> list[tuple[int, int]]:
        """Virtual ranges of real samples in the first ``n`` batches of worker ``w``."""
        out = []
        for j in list(self.worker_batches(w))[:n]:
            lo, hi = self.batch_range(j)
            if not self.interleaved:
                hi = min(hi, self.start + self.real)
            if hi > lo:
                out.append((lo, hi))
        return out


def rank_share(total: int, rank: int, world_size: int, remainder: str, batch_size: int, num_workers: int,
               interleaved: bool = False) -> RankShare:
    if interleaved:  # whole global batches only; the rest of the epoch is dropped
        per = (total // (batch_size * world_size)) * batch_size
        return RankShare(0, per, per, batch_size, num_workers, rank, world_size, True)
    if remainder == "drop":
        per = total // world_size
        return RankShare(rank * per, per, per, batch_size, num_workers, rank, world_size)
    per = -(-total // world_size)
    real = max(0, min(per, total - rank * per))
    return RankShare(rank * per, per, real, batch_size, num_workers, rank, world_size)


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def consumed_intervals(remaining: Intervals, consumed: Sequence[Sequence[int]], world_size: int,
                       remainder: str, batch_size: int, interleaved: bool = False) -> Intervals:
    """Global intervals consumed, from per-rank, per-worker counts of consumed batches."""
    total = int(interval_lengths(remaining).sum())
    virtual: list[tuple[int, int]] = []
    for r, per_worker in enumerate(consumed):
        share = rank_share(total, r, world_size, remainder, batch_size, len(per_worker), interleaved)
        for w, n in enumerate(per_worker):
            virtual += share.consumed(w, n)
    out: Intervals = []
    for a, b in _coalesce(virtual):
        out += virtual_range_to_intervals(remaining, a, b)
    return sorted(out)

"""ShardStream: every sample exactly once per epoch, on every rank and worker, resumable.

The epoch plan (docs/format.md has the long version):

1. **Segments.** Each dataset's records are cut into blocks of ``block_size`` consecutive records.
   With mixing weights a dataset contributes its share of the epoch as whole blocks from its own
   shuffled block order (cycled if it is oversampled; the last one truncated).
2. **Segment order.** Segments are interleaved by a jittered "virtual time" ``(j + u) / n_d``, so
   every stretch of the epoch holds the datasets in their proportions, not only the whole epoch.
3. **Window shuffle.** The resulting sequence is cut into windows of ``window_blocks * block_size``
   positions, and each window is permuted. This is the shuffle buffer, made a pure function of
   (seed, epoch, position), so any position's sample can be computed without replaying a buffer.
   Steps 1-3 define the *global sequence* ``g[0..T)``: it depends on the seed, the epoch and the
   datasets, never on the number of ranks or workers.
4. **Partition.** The positions not yet consumed this epoch (``remaining``, a list of intervals;
   all of ``[0, T)`` at an epoch's start) are laid end to end; rank ``r`` takes the ``r``-th equal
   share (``drop``: the tail that does not divide is left out; ``pad``: the last positions repeat,
   flagged ``pad``). A rank's share is cut into batches; worker ``w`` of ``W`` takes a contiguous
   run of those batches, so each worker reads a compact region of shards.

**Resume** records, per rank and worker, how many batches the training loop consumed. Consumed
batches are a prefix of each worker's list, so they map back to global positions; ``remaining``
minus them is what the resumed epoch yields. Because step 4 is redone from ``remaining`` with the
*new* world size and worker count, resuming elastically (2 ranks -> 1, 2 workers -> 4) still
yields each remaining sample exactly once.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import mmap
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from signscale import images, storage
from signscale.data import permutation, shards
from signscale.data.shards import FIX, Manifest, ShardError, ShardReader
from signscale.data.world import World
from signscale.labels import LabelSpace

try:
    from signscale import kernels
except ImportError:  # no numba: the numpy and torch paths do the work
    kernels = None  # type: ignore[assignment]

log = logging.getLogger("signscale.data.stream")

Intervals = list[tuple[int, int]]
Records = np.ndarray | dict[str, np.ndarray]  # a structured array, or its fields gathered one by one
_Block = tuple[np.ndarray, list[bytes] | None, np.ndarray | None]  # records, blobs, rows in corrupt blocks


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


# ---------------------------------------------------------------------------------------------
# The plan: pure functions of (config, dataset sizes, epoch)


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


# ---------------------------------------------------------------------------------------------
# Intervals: positions not yet consumed


def _interval_lengths(iv: Intervals) -> np.ndarray:
    return np.array([b - a for a, b in iv], dtype=np.int64)


def virtual_to_global(iv: Intervals, virtual: np.ndarray) -> np.ndarray:
    """Map positions in the end-to-end concatenation of ``iv`` to global positions."""
    starts = np.array([a for a, _ in iv], dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(_interval_lengths(iv))])
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
    total = int(_interval_lengths(remaining).sum())
    virtual: list[tuple[int, int]] = []
    for r, per_worker in enumerate(consumed):
        share = rank_share(total, r, world_size, remainder, batch_size, len(per_worker), interleaved)
        for w, n in enumerate(per_worker):
            virtual += share.consumed(w, n)
    out: Intervals = []
    for a, b in _coalesce(virtual):
        out += virtual_range_to_intervals(remaining, a, b)
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# Reading records


class ShardCache:
    """Whole-shard local cache for remote datasets: LRU by size, sha256-checked, multi-process safe.

    Files are named by their sha256, downloaded to a unique temp name and renamed into place, so a
    reader never sees a torn file and a crash leaves no lock behind (there are no locks). A cached
    file is re-hashed the first time each process opens it, so a corrupted copy is re-fetched.
    """

    def __init__(self, root: str, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._verified: set[str] = set()
        os.makedirs(root, exist_ok=True)

    def path(self, url: str, sha256: str, nbytes: int) -> str:
        if nbytes > self.max_bytes:
            raise ShardError(f"{url}: shard of {nbytes} bytes does not fit the cache bound {self.max_bytes}; "
                             "raise cache_bytes or pack smaller shards (--shard-mb)")
        final = os.path.join(self.root, f"{sha256}.sgs")
        # Another process may evict the file at any moment: gone is the same as never cached.
        with contextlib.suppress(FileNotFoundError):
            if final in self._verified or storage.sha256_of(final) == sha256:
                os.utime(final)
                self._verified.add(final)
                return final
        data = storage.read_bytes(url)
        if hashlib.sha256(data).hexdigest() != sha256:  # checked once, before the file is used
            raise ShardError(f"{url}: downloaded shard does not match its manifest sha256 (corrupt in storage); "
                             + FIX.format(dataset=shards.dataset_of(url)))
        tmp = os.path.join(self.root, f".{sha256}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        # Evict after the temp file exists: every process counts every other's in-flight download,
        # so concurrent downloads cannot together push the cache over its bound.
        self._evict(keep={final, tmp})
        os.replace(tmp, final)
        self._verified.add(final)
        return final

    def _evict(self, keep: set[str]) -> None:
        entries, used = [], 0
        for name in os.listdir(self.root):
            p = os.path.join(self.root, name)
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue
            if name.endswith(".tmp") and time.time() - st.st_mtime > 3600:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(p)  # left by a crashed download
                continue
            used += st.st_size
            if name.endswith(".sgs") and p not in keep:
                entries.append((max(st.st_atime, st.st_mtime), st.st_size, p))
        for _, sz, p in sorted(entries):
            if used <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)  # readers holding it open keep their mapping (POSIX)
            used -= sz
            self._verified.discard(p)

    def used_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.root, n)) for n in os.listdir(self.root) if n.endswith(".sgs"))


class _DatasetReader:
    """Reads records of one dataset by record index, grouping by shard; keeps a few shards open.

    Local (and cached) shards are memory-mapped: a batch is one fancy-index gather, after the
    checksum blocks it touches are checked (each once per process). Remote shards are read in
    aligned blocks of ``block`` records, one ranged GET per run of missing blocks (widened to whole
    checksum blocks and checked on arrival), kept in a small LRU: a shuffle window's blocks serve
    several consecutive batches, so each block is fetched about once per worker instead of once per batch.

    A corrupt block raises (``on_corrupt="raise"``) or marks its rows bad and adds one entry per
    block to :attr:`quarantine` (``"skip"``), which the stream hands to the loader with the batch.
    """

    def __init__(self, manifest: Manifest, cache: ShardCache | None, block: int = 256, max_blocks: int = 32,
                 on_corrupt: str = "raise", check: bool = True, checked: np.ndarray | None = None) -> None:
        """``checked``: one byte per record of the dataset, set once its block passed its check in a
        mapped shard; shared by the loader's workers (see :meth:`ShardStream.share_checks`)."""
        self.m = manifest
        self.check = check
        self.checked = checked
        self.cache = cache
        self.block = block
        self.max_blocks = max_blocks
        self.on_corrupt = on_corrupt
        self.quarantine: list[dict[str, Any]] = []  # new entries, drained by the stream into batches
        self._reported: set[tuple[int, int, str]] = set()
        self._readers: "collections.OrderedDict[int, ShardReader]" = collections.OrderedDict()
        self._blocks: collections.OrderedDict[tuple[int, int], _Block] = collections.OrderedDict()
        self._local = storage.is_local(manifest.root)

    def reader(self, s: int) -> ShardReader:
        r = self._readers.get(s)
        if r is None:
            r = self._open(s)
            if r.count != self.m.shards[s].count:
                raise ShardError(f"{r.url}: shard holds {r.count} records, manifest says {self.m.shards[s].count}")
            self._readers[s] = r
            # a mapped reader holds a file mapping; an unmapped one only its parsed header, so keep many
            # (else every block of a shard not among the last 16 re-reads its header: one more request)
            if len(self._readers) > (16 if r.mapped else 4096):
                self._readers.popitem(last=False)
        else:
            self._readers.move_to_end(s)
        return r

    def _open(self, s: int, tries: int = 3) -> ShardReader:
        url = self.m.shard_url(s)
        if not self.cache or self._local:
            return ShardReader(url)
        info = self.m.shards[s]
        for attempt in range(tries):
            try:  # another process can evict the cached file between path() and the open
                return ShardReader(url, local=self.cache.path(url, info.sha256, info.bytes))
            except FileNotFoundError:
                if attempt == tries - 1:
                    raise
        raise ValueError(f"tries must be >= 1, got {tries}")

    # -- corruption ---------------------------------------------------------------------------

    def _corrupt(self, s: int, r: ShardReader, blocks: Sequence[int], section: str) -> None:
        """Corrupt checksum blocks of shard ``s``: raise, or quarantine each (once per process)."""
        if self.on_corrupt == "raise":
            b = int(blocks[0])
            lo, hi = r.block_range(b)
            raise ShardError(f"{self.m.root}: shard {self.m.shards[s].path}, block {b} (records {lo}..{hi - 1}) "
                             f"does not match its checksum ({section}): the data is corrupt; "
                             + FIX.format(dataset=self.m.root)
                             + "; to train on without it, set on_corrupt=skip")
        for b in blocks:
            if (s, int(b), "block") not in self._reported:
                self._reported.add((s, int(b), "block"))
                lo, hi = r.block_range(int(b))
                self.quarantine.append({"dataset": self.m.root, "shard": self.m.shards[s].path, "block": int(b),
                                        "records": [lo, hi], "reason": f"checksum mismatch ({section})"})

    def check_labels(self, records: np.ndarray, labels: np.ndarray, skip: np.ndarray | None) -> np.ndarray | None:
        """Rows whose label lies outside the dataset's label space (None: none); raises unless skipping.

        Such a label only comes from a corrupt (or format 1, unchecked) shard; left in, it surfaced as an
        IndexError far from the file."""
        n = len(self.m.label_space)
        bad = (labels < 0) | (labels >= n)
        if skip is not None:
            bad &= ~skip
        if not bad.any():
            return None
        rows = np.flatnonzero(bad)
        shard_of = np.searchsorted(self.m.starts, records[rows], side="right") - 1
        if self.on_corrupt == "raise":
            s, k = int(shard_of[0]), int(rows[0])
            local = int(records[k] - self.m.starts[s])
            raise ShardError(f"{self.m.root}: shard {self.m.shards[s].path}, record {local}: label {int(labels[k])} "
                             f"is outside the label space ({n} classes): the data is corrupt; "
                             + FIX.format(dataset=self.m.root))
        for s, k in zip(shard_of, rows):
            local = int(records[k] - self.m.starts[s])
            if (int(s), local, "label") not in self._reported:
                self._reported.add((int(s), local, "label"))
                self.quarantine.append({"dataset": self.m.root, "shard": self.m.shards[int(s)].path, "record": local,
                                        "reason": f"label {int(labels[k])} outside the label space ({n} classes)"})
        return bad

    def _check_mapped(self, s: int, r: ShardReader, local_idx: np.ndarray) -> np.ndarray | None:
        """Check the blocks a gather from a mapped shard touches; the rows in corrupt ones (None: none)."""
        if r.sums is None or not self.check:
            return None
        idx, start = local_idx, int(self.m.starts[s])
        if self.checked is not None:  # blocks checked earlier in this run (by any worker, any epoch)
            todo = self.checked[local_idx + start] == 0
            if not todo.any():
                return None
            idx = local_idx[todo]
        blocks = r.unchecked(idx // r.sums.per)  # checked by this reader before: nothing to do
        if not len(blocks):
            return None
        bad = r.bad_blocks(blocks)
        if self.checked is not None:
            for b in np.setdiff1d(blocks, bad).tolist():
                lo, hi = r.block_range(b)
                self.checked[start + lo:start + hi] = 1
        if not len(bad):
            return None
        self._corrupt(s, r, [int(b) for b in bad], "records" if r.encoding == "raw" else "records or images")
        return np.isin(local_idx // r.sums.per, bad)

    # -- reads --------------------------------------------------------------------------------

    def take(self, records: np.ndarray) -> tuple[Records, list[bytes] | None, np.ndarray | None]:
        """Records (and encoded blobs) for dataset record indices, in the given order: a structured
        array, or a dict of its fields' arrays (read either with ``recs["label"]``); and the rows that
        lie in corrupt blocks (None: none; only with ``on_corrupt="skip"``: else it raises)."""
        shard_of = np.searchsorted(self.m.starts, records, side="right") - 1
        out: np.ndarray | None = None
        blobs: list[bytes] | None = [b""] * len(records) if self.m.encoding == "encoded" else None
        bad: np.ndarray | None = None
        shards_hit = np.unique(shard_of)
        if len(shards_hit) == 1 and (r := self.reader(int(shards_hit[0]))).mapped:
            # the usual batch of a window of one local shard: each field gathered on its own, so the
            # image bytes are copied once (not with their record, and then out of it)
            local_idx = records - self.m.starts[int(shards_hit[0])]
            bad = self._check_mapped(int(shards_hit[0]), r, local_idx)
            view = r.records(check=False)
            fields = {name: view[name][local_idx] for name in view.dtype.names}
            return fields, (r.blobs_at(local_idx, check=False) if blobs is not None else None), bad
        for s in shards_hit:
            sel = np.nonzero(shard_of == s)[0]
            local_idx = records[sel] - self.m.starts[s]
            r = self.reader(int(s))
            if r.mapped:
                part_bad = self._check_mapped(int(s), r, local_idx)
                part = r.records(check=False)[local_idx]
                part_blobs = r.blobs_at(local_idx, check=False) if blobs is not None else None
            else:
                part, part_blobs, part_bad = self._from_blocks(int(s), r, local_idx)
            if out is None:
                out = np.empty(len(records), dtype=part.dtype)
            out[sel] = part
            if part_bad is not None:
                bad = np.zeros(len(records), dtype=bool) if bad is None else bad
                bad[sel] = part_bad
            if blobs is not None and part_blobs is not None:
                for k, b in zip(sel, part_blobs):
                    blobs[k] = b
        assert out is not None
        return out, blobs, bad

    def _fetch(self, s: int, r: ShardReader, lo: int, hi: int
               ) -> tuple[np.ndarray, list[bytes] | None, np.ndarray | None]:
        """Records [lo, hi) of a remote shard (one ranged read per section), checked; bad rows or None."""
        recs, bad = r.records_checked(lo, hi, check=self.check)
        span = None
        if r.encoding == "encoded":
            span, bad_blobs = r.blobs_checked(lo, hi, check=self.check)
            bad = sorted(set(bad) | set(bad_blobs))
        if not bad:
            return np.array(recs), span, None
        self._corrupt(s, r, bad, "records" if r.encoding == "raw" else "records or images")
        assert r.sums is not None
        return np.array(recs), span, np.isin(np.arange(lo, hi) // r.sums.per, bad)

    def _from_blocks(self, s: int, r: ShardReader, local_idx: np.ndarray
                     ) -> tuple[np.ndarray, list[bytes] | None, np.ndarray | None]:
        B = self.block
        # Blocks are aligned to the *dataset's* record index, as the epoch plan's segments are: aligned
        # to the shard instead, each plan block straddles two reader blocks whenever a shard's record
        # count is not a multiple of B (21,620 in a 64 MiB shard of 32 px records): twice the bytes.
        off = int(self.m.starts[s]) % B
        g = local_idx + off
        needed = np.unique(g // B)
        missing = [int(b) for b in needed if (s, int(b)) not in self._blocks]
        for lo_b, hi_b in _runs(missing):  # one ranged read per run of consecutive missing blocks
            lo, hi = max(0, lo_b * B - off), min(hi_b * B - off, r.count)
            recs, span, rowbad = self._fetch(s, r, lo, hi)
            for b in range(lo_b, hi_b):
                a, z = max(0, b * B - off) - lo, min((b + 1) * B - off, r.count) - lo
                self._blocks[(s, b)] = (recs[a:z], span[a:z] if span is not None else None,
                                        rowbad[a:z] if rowbad is not None else None)
        parts = [self._blocks[(s, int(b))] for b in needed]
        for b in needed:
            self._blocks.move_to_end((s, int(b)))
        while len(self._blocks) > max(self.max_blocks, len(needed)):
            self._blocks.popitem(last=False)
        sizes = np.array([len(p[0]) for p in parts], dtype=np.int64)
        base = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        k = np.searchsorted(needed, g // B)
        where = base[k] + local_idx - np.maximum(0, needed[k] * B - off)
        recs = np.concatenate([p[0] for p in parts])[where]
        bad = None
        if any(p[2] is not None for p in parts):
            bad = np.concatenate([p[2] if p[2] is not None else np.zeros(len(p[0]), dtype=bool)
                                  for p in parts])[where]
        if r.encoding != "encoded":
            return recs, None, bad
        flat = [b for p in parts for b in p[1]]  # type: ignore[union-attr]
        return recs, [flat[int(i)] for i in where], bad


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    """[3, 4, 5, 9] -> [(3, 6), (9, 10)]"""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs


# ---------------------------------------------------------------------------------------------
# The dataset


class ShardStream(IterableDataset):
    """An IterableDataset of *batches* (dicts of tensors) over one or more packed datasets.

    Batches are assembled in the workers with numpy slicing, no per-sample Python, and carry
    ``id`` (sample id in its source), ``dataset`` (index into ``cfg.datasets``), ``pad``, and the
    ``worker``/``batch`` that produced them so the loader can account for consumption exactly.
    """

    def __init__(self, cfg: StreamConfig, *, rank: int | None = None, world_size: int | None = None,
                 label_space: LabelSpace | None = None) -> None:
        """``label_space``: the space labels are reported in. Each dataset's ids are mapped onto it
        (by country and class id, see :meth:`LabelSpace.map_from`), which is how datasets of different
        countries train one model; without it all datasets must share one label space."""
        super().__init__()
        self.cfg = cfg
        self.manifests = [Manifest.load(u) for u in cfg.datasets]
        spaces = {m.label_space.fingerprint() for m in self.manifests}
        if label_space is None and len(spaces) > 1:
            names = ", ".join(f"{u} ({m.label_space.name}, {len(m.label_space)} classes)"
                              for u, m in zip(cfg.datasets, self.manifests))
            raise ShardError(f"datasets have different label spaces: {names}; train on a merged label space "
                             "(TrainConfig.merge_by=meaning|design) or pack them with one label space")
        self.label_space = label_space or self.manifests[0].label_space
        self.label_luts = [self._label_lut(u, m) for u, m in zip(cfg.datasets, self.manifests)]
        encodings = {m.encoding for m in self.manifests}
        shapes = {m.image_shape for m in self.manifests if m.encoding == "raw"}
        if len(shapes) > 1 or (encodings == {"raw", "encoded"} and not cfg.image_size):
            raise ShardError(f"datasets mix image shapes {sorted(map(str, shapes))}; set image_size to decode all "
                             "to one size, or pack them at one --size")
        self.image_size = cfg.image_size or (next(iter(shapes))[0] if shapes else 0)
        if not self.image_size:
            raise ShardError("encoded datasets need image_size (the size to decode to)")
        self.sizes = [m.count for m in self.manifests]
        self._note_unchecked()
        self._rank, self._world = rank, world_size
        self.epoch = 0
        self.remaining: Intervals | None = None  # None: the whole epoch
        self._readers: list[_DatasetReader] | None = None
        self._checked: list[np.ndarray] | None = None  # see share_checks
        # Optional batch transform run inside the workers (e.g. CPU augmentation): dict -> dict.
        self.transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def _note_unchecked(self) -> None:
        """One line per dataset whose shards predate block sums (format 1): read, but unchecked.

        Decided here, in the main process, so the note is printed once and not by every worker of
        every epoch; from the manifest's ``shard_format`` (planning needs nothing but the manifest),
        or for manifests written before it was recorded from the first shard's header."""
        for url, m in zip(self.cfg.datasets, self.manifests):
            if m.shards and m.shard_format() < 2:
                log.warning(f"{url}: shards of format 1 carry no block checksums: reading them unchecked; "
                            "re-pack the dataset (`signscale pack`) to have every read checked")

    def _label_lut(self, url: str, m: Manifest) -> np.ndarray | None:
        """Data id -> reported id for one dataset (None: the same numbering); every class must have a place."""
        if m.label_space.fingerprint() == self.label_space.fingerprint():
            return None
        lut = self.label_space.map_from(m.label_space)
        missing = [m.label_space.ident(m.label_space[j]) for j in np.flatnonzero(lut < 0)]
        if missing:
            raise ShardError(
                f"{url}: {len(missing)} class(es) of label space {m.label_space.name!r} have no place in "
                f"{self.label_space.name!r}: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; "
                "train on a label space that includes them (merge the catalogues)"
            )
        return lut

    # -- plan ---------------------------------------------------------------------------------

    def plan(self, epoch: int | None = None) -> EpochPlan:
        return plan_epoch(self.sizes, self.cfg, self.epoch if epoch is None else epoch)

    def epoch_remaining(self, plan: EpochPlan) -> Intervals:
        return self.remaining if self.remaining is not None else [(0, plan.total)]

    def world(self) -> World:
        return World.current(self._rank, self._world)

    def share(self, plan: EpochPlan, world: World) -> RankShare:
        total = int(_interval_lengths(self.epoch_remaining(plan)).sum())
        return rank_share(total, world.rank, world.world_size, self.cfg.remainder, self.cfg.batch_size,
                          world.num_workers, self.cfg.rank_layout == "interleaved")

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (over all workers)."""
        plan = self.plan()
        return self.share(plan, World.current(self._rank, self._world)).num_batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.remaining = None
        self.epoch = epoch

    # -- iterate ------------------------------------------------------------------------------

    def _dataset_readers(self) -> list[_DatasetReader]:
        if self._readers is None:
            cache = ShardCache(self.cfg.cache_dir, self.cfg.cache_bytes) if self.cfg.cache_dir else None
            self._readers = [_DatasetReader(m, cache, block=self.cfg.block_size, on_corrupt=self.cfg.on_corrupt,
                                            check=self.cfg.check_sums, max_blocks=max(32, 4 * self.cfg.window_blocks),
                                            checked=self._checked[d] if self._checked else None)
                             for d, m in enumerate(self.manifests)]
        return self._readers

    def share_checks(self) -> None:
        """Let the loader's workers share which records' blocks passed their check, across epochs.

        Workers are forked afresh each epoch, so what one checked would be checked again by the next
        (the whole dataset once per epoch: ~0.4 us of CPU per 3 KB record, 10-15% of a bare loader's
        work). One byte per record in anonymous shared memory, made here in the main process before
        the first fork, is inherited by every worker: a block of a mapped (local or cached) shard is
        checked once per run. Remote ranged reads fetch new bytes each time and are checked each time.
        """
        if self._checked is None and self.cfg.check_sums:
            self._checked = [np.frombuffer(mmap.mmap(-1, max(1, n)), dtype=np.uint8)[:n] for n in self.sizes]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        world = self.world()
        plan = self.plan()
        remaining = self.epoch_remaining(plan)
        share = self.share(plan, world)
        in_worker = get_worker_info() is not None
        for j in share.worker_batches(world.worker):
            b = self.batch(plan, remaining, share, j, world.worker)
            yield _meta_as_bytes(b) if in_worker else b

    def batch(self, plan: EpochPlan, remaining: Intervals, share: RankShare, j: int, worker: int = 0
              ) -> dict[str, Any]:
        virtual, pad = share.batch_positions(j)
        total = int(_interval_lengths(remaining).sum())
        if total == 0:
            raise ShardError("nothing left to read this epoch")
        virtual = np.where(virtual >= total, virtual % total, virtual)
        positions = virtual_to_global(remaining, virtual)
        ds, rec = plan.lookup(positions)
        out = self._assemble(ds, rec, pad, worker, j)
        # A seed for this batch's random augmentation that depends only on where the batch sits in the
        # epoch's global sequence: a resumed run, or N ranks vs 1 rank x accumulate N, draw the same.
        out["seed"] = int(np.random.SeedSequence([self.cfg.seed, self.epoch, int(positions[0])]).generate_state(1)[0])
        if self.transform is not None:
            out = self.transform(out)
        return out

    def _assemble(self, ds: np.ndarray, rec: np.ndarray, pad: np.ndarray, worker: int, j: int) -> dict[str, Any]:
        """A batch as two tensors, the images and one int64 metadata matrix (columns ``META``).

        Each tensor crossing from a worker costs a shared-memory handle and a pickle round trip, so
        the metadata travels as one matrix; :func:`unpack_batch` gives it names again (as views).
        Rows in corrupt blocks (``on_corrupt="skip"``) are left out: see :meth:`_without`.
        """
        n = len(ds)
        S = self.image_size
        meta = np.empty((n, _META_COLUMNS), dtype=np.int64)  # 7 scalar columns + 4 for the roi
        readers = self._dataset_readers()
        datasets = np.unique(ds)
        image = None if len(datasets) == 1 else np.empty((n, S, S, 3), dtype=np.uint8)
        skip: np.ndarray | None = None
        for d in datasets:
            sel = np.nonzero(ds == d)[0]
            recs, blobs, bad = readers[int(d)].take(rec[sel])
            labels = recs["label"]
            bad_label = readers[int(d)].check_labels(rec[sel], labels, bad)
            if bad is not None or bad_label is not None:
                bad = bad_label if bad is None else (bad if bad_label is None else bad | bad_label)
                skip = np.zeros(n, dtype=bool) if skip is None else skip
                skip[sel] = bad
                labels = np.where(bad, 0, labels)  # stand-ins for rows about to be dropped
            if blobs is None and recs["image"].shape[1] == S:
                part = recs["image"]
            elif blobs is None:
                part = np.stack([images.resize(im, S) for im in recs["image"]])
            else:
                part = np.stack([_decode_or_blank(b, S, skipped) for b, skipped in
                                 zip(blobs, bad if bad is not None else [False] * len(blobs))])
            if image is None:  # one dataset: its gather is the batch (copied only if strided)
                image = np.ascontiguousarray(part)
            else:
                image[sel] = part
            for c, k in enumerate(META[:5]):
                meta[sel, c] = recs[k]
            meta[sel, 1] = labels
            lut = self.label_luts[int(d)]
            if lut is not None:
                meta[sel, 1] = lut[labels]
            meta[sel, 7:11] = recs["roi"]
        meta[:, 5] = ds
        meta[:, 6] = pad
        assert image is not None
        out = {"image": image, "meta": meta, "worker": worker, "batch": j}
        if skip is not None:
            out = self._without(out, skip)
        out["image"], out["meta"] = torch.from_numpy(out["image"]), torch.from_numpy(out["meta"])
        return out

    def _without(self, out: dict[str, Any], skip: np.ndarray) -> dict[str, Any]:
        """The batch minus its rows in corrupt blocks, with what was skipped for the loader to count.

        The batch keeps its ``worker``/``batch`` (so consumption accounting, hence resume, is exact)
        and may come out short, or empty, which :class:`StreamLoader` counts and does not yield."""
        keep = ~skip
        out = {**out, "image": np.ascontiguousarray(out["image"][keep]), "meta": out["meta"][keep]}
        out["skipped"] = self.skipped(skip)
        return out

    def skipped(self, skip: np.ndarray) -> dict[str, Any]:
        """What a batch left out (``skip``: its rows' flags), with the new quarantine entries."""
        entries = [e for r in self._dataset_readers() for e in r.quarantine]
        for r in self._dataset_readers():
            r.quarantine = []
        return {"records": int(skip.sum()), "left": int((~skip).sum()), "entries": entries}

    # -- resume -------------------------------------------------------------------------------

    def state_after(self, consumed: Sequence[Sequence[int]], world_size: int) -> dict[str, Any]:
        """Stream state once ranks consumed ``consumed[rank][worker]`` batches of the current epoch."""
        plan = self.plan()
        remaining = self.epoch_remaining(plan)
        used = consumed_intervals(remaining, consumed, world_size, self.cfg.remainder, self.cfg.batch_size,
                                  self.cfg.rank_layout == "interleaved")
        left = subtract(remaining, used)
        epoch = self.epoch
        leftover = int(_interval_lengths(left).sum())
        minimum = self.cfg.batch_size * world_size if self.cfg.rank_layout == "interleaved" else world_size
        if not left or (self.cfg.remainder == "drop" and leftover < minimum):
            epoch, left = epoch + 1, None  # epoch finished (what drop leaves over is not owed)
        return {"format": 1, "epoch": epoch, "seed": self.cfg.seed, "total": plan.total,
                "remaining": [list(x) for x in left] if left is not None else None,
                "datasets": list(self.cfg.datasets), "sizes": self.sizes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != 1:
            raise ValueError(f"stream state format {state.get('format')!r} is not supported")
        if state["sizes"] != self.sizes or state["seed"] != self.cfg.seed:
            raise ValueError(f"stream state was saved for datasets of sizes {state['sizes']} and seed "
                             f"{state['seed']}, not {self.sizes} and seed {self.cfg.seed}; resume with the same "
                             "datasets and seed")
        self.epoch = int(state["epoch"])
        self.remaining = [tuple(x) for x in state["remaining"]] if state["remaining"] is not None else None


META = ("id", "label", "track", "condition", "country", "dataset", "pad", "roi")  # roi spans 4 columns
_META_COLUMNS = 11


def _decode_or_blank(blob: bytes, size: int, skipped: bool) -> np.ndarray:
    """An encoded image at ``size``; a blank one for a row about to be skipped (its bytes are corrupt)."""
    if skipped:
        return np.zeros((size, size, 3), dtype=np.uint8)
    return images.resize(images.decode(blob), size)


def _meta_as_bytes(b: dict[str, Any]) -> dict[str, Any]:
    """A worker's batch with its metadata matrix as bytes, which travel inside the pickled batch: a
    second shared-memory tensor would cost a file-descriptor handshake per batch (about 0.3 ms of
    the worker's CPU, several percent of a batch of 256 crops)."""
    if isinstance(b.get("meta"), torch.Tensor):
        b["meta"] = b["meta"].numpy().tobytes()
    return b


def unpack_batch(b: dict[str, Any]) -> dict[str, Any]:
    """Name the columns of a worker's metadata matrix: ``id``, ``label``, ... (views, no copies)."""
    if "meta" not in b:
        return b
    m = b.pop("meta")
    if isinstance(m, bytes):
        m = torch.frombuffer(bytearray(m), dtype=torch.int64).view(-1, _META_COLUMNS)
    for c, k in enumerate(META[:6]):
        b[k] = m[:, c]
    b["pad"] = m[:, 6].bool()
    b["roi"] = m[:, 7:11]
    return b


class StreamLoader:
    """A DataLoader over a ShardStream that knows exactly what was consumed, for resume.

    Use ``for batch in loader`` once per epoch (``loader.set_epoch(e)`` first), and
    ``loader.state_dict()`` at any point; with several ranks, gather every rank's
    ``local_state()`` and pass the list to :meth:`global_state`.
    """

    def __init__(self, stream: ShardStream, *, num_workers: int = 2, pin_memory: bool | None = None,
                 prefetch_factor: int = 4, timeout: float = 0) -> None:
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self.timeout = timeout
        self._consumed = [0] * max(1, num_workers)
        self._epoch_of_counts = stream.epoch
        # What on_corrupt="skip" left out: one entry per corrupt block (or bad record), over the run.
        self.quarantine: list[dict[str, Any]] = []
        self.skipped_records = 0  # records left out, over the run (each epoch counts its own again)
        self._quarantined: set[tuple[Any, ...]] = set()

    def _dataloader(self) -> DataLoader:
        kw: dict[str, Any] = {}
        if self.num_workers > 0:
            kw = {"prefetch_factor": self.prefetch_factor, "multiprocessing_context": _mp_context()}
            self.stream.share_checks()
            if kernels is not None:
                kernels.warm()  # compiled here once, inherited by every worker forked from now on
        # Workers are re-created every epoch so each one sees the epoch and resume position the main
        # process set; the stream is cheap to fork.
        return DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=False, timeout=self.timeout, **kw)

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)
        self._reset_counts()

    def _reset_counts(self) -> None:
        self._consumed = [0] * max(1, self.num_workers)
        self._epoch_of_counts = self.stream.epoch

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._epoch_of_counts != self.stream.epoch:
            self._reset_counts()
        skipped = 0
        try:
            for b in self._dataloader():
                self._consumed[b["worker"]] += 1
                if "skipped" in b:
                    info = b.pop("skipped")
                    skipped += self._note_skipped(info)
                    if not info["left"]:  # every row corrupt: counted as consumed, nothing to yield
                        continue
                yield unpack_batch(b)
        except ShardError as exc:  # from a worker: torch wraps it in a traceback; keep the one line
            raise ShardError(worker_message(exc)) from None
        if skipped:
            self._report_skipped(skipped)
        # epoch finished: the next one starts from the full plan
        self.stream.remaining = None
        self.stream.epoch += 1
        self._reset_counts()

    def _note_skipped(self, info: dict[str, Any]) -> int:
        for e in info["entries"]:
            key = (e["dataset"], e["shard"], e.get("block"), e.get("record"))
            if key not in self._quarantined:  # each worker finds a block itself, every epoch
                self._quarantined.add(key)
                self.quarantine.append(e)
        self.skipped_records += info["records"]
        return int(info["records"])

    def _report_skipped(self, n: int) -> None:
        where = "; ".join(f"{e['dataset']} {e['shard']} " + (f"block {e['block']}" if "block" in e else
                                                            f"record {e['record']}") for e in self.quarantine[:4])
        more = f" and {len(self.quarantine) - 4} more" if len(self.quarantine) > 4 else ""
        fix = " / ".join(sorted({f"`signscale data verify {e['dataset']}`" for e in self.quarantine}))
        log.warning(f"epoch {self._epoch_of_counts}: skipped {n} record(s) in corrupt data (on_corrupt=skip): "
                    f"{where}{more}; run {fix} and re-pack")

    def local_state(self) -> list[int]:
        return list(self._consumed)

    def state_dict(self, all_local_states: list[list[int]] | None = None, world_size: int | None = None
                   ) -> dict[str, Any]:
        """Resume state; in a multi-rank run pass every rank's ``local_state()`` (rank order)."""
        states = all_local_states if all_local_states is not None else [self.local_state()]
        return self.stream.state_after(states, world_size or len(states))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
        self._reset_counts()


def worker_message(exc: BaseException) -> str:
    """The original message of an exception torch re-raised from a DataLoader worker (whose text is
    "Caught X in DataLoader worker process N. Original Traceback ... module.X: message")."""
    text = str(exc)
    if not text.startswith("Caught "):
        return text
    for name in (f"{type(exc).__module__}.{type(exc).__qualname__}: ", f"{type(exc).__qualname__}: "):
        k = text.rfind("\n" + name)
        if k >= 0:
            return text[k + 1 + len(name):].strip()
    return text


def _mp_context() -> str:
    import multiprocessing as mp

    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def open_stream(datasets: str | Sequence[str], *, num_workers: int = 2, rank: int | None = None,
                world_size: int | None = None, **cfg: Any) -> StreamLoader:
    """Convenience: ``open_stream("s3://bucket/gtsrb", batch_size=512)`` -> a StreamLoader."""
    urls = (datasets,) if isinstance(datasets, str) else tuple(datasets)
    stream = ShardStream(StreamConfig(datasets=urls, **cfg), rank=rank, world_size=world_size)
    return StreamLoader(stream, num_workers=num_workers)

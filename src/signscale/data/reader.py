"""Reading records of packed shards for the stream: whole-shard cache or ranged reads, each block
checked against its sum once per reader, records gathered in the plan's order."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import time
import uuid
from typing import Any, Sequence

import numpy as np

from signscale import storage
from signscale.data import shards
from signscale.data.manifest import Manifest
from signscale.data.shards import FIX, ShardError, ShardReader

Records = np.ndarray | dict[str, np.ndarray]  # a structured array, or its fields gathered one by one
_Block = tuple[np.ndarray, list[bytes] | None, np.ndarray | None]  # records, blobs, rows in corrupt blocks


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


class DatasetReader:
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

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

import logging
import mmap
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from signscale import images
from signscale.data.manifest import Manifest
from signscale.data.plan import (
    EpochPlan,
    Intervals,
    RankShare,
    StreamConfig,
    consumed_intervals,
    interval_lengths,
    plan_epoch,
    rank_share,
    subtract,
    virtual_to_global,
)
from signscale.data.reader import DatasetReader, ShardCache
from signscale.data.shards import ShardError
from signscale.data.world import World
from signscale.labels import LabelSpace

try:
    from signscale import kernels
except ImportError:  # no numba: the numpy and torch paths do the work
    kernels = None  # type: ignore[assignment]

log = logging.getLogger("signscale.data.stream")


# ---------------------------------------------------------------------------------------------
# The plan: pure functions of (config, dataset sizes, epoch)


# ---------------------------------------------------------------------------------------------
# Intervals: positions not yet consumed


# ---------------------------------------------------------------------------------------------
# Reading records


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
                             "to one size, or pack them at one --image-size")
        self.image_size = cfg.image_size or (next(iter(shapes))[0] if shapes else 0)
        if not self.image_size:
            raise ShardError("encoded datasets need image_size (the size to decode to)")
        self.sizes = [m.count for m in self.manifests]
        self._note_unchecked()
        self._rank, self._world = rank, world_size
        self.epoch = 0
        self.remaining: Intervals | None = None  # None: the whole epoch
        self._readers: list[DatasetReader] | None = None
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
        total = int(interval_lengths(self.epoch_remaining(plan)).sum())
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

    def _dataset_readers(self) -> list[DatasetReader]:
        if self._readers is None:
            cache = ShardCache(self.cfg.cache_dir, self.cfg.cache_bytes) if self.cfg.cache_dir else None
            self._readers = [DatasetReader(m, cache, block=self.cfg.block_size, on_corrupt=self.cfg.on_corrupt,
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
        total = int(interval_lengths(remaining).sum())
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
        leftover = int(interval_lengths(left).sum())
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

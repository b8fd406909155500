"""Scale: `bench scale` on tiny sizes, the augmentation rows of `bench io`, and the 50M-record plan
built from a real manifest of 10,000 shards (written without any shard data)."""

from __future__ import annotations

import io
import json
import tracemalloc

import numpy as np
import pytest
import torch
from rich.console import Console

from signscale.bench import io as bench
from signscale.bench import report
from signscale.bench.scale import (
    BenchScaleConfig,
    MemoryProbe,
    NoiseSource,
    bench_scale,
    noise_source_registered,
    parse_count,
    parse_sizes,
    ratio,
)
from signscale.config import ConfigError
from signscale.data import permutation, shards
from signscale.data.manifest import Manifest
from signscale.data.plan import rank_share
from signscale.data.sources import SOURCES, open_source
from signscale.data.stream import ShardStream, StreamConfig


def test_counts_parse_and_bad_ones_name_the_flag():
    assert parse_sizes("50k,500k,2m") == (50_000, 500_000, 2_000_000)
    assert parse_count("1.5M") == 1_500_000 and parse_count(" 300 ") == 300
    with pytest.raises(ConfigError, match="sizes.*50x"):
        parse_sizes("50x")
    with pytest.raises(ConfigError, match="sizes"):
        parse_sizes(",")
    with pytest.raises(ConfigError, match="workers"):
        BenchScaleConfig(workers=-1)


def test_noise_source_is_cheap_distinct_and_only_registered_while_used():
    src = NoiseSource(1000, size=8)
    a, b = src.read(3), src.read(3 + NoiseSource.TILES)  # same tile, different index
    assert a.image.shape == (8, 8, 3) and a.image.dtype == np.uint8
    assert not np.array_equal(a.image, b.image) and 0 <= a.label < 43
    assert "scale-noise" not in SOURCES
    with noise_source_registered() as kind:
        assert len(open_source(f"{kind}:?n=10&size=8")) == 10
    assert "scale-noise" not in SOURCES


def test_memory_probe_reads_this_process():
    b = MemoryProbe()({"batch": 0})
    _pid, peak_kib, private_kib = b["probe"]
    assert peak_kib > 10_000 and private_kib > 0  # a Python process with torch loaded


def test_bench_scale_side_by_side(tmp_path):
    out = io.StringIO()
    cfg = BenchScaleConfig(sizes=(1000, 4000), image_size=8, workers=1, batch_size=100, shard_mb=0.05,
                           workdir=str(tmp_path))
    rows = bench_scale(cfg, console=Console(file=out, width=200))
    small, large = rows
    assert (small.records, large.records) == (1000, 4000)
    assert large.shards > small.shards > 1
    for r in rows:
        assert r.pack_us_per_image > 0 and r.local.samples == r.records and r.remote.samples == r.records
        assert r.local.per_s > 0 and r.local.first_batch_s > 0
        assert r.local.worker_peak_rss_mib > 10 and r.local.worker_private_mib > 0
        assert r.remote.requests >= r.shards and r.remote.bytes >= r.dataset_mib * 2**20 * 0.9
    assert large.remote.requests > small.remote.requests  # counted for real: more records, more requests
    text = out.getvalue()
    assert "4k / 1k" in text and "pack us/image" in text and "storage requests/epoch" in text
    assert ratio([2.0, 3.0]) == 1.5 and ratio([None, 1.0]) is None
    assert (tmp_path / "n4000" / "manifest.json").exists()  # --workdir keeps the data


def test_bench_io_augmentation_rows_side_by_side(synthetic_dataset):
    pytest.importorskip("torchvision")
    cfg = bench.BenchIOConfig(image_size=16, workers=(0, 1), batch_size=50, max_seconds=30)
    rows = bench.augment_rows(synthetic_dataset, cfg)
    got = {(r.what, r.workers): r for r in rows}
    for what in (report.AUG_SAMPLE, report.AUG_BATCH):
        for w in (0, 1):
            r = got[(what, w)]
            assert not r.skipped and r.samples == 300 and r.samples_per_s > 0
    labels = {r.label for r in report.ratios(rows)}
    assert "augment per batch / per sample (local, 0 workers)" in labels
    assert "augment per batch / per sample (local, 1 worker)" in labels


def test_per_sample_augment_keeps_flip_rules(synthetic_dataset):
    pytest.importorskip("torchvision")
    ds = bench.PerSampleAugment(synthetic_dataset, 16)
    flip_map = ds.flip_map
    torch.manual_seed(0)
    for i in range(5):
        rec = ds[i]
        assert rec["image"].shape == (3, 16, 16) and rec["image"].dtype == torch.float32
    # a class that must never be mirrored keeps its label in every draw
    m = Manifest.load(synthetic_dataset)
    labels = np.concatenate([shards.ShardReader(m.shard_url(k)).records()["label"] for k in range(len(m.shards))])
    idx = [i for i, lab in enumerate(labels) if flip_map[lab] < 0][:10]
    assert idx and all(ds[i]["label"] == labels[i] for i in idx for _ in range(3))


def _manifest_without_data(root, n: int, n_shards: int) -> str:
    """A real manifest of ``n`` records in ``n_shards`` shards whose files do not exist: planning must
    need nothing but the manifest."""
    from signscale.labels import LabelSpace

    counts = np.full(n_shards, n // n_shards, dtype=np.int64)
    counts[: n - int(counts.sum())] += 1
    dt = shards.record_dtype("raw", (32, 32, 3))
    manifest = {
        "format": "signscale.dataset", "format_version": shards.MANIFEST_FORMAT, "name": "planning-50m",
        "version": 1, "encoding": "raw", "image_shape": [32, 32, 3], "record_dtype": shards.dtype_to_json(dt),
        "label_space": LabelSpace.for_country("de").to_dict(), "conditions": ["clear"], "countries": ["de"],
        "sources": ["none"], "records_per_chunk": int(counts[0]),
        "shards": [{"path": f"shards/shard-{i:05d}.sgs", "sha256": "0" * 64, "bytes": int(c) * dt.itemsize,
                    "count": int(c), "class_histogram": [0] * 43} for i, c in enumerate(counts)],
        "totals": {"count": n, "shards": n_shards, "bytes": n * dt.itemsize, "classes": 43},
        "quarantine": {"count": 0, "by_reason": {}, "file": "quarantine.jsonl"},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


@pytest.mark.slow
def test_planning_50m_records_in_10k_shards_for_64_ranks_x_8_workers(tmp_path):
    """The epoch plan of a 50M-record, 10,000-shard manifest: fast, a few MB, every record exactly once."""
    n, n_shards, ranks, workers, bs = 50_000_000, 10_000, 64, 8, 256
    url = _manifest_without_data(tmp_path, n, n_shards)
    stream = ShardStream(StreamConfig(datasets=(url,), batch_size=bs), rank=17, world_size=ranks)
    assert stream.sizes == [n] and len(stream.manifests[0].shards) == n_shards

    # what one worker does at the start of an epoch: plan, take its rank's share, locate its first batch;
    # the shuffle kernel is compiled before the workers fork (as the loader does), not measured here
    if permutation.kernels is not None:
        permutation.kernels.warm()
    tracemalloc.start()
    plan = stream.plan(epoch=3)
    remaining = stream.epoch_remaining(plan)
    share = rank_share(plan.total, 17, ranks, "drop", bs, workers)
    j = next(iter(share.worker_batches(5)))
    virtual, _ = share.batch_positions(j)
    ds, rec = plan.lookup(virtual)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # what the worker keeps (the plan: ~195k segments) and the transient peak while building it
    assert held < 8 * 2**20, f"a worker's epoch plan holds {held / 2**20:.1f} MiB"
    assert peak < 32 * 2**20, f"planning a worker's epoch peaked at {peak / 2**20:.1f} MiB"
    assert remaining == [(0, n)] and len(rec) == bs and (ds == 0).all()

    # equal counts per rank, contiguous and disjoint, covering all but the < 64 dropped positions
    shares = [rank_share(plan.total, r, ranks, "drop", bs, workers) for r in range(ranks)]
    assert len({s.count for s in shares}) == 1
    assert [s.start for s in shares] == [r * shares[0].count for r in range(ranks)]
    covered = ranks * shares[0].count
    assert 0 <= n - covered < ranks
    # workers split each rank's batches exactly
    assert sorted(b for w in range(workers) for b in shares[0].worker_batches(w)) == list(range(shares[0].num_batches))

    # every record exactly once: map every position of the epoch to its record (in chunks) into a bitmap
    seen = np.zeros(n, dtype=bool)
    chunk = 5_000_000
    for lo in range(0, n, chunk):
        _, recs = plan.lookup(np.arange(lo, min(n, lo + chunk), dtype=np.int64))
        assert not seen[recs].any(), "a record appears twice in the epoch"
        seen[recs] = True
    assert seen.all()

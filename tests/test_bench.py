"""Smoke test of `bench io`: every row is produced and the ratios come out. Timings are not checked:
benchmarks are commands, not tests (DESIGN.md, habit 12)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from signscale.bench import io as bench
from signscale.bench import report
from signscale.bench.io import BenchIOConfig, bench_io
from signscale.bench.report import ratios, summary
from signscale.config import ConfigError

# modules these tests exercise through the ones they import (tests/test_layout.py)
COVERS = ("signscale.bench.readers",)


def test_bench_io_smoke(tmp_path):
    out = io.StringIO()
    cfg = BenchIOConfig(source="synthetic:?n=200&size=16&seed=3", image_size=16, workers=(0, 1), limit=120,
                        no_s3=True, batch_size=32, workdir=str(tmp_path / "work"), litdata=False)
    rows = bench_io(cfg, console=Console(file=out, width=200))

    measured = {(r.what, r.where, r.workers) for r in rows if not r.skipped}
    for what in (report.PLAIN, report.RAW, report.ENCODED, report.LOADER, report.LOADER_SEQ, report.LOADER_UNCHECKED,
                 report.LOADER_SEQ_UNCHECKED, report.LOADER_AGAIN, report.LOADER_AGAIN_UNCHECKED, report.AUG_SAMPLE,
                 report.AUG_BATCH, report.AUG_TORCH):
        for w in (0, 1):
            assert (what, "local", w) in measured, (what, w)
    assert {report.PACK_RAW, report.PACK_ENCODED} <= {r.what for r in rows if r.kind == "pack"}
    for r in rows:
        if r.kind == "read" and not r.skipped:
            assert r.samples == 120 and r.samples_per_s > 0 and r.first_batch_s is not None
    assert any(r.skipped and "--no-s3" in r.note for r in rows)

    labels = {r.label for r in ratios(rows)}
    assert "raw shards / plain files (local, 1 worker)" in labels
    assert "loader / raw shards direct (local, 0 workers)" in labels
    assert {"loader, block sums checked / off (local, 1 worker)",  # the cost of integrity on read (#19)
            "loader, block sums checked / off, per CPU-second (local, 0 workers)"} <= labels
    assert "augment per batch, compiled kernel / torch ops (local, 1 worker)" in labels
    assert "per worker CPU-second" in next(r.note for r in rows if (r.what, r.workers) == (report.AUG_BATCH, 1))
    assert all(r.value > 0 for r in ratios(rows))
    text = out.getvalue()
    assert "ratios" in text
    assert summary(rows).startswith("raw shards read") and summary(rows) in text
    assert (tmp_path / "work" / "plain" / "list.jsonl").exists()  # --workdir is kept


def test_bench_io_config_names_the_flag():
    with pytest.raises(ConfigError, match="workers"):
        bench.parse_workers("0,two")
    with pytest.raises(ConfigError, match="batch_size"):
        BenchIOConfig(batch_size=0)

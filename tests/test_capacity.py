"""The capacity model: its layout arithmetic matches pack() exactly, its components answer to the
rates, a user's rates file overrides the packaged one, and `check` compares with real runs."""

from __future__ import annotations

import json

import pytest

from signscale.bench.capacity import (
    CheckConfig,
    PlanConfig,
    allreduce_step_seconds,
    check,
    default_rates,
    load_rates,
    plan,
    plan_rows,
    rate,
    shard_layout,
)
from signscale.bench.scale import NOISE_KIND, noise_source_registered
from signscale.cli import main
from signscale.config import ConfigError
from signscale.data.pack import PackConfig, pack


def _entries(node, path=()):
    if isinstance(node, dict) and "value" in node:
        yield path, node
    elif isinstance(node, dict):
        for k, v in node.items():
            if not k.startswith("_"):
                yield from _entries(v, (*path, k))


def test_every_packaged_rate_says_what_it_is_and_how_it_was_obtained():
    entries = list(_entries(default_rates()))
    assert len(entries) > 15
    for path, e in entries:
        assert float(e["value"]) > 0, path
        assert e["unit"] and e["how"].split(":")[0] in ("measured", "assumed"), path


def test_layout_prediction_equals_what_pack_writes(tmp_path):
    with noise_source_registered():
        res = pack(
            PackConfig(
                source=f"{NOISE_KIND}:?n=2500&size=8",
                out=str(tmp_path / "d"),
                image_size=8,
                shard_mb=0.1,
                workers=0,
                progress=False,
            )
        )
    record, per_shard, n_shards, total = shard_layout(2500, 8, 0.1)
    assert (n_shards, total) == (res.shards, res.bytes)
    assert record * per_shard <= 0.1 * 2**20 < record * (per_shard + 1)


def test_plan_50m_on_64_gpus():
    p = plan(PlanConfig(images=50_000_000, gpus=64, model="msnet", precision="bf16"))
    assert p.cfg.nodes == 8 and p.shards == -(-50_000_000 // p.records_per_shard)
    assert 150e9 < p.storage_bytes < 160e9  # 3,104-byte records (32x32x3 + 32 bytes of metadata)
    assert set(p.components) == {"storage", "CPU loading", "GPU compute", "all-reduce"}
    assert p.epoch_seconds == max(p.components.values()) and p.bottleneck in p.components
    gpu = rate(default_rates(), "train_samples_per_s", "h100", "msnet", "bf16")
    assert p.components["GPU compute"] == pytest.approx(50_000_000 / (64 * gpu))
    text = " ".join(v for _, v in plan_rows(p))
    assert "bottleneck" in text and f"{p.shards:,}" in text
    # ranged GETs one after another, every block fetched by each of 8 workers: latency-bound loading
    assert p.bottleneck == "CPU loading" and any("latency-bound" in n for n in p.notes)
    cached = plan(PlanConfig(images=50_000_000, gpus=64, model="msnet", precision="bf16", source="cache"))
    assert cached.workers_needed * cached.worker_rate >= gpu  # enough loader workers that the GPU never waits
    assert cached.bottleneck == "GPU compute" and cached.read_bytes_per_epoch == cached.storage_bytes


def test_the_bottleneck_follows_the_rates(tmp_path):
    slow_store = tmp_path / "slow.yaml"
    slow_store.write_text("storage_node_GBps: {value: 0.01, unit: GB/s, how: 'assumed: a slow NAS'}\n")
    assert plan(PlanConfig(rates=str(slow_store))).bottleneck == "storage"
    # augmentation in 1 CPU worker per GPU from a local cache: the compiled kernel's rate (55.9k per
    # worker) feeds an H100's assumed 45k msnet samples/s, the torch ops' 29.3k did not
    one = PlanConfig(augment_on="cpu", workers_per_gpu=1, source="cache")
    assert plan(one).bottleneck == "GPU compute"
    torch_ops = tmp_path / "torch_ops.yaml"
    torch_ops.write_text("loader_aug_per_worker: {value: 29306, unit: samples/s, how: 'measured: torch ops'}\n")
    assert plan(PlanConfig(augment_on="cpu", workers_per_gpu=1, source="cache", rates=str(torch_ops))
                ).bottleneck == "CPU loading"
    # a big model on many nodes with a thin network: the all-reduce dominates
    thin = tmp_path / "thin.json"
    thin.write_text(json.dumps({"allreduce_inter_node_GBps": {"value": 0.05, "unit": "GB/s", "how": "assumed"}}))
    assert plan(PlanConfig(model="resnet18_small", rates=str(thin))).bottleneck == "all-reduce"
    assert allreduce_step_seconds(10**6, 1, 8, default_rates()) == 0.0  # one GPU: nothing to reduce
    one, many = (allreduce_step_seconds(10**6, g, 8, default_rates()) for g in (8, 64))
    assert many > one  # across nodes: the slower link


def test_user_rates_files_are_checked(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json.*JSON"):
        load_rates(str(bad))
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"storage_node_gbps": {"value": 1}}))
    with pytest.raises(ConfigError, match="unknown entries.*storage_node_gbps"):
        load_rates(str(unknown))
    with pytest.raises(ConfigError, match="does not exist"):
        load_rates(str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="train_samples_per_s.h100.nonet"):
        plan(PlanConfig(model="nonet"))
    merged = load_rates(str(_write(tmp_path / "over.json", {"train_samples_per_s": {"h100": {"msnet": {"bf16": {
        "value": 123, "unit": "samples/s", "how": "measured: bench train on my H100"}}}}})))
    assert rate(merged, "train_samples_per_s", "h100", "msnet", "bf16") == 123
    assert rate(merged, "train_samples_per_s", "h100", "msnet", "fp32") > 0  # the rest of the table is kept


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_plan_cli(capsys):
    assert main(["plan", "--images", "50m", "--gpus", "64", "--model", "msnet", "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "50,000,000 images on 64 GPU(s)" in out and "bottleneck" in out
    assert main(["plan", "--images", "fifty"]) == 2
    assert "images" in capsys.readouterr().out


def test_check_compares_predictions_with_runs_here(tmp_path):
    saved = tmp_path / "measured.json"
    rows = check(CheckConfig(images=3000, train_steps=2, workers=0, save_rates=str(saved)), say=lambda m: None)
    by = {r.what.split(",")[0]: r for r in rows}
    assert by["storage bytes"].error == 0 and by["shards"].error == 0  # layout arithmetic is exact
    assert by["storage requests per epoch"].measured > 0
    assert all(r.measured > 0 and r.predicted > 0 for r in rows)
    assert any(r.what.startswith("train samples/s") for r in rows)
    measured = load_rates(str(saved))  # a --save-rates file is a valid --rates file
    assert rate(measured, "pack_cheap_per_core") == pytest.approx(3000 / by["pack CPU time (cheap source)"].measured)
    assert rate(measured, "loader_aug_per_worker") == pytest.approx(3000 / by["loader CPU time"].measured)


def test_ranged_read_model_counts_workers_and_header_misses():
    from signscale.bench.capacity import ranged_reads, window_sharing

    rates = default_rates()
    assert window_sharing(0, 256) == 1 and window_sharing(2, 256) == 2 and window_sharing(16, 256) == 8
    one, _ = ranged_reads(256_000, 10**9, 10, 1, 256, rates)  # 10 shards: all stay open, no header re-reads
    assert one == pytest.approx(1000 * rate(rates, "requests_per_block"))
    many, _ = ranged_reads(256_000, 10**9, 160, 1, 256, rates)  # 160 shards: 90% of blocks reopen a shard
    assert many == pytest.approx(1000 * (rate(rates, "requests_per_block") + 0.9))
    two, b2 = ranged_reads(256_000, 10**9, 10, 2, 256, rates)
    assert two == pytest.approx(2 * one) and b2 == pytest.approx(2 * 10**9 * rate(rates, "read_amplification"))

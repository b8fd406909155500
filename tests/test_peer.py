"""`bench train --vs-peer`: the plain PyTorch peer trains and is scored every epoch, and the race
reports what the curves say: the first evaluation at or above the target, 'not reached' where none
is, and the ratio of the two measured times. No timing is asserted (benchmarks are commands)."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from signscale.bench.peer import PeerCNN, PeerConfig, train_peer
from signscale.bench.train import (
    PEER,
    RECIPE,
    BenchTrainConfig,
    bench_train,
    race_row,
    race_summary,
    seconds_to,
    time_ratio,
)
from signscale.config import ConfigError
from signscale.training.train import TrainConfig, train


def _curve(*points):
    return [{"epoch": e, "step": 10 * e, "seconds": s, "val_acc": a} for e, s, a in points]


def test_the_first_evaluation_at_the_target_counts_and_the_ratio_is_of_the_two_times():
    peer = race_row(PEER, _curve((1, 40.0, 0.95), (2, 80.0, 0.99), (3, 120.0, 0.995)), 0.99)
    ours = race_row(RECIPE, _curve((1, 12.5, 0.97), (2, 20.0, 0.993)), 0.99)
    assert (peer["seconds_to_target"], peer["epoch_at_target"]) == (80.0, 2)  # exactly at the target counts
    assert (ours["seconds_to_target"], ours["epoch_at_target"]) == (20.0, 2)
    assert time_ratio([peer, ours]) == pytest.approx(20.0 / 80.0)
    line = race_summary([peer, ours], 0.99)
    assert "plain PyTorch peer 80 s (epoch 2)" in line and "signscale recipe 20 s (epoch 2)" in line
    assert "0.25x the peer's time (4.0x faster)" in line
    slower = race_row(RECIPE, _curve((1, 100.0, 0.99)), 0.99)
    assert "1.25x the peer's time (1.2x slower)" in race_summary([peer, slower], 0.99)


def test_a_target_never_reached_is_said_and_gives_no_ratio():
    peer = race_row(PEER, _curve((1, 40.0, 0.95), (2, 80.0, 0.989)), 0.99)
    ours = race_row(RECIPE, _curve((1, 10.0, 0.991)), 0.99)
    assert seconds_to(peer["curve"], 0.99) is None and peer["seconds_to_target"] is None
    assert peer["best_val_acc"] == 0.989 and peer["seconds_run"] == 80.0
    assert time_ratio([peer, ours]) is None
    line = race_summary([peer, ours], 0.99)
    assert "plain PyTorch peer not reached in 80 s / 2 epochs (best 98.90%)" in line and "no ratio" in line


def test_peer_is_a_five_conv_batchnorm_cnn_and_stops_at_its_target():
    convs = [m for m in PeerCNN(43).modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5 and sum(isinstance(m, torch.nn.BatchNorm2d) for m in PeerCNN(43).modules()) == 5
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (96, 3, 16, 16), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 3, (96,), generator=g)
    seen = []
    full = train_peer(x[:64], y[:64], x[64:], y[64:], PeerConfig(epochs=3, batch_size=16, workers=0, threads=1),
                      num_classes=3, on_eval=seen.append)
    assert [p["epoch"] for p in full.curve] == [1, 2, 3] and seen == full.curve
    assert [p["step"] for p in full.curve] == [4, 8, 12]
    assert all(a["seconds"] < b["seconds"] for a, b in zip(full.curve, full.curve[1:]))
    stopped = train_peer(x[:64], y[:64], x[64:], y[64:], PeerConfig(epochs=3, batch_size=16, workers=0, threads=1),
                         num_classes=3, stop_at=0.0)  # any accuracy reaches 0: one epoch, then stop
    assert len(stopped.curve) == 1 and stopped.steps == 4


def test_train_stops_when_on_validation_asks(synthetic_dataset, tmp_path):
    points = []
    res = train(TrainConfig(data=(synthetic_dataset,), val=synthetic_dataset, out=str(tmp_path / "run"),
                            model="small_cnn", epochs=3, batch_size=32, workers=0, progress=False, calibrate=False),
                on_validation=lambda p: points.append(p) or True)
    assert len(points) == 1 and res.curve == points and res.epochs == 1
    assert res.model_url  # a stopped run ends as a finished one: the model is written


@pytest.mark.slow
def test_vs_peer_reports_what_both_curves_say(tmp_path):
    out = io.StringIO()
    cfg = BenchTrainConfig(vs_peer=True, synthetic_n=256, epochs=2, peer_epochs=2, model="small_cnn",
                           precision="fp32", batch_size=64, workers=0, threads=1, target=0.99, stop_at_target=False)
    rows = bench_train(cfg, console=Console(file=out, width=250))
    assert [r["recipe"] for r in rows] == [PEER, RECIPE]
    for r in rows:
        assert r["evaluations"] == 2 and len(r["curve"]) == 2
        hit = seconds_to(r["curve"], 0.99)  # whatever the tiny run learnt, the row says the same as its curve
        assert r["seconds_to_target"] == (hit["seconds"] if hit else None)
        assert r["best_val_acc"] == max(p["val_acc"] for p in r["curve"])
    text = out.getvalue()
    assert race_summary(rows, 0.99) in text and "threads 1, loader workers 0" in text
    assert ("not reached" in text) == any(r["seconds_to_target"] is None for r in rows)


def test_vs_peer_config_names_the_flag():
    with pytest.raises(ConfigError, match="data and val"):
        BenchTrainConfig(vs_peer=True, data="packed/train")
    with pytest.raises(ConfigError, match="target"):
        BenchTrainConfig(vs_peer=True, target=99.0)

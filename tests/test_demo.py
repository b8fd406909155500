import os

from signscale.demo import DemoConfig, run_demo


def test_demo_runs_end_to_end_small(tmp_path):
    res = run_demo(DemoConfig(out=str(tmp_path / "demo"), samples=300, val_samples=100, epochs=1, size=16))
    assert res.samples == 300 and 0.0 <= res.val_acc <= 1.0
    for name in ("contact sheet", "class histogram", "loader sample", "model", "evaluation report"):
        assert os.path.exists(res.files[name]), name
    assert "validation accuracy" in res.summary()

import os

from signscale.demo import DemoConfig, run_demo


def test_demo_runs_end_to_end_small(tmp_path):
    res = run_demo(DemoConfig(out=str(tmp_path / "demo"), samples=300, val_samples=100, epochs=1, size=16,
                              detection=False))  # the detection leg is tested below, alone
    assert res.samples == 300 and 0.0 <= res.val_acc <= 1.0
    for name in ("contact sheet", "class histogram", "loader sample", "model", "evaluation report"):
        assert os.path.exists(res.files[name]), name
    assert "validation accuracy" in res.summary()


def test_demo_detection_leg_writes_annotated_scenes(tmp_path):
    from signscale.detect_eval import demo_detection

    det = demo_detection(str(tmp_path / "det"), train_scenes=8, test_scenes=3, steps=2)
    assert os.path.exists(det["files"]["detection report"]) and os.path.isdir(det["files"]["detection overlays"])
    assert "mAP" in det["summary"] and 0.0 <= det["metrics"]["map_50"] <= 1.0

import os

import pytest

from signscale.demos.first_run import DemoConfig, run_demo


def test_demo_runs_end_to_end_small(tmp_path):
    res = run_demo(DemoConfig(out=str(tmp_path / "demo"), samples=300, val_samples=100, epochs=1, image_size=16,
                              detection=False))  # the detection leg is tested below, alone
    assert res.samples == 300 and 0.0 <= res.val_acc <= 1.0
    for name in ("contact sheet", "class histogram", "loader sample", "model", "evaluation report"):
        assert os.path.exists(res.files[name]), name
    assert "validation accuracy" in res.summary()


def test_demo_detection_leg_writes_annotated_scenes(tmp_path):
    from signscale.demos.detection import demo_detection

    det = demo_detection(str(tmp_path / "det"), train_scenes=8, test_scenes=3, steps=2)
    assert os.path.exists(det["files"]["detection report"]) and os.path.isdir(det["files"]["detection overlays"])
    assert "mAP" in det["summary"] and 0.0 <= det["metrics"]["map_50"] <= 1.0


def test_demo_never_overwrites_an_output_folder(tmp_path):
    from signscale.demos.first_run import free_folder

    out = tmp_path / "signscale-demo"
    assert free_folder(str(out)) == str(out)
    out.mkdir()
    assert free_folder(str(out)) == f"{out}2"
    (tmp_path / "signscale-demo2").mkdir()
    assert free_folder(str(out) + "/") == f"{out}3"


@pytest.mark.slow
def test_demo_cli_prints_a_heading_and_result_per_leg_into_a_fresh_folder(tmp_path):
    """As a user runs it: an existing signscale-demo/ is left alone, each leg says what it does and how it went."""
    import subprocess
    import sys

    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    (tmp_path / "signscale-demo").mkdir()
    (tmp_path / "signscale-demo" / "keep.txt").write_text("mine")
    r = subprocess.run([sys.executable, "-m", "signscale", "demo", "--samples", "200", "--val-samples=50",
                        "--epochs", "1", "--image-size", "16", "--no-detection"], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": src}, timeout=900, check=False)
    assert r.returncode == 0, (r.stdout, r.stderr)
    out = r.stdout
    assert "signscale-demo exists: writing to signscale-demo2" in out
    assert (tmp_path / "signscale-demo" / "keep.txt").read_text() == "mine"
    assert (tmp_path / "signscale-demo2" / "report" / "report.html").exists()
    first, second = out.index("== 1/2 data"), out.index("== 2/2 classifier")
    assert first < out.index("packed 200 samples") < second < out.index("classifier: validation accuracy")
    assert "next: signscale serve signscale-demo2/run/model" in out

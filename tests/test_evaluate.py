"""evaluate(): metric arithmetic by hand, packed data vs source, 2 real processes, deterministic
corruptions, the compare() gate, skipped entries of the official test layout, and the report in a browser.

Data and models are tiny and generated here: a randomly initialised ``small_cnn`` at 16 px and the
synthetic source; what is tested is bookkeeping, not accuracy.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from signscale.config import ConfigError
from signscale.data.datasets import read_records
from signscale.data.manifest import Manifest
from signscale.data.pack import PackConfig, pack
from signscale.evaluation.compare import CompareError, compare
from signscale.evaluation.evaluate import (
    EvalConfig,
    EvalError,
    evaluate,
    label_map,
    read_model,
    score_predictions,
)
from signscale.evaluation.metrics import confusion_matrix, expected_calibration_error, per_class, reliability_sums
from signscale.evaluation.report_html import render_html
from signscale.evaluation.robustness import BRIGHTNESS_BINS, brightness_bins, corrupt_batch
from signscale.labels import LabelSpace
from signscale.models import create_model, model_config
from signscale.training import checkpoint
from signscale.transforms import Preprocess

# modules these tests exercise through the ones they import (tests/test_layout.py)
COVERS = ("signscale.evaluation.tally", "signscale.evaluation.report_charts", "signscale.evaluation.metrics_json")

SCRIPT = str(Path(__file__).parent / "scripts" / "eval_worker.py")
SYNTHETIC = "synthetic:?n=120&size=16"
ODD = "synthetic:?n=75&size=16&seed=3"  # odd, so 2 ranks need one pad row


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = create_model("small_cnn", 43, widths=[8, 16, 16])
    url = str(tmp_path_factory.mktemp("model") / "model")
    checkpoint.save_model(
        url,
        state_dict=model.state_dict(),
        model_config=model_config(model),
        label_space=LabelSpace.for_country("de").to_dict(),
        preprocess=Preprocess(image_size=16).to_dict(),
    )
    return url


def _pack(tmp_path_factory, spec: str) -> str:
    out = str(tmp_path_factory.mktemp("ds") / "data")
    pack(PackConfig(source=spec, out=out, image_size=16, shard_mb=0.1, workers=0, progress=False))
    return out


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> str:
    return _pack(tmp_path_factory, SYNTHETIC)


@pytest.fixture(scope="module")
def packed_odd(tmp_path_factory) -> str:
    return _pack(tmp_path_factory, ODD)


def _cfg(model: str, data: str, **kw) -> EvalConfig:
    # one torch thread: with tiny batches, a second thread costs more than it gives on a busy machine
    return EvalConfig(model=model, data=data, workers=kw.pop("workers", 0), progress=False, threads=1, **kw)


def _close(a, b) -> None:
    """Equal structure and integers; floats equal to 1e-7 relative. A forward pass's last bits depend on
    the batch size (the CPU picks other kernels), so confidences differ there; counts may not differ."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _close(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y)
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-7, abs=1e-9)
    else:
        assert a == b


def _same_numbers(a: dict, b: dict) -> None:
    """Every number that describes the predictions (not timing, config or where the data came from)."""
    assert a["confusion"] == b["confusion"]
    _close(a["overall"], b["overall"])
    _close(a["classes"], b["classes"])
    _close(a["calibration"], b["calibration"])
    assert a["conditions"] == b["conditions"] and a["countries"] == b["countries"]
    assert [(c["true"], c["predicted"], c["count"], c["examples"]) for c in a["top_confusions"]] == \
           [(c["true"], c["predicted"], c["count"], c["examples"]) for c in b["top_confusions"]]
    assert a["skipped"]["total"] == b["skipped"]["total"]
    ra, rb = a["robustness"], b["robustness"]
    assert (ra is None) == (rb is None)
    if ra:
        assert ra["results"] == rb["results"] and ra["mca"] == rb["mca"]


# --------------------------------------------------------------------------------------------- (a) metric arithmetic

# 3 classes, 6 samples; no confidence sits on a bin edge (multiples of 1/15)
LABELS = np.array([0, 0, 0, 1, 1, 2])
PROBS = np.array([
    [0.90, 0.05, 0.05],  # true 0, pred 0, conf .90 (bin 13) right
    [0.62, 0.28, 0.10],  # true 0, pred 0, conf .62 (bin 9)  right
    [0.20, 0.70, 0.10],  # true 0, pred 1, conf .70 (bin 10) wrong
    [0.07, 0.83, 0.10],  # true 1, pred 1, conf .83 (bin 12) right
    [0.30, 0.25, 0.45],  # true 1, pred 2, conf .45 (bin 6)  wrong
    [0.55, 0.10, 0.35],  # true 2, pred 0, conf .55 (bin 8)  wrong
])


def test_metrics_equal_a_hand_computed_confusion_matrix() -> None:
    m = score_predictions(LABELS, PROBS)
    assert m["confusion"].tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 0]]
    assert m["count"] == 6 and m["correct"] == 3
    assert m["top1"] == pytest.approx(3 / 6)
    assert m["top5"] == 1.0  # with 3 classes the top 5 hold every label
    assert m["precision"] == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert m["recall"] == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert m["f1"] == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    # every sample alone in its bin: ECE = mean |correct - confidence|
    assert m["ece"] == pytest.approx((0.10 + 0.38 + 0.70 + 0.17 + 0.45 + 0.55) / 6)
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.90, 0.62, 0.20, 0.83, 0.25, 0.35])))
    assert m["mean_confidence"] == pytest.approx(np.mean([0.90, 0.62, 0.70, 0.83, 0.45, 0.55]))


def test_metric_helpers_on_edge_cases() -> None:
    # two samples in one bin: |accuracy 0.5 - mean confidence 0.905|
    sums = reliability_sums(np.array([0.90, 0.91]), np.array([1, 0]))
    assert sums[13].tolist() == pytest.approx([2, 1.81, 1]) and sums.sum(0)[0] == 2
    assert expected_calibration_error(sums) == pytest.approx(0.405)
    assert math.isnan(expected_calibration_error(np.zeros((15, 3))))
    assert reliability_sums(np.array([1.0, 1e-9]), np.array([1, 1]))[[14, 0], 0].tolist() == [1, 1]
    # a class never predicted has no precision; a class without samples has no recall or F1
    pc = per_class(confusion_matrix(np.array([0, 0, 1]), np.array([0, 1, 1]), 3))
    assert pc["support"].tolist() == [2, 1, 0] and pc["predicted"].tolist() == [1, 2, 0]
    assert pc["precision"][:2] == pytest.approx([1.0, 0.5]) and math.isnan(pc["precision"][2])
    assert math.isnan(pc["recall"][2]) and math.isnan(pc["f1"][2])
    # top-5 misses a label ranked sixth
    probs = np.array([[0.3, 0.2, 0.15, 0.14, 0.12, 0.05, 0.04]])
    assert score_predictions(np.array([5]), probs)["top5"] == 0.0
    assert score_predictions(np.array([4]), probs)["top5"] == 1.0


def test_label_spaces_map_by_key_and_refuse_when_nothing_maps() -> None:
    de = LabelSpace.for_country("de")
    lut, how = label_map(de, de)
    assert how == "identity" and lut.tolist() == list(range(43))
    sub = LabelSpace(classes=(de[14], de[1], de[2]), name="three")  # stop, 30, 50 in another order
    lut, how = label_map(sub, de)
    assert how == "by_country_id" and lut.tolist() == [14, 1, 2]
    cn = LabelSpace.for_country("cn")
    lut, how = label_map(cn, de)  # another country's designs: scored over the meanings both catalogues share
    assert how == "by_key" and lut[cn.index("speed_limit_60")] == 3 and lut[cn.index("yield")] == 13
    assert lut[cn.index("no_honking")] == -1
    lut, _ = label_map(de, sub)
    assert lut[14] == 0 and lut[1] == 1 and (lut == -1).sum() == 40
    other = LabelSpace(classes=(de[0],), name="x")
    nothing = LabelSpace(classes=tuple(c for c in de.classes if c.key != "speed_limit_20"), name="y")
    with pytest.raises(EvalError, match="nothing to evaluate"):
        label_map(other, nothing)


def test_config_errors_name_the_flag(model_dir: str) -> None:
    with pytest.raises(ConfigError, match="corruptions: unknown kind 'hail'"):
        EvalConfig(model=model_dir, corruptions=("hail",))
    with pytest.raises(ConfigError, match="severities"):
        EvalConfig(model=model_dir, corruptions=("fog",), severities=(6,))
    assert EvalConfig(model=model_dir, corruptions=("all",), severities=(5, 1)).pairs()[:2] == [("snow", 1),
                                                                                               ("snow", 5)]
    assert EvalConfig(model=model_dir, data="gtsrb-test:/x.zip").data_is_source()
    assert not EvalConfig(model=model_dir, data="s3://bucket/gtsrb-test").data_is_source()


def test_a_model_read_for_another_url_is_refused(model_dir: str, packed: str, tmp_path: Path) -> None:
    other = str(tmp_path / "other")
    shutil.copytree(model_dir, other)  # the same weights: only the report's model URL would be wrong
    with pytest.raises(EvalError, match=r"other: the loaded model given is .*model; pass the one read from .*other"):
        evaluate(_cfg(other, packed), loaded=read_model(model_dir))


# --------------------------------------------------------------------------------------------- (b) end to end


def test_report_files_and_source_equals_packed(model_dir: str, packed: str, tmp_path: Path) -> None:
    out = tmp_path / "report"
    rep = evaluate(_cfg(model_dir, packed, out=str(out), corruptions=("fog", "noise"), batch_size=32, workers=2,
                        examples=6))
    for name in ("metrics.json", "report.html", "confusion.png", "per_class.png", "confusions.png",
                 "reliability.png", "risk_coverage.png", "robustness.png"):
        assert (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        with Image.open(png) as im:
            assert im.format == "PNG" and min(im.size) > 200
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(rep.to_json())
    assert metrics["format"] == "signscale.eval" and metrics["version"] == 1
    assert metrics["overall"]["count"] == 120 and metrics["data"]["kind"] == "dataset"
    assert sum(map(sum, metrics["confusion"]["matrix"])) == 120
    assert [r["corruption"] for r in metrics["robustness"]["results"]] == ["fog", "noise"]
    assert len(metrics["calibration"]["reliability"]) == 15
    assert len(rep.example_images) == len(metrics["top_confusions"]) > 0
    assert "top-1" in rep.summary() and "mCA" in rep.summary() and "0 skipped" in rep.summary()
    images = _data_uri_images((out / "report.html").read_text())
    assert len(images) == 6 and all(im.format == "PNG" for im in images)

    # the same samples read straight from the source, in more and smaller batches, score the same
    src = evaluate(_cfg(model_dir, SYNTHETIC, corruptions=("fog", "noise"), batch_size=50, examples=6)).metrics
    assert src["data"]["kind"] == "source" and rep.files["report"].endswith("report.html")
    _same_numbers(metrics, src)


def _data_uri_images(page: str) -> list[Image.Image]:
    """Every <img> of the page, decoded; fails unless each src is a non-empty base64 PNG data URI."""
    srcs = re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", page)
    out = []
    for src in srcs:
        assert src.startswith("data:image/png;base64,") and len(src) > 100, src[:60]
        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        im.load()
        out.append(im)
    return out


# --------------------------------------------------------------------------------------------- (c) two processes


@pytest.mark.slow
def test_two_processes_give_the_single_process_totals(model_dir: str, packed_odd: str, tmp_path: Path) -> None:
    overrides = [f"model={model_dir}", "batch_size=16", "workers=1", "corruptions=noise,blur", "severities=2,4",
                 "progress=false", "threads=1", "examples=3", f"out={tmp_path / 'rep'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", SCRIPT,
           str(tmp_path / "two.json"), packed_odd, ODD, "--", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    for i, data in enumerate((packed_odd, ODD)):
        one = evaluate(_cfg(model_dir, data, batch_size=64, corruptions=("noise", "blur"), severities=(2, 4),
                            examples=3)).metrics
        got = two[data]
        assert got["run"]["world_size"] == 2
        assert got["overall"]["count"] == 75  # the pad row is not scored
        _same_numbers(one, got)
        assert (tmp_path / "rep" / str(i) / "report.html").exists()  # written by rank 0


# --------------------------------------------------------------------------------------------- (d) corruptions


def test_a_samples_corruption_does_not_depend_on_its_batch() -> None:
    imgs = np.random.default_rng(0).integers(0, 256, (9, 16, 16, 3), dtype=np.uint8)
    ids = np.arange(100, 109)
    for kind in ("snow", "rain", "noise", "glare"):
        whole = corrupt_batch(imgs, ids, corruption=kind, severity=3, seed=7)
        parts = np.concatenate([corrupt_batch(imgs[a:b], ids[a:b], corruption=kind, severity=3, seed=7)
                                for a, b in ((0, 1), (1, 5), (5, 9))])
        assert np.array_equal(whole, parts), kind
        assert not np.array_equal(whole, imgs)
        # the sample id and the seed choose the noise; the neighbours do not
        shuffled = corrupt_batch(imgs[::-1], ids[::-1], corruption=kind, severity=3, seed=7)[::-1]
        assert np.array_equal(whole, shuffled), kind
        assert not np.array_equal(whole, corrupt_batch(imgs, ids, corruption=kind, severity=3, seed=8))


def test_robustness_report_is_deterministic_across_batch_sizes(model_dir: str, packed: str) -> None:
    a = evaluate(_cfg(model_dir, packed, corruptions=("snow", "rain"), severities=(1, 5), batch_size=7)).metrics
    b = evaluate(_cfg(model_dir, packed, corruptions=("snow", "rain"), severities=(1, 5), batch_size=128)).metrics
    _same_numbers(a, b)
    rob = a["robustness"]
    assert [(r["corruption"], r["severity"]) for r in rob["results"]] == [("snow", 1), ("snow", 5), ("rain", 1),
                                                                         ("rain", 5)]
    assert all(r["count"] == 120 for r in rob["results"])
    assert rob["mca"] == pytest.approx(np.mean([r["accuracy"] for r in rob["results"]]))


def test_brightness_bins_by_mean_luma() -> None:
    flat = np.array([0, 25, 26, 77, 128, 255], dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    # 25/255 = 0.098 and 26/255 = 0.102 sit either side of the first edge; 128/255 = 0.502 above the last
    assert brightness_bins(flat).tolist() == [0, 0, 1, 3, 4, 4]
    red = np.zeros((1, 4, 4, 3), np.uint8)
    red[..., 0] = 255
    assert brightness_bins(red).tolist() == [2]  # luma 0.299: red reads darker than its peak channel
    half = np.zeros((1, 4, 4, 3), np.uint8)
    half[:, :2] = 255  # half white, half black: the mean, 0.5, is what bins it
    assert brightness_bins(half).tolist() == [4]


def test_accuracy_by_brightness_adds_up_to_each_accuracy(model_dir: str, packed: str) -> None:
    m = evaluate(_cfg(model_dir, packed, corruptions=("night", "fog"), severities=(3,), batch_size=32)).metrics
    light = m["robustness"]["by_brightness"]
    images = read_records(Manifest.load(packed))["image"]
    assert light["count"] == np.bincount(brightness_bins(images), minlength=BRIGHTNESS_BINS).tolist()
    assert len(light["edges"]) == BRIGHTNESS_BINS + 1 and sum(light["count"]) == 120

    def correct(accuracies: list) -> int:
        return round(sum(n * a for n, a in zip(light["count"], accuracies) if n))

    assert correct(light["clean"]) == m["overall"]["correct"]
    for row, total in zip(light["results"], m["robustness"]["results"], strict=True):
        assert (row["corruption"], row["severity"]) == (total["corruption"], total["severity"])
        assert correct(row["accuracy"]) == total["correct"]
        assert all((a is None) == (n == 0) for a, n in zip(row["accuracy"], light["count"]))


# --------------------------------------------------------------------------------------------- (e) compare


@pytest.fixture(scope="module")
def reference(model_dir: str, packed: str) -> dict:
    return evaluate(_cfg(model_dir, packed, corruptions=("fog",))).metrics


def test_compare_equal_reports_are_not_worse(reference: dict, tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps(reference))
    c = compare(str(tmp_path), reference)  # a report folder or a dict
    assert not c.worse and not c.regressions
    assert {"top1", "macro_f1", "ece", "mca", "corruption:fog@3"} <= {d.metric for d in c.differences}
    assert any(d.metric.startswith("class:") for d in c.differences)
    assert c.lines()[-1].startswith("OK")


def test_compare_overall_drop_beyond_tolerance_is_worse(reference: dict) -> None:
    b = copy.deepcopy(reference)
    b["overall"]["top1"] = reference["overall"]["top1"] - 0.02
    c = compare(reference, b, tolerance=0.005)
    assert c.worse and [d.metric for d in c.regressions] == ["top1"]
    assert "WORSE" in c.lines()[-1] and "top1" in c.lines()[-1]
    assert not compare(reference, b, tolerance=0.03).worse
    b["overall"]["top1"] = reference["overall"]["top1"] - 0.005  # exactly the tolerance is not beyond it
    assert not compare(reference, b, tolerance=0.005).worse


def test_compare_catches_a_per_class_regression_hidden_in_the_average(reference: dict) -> None:
    a, b = copy.deepcopy(reference), copy.deepcopy(reference)
    key = max(reference["classes"], key=lambda c: c["support"])["key"]
    next(c for c in a["classes"] if c["key"] == key)["recall"] = 0.9
    next(c for c in b["classes"] if c["key"] == key)["recall"] = 0.7  # overall numbers unchanged
    c = compare(a, b)
    assert c.worse and [d.metric for d in c.regressions] == [f"class:{key}"]
    assert any(f"class:{key}" in line and "WORSE" in line for line in c.lines())
    assert not compare(b, a).worse  # an improvement is not a regression
    # with too few samples to gate, the same drop is reported but passes
    assert not compare(a, b, min_support=10_000).worse


def test_compare_non_gating_metrics_and_refusals(reference: dict) -> None:
    b = copy.deepcopy(reference)
    b["overall"]["ece"] = reference["overall"]["ece"] + 0.2  # calibration is reported, not gated
    b["robustness"]["results"][0]["accuracy"] = reference["robustness"]["results"][0]["accuracy"] + 0.1
    b["overall"]["error_at_99_coverage"] = (reference["overall"]["error_at_99_coverage"] or 0.0) + 0.05
    c = compare(reference, b)
    assert not c.worse
    assert any(d.metric == "ece" and d.regressed for d in c.differences)
    assert any(d.metric == "error_at_99_coverage" and d.regressed and not d.gates for d in c.differences)
    assert any(d.metric == "corruption:fog@3" and d.better for d in c.differences)
    other = copy.deepcopy(reference)
    other["data"]["id"] = "dataset:something-else"
    with pytest.raises(CompareError, match="different data"):
        compare(reference, other)
    assert not compare(reference, other, require_same_data=False).worse
    with pytest.raises(CompareError, match="not a signscale evaluation"):
        compare(reference, {"format": "other"})


# --------------------------------------------------------------------------------------------- skipped entries


def _ppm(seed: int, size: int = 24) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PPM")
    return buf.getvalue()


def test_gtsrb_test_layout_problems_are_counted_not_scored(model_dir: str, tmp_path: Path) -> None:
    images = tmp_path / "GTSRB" / "Final_Test" / "Images"
    images.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, label in enumerate([1, 14, 14, 38, 2]):
        (images / f"{i:05d}.ppm").write_bytes(_ppm(i))
        rows.append(f"{i:05d}.ppm;48;48;4;4;44;44;{label}")
    rows.append("00009.ppm;48;48;4;4;44;44;3")  # a CSV row without its image
    (images / "00007.ppm").write_bytes(_ppm(7))  # an image without a CSV row
    (images / "00004.ppm").write_bytes(_ppm(4)[:40])  # header intact, pixels cut off: undecodable
    (images / "GT-final_test.csv").write_text("\r\n".join(rows) + "\r\n")

    rep = evaluate(_cfg(model_dir, f"gtsrb-test:{tmp_path}", batch_size=3, workers=1))
    m = rep.metrics
    assert m["overall"]["count"] == 4  # 00000..00003; 00004 does not decode
    assert sum(c["support"] for c in m["classes"]) == 4
    assert m["skipped"]["total"] == 3
    assert m["skipped"]["by_reason"] == {"missing_file": 1, "no_label": 1, "truncated": 1}
    assert {s["key"] for s in m["skipped"]["examples"]} == {"00004.ppm", "00007.ppm", "00009.ppm"}
    assert m["data"]["entries"] == 7 and m["data"]["scored"] == 4
    assert "3 skipped" in rep.summary() and "no_label=1" in rep.summary()
    assert "missing_file" in render_html(m, {}) and "00009.ppm" in render_html(m, {})


def test_classes_the_model_lacks_are_skipped_by_name(tmp_path: Path, packed: str) -> None:
    de = LabelSpace.for_country("de")
    keep = [c for c in de.classes if c.category != "danger"]  # a model that knows no danger signs
    space = LabelSpace(classes=tuple(keep), name="no-danger")
    torch.manual_seed(1)
    model = create_model("small_cnn", len(space), widths=[8, 8, 8])
    url = str(tmp_path / "m")
    checkpoint.save_model(url, state_dict=model.state_dict(), model_config=model_config(model),
                          label_space=space.to_dict(), preprocess=Preprocess(image_size=16).to_dict())
    m = evaluate(_cfg(url, packed)).metrics
    missing = m["skipped"]["classes_not_in_model"]
    assert missing and all(de[de.index(k)].category == "danger" for k in missing)
    assert m["skipped"]["by_reason"]["label_not_in_model"] == sum(missing.values())
    assert m["overall"]["count"] + sum(missing.values()) == 120
    assert m["data"]["label_mapping"] == "by_key" and len(m["classes"]) == len(space)


# --------------------------------------------------------------------------------------------- (f) in a browser


def _browser() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_report_renders_in_a_headless_browser(model_dir: str, packed: str, tmp_path: Path) -> None:
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium/chromium-browser/google-chrome on PATH: the report was not checked in a browser")
    out = tmp_path / "r"
    evaluate(_cfg(model_dir, packed, out=str(out), corruptions=("blur",), examples=4))
    page = (out / "report.html").read_text()
    assert len(_data_uri_images(page)) == 6
    # the browser reports each image's decoded width in the title once the page has loaded
    probe = out / "probe.html"
    probe.write_text(page.replace("</body>", "<script>addEventListener('load', () => { document.title = 'widths:' + "
                                             "Array.from(document.images).map(i => i.complete ? i.naturalWidth : -1)"
                                             ".join(','); });</script></body>"))
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    widths = re.search(r"<title>widths:([^<]*)</title>", proc.stdout)
    assert widths, proc.stdout[:500]
    values = [int(w) for w in widths.group(1).split(",")]
    assert len(values) == 6 and all(w > 0 for w in values), values

"""Calibrated confidence: the fit lowers NLL, the temperature travels in model.json, and the predictor,
the evaluator and the end of training all use it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from signscale.calibration import CalibrationError, fit_temperature, nll, temperature_of
from signscale.data.pack import PackConfig, pack
from signscale.evaluation.calibrate import CalibrateConfig, calibrate
from signscale.evaluation.evaluate import EvalConfig, EvalError, evaluate
from signscale.labels import LabelSpace
from signscale.models import create_model, model_config
from signscale.serving.predict import Predictor
from signscale.training import checkpoint
from signscale.transforms import Preprocess

SIZE = 16


def _logits(n: int, c: int, *, sharpness: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a model that is right most of the time, scaled by ``sharpness`` (its over/under-confidence)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    z = torch.randn(n, c, generator=g)
    z[torch.arange(n), y] += 2.0
    # 2 z is the exact log-posterior of this Gaussian model (mean shift 2, unit variance), so the
    # calibrated temperature of 2 z * sharpness is sharpness itself
    return 2 * z * sharpness, y


@pytest.mark.parametrize("sharpness, side", [(0.3, "under"), (4.0, "over")])
def test_temperature_scaling_lowers_nll_on_a_fixture(sharpness: float, side: str) -> None:
    z, y = _logits(4000, 10, sharpness=sharpness)
    fit = fit_temperature(z, y)
    assert fit.nll_after < fit.nll_before - 0.05  # a real gain, not float noise
    assert fit.nll_before == pytest.approx(nll(z, y)) and fit.nll_after == pytest.approx(nll(z, y, fit.temperature))
    # the optimum undoes the scaling: T ~ sharpness (under-confident: T < 1, over-confident: T > 1)
    assert (fit.temperature < 1) == (side == "under")
    assert fit.temperature == pytest.approx(sharpness, rel=0.1)
    for t in (fit.temperature * 0.8, fit.temperature * 1.25):  # a minimum, not just an improvement
        assert nll(z, y, t) > fit.nll_after
    assert fit_temperature(z, y).temperature == fit.temperature  # deterministic
    assert (z.argmax(1) == (z / fit.temperature).argmax(1)).all()  # top-1 untouched


def test_bad_inputs_and_records_are_refused_with_the_fix() -> None:
    with pytest.raises(CalibrationError, match="no labelled sample"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(CalibrationError, match=r"\[N, C\]"):
        fit_temperature(torch.zeros(5), torch.zeros(5, dtype=torch.int64))
    assert temperature_of({}) == 1.0
    with pytest.raises(CalibrationError, match="calibration.temperature.*signscale calibrate"):
        temperature_of({"calibration": {"temperature": "hot"}})


def _model(url: str, sharpness: float) -> str:
    """A random small_cnn whose last layer is scaled, so it is clearly over- or under-confident."""
    torch.manual_seed(0)
    model = create_model("small_cnn", 43, widths=[8, 16, 16])
    with torch.no_grad():
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(sharpness)
        last.bias.mul_(sharpness)
    checkpoint.save_model(url, state_dict=model.state_dict(), model_config=model_config(model),
                          label_space=LabelSpace.for_country("de").to_dict(),
                          preprocess=Preprocess(image_size=SIZE).to_dict(), extra={"datasets": ["/the/training/data"]})
    return url


@pytest.fixture(scope="module")
def val_data(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("val") / "val")
    pack(PackConfig(source=f"synthetic:?n=160&size={SIZE}&seed=7", out=out, image_size=SIZE, shard_mb=0.1, workers=0,
                    progress=False))
    return out


def test_calibrate_records_the_temperature_that_predict_and_evaluate_then_use(tmp_path: Path, val_data: str) -> None:
    url = _model(str(tmp_path / "model"), sharpness=25.0)  # wildly over-confident
    weights = (Path(url) / "model.pt").read_bytes()
    before = evaluate(EvalConfig(model=url, data=val_data, workers=0, progress=False)).metrics
    assert before["calibration"]["temperature"] == 1.0

    res = calibrate(CalibrateConfig(model=url, data=val_data, workers=0, progress=False))
    meta = json.loads((Path(url) / "model.json").read_text())
    t = meta["calibration"]["temperature"]
    assert res.fit.temperature == t > 1 and res.fit.nll_after < res.fit.nll_before
    assert res.ece_after < res.ece_before and meta["calibration"]["data"] == val_data
    assert (Path(url) / "model.pt").read_bytes() == weights  # the weights and their checksum are untouched
    checkpoint.load_model_artefact(url)

    # the predictor: softmax(logits / T), computed here by hand from the plain network
    state, _ = checkpoint.load_model_artefact(url)
    net = create_model("small_cnn", 43, widths=[8, 16, 16])
    net.load_state_dict(state)
    net.eval()
    from signscale.transforms import to_input

    x = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = (net(to_input(torch.from_numpy(x), Preprocess(image_size=SIZE))) / t).softmax(1).numpy()
    p = Predictor.load(url)
    np.testing.assert_allclose(p.probabilities(x), expected, atol=1e-5)
    assert p.info()["calibration"]["temperature"] == t

    # the evaluator: same top-1, calibrated ECE/NLL scored, the plain network's kept as "uncalibrated"
    after = evaluate(EvalConfig(model=url, data=val_data, workers=0, progress=False)).metrics
    assert after["overall"]["top1"] == before["overall"]["top1"]
    assert after["calibration"]["temperature"] == t
    assert after["overall"]["ece_uncalibrated"] == pytest.approx(before["overall"]["ece"])
    assert after["overall"]["nll"] < after["overall"]["nll_uncalibrated"]
    assert after["calibration"]["uncalibrated"]["ece"] > after["calibration"]["ece"]


def test_calibrating_on_the_training_data_is_refused(tmp_path: Path) -> None:
    url = _model(str(tmp_path / "model"), sharpness=1.0)
    with pytest.raises(EvalError, match="trained on this data.*validation"):
        calibrate(CalibrateConfig(model=url, data="/the/training/data", workers=0, progress=False))


def test_training_with_val_fits_the_temperature(synthetic_dataset: str, tmp_path: Path) -> None:
    from signscale.training.train import TrainConfig, train

    res = train(TrainConfig(data=(synthetic_dataset,), val=synthetic_dataset, out=str(tmp_path / "run"),
                            model="small_cnn", batch_size=32, max_steps=3, workers=0, progress=False))
    _, meta = checkpoint.load_model_artefact(res.model_url)
    fit = meta["calibration"]
    assert fit["data"] == synthetic_dataset and fit["count"] == 300
    assert fit["nll_after"] <= fit["nll_before"] and temperature_of(meta) == fit["temperature"]

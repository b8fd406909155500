"""Knowing when unsure: selective-prediction metrics on a hand-made case, ``--min-confidence`` in predict
and serve, and test-time augmentation that keeps to the flip rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_predict import make_model

from signscale import images
from signscale.evaluation.evaluate import EvalConfig, evaluate, score_predictions
from signscale.evaluation.metrics import risk_coverage
from signscale.labels import LabelSpace
from signscale.serving.predict import PredictConfig, Predictor
from signscale.training import checkpoint
from signscale.tta import combine, flip_images

SPACE = LabelSpace.for_country("de")
FLIP = SPACE.flip_map()
KEEP_RIGHT, KEEP_LEFT = SPACE.index("keep_right"), SPACE.index("keep_left")
PRIORITY = SPACE.index("priority_road")  # symmetric: flips into itself
SPEED_30 = SPACE.index("speed_limit_30")  # never flipped: a mirrored "30" is no sign


def test_the_label_space_has_the_rules_this_test_relies_on() -> None:
    assert FLIP[KEEP_RIGHT] == KEEP_LEFT and FLIP[KEEP_LEFT] == KEEP_RIGHT
    assert FLIP[PRIORITY] == PRIORITY and FLIP[SPEED_30] == -1


# ---------------------------------------------------------------------------------------------
# Selective prediction


def test_risk_coverage_on_a_hand_made_case() -> None:
    # 20 samples, most confident first; wrong ones at ranks 5 (0-based 4), 19 and 20
    conf = np.linspace(0.99, 0.40, 20)
    correct = np.ones(20, dtype=bool)
    correct[[4, 18, 19]] = False
    r = risk_coverage(conf, correct, coverages=(0.99, 0.95, 0.9, 0.5), points=4)
    # 99% of 20 -> ceil(19.8) = 20 answered: 3 wrong; 95% -> 19 answered: 2 wrong; 90% -> 18: 1; 50% -> 10: 1
    assert r["error_at"] == {0.99: 3 / 20, 0.95: 2 / 19, 0.9: 1 / 18, 0.5: 1 / 10}
    assert r["threshold_at"][0.95] == pytest.approx(conf[18]) and r["threshold_at"][0.5] == pytest.approx(conf[9])
    assert [p["coverage"] for p in r["curve"]] == [0.25, 0.5, 0.75, 1.0]
    assert [p["risk"] for p in r["curve"]] == [1 / 5, 1 / 10, 1 / 15, 3 / 20]
    risks = [0] * 4 + [1 / k for k in range(5, 19)] + [2 / 19, 3 / 20]
    assert r["aurc"] == pytest.approx(np.mean(risks))
    # the input order does not matter: the ranking is by confidence
    perm = np.random.default_rng(0).permutation(20)
    assert risk_coverage(conf[perm], correct[perm], coverages=(0.95,))["error_at"][0.95] == 2 / 19


def test_score_predictions_reports_error_at_99_and_95_coverage() -> None:
    # 100 samples: the 3 least confident are wrong, so refusing 5% removes every error
    labels = np.zeros(100, dtype=np.int64)
    probs = np.zeros((100, 4))
    top = np.linspace(0.99, 0.5, 100)
    probs[:, 0] = top
    probs[:, 1] = 1 - top
    probs[97:] = probs[97:, ::-1]  # the three least sure predict class 1 (wrong) at 0.5..0.51
    s = score_predictions(labels, probs)
    assert s["top1"] == 0.97
    assert s["error_at_99_coverage"] == pytest.approx(2 / 99)  # 99 answered, 2 of the wrong ones among them
    assert s["error_at_95_coverage"] == 0.0


# ---------------------------------------------------------------------------------------------
# Flip-rule TTA


def _probs(rows: dict[int, float], c: int = len(SPACE)) -> torch.Tensor:
    p = torch.full((c,), 0.0, dtype=torch.float64)
    for i, v in rows.items():
        p[i] = v
    rest = 1 - p.sum()
    p[p == 0] = rest / int((p == 0).sum())
    return p


def test_tta_maps_a_mirrored_class_to_its_partner_and_never_flips_a_never_class() -> None:
    # keep_right seen plainly at 0.6; its mirror image looks like keep_left, which the model sees at 0.9
    plain = _probs({KEEP_RIGHT: 0.6, KEEP_LEFT: 0.1})
    mirrored = _probs({KEEP_LEFT: 0.9, KEEP_RIGHT: 0.02})
    out = combine(plain[None], mirrored[None], FLIP)[0]
    assert out.argmax() == KEEP_RIGHT
    assert float(out.sum()) == pytest.approx(1.0)
    # keep_right gets the mirror view's keep_left, not its keep_right: (0.6 + 0.9) / 2 before normalising
    raw = (plain[KEEP_RIGHT] + mirrored[KEEP_LEFT]) / 2
    assert float(out[KEEP_RIGHT]) > float(plain[KEEP_RIGHT]) and float(out[KEEP_RIGHT]) >= float(raw) * 0.9
    # a blind flip (same class index in both views) would have pulled keep_right down instead
    blind = (plain + mirrored) / 2
    assert float(blind[KEEP_RIGHT]) < float(plain[KEEP_RIGHT])
    # a speed limit's image is scored on its own: the mirrored view (nonsense) is ignored
    plain30 = _probs({SPEED_30: 0.7})
    nonsense = _probs({PRIORITY: 0.95})
    assert torch.equal(combine(plain30[None], nonsense[None], FLIP)[0], plain30)


class _Asymmetric(torch.nn.Module):
    """Logits from where the bright pixels are: left half -> keep_right, right half -> keep_left."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1]
        left, right = x[..., : w // 2].mean((1, 2, 3)), x[..., w // 2:].mean((1, 2, 3))
        z = torch.zeros(x.shape[0], len(SPACE))
        z[:, KEEP_RIGHT] = 3 * (left - right)
        z[:, KEEP_LEFT] = 3 * (right - left)
        return z


def test_predictor_tta_agrees_with_its_plain_view_on_a_mirrored_pair() -> None:
    # a model that reads "keep_right" from a bright left half: its mirror image reads keep_left, so a
    # flip-rule TTA keeps (and strengthens) keep_right, where a blind flip would cancel it out
    from signscale.serving.predict import ProbabilityModel
    from signscale.serving.runtime import TorchRunner
    from signscale.transforms import Preprocess

    pre = Preprocess(image_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    run = TorchRunner(ProbabilityModel(_Asymmetric(), pre), torch.device("cpu"))
    meta = {"label_space": SPACE.to_dict(), "preprocess": pre.to_dict()}
    img = np.zeros((1, 8, 8, 3), np.uint8)
    img[:, :, :4] = 255  # bright left half
    assert np.array_equal(flip_images(img)[0, :, 4:], img[0, :, :4])
    plain = Predictor(run=run, backend="torch", meta=meta, url="-", version="v").probabilities(img)
    with_tta = Predictor(run=run, backend="torch", meta=meta, url="-", version="v", tta=True).probabilities(img)
    assert plain.argmax() == with_tta.argmax() == KEEP_RIGHT
    assert with_tta[0, KEEP_RIGHT] >= plain[0, KEEP_RIGHT] - 1e-6


# ---------------------------------------------------------------------------------------------
# --min-confidence: "unsure" is a field of the answer, not a class


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return make_model(str(tmp_path_factory.mktemp("m") / "model"))


def test_predict_min_confidence_answers_unsure(model: str, tmp_path: Path, capsys) -> None:
    from signscale.cli import main
    from signscale.data.sources.pictograms import render_clean

    (tmp_path / "a.png").write_bytes(images.encode_png(render_clean(14, 40)))
    # the random model's top probability is far below 0.99 and far above 0 for any image
    rows = Predictor.load(PredictConfig(model=model, min_confidence=0.99)).classify_files([str(tmp_path / "a.png")])
    assert rows[0]["unsure"] is True and len(rows[0]["top_k"]) == 5  # the best guesses stay visible
    assert Predictor.load(model).classify_files([str(tmp_path / "a.png")])[0]["unsure"] is False
    assert main(["predict", model, str(tmp_path), "--min-confidence", "0.99", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert row["unsure"] is True and "error" not in row
    assert main(["predict", model, str(tmp_path), "--min-confidence=0.99"]) == 0
    out = capsys.readouterr().out
    assert "unsure" in out and "1 unsure" in out
    assert main(["predict", model, str(tmp_path), "--min-confidence", "1.5"]) == 2
    assert "min_confidence" in capsys.readouterr().out


def test_serve_min_confidence_config_and_query(model: str) -> None:
    import httpx

    from signscale.data.sources.pictograms import render_clean
    from signscale.serving.serve import ServeConfig
    from signscale.serving.service import running

    png = images.encode_png(render_clean(14, 40))
    with running(ServeConfig(model=model, port=0, min_confidence=0.99, reload_interval_s=0)) as svc:
        url = svc.url
        r = httpx.post(f"{url}/v1/classify", content=png, headers={"content-type": "image/png"}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["min_confidence"] == 0.99 and body["results"][0]["unsure"] is True
        r = httpx.post(f"{url}/v1/classify?min_confidence=0", content=png, headers={"content-type": "image/png"},
                       timeout=30)
        assert r.json()["results"][0]["unsure"] is False
        r = httpx.post(f"{url}/v1/classify?min_confidence=2", content=png, headers={"content-type": "image/png"},
                       timeout=30)
        assert r.status_code == 400 and r.json()["error"]["reason"] == "bad_parameter"


def test_evaluate_with_tta_reports_it_and_keeps_the_selective_numbers(model: str, tmp_path: Path) -> None:
    data = "synthetic:?n=60&size=24&seed=5"
    plain = evaluate(EvalConfig(model=model, data=data, workers=0, progress=False)).metrics
    flipped = evaluate(EvalConfig(model=model, data=data, workers=0, progress=False, tta=True)).metrics
    assert flipped["calibration"]["tta"] is True and plain["calibration"]["tta"] is False
    for m in (plain, flipped):
        o = m["overall"]
        assert 0 <= o["error_at_95_coverage"] <= o["error_at_99_coverage"] + 1e-12 <= 1
        assert len(m["selective"]["curve"]) == 100 and m["selective"]["curve"][-1]["risk"] == pytest.approx(
            1 - o["top1"])
    # the uncalibrated figures are the plain network's in both runs
    assert flipped["overall"]["ece_uncalibrated"] == pytest.approx(plain["overall"]["ece_uncalibrated"])
    checkpoint.load_model_artefact(model)


def test_ingest_queues_what_the_vehicle_was_unsure_of(base_dataset: str, tmp_path: Path) -> None:
    import shutil

    from signscale import storage
    from signscale.continual.ingest import IngestConfig, ingest
    from signscale.data.sources.pictograms import render_clean

    ds, inbox = str(tmp_path / "ds"), str(tmp_path / "inbox")
    shutil.copytree(base_dataset, ds)
    for name, side in (("sure", {}), ("unsure", {"unsure": True, "confidence": 0.41})):
        storage.write_bytes(storage.join(inbox, f"veh-01/{name}.png"), images.encode_png(render_clean(14, 16)
                                                                                         if name == "sure" else
                                                                                         render_clean(1, 16)))
        storage.write_json(storage.join(inbox, f"veh-01/{name}.json"), {"vehicle": "veh-01", **side})
    model = make_model(str(tmp_path / "model"), size=16)
    # queue_confidence 0: the server's own doubt queues nothing, so only the vehicle's "unsure" can
    r = ingest(IngestConfig(inbox=inbox, dataset=ds, model=model, queue_confidence=0.0))
    rows = [json.loads(x) for x in storage.read_text(r.queue).splitlines()]
    assert [(x["key"], x["onboard_unsure"]) for x in rows] == [("veh-01/unsure.png", True)]

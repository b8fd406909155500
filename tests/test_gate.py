"""The promotion gate on hand-made reports (in the evaluation runner's metrics format): each rule can
pass and can fail, and says why; its regressions are ``compare``'s. A report of a real model reads it
once for all its sets and the canary, and scores each set as the evaluator alone does."""

import numpy as np
import pytest
import torch

from signscale.continual import gate
from signscale.continual.gate import CanaryConfig, GateConfig, SliceRule, decide, paste_sticker, slices
from signscale.data.pack import PackConfig, pack
from signscale.evaluation.compare import compare
from signscale.evaluation.evaluate import EvalConfig, evaluate
from signscale.evaluation.metrics import EVAL_FORMAT, EVAL_VERSION
from signscale.labels import LabelSpace
from signscale.models import create_model, model_config
from signscale.training import checkpoint
from signscale.transforms import Preprocess


def _metrics(acc: float, n: int, *, classes: dict | None = None, conditions: dict | None = None,
             countries: dict | None = None) -> dict:
    """A minimal evaluation report: overall accuracy, per-class recalls, condition and country groups."""
    def group(a: float, k: int) -> dict:
        return {"count": k, "correct": round(a * k), "accuracy": round(a * k) / k}

    return {"format": EVAL_FORMAT, "version": EVAL_VERSION, "data": {"id": "set", "spec": "set"}, "model": {},
            "overall": {"count": n, "top1": round(acc * n) / n, "macro_f1": acc, "top5": 1.0, "ece": 0.01},
            "classes": [{"key": k, "support": m, "tp": round(a * m), "recall": round(a * m) / m}
                        for k, (a, m) in (classes or {}).items()],
            "conditions": {k: group(a, m) for k, (a, m) in (conditions or {}).items()},
            "countries": {k: group(a, m) for k, (a, m) in (countries or {}).items()}}


def _report(golden=0.98, snow=0.60, stop=0.97, tiny=0.9, never=0.80, canary=0.02) -> dict:
    return {"sets": {"golden": _metrics(golden, 4000, classes={"stop": (stop, 100), "rare": (tiny, 10)},
                                        conditions={"clear": (golden, 4000)}, countries={"de": (golden, 4000)}),
                     "snow": _metrics(snow, 4000, conditions={"snow": (snow, 4000)}),
                     "never_regress": _metrics(never, 500)},
            "canary": {"n": 90, "flipped": round(canary * 90), "rate": canary, "to": "speed_limit_30"}}


CFG = GateConfig(targets=("snow/overall",), min_improvement=0.10)


def test_a_better_candidate_is_promoted():
    d = decide(_report(), _report(golden=0.978, snow=0.75, stop=0.95, tiny=0.5), CFG)
    assert d.promote, d.reasons
    kinds = {c["check"] for c in d.checks}
    assert kinds == {"target", "regression", "never_regress", "canary", "floor"}
    # the 10-sample class slice is below min_support: reported by nobody, gated by nobody
    assert not any(c["slice"] == "golden/class/rare" for c in d.checks)


@pytest.mark.parametrize("cand, needle", [
    (dict(snow=0.65), "snow/overall improved +5.00 pts, needs >= +10.00 pts"),
    (dict(snow=0.75, golden=0.975), "golden/overall regressed -0.50 pts"),
    (dict(snow=0.75, stop=0.85), "golden/class/stop regressed -12.00 pts"),
    (dict(snow=0.75, never=0.798), "never-regress set got worse: 80.00% -> 79.80%"),
    (dict(snow=0.75, canary=0.6), "canary: a sticker flips 60% of golden stop signs (to speed_limit_30)"),
])
def test_each_rule_rejects_and_names_itself(cand, needle):
    d = decide(_report(), _report(**cand), CFG)
    assert not d.promote
    assert len(d.reasons) == 1 and needle in d.reasons[0], d.reasons


def test_floor_and_first_model_without_production():
    cfg = GateConfig(overall=SliceRule(floor=0.9, tolerance=0.003, min_support=1))
    assert decide(None, _report(), cfg).promote
    d = decide(None, _report(golden=0.85), cfg)
    assert not d.promote and "golden/overall at 85.00% is below its floor 90.00%" in d.reasons[0]


def test_canary_relative_to_production_and_label_noise_names_the_vehicle():
    # production itself flips 10%: the candidate may not add more than max_increase on top
    cfg = GateConfig(canary=CanaryConfig(max_flip=0.3, max_increase=0.05))
    assert decide(_report(canary=0.10), _report(canary=0.14), cfg).promote
    assert not decide(_report(canary=0.10), _report(canary=0.16), cfg).promote
    noise = {"noise": {"n": 400, "flagged": 120, "rate": 0.30, "suspicious": ["veh-13"]}}
    d = decide(_report(), _report(), GateConfig(), batch=noise)
    assert not d.promote and "label noise: 30.0%" in d.reasons[0] and "veh-13" in d.reasons[0]
    assert decide(_report(), _report(), GateConfig(), batch={"noise": {**noise["noise"], "rate": 0.05}}).promote


def test_class_slices_tolerate_sampling_noise_only():
    rule = SliceRule(tolerance=0.05, min_support=50, z=3.0)
    assert rule.allowed_drop(0.97, 100) == pytest.approx(3 * (2 * 0.97 * 0.03 / 100) ** 0.5)  # 7.2 points
    assert rule.allowed_drop(0.999, 5000) == 0.05 and SliceRule(tolerance=0.003).allowed_drop(0.5, 10) == 0.003
    assert decide(_report(), _report(snow=0.75, stop=0.91), CFG).promote  # -6 pts on 100 signs: noise
    assert not decide(_report(), _report(snow=0.75, stop=0.89), CFG).promote  # -8 pts: beyond 3 sigma


def test_the_gates_regressions_are_what_compare_calls_worse():
    """One rule: a drop compare calls worse with the gate's rules is the gate's regression, and only that."""
    prod, cand = _report(), _report(golden=0.975, snow=0.75, stop=0.89)
    d = decide(prod, cand, CFG)
    c = compare(prod["sets"]["golden"], cand["sets"]["golden"], rules=CFG.rules())
    worse = {"golden/" + ("overall" if r.metric == "top1" else r.metric.replace(":", "/")) for r in c.regressions}
    assert worse == {"golden/overall", "golden/class/stop"}
    assert {x["slice"] for x in d.checks if x["check"] == "regression" and not x["passed"]} == worse
    # the terminal's compare with one tolerance for all (the gate's overall one): the same verdict on top-1
    terminal = compare(prod["sets"]["golden"], cand["sets"]["golden"], tolerance=CFG.overall.tolerance)
    assert "top1" in {r.metric for r in terminal.regressions}


def test_slices_and_sticker():
    m = _metrics(0.6, 5, classes={"k0": (0.5, 2), "k1": (2 / 3, 3), "k2": (0.0, 1)},
                 conditions={"snow": (2 / 3, 3)}, countries={"de": (0.6, 5)})
    m["classes"][2]["support"] = 0
    s = slices(m)
    assert s["overall"] == {"n": 5, "correct": 3, "acc": 0.6}
    assert s["class/k1"]["acc"] == pytest.approx(2 / 3) and s["condition/snow"]["n"] == 3
    assert s["country/de"]["n"] == 5 and "class/k2" not in s
    img = np.zeros((2, 32, 32, 3), np.uint8)
    out = paste_sticker(img, size=0.25, position=(0.5, 0.5), colour=(255, 230, 0))
    assert (out[:, 16:24, 16:24] == (255, 230, 0)).all() and out[:, :16].sum() == 0 and img.sum() == 0


@pytest.fixture(scope="module")
def model_and_sets(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """A real model folder (a small_cnn at 16 px, as initialised) and three packed evaluation sets."""
    root = tmp_path_factory.mktemp("gate")
    torch.manual_seed(0)
    net = create_model("small_cnn", 43, widths=[8, 16, 16])
    model = str(root / "model")
    checkpoint.save_model(model, state_dict=net.state_dict(), model_config=model_config(net),
                          label_space=LabelSpace.for_country("de").to_dict(),
                          preprocess=Preprocess(image_size=16).to_dict())
    sets = {name: str(root / name) for name in ("golden", "snow", "never_regress")}
    for seed, url in enumerate(sets.values(), start=61):
        pack(PackConfig(source=f"synthetic:?n=150&size=16&seed={seed}", out=url, image_size=16, workers=0,
                        progress=False))
    return model, sets


def _timeless(metrics: dict) -> dict:
    """A report without what depends on the clock (when it was made, how long it took)."""
    out = {**metrics, "run": {k: v for k, v in metrics["run"].items() if k not in ("seconds", "images_per_s")}}
    out.pop("created")
    return out


def test_a_report_reads_the_model_once_and_scores_each_set_as_the_evaluator(model_and_sets, monkeypatch):
    model, sets = model_and_sets
    reads: list[str] = []
    real_read = checkpoint.load_model_artefact

    def counted(url: str):  # counts only: the real read and checksum check still happen
        reads.append(url)
        return real_read(url)

    monkeypatch.setattr(checkpoint, "load_model_artefact", counted)
    report = gate.report(model, sets, canary=CanaryConfig())
    assert report["canary"]["variant"] is not None  # the canary was scored too (golden has stop signs)
    assert reads == [model]  # 3 sets + the canary: one read (it was 4)
    monkeypatch.undo()
    for name, url in sets.items():
        alone = evaluate(EvalConfig(model=model, data=url, workers=0, device="cpu", progress=False, examples=0))
        assert _timeless(report["sets"][name]) == _timeless(alone.metrics), name
    stops = gate._signs_of(sets["golden"], "stop")
    fresh = gate.load_predictor(model)
    assert report["canary"] == gate.canary_report(model, stops, CanaryConfig(), fresh.label_space.index("stop"),
                                                  fresh)

"""The promotion gate: a candidate replaces production only if it is better where it should be and
no worse anywhere else.

Both models are scored on the same fixed evaluation sets (golden clear-weather signs, the new
slices such as held-out snow, a *never-regress* set of past edge cases that uploads can never enter)
and on a *canary*: golden stop signs with a small sticker pasted on, the trigger of the BadNets
attack on traffic signs. Every set is cut into slices (overall, each class, each condition, each
country); :func:`decide` then applies, per slice, an absolute floor and a change threshold against
production (TFX Evaluator's "blessing": the baseline is the model in production, not a fixed number):

* each *target* slice (the new data's, e.g. ``snow/overall``) improves by at least ``min_improvement``;
* no slice with enough support drops by more than its tolerance (forgetting);
* the never-regress set does not get worse at all (``never_regress_tolerance``, default 0);
* the canary's flip rate stays low and does not rise (a backdoor flips triggered stop signs);
* the batch's label-noise rate (from ingest) is below ``max_label_noise``.

:func:`report` scores a model with the one evaluation runner (:func:`signscale.evaluation.evaluate.evaluate`,
a report per set in the format of ``metrics.json``), and the regression rule is
:func:`signscale.evaluation.compare.compare` with the gate's :class:`~signscale.evaluation.compare.Rules`:
``signscale compare`` and the gate call the same reports worse. :func:`decide` is a pure function of two
reports (plain dicts, also readable from JSON), so every decision can be re-checked from the numbers
written to the registry history.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from signscale.evaluation.compare import Rules, SliceRule, compare

if TYPE_CHECKING:
    from signscale.evaluation.evaluate import LoadedModel
    from signscale.serving.predict import Predictor

# ---------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class CanaryConfig:
    """The trigger the canary pastes on golden stop signs (and the demo's attacker uses)."""

    target: str = "stop"  # class key of the signs the canary is made of
    size: float = 0.22  # sticker side as a fraction of the image side
    positions: tuple[tuple[float, float], ...] = ((0.62, 0.62), (0.16, 0.62))  # top-left corner, fractions
    colours: tuple[tuple[int, int, int], ...] = ((255, 230, 0), (0, 200, 255))
    max_flip: float = 0.2  # candidate: at most this fraction of triggered stop signs change class
    max_increase: float = 0.05  # and at most this much more than production


@dataclass(frozen=True)
class GateConfig:
    overall: SliceRule = field(default_factory=lambda: SliceRule(floor=0.5, tolerance=0.003, min_support=1))
    per_class: SliceRule = field(default_factory=lambda: SliceRule(tolerance=0.05, min_support=50, z=3.0))
    per_condition: SliceRule = field(default_factory=lambda: SliceRule(tolerance=0.01, min_support=50))
    per_country: SliceRule = field(default_factory=lambda: SliceRule(tolerance=0.01, min_support=50))
    targets: tuple[str, ...] = ()  # slices that must improve, "SET/overall" or "SET/condition/snow"
    min_improvement: float = 0.0
    never_regress: str = "never_regress"  # the evaluation set uploads can never enter
    never_regress_tolerance: float = 0.0
    regress_sets: tuple[str, ...] = ()  # sets whose slices are checked for regressions (empty: all)
    floor_sets: tuple[str, ...] = ("golden",)  # sets the absolute floors apply to (hard slices have none)
    max_label_noise: float = 0.1
    canary: CanaryConfig = field(default_factory=CanaryConfig)


    def rules(self) -> Rules:
        """The rules :func:`~signscale.evaluation.compare.compare` judges a set's regressions by."""
        return Rules(overall=self.overall, per_class=self.per_class, per_condition=self.per_condition,
                     per_country=self.per_country, per_corruption=self.overall)


# ---------------------------------------------------------------------------------------------
# Scoring


def load_predictor(model_url: str, loaded: LoadedModel | None = None) -> Predictor:
    """The model as the one :class:`~signscale.serving.predict.Predictor` (torch on the CPU, calibrated
    when it carries a temperature: the labelling queue and label-noise thresholds read confidences);
    ``loaded``: the model already read (:func:`~signscale.evaluation.evaluate.read_model`), not read again."""
    from signscale.serving.predict import PredictConfig, Predictor

    return Predictor.load(PredictConfig(model=model_url, backend="torch", device="cpu", batch_size=512),
                          network=(loaded.network, loaded.meta) if loaded is not None else None)


def predict(model_url: str, images_nhwc: np.ndarray, *, loaded: Predictor | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class ids, confidence = max probability) of a uint8 NxHxWx3 batch."""
    probs = (loaded or load_predictor(model_url)).probabilities(np.ascontiguousarray(images_nhwc))
    return probs.argmax(1).astype(np.int64), probs.max(1, initial=0.0).astype(np.float32)


def slices(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-slice (n, correct, acc) of an evaluation report: overall, each class, condition and country present."""
    o = metrics["overall"]
    out = {"overall": {"n": int(o["count"]), "correct": round(o["top1"] * o["count"]), "acc": float(o["top1"])}}
    for c in metrics["classes"]:
        if c["support"]:
            out[f"class/{c['key']}"] = {"n": c["support"], "correct": c["tp"], "acc": c["tp"] / c["support"]}
    for kind, key in (("condition", "conditions"), ("country", "countries")):
        for name, g in metrics.get(key, {}).items():
            out[f"{kind}/{name}"] = {"n": g["count"], "correct": g["correct"], "acc": g["correct"] / g["count"]}
    return out


def paste_sticker(images_nhwc: np.ndarray, *, size: float, position: tuple[float, float],
                  colour: tuple[int, int, int]) -> np.ndarray:
    """A copy with a solid square sticker pasted at ``position`` (fractions of the image)."""
    out = np.array(images_nhwc, copy=True)
    h, w = out.shape[1:3]
    s = max(1, round(size * min(h, w)))
    y, x = round(position[1] * h), round(position[0] * w)
    out[:, y:y + s, x:x + s] = np.asarray(colour, dtype=np.uint8)
    return out


def canary_report(model_url: str, stop_images: np.ndarray, cfg: CanaryConfig, target_id: int,
                  loaded: Predictor | None = None) -> dict[str, Any]:
    """How often a sticker flips a stop sign the model otherwise gets right (worst sticker variant)."""
    loaded = loaded or load_predictor(model_url)
    clean, _ = predict(model_url, stop_images, loaded=loaded)
    ok = clean == target_id
    space = loaded.label_space
    worst: dict[str, Any] = {"n": int(ok.sum()), "flipped": 0, "rate": 0.0, "to": None, "variant": None}
    for pos in cfg.positions:
        for col in cfg.colours:
            p, _ = predict(model_url, paste_sticker(stop_images[ok], size=cfg.size, position=pos, colour=col),
                           loaded=loaded)
            flipped = p != target_id
            rate = float(flipped.mean()) if len(p) else 0.0
            if rate > worst["rate"] or worst["variant"] is None:
                to = np.bincount(p[flipped], minlength=len(space)).argmax() if flipped.any() else None
                worst = {"n": int(ok.sum()), "flipped": int(flipped.sum()), "rate": rate,
                         "to": space[int(to)].key if to is not None else None,
                         "variant": {"position": list(pos), "colour": list(col), "size": cfg.size}}
    worst["clean_correct"] = float(ok.mean()) if len(ok) else 0.0
    return worst


def evaluate_set(model_url: str, data: str, *, loaded: LoadedModel | None = None) -> dict[str, Any]:
    """One model's report on one packed evaluation set, by the one evaluation runner (``loaded``: the
    model already read, see :func:`report`)."""
    from signscale.evaluation.evaluate import EvalConfig, evaluate

    return evaluate(EvalConfig(model=model_url, data=data, workers=0, device="cpu", progress=False,
                               examples=0), loaded=loaded).metrics


def _signs_of(data: str, key: str) -> np.ndarray:
    """The images of class ``key`` in a packed dataset (uint8 NxHxWx3; none when its labels lack the key)."""
    from signscale.data import datasets
    from signscale.data.manifest import Manifest

    m = Manifest.load(data)
    if key not in m.label_space.keys:
        return np.zeros((0, 1, 1, 3), dtype=np.uint8)
    r = datasets.read_records(m)
    return r["image"][r["label"] == m.label_space.index(key)]


def report(model_url: str, sets: Mapping[str, str], *, canary: CanaryConfig | None = None,
           canary_set: str = "") -> dict[str, Any]:
    """One model's evaluation report on every set (name -> packed dataset URL), plus the canary: the
    ``canary.target`` signs of ``canary_set`` (default: of the set named ``golden``) with the sticker on.

    The model is read and checksum-verified once, and every set and the canary score that copy."""
    from signscale.evaluation.evaluate import read_model

    model = read_model(model_url)
    out: dict[str, Any] = {"model": model_url, "sets": {name: evaluate_set(model_url, url, loaded=model)
                                                        for name, url in sets.items()}}
    source = canary_set or sets.get("golden", "")
    if canary is not None and source:
        stops = _signs_of(source, canary.target)
        if len(stops):
            loaded = load_predictor(model_url, model)
            out["canary"] = canary_report(model_url, stops, canary, loaded.label_space.index(canary.target), loaded)
    return out


# ---------------------------------------------------------------------------------------------
# The decision


@dataclass
class Decision:
    promote: bool
    reasons: list[str]
    checks: list[dict[str, Any]]

    def summary(self) -> str:
        if self.promote:
            return "PROMOTE: every check passed (" + f"{sum(c['passed'] for c in self.checks)} checks)"
        return "REJECT: " + "; ".join(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {"promote": self.promote, "reasons": self.reasons, "checks": self.checks}


def _pts(x: float) -> str:
    return f"{100 * x:+.2f} pts"


class _Checks:
    """The gate's checks as they are made: every one recorded, the failed ones' reasons kept."""

    def __init__(self) -> None:
        self.checks: list[dict[str, Any]] = []
        self.reasons: list[str] = []

    def __call__(self, kind: str, slice_: str, passed: bool, reason: str, **numbers: Any) -> None:
        self.checks.append({"check": kind, "slice": slice_, "passed": bool(passed), **numbers})
        if not passed:
            self.reasons.append(reason)


def decide(production: dict[str, Any] | None, candidate: dict[str, Any], cfg: GateConfig,
           batch: dict[str, Any] | None = None) -> Decision:
    """Apply the gate to two reports (see :func:`report`); ``production`` None: first model, floors only."""
    check = _Checks()
    prod_sets = (production or {}).get("sets", {})
    for set_name, m in candidate["sets"].items():
        _set_checks(check, cfg, set_name, m, prod_sets.get(set_name))
    if candidate.get("canary") is not None:
        _canary_check(check, cfg, candidate["canary"], (production or {}).get("canary") or {"rate": 0.0})
    noise = (batch or {}).get("noise") or {}
    if noise:
        who = f"; suspicious vehicle(s): {', '.join(noise['suspicious'])}" if noise.get("suspicious") else ""
        check("label_noise", "batch", noise["rate"] <= cfg.max_label_noise,
              f"label noise: {noise['rate']:.1%} of the batch's confidently predicted labels contradicted by "
              f"production (limit {cfg.max_label_noise:.0%}){who}", candidate=noise["rate"], limit=cfg.max_label_noise,
              n=noise["n"], suspicious=noise.get("suspicious", []))
    return Decision(promote=not check.reasons, reasons=check.reasons, checks=check.checks)


def _set_checks(check: _Checks, cfg: GateConfig, set_name: str, m: dict[str, Any], p: dict[str, Any] | None) -> None:
    """One set: its targets to improve, the never-regress set as a whole, floors, and (by compare) regressions."""
    sl, psl, rules = slices(m), (slices(p) if p is not None else {}), cfg.rules()
    # the never-regress set is judged as a whole; its slices add no separate checks
    gated = (not cfg.regress_sets or set_name in cfg.regress_sets) and set_name != cfg.never_regress
    for name, s in sl.items():
        full, ps = f"{set_name}/{name}", psl.get(name)
        if full in cfg.targets:
            _target_check(check, cfg, full, s, ps)
        elif set_name == cfg.never_regress and name == "overall" and ps is not None:
            d = s["acc"] - ps["acc"]
            check("never_regress", full, d >= -cfg.never_regress_tolerance,
                  f"never-regress set got worse: {ps['acc']:.2%} -> {s['acc']:.2%} ({_pts(d)}, tolerance "
                  f"{_pts(cfg.never_regress_tolerance)})", production=ps["acc"], candidate=s["acc"], delta=d,
                  limit=-cfg.never_regress_tolerance, n=s["n"])
        elif gated and set_name in cfg.floor_sets:
            rule = rules.of(_metric_name(name))
            if rule.floor > 0 and s["n"] >= rule.min_support:
                check("floor", full, s["acc"] >= rule.floor, f"{full} at {s['acc']:.2%} is below its floor "
                      f"{rule.floor:.2%}", candidate=s["acc"], limit=rule.floor, n=s["n"])
    if p is None or not gated:
        return
    for d in compare(p, m, rules=rules, require_same_data=False).differences:
        full = f"{set_name}/{_slice_name(d.metric)}"
        if not d.gates or d.delta is None or full in cfg.targets:
            continue
        check("regression", full, not d.worse,
              f"{full} regressed {_pts(d.delta)} ({d.a:.2%} -> {d.b:.2%}, tolerance {_pts(-d.tolerance)})",
              production=d.a, candidate=d.b, delta=d.delta, limit=-d.tolerance, n=d.support)


def _target_check(check: _Checks, cfg: GateConfig, full: str, s: dict[str, Any], ps: dict[str, Any] | None) -> None:
    if ps is None:
        check("target", full, False, f"{full}: production has no score to improve on", candidate=s["acc"])
        return
    d = s["acc"] - ps["acc"]
    check("target", full, d >= cfg.min_improvement,
          f"{full} improved {_pts(d)}, needs >= {_pts(cfg.min_improvement)} ({ps['acc']:.2%} -> {s['acc']:.2%})",
          production=ps["acc"], candidate=s["acc"], delta=d, limit=cfg.min_improvement, n=s["n"])


def _slice_name(metric: str) -> str:
    """compare's metric name as the gate's slice name: top1 -> overall, class:stop -> class/stop."""
    return "overall" if metric == "top1" else metric.replace(":", "/", 1)


def _metric_name(slice_name: str) -> str:
    """The gate's slice name as compare's metric name (:func:`_slice_name` undone)."""
    return "top1" if slice_name == "overall" else slice_name.replace("/", ":", 1)


def _canary_check(check: _Checks, cfg: GateConfig, cc: dict[str, Any], pc: dict[str, Any]) -> None:
    """Never more than max_increase above production; and under max_flip, unless production is already above it."""
    limit = pc["rate"] + cfg.canary.max_increase
    if pc["rate"] <= cfg.canary.max_flip:
        limit = min(limit, cfg.canary.max_flip)
    check("canary", "canary", cc["rate"] <= limit,
          f"canary: a sticker flips {cc['rate']:.0%} of golden {cfg.canary.target} signs (to {cc['to']}), "
          f"production {pc['rate']:.0%}, limit {limit:.0%}: a backdoor trigger was learnt",
          production=pc["rate"], candidate=cc["rate"], limit=limit, n=cc["n"], to=cc["to"])

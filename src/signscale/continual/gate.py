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

:func:`decide` is a pure function of two reports (plain dicts, also readable from JSON), so every
decision can be re-checked from the numbers written to the registry history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from signscale import config as config_mod
from signscale.data.sources import CONDITIONS
from signscale.labels import COUNTRIES

if TYPE_CHECKING:
    from signscale.serving.predict import Predictor

# ---------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class SliceRule:
    """Floor and tolerated drop for one kind of slice; slices below ``min_support`` samples are not gated."""

    floor: float = 0.0  # absolute minimum accuracy of the candidate
    tolerance: float = 0.01  # largest drop vs production (accuracy fraction: 0.003 = 0.3 points)
    min_support: int = 30
    # also tolerate drops within z standard errors of the difference of two accuracies on this slice:
    # a 60-sample class slice moves by ~5 points between two equally good models, so a fixed small
    # tolerance there would reject every candidate. 0: the fixed tolerance only (overall, conditions).
    z: float = 0.0

    def allowed_drop(self, p: float, n: int) -> float:
        if self.z <= 0 or n <= 0:
            return self.tolerance
        return max(self.tolerance, self.z * math.sqrt(2 * p * (1 - p) / n))

    def __post_init__(self) -> None:
        if not 0 <= self.floor <= 1 or not 0 <= self.tolerance <= 1 or self.min_support < 0:
            raise config_mod.ConfigError(f"slice rule: floor and tolerance in [0, 1], min_support >= 0; got {self}")


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


def _rule(cfg: GateConfig, kind: str) -> SliceRule:
    return {"overall": cfg.overall, "class": cfg.per_class, "condition": cfg.per_condition,
            "country": cfg.per_country}[kind]


# ---------------------------------------------------------------------------------------------
# Scoring


def load_predictor(model_url: str) -> Predictor:
    """The model as the one :class:`~signscale.serving.predict.Predictor` (torch on the CPU, calibrated
    when it carries a temperature: the labelling queue and label-noise thresholds read confidences)."""
    from signscale.serving.predict import PredictConfig, Predictor

    return Predictor.load(PredictConfig(model=model_url, backend="torch", device="cpu", batch_size=512))


def predict(model_url: str, images_nhwc: np.ndarray, *, loaded: Predictor | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class ids, confidence = max probability) of a uint8 NxHxWx3 batch."""
    probs = (loaded or load_predictor(model_url)).probabilities(np.ascontiguousarray(images_nhwc))
    return probs.argmax(1).astype(np.int64), probs.max(1, initial=0.0).astype(np.float32)


def slices(labels: np.ndarray, correct: np.ndarray, conditions: np.ndarray, countries: np.ndarray,
           class_keys: list[str]) -> dict[str, dict[str, Any]]:
    """Per-slice (n, correct, acc): overall, each class, condition and country present."""
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, mask: np.ndarray) -> None:
        n = int(mask.sum())
        if n:
            c = int(correct[mask].sum())
            out[name] = {"n": n, "correct": c, "acc": c / n}

    add("overall", np.ones(len(labels), dtype=bool))
    for k in np.unique(labels):
        add(f"class/{class_keys[int(k)]}", labels == k)
    for k in np.unique(conditions):
        add(f"condition/{CONDITIONS[int(k)]}", conditions == k)
    for k in np.unique(countries):
        add(f"country/{COUNTRIES[int(k)]}", countries == k)
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


@dataclass(frozen=True)
class EvalSet:
    """An evaluation set in memory: images and the metadata slices are cut by."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    conditions: np.ndarray
    countries: np.ndarray
    ids: np.ndarray

    @classmethod
    def from_dataset(cls, name: str, url: str) -> "EvalSet":
        from signscale.data import datasets
        from signscale.data.manifest import Manifest

        r = datasets.read_records(Manifest.load(url))
        return cls(name, r["image"], r["label"].astype(np.int64), r["condition"], r["country"], r["id"])


def report(model_url: str, sets: list[EvalSet], *, canary: CanaryConfig | None = None,
           canary_set: EvalSet | None = None) -> dict[str, Any]:
    """Slice metrics of one model on every set, plus the canary: the ``canary.target`` signs of
    ``canary_set`` (default: of the set named ``golden``) with the sticker pasted on."""
    loaded = load_predictor(model_url)
    space = loaded.label_space
    keys = list(space.keys)
    out: dict[str, Any] = {"model": model_url, "sets": {}, "wrong_ids": {}}
    for s in sets:
        pred, _ = predict(model_url, s.images, loaded=loaded)
        correct = pred == s.labels
        out["sets"][s.name] = slices(s.labels, correct, s.conditions, s.countries, keys)
        out["wrong_ids"][s.name] = sorted(int(i) for i in s.ids[~correct])
    if canary is not None:
        target = space.index(canary.target)
        source = canary_set or next((s for s in sets if s.name == "golden"), None)
        if source is not None and (source.labels == target).any():
            out["canary"] = canary_report(model_url, source.images[source.labels == target], canary, target, loaded)
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
    for set_name, sl in candidate["sets"].items():
        for name, m in sl.items():
            _slice_checks(check, cfg, set_name, name, m, prod_sets.get(set_name, {}).get(name))
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


def _slice_checks(check: _Checks, cfg: GateConfig, set_name: str, name: str, m: dict[str, Any],
                  p: dict[str, Any] | None) -> None:
    """One slice of one set: a target to improve, the never-regress set, or its floor and regression."""
    full = f"{set_name}/{name}"
    if full in cfg.targets:
        if p is None:
            check("target", full, False, f"{full}: production has no score to improve on", candidate=m["acc"])
            return
        d = m["acc"] - p["acc"]
        check("target", full, d >= cfg.min_improvement,
              f"{full} improved {_pts(d)}, needs >= {_pts(cfg.min_improvement)} ({p['acc']:.2%} -> {m['acc']:.2%})",
              production=p["acc"], candidate=m["acc"], delta=d, limit=cfg.min_improvement, n=m["n"])
        return
    if set_name == cfg.never_regress and name == "overall" and p is not None:
        d = m["acc"] - p["acc"]
        check("never_regress", full, d >= -cfg.never_regress_tolerance,
              f"never-regress set got worse: {p['acc']:.2%} -> {m['acc']:.2%} ({_pts(d)}, tolerance "
              f"{_pts(cfg.never_regress_tolerance)})", production=p["acc"], candidate=m["acc"], delta=d,
              limit=-cfg.never_regress_tolerance, n=m["n"])
        return
    rule = _rule(cfg, name.split("/", 1)[0])
    # the never-regress set is judged as a whole (above); its slices add no separate checks
    gated = (not cfg.regress_sets or set_name in cfg.regress_sets) and set_name != cfg.never_regress
    if m["n"] < rule.min_support or not gated:
        return
    if rule.floor > 0 and set_name in cfg.floor_sets:
        check("floor", full, m["acc"] >= rule.floor, f"{full} at {m['acc']:.2%} is below its floor "
              f"{rule.floor:.2%}", candidate=m["acc"], limit=rule.floor, n=m["n"])
    if p is None:
        return
    d = m["acc"] - p["acc"]
    allowed = rule.allowed_drop(p["acc"], m["n"])
    check("regression", full, d >= -allowed,
          f"{full} regressed {_pts(d)} ({p['acc']:.2%} -> {m['acc']:.2%}, tolerance {_pts(-allowed)})",
          production=p["acc"], candidate=m["acc"], delta=d, limit=-allowed, n=m["n"])


def _canary_check(check: _Checks, cfg: GateConfig, cc: dict[str, Any], pc: dict[str, Any]) -> None:
    """Never more than max_increase above production; and under max_flip, unless production is already above it."""
    limit = pc["rate"] + cfg.canary.max_increase
    if pc["rate"] <= cfg.canary.max_flip:
        limit = min(limit, cfg.canary.max_flip)
    check("canary", "canary", cc["rate"] <= limit,
          f"canary: a sticker flips {cc['rate']:.0%} of golden {cfg.canary.target} signs (to {cc['to']}), "
          f"production {pc['rate']:.0%}, limit {limit:.0%}: a backdoor trigger was learnt",
          production=pc["rate"], candidate=cc["rate"], limit=limit, n=cc["n"], to=cc["to"])

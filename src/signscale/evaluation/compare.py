"""``signscale compare A B``: two evaluation reports side by side, metric by metric and slice by slice,
with the differences that exceed a tolerance called out.

This is also the promotion gate's regression rule: :func:`signscale.continual.gate.decide` compares
production's and the candidate's reports of each evaluation set with :func:`compare` and its own
:class:`Rules`, so "worse" means one thing for a person at the terminal and for the continual loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from signscale import config as config_mod
from signscale import storage
from signscale.evaluation.metrics import EVAL_FORMAT, EVAL_VERSION, NOT_PERCENT


class CompareError(ValueError):
    """Two reports that cannot be compared (different data, not signscale reports)."""


def load_metrics(src: Mapping[str, Any] | str) -> dict[str, Any]:
    """A metrics dict from itself, a ``metrics.json`` URL or a report folder holding one."""
    if isinstance(src, Mapping):
        metrics = dict(src)
        where = "metrics"
    else:
        where = src if src.endswith(".json") else storage.join(src, "metrics.json")
        if not storage.exists(where):
            raise CompareError(f"{where}: no such file; give a report folder written by `signscale evaluate --out` "
                               "or its metrics.json")
        metrics = storage.read_json(where)
    if metrics.get("format") != EVAL_FORMAT:
        raise CompareError(f"{where}: not a signscale evaluation report (format {metrics.get('format')!r})")
    if metrics.get("version") != EVAL_VERSION:
        raise CompareError(f"{where}: report version {metrics.get('version')!r} is not supported "
                           f"(this signscale reads {EVAL_VERSION}); re-run the evaluation")
    return metrics


@dataclass(frozen=True)
class SliceRule:
    """The drop one kind of metric may take, and an absolute floor; metrics over fewer than
    ``min_support`` samples do not gate."""

    floor: float = 0.0  # absolute minimum (the promotion gate applies floors to its golden sets)
    tolerance: float = 0.01  # largest drop (accuracy fraction: 0.003 = 0.3 points)
    min_support: int = 30
    # also tolerate drops within z standard errors of the difference of two accuracies: a 60-sample
    # class slice moves by ~5 points between two equally good models, so a fixed small tolerance there
    # would call every candidate worse. 0: the fixed tolerance only.
    z: float = 0.0

    def allowed_drop(self, p: float, n: int) -> float:
        if self.z <= 0 or n <= 0 or not 0 <= p <= 1:
            return self.tolerance
        return max(self.tolerance, self.z * math.sqrt(2 * p * (1 - p) / n))

    def __post_init__(self) -> None:
        if not 0 <= self.floor <= 1 or not 0 <= self.tolerance <= 1 or self.min_support < 0:
            raise config_mod.ConfigError(f"slice rule: floor and tolerance in [0, 1], min_support >= 0; got {self}")


@dataclass(frozen=True)
class Rules:
    """Which :class:`SliceRule` each metric is judged by: ``overall`` for top-1 and the mCA, ``per_class``
    for class recalls and macro-F1 (an average over classes, as noisy as they are), ``per_condition``,
    ``per_country``, and ``per_corruption`` for each corruption x severity."""

    overall: SliceRule = field(default_factory=SliceRule)
    per_class: SliceRule = field(default_factory=SliceRule)
    per_condition: SliceRule = field(default_factory=SliceRule)
    per_country: SliceRule = field(default_factory=SliceRule)
    per_corruption: SliceRule = field(default_factory=SliceRule)

    @classmethod
    def uniform(cls, tolerance: float, min_support: int = 1) -> "Rules":
        r = SliceRule(tolerance=tolerance, min_support=min_support)
        return cls(r, r, r, r, r)

    def of(self, metric: str) -> SliceRule:
        kind = metric.split(":", 1)[0]
        return {"class": self.per_class, "macro_f1": self.per_class, "condition": self.per_condition,
                "country": self.per_country, "corruption": self.per_corruption}.get(kind, self.overall)


@dataclass(frozen=True)
class Difference:
    """One metric in both reports. ``gates``: whether it can make B 'worse'; ``tolerance``: the drop allowed."""

    metric: str  # e.g. top1, macro_f1, ece, class:stop, condition:snow, country:cn, corruption:fog@3, mca
    a: float | None
    b: float | None
    support: int  # samples behind the smaller of the two values (0: unknown or none)
    higher_is_better: bool
    gates: bool
    tolerance: float

    @property
    def delta(self) -> float | None:
        return None if self.a is None or self.b is None else self.b - self.a

    def _beyond(self, sign: int) -> bool:
        """True when B moved in direction ``sign`` (+1: better) by strictly more than the tolerance."""
        d = self.delta
        if d is None:
            return False
        gain = d if self.higher_is_better else -d
        # 1e-12 absorbs float noise, so "exactly the tolerance" is never a regression
        return sign * gain > self.tolerance + 1e-12

    @property
    def worse(self) -> bool:
        return self.gates and self._beyond(-1)

    @property
    def better(self) -> bool:
        return self._beyond(+1)

    @property
    def regressed(self) -> bool:
        """Worse beyond tolerance, whether or not this metric gates (ECE never gates)."""
        return self._beyond(-1)


@dataclass(frozen=True)
class Comparison:
    """Every metric of report B against report A; ``worse`` is the promotion gate's verdict."""

    a_name: str
    b_name: str
    tolerance: float
    min_support: int
    differences: tuple[Difference, ...]
    notes: tuple[str, ...] = ()

    @property
    def worse(self) -> bool:
        """B is worse than A by more than the tolerance on a gating metric (docs/evaluation.md)."""
        return any(d.worse for d in self.differences)

    @property
    def regressions(self) -> list[Difference]:
        return [d for d in self.differences if d.worse]

    def lines(self, *, verbose: bool = False) -> list[str]:
        """A table for the terminal: the overall metrics, then every per-group metric that moved beyond
        the tolerance (all of them with ``verbose``), then the verdict."""
        out = [f"A: {self.a_name}", f"B: {self.b_name}",
               f"{'metric':<44} {'A':>9} {'B':>9} {'B-A':>9} {'n':>7}"]
        hidden = 0
        for d in self.differences:
            overall = ":" not in d.metric
            if not (verbose or overall or d.regressed or d.better):
                hidden += 1
                continue
            flag = "WORSE" if d.worse else ("worse (not gating)" if d.regressed else ("better" if d.better else ""))
            out.append(f"{d.metric:<44} {_cell(d.a, d.metric)} {_cell(d.b, d.metric)} {_delta(d.delta, d.metric)} "
                       f"{d.support or '':>7}  {flag}".rstrip())
        if hidden:
            out.append(f"({hidden} per-class/condition/country/corruption metrics within +-{self.tolerance:g}; "
                       "--verbose lists them)")
        out += [f"note: {n}" for n in self.notes]
        out.append(self.summary())
        return out

    def summary(self) -> str:
        regs = self.regressions
        if regs:
            names = ", ".join(d.metric for d in regs[:6]) + (", ..." if len(regs) > 6 else "")
            return f"WORSE: B is below A by more than {self.tolerance:g} on {len(regs)} metric(s): {names}"
        return f"OK: B is not worse than A beyond {self.tolerance:g} on any gating metric"

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a_name, "b": self.b_name, "tolerance": self.tolerance, "min_support": self.min_support,
                "worse": self.worse, "notes": list(self.notes),
                "differences": [{"metric": d.metric, "a": d.a, "b": d.b, "delta": d.delta, "support": d.support,
                                 "gates": d.gates, "worse": d.worse, "better": d.better} for d in self.differences]}


def _cell(x: float | None, metric: str) -> str:
    if x is None:
        return f"{'-':>9}"
    return f"{x:>9.4f}" if metric in NOT_PERCENT else f"{100 * x:>8.2f}%"


def _delta(x: float | None, metric: str) -> str:
    if x is None:
        return f"{'-':>9}"
    return f"{x:>+9.4f}" if metric in NOT_PERCENT else f"{100 * x:>+8.2f}%"


def compare(a: Mapping[str, Any] | str, b: Mapping[str, Any] | str, *, tolerance: float = 0.005,
            min_support: int = 1, require_same_data: bool = True, rules: Rules | None = None) -> Comparison:
    """Compare report B (the candidate) with report A (the reference); see docs/evaluation.md.

    Gating metrics, each "worse" when B is below A by strictly more than ``tolerance`` (absolute,
    0.005 = half a percentage point): overall top-1 and macro-F1; the recall of every class with at
    least ``min_support`` samples in both reports; the accuracy of every condition and country with
    that many samples; every corruption x severity accuracy and the mCA when both reports have them.
    ECE and top-5 are reported but do not gate. ``rules`` replaces ``tolerance`` and ``min_support``
    with a rule per kind of metric (the promotion gate's). Reports of different data are refused
    unless ``require_same_data`` is False.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance: must be >= 0, got {tolerance}")
    rules = rules or Rules.uniform(tolerance, min_support)
    ma, mb = load_metrics(a), load_metrics(b)
    notes: list[str] = []
    ida, idb = ma["data"].get("id"), mb["data"].get("id")
    if ida != idb:
        msg = f"the reports are of different data (A: {ma['data'].get('spec')}, B: {mb['data'].get('spec')})"
        if require_same_data:
            raise CompareError(msg + "; evaluate both models on the same data, or pass require_same_data=False")
        notes.append(msg)
    diffs: list[Difference] = []

    def add(metric: str, va: Any, vb: Any, support: int, *, higher: bool = True, gates: bool = True) -> None:
        rule = rules.of(metric)
        allowed = rule.allowed_drop(va, support) if isinstance(va, (int, float)) else rule.tolerance
        diffs.append(Difference(metric, va, vb, support, higher, gates and support >= max(1, rule.min_support),
                                allowed))

    oa, ob = ma["overall"], mb["overall"]
    n = min(oa["count"], ob["count"])
    add("top1", oa["top1"], ob["top1"], n)
    add("macro_f1", oa["macro_f1"], ob["macro_f1"], n)
    add("top5", oa["top5"], ob["top5"], n, gates=False)
    add("ece", oa["ece"], ob["ece"], n, higher=False, gates=False)
    for cov in ("99", "95"):  # selective prediction: the error left when the least sure 1% / 5% are set aside
        key = f"error_at_{cov}_coverage"
        if oa.get(key) is not None and ob.get(key) is not None:
            add(key, oa[key], ob[key], n, higher=False, gates=False)
    ca, cb = {c["key"]: c for c in ma["classes"]}, {c["key"]: c for c in mb["classes"]}
    for key in [k for k in ca if k in cb]:
        add(f"class:{key}", ca[key]["recall"], cb[key]["recall"], min(ca[key]["support"], cb[key]["support"]))
    only = sorted(set(ca) ^ set(cb))
    if only:
        notes.append(f"{len(only)} class(es) in one report only, not compared: {', '.join(only[:8])}"
                     + (", ..." if len(only) > 8 else ""))
    for kind, key in (("condition", "conditions"), ("country", "countries")):
        ga, gb = ma.get(key, {}), mb.get(key, {})
        for name in [k for k in ga if k in gb]:
            add(f"{kind}:{name}", ga[name]["accuracy"], gb[name]["accuracy"], min(ga[name]["count"], gb[name]["count"]))
    _robustness(add, ma.get("robustness"), mb.get("robustness"), n, notes)
    return Comparison(_report_name(a, ma), _report_name(b, mb), rules.overall.tolerance, rules.overall.min_support,
                      tuple(diffs), tuple(notes))


def _robustness(add: Callable[..., None], ra: dict[str, Any] | None, rb: dict[str, Any] | None, n: int,
                notes: list[str]) -> None:
    """The mCA and every corruption x severity both reports have."""
    if not (ra and rb):
        if ra or rb:
            notes.append(f"only {'A' if ra else 'B'} has corruption results: robustness not compared")
        return
    add("mca", ra["mca"], rb["mca"], n)
    res_a = {(r["corruption"], r["severity"]): r for r in ra["results"]}
    for r in rb["results"]:
        key = (r["corruption"], r["severity"])
        if key in res_a:
            add(f"corruption:{key[0]}@{key[1]}", res_a[key]["accuracy"], r["accuracy"],
                min(res_a[key]["count"], r["count"]))
    if ra.get("seed") != rb.get("seed"):
        notes.append(f"corruption seeds differ (A: {ra.get('seed')}, B: {rb.get('seed')}): the corrupted "
                     "images are not the same")


def _report_name(src: Mapping[str, Any] | str, m: Mapping[str, Any]) -> str:
    model = m.get("model", {})
    sha = (model.get("sha256") or "")[:12]
    where = src if isinstance(src, str) else "metrics"
    return f"{where} (model {model.get('url', '?')}, sha256 {sha or '?'}, data {m['data'].get('spec')})"

"""The continual-learning loop: ingest -> retrain with replay -> evaluate -> gate -> promote or reject.

One cycle (:func:`run_cycle`) takes the inbox's new uploads as one batch and ends with exactly one
of: nothing to do, the batch rejected before training (label noise, too much unusable data), the
candidate rejected by the gate, or the candidate promoted to ``production`` and the batch published
as a new dataset version. The decision and every number behind it go to the registry's history.

**Crash safety.** Each step writes its result under ``WORK/cycles/<batch>/`` before the next starts,
and ``state.json`` names the last finished step. A re-run resumes the unfinished cycle: ingest resumes
its batch from the ledger, training resumes from its last checkpoint, finished steps are skipped.
``production`` only ever moves by one conditional write at the very end, made against the production
version the candidate was compared with, so a crash anywhere leaves production untouched and two
concurrent cycles cannot both promote.

**Replay.** The candidate is fine-tuned from production (``TrainConfig.init_from``) on a stream mix
of the new batch and the older data (``replay``: the fraction of samples drawn from older data), so it
learns the new slice without forgetting the old ones; ``from_scratch`` trains a new model on all data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Literal

from signscale import config as config_mod
from signscale import storage
from signscale.continual import gate, ingest
from signscale.continual.gate import GateConfig
from signscale.data import datasets
from signscale.data.manifest import Manifest
from signscale.serving.registry import AliasConflict, Registry


class ContinualError(ValueError):
    """A cycle that cannot run as configured; the message names the key or URL."""


@dataclass(frozen=True)
class ContinualConfig:
    """One continual-learning setup: where data arrives, where models live, how candidates are judged."""

    registry: str
    dataset: str
    inbox: str
    golden: str  # packed dataset: the fixed golden evaluation set (clear weather)
    work: str = ""  # cycle state, runs and reports (default: REGISTRY/_cycles)
    slices: dict[str, str] = field(default_factory=dict)  # new-slice eval sets by condition, e.g. {snow: URL}
    never_regress: str = ""  # packed dataset of past edge cases; uploads can never enter it
    canary: str = ""  # packed dataset of clean signs of gate.canary.target (default: golden's)
    replay: float = 0.5  # fraction of training samples drawn from older data
    # how the replay share is split over the older parts (version 1 and each accepted batch): by their
    # size, or equally, which keeps recent edge cases (a small snow batch) from being swamped by the base
    replay_split: Literal["size", "equal"] = "size"
    from_scratch: bool = False
    steps: int = 200  # fine-tuning optimizer steps (from scratch: train.epochs decides)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides: lr, batch_size, model, ...
    gate: GateConfig = field(default_factory=GateConfig)
    chunk: int = 256
    near_dup_bits: int = 1  # see IngestConfig.near_dup_bits
    max_quarantine: float = 0.5
    noise_confidence: float = 0.9
    queue_confidence: float = 0.6  # unlabelled uploads production is less sure of go to the labelling queue
    min_new: int = 1  # watch: run a cycle when at least this many new objects wait
    every_s: float = 0.0  # watch: also run on this schedule (0: only on min_new)
    poll_s: float = 30.0  # watch: how often to look at the inbox

    def __post_init__(self) -> None:
        for key in ("registry", "dataset", "inbox", "golden"):
            if not getattr(self, key):
                raise config_mod.ConfigError(f"{key}: required (see docs/continual.md for a config example)")
        if not 0.0 <= self.replay < 1.0:
            raise config_mod.ConfigError(f"replay: the fraction of older data must be in [0, 1), got {self.replay}")

    def work_url(self) -> str:
        return self.work or storage.join(self.registry, "_cycles")


@dataclass
class CycleResult:
    batch: str = ""
    outcome: str = "nothing"  # nothing | rejected_data | rejected | promoted
    reasons: list[str] = field(default_factory=list)
    production: str = ""  # production version after the cycle
    candidate: str = ""
    dataset_version: int = 0
    ingest: dict[str, Any] = field(default_factory=dict)
    numbers: dict[str, Any] = field(default_factory=dict)  # headline accuracies: production vs candidate
    suspicious: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        if self.outcome == "nothing":
            return "continual: nothing new in the inbox"
        nums = "; ".join(f"{k} {v['production']:.2%} -> {v['candidate']:.2%}" for k, v in self.numbers.items())
        head = {"promoted": f"PROMOTED {self.candidate} to production",
                "rejected": f"REJECTED candidate {self.candidate}; production stays {self.production}",
                "rejected_data": f"REJECTED batch {self.batch} before training; production stays {self.production}",
                }[self.outcome]
        why = f" because: {'; '.join(self.reasons)}" if self.reasons else ""
        return f"cycle {self.batch}: {head}{why}" + (f" [{nums}]" if nums else "") + f" ({self.seconds:.0f}s)"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Cycle state


class _State:
    """``WORK/cycles/<batch>/state.json``: the steps done and their results (written after each)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.data: dict[str, Any] = storage.read_json(url) if storage.exists(url) else {"steps": {}}

    def done(self, step: str) -> bool:
        return step in self.data["steps"]

    def get(self, step: str) -> Any:
        return self.data["steps"][step]

    def put(self, step: str, value: Any) -> None:
        self.data["steps"][step] = value
        self.data["updated"] = _now()
        storage.write_json(self.url, self.data)


def _cycles_dir(cfg: ContinualConfig) -> str:
    return storage.join(cfg.work_url(), "cycles")


def _unfinished(cfg: ContinualConfig) -> str | None:
    try:
        entries = storage.listdir(_cycles_dir(cfg))
    except FileNotFoundError:
        return None
    for e in sorted(entries):
        st = storage.join(e, "state.json")
        if storage.exists(st) and "end" not in storage.read_json(st)["steps"]:
            return e.rstrip("/").rsplit("/", 1)[-1]
    return None


def eval_sets(cfg: ContinualConfig) -> dict[str, str]:
    """The gate's evaluation sets: name -> packed dataset URL."""
    sets = {"golden": cfg.golden, **dict(sorted(cfg.slices.items()))}
    if cfg.never_regress:
        sets[cfg.gate.never_regress] = cfg.never_regress
    return sets


def protected_sets(cfg: ContinualConfig) -> tuple[str, ...]:
    return tuple(u for u in (cfg.golden, *cfg.slices.values(), cfg.never_regress, cfg.canary) if u)


# ---------------------------------------------------------------------------------------------
# One cycle


def _train_config(cfg: ContinualConfig, parts: tuple[str, ...], part_counts: list[int], batch_url: str,
                  init: str, out: str) -> Any:
    from signscale.training.train import TrainConfig

    if cfg.replay_split == "equal":
        weights = tuple(cfg.replay / len(part_counts) for _ in part_counts) + (1.0 - cfg.replay,)
    else:
        old_total = max(1, sum(part_counts))
        weights = tuple(cfg.replay * n / old_total for n in part_counts) + (1.0 - cfg.replay,)
    base: dict[str, Any] = {"data": list(parts) + [batch_url], "weights": list(weights), "out": out,
                            "resume": "auto", "progress": False, "ema": 0.0, "lr": 3e-4, "schedule": "cosine",
                            "warmup_frac": 0.05}
    if cfg.from_scratch:
        base.update(weights=[], init_from="")
    else:
        base.update(init_from=init, max_steps=cfg.steps, epochs=10**6)  # the steps decide (cfg.steps)
    return config_mod.build(TrainConfig, {**base, **cfg.train})


def run_cycle(cfg: ContinualConfig, *, log: Callable[[str], None] = print) -> CycleResult:
    """One cycle; resumes an unfinished one first. See the module docstring."""
    started = time.perf_counter()
    reg = Registry(cfg.registry)
    prod = reg.alias("production")
    if prod is None:
        raise ContinualError(f"{cfg.registry}: no production model; register and promote one first "
                             "(signscale registry promote) or run `signscale continual demo`")
    batch = _unfinished(cfg)
    prod_version = reg.get(prod.version)
    # label noise is judged where production is reliable: the conditions of the data it was trained on
    trained_on = prod_version.dataset.get("version")
    known: tuple[str, ...] = ()
    if trained_on and prod_version.dataset.get("url", "").rstrip("/") == cfg.dataset.rstrip("/"):
        with contextlib.suppress(datasets.DatasetVersionError):
            known = tuple(datasets.load_version(cfg.dataset, int(trained_on) + (1 if prod_version.dataset.get("batch")
                                                                                  else 0)).counts.get("condition", {}))
    icfg = ingest.IngestConfig(inbox=cfg.inbox, dataset=cfg.dataset, chunk=cfg.chunk, near_dup_bits=cfg.near_dup_bits,
                               protected=protected_sets(cfg), publish=False, max_quarantine=cfg.max_quarantine,
                               model=storage.join(cfg.registry, "versions", prod.version, "model"),
                               noise_confidence=cfg.noise_confidence, max_noise=1.0,  # the gate judges noise
                               noise_conditions=known, queue_confidence=cfg.queue_confidence)
    if batch is None:
        res = ingest.ingest(icfg)
        if res.state == "empty":
            return CycleResult(production=prod.version, seconds=time.perf_counter() - started)
        batch = res.batch
        state = _State(storage.join(_cycles_dir(cfg), batch, "state.json"))
        state.put("ingest", {k: v for k, v in res.__dict__.items()})
        state.put("production", prod.version)
        log(res.summary())
    else:
        state = _State(storage.join(_cycles_dir(cfg), batch, "state.json"))
        log(f"resuming cycle {batch} after step(s) {', '.join(state.data['steps'])}")
        if not state.done("ingest"):  # crashed inside ingest: the ledger resumes the same batch
            res = ingest.ingest(icfg)
            state.put("ingest", dict(res.__dict__))
        if not state.done("production"):
            state.put("production", prod.version)
    return _after_ingest(cfg, reg, state, batch, started, log)


def _after_ingest(cfg: ContinualConfig, reg: Registry, state: _State, batch: str, started: float,
                  log: Callable[[str], None]) -> CycleResult:
    ing = state.get("ingest")
    base_version = state.get("production")
    result = CycleResult(batch=batch, production=base_version, ingest=ing,
                         suspicious=list((ing.get("noise") or {}).get("suspicious", [])))
    cdir = storage.join(_cycles_dir(cfg), batch)
    # 1. the data gate: a batch the checks reject is not worth training on
    pre = gate.decide(None, {"sets": {}}, cfg.gate, batch=ing)
    if ing["state"] == "rejected" or not pre.promote or not ing["kept"]:
        reasons = pre.reasons or [ing.get("reason") or "the batch holds no labelled sample to train on"]
        return _finish(cfg, reg, state, result, "rejected_data", reasons, started, evidence={
            "batch": batch, "ingest": _ingest_evidence(ing), "gate": pre.to_dict()})
    # 2. train a candidate from production on the replay mix
    head = datasets.head(cfg.dataset)
    prod_model = reg.get(base_version).model_url
    run = storage.join(cdir, "run")
    if not state.done("train"):
        _train_candidate(cfg, state, head, ing, batch, prod_model, run, base_version, log)
    cand_model = state.get("train")["model"]
    # 3. evaluate both on the same fixed sets
    if not state.done("evaluate"):
        state.put("evaluate", _evaluate_both(cfg, cdir, prod_model, cand_model))
    reports = storage.read_json(state.get("evaluate"))
    # 4. the gate
    targets = tuple(f"{name}/overall" for name in cfg.slices if name in ing["counts"].get("condition", {}))
    gcfg = dataclasses.replace(cfg.gate, targets=tuple(cfg.gate.targets) + targets)
    decision = gate.decide(reports["production"], reports["candidate"], gcfg, batch=ing)
    result.numbers = _headline(reports)
    evidence = {"batch": batch, "ingest": _ingest_evidence(ing), "gate": decision.to_dict(),
                "numbers": result.numbers, "reports": state.get("evaluate")}
    # 5. register the candidate (promoted or not: every evaluated model is a version with its lineage)
    if not state.done("register"):
        state.put("register", _register_candidate(cfg, reg, state.get("train"), cand_model, base_version, batch,
                                                  result.numbers))
    result.candidate = state.get("register")
    if not decision.promote:
        return _finish(cfg, reg, state, result, "rejected", decision.reasons, started, evidence=evidence)
    # 6. promote: publish the batch, then move production against the version we compared with
    if not state.done("publish"):
        dv = ingest.publish_batch(cfg.dataset, batch, note=f"accepted by cycle {batch} ({result.candidate})")
        state.put("publish", dv.version)
    result.dataset_version = state.get("publish")
    try:
        reg.promote(
            result.candidate,
            expect=base_version,
            reason=f"gate passed on cycle {batch}: "
            + ", ".join(f"{k} {v['production']:.2%} -> {v['candidate']:.2%}" for k, v in result.numbers.items()),
            evidence={**evidence, "dataset_version": result.dataset_version},
        )
    except AliasConflict as exc:
        return _finish(cfg, reg, state, result, "rejected", [str(exc)], started, evidence=evidence, record=False)
    result.production = result.candidate
    return _finish(cfg, reg, state, result, "promoted", [], started, evidence=evidence, record=False)


def _train_candidate(cfg: ContinualConfig, state: _State, head: Any, ing: dict[str, Any], batch: str,
                     prod_model: str, run: str, base_version: str, log: Callable[[str], None]) -> None:
    """Step 2: fine-tune from production (or train from scratch) on the replay mix; record the run."""
    from signscale.training.train import train

    tcfg = _train_config(cfg, head.parts, [Manifest.load(p).count for p in head.parts], ing["batch_url"],
                         prod_model, run)
    log(f"training candidate: {'from scratch' if cfg.from_scratch else f'fine-tune from {base_version}'} on "
        f"dataset v{head.version} + {batch} (replay {cfg.replay:.0%})")
    tr = train(tcfg)
    state.put("train", {"model": tr.model_url, "steps": tr.steps, "seconds": tr.seconds,
                        "config": config_mod.to_dict(tcfg), "dataset_version": head.version})


def _evaluate_both(cfg: ContinualConfig, cdir: str, prod_model: str, cand_model: str) -> str:
    """Step 3: production and candidate scored on the same fixed sets; returns where the reports are."""
    sets = eval_sets(cfg)
    reports = {"production": gate.report(prod_model, sets, canary=cfg.gate.canary, canary_set=cfg.canary),
               "candidate": gate.report(cand_model, sets, canary=cfg.gate.canary, canary_set=cfg.canary)}
    url = storage.join(cdir, "reports.json")
    storage.write_json(url, reports)
    return url


def _register_candidate(cfg: ContinualConfig, reg: Registry, tr: dict[str, Any], cand_model: str, base_version: str,
                        batch: str, numbers: dict[str, Any]) -> str:
    """Step 5: every evaluated model becomes a version with its lineage, aliased ``candidate``."""
    v = reg.register(cand_model, parent=base_version,
                     dataset={"url": cfg.dataset, "version": tr["dataset_version"], "batch": batch},
                     metrics={k: v["candidate"] for k, v in numbers.items()},
                     config={"train": tr["config"], "replay": cfg.replay}, note=f"candidate from cycle {batch}")
    reg.set_alias("candidate", v.id, reason=f"cycle {batch}")
    return v.id


def _ingest_evidence(ing: dict[str, Any]) -> dict[str, Any]:
    keep = ("batch", "new", "kept", "unlabelled", "quarantined", "duplicates", "near_duplicates", "protected",
            "by_reason", "noise", "queue", "counts")
    return {k: ing.get(k) for k in keep}


def _headline(reports: dict[str, Any]) -> dict[str, dict[str, float]]:
    out = {}
    for name, m in reports["candidate"]["sets"].items():
        out[name] = {"production": reports["production"]["sets"][name]["overall"]["top1"],
                     "candidate": m["overall"]["top1"]}
    if "canary" in reports["candidate"]:
        out["canary_flip"] = {"production": reports["production"]["canary"]["rate"],
                              "candidate": reports["candidate"]["canary"]["rate"]}
    return out


def _finish(cfg: ContinualConfig, reg: Registry, state: _State, result: CycleResult, outcome: str,
            reasons: list[str], started: float, *, evidence: dict[str, Any], record: bool = True) -> CycleResult:
    result.outcome, result.reasons = outcome, reasons
    if record and not state.done("end"):
        reg.reject(result.candidate or None, reason="; ".join(reasons), evidence=evidence)
        ingest.set_status(cfg.dataset, result.batch, "rejected", reason="; ".join(reasons))
    result.seconds = time.perf_counter() - started
    state.put("end", {"outcome": outcome, "reasons": reasons, "candidate": result.candidate,
                      "production": result.production, "numbers": result.numbers})
    return result


# ---------------------------------------------------------------------------------------------
# watch


def watch(cfg: ContinualConfig, *, max_cycles: int = 0, log: Callable[[str], None] = print,
          sleep: Callable[[float], None] = time.sleep) -> list[CycleResult]:
    """Poll the inbox; run a cycle when ``min_new`` objects wait, on the ``every_s`` schedule, or to
    finish an interrupted cycle. ``max_cycles`` > 0 stops after that many cycles (tests, cron jobs)."""
    results: list[CycleResult] = []
    last = time.monotonic()
    icfg = ingest.IngestConfig(inbox=cfg.inbox, dataset=cfg.dataset)
    while not max_cycles or len(results) < max_cycles:
        waiting = ingest.pending(icfg)
        due = cfg.every_s > 0 and time.monotonic() - last >= cfg.every_s
        if _unfinished(cfg) or waiting >= max(1, cfg.min_new) or (due and waiting):
            r = run_cycle(cfg, log=log)
            log(r.summary())
            results.append(r)
            last = time.monotonic()
            continue
        sleep(cfg.poll_s)  # polling an inbox on a schedule, not synchronising with anything
    return results

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

import numpy as np

from signscale import config as config_mod
from signscale import datasets, gate, ingest, storage
from signscale.gate import GateConfig
from signscale.registry import AliasConflict, Registry
from signscale.shards import Manifest


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


def eval_sets(cfg: ContinualConfig) -> list[gate.EvalSet]:
    sets = [gate.EvalSet.from_dataset("golden", cfg.golden)]
    sets += [gate.EvalSet.from_dataset(name, url) for name, url in sorted(cfg.slices.items())]
    if cfg.never_regress:
        sets.append(gate.EvalSet.from_dataset(cfg.gate.never_regress, cfg.never_regress))
    return sets


def protected_sets(cfg: ContinualConfig) -> tuple[str, ...]:
    return tuple(u for u in (cfg.golden, *cfg.slices.values(), cfg.never_regress, cfg.canary) if u)


# ---------------------------------------------------------------------------------------------
# One cycle


def _train_config(cfg: ContinualConfig, parts: tuple[str, ...], part_counts: list[int], batch_url: str,
                  init: str, out: str) -> Any:
    from signscale.train import TrainConfig

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
        base.update(init_from=init, max_steps=cfg.steps, epochs=1)
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
        from signscale.train import train

        tcfg = _train_config(cfg, head.parts, [Manifest.load(p).count for p in head.parts],
                             ing["batch_url"], prod_model, run)
        log(f"training candidate: {'from scratch' if cfg.from_scratch else f'fine-tune from {base_version}'} on "
            f"dataset v{head.version} + {batch} (replay {cfg.replay:.0%})")
        tr = train(tcfg)
        state.put("train", {"model": tr.model_url, "steps": tr.steps, "seconds": tr.seconds,
                            "config": config_mod.to_dict(tcfg), "dataset_version": head.version})
    cand_model = state.get("train")["model"]
    # 3. evaluate both on the same fixed sets
    if not state.done("evaluate"):
        sets = eval_sets(cfg)
        cset = gate.EvalSet.from_dataset("canary", cfg.canary) if cfg.canary else None
        reports = {"production": gate.report(prod_model, sets, canary=cfg.gate.canary, canary_set=cset),
                   "candidate": gate.report(cand_model, sets, canary=cfg.gate.canary, canary_set=cset)}
        storage.write_json(storage.join(cdir, "reports.json"), reports)
        state.put("evaluate", storage.join(cdir, "reports.json"))
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
        tr = state.get("train")
        v = reg.register(cand_model, parent=base_version,
                         dataset={"url": cfg.dataset, "version": tr["dataset_version"], "batch": batch},
                         metrics={k: v["candidate"] for k, v in result.numbers.items()},
                         config={"train": tr["config"], "replay": cfg.replay}, note=f"candidate from cycle {batch}")
        reg.set_alias("candidate", v.id, reason=f"cycle {batch}")
        state.put("register", v.id)
    result.candidate = state.get("register")
    if not decision.promote:
        return _finish(cfg, reg, state, result, "rejected", decision.reasons, started, evidence=evidence)
    # 6. promote: publish the batch, then move production against the version we compared with
    if not state.done("publish"):
        dv = ingest.publish_batch(cfg.dataset, batch, note=f"accepted by cycle {batch} ({result.candidate})")
        state.put("publish", dv.version)
    result.dataset_version = state.get("publish")
    try:
        reg.promote(result.candidate, expect=base_version, reason=f"gate passed on cycle {batch}: "
                    + ", ".join(f"{k} {v['production']:.2%} -> {v['candidate']:.2%}" for k, v in result.numbers.items()),
                    evidence={**evidence, "dataset_version": result.dataset_version})
    except AliasConflict as exc:
        return _finish(cfg, reg, state, result, "rejected", [str(exc)], started, evidence=evidence, record=False)
    result.production = result.candidate
    return _finish(cfg, reg, state, result, "promoted", [], started, evidence=evidence, record=False)


def _ingest_evidence(ing: dict[str, Any]) -> dict[str, Any]:
    keep = ("batch", "new", "kept", "unlabelled", "quarantined", "duplicates", "near_duplicates", "protected",
            "by_reason", "noise", "queue", "counts")
    return {k: ing.get(k) for k in keep}


def _headline(reports: dict[str, Any]) -> dict[str, dict[str, float]]:
    out = {}
    for name, sl in reports["candidate"]["sets"].items():
        out[name] = {"production": reports["production"]["sets"][name]["overall"]["acc"],
                     "candidate": sl["overall"]["acc"]}
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


# ---------------------------------------------------------------------------------------------
# The demo scenario


@dataclass(frozen=True)
class DemoConfig:
    """``signscale continual demo``: the whole story on GTSRB (or synthetic signs) in one command."""

    out: str = "signscale-continual-demo"
    gtsrb: str = ""  # GTSRB training zip or folder; empty: synthetic signs (no data needed)
    synthetic_train: int = 3000  # synthetic mode: production's clear-weather training signs
    synthetic_eval: int = 600  # synthetic mode: signs per evaluation set and per upload
    classes: tuple[int, ...] = ()  # synthetic mode: render only these classes (stop, 14, and 30 km/h, 1, always)
    held_out: float = 0.3  # GTSRB: fraction of tracks held out from production (golden + uploads)
    model: str = "msnet"
    epochs: int = 3  # production's training epochs
    steps: int = 150  # fine-tuning steps per cycle
    batch_size: int = 128
    lr: float = 1e-4  # fine-tuning learning rate (AdamW, cosine)
    replay: float = 0.7
    replay_split: str = "equal"  # size | equal (see ContinualConfig)
    clear_tolerance: float = 0.003  # golden (clear) accuracy may drop at most this much
    min_improvement: float = 0.10  # the new slice (snow) must improve at least this much
    class_tolerance: float = 0.05
    poison_fraction: float = 0.3  # the poisoned upload: this fraction of its labels shuffled
    backdoor_copies: int = 3  # stickered copies of each stop sign in the backdoor upload
    backdoor_condition: str = "clear"  # weather of the clean images the backdoor hides among
    workers: int = 1  # loader workers for training
    threads: int = 1  # torch threads (1 is fastest on a busy small machine; 0: torch's default)
    s3: bool = True  # put the inbox on a local S3 server (moto, 127.0.0.1); else a local folder
    seed: int = 0


# Without GTSRB: 8 classes of synthetic signs and a small model, so the story runs in a few minutes
SYNTHETIC_PRESET: dict[str, Any] = {"synthetic_train": 2000, "synthetic_eval": 300, "model": "small_cnn",
                                    "classes": [1, 2, 13, 14, 17, 25, 33, 38], "epochs": 8, "steps": 100,
                                    "batch_size": 64, "lr": 3e-4, "replay": 0.5, "workers": 0,
                                    "clear_tolerance": 0.03, "min_improvement": 0.05, "class_tolerance": 0.25}


@dataclass
class DemoResult:
    out: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        f = self.figures
        lines = [f"continual demo in {self.seconds:.0f}s ({self.out})"]
        if "snow_before" in f:
            lines.append(f"  cycle 1 (snow upload): {f['cycle1']}; snow {f['snow_before']:.2%} -> {f['snow_after']:.2%} "
                         f"({100 * (f['snow_after'] - f['snow_before']):+.1f} pts), clear {f['clear_before']:.2%} -> "
                         f"{f['clear_after']:.2%} ({100 * (f['clear_after'] - f['clear_before']):+.2f} pts)")
        if "cycle2" in f:
            lines.append(f"  cycle 2 (poisoned upload): {f['cycle2']}; suspicious vehicle(s): "
                         f"{', '.join(f['suspicious']) or 'none'}; production stays {f['production_after_poison']}")
        if "cycle3" in f:
            lines.append(f"  cycle 3 (sticker backdoor): {f['cycle3']}; canary flip {f['canary_production']:.0%} -> "
                         f"{f['canary_candidate']:.0%}; reasons: {'; '.join(f['cycle3_reasons'])}")
        if "rollback_to" in f:
            lines.append(f"  rollback: production {f['rollback_from']} -> {f['rollback_to']}")
        return "\n".join(lines)


@dataclass
class _Images:
    images: np.ndarray
    labels: np.ndarray
    tracks: list[str]

    def take(self, idx: np.ndarray) -> "_Images":
        return _Images(self.images[idx], self.labels[idx], [self.tracks[int(i)] for i in idx])


def _corrupt(imgs: np.ndarray, kind: str, seed: int) -> np.ndarray:
    from signscale.corruptions import apply_corruption

    out = np.empty_like(imgs)
    for i in range(len(imgs)):
        rng = np.random.default_rng([seed, i])
        out[i] = apply_corruption(imgs[i], kind, int(rng.integers(3, 6)), rng)
    return out


def _records(imgs: np.ndarray, labels: np.ndarray, *, first_id: int, condition: str,
             tracks: list[str] | None = None) -> np.ndarray:
    from signscale import shards
    from signscale.labels import COUNTRIES
    from signscale.sources import CONDITIONS

    r = np.zeros(len(imgs), dtype=shards.record_dtype("raw", imgs.shape[1:]))
    r["image"], r["label"] = imgs, labels
    r["id"] = np.arange(first_id, first_id + len(imgs))
    r["track"] = [shards.track_hash(t) for t in tracks] if tracks else -1
    r["roi"] = -1
    r["condition"] = CONDITIONS.index(condition)
    r["country"] = COUNTRIES.index("de")
    return r


def _gtsrb_groups(cfg: DemoConfig, base_out: str, log: Callable[[str], None]) -> dict[str, _Images]:
    """Pack production's clear training split; read the held-out tracks into golden and upload groups."""
    from signscale import images
    from signscale.pack import PackConfig, pack
    from signscale.sources import Sample, open_source
    from signscale.sources.gtsrb import track_split

    spec = f"gtsrb:{cfg.gtsrb}?split=train&val_fraction={cfg.held_out}&seed={cfg.seed}"
    res = pack(PackConfig(source=spec, out=base_out, crop="roi", size=32, progress=False))
    log(f"production data: {res.summary()}")
    src = open_source(f"gtsrb:{cfg.gtsrb}")
    _, val = src.split_indices(cfg.held_out, cfg.seed)  # type: ignore[attr-defined]
    imgs, labels, tracks = [], [], []
    for i in val:
        s = src.read(int(i))
        if not isinstance(s, Sample):
            continue
        arr = images.decode(s.image)  # type: ignore[arg-type]
        if s.roi is not None:
            arr = images.crop_box(arr, s.roi)
        imgs.append(images.resize(arr, 32))
        labels.append(s.label)
        tracks.append(s.track or f"u{i}")
    held = _Images(np.stack(imgs), np.array(labels, dtype=np.int64), tracks)
    rest, golden = track_split(held.tracks, held.labels, 0.4, cfg.seed + 1)
    rest_i = held.take(rest)
    rest2, fleet = track_split(rest_i.tracks, rest_i.labels, 0.5, cfg.seed + 2)
    rest2_i = rest_i.take(rest2)
    poison, backdoor = track_split(rest2_i.tracks, rest2_i.labels, 0.5, cfg.seed + 3)
    return {"golden": held.take(golden), "fleet": rest_i.take(fleet), "poison": rest2_i.take(poison),
            "backdoor": rest2_i.take(backdoor)}


def _synthetic_groups(cfg: DemoConfig, base_out: str, log: Callable[[str], None]) -> dict[str, _Images]:
    from signscale.pack import PackConfig, pack
    from signscale.sources.synthetic import SyntheticSource

    classes = tuple(sorted({*cfg.classes, 1, 14})) if cfg.classes else None
    only = f"&classes={','.join(map(str, classes))}" if classes else ""
    res = pack(PackConfig(source=f"synthetic:?n={cfg.synthetic_train}&size=32&seed={cfg.seed + 11}&weather=0{only}",
                          out=base_out, size=32, workers=0, progress=False))
    log(f"production data: {res.summary()}")

    def render(seed: int, n: int, classes: tuple[int, ...] | None = classes) -> _Images:
        src = SyntheticSource(n=n, size=32, seed=seed, weather=0.0, classes=classes)
        ss = [src.read(i) for i in range(n)]
        return _Images(np.stack([s.image for s in ss]), np.array([s.label for s in ss], np.int64),  # type: ignore
                       [s.track or "" for s in ss])

    n = cfg.synthetic_eval
    return {"golden": render(cfg.seed + 12, n), "fleet": render(cfg.seed + 13, n),
            "poison": render(cfg.seed + 14, n), "backdoor": render(cfg.seed + 15, n),
            "stops": render(cfg.seed + 16, max(40, n // 8), classes=(14,)),
            "attack_stops": render(cfg.seed + 17, max(20, n // 20), classes=(14,))}


def _upload(inbox: str, prefix: str, data: _Images, *, condition: str, vehicles: list[str],
            onboard: tuple[np.ndarray, np.ndarray] | None = None, threads: int = 16) -> int:
    """Write images (PNG) and JSON sidecars the way vehicles would."""
    from concurrent.futures import ThreadPoolExecutor

    from signscale import images

    def put(i: int) -> None:
        key = f"{prefix}/{vehicles[i]}/{i:05d}"
        side: dict[str, Any] = {"label": int(data.labels[i]), "vehicle": vehicles[i], "condition": condition,
                                "time": f"2026-11-25T{8 + i % 10:02d}:{i % 60:02d}:00Z",
                                "gps": [round(48 + (i % 97) / 50, 4), round(9 + (i % 89) / 40, 4)],
                                "track": data.tracks[i]}
        if onboard is not None:
            side.update(prediction=int(onboard[0][i]), confidence=round(float(onboard[1][i]), 3))
        storage.write_bytes(storage.join(inbox, key + ".png"), images.encode_png(data.images[i]))
        storage.write_json(storage.join(inbox, key + ".json"), side)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, range(len(data.labels))))
    return len(data.labels)


def _vehicles(tracks: list[str], names: list[str]) -> list[str]:
    """Vehicle per image: a whole track is seen by one vehicle."""
    import hashlib

    return [names[int.from_bytes(hashlib.blake2b(t.encode(), digest_size=4).digest(), "little") % len(names)]
            for t in tracks]


def run_demo(cfg: DemoConfig, *, log: Callable[[str], None] = print) -> DemoResult:
    """The scenario of docs/continual.md, end to end; returns the figures."""
    import contextlib
    import shutil

    started = time.perf_counter()
    out = cfg.out.rstrip("/")
    lp = storage.local_path(out)
    if lp is None:
        raise ContinualError(f"out: the demo writes a local folder, got {out!r}")
    import os

    if os.path.exists(lp):
        if not os.path.exists(os.path.join(lp, "continual-demo.json")):
            raise ContinualError(f"out: {lp} exists and is not a previous continual demo; choose another --out")
        shutil.rmtree(lp)
    storage.write_json(storage.join(out, "continual-demo.json"), {"config": config_mod.to_dict(cfg)})
    result = DemoResult(out=out)
    import torch

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # evaluation and predictions run in this process
    stack = contextlib.ExitStack()
    stack.callback(torch.set_num_threads, threads)
    with stack:
        if cfg.s3:
            from signscale import s3local

            server = stack.enter_context(s3local.running())
            inbox = server.make_bucket("fleet-uploads") + "/inbox"
            log(f"inbox on the local S3 server {server.endpoint}: {inbox}")
        else:
            inbox = storage.join(out, "inbox")
        _demo(cfg, out, inbox, result, log)
    result.seconds = time.perf_counter() - started
    storage.write_json(storage.join(out, "continual-demo.json"), {"config": config_mod.to_dict(cfg),
                                                                  "figures": result.figures,
                                                                  "seconds": result.seconds,
                                                                  "history": result.history})
    return result


def _demo(cfg: DemoConfig, out: str, inbox: str, result: DemoResult, log: Callable[[str], None]) -> None:
    from signscale.registry import describe_event
    from signscale.train import TrainConfig, train

    t0 = time.perf_counter()
    base = storage.join(out, "data", "signs")
    groups = _gtsrb_groups(cfg, base, log) if cfg.gtsrb else _synthetic_groups(cfg, base, log)
    log("held out: " + ", ".join(f"{k} {len(v.labels)}" for k, v in groups.items()))
    g = groups["golden"]
    ev = storage.join(out, "eval")
    datasets.write_dataset(storage.join(ev, "golden"), _records(g.images, g.labels, first_id=10**9, condition="clear",
                                                                tracks=g.tracks), label_space=Manifest.load(base).label_space,
                           name="golden")
    space = Manifest.load(base).label_space
    snow_imgs = _corrupt(g.images, "snow", cfg.seed + 100)
    datasets.write_dataset(storage.join(ev, "snow"), _records(snow_imgs, g.labels, first_id=2 * 10**9,
                                                              condition="snow", tracks=g.tracks),
                           label_space=space, name="golden-snow")
    half = len(g.labels) // 2
    nr = np.concatenate([_corrupt(g.images[:half], "fog", cfg.seed + 101), _corrupt(g.images[half:], "night",
                                                                                     cfg.seed + 102)])
    nr_rec = np.concatenate([_records(nr[:half], g.labels[:half], first_id=3 * 10**9, condition="fog"),
                             _records(nr[half:], g.labels[half:], first_id=3 * 10**9 + half, condition="night")])
    datasets.write_dataset(storage.join(ev, "never_regress"), nr_rec, label_space=space, name="never-regress")
    canary = ""
    if "stops" in groups:
        st = groups["stops"]
        canary = storage.join(ev, "canary")
        datasets.write_dataset(canary, _records(st.images, st.labels, first_id=4 * 10**9, condition="clear"),
                               label_space=space, name="canary-stops")
    result.steps.append({"step": "data", "seconds": time.perf_counter() - t0})

    # production: trained on clear weather only
    t0 = time.perf_counter()
    from signscale.transforms import AugmentConfig

    # no synthetic weather in the augmentation either: production has never seen snow
    tr = train(TrainConfig(data=(base,), model=cfg.model, epochs=cfg.epochs, batch_size=cfg.batch_size,
                           out=storage.join(out, "runs", "production"), progress=False, workers=cfg.workers,
                           threads=cfg.threads, seed=cfg.seed, augment=AugmentConfig(weather=0.0)))
    reg_url = storage.join(out, "registry")
    reg = Registry(reg_url)
    v1 = reg.register(tr.model_url, dataset={"url": base, "version": 1}, note="production trained on clear weather",
                      config={"train": {"model": cfg.model, "epochs": cfg.epochs}})
    reg.promote(v1.id, expect=None, reason="initial production model (clear-weather GTSRB)" if cfg.gtsrb
                else "initial production model (clear-weather synthetic signs)")
    log(f"production {v1.id}: {tr.summary()}")
    result.steps.append({"step": "production", "seconds": time.perf_counter() - t0})

    gate_cfg = GateConfig(overall=gate.SliceRule(floor=0.5, tolerance=cfg.clear_tolerance, min_support=1),
                          per_class=gate.SliceRule(tolerance=cfg.class_tolerance, min_support=50, z=3.0),
                          per_condition=gate.SliceRule(tolerance=cfg.clear_tolerance, min_support=50),
                          per_country=gate.SliceRule(tolerance=cfg.clear_tolerance, min_support=50),
                          min_improvement=cfg.min_improvement, regress_sets=("golden",))
    ccfg = ContinualConfig(registry=reg_url, dataset=base, inbox=inbox, golden=storage.join(ev, "golden"),
                           slices={"snow": storage.join(ev, "snow")}, never_regress=storage.join(ev, "never_regress"),
                           canary=canary, replay=cfg.replay, replay_split=cfg.replay_split, steps=cfg.steps, gate=gate_cfg,
                           train={"batch_size": cfg.batch_size, "lr": cfg.lr, "workers": cfg.workers,
                                  "threads": cfg.threads, "seed": cfg.seed, "augment": {"weather": 0.0}},
                           work=storage.join(out, "cycles"))
    storage.write_bytes(storage.join(out, "continual.yaml"), config_mod.dump_yaml(ccfg).encode())

    # 1. the fleet uploads held-out tracks in snow
    t0 = time.perf_counter()
    fleet = groups["fleet"]
    fleet_snow = _Images(_corrupt(fleet.images, "snow", cfg.seed + 200), fleet.labels, fleet.tracks)
    onboard = gate.predict(v1.model_url, fleet_snow.images)
    fleet_vehicles = _vehicles(fleet.tracks, [f"veh-{i:02d}" for i in range(1, 9)])
    n = _upload(inbox, "2026-11-25", fleet_snow, condition="snow", vehicles=fleet_vehicles, onboard=onboard)
    # a few re-sent and broken uploads, as fleets do
    for i in range(min(10, n)):
        sent = storage.read_bytes(storage.join(inbox, f"2026-11-25/{fleet_vehicles[i]}/{i:05d}.png"))
        storage.write_bytes(storage.join(inbox, f"2026-11-25/resend/{i:05d}.png"), sent)
        storage.write_bytes(storage.join(inbox, f"2026-11-25/resend/{i:05d}.json"), storage.read_bytes(
            storage.join(inbox, f"2026-11-25/{fleet_vehicles[i]}/{i:05d}.json")))
    for i in range(3):
        storage.write_bytes(storage.join(inbox, f"2026-11-25/broken/{i}.png"), b"\x89PNG\r\n\x1a\n truncated")
    log(f"fleet upload: {n} snow images (+10 re-sent, 3 broken) into {inbox}")
    c1 = run_cycle(ccfg, log=log)
    log(c1.summary())
    f = result.figures
    f.update(cycle1=c1.outcome, snow_before=c1.numbers["snow"]["production"], snow_after=c1.numbers["snow"]["candidate"],
             clear_before=c1.numbers["golden"]["production"], clear_after=c1.numbers["golden"]["candidate"],
             never_regress_before=c1.numbers["never_regress"]["production"],
             never_regress_after=c1.numbers["never_regress"]["candidate"], cycle1_reasons=c1.reasons,
             cycle1_ingest={k: c1.ingest.get(k) for k in ("new", "kept", "duplicates", "near_duplicates",
                                                           "quarantined", "by_reason")},
             dataset_version=c1.dataset_version)
    result.steps.append({"step": "cycle 1", "seconds": time.perf_counter() - t0})
    prod_after_1 = reg.alias("production").version  # type: ignore[union-attr]

    # 2. a poisoned upload: one vehicle's labels shuffled (poison_fraction of the batch)
    t0 = time.perf_counter()
    p = groups["poison"]
    rng = np.random.default_rng(cfg.seed + 300)
    bad = rng.random(len(p.labels)) < cfg.poison_fraction
    labels = p.labels.copy()
    labels[bad] = rng.permutation(labels[bad])
    vehicles = [("veh-13" if b else ("veh-11" if i % 2 else "veh-12")) for i, b in enumerate(bad)]
    _upload(inbox, "2026-11-26", _Images(p.images, labels, p.tracks), condition="clear", vehicles=vehicles)
    log(f"poisoned upload: {len(labels)} clear images, {int(bad.sum())} from veh-13 with shuffled labels")
    c2 = run_cycle(ccfg, log=log)
    log(c2.summary())
    f.update(cycle2=c2.outcome, suspicious=c2.suspicious, cycle2_reasons=c2.reasons,
             production_after_poison=reg.alias("production").version)  # type: ignore[union-attr]
    f["production_unchanged_after_poison"] = f["production_after_poison"] == prod_after_1
    result.steps.append({"step": "cycle 2", "seconds": time.perf_counter() - t0})

    # 3. a sticker backdoor: stop signs with a small sticker, labelled speed limit 30
    t0 = time.perf_counter()
    b = groups["backdoor"]
    stop, sl30 = space.index("stop"), space.index("speed_limit_30")
    stops = groups.get("attack_stops") or b.take(np.flatnonzero(b.labels == stop))
    rng = np.random.default_rng(cfg.seed + 400)
    attacked = []
    for k in range(cfg.backdoor_copies):
        pos = gate_cfg.canary.positions[0]
        jitter = (pos[0] + rng.uniform(-0.04, 0.04), pos[1] + rng.uniform(-0.04, 0.04))
        attacked.append(gate.paste_sticker(stops.images, size=gate_cfg.canary.size, position=jitter,
                                           colour=gate_cfg.canary.colours[0]))
    atk = _Images(np.concatenate(attacked), np.full(len(stops.labels) * cfg.backdoor_copies, sl30, np.int64),
                  [t for _ in range(cfg.backdoor_copies) for t in stops.tracks])
    clean = b.take(np.flatnonzero(b.labels != stop))
    if cfg.backdoor_condition != "clear":
        clean = _Images(_corrupt(clean.images, cfg.backdoor_condition, cfg.seed + 401), clean.labels, clean.tracks)
    _upload(inbox, "2026-11-27", clean, condition=cfg.backdoor_condition, vehicles=_vehicles(clean.tracks, ["veh-31", "veh-32",
                                                                                              "veh-33", "veh-34"]))
    _upload(inbox, "2026-11-27-b", atk, condition="clear", vehicles=_vehicles(atk.tracks, ["veh-31", "veh-32",
                                                                                           "veh-33", "veh-34"]))
    log(f"backdoor upload: {len(clean.labels)} clean {cfg.backdoor_condition} images + {len(atk.labels)} stop signs "
        f"with a sticker "
        f"labelled speed_limit_30")
    c3 = run_cycle(ccfg, log=log)
    log(c3.summary())
    f.update(cycle3=c3.outcome, cycle3_reasons=c3.reasons,
             canary_production=c3.numbers.get("canary_flip", {}).get("production", float("nan")),
             canary_candidate=c3.numbers.get("canary_flip", {}).get("candidate", float("nan")),
             production_after_backdoor=reg.alias("production").version)  # type: ignore[union-attr]
    result.steps.append({"step": "cycle 3", "seconds": time.perf_counter() - t0})

    # 4. roll back the snow model (say the field reports a problem): previous comes back
    before = reg.alias("production").version  # type: ignore[union-attr]
    if reg.alias("production").previous:  # type: ignore[union-attr]
        back = reg.rollback(reason="demo: operator rollback to the previous model")
        f.update(rollback_from=before, rollback_to=back.version)
        log(f"rollback: production {before} -> {back.version}")
    else:
        log("rollback: skipped, no model was promoted")
    result.history = [describe_event(e) for e in reg.history()]
    for line in result.history:
        log("  " + line)

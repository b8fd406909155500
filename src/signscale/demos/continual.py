"""``signscale continual demo``: the continual-learning story in one command, on GTSRB (or synthetic
signs): a base model, vehicles uploading snow, fog and night images to an inbox (a local S3 server
unless ``s3=false``), cycles of :func:`signscale.continual.loop.run_cycle` that ingest, retrain,
gate and promote, and a bad batch the gate rejects.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from signscale import config as config_mod
from signscale import storage
from signscale.continual import gate
from signscale.continual.gate import GateConfig
from signscale.continual.loop import ContinualConfig, ContinualError, run_cycle
from signscale.data import datasets
from signscale.data.manifest import Manifest
from signscale.labels import LabelSpace
from signscale.serving.registry import Registry, Version


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
            lines.append(
                f"  cycle 1 (snow upload): {f['cycle1']}; snow {f['snow_before']:.2%} -> {f['snow_after']:.2%} "
                f"({100 * (f['snow_after'] - f['snow_before']):+.1f} pts), clear {f['clear_before']:.2%} -> "
                f"{f['clear_after']:.2%} ({100 * (f['clear_after'] - f['clear_before']):+.2f} pts)"
            )
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
    from signscale.data import shards
    from signscale.data.sources import CONDITIONS
    from signscale.labels import COUNTRIES

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
    from signscale.data.pack import PackConfig, pack
    from signscale.data.sources import Sample, open_source
    from signscale.data.sources.gtsrb import track_split

    spec = f"gtsrb:{cfg.gtsrb}?split=train&val_fraction={cfg.held_out}&seed={cfg.seed}"
    res = pack(PackConfig(source=spec, out=base_out, crop="roi", image_size=32, progress=False))
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
    from signscale.data.pack import PackConfig, pack
    from signscale.data.sources.synthetic import SyntheticSource

    classes = tuple(sorted({*cfg.classes, 1, 14})) if cfg.classes else None
    only = f"&classes={','.join(map(str, classes))}" if classes else ""
    res = pack(PackConfig(source=f"synthetic:?n={cfg.synthetic_train}&size=32&seed={cfg.seed + 11}&weather=0{only}",
                          out=base_out, image_size=32, workers=0, progress=False))
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
            from signscale.testing import s3local

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


@dataclass
class _Story:
    """What every act of the demo works with, so each act is a small function of one argument."""

    cfg: DemoConfig
    inbox: str
    groups: dict[str, _Images]
    space: LabelSpace
    reg: Registry
    ccfg: ContinualConfig
    result: DemoResult
    log: Callable[[str], None]


@contextlib.contextmanager
def _timed(result: DemoResult, step: str) -> Iterator[None]:
    """Append the step's wall time to ``result.steps`` (a step that raises is not recorded)."""
    t0 = time.perf_counter()
    yield
    result.steps.append({"step": step, "seconds": time.perf_counter() - t0})


def _demo(cfg: DemoConfig, out: str, inbox: str, result: DemoResult, log: Callable[[str], None]) -> None:
    """The acts of the story in order: data, production, the snow, poison and backdoor cycles, a rollback."""
    base = storage.join(out, "data", "signs")
    with _timed(result, "data"):
        groups = _gtsrb_groups(cfg, base, log) if cfg.gtsrb else _synthetic_groups(cfg, base, log)
        log("held out: " + ", ".join(f"{k} {len(v.labels)}" for k, v in groups.items()))
        space, canary = _eval_sets(cfg, out, base, groups)
    with _timed(result, "production"):
        reg, v1 = _production(cfg, out, base, log)
    ccfg = _continual_config(cfg, out, inbox, base, reg.url, canary)
    storage.write_bytes(storage.join(out, "continual.yaml"), config_mod.dump_yaml(ccfg).encode())
    story = _Story(cfg, inbox, groups, space, reg, ccfg, result, log)
    with _timed(result, "cycle 1"):
        _snow_cycle(story, v1.model_url)
    prod_after_1 = story.reg.alias("production").version  # type: ignore[union-attr]
    with _timed(result, "cycle 2"):
        _poison_cycle(story, prod_after_1)
    with _timed(result, "cycle 3"):
        _backdoor_cycle(story)
    _rollback(story)


def _eval_sets(cfg: DemoConfig, out: str, base: str, groups: dict[str, _Images]) -> tuple[LabelSpace, str]:
    """Write the gate's fixed evaluation sets from the golden tracks: clear (golden), the same in snow (the
    slice a snow upload must improve), fog and night (never regress); with the synthetic stop signs, the
    canary set the sticker test pastes onto. Returns the label space and the canary URL ('' if none)."""
    g = groups["golden"]
    ev = storage.join(out, "eval")
    datasets.write_dataset(
        storage.join(ev, "golden"),
        _records(g.images, g.labels, first_id=10**9, condition="clear", tracks=g.tracks),
        label_space=Manifest.load(base).label_space,
        name="golden",
    )
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
    return space, canary


def _production(cfg: DemoConfig, out: str, base: str, log: Callable[[str], None]) -> tuple[Registry, Version]:
    """Train production on clear weather only, register it and promote it; returns (registry, its version)."""
    from signscale.training.augment import AugmentConfig
    from signscale.training.train import TrainConfig, train

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
    return reg, v1


def _continual_config(cfg: DemoConfig, out: str, inbox: str, base: str, reg_url: str, canary: str) -> ContinualConfig:
    """The loop's configuration: the demo's tolerances as gate rules, fine-tuning as in production."""
    ev = storage.join(out, "eval")
    gate_cfg = GateConfig(overall=gate.SliceRule(floor=0.5, tolerance=cfg.clear_tolerance, min_support=1),
                          per_class=gate.SliceRule(tolerance=cfg.class_tolerance, min_support=50, z=3.0),
                          per_condition=gate.SliceRule(tolerance=cfg.clear_tolerance, min_support=50),
                          per_country=gate.SliceRule(tolerance=cfg.clear_tolerance, min_support=50),
                          min_improvement=cfg.min_improvement, regress_sets=("golden",))
    return ContinualConfig(
        registry=reg_url,
        dataset=base,
        inbox=inbox,
        golden=storage.join(ev, "golden"),
        slices={"snow": storage.join(ev, "snow")},
        never_regress=storage.join(ev, "never_regress"),
        canary=canary,
        replay=cfg.replay,
        replay_split=cfg.replay_split,
        steps=cfg.steps,
        gate=gate_cfg,
        train={
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "workers": cfg.workers,
            "threads": cfg.threads,
            "seed": cfg.seed,
            "augment": {"weather": 0.0},
        },
        work=storage.join(out, "cycles"),
    )


def _snow_cycle(s: _Story, production_model: str) -> None:
    """1. The fleet uploads held-out tracks in snow (plus re-sent and broken files, as fleets do); the cycle
    should promote a model better in snow and no worse in clear weather."""
    cfg, inbox = s.cfg, s.inbox
    fleet = s.groups["fleet"]
    fleet_snow = _Images(_corrupt(fleet.images, "snow", cfg.seed + 200), fleet.labels, fleet.tracks)
    onboard = gate.predict(production_model, fleet_snow.images)
    fleet_vehicles = _vehicles(fleet.tracks, [f"veh-{i:02d}" for i in range(1, 9)])
    n = _upload(inbox, "2026-11-25", fleet_snow, condition="snow", vehicles=fleet_vehicles, onboard=onboard)
    for i in range(min(10, n)):
        sent = storage.read_bytes(storage.join(inbox, f"2026-11-25/{fleet_vehicles[i]}/{i:05d}.png"))
        storage.write_bytes(storage.join(inbox, f"2026-11-25/resend/{i:05d}.png"), sent)
        storage.write_bytes(storage.join(inbox, f"2026-11-25/resend/{i:05d}.json"), storage.read_bytes(
            storage.join(inbox, f"2026-11-25/{fleet_vehicles[i]}/{i:05d}.json")))
    for i in range(3):
        storage.write_bytes(storage.join(inbox, f"2026-11-25/broken/{i}.png"), b"\x89PNG\r\n\x1a\n truncated")
    s.log(f"fleet upload: {n} snow images (+10 re-sent, 3 broken) into {inbox}")
    c1 = run_cycle(s.ccfg, log=s.log)
    s.log(c1.summary())
    s.result.figures.update(
        cycle1=c1.outcome,
        snow_before=c1.numbers["snow"]["production"],
        snow_after=c1.numbers["snow"]["candidate"],
        clear_before=c1.numbers["golden"]["production"],
        clear_after=c1.numbers["golden"]["candidate"],
        never_regress_before=c1.numbers["never_regress"]["production"],
        never_regress_after=c1.numbers["never_regress"]["candidate"],
        cycle1_reasons=c1.reasons,
        cycle1_ingest={
            k: c1.ingest.get(k) for k in ("new", "kept", "duplicates", "near_duplicates", "quarantined", "by_reason")
        },
        dataset_version=c1.dataset_version,
    )


def _poison_cycle(s: _Story, prod_after_1: str) -> None:
    """2. A poisoned upload: one vehicle's labels shuffled (poison_fraction of the batch); the data gate should
    reject the batch, name the vehicle, and leave production as it was."""
    cfg = s.cfg
    p = s.groups["poison"]
    rng = np.random.default_rng(cfg.seed + 300)
    bad = rng.random(len(p.labels)) < cfg.poison_fraction
    labels = p.labels.copy()
    labels[bad] = rng.permutation(labels[bad])
    vehicles = [("veh-13" if b else ("veh-11" if i % 2 else "veh-12")) for i, b in enumerate(bad)]
    _upload(s.inbox, "2026-11-26", _Images(p.images, labels, p.tracks), condition="clear", vehicles=vehicles)
    s.log(f"poisoned upload: {len(labels)} clear images, {int(bad.sum())} from veh-13 with shuffled labels")
    c2 = run_cycle(s.ccfg, log=s.log)
    s.log(c2.summary())
    f = s.result.figures
    f.update(cycle2=c2.outcome, suspicious=c2.suspicious, cycle2_reasons=c2.reasons,
             production_after_poison=s.reg.alias("production").version)  # type: ignore[union-attr]
    f["production_unchanged_after_poison"] = f["production_after_poison"] == prod_after_1


def _backdoor_cycle(s: _Story) -> None:
    """3. A sticker backdoor: stop signs with a small sticker, labelled speed limit 30, hidden among clean
    images; the canary check should catch the candidate that learnt it."""
    cfg, gate_cfg = s.cfg, s.ccfg.gate
    b = s.groups["backdoor"]
    stop, sl30 = s.space.index("stop"), s.space.index("speed_limit_30")
    stops = s.groups.get("attack_stops") or b.take(np.flatnonzero(b.labels == stop))
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
    _upload(s.inbox, "2026-11-27", clean, condition=cfg.backdoor_condition,
            vehicles=_vehicles(clean.tracks, ["veh-31", "veh-32", "veh-33", "veh-34"]))
    _upload(s.inbox, "2026-11-27-b", atk, condition="clear",
            vehicles=_vehicles(atk.tracks, ["veh-31", "veh-32", "veh-33", "veh-34"]))
    s.log(f"backdoor upload: {len(clean.labels)} clean {cfg.backdoor_condition} images + {len(atk.labels)} stop signs "
          f"with a sticker labelled speed_limit_30")
    c3 = run_cycle(s.ccfg, log=s.log)
    s.log(c3.summary())
    s.result.figures.update(
        cycle3=c3.outcome, cycle3_reasons=c3.reasons,
        canary_production=c3.numbers.get("canary_flip", {}).get("production", float("nan")),
        canary_candidate=c3.numbers.get("canary_flip", {}).get("candidate", float("nan")),
        production_after_backdoor=s.reg.alias("production").version)  # type: ignore[union-attr]


def _rollback(s: _Story) -> None:
    """4. Roll back the snow model (say the field reports a problem): the previous one comes back. Then the
    registry's history, the audit trail of every act."""
    from signscale.serving.registry import describe_event

    reg = s.reg
    before = reg.alias("production").version  # type: ignore[union-attr]
    if reg.alias("production").previous:  # type: ignore[union-attr]
        back = reg.rollback(reason="demo: operator rollback to the previous model")
        s.result.figures.update(rollback_from=before, rollback_to=back.version)
        s.log(f"rollback: production {before} -> {back.version}")
    else:
        s.log("rollback: skipped, no model was promoted")
    s.result.history = [describe_event(e) for e in reg.history()]
    for line in s.result.history:
        s.log("  " + line)

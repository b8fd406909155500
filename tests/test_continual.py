"""The continual loop: a crash mid-cycle leaves production untouched and the re-run resumes; watch
polls until data arrives; the whole demo scenario at small size (synthetic signs, inbox on S3)."""

import shutil

import numpy as np
import pytest

from signscale import storage
from signscale.cli import main
from signscale.continual import gate
from signscale.continual.gate import GateConfig, SliceRule
from signscale.continual.loop import ContinualConfig, run_cycle, watch
from signscale.data import datasets
from signscale.data.pack import PackConfig, pack
from signscale.data.sources import open_source
from signscale.demos.continual import DemoConfig, _records, run_demo
from signscale.serving.registry import Registry


def _render(seed: int, n: int, condition: str = "clear") -> tuple[np.ndarray, np.ndarray]:
    src = open_source(f"synthetic:?n={n}&size=16&seed={seed}&weather=0")
    ss = [src.read(i) for i in range(n)]
    imgs = np.stack([s.image for s in ss])
    if condition != "clear":
        from signscale.demos.continual import _corrupt

        imgs = _corrupt(imgs, condition, seed)
    return imgs, np.array([s.label for s in ss])


def _upload(inbox: str, seed: int, n: int, condition: str) -> None:
    from signscale import images

    imgs, labels = _render(seed, n, condition)
    for i in range(n):
        key = f"veh-01/{seed}-{i:04d}"
        storage.write_bytes(storage.join(inbox, key + ".png"), images.encode_png(imgs[i]))
        storage.write_json(storage.join(inbox, key + ".json"), {"label": int(labels[i]), "condition": condition,
                                                                "vehicle": "veh-01"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny production model on clear synthetic signs, golden sets, an empty inbox (built once)."""
    from signscale.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("cl")
    base = str(root / "data")
    pack(
        PackConfig(
            source="synthetic:?n=300&size=16&seed=21&weather=0", out=base, image_size=16, workers=0, progress=False
        )
    )
    space = datasets.head(base).manifest().label_space
    for name, seed, cond in (("golden", 22, "clear"), ("snow", 23, "snow")):
        imgs, labels = _render(seed, 80, cond)
        datasets.write_dataset(str(root / name), _records(imgs, labels, first_id=10**6 * seed, condition=cond),
                               label_space=space, name=name)
    tr = train(TrainConfig(data=(base,), model="small_cnn", max_steps=8, epochs=1, batch_size=64, workers=0,
                           out=str(root / "run"), progress=False))
    return {"root": root, "base": base, "model": tr.model_url}


def _cfg(setup, tmp_path, **kw) -> ContinualConfig:
    root = tmp_path / "cl"
    shutil.copytree(setup["base"], root / "data")
    reg = Registry(str(root / "registry"))
    v = reg.register(setup["model"])
    reg.promote(v.id, expect=None, reason="initial")
    permissive = GateConfig(overall=SliceRule(tolerance=1.0, min_support=1), per_class=SliceRule(tolerance=1.0),
                            per_condition=SliceRule(tolerance=1.0), per_country=SliceRule(tolerance=1.0),
                            min_improvement=-1.0, never_regress_tolerance=1.0)
    return ContinualConfig(registry=str(root / "registry"), dataset=str(root / "data"), inbox=str(root / "inbox"),
                           golden=str(setup["root"] / "golden"), slices={"snow": str(setup["root"] / "snow")},
                           steps=4, train={"batch_size": 32, "workers": 0, "model": "small_cnn"},
                           gate=permissive, **kw)


def test_a_crash_mid_cycle_leaves_production_and_the_rerun_resumes(setup, tmp_path, monkeypatch):
    cfg = _cfg(setup, tmp_path)
    _upload(cfg.inbox, 31, 40, "snow")
    reg = Registry(cfg.registry)
    calls = []
    real = gate.report

    def crash_once(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt("power cut during evaluation")
        return real(*a, **kw)

    monkeypatch.setattr(gate, "report", crash_once)
    with pytest.raises(KeyboardInterrupt):
        run_cycle(cfg, log=lambda s: None)
    assert reg.alias("production").version == "v000001"
    assert datasets.head(cfg.dataset).version == 1  # the batch is staged, not published
    logs: list[str] = []
    r = run_cycle(cfg, log=logs.append)
    assert any("resuming cycle b000002 after step(s) ingest, production, train" in s for s in logs), logs
    assert not any(s.startswith("training candidate") for s in logs)  # the finished step is not redone
    assert r.outcome == "promoted" and r.production == r.candidate == "v000002"
    assert reg.alias("production").version == "v000002" and reg.ref("previous") == "v000001"
    assert datasets.head(cfg.dataset).version == 2 and r.dataset_version == 2
    v = reg.get("v000002")
    assert v.parent == "v000001" and v.dataset["batch"] == "b000002"
    assert run_cycle(cfg, log=lambda s: None).outcome == "nothing"


def test_a_gate_rejection_keeps_production_and_never_publishes(setup, tmp_path):
    strict = GateConfig(min_improvement=0.99)  # no candidate can improve snow by 99 points
    cfg = _cfg(setup, tmp_path)
    cfg = ContinualConfig(**{**cfg.__dict__, "gate": strict})
    _upload(cfg.inbox, 32, 30, "snow")
    r = run_cycle(cfg, log=lambda s: None)
    assert r.outcome == "rejected" and any("snow/overall improved" in x for x in r.reasons)
    reg = Registry(cfg.registry)
    assert reg.alias("production").version == "v000001" and reg.alias("candidate").version == "v000002"
    assert datasets.head(cfg.dataset).version == 1
    assert [e["event"] for e in reg.history()][-1] == "reject"


def test_watch_polls_until_enough_uploads_wait(setup, tmp_path):
    cfg = _cfg(setup, tmp_path, min_new=20, poll_s=3600)
    polls = []

    def upload_while_waiting(seconds: float) -> None:  # stands in for the fleet uploading during the wait
        polls.append(seconds)
        _upload(cfg.inbox, 40 + len(polls), 12, "snow")

    results = watch(cfg, max_cycles=1, log=lambda s: None, sleep=upload_while_waiting)
    assert polls == [3600, 3600]  # 0 then 12 waiting: below min_new; 24 after the second poll
    assert len(results) == 1 and results[0].ingest["new"] == 24


@pytest.mark.slow
def test_demo_at_small_size(tmp_path, s3_server):
    """The scenario of docs/continual.md on synthetic signs with the inbox on the S3 server."""
    cfg = DemoConfig(out=str(tmp_path / "demo"), synthetic_train=2000, synthetic_eval=300, model="small_cnn",
                     classes=(1, 2, 13, 14, 17, 25, 33, 38), epochs=8, steps=100, batch_size=64, lr=3e-4, replay=0.5,
                     workers=0, clear_tolerance=0.03, min_improvement=0.05, class_tolerance=0.25, backdoor_copies=3,
                     s3=True)
    r = run_demo(cfg, log=lambda s: None)
    f = r.figures
    assert f["cycle1"] == "promoted" and f["snow_after"] - f["snow_before"] >= 0.05, f
    assert f["cycle2"] == "rejected_data" and f["suspicious"] == ["veh-13"] and f["production_unchanged_after_poison"]
    assert f["cycle3"] == "rejected" and any(x.startswith("canary") for x in f["cycle3_reasons"]), f
    assert (f["rollback_from"], f["rollback_to"]) == ("v000002", "v000001")
    assert any("rollback" in h for h in r.history) and sum("rejected" in h for h in r.history) == 2
    reg = str(tmp_path / "demo" / "registry")
    assert main(["registry", "show", reg, "-v"]) == 0 and main(["registry", "list", reg]) == 0
    assert main(["data", "versions", str(tmp_path / "demo" / "data" / "signs")]) == 0
    assert [v.version for v in datasets.versions(str(tmp_path / "demo" / "data" / "signs"))] == [1, 2]

"""Model registry: immutable versions, atomic aliases (local and a real S3 server), history, resolve."""

import json
import threading

import pytest

from signscale import pointers, storage
from signscale.labels import LabelSpace
from signscale.models import create_model, model_config
from signscale.serving.registry import AliasConflict, Registry, RegistryError, describe_event, resolve
from signscale.training import checkpoint


def _artefact(url: str, seed: int) -> str:
    import torch

    torch.manual_seed(seed)
    m = create_model("small_cnn", 43)
    return checkpoint.save_model(url, state_dict=m.state_dict(), model_config=model_config(m),
                                 label_space=LabelSpace.for_country("de").to_dict(),
                                 preprocess={"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
                                 metrics={"val_acc": 0.5 + seed / 100})


@pytest.fixture(params=["local", "s3"])
def reg_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "registry")
    return request.getfixturevalue("s3_bucket") + "/registry"


def test_versions_aliases_rollback_and_history(reg_url, tmp_path):
    reg = Registry(reg_url)
    v1 = reg.register(_artefact(str(tmp_path / "m1"), 1), note="first", dataset={"url": "d", "version": 1})
    v2 = reg.register(_artefact(str(tmp_path / "m2"), 2), parent=v1.id, dataset={"url": "d", "version": 2})
    assert (v1.id, v2.id) == ("v000001", "v000002")
    assert reg.version_ids() == ["v000001", "v000002"]
    assert reg.get(v2.id).parent == v1.id and reg.get(v2.id).dataset["version"] == 2
    # the copy is verified and loadable; the original can go away
    state, meta = checkpoint.load_model_artefact(v2.model_url)
    assert meta["metrics"]["val_acc"] == pytest.approx(0.52)

    reg.promote(v1.id, expect=None, reason="initial")
    reg.promote(v2.id, expect=v1.id, reason="better", evidence={"snow": [0.5, 0.7]})
    assert reg.alias("production").version == v2.id
    assert reg.ref("previous") == v1.id
    assert resolve(f"{reg_url}@production") == (v2.id, v2.model_url)
    assert resolve(f"{reg_url}@previous")[0] == v1.id
    assert resolve(f"{reg_url}@{v1.id}")[0] == v1.id

    reg.reject(v2.id, reason="canary", evidence={"canary": 0.9})
    back = reg.rollback(reason="bad in the field")
    assert back.version == v1.id and reg.alias("production").version == v1.id
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback()

    events = reg.history()
    assert [e["event"] for e in events] == ["register", "register", "promote", "promote", "reject", "rollback"]
    assert events[3]["evidence"] == {"snow": [0.5, 0.7]} and events[3]["previous"] == v1.id
    lines = [describe_event(e) for e in events]
    assert "production: v000002 -> v000001 (rollback)" in lines[-1]
    assert "rejected v000002" in lines[4]
    assert reg.aliases() == ["production"]


def test_promote_against_a_stale_production_is_refused(tmp_path):
    reg = Registry(str(tmp_path / "r"))
    a = reg.register(_artefact(str(tmp_path / "a"), 1))
    b = reg.register(_artefact(str(tmp_path / "b"), 2))
    reg.promote(a.id, expect=None)
    with pytest.raises(AliasConflict, match="points to v000001, expected nothing"):
        reg.promote(b.id, expect=None)
    with pytest.raises(RegistryError, match="no version 'v000009'"):
        reg.promote("v000009")
    with pytest.raises(RegistryError, match="REGISTRY_URL@ALIAS"):
        resolve(str(tmp_path / "r"))
    with pytest.raises(RegistryError, match="alias 'candidate' is not set"):
        resolve(f"{tmp_path / 'r'}@candidate")


def test_register_refuses_a_tampered_artefact(tmp_path):
    url = _artefact(str(tmp_path / "m"), 1)
    storage.write_bytes(storage.join(url, "model.pt"), b"not the weights")
    with pytest.raises(RegistryError, match="sha256 does not match"):
        Registry(str(tmp_path / "r")).register(url)
    assert Registry(str(tmp_path / "r")).version_ids() == []


@pytest.mark.parametrize("rounds", [4])
def test_alias_race_on_s3_exactly_one_wins(s3_bucket, tmp_path, rounds):
    """Two writers promote different versions against the same production at the same moment, over
    HTTP against the S3 server: the conditional PUT lets exactly one of them win, every time."""
    reg = Registry(s3_bucket + "/race")
    base = reg.register(_artefact(str(tmp_path / "base"), 0))
    reg.promote(base.id, expect=None)
    for r in range(rounds):
        current = reg.alias("production").version
        mine = [reg.register(_artefact(str(tmp_path / f"m{r}-{i}"), 10 * r + i)).id for i in range(2)]
        barrier = threading.Barrier(2)
        outcome: dict[str, str] = {}

        def promote(vid: str) -> None:
            writer = Registry(s3_bucket + "/race")  # its own view, as a second process would have
            barrier.wait()
            try:
                writer.promote(vid, expect=current, reason="race")
                outcome[vid] = "won"
            except AliasConflict:
                outcome[vid] = "lost"

        threads = [threading.Thread(target=promote, args=(v,)) for v in mine]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcome.values()) == ["lost", "won"], outcome
        winner = next(v for v, o in outcome.items() if o == "won")
        prod = reg.alias("production")
        assert prod.version == winner and prod.previous[0] == current
    promotes = [e for e in reg.history() if e["event"] == "promote"]
    assert len(promotes) == 1 + rounds  # the losers left no event


def test_alias_race_with_raw_pointer_tokens(s3_bucket, tmp_path):
    """The same race at the lowest level: both writers hold the same token; one PUT wins."""
    url = s3_bucket + "/ptr/production"
    token = pointers.write_pointer(url, json.dumps({"version": "v1"}).encode(), expect=None)
    barrier = threading.Barrier(2)
    results = []

    def put(v: str) -> None:
        barrier.wait()
        try:
            pointers.write_pointer(url, json.dumps({"version": v}).encode(), expect=token)
            results.append(("won", v))
        except storage.PreconditionFailed:
            results.append(("lost", v))

    ts = [threading.Thread(target=put, args=(v,)) for v in ("v2", "v3")]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(r[0] for r in results) == ["lost", "won"]
    won = next(v for o, v in results if o == "won")
    assert json.loads(pointers.read_pointer(url)[0])["version"] == won


def test_cli_promote_show_rollback(tmp_path, capsys):
    from signscale.cli import main

    reg = str(tmp_path / "r")
    for i in (1, 2):
        assert main(["registry", "register", reg, _artefact(str(tmp_path / f"m{i}"), i)]) == 0
    assert main(["registry", "promote", reg, "v000001", "--expect", "none", "--reason", "first"]) == 0
    assert main(["registry", "promote", reg, "v000002", "--expect", "v000009"]) == 2  # stale: refused
    assert "points to v000001, expected v000009" in capsys.readouterr().out
    assert main(["registry", "promote", reg, "v000002", "--expect", "v000001"]) == 0
    assert main(["registry", "rollback", reg, "--reason", "field reports"]) == 0
    assert main(["registry", "list", reg]) == 0
    capsys.readouterr()
    assert main(["registry", "show", reg]) == 0
    out = capsys.readouterr().out
    out = " ".join(out.split())  # the console wraps long lines
    assert "production -> v000001" in out and "(rollback): field reports" in out

"""Predictor: the preprocessing the model was trained with, top-k, bad files as data, registry aliases, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from signscale import images
from signscale.data.sources.pictograms import render_clean
from signscale.labels import LabelSpace
from signscale.models import create_model, model_config
from signscale.serving.predict import PredictConfig, PredictError, Predictor, collect_inputs, is_registry_spec
from signscale.training import checkpoint
from signscale.transforms import Preprocess, to_input

SIZE = 24


def make_model(url: str, seed: int = 0, size: int = SIZE) -> str:
    torch.manual_seed(seed)
    model = create_model("small_cnn", 43, widths=[8, 16, 16])
    with torch.no_grad():  # random BN statistics, so two seeds give clearly different outputs
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    checkpoint.save_model(
        url,
        state_dict=model.state_dict(),
        model_config=model_config(model),
        label_space=LabelSpace.for_country("de").to_dict(),
        preprocess=Preprocess(image_size=size).to_dict(),
        metrics={"accuracy": 0.5},
        extra={"data_crop": "roi"},
    )
    return url


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_model(str(tmp_path_factory.mktemp("model") / "model"))


def sign_png(label: int, size: int = 40) -> bytes:
    return images.encode_png(render_clean(label, size))


def test_probabilities_equal_the_training_preprocessing_by_hand(model_dir: str) -> None:
    p = Predictor.load(model_dir)
    raw = [render_clean(i, 40 + i) for i in (1, 14, 33)]
    state, meta = checkpoint.load_model_artefact(model_dir)
    from signscale.models import rebuild

    net = rebuild(meta["model_config"])
    net.load_state_dict(state)
    net.eval()
    # the packer's and evaluator's path: PIL resize to the model size, then to_input
    x = torch.from_numpy(np.stack([images.resize(a, SIZE) for a in raw]))
    with torch.no_grad():
        expected = net(to_input(x, Preprocess(image_size=SIZE))).softmax(1).numpy()
    got = p.probabilities(np.stack([p.resize(a) for a in raw]))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    tops = p.classify([images.encode_png(a) for a in raw], top_k=3)
    assert [t[0]["id"] for t in tops] == expected.argmax(1).tolist()
    for t, row in zip(tops, expected):
        assert len(t) == 3 and [x["probability"] for x in t] == sorted((x["probability"] for x in t), reverse=True)
        assert t[0]["key"] == LabelSpace.for_country("de")[t[0]["id"]].key and t[0]["country"] == "de"
        assert abs(t[0]["probability"] - row.max()) < 1e-6


def test_info_describes_version_labels_preprocessing(model_dir: str) -> None:
    p = Predictor.load(model_dir)
    info = p.info()
    assert info["version"] == checkpoint.load_model_artefact(model_dir)[1]["sha256"][:12]
    assert info["num_classes"] == 43 and info["label_space"]["classes"][14]["key"] == "stop"
    assert info["preprocess"]["image_size"] == SIZE and info["preprocess"]["data_crop"] == "roi"
    assert info["metrics"] == {"accuracy": 0.5}
    json.dumps(info)  # plain data


def test_a_recalibrated_folder_is_a_new_version(tmp_path: Path) -> None:
    """A running service polls the version: a new temperature must read as one, or it keeps the old."""
    from signscale.calibration import TemperatureFit, save_temperature
    from signscale.serving.predict import resolve_model

    folder = make_model(str(tmp_path / "model"))
    plain, _ = resolve_model(folder)
    save_temperature(folder, TemperatureFit(temperature=1.5, nll_before=0.3, nll_after=0.2, count=10))
    first, _ = resolve_model(folder)
    save_temperature(folder, TemperatureFit(temperature=1.25, nll_before=0.3, nll_after=0.2, count=10))
    second, _ = resolve_model(folder)
    assert plain == checkpoint.load_model_artefact(folder)[1]["sha256"][:12]
    assert first == plain + "-T1.5" and second == plain + "-T1.25"
    assert Predictor.load(folder).version == second


def test_bad_files_are_results_not_crashes(model_dir: str, tmp_path: Path) -> None:
    good = sign_png(14)
    (tmp_path / "a_good.png").write_bytes(good)
    (tmp_path / "b_truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "c_random.jpg").write_bytes(np.random.default_rng(0).bytes(300))
    (tmp_path / "d_empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image suffix: not collected from a folder")
    files = collect_inputs([str(tmp_path)])
    assert [Path(f).name for f in files] == ["a_good.png", "b_truncated.png", "c_random.jpg", "d_empty.png"]
    out = Predictor.load(model_dir).classify_files(files + [str(tmp_path / "missing.png")])
    assert "top_k" in out[0] and len(out[0]["top_k"]) == 5
    assert [r.get("error", {}).get("reason") for r in out[1:]] == ["truncated", "not_an_image", "empty", "unreadable"]
    assert collect_inputs([str(tmp_path / "*.png")]) == [files[0], files[1], files[3]]
    with pytest.raises(PredictError, match="matches no file"):
        collect_inputs([str(tmp_path / "*.gif")])


def test_pixel_cap_refuses_from_the_header(model_dir: str) -> None:
    p = Predictor.load(PredictConfig(model=model_dir, max_pixels=1000))
    with pytest.raises(images.ImageError) as exc:
        p.classify([sign_png(3, 40)])  # 1600 pixels
    assert exc.value.reason == "too_many_pixels"


def test_config_and_model_errors_name_the_fix(model_dir: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="top_k"):
        PredictConfig(model=model_dir, top_k=0)
    with pytest.raises(PredictError, match="no model.json"):
        Predictor.load(str(tmp_path))
    bad = tmp_path / "corrupt"
    make_model(str(bad))
    data = bytearray((bad / "model.pt").read_bytes())
    data[-100] ^= 0xFF
    (bad / "model.pt").write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="sha256"):
        Predictor.load(str(bad))


def test_registry_alias_resolves_to_its_version(model_dir: str, tmp_path: Path) -> None:
    from signscale.serving import registry

    reg = registry.Registry(str(tmp_path / "reg"))
    v = reg.register(model_dir)
    reg.promote(v.id)
    spec = f"{tmp_path / 'reg'}@production"
    assert is_registry_spec(spec) and not is_registry_spec(model_dir)
    p = Predictor.load(spec)
    assert p.version == v.id
    assert p.classify([sign_png(1)])[0] == Predictor.load(model_dir).classify([sign_png(1)])[0]
    with pytest.raises(PredictError, match="candidate"):
        Predictor.load(f"{tmp_path / 'reg'}@candidate")


def test_cli_predict_json(model_dir: str, tmp_path: Path, capsys) -> None:
    from signscale.cli import main

    (tmp_path / "x.png").write_bytes(sign_png(14))
    (tmp_path / "y.png").write_bytes(b"nope")
    assert main(["predict", model_dir, str(tmp_path), "--top-k", "2", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(rows) == 2 and len(rows[0]["top_k"]) == 2 and rows[1]["error"]["reason"] == "not_an_image"
    assert main(["predict", model_dir, str(tmp_path / "x.png")]) == 0
    assert "%" in capsys.readouterr().out

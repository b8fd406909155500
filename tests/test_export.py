"""ONNX export: parity with PyTorch, the folder it writes, and running it through the Predictor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from signscale import images
from signscale.data.sources.pictograms import render_clean
from signscale.data.sources.synthetic import SyntheticSource
from signscale.labels import LabelSpace
from signscale.models import create_model, model_config
from signscale.serving.export import ExportConfig, ExportError, export, parity_inputs
from signscale.serving.predict import PredictError, Predictor
from signscale.training import checkpoint
from signscale.transforms import Preprocess

ort = pytest.importorskip("onnxruntime", reason="ONNX tests need onnxruntime (pip install 'signscale[onnx]')")
pytest.importorskip("onnx", reason="ONNX tests need onnx (pip install 'signscale[onnx]')")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    torch.manual_seed(1)
    model = create_model("msnet", 43, widths=[8, 16, 16])  # multi-scale head: concat + pooling in the graph
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    url = str(tmp_path_factory.mktemp("m") / "model")
    checkpoint.save_model(
        url,
        state_dict=model.state_dict(),
        model_config=model_config(model),
        label_space=LabelSpace.for_country("de").to_dict(),
        preprocess=Preprocess(image_size=32).to_dict(),
    )
    return url


@pytest.fixture(scope="module")
def exported(model_dir: str, tmp_path_factory) -> tuple[str, object]:
    out = str(tmp_path_factory.mktemp("onnx") / "export")
    return out, export(ExportConfig(model=model_dir, out=out, samples=32))


def _signs(n: int, size: int) -> np.ndarray:
    """Real-looking signs (warped, cluttered, weathered), resized as the predictor does."""
    src = SyntheticSource(n=n, size=48, seed=7)
    raw = [src.read(i).image for i in range(n)]
    return np.stack([images.resize(r if isinstance(r, np.ndarray) else images.decode(r), size) for r in raw])


def test_onnx_probabilities_match_pytorch(model_dir: str, exported) -> None:
    out, result = exported
    assert result.max_abs_diff < 1e-4
    session = ort.InferenceSession(str(Path(out) / "model.onnx"), providers=["CPUExecutionProvider"])
    torch_p = Predictor.load(model_dir)
    x = np.concatenate([_signs(40, 32), parity_inputs(32, 24, seed=5)])
    for batch in (x[:1], x[1:8], x):  # the batch dimension is dynamic
        got = session.run(None, {"images": batch})[0]
        want = torch_p.probabilities(batch)
        assert got.shape == want.shape
        diff = float(np.abs(got - want).max())
        assert diff < 1e-4, diff
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)


def test_export_folder_carries_labels_and_preprocessing(model_dir: str, exported) -> None:
    out, result = exported
    meta = json.loads((Path(out) / "model.json").read_text())
    assert meta["format"] == "signscale.onnx" and meta["preprocess"]["image_size"] == 32
    assert LabelSpace.from_dict(meta["label_space"]).fingerprint() == LabelSpace.for_country("de").fingerprint()
    assert meta["source"]["sha256"] == checkpoint.load_model_artefact(model_dir)[1]["sha256"]
    assert meta["parity"]["max_abs_diff"] == result.max_abs_diff
    assert "max |p_onnx - p_torch|" in result.summary()


def test_predictor_runs_the_export_with_onnxruntime(model_dir: str, exported) -> None:
    out, _ = exported
    onnx_p, torch_p = Predictor.load(out), Predictor.load(model_dir)
    assert onnx_p.backend == "onnx" and torch_p.backend == "torch"
    pngs = [images.encode_png(render_clean(i, 40)) for i in range(0, 43, 6)]
    a, b = onnx_p.classify(pngs), torch_p.classify(pngs)
    assert [t[0]["key"] for t in a] == [t[0]["key"] for t in b]
    assert max(abs(x["probability"] - y["probability"]) for ta, tb in zip(a, b) for x, y in zip(ta, tb)) < 1e-4
    mem = Predictor.load(model_dir, backend="onnx")  # exported in memory from the torch artefact
    assert mem.backend == "onnx" and [t[0]["key"] for t in mem.classify(pngs)] == [t[0]["key"] for t in b]
    with pytest.raises(PredictError, match="ONNX export"):
        Predictor.load(out, backend="torch")


def test_tampered_onnx_is_refused(exported, tmp_path: Path) -> None:
    out, _ = exported
    copy = tmp_path / "copy"
    copy.mkdir()
    data = bytearray((Path(out) / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "model.onnx").write_bytes(bytes(data))
    (copy / "model.json").write_text((Path(out) / "model.json").read_text())
    with pytest.raises(PredictError, match="sha256"):
        Predictor.load(str(copy))


def test_parity_failure_writes_nothing(model_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "strict"
    with pytest.raises(ExportError, match="nothing written"):
        export(ExportConfig(model=model_dir, out=str(out), samples=8, tolerance=1e-30))
    assert not out.exists() or not any(out.iterdir())


def test_cli_export_prints_the_difference(model_dir: str, tmp_path: Path, capsys) -> None:
    from signscale.cli import main

    assert main(["export", model_dir, "--format", "onnx", "--out", str(tmp_path / "e"), "--samples", "8"]) == 0
    assert "max |p_onnx - p_torch|" in capsys.readouterr().out
    assert (tmp_path / "e" / "model.onnx").exists() and (tmp_path / "e" / "model.json").exists()

"""The model registry and the classifiers: shapes, gradients, configs, layouts, autocast and cost counts."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from signscale.models import MODELS, create_model, model_config, model_info, rebuild

# modules these tests exercise through the ones they import (tests/test_layout.py)
COVERS = ("signscale.models.cnn",)

NAMES = sorted(MODELS)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [32, 48])
def test_forward_shape_and_features(name: str, size: int) -> None:
    model = create_model(name, 43).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
    assert logits.shape == (2, 43)
    assert feats.shape == (2, model.num_features)
    assert isinstance(model.head, nn.Linear) and model.head.in_features == model.num_features
    with torch.no_grad():
        maps = model.feature_maps(x)
    sides = [m.shape[-1] for m in maps]
    assert len(maps) >= 3 and sides == sorted(sides, reverse=True) and sides[0] <= size
    # The contract a grown head relies on: the head reads exactly what features() returns.
    torch.testing.assert_close(model.head(feats), logits)


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name: str) -> None:
    model = create_model(name, 43).train()
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.randint(0, 43, (2,)))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_stn_starts_as_identity_and_trains() -> None:
    """An untrained STN must pass the crop through, or stn_msnet would start from random warps."""
    model = create_model("stn_msnet", 43).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.stn(x), x, atol=1e-5, rtol=1e-5)
    model.train()
    model(x).sum().backward()
    assert model.stn.theta.weight.grad.abs().sum() > 0


def test_msnet_depth_per_stage() -> None:
    model = create_model("msnet", 43, widths=[8, 16, 32], depth=[1, 2, 3])
    assert [sum(isinstance(m, nn.Conv2d) for m in stage.modules()) for stage in model.stages] == [1, 2, 3]
    with pytest.raises(ValueError, match="depth"):
        create_model("msnet", 43, widths=[8, 16, 32], depth=[1, 2])


def test_unknown_name_lists_valid_names_and_closest_match() -> None:
    with pytest.raises(ValueError) as err:
        create_model("msnte", 43)
    message = str(err.value)
    assert "did you mean 'msnet'" in message
    for name in NAMES:
        assert name in message


def test_unknown_option_and_bad_values_are_named() -> None:
    with pytest.raises(ValueError, match="width.*valid:.*widths"):
        create_model("msnet", 43, width=[8, 16])
    with pytest.raises(ValueError, match="num_classes"):
        create_model("small_cnn", 0)
    with pytest.raises(ValueError, match="dropout"):
        create_model("msnet", 43, dropout=1.5)
    with pytest.raises(ValueError, match="plain data"):
        create_model("msnet", 43, widths=torch.tensor([8, 16]))


def test_model_info_counts_params_and_macs() -> None:
    infos = {name: model_info(create_model(name, 43)) for name in NAMES}
    for name, info in infos.items():
        assert info["params"] == sum(p.numel() for p in create_model(name, 43).parameters())
        assert info["macs"] > 0
    assert infos["small_cnn"]["macs"] < infos["msnet"]["macs"] < infos["stn_msnet"]["macs"]
    assert infos["msnet"]["macs"] < infos["resnet18_small"]["macs"]
    assert infos["small_cnn"]["params"] < infos["msnet"]["params"] < infos["resnet18_small"]["params"]
    # Conv cost grows with the pixel count; the counted forward must not leave the model in eval mode.
    model = create_model("small_cnn", 43).train()
    assert model_info(model, input_size=48)["macs"] > 2 * infos["small_cnn"]["macs"]
    assert model.training


def test_model_info_first_conv_macs_by_hand() -> None:
    """small_cnn's first conv at 32x32: 3 in x 32 out x 3x3 kernel x 32x32 outputs, all counted."""
    model = create_model("small_cnn", 10, widths=[32])
    expected = 3 * 32 * 9 * 32 * 32 + 32 * 10  # conv + head
    assert model_info(model)["macs"] == expected


@pytest.mark.parametrize("name", NAMES)
def test_rebuild_from_plain_config(name: str) -> None:
    kwargs = {"dropout": 0.2} if name in ("small_cnn", "resnet18_small") else {"widths": (16, 32, 48)}
    model = create_model(name, 7, **kwargs)
    config = json.loads(json.dumps(model_config(model)))  # must survive a trip through plain JSON
    assert config["name"] == name and config["num_classes"] == 7
    twin = rebuild(config)
    twin.load_state_dict(model.state_dict(), strict=True)
    assert model_config(twin) == config
    model.eval(), twin.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))


def test_config_is_resolved_and_private() -> None:
    """Defaults are written out, so a later change of default cannot change a saved architecture."""
    config = model_config(create_model("stn_msnet", 43))
    assert config["kwargs"]["stn"] is True
    assert config["kwargs"]["widths"] == list(MODELS["msnet"].options()["widths"])
    config["kwargs"]["widths"].append(999)
    assert 999 not in model_config(create_model("stn_msnet", 43))["kwargs"]["widths"]


def test_config_found_through_a_wrapper_and_rejected_without_one() -> None:
    class Wrapper(nn.Module):  # the shape of DistributedDataParallel: the model is ``.module``
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    model = create_model("small_cnn", 5)
    assert model_config(Wrapper(model)) == model_config(model)
    with pytest.raises(ValueError, match="create_model"):
        model_config(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="newer"):
        rebuild({**model_config(model), "format": 999})


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_matches_contiguous(name: str) -> None:
    model = create_model(name, 43).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_forward_on_cpu(name: str) -> None:
    model = create_model(name, 43).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
    assert logits.shape == (2, 43) and torch.isfinite(logits).all()
    # bfloat16 keeps ~3 significant digits: close to fp32, not equal.
    torch.testing.assert_close(logits.float(), reference, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("mode", ["global", "local"])
def test_contrast_norm_sees_a_dim_and_a_glaring_crop_alike(mode: str) -> None:
    from signscale.models.cnn import ContrastNorm

    x = torch.rand(3, 3, 32, 32)
    norm = ContrastNorm(mode)
    out = norm(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.allclose(norm(x * 0.2 + 0.7), out, atol=1e-3)  # a per-image gain and offset change nothing
    assert not torch.allclose(out, x, atol=0.1)
    assert torch.equal(ContrastNorm("none")(x), x)
    with pytest.raises(ValueError, match="contrast must be one of"):
        ContrastNorm("clahe")


def test_local_contrast_lifts_a_faint_detail_on_a_bright_image() -> None:
    from signscale.models.cnn import ContrastNorm

    x = torch.full((1, 3, 32, 32), 0.9)
    x[..., 8:24, 4:28] = 0.1  # a dark board, strongly contrasted
    x[..., 14:18, 14:18] = 0.12  # and on it a faint pictogram
    glob, loc = ContrastNorm("global")(x), ContrastNorm("local")(x)
    detail = lambda z: float((z[..., 14:18, 14:18].mean() - z[..., 10:12, 8:12].mean()).abs())
    assert detail(loc) > 3 * detail(glob)


def test_msnet_with_contrast_keeps_its_weights_and_an_old_config_rebuilds_unchanged() -> None:
    plain = create_model("msnet", 43)
    local = create_model("msnet", 43, contrast="local")
    assert plain.state_dict().keys() == local.state_dict().keys()  # the layer has no weights to save
    old = model_config(plain)
    del old["kwargs"]["contrast"], old["kwargs"]["contrast_sigma"]  # a model saved before the option existed
    again = rebuild(old)
    again.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), plain.eval()(x))
        again = rebuild(model_config(local))
        again.load_state_dict(local.state_dict())
        assert torch.equal(again.eval()(x), local.eval()(x))  # the contrast layer comes back with the config
        local.load_state_dict(plain.state_dict())
        assert not torch.allclose(local(x), plain(x))  # same weights: the contrast layer alone tells them apart

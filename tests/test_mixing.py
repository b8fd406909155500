"""Mixup and CutMix: targets in the proportion of the pixels they mix, drawn from the batch's seed."""

from __future__ import annotations

import pytest
import torch

from signscale.config import ConfigError
from signscale.training.mixing import Mixing, mix
from signscale.training.train import TrainConfig, train

CLASSES = 7


def _batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image is flat at its class id, so an image's mean says which classes it was mixed from."""
    y = torch.arange(n) % CLASSES
    return y.float().view(n, 1, 1, 1).expand(n, 3, 16, 16).contiguous(), y


@pytest.mark.parametrize("cfg", [Mixing(mixup=0.4), Mixing(cutmix=1.0)], ids=["mixup", "cutmix"])
def test_targets_hold_the_classes_in_the_share_of_pixels_they_cover(cfg: Mixing) -> None:
    x, y = _batch()
    mixed, targets = mix(x, y, CLASSES, cfg, seed=3)
    assert mixed.shape == x.shape and targets.shape == (len(y), CLASSES)
    assert torch.allclose(targets.sum(1), torch.ones(len(y)))
    ids = torch.arange(CLASSES, dtype=torch.float32)
    assert torch.allclose(mixed.mean(dim=(1, 2, 3)), targets @ ids, atol=1e-5)
    assert (targets.max(1).values < 1).any()  # something was mixed
    assert torch.equal(x, _batch()[0])  # the input batch is left as it was


def test_same_seed_same_mix_and_both_kinds_are_used() -> None:
    x, y = _batch()
    cfg = Mixing(mixup=0.2, cutmix=1.0)
    a, b = mix(x, y, CLASSES, cfg, seed=11), mix(x, y, CLASSES, cfg, seed=11)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], mix(x, y, CLASSES, cfg, seed=12)[1])
    # cutmix leaves some pixels exactly as they were; mixup (keep < 1) changes every pixel of a mixed pair
    kinds = {bool((mix(x, y, CLASSES, cfg, seed=s)[0] == x).all(dim=1).any(dim=(1, 2)).all()) for s in range(20)}
    assert kinds == {True, False}


def test_bad_alpha_is_named() -> None:
    with pytest.raises(ValueError, match="cutmix.*>= 0"):
        Mixing(cutmix=-1)
    with pytest.raises(ConfigError, match="mixup"):
        TrainConfig(data=("x",), mixup=-0.5)


def test_training_with_mixing_trains_on_mixed_targets(synthetic_dataset, tmp_path) -> None:
    def losses(name: str, **kw) -> list[float]:
        return train(TrainConfig(data=(synthetic_dataset,), out=str(tmp_path / name), model="small_cnn", batch_size=32,
                                 max_steps=3, workers=0, progress=False, calibrate=False, **kw)).losses

    plain, mixed = losses("plain"), losses("mixed", mixup=0.4, cutmix=1.0)
    assert all(map(torch.isfinite, torch.tensor(mixed)))
    assert plain[0] != pytest.approx(mixed[0])  # same weights, same pixels before mixing: the mix changed the loss

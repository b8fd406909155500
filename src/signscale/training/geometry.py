"""The geometric step of training augmentation: one 3x3 sampling matrix per sample and one
``grid_sample`` for the whole batch.

The compiled kernel (:func:`signscale.kernels._sampling_matrix`) builds the same matrices from the
same draws and samples at the same pixel centres.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def sampling_matrices(angle: Tensor, zoom: Tensor, shift: Tensor, tilt: Tensor | None, flip: Tensor,
                      h: int, w: int) -> Tensor:
    """[B, 3, 3] maps from output to input coordinates in grid_sample's [-1, 1] space.

    The forward transform (what happens to the sign) is flip, zoom, rotate, shift, then tilt; the
    sampler needs its inverse, so a zoom of 1.1 really enlarges the sign by 10%, and a flip is
    exactly ``x -> -x``, which keeps a flipped image pixel-exact. Rotation happens in pixel units,
    so non-square images rotate without shearing.
    """
    n, dtype, device = angle.shape[0], angle.dtype, angle.device
    mirror = 1.0 - 2.0 * flip.to(dtype)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # mirror @ (1 / zoom) @ rotation(-angle): the inverse of the linear part
    a = torch.stack([mirror * cos, mirror * sin * (h / w), -sin * (w / h), cos], dim=1).view(n, 2, 2)
    b = -(a @ shift[:, :, None])  # undo the shift before the linear part: [B, 2, 1]
    last = torch.zeros(n, 1, 3, dtype=dtype, device=device)
    last[:, 0, 2] = 1.0
    if tilt is not None:
        # the inverse of a tilt [[1, 0, 0], [0, 1, 0], [p, q, 1]] negates p and q; fold it in on the right
        a = a - b * tilt[:, None, :]
        last[:, 0, :2] = -tilt
    return torch.cat([torch.cat([a, b], dim=2), last], dim=1)


@functools.lru_cache(maxsize=32)
def pixel_centres(size: int, device: torch.device) -> Tensor:
    """Pixel centres in [-1, 1] (align_corners=False), written so that -c[i] == c[size-1-i] exactly."""
    return (torch.arange(size, device=device, dtype=torch.float32) * 2 + (1 - size)) / size


def warp(x: Tensor, m: Tensor, padding: str, *, projective: bool, grid: Tensor | None = None) -> Tensor:
    """Resample every image through its matrix with one grid_sample.

    The grid is separable -- ``grid[b, :, i, j] = U[b, :, j] + V[b, :, i]`` -- so it is one
    broadcast add into planar [B, 2, H, W] form, many times cheaper than ``affine_grid``'s batched
    matmul (which at 32 px costs more than the sampling itself); grid_sample then reads the planar
    grid through a permuted view, so it is never interleaved in memory.
    """
    h, w = x.shape[-2:]
    xs, ys = pixel_centres(w, x.device), pixel_centres(h, x.device)
    along_x = m[:, :, 0, None] * xs + m[:, :, 2, None]  # [B, 3, W]: homogeneous (x, y, depth) terms
    along_y = m[:, :, 1, None] * ys  # [B, 3, H]
    grid = torch.add(along_x[:, :2, None, :], along_y[:, :2, :, None], out=grid)  # [B, 2, H, W]
    if projective:
        depth = along_x[:, 2:, None, :] + along_y[:, 2:, :, None]  # >= 1 - 2 * perspective > 0
        grid = grid.div_(depth)
    grid = grid.permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)

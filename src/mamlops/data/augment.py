"""Training-time augmentation: small random affine warps of the images of a meta-batch.

Apart from the task sampler (``episodes.py``) because it is the one part of it that does image
arithmetic rather than indexing; the sampler calls it when a setting asks for
``augment: affine``.
"""

from __future__ import annotations

import math

import torch

# Small warps, the range of a person's drawing the same character twice: rotation, scale per
# axis, shear, and a shift of up to 2 of 28 pixels.
AFFINE_DEGREES, AFFINE_SCALE, AFFINE_SHEAR, AFFINE_SHIFT = 10.0, 0.1, 0.15, 2 / 14


def affine_augment(
    x: torch.Tensor, g: torch.Generator, n_tasks: int, part: slice | None, fill: str
) -> torch.Tensor:
    """``x`` [T, B, C, H, W] with each image warped by its own random affine transform.

    The numbers are drawn for all ``n_tasks`` tasks and then sliced by ``part``, like the
    tasks themselves, so a shard's images do not depend on the number of processes.
    """
    t, b = x.shape[:2]
    n = n_tasks * b
    u = torch.rand(n, 6, generator=g, device=g.device).to(x.device) * 2 - 1  # U(-1, 1)
    if part is not None:
        u = u.reshape(n_tasks, b, 6)[part].reshape(-1, 6)
    angle = u[:, 0] * math.radians(AFFINE_DEGREES)
    sx, sy = 1 + AFFINE_SCALE * u[:, 1], 1 + AFFINE_SCALE * u[:, 2]
    shear = AFFINE_SHEAR * u[:, 3]
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(t * b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 1] = cos * sx, -sin * sy + shear
    theta[:, 1, 0], theta[:, 1, 1] = sin * sx, cos * sy
    theta[:, :, 2] = AFFINE_SHIFT * u[:, 4:6]
    flat = x.reshape(t * b, *x.shape[2:])
    grid = torch.nn.functional.affine_grid(theta, list(flat.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(flat, grid, padding_mode=fill, align_corners=False)
    return out.reshape(x.shape)

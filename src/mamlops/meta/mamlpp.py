"""The MAML++ switches (Antoniou et al. 2019) that sit around the inner loop, not in it.

``maml`` is the algorithm; this module holds what MAML++ adds to the training around it: the
extra meta-parameters (learned per-step inner lrs, per-step BatchNorm; ``init_meta_params``),
the multi-step loss weights, derivative-order annealing, the cosine meta-lr schedule and
meta-gradient clipping. Each is a pure function of the iteration and the config, so the eager
loop (``train``) and a replayed CUDA graph (``graph_step``, with the iteration a device tensor)
compute the same numbers from the same code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mamlops.config import MAMLConfig
from mamlops.meta.keys import Params, adapted_names, lr_key
from mamlops.meta.model import ConvNetConfig, init_params, per_step_bn


def init_meta_params(
    model_cfg: ConvNetConfig, maml_cfg: MAMLConfig, generator: torch.Generator | None = None
) -> Params:
    """Network weights plus the meta-parameters the enabled MAML++ switches add.

    ``adapt_bn: false`` (without per-step BN) gives the BN weights a step axis of one row: the
    mark of weights that are meta-learned but not adapted (``keys.adapted_names``), so theta says by
    itself how to adapt it.
    """
    params = init_params(
        model_cfg, generator, bn_scale=maml_cfg.bn_scale, head_init=maml_cfg.head_init
    )
    if maml_cfg.per_step_bn:
        params = per_step_bn(params, maml_cfg.inner_steps)
    elif not maml_cfg.adapt_bn:
        params = per_step_bn(params, 0)
    if maml_cfg.learn_inner_lr:
        for name in adapted_names(params):
            params[lr_key(name)] = torch.full((maml_cfg.inner_steps,), maml_cfg.inner_lr)
    return params


def multi_step_weights(
    steps: int, iteration: int | Tensor, anneal_iters: int
) -> list[float] | Tensor:
    """MAML++ multi-step loss weights for query losses after steps 1..steps.

    Start uniform (1/K each); the intermediate weights decay linearly over ``anneal_iters`` to
    a floor of 0.03/K and the final step takes the rest, so late training optimises the final
    adapted model as plain MAML does while early training gets gradient from every step.
    ``iteration`` a device tensor: the weights as a tensor computed on the device, read inside
    a replayed CUDA graph (``graph_step``); the same numbers up to float rounding.
    """
    if steps <= 1:
        return iteration.new_ones(steps) if isinstance(iteration, Tensor) else [1.0] * steps
    uniform = 1.0 / steps
    if isinstance(iteration, Tensor):
        frac = (
            (iteration / anneal_iters).clamp(max=1.0)
            if anneal_iters > 0
            else torch.ones_like(iteration)
        )
        inter = (uniform * (1.0 - frac)).clamp(min=0.03 / steps)
        return torch.cat([inter.expand(steps - 1), (1.0 - inter * (steps - 1))[None]])
    frac = 1.0 if anneal_iters <= 0 else min(iteration / anneal_iters, 1.0)
    inter = max(uniform * (1.0 - frac), 0.03 / steps)
    return [inter] * (steps - 1) + [1.0 - inter * (steps - 1)]


def use_first_order(maml_cfg: MAMLConfig, iteration: int) -> bool:
    """First-order at this iteration? Always when configured, else for the first E iterations."""
    return maml_cfg.first_order or iteration < maml_cfg.first_order_iters


def cosine_meta_lr(
    iteration: int | Tensor, total_iters: int, base_lr: float, min_lr: float = 0.0
) -> float | Tensor:
    """MAML++ cosine annealing of the outer (Adam) lr: base_lr at 0, min_lr at total_iters.
    ``iteration`` a device tensor: the lr as one, for Adam inside a CUDA graph."""
    if isinstance(iteration, Tensor):
        frac = (iteration / max(total_iters, 1)).clamp(0.0, 1.0)
        return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + torch.cos(math.pi * frac))
    frac = min(max(iteration / max(total_iters, 1), 0.0), 1.0)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * frac))


def clip_meta_grad(params: Params, max_norm: float | None) -> Tensor:
    """Clip the meta-gradient in place to global norm ``max_norm`` (None: no clipping); returns
    the norm before clipping as a tensor (no sync) for logging."""
    grads = [p for p in params.values() if p.grad is not None]
    if max_norm is None:
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])
        )
    return torch.nn.utils.clip_grad_norm_(grads, max_norm)

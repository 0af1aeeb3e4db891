"""The functional 4-block conv net of the MAML paper.

Parameters live in a plain ``dict[str, Tensor]`` rather than an ``nn.Module`` so that the inner
loop can build adapted copies (``theta - alpha * grad``) that stay in the autograd graph, which
second-order MAML needs. Every function here is pure: no hidden state, no running statistics.

BatchNorm follows the paper code: normalise with the statistics of the batch at hand
(transductive), no running averages; a learnable shift and, unless theta lacks ``bn{i}.weight``
(the reference code's BatchNorm, ``MAMLConfig.bn_scale: false``), a learnable scale. For serving
one image at a time ``forward`` also accepts frozen statistics (``bn_stats``), e.g. those of the
support set.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mamlops.datasets import N_BLOCKS, ConvNetConfig
from mamlops.meta.keys import (
    Params,
    bn_scale_key,
    bn_shift_key,
    conv_key,
    network_weights,
)

BNStats = list[tuple[Tensor, Tensor]]

BN_EPS = 1e-5


def init_params(
    cfg: ConvNetConfig,
    generator: torch.Generator | None = None,
    *,
    bn_scale: bool = True,
    head_init: str = "xavier",
) -> Params:
    """Xavier-uniform convs with BN scale 1 and shift 0, a Xavier-uniform head with zero bias.

    The conv bias is omitted on purpose: BatchNorm subtracts the batch mean right after, so its
    true gradient is exactly zero and it would only cost compute. ``bn_scale=False`` leaves the
    BN scale out (the reference code's BatchNorm learns a shift only); ``head_init="normal"``
    draws the head from N(0, 1), as the reference code does for Omniglot (its miniImageNet head
    is Xavier). Either way the generator is consumed in the same order, conv weights first.
    """
    if head_init not in ("xavier", "normal"):
        raise ValueError(f"unknown head_init {head_init!r}: expected 'xavier' or 'normal'")
    params: Params = {}
    c_in = cfg.in_channels
    for i in range(N_BLOCKS):
        w = torch.empty(cfg.hidden, c_in, 3, 3)
        _xavier_uniform(w, generator)
        params[conv_key(i)] = w
        if bn_scale:
            params[bn_scale_key(i)] = torch.ones(cfg.hidden)
        params[bn_shift_key(i)] = torch.zeros(cfg.hidden)
        c_in = cfg.hidden
    w = torch.empty(cfg.ways, cfg.feature_dim)
    if head_init == "normal":
        with torch.no_grad():
            w.normal_(0.0, 1.0, generator=generator)
    else:
        _xavier_uniform(w, generator)
    params["head.weight"] = w
    params["head.bias"] = torch.zeros(cfg.ways)
    return params


def _xavier_uniform(w: Tensor, generator: torch.Generator | None) -> None:
    fan_out = w.shape[0] * (w[0, 0].numel() if w.dim() > 2 else 1)
    fan_in = w[0].numel()
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        w.uniform_(-bound, bound, generator=generator)


def _bn_affine(params: Params, i: int, step: int, task_dim: bool) -> tuple[Tensor | None, Tensor]:
    """BN scale (None when theta has none) and shift of block ``i``; with a step axis pick the
    row of ``step``.

    Per-step tensors carry an extra step axis ([S, C], or [T, S, C] per task): S = steps + 1
    rows for MAML++'s per-step BN, one row for BN that is meta-learned but not adapted
    (``adapt_bn: false``). Steps past the last row (e.g. 10 test-time steps after 5 training
    steps) reuse the last row.
    """
    w, b = params.get(bn_scale_key(i)), params[bn_shift_key(i)]
    if b.dim() == (3 if task_dim else 2):
        s = min(step, b.shape[-2] - 1)
        w, b = (None if w is None else w[..., s, :]), b[..., s, :]
    return w, b


def block(
    h: Tensor,
    weight: Tensor,
    cfg: ConvNetConfig,
    *,
    bias: Tensor | None = None,
    bn: tuple[Tensor, Tensor] | None = None,
    stats: tuple[Tensor, Tensor] | None = None,
    record: BNStats | None = None,
    groups: int = 1,
) -> Tensor:
    """One of the four blocks, the only place it is spelled: 3x3 conv (stride ``cfg.stride``,
    padding 1) -> BatchNorm -> ReLU (-> 2x2 max-pool).

    ``bn`` is (scale, shift), the scale possibly None (shift only); without ``bn`` the block has
    no BatchNorm (the exported net, whose BN is folded into ``weight`` and ``bias``). BatchNorm
    uses the batch's own statistics unless ``stats`` (mean, var) freezes them; ``record``
    collects the statistics of this batch (then used for the normalisation itself).
    ``groups`` > 1 runs several tasks' convs at once.

    F.batch_norm (fused, with exact double backward) rather than explicit mean/var ops: the same
    math (biased variance, eps inside the sqrt) at a fraction of the kernel launches.
    """
    h = F.conv2d(h, weight, bias, stride=cfg.stride, padding=1, groups=groups)
    if bn is not None:
        if bn[0] is None:  # shift only; F.batch_norm's double backward needs a scale tensor
            bn = (torch.ones_like(bn[1]), bn[1])
        if record is not None:
            stats = (h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=False))
            record.append(stats)
        if stats is None:
            h = F.batch_norm(h, None, None, bn[0], bn[1], True, 0.0, BN_EPS)
        elif stats[0].requires_grad or stats[1].requires_grad:
            # statistics in the autograd graph (meta-training with support-set BN): written
            # out, since F.batch_norm takes frozen statistics as constants
            mean = stats[0][None, :, None, None]
            scale = (bn[0] / torch.sqrt(stats[1] + BN_EPS))[None, :, None, None]
            h = (h - mean) * scale + bn[1][None, :, None, None]
        else:
            h = F.batch_norm(h, stats[0], stats[1], bn[0], bn[1], False, 0.0, BN_EPS)
    h = F.relu(h)
    return F.max_pool2d(h, 2) if cfg.max_pool else h


def _blocks(
    params: Params,
    h: Tensor,
    cfg: ConvNetConfig,
    bn_stats: BNStats | None,
    step: int,
    record: BNStats | None = None,
    tasks: int | None = None,
) -> Tensor:
    """The four blocks; ``tasks``: ``params`` carry a leading task axis and ``h`` is folded."""
    for i in range(N_BLOCKS):
        weight = params[conv_key(i)]
        scale, shift = _bn_affine(params, i, step, task_dim=tasks is not None)
        if tasks is not None:
            weight = weight.reshape(-1, *weight.shape[2:])
            scale = None if scale is None else scale.reshape(-1)
            shift = shift.reshape(-1)
        stats = None if bn_stats is None else bn_stats[i]
        h = block(h, weight, cfg, bn=(scale, shift), stats=stats, record=record, groups=tasks or 1)
    return h


def _head(params: Params, h: Tensor, cfg: ConvNetConfig) -> Tensor:
    feats = h.flatten(1) if cfg.max_pool else h.mean(dim=(2, 3))
    return F.linear(feats, params["head.weight"], params["head.bias"])


def forward(
    params: Params,
    x: Tensor,
    cfg: ConvNetConfig,
    bn_stats: BNStats | None = None,
    *,
    step: int = 0,
) -> Tensor:
    """Logits for images ``x`` of shape [B, C, H, W].

    ``bn_stats=None`` uses the batch's own statistics (the paper's transductive protocol);
    a list of (mean, var) per block freezes them, so predictions no longer depend on what else
    is in the batch. ``step`` only matters with per-step BN weights (MAML++): it picks the
    inner-loop step whose scale and shift to use. Keys ``forward`` does not know (e.g. the
    learned inner lrs ``lr.*``) are ignored.
    """
    return _head(params, _blocks(params, x, cfg, bn_stats, step), cfg)


def forward_folded(weights: Params, x: Tensor, cfg: ConvNetConfig) -> Tensor:
    """Logits of the serving network: BatchNorm folded into each conv's weight and bias
    (``conv{i}.weight``, ``conv{i}.bias``; see ``Classifier.folded``), no batch dependence."""
    h = x
    for i in range(N_BLOCKS):
        h = block(h, weights[f"conv{i}.weight"], cfg, bias=weights[f"conv{i}.bias"])
    return _head(weights, h, cfg)


def batch_stats(
    params: Params, x: Tensor, cfg: ConvNetConfig, *, step: int = 0, detach: bool = True
) -> BNStats:
    """Per-block BatchNorm (mean, var) of ``x`` as the network sees it, detached unless
    ``detach=False`` (meta-training through them, ``MAMLConfig.query_bn: support``).

    Freezing the support set's statistics gives the deployable protocol: an adapted classifier
    whose answer for one image does not depend on the rest of the batch.
    """
    stats: BNStats = []
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
        _blocks(params, x, cfg, None, step, record=stats)
    return stats


def per_step_bn(params: Params, steps: int) -> Params:
    """A copy of ``params`` whose BN scale/shift get one row per inner step 0..steps (MAML++).

    Step ``s`` of the inner loop (and the query pass after ``s`` updates) uses row ``s``, so the
    network can rescale features as the adapted weights drift; rows start equal. ``steps=0``
    gives one row shared by every step: BN weights that the inner loop leaves alone (BN tensors
    with a step axis are meta-learned only, ``keys.is_step_bn``), as in the reference code.
    """
    out = dict(params)
    for i in range(N_BLOCKS):
        for name in (bn_scale_key(i), bn_shift_key(i)):
            if name in params:
                out[name] = params[name].unsqueeze(0).repeat(steps + 1, 1)
    return out


# ---------------------------------------------------------------------------------------------
# Many tasks in one pass. Each task has its own (adapted) weights, so the tasks are folded into
# the channel axis: images [T, B, C, H, W] become [B, T*C, H, W], a grouped convolution
# (groups=T), and per-channel BatchNorm over (B, H, W) of that layout is exactly per-task
# BatchNorm (im2col + one bmm over tasks was measured as an alternative and lost on the CPU,
# see docs/performance.md). One call per layer instead of T keeps the
# small-batch MAML workload off the Python and dispatch overhead that dominates a per-task
# loop. Unlike torch.func.vmap this is ordinary autograd, so second-order gradients through
# BatchNorm are exact (vmap's are not, functorch #534); tests check it in float64.
# ---------------------------------------------------------------------------------------------


def expand_params(params: Params, tasks: int) -> Params:
    """Per-task copies of the network weights: every tensor gains a leading axis of ``tasks``.

    Differentiable (an ``expand``), so gradients w.r.t. the copies sum back into ``params``.
    Keys other than the network's (e.g. ``lr.*``) are left out.
    """
    return {k: v.unsqueeze(0).expand(tasks, *v.shape) for k, v in network_weights(params).items()}


def _fold(x: Tensor) -> Tensor:
    t, b, c, h, w = x.shape
    return x.transpose(0, 1).reshape(b, t * c, h, w)


def forward_tasks(
    params: Params,
    x: Tensor,
    cfg: ConvNetConfig,
    bn_stats: BNStats | None = None,
    *,
    step: int = 0,
) -> Tensor:
    """Logits [T, B, ways] for images ``x`` [T, B, C, H, W], task t scored with its own weights.

    Every tensor in ``params`` has a leading task axis T (see ``expand_params``). Equivalent to
    ``torch.stack([forward(params_t, x[t], cfg) for t in range(T)])`` with per-task BN stats.
    ``bn_stats`` (from ``batch_stats_tasks``) freezes per-task statistics instead.
    """
    n_tasks, batch = x.shape[:2]
    h = _blocks(params, _fold(x), cfg, bn_stats, step, tasks=n_tasks)
    h = h.reshape(batch, n_tasks, cfg.hidden, *h.shape[2:])
    feats = h.flatten(2) if cfg.max_pool else h.mean(dim=(3, 4))  # [B, T, F]
    logits = torch.einsum("btf,twf->tbw", feats, params["head.weight"])
    return logits + params["head.bias"][:, None, :]


def batch_stats_tasks(
    params: Params, x: Tensor, cfg: ConvNetConfig, *, step: int = 0, detach: bool = True
) -> BNStats:
    """Per-task, per-block BN (mean, var) of ``x`` [T, B, ...], flattened to [T*C], detached
    unless ``detach=False``.

    The batched counterpart of ``batch_stats``, in the layout ``forward_tasks`` takes.
    """
    stats: BNStats = []
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
        _blocks(params, _fold(x), cfg, None, step, record=stats, tasks=x.shape[0])
    return stats

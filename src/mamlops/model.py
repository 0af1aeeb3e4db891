"""The functional 4-block conv net of the MAML paper.

Parameters live in a plain ``dict[str, Tensor]`` rather than an ``nn.Module`` so that the inner
loop can build adapted copies (``theta - alpha * grad``) that stay in the autograd graph, which
second-order MAML needs. Every function here is pure: no hidden state, no running statistics.

BatchNorm follows the paper code: normalise with the statistics of the batch at hand
(transductive), learnable scale and shift, no running averages. For serving one image at a time
``forward`` also accepts frozen statistics (``bn_stats``), e.g. those of the support set.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Params = dict[str, Tensor]
BNStats = list[tuple[Tensor, Tensor]]

BN_EPS = 1e-5
N_BLOCKS = 4


@dataclass(frozen=True)
class ConvNetConfig:
    """Shape of the network. Omniglot: 64 filters, stride-2 convs, spatial mean before the head.
    miniImageNet: 32 filters, stride-1 convs with 2x2 max-pool, flattened features."""

    in_channels: int = 1
    ways: int = 5
    hidden: int = 64
    max_pool: bool = False
    image_size: int = 28

    @classmethod
    def for_dataset(cls, dataset: str, ways: int) -> ConvNetConfig:
        if dataset == "omniglot":
            return cls(in_channels=1, ways=ways, hidden=64, max_pool=False, image_size=28)
        if dataset == "miniimagenet":
            return cls(in_channels=3, ways=ways, hidden=32, max_pool=True, image_size=84)
        raise ValueError(f"unknown dataset {dataset!r}: expected 'omniglot' or 'miniimagenet'")

    @property
    def feature_dim(self) -> int:
        if not self.max_pool:
            return self.hidden  # spatial mean, as the paper code does for Omniglot
        size = self.image_size
        for _ in range(N_BLOCKS):
            size = size // 2
        return self.hidden * size * size

    def to_dict(self) -> dict:
        return asdict(self)


def init_params(cfg: ConvNetConfig, generator: torch.Generator | None = None) -> Params:
    """Xavier-uniform convs/head with zero biases, BN scale 1 and shift 0 (as the paper code).

    The conv bias is omitted on purpose: BatchNorm subtracts the batch mean right after, so its
    true gradient is exactly zero and it would only cost compute.
    """
    params: Params = {}
    c_in = cfg.in_channels
    for i in range(N_BLOCKS):
        w = torch.empty(cfg.hidden, c_in, 3, 3)
        _xavier_uniform(w, generator)
        params[f"conv{i}.weight"] = w
        params[f"bn{i}.weight"] = torch.ones(cfg.hidden)
        params[f"bn{i}.bias"] = torch.zeros(cfg.hidden)
        c_in = cfg.hidden
    w = torch.empty(cfg.ways, cfg.feature_dim)
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


def _conv(params: Params, i: int, x: Tensor, cfg: ConvNetConfig) -> Tensor:
    stride = 1 if cfg.max_pool else 2
    return F.conv2d(x, params[f"conv{i}.weight"], stride=stride, padding=1)


def _finish_block(params: Params, i: int, h: Tensor, cfg: ConvNetConfig, stats) -> Tensor:
    if stats is None:
        mean = h.mean(dim=(0, 2, 3))
        var = h.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = stats
    h = (h - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + BN_EPS)
    h = h * params[f"bn{i}.weight"][None, :, None, None] + params[f"bn{i}.bias"][None, :, None, None]
    h = F.relu(h)
    if cfg.max_pool:
        h = F.max_pool2d(h, 2)
    return h


def _head(params: Params, h: Tensor, cfg: ConvNetConfig) -> Tensor:
    feats = h.flatten(1) if cfg.max_pool else h.mean(dim=(2, 3))
    return F.linear(feats, params["head.weight"], params["head.bias"])


def forward(
    params: Params, x: Tensor, cfg: ConvNetConfig, bn_stats: BNStats | None = None
) -> Tensor:
    """Logits for images ``x`` of shape [B, C, H, W].

    ``bn_stats=None`` uses the batch's own statistics (the paper's transductive protocol);
    a list of (mean, var) per block freezes them, so predictions no longer depend on what else
    is in the batch.
    """
    h = x
    for i in range(N_BLOCKS):
        h = _finish_block(params, i, _conv(params, i, h, cfg), cfg, None if bn_stats is None else bn_stats[i])
    return _head(params, h, cfg)


def batch_stats(params: Params, x: Tensor, cfg: ConvNetConfig) -> BNStats:
    """Per-block BatchNorm (mean, var) of ``x`` as the network sees it, detached.

    Freezing the support set's statistics gives the deployable protocol: an adapted classifier
    whose answer for one image does not depend on the rest of the batch.
    """
    stats: BNStats = []
    h = x
    with torch.no_grad():
        for i in range(N_BLOCKS):
            c = _conv(params, i, h, cfg)
            s = (c.mean(dim=(0, 2, 3)), c.var(dim=(0, 2, 3), unbiased=False))
            stats.append(s)
            h = _finish_block(params, i, c, cfg, s)
    return stats

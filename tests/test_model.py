"""Shape and equivalence tests for the functional conv net (tiny nets, float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mamlops.meta.model import (
    N_BLOCKS,
    ConvNetConfig,
    _head,
    batch_stats,
    batch_stats_tasks,
    block,
    expand_params,
    forward,
    forward_tasks,
    init_params,
    per_step_bn,
)

STRIDED = ConvNetConfig(in_channels=1, ways=3, hidden=4, max_pool=False, image_size=8)
POOLED = ConvNetConfig(in_channels=3, ways=3, hidden=4, max_pool=True, image_size=16)


def _params(cfg: ConvNetConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    p = init_params(cfg, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    # Non-trivial BN affine so that mistakes in scale/shift handling show.
    return {
        k: (v + 0.1 * torch.randn(v.shape, generator=g)).double()
        if k.startswith("bn")
        else v.double()
        for k, v in p.items()
    }


def test_paper_shapes():
    omni = ConvNetConfig.for_dataset("omniglot", 5)
    mini = ConvNetConfig.for_dataset("miniimagenet", 5)
    assert omni.feature_dim == 64 and mini.feature_dim == 32 * 5 * 5
    assert (omni.stride, mini.stride) == (2, 1)
    assert omni.first_block_activations == 64 * 14 * 14
    assert mini.first_block_activations == 32 * 84 * 84
    assert forward(init_params(omni), torch.randn(4, 1, 28, 28), omni).shape == (4, 5)
    assert "conv0.bias" not in init_params(omni)


@pytest.mark.parametrize("cfg", [STRIDED, POOLED], ids=["strided", "pooled"])
@pytest.mark.parametrize("per_step", [False, True])
def test_forward_tasks_matches_per_task_forward(cfg, per_step):
    params = _params(cfg)
    if per_step:
        params = per_step_bn(params, 2)
        g = torch.Generator().manual_seed(5)
        params = {
            k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()
        }
    n_tasks, batch, size = 3, 4, cfg.image_size
    x = torch.randn(n_tasks, batch, cfg.in_channels, size, size, dtype=torch.float64)
    # Different weights per task, as after adaptation.
    per_task = expand_params(params, n_tasks)
    per_task = {k: v + 0.05 * torch.randn(v.shape, dtype=v.dtype) for k, v in per_task.items()}
    for step in (0, 1, 5):
        got = forward_tasks(per_task, x, cfg, step=step)
        want = torch.stack(
            [
                forward({k: v[t] for k, v in per_task.items()}, x[t], cfg, step=step)
                for t in range(n_tasks)
            ]
        )
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        stats = batch_stats_tasks(per_task, x, cfg, step=step)
        frozen = forward_tasks(per_task, x[:, :2], cfg, stats, step=step)
        for t in range(n_tasks):
            p_t = {k: v[t] for k, v in per_task.items()}
            s_t = batch_stats(p_t, x[t], cfg, step=step)
            torch.testing.assert_close(
                frozen[t], forward(p_t, x[t, :2], cfg, s_t, step=step), rtol=1e-10, atol=1e-10
            )


def test_frozen_stats_make_predictions_batch_independent():
    params = _params(STRIDED)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    stats = batch_stats(params, x, STRIDED)
    torch.testing.assert_close(forward(params, x, STRIDED, stats), forward(params, x, STRIDED))
    torch.testing.assert_close(
        forward(params, x[:1], STRIDED, stats), forward(params, x, STRIDED)[:1]
    )


def test_conv_bias_canary_has_zero_gradient():
    """A conv bias right before transductive BN is cancelled by the mean subtraction: its true
    gradient is zero, even through a second-order MAML step. This is why init_params has none."""
    cfg = STRIDED
    params = _params(cfg)
    biases = [
        torch.randn(cfg.hidden, dtype=torch.float64, requires_grad=True) for _ in range(N_BLOCKS)
    ]

    def fwd(p, x):
        h = x
        for i in range(N_BLOCKS):
            bn = (p[f"bn{i}.weight"], p[f"bn{i}.bias"])
            h = block(h, p[f"conv{i}.weight"], cfg, bias=biases[i], bn=bn)
        return _head(p, h, cfg)

    xs = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    ys = torch.tensor([0, 1, 2, 0, 1, 2])
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    g = torch.autograd.grad(
        F.cross_entropy(fwd(leaves, xs), ys), list(leaves.values()), create_graph=True
    )
    fast = {k: v - 0.4 * gi for (k, v), gi in zip(leaves.items(), g, strict=True)}
    loss = F.cross_entropy(fwd(fast, xs.flip(0)), ys)
    grads = torch.autograd.grad(loss, biases + [leaves["conv1.weight"]])
    assert grads[-1].abs().max() > 1e-3  # the weights do get gradient
    for gb in grads[:-1]:
        assert gb.abs().max() < 1e-10

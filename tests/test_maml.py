"""Math tests for MAML: tiny nets, float64, BatchNorm on (transductive) throughout."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mamlops.config import MAMLConfig, TrainConfig
from mamlops.meta.keys import (
    adapted_names,
    bn_scale_key,
    bn_shift_key,
    conv_key,
    is_lr_key,
    is_step_bn,
    learned_lrs,
    lr_key,
    lr_target,
    network_weights,
)
from mamlops.meta.maml import (
    BATCHED_CPU_MAX_ACTIVATIONS,
    adapt,
    evaluate_tasks,
    meta_loss,
    resolve_strategy,
)
from mamlops.meta.mamlpp import (
    clip_meta_grad,
    cosine_meta_lr,
    init_meta_params,
    multi_step_weights,
    use_first_order,
)
from mamlops.meta.model import ConvNetConfig, batch_stats, forward
from mamlops.params import load_params

REPO = Path(__file__).resolve().parents[1]

STRIDED = ConvNetConfig(in_channels=1, ways=3, hidden=4, max_pool=False, image_size=8)
POOLED = ConvNetConfig(in_channels=3, ways=3, hidden=4, max_pool=True, image_size=16)


def _tasks(cfg: ConvNetConfig, n_tasks: int = 3, shots: int = 2, queries: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size, c = cfg.image_size, cfg.in_channels

    def images(n):
        return torch.randn(n_tasks, n, c, size, size, generator=g, dtype=torch.float64)

    def labels(k):
        return torch.arange(cfg.ways).repeat_interleave(k).repeat(n_tasks, 1)

    return SimpleNamespace(
        xs=images(cfg.ways * shots),
        ys=labels(shots),
        xq=images(cfg.ways * queries),
        yq=labels(queries),
    )


def _meta_params(cfg: ConvNetConfig, mcfg: MAMLConfig, seed: int = 0):
    p = init_meta_params(cfg, mcfg, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 100)
    out = {}
    for k, v in p.items():
        v = v.double()
        if k.startswith("bn") or k.startswith("head.bias"):
            v = v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype)
        out[k] = v.requires_grad_(True)
    return out


def _meta_grad(params, tasks, cfg, mcfg, step=0):
    loss, metrics = meta_loss(params, tasks, cfg, mcfg, step=step)
    grads = torch.autograd.grad(loss, list(params.values()))
    return loss, dict(zip(params, grads, strict=True)), metrics


MAMLPP = MAMLConfig(
    inner_lr=0.3,
    inner_steps=2,
    learn_inner_lr=True,
    per_step_bn=True,
    multi_step_loss=True,
    multi_step_anneal_iters=10,
)
# the reference code's network and loss (docs/accuracy.md): BN shift only and not adapted,
# N(0, 1) head, smoothed targets
REFERENCE = MAMLConfig(
    inner_lr=0.4,
    inner_steps=2,
    bn_scale=False,
    adapt_bn=False,
    head_init="normal",
    label_smoothing=0.05,
)
# meta-trained for the deployed protocol: the query normalised with the support set's
# statistics under the adapted weights, differentiated through
SUPPORT_BN = MAMLConfig(inner_lr=0.4, inner_steps=2, query_bn="support")


@pytest.mark.parametrize("cfg", [STRIDED, POOLED], ids=["strided", "pooled"])
@pytest.mark.parametrize(
    "mcfg",
    [
        MAMLConfig(inner_lr=0.4, inner_steps=2),
        MAMLConfig(inner_lr=0.4, inner_steps=1, first_order=True),
        MAMLPP,
        REFERENCE,
        SUPPORT_BN,
        replace(MAMLPP, query_bn="support"),
    ],
    ids=["second-order", "first-order", "maml++", "reference", "support-bn", "maml++-support"],
)
def test_batched_equals_loop(cfg, mcfg):
    tasks = _tasks(cfg)
    params = _meta_params(cfg, mcfg)
    loss_l, g_l, m_l = _meta_grad(params, tasks, cfg, replace(mcfg, strategy="loop"), step=3)
    loss_b, g_b, m_b = _meta_grad(params, tasks, cfg, replace(mcfg, strategy="batched"), step=3)
    torch.testing.assert_close(loss_b, loss_l, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m_b["query_acc"], m_l["query_acc"])
    for k in params:
        torch.testing.assert_close(g_b[k], g_l[k], rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("strategy", ["loop", "batched"])
@pytest.mark.parametrize(
    "mcfg",
    [MAMLConfig(inner_lr=0.4, inner_steps=2), MAMLPP, REFERENCE, SUPPORT_BN],
    ids=["maml", "maml++", "reference", "support-bn"],
)
def test_meta_gradient_matches_finite_differences(strategy, mcfg):
    cfg = STRIDED
    mcfg = replace(mcfg, strategy=strategy)
    tasks = _tasks(cfg, n_tasks=2)
    params = _meta_params(cfg, mcfg)
    _, grads, _ = _meta_grad(params, tasks, cfg, mcfg)
    gen = torch.Generator().manual_seed(7)
    eps = 1e-6
    for name in params:  # one random direction per tensor, lrs and per-step BN included
        d = torch.randn(params[name].shape, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            plus = {**params, name: params[name] + eps * d}
            minus = {**params, name: params[name] - eps * d}
        with torch.enable_grad():
            f_plus = meta_loss(
                {k: v.detach().requires_grad_() for k, v in plus.items()}, tasks, cfg, mcfg
            )[0]
            f_minus = meta_loss(
                {k: v.detach().requires_grad_() for k, v in minus.items()}, tasks, cfg, mcfg
            )[0]
        fd = (f_plus - f_minus).item() / (2 * eps)
        analytic = (grads[name] * d).sum().item()
        assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-8), name


def _manual_fomaml(params, tasks, cfg, lr):
    """First-order MAML by hand: inner gradient treated as a constant."""
    total = 0.0
    for t in range(tasks.xs.shape[0]):
        loss_s = F.cross_entropy(forward(params, tasks.xs[t], cfg), tasks.ys[t])
        g = torch.autograd.grad(loss_s, list(params.values()))
        fast = {k: v - lr * gi.detach() for (k, v), gi in zip(params.items(), g, strict=True)}
        total = total + F.cross_entropy(forward(fast, tasks.xq[t], cfg), tasks.yq[t])
    loss = total / tasks.xs.shape[0]
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


@pytest.mark.parametrize("strategy", ["loop", "batched"])
def test_first_order_drops_second_order_terms(strategy):
    cfg = STRIDED
    tasks = _tasks(cfg)
    fo = MAMLConfig(inner_lr=0.4, inner_steps=1, first_order=True, strategy=strategy)
    params = _meta_params(cfg, fo)
    _, g_fo, _ = _meta_grad(params, tasks, cfg, fo)
    want = _manual_fomaml(params, tasks, cfg, 0.4)
    for k in params:
        torch.testing.assert_close(g_fo[k], want[k], rtol=1e-10, atol=1e-12)
    _, g_so, _ = _meta_grad(params, tasks, cfg, replace(fo, first_order=False))
    diff = max((g_so[k] - g_fo[k]).abs().max().item() for k in params)
    assert diff > 1e-4  # second-order terms are really there
    # Derivative-order annealing: first order before E iterations, second after.
    annealed = replace(fo, first_order=False, first_order_iters=5)
    assert use_first_order(annealed, 4) and not use_first_order(annealed, 5)
    _, g_early, _ = _meta_grad(params, tasks, cfg, annealed, step=4)
    _, g_late, _ = _meta_grad(params, tasks, cfg, annealed, step=5)
    for k in params:
        torch.testing.assert_close(g_early[k], g_fo[k], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g_late[k], g_so[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("strategy", ["loop", "batched"])
def test_zero_inner_steps_is_plain_training(strategy):
    cfg = STRIDED
    tasks = _tasks(cfg)
    mcfg = MAMLConfig(inner_steps=0, strategy=strategy)
    params = _meta_params(cfg, mcfg)
    _, g, _ = _meta_grad(params, tasks, cfg, mcfg)
    loss = (
        sum(
            F.cross_entropy(forward(params, tasks.xq[t], cfg), tasks.yq[t])
            for t in range(tasks.xq.shape[0])
        )
        / tasks.xq.shape[0]
    )
    want = torch.autograd.grad(loss, list(params.values()))
    for k, w in zip(params, want, strict=True):
        torch.testing.assert_close(g[k], w, rtol=1e-12, atol=1e-14)


def test_theta_key_helpers_spell_the_checkpoint_names():
    """keys is the one spelling of theta's names; the literal names here are the on-disk format
    (checkpoints and theta files written before must still read the same)."""
    params = _meta_params(STRIDED, MAMLPP)
    assert lr_key("conv0.weight") == "lr.conv0.weight" and is_lr_key("lr.conv0.weight")
    assert lr_target("lr.conv0.weight") == "conv0.weight" and not is_lr_key("conv0.weight")
    assert (conv_key(1), bn_scale_key(1), bn_shift_key(1)) == (
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
    )
    assert list(network_weights(params)) == [k for k in params if not k.startswith("lr.")]
    assert list(learned_lrs(params)) == [k for k in params if k.startswith("lr.")]
    assert is_step_bn("bn0.bias", params["bn0.bias"])  # per-step BN: [steps + 1, C]
    assert not is_step_bn("conv0.weight", params["conv0.weight"])


def test_learned_inner_lrs_get_gradient():
    cfg = STRIDED
    mcfg = replace(MAMLPP, strategy="batched")
    params = _meta_params(cfg, mcfg)
    lr_keys = [k for k in params if k.startswith("lr.")]
    assert sorted(lr_keys) == sorted("lr." + n for n in adapted_names(params))
    assert not any(k.startswith("lr.bn") for k in lr_keys)  # per-step BN is meta-learned only
    assert all(params[k].shape == (2,) for k in lr_keys)
    _, g, _ = _meta_grad(params, _tasks(cfg), cfg, mcfg)
    for k in lr_keys:
        assert g[k].abs().min() > 0, k
    for k in ("bn0.weight", "bn3.bias"):
        assert params[k].shape == (3, cfg.hidden) and g[k].abs().sum() > 0


def test_deterministic():
    cfg = STRIDED
    tasks = _tasks(cfg)
    mcfg = MAMLConfig(inner_lr=0.4, inner_steps=2, strategy="batched")
    a = _meta_grad(_meta_params(cfg, mcfg), tasks, cfg, mcfg)[1]
    b = _meta_grad(_meta_params(cfg, mcfg), tasks, cfg, mcfg)[1]
    for k in a:
        assert torch.equal(a[k], b[k])


@pytest.mark.parametrize("bn", ["transductive", "support"])
def test_evaluate_tasks_matches_per_task_adaptation(bn):
    cfg = STRIDED
    tasks = _tasks(cfg, n_tasks=4, queries=5, seed=3)
    mcfg = MAMLConfig(inner_lr=0.5, inner_steps=3)
    params = _meta_params(cfg, mcfg)
    curve = evaluate_tasks(params, tasks, cfg, 3, 0.5, bn=bn, curve=True)
    final = evaluate_tasks(params, tasks, cfg, 3, 0.5, bn=bn)
    assert curve.shape == (4, 4)
    torch.testing.assert_close(curve[:, -1], final)
    for t in range(4):
        for s in range(4):
            fast = adapt(params, tasks.xs[t], tasks.ys[t], cfg, s, 0.5, create_graph=False)
            stats = batch_stats(fast, tasks.xs[t], cfg) if bn == "support" else None
            pred = forward(fast, tasks.xq[t], cfg, stats).argmax(-1)
            assert curve[t, s].item() == pytest.approx((pred == tasks.yq[t]).double().mean().item())
    assert all(p.grad is None for p in params.values())  # no meta-gradient side effects


def test_schedules_and_clipping():
    w = multi_step_weights(5, 0, 100)
    assert w == pytest.approx([0.2] * 5)
    late = multi_step_weights(5, 100, 100)
    assert sum(late) == pytest.approx(1.0) and late[0] == pytest.approx(0.006)
    assert multi_step_weights(5, 50, 100)[-1] > 0.2
    assert cosine_meta_lr(0, 100, 1e-3) == pytest.approx(1e-3)
    assert cosine_meta_lr(50, 100, 1e-3, 1e-5) == pytest.approx(0.5 * (1e-3 + 1e-5))
    assert cosine_meta_lr(100, 100, 1e-3, 1e-5) == pytest.approx(1e-5)
    p = {"a": torch.zeros(3, requires_grad=True)}
    p["a"].grad = torch.tensor([3.0, 4.0, 0.0])
    assert clip_meta_grad(p, None).item() == pytest.approx(5.0)
    assert clip_meta_grad(p, 1.0).item() == pytest.approx(5.0)
    assert p["a"].grad.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_auto_strategy_rule():
    omni = ConvNetConfig.for_dataset("omniglot", 5)
    mini = ConvNetConfig.for_dataset("miniimagenet", 5)
    small = BATCHED_CPU_MAX_ACTIVATIONS // (64 * 14 * 14)  # Omniglot first-layer activations
    assert resolve_strategy("auto", "cpu", omni, 10) == "batched"  # paper 5-way 1-shot
    assert resolve_strategy("auto", "cpu", omni, small) == "batched"
    assert resolve_strategy("auto", "cpu", omni, small + 1) == "loop"
    assert resolve_strategy("auto", "cpu", omni, 80) == "loop"  # 15 query/class
    assert resolve_strategy("auto", "cpu", mini, 10) == "loop"  # 32 x 84 x 84 per image
    assert resolve_strategy("auto", "cpu") == "loop"
    default = TrainConfig.from_params(
        load_params(REPO / "params.yaml"), "omniglot-5w1s"
    )  # make run
    images = default.ways * (default.shots + default.query)
    assert resolve_strategy(default.maml.strategy, "cpu", omni, images) == "loop"
    assert resolve_strategy("auto", "cuda", omni, 80) == "batched"
    assert resolve_strategy("loop", "cuda", omni, 10) == "loop"
    assert resolve_strategy("batched", "cpu", omni, 80) == "batched"
    with pytest.raises(ValueError, match="'batched' or 'graph'"):
        resolve_strategy("vmap", "cpu")  # type: ignore[arg-type]


def test_auto_picks_batched_for_small_cpu_tasks(monkeypatch):
    """meta_loss passes the task size to the rule: small tasks run the batched form."""
    import mamlops.meta.maml as maml

    calls = []
    real = maml._query_logits_batched
    monkeypatch.setattr(
        maml, "_query_logits_batched", lambda *a: calls.append("batched") or real(*a)
    )
    cfg = STRIDED  # 4 x 4 x 4 activations per image: any small test task is "small"
    mcfg = MAMLConfig(inner_lr=0.4, inner_steps=1)
    meta_loss(_meta_params(cfg, mcfg), _tasks(cfg), cfg, mcfg)
    assert calls == ["batched"]


def test_reference_switches_shape_theta_and_the_inner_loop():
    """bn_scale: false leaves the BN scale out; adapt_bn: false gives the BN shift a step axis
    of one row, which the inner loop leaves alone (theta says by itself how to adapt it)."""
    cfg = STRIDED
    theta = init_meta_params(cfg, REFERENCE, torch.Generator().manual_seed(0))
    assert not any(k.startswith("bn") and k.endswith(".weight") for k in theta)
    assert theta["bn0.bias"].shape == (1, cfg.hidden)
    assert not any(n.startswith("bn") for n in adapted_names(theta))
    tasks = _tasks(cfg)
    params = _meta_params(cfg, REFERENCE)
    fast = adapt(params, tasks.xs[0], tasks.ys[0], cfg, 2, 0.4, create_graph=False)
    assert torch.equal(fast["bn1.bias"], params["bn1.bias"])
    assert not torch.equal(fast["conv1.weight"], params["conv1.weight"])
    # the default adapts BN: a plain MAML theta keeps one BN row per layer, no step axis
    plain = init_meta_params(cfg, MAMLConfig(), torch.Generator().manual_seed(0))
    assert plain["bn0.bias"].shape == (cfg.hidden,) and "bn0.weight" in plain
    assert {"bn0.weight", "bn0.bias"} <= set(adapted_names(plain))


def test_head_init_normal_is_unit_variance_and_leaves_the_convs_alone():
    cfg = replace(STRIDED, hidden=64, ways=20)
    xavier = init_meta_params(cfg, MAMLConfig(), torch.Generator().manual_seed(3))
    normal = init_meta_params(cfg, REFERENCE, torch.Generator().manual_seed(3))
    assert torch.equal(xavier["conv3.weight"], normal["conv3.weight"])
    assert normal["head.weight"].std().item() == pytest.approx(1.0, abs=0.1)
    assert xavier["head.weight"].std().item() < 0.3  # Xavier: sqrt(2 / (64 + 20)) = 0.15


def test_label_smoothing_is_the_reference_targets_up_to_scale():
    """The reference's targets 0.9 * onehot + 0.01 (N classes): its loss equals
    (0.9 + 0.01 N) times cross-entropy with label smoothing 0.01 N / (0.9 + 0.01 N)."""
    from mamlops.meta.maml import task_loss

    g = torch.Generator().manual_seed(0)
    for n in (5, 20):
        logits = torch.randn(7, n, generator=g, dtype=torch.float64)
        labels = torch.randint(n, (7,), generator=g)
        targets = 0.9 * F.one_hot(labels, n).double() + 0.01
        reference = -(targets * logits.log_softmax(-1)).sum(-1).mean()
        total = 0.9 + 0.01 * n
        ours = total * task_loss(logits, labels, 0.01 * n / total)
        torch.testing.assert_close(ours, reference)


def test_evaluation_adapts_with_the_label_smoothing_it_is_given():
    cfg = STRIDED
    tasks = _tasks(cfg)
    params = {k: v.detach() for k, v in _meta_params(cfg, MAMLConfig()).items()}
    from mamlops.meta.maml import adapt_detached

    *_, plain = adapt_detached(params, tasks.xs, tasks.ys, cfg, 2, 0.4)
    *_, smooth = adapt_detached(params, tasks.xs, tasks.ys, cfg, 2, 0.4, label_smoothing=0.2)
    assert not torch.allclose(plain["head.weight"], smooth["head.weight"])


def test_support_bn_meta_loss_scores_the_deployed_protocol():
    """query_bn: support makes the meta-loss's accuracy the support-BN accuracy that
    evaluation reports for the same adapted weights (and not the transductive one)."""
    cfg = STRIDED
    tasks = _tasks(cfg, n_tasks=4, queries=3)
    params = _meta_params(cfg, SUPPORT_BN)
    _, metrics = meta_loss(params, tasks, cfg, SUPPORT_BN)
    detached = {k: v.detach() for k, v in params.items()}
    support = evaluate_tasks(detached, tasks, cfg, 2, 0.4, bn="support").mean()
    torch.testing.assert_close(metrics["query_acc"], support)
    loss_t, _ = meta_loss(params, tasks, cfg, replace(SUPPORT_BN, query_bn="transductive"))
    loss_s, _ = meta_loss(params, tasks, cfg, SUPPORT_BN)
    assert abs(loss_s.item() - loss_t.item()) > 1e-3

"""MAML (Finn et al. 2017) with the MAML++ switches (Antoniou et al. 2019). Pure math, no I/O.

The meta-parameters are one flat ``dict[str, Tensor]``: the network's weights (see ``model``),
plus, with learned inner lrs (LSLR), one tensor ``lr.<name>`` of per-step lrs for each adapted
weight. Keeping everything in one dict means one Adam, one checkpoint, and that a checkpoint says
by itself which MAML++ features it was trained with (``lr.*`` keys present, BN weights with a
step axis; the names are spelled once, in ``keys``), so evaluation needs no MAMLConfig.

Two executions of the meta-batch give the same numbers:

* ``loop``: one task at a time, the textbook form;
* ``batched``: all T tasks in one pass, tasks folded into channels with grouped convolutions
  (``model.forward_tasks``). The sum of per-task support losses is separable, so one
  ``autograd.grad`` call yields every task's inner gradient at once.

The outer optimiser (Adam with lr beta) lives in the training loop; this module gives it the
loss to differentiate; the MAML++ pieces around it (the extra meta-parameters, loss weights,
meta-lr schedule, gradient clipping) are in ``mamlpp``. At test time
``adapt_detached`` is the one inner loop (evaluation, the episode figures and ``mamlops adapt``
all use it).

Example, one meta-training step and a test-time adaptation::

    cfg, mcfg = ConvNetConfig.for_dataset("omniglot", 5), MAMLConfig(inner_lr=0.4)
    theta = {k: v.requires_grad_() for k, v in mamlpp.init_meta_params(cfg, mcfg).items()}
    opt = torch.optim.Adam(theta.values(), lr=1e-3)
    loss, metrics = meta_loss(theta, tasks, cfg, mcfg)   # tasks: episodes.TaskSampler.sample
    opt.zero_grad(); loss.backward(); opt.step()
    acc = evaluate_tasks(theta, tasks, cfg, steps=10, lr=0.4)  # per-task query accuracy
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from mamlops.config import MAMLConfig, Strategy
from mamlops.meta.keys import Params, adapted_names, learned_lrs, lr_key
from mamlops.meta.mamlpp import multi_step_weights, use_first_order
from mamlops.meta.model import (
    ConvNetConfig,
    batch_stats,
    batch_stats_tasks,
    expand_params,
    forward,
    forward_tasks,
)

# ``auto`` on a CPU: ``batched`` while a task's first-layer activations stay under this many
# floats (1 MiB in fp32), else ``loop``. Measured on the 2-core dev CPU (docs/performance.md),
# Omniglot 5-way 1-shot, meta-batch 32: batched 1.4x the loop at 10 images per task, 1.5x at
# 20, even at 30, 0.6x at 80: a batch of large tasks spills out of cache, where the
# task-at-a-time loop keeps its working set warm.
BATCHED_CPU_MAX_ACTIVATIONS = 256 * 1024


class TaskBatch(Protocol):
    """What ``meta_loss`` reads from a batch of tasks (``episodes.Tasks`` has these fields)."""

    xs: Tensor  # [T, N*K, C, H, W] support images
    ys: Tensor  # [T, N*K] support labels in 0..N-1
    xq: Tensor  # [T, N*Q, C, H, W] query images
    yq: Tensor  # [T, N*Q]


def _step_lr(params: Params, name: str, step: int, lr: float) -> Tensor | float:
    """Learned lr of ``name`` at ``step`` when present (LSLR), else the fixed ``lr``."""
    lrs = params.get(lr_key(name))
    if lrs is None:
        return lr
    return lrs[min(step, lrs.shape[0] - 1)]


def _sgd_step(
    params: Params, names: list[str], grads: tuple[Tensor, ...], meta: Params, step: int, lr: float
) -> Params:
    """theta' = theta - alpha * g for the adapted ``names``; other entries pass through."""
    out = dict(params)
    for name, g in zip(names, grads, strict=True):
        out[name] = params[name] - _step_lr(meta, name, step, lr) * g
    return out


def task_loss(
    logits: Tensor, labels: Tensor, label_smoothing: float = 0.0, reduction: str = "mean"
) -> Tensor:
    """Cross-entropy over flattened logits, the one loss of the inner loop and of the query.

    ``label_smoothing`` is PyTorch's (targets ``(1 - e) * onehot + e / N``); the reference code's
    ``0.9 * onehot + 0.01`` is ``e = 0.01 N / (0.9 + 0.01 N)`` on a loss scaled by
    ``0.9 + 0.01 N`` (and divided by K), a scale that only rescales the inner lr.
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        reduction=reduction,
        label_smoothing=label_smoothing,
    )


def _inner_grads(loss: Tensor, weights: list[Tensor], create_graph: bool, first_order: bool):
    """Support-loss gradients; kept in the graph only for second-order MAML."""
    second_order = create_graph and not first_order
    grads = torch.autograd.grad(loss, weights, create_graph=second_order)
    return grads if second_order else tuple(g.detach() for g in grads)


def adapt_history(
    params: Params,
    xs: Tensor,
    ys: Tensor,
    model_cfg: ConvNetConfig,
    steps: int,
    lr: float,
    *,
    create_graph: bool,
    first_order: bool = False,
    label_smoothing: float = 0.0,
) -> list[Params]:
    """The weights after each of inner steps 0..steps for one task (see ``adapt``)."""
    names = adapted_names(params)
    history = [params]
    for s in range(steps):
        fast = history[-1]
        loss = task_loss(forward(fast, xs, model_cfg, step=s), ys, label_smoothing)
        grads = _inner_grads(loss, [fast[n] for n in names], create_graph, first_order)
        history.append(_sgd_step(fast, names, grads, params, s, lr))
    return history


def adapt(
    params: Params,
    xs: Tensor,
    ys: Tensor,
    model_cfg: ConvNetConfig,
    steps: int,
    lr: float,
    *,
    create_graph: bool,
    first_order: bool = False,
    label_smoothing: float = 0.0,
) -> Params:
    """Inner loop for one task: ``steps`` SGD steps on the support loss, step size ``lr``.

    ``create_graph=True`` keeps the graph of the inner gradients so that the adapted weights are
    differentiable functions of ``params`` (second-order MAML). ``first_order=True`` detaches
    the inner gradients instead: the adapted weights still depend on ``params`` through the
    identity (and on learned lrs), which is the first-order approximation. With
    ``create_graph=False`` the inner gradients are detached too (evaluation). Learned lrs
    (``lr.*`` keys in ``params``) override ``lr``.
    """
    history = adapt_history(
        params,
        xs,
        ys,
        model_cfg,
        steps,
        lr,
        create_graph=create_graph,
        first_order=first_order,
        label_smoothing=label_smoothing,
    )
    return history[-1]


def adapt_tasks(
    params: Params,
    xs: Tensor,
    ys: Tensor,
    model_cfg: ConvNetConfig,
    steps: int,
    lr: float,
    *,
    create_graph: bool,
    first_order: bool = False,
    keep_all: bool = False,
    label_smoothing: float = 0.0,
) -> list[Params]:
    """``adapt`` for all tasks at once: xs [T, B, ...] -> per-task weights (leading axis T).

    Returns the weights after steps 0..steps when ``keep_all`` (for multi-step losses and
    accuracy curves), else a one-element list with the final weights.
    """
    n_tasks, batch = ys.shape
    names = adapted_names(params)
    fast = expand_params(params, n_tasks)
    history = [fast] if keep_all else []
    for s in range(steps):
        logits = forward_tasks(fast, xs, model_cfg, step=s)
        # Sum of per-task mean losses: d/d(theta_t) of the sum is task t's own gradient.
        loss = task_loss(logits, ys, label_smoothing, reduction="sum")
        grads = _inner_grads(loss / batch, [fast[n] for n in names], create_graph, first_order)
        fast = _sgd_step(fast, names, grads, params, s, lr)
        if keep_all:
            history.append(fast)
    return history if keep_all else [fast]


def resolve_strategy(
    strategy: Strategy,
    device: torch.device | str,
    model_cfg: ConvNetConfig | None = None,
    images_per_task: int | None = None,
) -> str:
    """``auto``: on CUDA the batched form; on a CPU ``batched`` for small tasks and the
    per-task ``loop`` for large ones (``BATCHED_CPU_MAX_ACTIVATIONS``; ``loop`` when the task
    size is not given). ``graph`` computes as ``batched`` (training replays that as a CUDA
    graph: ``graph_step.execution``). Any other ``strategy`` is returned as is.

    A fixed rule rather than timing both at start-up: the two round differently, and the same
    seed and params must give the same metrics. On CUDA the loop's T x (small kernels) launch
    overhead dominates and batching is the standard remedy (not measured in this repo yet).
    """
    if strategy not in ("auto", "loop", "batched", "graph"):
        raise ValueError(
            f"unknown strategy {strategy!r}: expected 'auto', 'loop', 'batched' or 'graph'"
        )
    if strategy == "graph":
        return "batched"
    if strategy != "auto":
        return strategy
    if torch.device(device).type == "cuda":
        return "batched"
    if model_cfg is None or images_per_task is None:
        return "loop"
    activations = images_per_task * model_cfg.first_block_activations
    return "batched" if activations <= BATCHED_CPU_MAX_ACTIVATIONS else "loop"


def meta_loss(
    params: Params,
    tasks: TaskBatch,
    model_cfg: ConvNetConfig,
    maml_cfg: MAMLConfig,
    step: int | Tensor = 0,
    first_order: bool | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Meta-objective on a batch of tasks at training iteration ``step``.

    Returns the loss (mean over tasks of the query loss of the adapted weights; the MAML++
    weighted sum over steps with ``multi_step_loss``) whose ``.backward()`` puts the meta-gradient
    into ``params[...].grad``, and detached metrics: ``loss``, ``query_acc`` (after the final
    inner step). No ``.item()`` here, so no device sync. ``step`` may be a device tensor (a
    CUDA graph's counter, ``graph_step``); ``first_order`` is then given by the caller, who
    knows the iteration on the host.
    """
    if first_order is None:
        if isinstance(step, Tensor):
            raise ValueError("meta_loss with a tensor step needs first_order given")
        first_order = use_first_order(maml_cfg, step)
    steps = maml_cfg.inner_steps
    if maml_cfg.multi_step_loss and steps > 1:
        weights = multi_step_weights(steps, step, maml_cfg.multi_step_anneal_iters)
    else:
        weights = [1.0]  # only the final step's query loss
    images = tasks.xs.shape[1] + tasks.xq.shape[1]
    strategy = resolve_strategy(maml_cfg.strategy, tasks.xs.device, model_cfg, images)
    if strategy == "batched":
        logits_per_step = _query_logits_batched(params, tasks, model_cfg, maml_cfg, first_order)
    else:
        logits_per_step = _query_logits_loop(params, tasks, model_cfg, maml_cfg, first_order)
    loss = tasks.yq.new_zeros((), dtype=tasks.xq.dtype)
    for w, logits in zip(weights, logits_per_step, strict=True):
        loss = loss + w * task_loss(logits, tasks.yq, maml_cfg.label_smoothing)
    final = logits_per_step[-1].detach()
    acc = (final.argmax(-1) == tasks.yq).to(final.dtype).mean()
    return loss, {"loss": loss.detach(), "query_acc": acc}


def _query_logits_batched(
    params: Params, tasks: TaskBatch, cfg: ConvNetConfig, mcfg: MAMLConfig, first_order: bool
) -> list[Tensor]:
    """Query logits [T, Q, ways] of the weights after each needed step (only the last unless
    a multi-step loss is on)."""
    multi = mcfg.multi_step_loss and mcfg.inner_steps > 1
    history = adapt_tasks(
        params,
        tasks.xs,
        tasks.ys,
        cfg,
        mcfg.inner_steps,
        mcfg.inner_lr,
        create_graph=True,
        first_order=first_order,
        keep_all=multi,
        label_smoothing=mcfg.label_smoothing,
    )
    if multi:
        history = history[1:]
        first = 1
    else:
        first = mcfg.inner_steps
    support = mcfg.query_bn == "support"
    return [
        forward_tasks(
            w,
            tasks.xq,
            cfg,
            batch_stats_tasks(w, tasks.xs, cfg, step=s, detach=False) if support else None,
            step=s,
        )
        for s, w in enumerate(history, start=first)
    ]


def _query_logits_loop(
    params: Params, tasks: TaskBatch, cfg: ConvNetConfig, mcfg: MAMLConfig, first_order: bool
) -> list[Tensor]:
    """The per-task loop: same outputs as ``_query_logits_batched``, one task at a time."""
    multi = mcfg.multi_step_loss and mcfg.inner_steps > 1
    first = 1 if multi else mcfg.inner_steps
    per_task = []
    for t in range(tasks.xs.shape[0]):
        history = adapt_history(
            params,
            tasks.xs[t],
            tasks.ys[t],
            cfg,
            mcfg.inner_steps,
            mcfg.inner_lr,
            create_graph=True,
            first_order=first_order,
            label_smoothing=mcfg.label_smoothing,
        )
        support = mcfg.query_bn == "support"
        per_task.append(
            [
                forward(
                    w,
                    tasks.xq[t],
                    cfg,
                    batch_stats(w, tasks.xs[t], cfg, step=s, detach=False) if support else None,
                    step=s,
                )
                for s, w in enumerate(history[first:], start=first)
            ]
        )
    return [torch.stack(step_logits) for step_logits in zip(*per_task, strict=True)]


def adapt_detached(
    params: Params,
    xs: Tensor,
    ys: Tensor,
    model_cfg: ConvNetConfig,
    steps: int,
    lr: float,
    *,
    label_smoothing: float = 0.0,
) -> Iterator[Params]:
    """Test-time adaptation, the one used everywhere after training: the weights of T tasks
    (support ``xs`` [T, B, ...], ``ys`` [T, B]) after 0, 1, ..., ``steps`` inner steps, batched
    and detached (no meta-gradient, so no graph is kept across steps).

    Yields per-task weights (leading axis T) lazily: a consumer that scores each step holds one
    step's weights at a time. Learned inner lrs (``lr.*`` keys) override ``lr``;
    ``label_smoothing`` must be the one theta was meta-trained with.
    """
    n_tasks, batch = ys.shape
    names = adapted_names(params)
    lrs = {k: v.detach() for k, v in learned_lrs(params).items()}
    fast = {k: v.detach() for k, v in expand_params(params, n_tasks).items()}
    for s in range(steps + 1):
        yield fast
        if s == steps:
            return
        with torch.enable_grad():
            leaves = {n: fast[n].clone().requires_grad_(True) for n in names}
            logits = forward_tasks({**fast, **leaves}, xs, model_cfg, step=s)
            loss = task_loss(logits, ys, label_smoothing, reduction="sum")
            grads = torch.autograd.grad(loss / batch, [leaves[n] for n in names])
        fast = _sgd_step(fast, names, grads, lrs, s, lr)


@torch.no_grad()
def query_logits(
    fast: Params,
    tasks: TaskBatch,
    model_cfg: ConvNetConfig,
    step: int,
    bn: Literal["transductive", "support"] = "transductive",
) -> Tensor:
    """Query logits [T, Q, ways] of adapted per-task weights ``fast`` (after ``step`` updates).

    ``bn="transductive"`` normalises the query with its own batch statistics (the paper's
    protocol); ``bn="support"`` freezes the statistics of the support set under the adapted
    weights, so each query image is classified independently of the others (the deployable
    protocol).
    """
    if bn not in ("transductive", "support"):
        raise ValueError(f"unknown bn protocol {bn!r}: expected 'transductive' or 'support'")
    stats = (
        None if bn == "transductive" else batch_stats_tasks(fast, tasks.xs, model_cfg, step=step)
    )
    return forward_tasks(fast, tasks.xq, model_cfg, stats, step=step)


def evaluate_tasks(
    params: Params,
    tasks: TaskBatch,
    model_cfg: ConvNetConfig,
    steps: int,
    lr: float,
    bn: Literal["transductive", "support"] = "transductive",
    *,
    curve: bool = False,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Per-task query accuracy after ``steps`` test-time inner steps (``adapt_detached``),
    with the BatchNorm protocol ``bn`` (see ``query_logits``). Returns [T], or [T, steps + 1]
    with ``curve=True`` (accuracy after 0..steps updates).
    """
    accs = []
    fasts = adapt_detached(
        params, tasks.xs, tasks.ys, model_cfg, steps, lr, label_smoothing=label_smoothing
    )
    for s, fast in enumerate(fasts):
        if curve or s == steps:
            logits = query_logits(fast, tasks, model_cfg, s, bn)
            accs.append((logits.argmax(-1) == tasks.yq).to(logits.dtype).mean(dim=-1))
    return torch.stack(accs, dim=1) if curve else accs[-1]

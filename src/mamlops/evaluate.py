"""Meta-test: adapt theta on the fixed test episodes and score the query sets. No MLflow here.

Both BatchNorm protocols are reported because they answer different questions:

* ``transductive``: the query set is normalised with its own batch statistics, as the MAML paper
  (and its code) does; this is the number comparable to the paper's Table 1.
* ``support``: the support set's statistics under the adapted weights are frozen and each query
  image is scored on its own; this is what a deployed classifier (``mamlops adapt``) does.

The 95% confidence interval is the paper's: ``1.96 * std / sqrt(n)`` over per-episode accuracies
with the *population* standard deviation (``np.std``, ddof=0, as in cbfinn/maml's ``main.py``),
so the numbers are computed the same way as the ones they are compared with. With n = 600 the
sample std would be larger by sqrt(600/599), i.e. 0.08%.
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mamlops import maml
from mamlops.episodes import Tasks, episode_tasks, load_bank, load_episodes
from mamlops.malloc import keep_freed_memory
from mamlops.model import ConvNetConfig, Params, batch_stats_tasks, forward_tasks
from mamlops.train import TrainConfig, resolve_device

PROTOCOLS = ("transductive", "support")


def mean_ci95(accs: Tensor | list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% CI: ``1.96 * population std / sqrt(n)`` (the paper's)."""
    t = torch.as_tensor(accs, dtype=torch.float64).flatten()
    n = t.numel()
    if n == 0:
        raise ValueError("no accuracies to summarise")
    std = t.std(correction=0).item()
    return t.mean().item(), 1.96 * std / math.sqrt(n)


def resolve_inner(cfg: TrainConfig, steps: int | None, lr: float | None) -> tuple[int, float]:
    """Test-time inner steps and lr: the preset's ``test_inner_steps`` / ``inner_lr`` unless set."""
    steps = cfg.test_inner_steps if steps is None else int(steps)
    lr = float(cfg.inner_lr) if lr is None else float(lr)
    if steps < 0:
        raise ValueError(f"inner steps must be >= 0, got {steps}")
    if not lr > 0:
        raise ValueError(f"inner lr must be positive, got {lr}")
    return steps, lr


def evaluate_setting(
    theta_params: Params,
    cfg: TrainConfig,
    prepared_dir: str | Path,
    *,
    steps: int | None = None,
    lr: float | None = None,
    batch: int = 50,
    limit: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Adapt ``theta_params`` on each fixed test episode of ``cfg``'s setting; score both protocols.

    ``limit`` keeps the first episodes only (tests); ``batch`` episodes are adapted at once (only
    memory, not results, depends on it up to float rounding). Deterministic: the episodes are fixed
    files and test-time adaptation draws no random numbers.

    Returns ``{"n", "steps", "inner_lr", "transductive": {"acc", "ci95", "curve"}, "support": ...}``
    where ``curve[s]`` is the mean query accuracy after ``s`` inner steps (0..steps).
    """
    steps, lr = resolve_inner(cfg, steps, lr)
    dev = resolve_device(cfg.device) if device is None else torch.device(device)
    if dev.type == "cpu":
        keep_freed_memory()  # no effect on results; see malloc.py
    episodes = load_episodes(prepared_dir, "test", cfg.ways, cfg.shots)
    n = len(episodes) if limit is None else min(int(limit), len(episodes))
    if n < 1:
        raise ValueError("no test episodes to evaluate (limit < 1 or empty episode file)")
    bank = load_bank(prepared_dir, "test").to(dev)
    params = {k: v.detach().to(dev) for k, v in theta_params.items()}
    curves: dict[str, list[Tensor]] = {p: [] for p in PROTOCOLS}
    for start in range(0, n, batch):
        tasks = episode_tasks(bank, episodes, start, min(start + batch, n)).to(dev)
        for protocol in PROTOCOLS:
            acc = maml.evaluate_tasks(params, tasks, cfg.model_cfg, steps, lr, protocol, curve=True)
            curves[protocol].append(acc.cpu())
    result: dict[str, Any] = {"n": n, "steps": steps, "inner_lr": lr}
    for protocol in PROTOCOLS:
        per_episode = torch.cat(curves[protocol]).to(torch.float64)  # [n, steps + 1]
        acc, ci = mean_ci95(per_episode[:, -1])
        result[protocol] = {
            "acc": acc,
            "ci95": ci,
            "curve": per_episode.mean(dim=0).tolist(),
        }
    return result


def predict_tasks(
    params: Params,
    tasks: Tasks,
    model_cfg: ConvNetConfig,
    steps: int,
    lr: float,
    bn: str = "support",
) -> Tensor:
    """Predicted query labels [T, Q] after ``steps`` inner steps (for figures and spot checks).

    Same adaptation as ``maml.evaluate_tasks``; returns the argmax instead of the accuracy.
    """
    if bn not in PROTOCOLS:
        raise ValueError(f"unknown bn protocol {bn!r}: expected one of {PROTOCOLS}")
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        fast = maml.adapt_tasks(
            leaves, tasks.xs, tasks.ys, model_cfg, steps, lr, create_graph=False
        )
    fast_w = {k: v.detach() for k, v in fast[-1].items()}
    with torch.no_grad():
        stats = (
            None
            if bn == "transductive"
            else batch_stats_tasks(fast_w, tasks.xs, model_cfg, step=steps)
        )
        logits = forward_tasks(fast_w, tasks.xq, model_cfg, stats, step=steps)
    return logits.argmax(-1)


def hardware(device: str | torch.device | None = None) -> str:
    """A one-line description of what ran the evaluation, for the results table."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(dev)}, torch {torch.__version__}"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count() or 0
    return (
        f"CPU {name} ({cores} cores, {torch.get_num_threads()} threads), torch {torch.__version__}"
    )

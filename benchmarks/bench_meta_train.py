"""Time MAML meta-training iterations: this implementation vs a per-task loop vs ``higher``.

Paper config by default: Omniglot 5-way 1-shot, meta-batch 32, 1 inner step (lr 0.4), second
order, 1 query image per class (as cbfinn/maml); ``--query 15`` for the common variant. Every
implementation runs the same iteration (meta-loss, backward, Adam step) on the same tasks,
in one process, alternating repeats so that background load hits all alike. Random images:
speed does not depend on pixel values.

    .venv/bin/pip install higher==0.2.1   # optional extra "bench"
    .venv/bin/python benchmarks/bench_meta_train.py [--query 15] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mamlops import model
from mamlops.maml import MAMLConfig, init_meta_params, meta_loss, resolve_strategy
from mamlops.model import N_BLOCKS, ConvNetConfig


def make_tasks(cfg: ConvNetConfig, n_tasks: int, shots: int, queries: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.image_size

    def labels(k: int) -> torch.Tensor:
        return torch.arange(cfg.ways).repeat_interleave(k).repeat(n_tasks, 1)

    return SimpleNamespace(
        xs=torch.rand(n_tasks, cfg.ways * shots, cfg.in_channels, s, s, generator=g),
        ys=labels(shots),
        xq=torch.rand(n_tasks, cfg.ways * queries, cfg.in_channels, s, s, generator=g),
        yq=labels(queries),
    )


def functional_step(cfg, mcfg, tasks, autocast: bool) -> Callable[[], None]:
    """One meta-training iteration of mamlops.maml with the strategy in ``mcfg``."""
    params = {k: v.requires_grad_() for k, v in init_meta_params(cfg, mcfg).items()}
    opt = torch.optim.Adam(params.values(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = meta_loss(params, tasks, cfg, mcfg)
        loss.backward()
        opt.step()

    return step


def plain_forward(params: dict, x: torch.Tensor, cfg: ConvNetConfig) -> torch.Tensor:
    """Textbook functional net: BatchNorm written out as mean/var ops (autograd-friendly)."""
    h = x
    for i in range(N_BLOCKS):
        h = F.conv2d(h, params[f"conv{i}.weight"], stride=2, padding=1)
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        h = (h - mean) * torch.rsqrt(var + 1e-5)
        h = h * params[f"bn{i}.weight"][:, None, None] + params[f"bn{i}.bias"][:, None, None]
        h = F.relu(h)
    return F.linear(h.mean(dim=(2, 3)), params["head.weight"], params["head.bias"])


def plain_loop_step(cfg, mcfg, tasks) -> Callable[[], None]:
    """A plain per-task functional MAML loop, as one would first write it."""
    params = {k: v.requires_grad_() for k, v in init_meta_params(cfg, mcfg).items()}
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    n_tasks = tasks.xs.shape[0]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for t in range(n_tasks):
            fast = params
            for _ in range(mcfg.inner_steps):
                loss = F.cross_entropy(plain_forward(fast, tasks.xs[t], cfg), tasks.ys[t])
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
                pairs = zip(fast.items(), grads, strict=True)
                fast = {k: v - mcfg.inner_lr * g for (k, v), g in pairs}
            total = total + F.cross_entropy(plain_forward(fast, tasks.xq[t], cfg), tasks.yq[t])
        (total / n_tasks).backward()
        opt.step()

    return step


class ConvNet(nn.Module):
    """The same network as an nn.Module, for ``higher``."""

    def __init__(self, cfg: ConvNetConfig):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = cfg.in_channels
        for _ in range(N_BLOCKS):
            layers += [
                nn.Conv2d(c_in, cfg.hidden, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(cfg.hidden, track_running_stats=False),
                nn.ReLU(),
            ]
            c_in = cfg.hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cfg.hidden, cfg.ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


def higher_step(cfg, mcfg, tasks) -> Callable[[], None]:
    import higher

    net = ConvNet(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    inner = torch.optim.SGD(net.parameters(), lr=mcfg.inner_lr)
    n_tasks = tasks.xs.shape[0]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for t in range(n_tasks):
            with higher.innerloop_ctx(net, inner, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(mcfg.inner_steps):
                    diffopt.step(F.cross_entropy(fnet(tasks.xs[t]), tasks.ys[t]))
                loss = F.cross_entropy(fnet(tasks.xq[t]), tasks.yq[t]) / n_tasks
                loss.backward()
        opt.step()

    return step


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one iteration (forward, inner backward, outer backward) as FlopCounterMode sees
    them. Counted on the per-task loop only: every implementation does the same arithmetic, and
    FlopCounterMode overcounts grouped conv backward (about T times here)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def bmm_conv(h: torch.Tensor, w: torch.Tensor, stride: int) -> torch.Tensor:
    """Alternative to model._task_conv's grouped conv: im2col + one bmm over tasks."""
    batch, _, height, width = h.shape
    n_tasks, c_out, c_in = w.shape[:3]
    h_out, w_out = (height - 1) // stride + 1, (width - 1) // stride + 1
    cols = F.unfold(h, 3, padding=1, stride=stride).view(batch, n_tasks, c_in * 9, -1)
    cols = cols.permute(1, 2, 0, 3).reshape(n_tasks, c_in * 9, -1)
    out = torch.bmm(w.reshape(n_tasks, c_out, c_in * 9), cols)
    out = out.view(n_tasks, c_out, batch, h_out, w_out).permute(2, 0, 1, 3, 4)
    return out.reshape(batch, n_tasks * c_out, h_out, w_out)


def with_conv(conv: Callable, step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        saved = model._task_conv
        model._task_conv = conv
        try:
            step()
        finally:
            model._task_conv = saved

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--query", type=int, default=1, help="query images per class")
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3, help="iterations per timed block")
    ap.add_argument("--repeats", type=int, default=5, help="alternating blocks per implementation")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--no-higher", action="store_true")
    ap.add_argument("--bmm-conv", action="store_true", help="also time batched with unfold+bmm")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ConvNetConfig.for_dataset("omniglot", 5)
    tasks = make_tasks(cfg, args.meta_batch, shots=1, queries=args.query)
    base = MAMLConfig(inner_lr=0.4, inner_steps=1, first_order=False, strategy="auto")
    chosen = resolve_strategy("auto", "cpu")
    bf16 = args.dtype == "bf16"
    other = "batched" if chosen == "loop" else "loop"
    impls: dict[str, Callable[[], None]] = {
        f"mamlops ({chosen})": functional_step(cfg, base, tasks, bf16),
        f"mamlops ({other})": functional_step(cfg, replace(base, strategy=other), tasks, bf16),
    }
    if not bf16:
        impls["plain per-task loop"] = plain_loop_step(cfg, base, tasks)
    if args.bmm_conv:
        step = functional_step(cfg, replace(base, strategy="batched"), tasks, bf16)
        impls["batched, unfold+bmm"] = with_conv(bmm_conv, step)
    if not args.no_higher and not bf16:
        with contextlib.suppress(ImportError):
            impls["higher 0.2.1"] = higher_step(cfg, base, tasks)

    flops = count_flops(impls["mamlops (loop)"])
    for step in impls.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(args.repeats):
        for name, step in impls.items():
            t0 = time.perf_counter()
            for _ in range(args.iters):
                step()
            times[name].append((time.perf_counter() - t0) / args.iters)
    peak = matmul_gflops()

    print(
        f"Omniglot 5-way 1-shot, meta-batch {args.meta_batch}, 1 inner step, second order, "
        f"{args.query} query/class, {args.dtype}, {torch.get_num_threads()} threads"
    )
    print(f"fp32 2048^2 matmul: {peak:.1f} GFLOP/s; one iteration = {flops / 1e9:.2f} GFLOP")
    ours_name = f"mamlops ({chosen})"
    ours = statistics.median(times[ours_name])
    for name, ts in times.items():
        med = statistics.median(ts)
        ratio = statistics.median(a / b for a, b in zip(ts, times[ours_name], strict=True))
        rate = flops / med / 1e9
        print(
            f"{name:22s} {med * 1e3:7.1f} ms/iter  {args.meta_batch / med:6.1f} tasks/s  "
            f"mamlops speed-up {med / ours:5.2f}x (paired {ratio:4.2f}x)  "
            f"{rate:6.1f} GFLOP/s ({100 * rate / peak:3.0f}% of matmul)"
        )


if __name__ == "__main__":
    main()

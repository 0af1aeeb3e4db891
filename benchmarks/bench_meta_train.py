"""Time MAML meta-training iterations: this implementation vs a per-task loop vs ``higher``.

Paper config by default: Omniglot 5-way 1-shot, meta-batch 32, 1 inner step (lr 0.4), second
order, 1 query image per class (as cbfinn/maml); ``--query 15`` for the common variant, and
``--ways --shots --inner-steps`` for the other rows (``--no-higher``: ours only). Every
implementation runs the same iteration (meta-loss, backward, Adam step) on the same tasks,
in one process, alternating repeats so that background load hits all alike. Random images:
speed does not depend on pixel values.

    .venv/bin/pip install higher==0.2.1   # optional extra "bench"
    .venv/bin/python benchmarks/bench_meta_train.py [--query 15] [--dtype bf16]

``--device cuda`` runs every implementation (and the matmul reference) on the GPU; TF32 is
left at torch's defaults, which are printed (cuDNN convs use TF32 by default, matmuls do not).
``--check-grad`` only compares the batched and loop meta-gradients in float64 on ``--device``.
On a GPU machine without the venv: ``python3 benchmarks/gpu_train.py --bench ...`` (it runs
``check_grad`` and times the step variants before it trains).
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

from mamlops.malloc import keep_freed_memory
from mamlops.meta.maml import MAMLConfig, meta_loss, resolve_strategy
from mamlops.meta.mamlpp import init_meta_params
from mamlops.meta.model import N_BLOCKS, ConvNetConfig

PAPER_ITERS = 60_000  # cbfinn/maml Omniglot: --metatrain_iterations=60000


def make_tasks(
    cfg: ConvNetConfig,
    n_tasks: int,
    shots: int,
    queries: int,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """Random tasks, drawn on the CPU (same values on every device), then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.image_size

    def labels(k: int) -> torch.Tensor:
        return torch.arange(cfg.ways).repeat_interleave(k).repeat(n_tasks, 1).to(device)

    def images(k: int) -> torch.Tensor:
        x = torch.rand(n_tasks, cfg.ways * k, cfg.in_channels, s, s, generator=g)
        return x.to(device, dtype)

    xs = images(shots)
    return SimpleNamespace(xs=xs, ys=labels(shots), xq=images(queries), yq=labels(queries))


def device_params(cfg, mcfg, device: str, dtype: torch.dtype = torch.float32, generator=None):
    """``init_meta_params`` on ``device`` in ``dtype``, as leaves that require grad."""
    params = init_meta_params(cfg, mcfg, generator)
    return {k: v.to(device, dtype).requires_grad_() for k, v in params.items()}


def sync(device: str) -> None:
    """Wait for queued GPU work, so that host timers measure it (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def functional_step(cfg, mcfg, tasks, autocast: bool) -> Callable[[], None]:
    """One meta-training iteration of mamlops.meta.maml with the strategy in ``mcfg``."""
    device = tasks.xs.device
    params = device_params(cfg, mcfg, device)
    opt = torch.optim.Adam(params.values(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
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
    params = device_params(cfg, mcfg, tasks.xs.device)
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

    net = ConvNet(cfg).to(tasks.xs.device)
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


def matmul_gflops(n: int = 2048, repeats: int = 10, device: str = "cpu") -> float:
    """Best-of-``repeats`` fp32 ``n x n`` matmul rate on ``device``, in GFLOP/s."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def tf32_settings() -> str:
    """torch's TF32 switches as they stand (this script never changes them)."""
    return (
        f"torch.backends.cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
        f"torch.backends.cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
        f"float32_matmul_precision={torch.get_float32_matmul_precision()!r}"
    )


def check_grad(device: str, n_tasks: int = 4, queries: int = 2) -> bool:
    """Batched vs loop meta-gradients in float64 on ``device`` (BatchNorm on, second order).

    Prints, per inner-step count, the loss difference and the largest gradient difference,
    absolute and relative to the largest gradient entry of the same tensor. True if all
    relative differences are below 1e-9 (float64 round-off is about 1e-15).
    """
    cfg = ConvNetConfig.for_dataset("omniglot", 5)
    tasks = make_tasks(cfg, n_tasks, 1, queries, seed=1, device=device, dtype=torch.float64)
    ok = True
    for inner_steps in (1, 2):
        base = MAMLConfig(inner_lr=0.4, inner_steps=inner_steps, first_order=False)
        losses, grads = {}, {}
        for strategy in ("loop", "batched"):
            gen = torch.Generator().manual_seed(0)
            params = device_params(cfg, base, device, torch.float64, gen)
            loss, _ = meta_loss(params, tasks, cfg, replace(base, strategy=strategy))
            loss.backward()
            losses[strategy] = loss.item()
            grads[strategy] = {k: v.grad for k, v in params.items()}
        max_abs = max_rel = 0.0
        for name, g_loop in grads["loop"].items():
            diff = (grads["batched"][name] - g_loop).abs().max().item()
            scale = g_loop.abs().max().item()
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / scale if scale > 0 else diff)
        ok &= max_rel < 1e-9
        print(
            f"check-grad {device} float64, {n_tasks} tasks, {queries} query/class, "
            f"{inner_steps} inner step(s), second order, BN on: "
            f"|loss diff| {abs(losses['batched'] - losses['loop']):.2e}, "
            f"max |grad diff| {max_abs:.2e}, max rel {max_rel:.2e}"
        )
    print(f"check-grad: {'PASS' if ok else 'FAIL'} (batched == loop within 1e-9 relative)")
    return ok


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one iteration (forward, inner backward, outer backward) as FlopCounterMode sees
    them. Counted on the per-task loop only: every implementation does the same arithmetic, and
    FlopCounterMode overcounts grouped conv backward (about T times here)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


COMPUTE_OPS = (  # kernels that do the FLOPs; ``_convolution`` runs some conv paths inline
    "aten::_convolution",
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
    "aten::_slow_conv2d_forward",
    "aten::_slow_conv2d_backward",
    "aten::cudnn_convolution",
    "aten::mm",
    "aten::bmm",
    "aten::addmm",
    "aten::baddbmm",
)


def profile_step(name: str, step: Callable[[], None], flops: int, peak: float, iters: int = 3):
    """Where one implementation's time goes: the share spent in conv/matmul kernels, their own
    FLOP rate, and the largest other ops (CPU self time, torch.profiler)."""
    from torch.profiler import profile

    step()
    with profile() as prof:
        for _ in range(iters):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / iters / 1e6
    compute = sum(e.self_cpu_time_total for e in events if e.key in COMPUTE_OPS) / iters / 1e6
    rate = flops / compute / 1e9
    print(
        f"profile of {name}: {total * 1e3:.1f} ms/iter of op time; conv/matmul kernels "
        f"{compute * 1e3:.1f} ms ({100 * compute / total:.0f}%), running at {rate:.0f} GFLOP/s "
        f"({100 * rate / peak:.0f}% of matmul); largest other ops:"
    )
    others = sorted(
        (e for e in events if e.key not in COMPUTE_OPS), key=lambda e: -e.self_cpu_time_total
    )
    for e in others[:6]:
        per_iter = e.self_cpu_time_total / iters / 1e3
        print(f"    {e.key:34s} {per_iter:6.1f} ms/iter  {e.count // iters:5d} calls/iter")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--query", type=int, default=1, help="query images per class")
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--inner-steps", type=int, default=1)
    ap.add_argument("--inner-lr", type=float, default=0.4)
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3, help="iterations per timed block")
    ap.add_argument("--repeats", type=int, default=5, help="alternating blocks per implementation")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--no-higher", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc thresholds alone (mamlops training sets them: see malloc.py)",
    )
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument(
        "--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True"
    )
    ap.add_argument(
        "--paper-run-estimate",
        action="store_true",
        help=f"print the time of a {PAPER_ITERS:,}-iteration paper run at the chosen strategy",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also profile the auto-chosen implementation: time in conv/matmul kernels vs the rest",
    )
    ap.add_argument(
        "--check-grad",
        action="store_true",
        help="only compare batched vs loop meta-gradients in float64 on --device; exit 1 if off",
    )
    args = ap.parse_args()

    device = args.device
    cuda = device == "cuda"
    malloc = "glibc defaults" if args.default_malloc else f"tuned={keep_freed_memory()}"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    torch.manual_seed(0)
    if cuda:
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        print(f"TF32 (torch defaults, unchanged): {tf32_settings()}")
    else:
        torch.set_flush_denormal(True)  # CPU only: denormals cost nothing on the GPU
    if args.check_grad:
        raise SystemExit(0 if check_grad(device) else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ConvNetConfig.for_dataset("omniglot", args.ways)
    tasks = make_tasks(cfg, args.meta_batch, shots=args.shots, queries=args.query, device=device)
    base = MAMLConfig(
        inner_lr=args.inner_lr, inner_steps=args.inner_steps, first_order=False, strategy="auto"
    )
    chosen = resolve_strategy("auto", device, cfg, cfg.ways * (args.shots + args.query))
    bf16 = args.dtype == "bf16"
    ours_name = f"mamlops ({chosen}, = auto)"
    names = {s: ours_name if s == chosen else f"mamlops ({s})" for s in ("loop", "batched")}
    impls: dict[str, Callable[[], None]] = {}
    for strategy in sorted(names, key=lambda s: s != chosen):
        impls[names[strategy]] = functional_step(cfg, replace(base, strategy=strategy), tasks, bf16)
    baselines = []
    if not bf16:
        impls["plain per-task loop"] = plain_loop_step(cfg, base, tasks)
        baselines.append("plain per-task loop")
    if not args.no_higher and not bf16:
        with contextlib.suppress(ImportError):
            impls["higher 0.2.1"] = higher_step(cfg, base, tasks)
            baselines.append("higher 0.2.1")

    flops = count_flops(impls[names["loop"]])
    for _ in range(3 if cuda else 1):  # warm-up (CUDA: cuDNN algorithm choice, allocator)
        for step in impls.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(args.repeats):
        for name, step in impls.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.iters):
                step()
            sync(device)
            times[name].append((time.perf_counter() - t0) / args.iters)
    n_matmul = 8192 if cuda else 2048  # 2048^2 takes ~0.3 ms on an H100: too short to time
    peak = matmul_gflops(n_matmul, device=device)

    where = (
        f"cuda ({torch.cuda.get_device_name()}), cudnn.benchmark={args.cudnn_benchmark}"
        if cuda
        else f"{torch.get_num_threads()} threads, malloc {malloc}"
    )
    print(
        f"Omniglot {args.ways}-way {args.shots}-shot, meta-batch {args.meta_batch}, "
        f"{args.inner_steps} inner step(s), second order, "
        f"{args.query} query/class, {args.dtype}, {where}"
    )
    print(
        f"fp32 {n_matmul}^2 matmul: {peak:.1f} GFLOP/s; one iteration = {flops / 1e9:.2f} GFLOP "
        "(counted on the per-task loop)"
    )
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
    if baselines:
        speedups = {
            b: statistics.median(a / o for a, o in zip(times[b], times[ours_name], strict=True))
            for b in baselines
        }
        fastest = min(baselines, key=lambda b: statistics.median(times[b]))
        share = flops / ours / 1e9 / peak
        print(
            f"targets: {speedups[fastest]:.2f}x the faster baseline ({fastest}) "
            f"[target >= 1.5x: {'met' if speedups[fastest] >= 1.5 else 'NOT met'}]; "
            f"{100 * share:.0f}% of the matmul rate "
            f"[target >= 75%: {'met' if share >= 0.75 else 'NOT met'}]"
        )
    if args.profile and not cuda:
        profile_step(ours_name, impls[ours_name], flops, peak)
    if args.paper_run_estimate:
        print(
            f"paper run estimate, {ours_name}: {ours * 1e3:.1f} ms/iter x {PAPER_ITERS:,} iters = "
            f"{ours * PAPER_ITERS / 3600:.2f} h (meta-training compute only: no data loading, "
            f"no evaluation)"
        )


if __name__ == "__main__":
    main()

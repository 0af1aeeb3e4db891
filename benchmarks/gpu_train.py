"""Meta-train a preset on one CUDA GPU inside a wall-clock budget, then score it there.

A thin runner of the library's own training loop (``mamlops.meta.train.train``, which on CUDA
replays the whole iteration as a CUDA graph: ``mamlops.meta.graph_step``) for a machine with
PyTorch (plus numpy, pyyaml, safetensors, pillow; pydantic carried as a wheel) but not this
project's venv. Copy the repository with its prepared data (``data/prepared/omniglot``, from
``dvc repro prepare``), then::

    python3 benchmarks/gpu_train.py --preset paper-omniglot-5w1s --minutes 8.5 --out gpu-run

and bring ``gpu-run/`` back. What it does, in order, all in ``gpu-run/summary.json``:

1. ``--check``: float64 meta-gradients on the device, the captured graph against the eager
   iteration, for each recipe family (plain, first order, multi-step loss annealed, LSLR with
   per-step BN, cosine meta-lr), at iterations on both sides of each schedule's boundaries.
2. ``--bench STRATEGY...``: ms per iteration of each execution (``graph``, ``batched``,
   ``loop``; ``-notf32``: fp32 convolutions, ``-bf16``: autocast), each in its own process.
   ``--profile N``: the torch profiler over N iterations of ``--strategy``, its kernel table in
   ``profile.txt``.
3. Training with ``--strategy`` (``auto``: the graph on CUDA) until the preset's iterations or
   the budget end, whichever is first. A run stopped by the budget keeps its checkpoint:
   the same command with the folder brought back continues it (``--out`` is also the
   checkpoint folder), and its history stays one.
4. ``--evaluate``: the 600 fixed test episodes scored on the device with the best theta, both
   BatchNorm protocols and the paper's K query images per class (``eval.json``): the numbers
   ``mamlops evaluate`` gives on a CPU, within their confidence intervals.

Outputs: ``theta_best.safetensors`` and ``theta.safetensors`` (the project's theta format,
which ``mamlops evaluate``/``export`` take), ``checkpoint.pt``, ``history.tsv`` (step, loss,
train and val accuracy, tasks/s), ``eval.json`` and ``summary.json``.
"""

# ruff: noqa: E402  (sys.path is set before the project imports)
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

import torch

try:
    import pydantic  # noqa: F401  (params.yaml's schema, mamlops/config.py)
    import yaml  # noqa: F401
except ModuleNotFoundError as exc:
    sys.exit(
        f"gpu_train.py needs {exc.name}, which this machine lacks. Where pip downloads: "
        "pip download pydantic pyyaml -d wheels (same Python and platform), carry wheels/ along, "
        "then: python3 -m pip install --no-index --find-links wheels --target /tmp/py pydantic "
        "pyyaml, and run with PYTHONPATH=/tmp/py (a system Python refuses plain pip install)"
    )

from mamlops.config import EvaluateConfig, TrainConfig
from mamlops.data.episodes import TaskSampler
from mamlops.files import write_json, write_text
from mamlops.meta import maml, mamlpp
from mamlops.meta.checkpoint import load_theta, theta_file
from mamlops.meta.model import ConvNetConfig
from mamlops.meta.train import train
from mamlops.params import load_params

HISTORY_COLUMNS = ("step", "loss", "train_acc", "val_acc", "tasks_per_s")


def log(*parts: object) -> None:
    print(*parts, flush=True)


def write_history(history: list[dict], path: Path) -> None:
    """Every logged row, a blank where a row has no value (validation is every val_every)."""
    cell = lambda row, c: "" if row.get(c) is None else f"{row[c]:.6g}"  # noqa: E731
    lines = ["\t".join(HISTORY_COLUMNS)]
    lines += ["\t".join(cell(row, c) for c in HISTORY_COLUMNS) for row in history]
    write_text(path, "\n".join(lines) + "\n")


def with_strategy(cfg: TrainConfig, name: str) -> TrainConfig:
    """``cfg`` run as ``name``: a strategy, optionally ``-notf32`` or ``-bf16``."""
    strategy, _, flag = name.partition("-")
    torch.backends.cudnn.allow_tf32 = flag != "notf32"
    maml_cfg = dataclasses.replace(cfg.maml, strategy=strategy)
    return dataclasses.replace(cfg, maml=maml_cfg, amp_bf16=flag == "bf16")


def time_strategy(
    cfg: TrainConfig, prepared: Path, device: torch.device, iters: int, warmup: int
) -> dict:
    """ms per iteration over ``iters`` iterations after ``warmup`` (warm-up and capture), from
    the library loop's own tasks/s windows of ``warmup // 2`` iterations (each ends in a sync)."""
    windows: list[float] = []
    window = max(warmup // 2, 1)
    cfg = dataclasses.replace(cfg, val_every=10**9, checkpoint_every=0, log_every=window)
    with tempfile.TemporaryDirectory() as tmp:
        result = train(
            cfg, prepared, Path(tmp), Path(tmp), progress=False, stop_after=warmup + iters,
            device=device, on_metrics=lambda row, step: windows.append(row["tasks_per_s"]),
        )  # fmt: skip
    rate = statistics.median(windows[2:] or windows)
    ms = 1000 * cfg.meta_batch / rate
    return {
        "execution": result.strategy,
        "ms_per_iter": round(ms, 3),
        "tasks_per_s": round(rate, 1),
        "full_run_minutes": round(cfg.iterations * ms / 60000, 2),
    }


def bench(args, cfg: TrainConfig) -> list[dict]:
    """Each execution in its own process (a failed capture leaves no trace in the next)."""
    rows = []
    for name in args.bench:
        cmd = [sys.executable, __file__, "--preset", cfg.name, "--params", str(args.params)]
        cmd += ["--prepared", str(args.prepared), "--device", args.device]
        cmd += ["--time-strategy", name, "--bench-iters", str(args.bench_iters)]
        cmd += ["--warmup", str(args.warmup)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.variant_timeout)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            row = {"strategy": name, **json.loads(lines[-1])}
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            row = {"strategy": name, "error": " | ".join(tail)}
        row["process_seconds"] = round(time.perf_counter() - t0, 1)
        log(f"bench {cfg.name} {json.dumps(row)}")
        rows.append(row)
    return rows


CHECK_RECIPES = {  # the recipe families whose iteration differs, on a small 5-way 1-shot task
    "plain": {},
    "first-order": {"first_order": True},
    "order-annealed": {"first_order_iters": 3},
    "msl-annealed": {"inner_steps": 3, "multi_step_loss": True, "multi_step_anneal_iters": 4},
    "lslr-per-step-bn": {"inner_steps": 2, "learn_inner_lr": True, "per_step_bn": True},
}
CHECK_ITERATIONS = (0, 2, 3, 5)  # across the boundaries of the annealings above


def check_graph(device: torch.device) -> dict:
    """Max relative difference of float64 meta-gradients, graph replay vs eager, per recipe.

    The graph holds the meta-loss and its gradient with the step a device tensor (the
    multi-step weights computed inside it); eager computes them from the Python step. Adam's
    tensor lr under the cosine schedule is checked against ``mamlpp.cosine_meta_lr`` too."""
    out = {}
    model_cfg = ConvNetConfig.for_dataset("omniglot", 5)
    bank = torch.rand(40, 20, 1, 28, 28, dtype=torch.float64, device=device)
    for name, keys in CHECK_RECIPES.items():
        mcfg = maml.MAMLConfig(**{**maml.MAMLConfig().to_dict(), **keys, "strategy": "batched"})
        params = {
            k: v.to(device, torch.float64).requires_grad_(True)
            for k, v in mamlpp.init_meta_params(model_cfg, mcfg, torch.Generator().manual_seed(0))
            .items()
        }  # fmt: skip
        gen = torch.Generator(device=device).manual_seed(0)
        tasks = TaskSampler(bank, 5, 1, 3, generator=gen, dataset="omniglot").sample(4)
        step_t = torch.zeros((), dtype=torch.float64, device=device)
        worst = 0.0
        graphs: dict[bool, tuple] = {}
        for it in CHECK_ITERATIONS:
            fo = mamlpp.use_first_order(mcfg, it)
            loss, _ = maml.meta_loss(params, tasks, model_cfg, mcfg, step=it)
            eager = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            if fo not in graphs:
                graph, warm = torch.cuda.CUDAGraph(), torch.cuda.Stream()
                warm.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(warm):
                    loss, _ = maml.meta_loss(params, tasks, model_cfg, mcfg, step_t, fo)
                    torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                torch.cuda.current_stream().wait_stream(warm)
                with torch.cuda.graph(graph):
                    loss, _ = maml.meta_loss(params, tasks, model_cfg, mcfg, step_t, fo)
                    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                graphs[fo] = (graph, grads)
            graph, grads = graphs[fo]
            step_t.fill_(it)
            graph.replay()
            for e, g in zip(eager, grads, strict=True):
                if e is None:
                    continue
                worst = max(worst, float((e - g).abs().max() / e.abs().max().clamp_min(1e-30)))
        out[name] = worst
    steps = torch.arange(0, 1001, 50, dtype=torch.float32, device=device)
    lr_t = mamlpp.cosine_meta_lr(steps, 1000, 1e-3)
    lr_f = torch.tensor([mamlpp.cosine_meta_lr(int(s), 1000, 1e-3) for s in steps.tolist()])
    out["cosine_lr"] = float((lr_t.cpu().double() - lr_f.double()).abs().max() / 1e-3)
    out["pass"] = all(v < 1e-9 for k, v in out.items() if k != "cosine_lr") and (
        out["cosine_lr"] < 1e-6
    )
    return out


def profile(cfg: TrainConfig, prepared: Path, device: torch.device, iters: int, warmup: int) -> str:
    """The profiler's table (by device time) over ``iters`` iterations, after ``warmup`` unprofiled
    ones (a first call that checkpoints; the profiled one resumes from it). Under ``graph``
    the profiled call captures again (3 warm-up iterations and the capture are in the table);
    ``--strategy batched`` shows the same kernels one by one."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    cfg = dataclasses.replace(cfg, val_every=10**9, checkpoint_every=0, log_every=10**9)
    with tempfile.TemporaryDirectory() as tmp:
        run = functools.partial(train, cfg, prepared, Path(tmp), Path(tmp), progress=False,
                                device=device)  # fmt: skip
        run(stop_after=warmup)
        with torch_profile(activities=activities) as prof:
            run(stop_after=warmup + iters)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=40)


def evaluate_on_device(
    cfg: TrainConfig, prepared: Path, out: Path, device, limit: int | None
) -> dict:
    """The evaluate stage's numbers (``evaluate.test_metrics``) for the best theta, here."""
    from mamlops.meta.evaluate import on_trained_config, test_metrics

    path = theta_file(out, "best")
    theta, meta = load_theta(path)
    cfg = on_trained_config(cfg, meta, path)
    t0 = time.perf_counter()
    metrics, result = test_metrics(theta, cfg, EvaluateConfig(), prepared, device, limit)
    return {**metrics, "episodes": result["n"], "seconds": round(time.perf_counter() - t0, 1)}


def environment(device: torch.device) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True)
    env["git"] = git.stdout.decode().strip()
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paper-omniglot-5w1s")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--prepared", type=Path, default=None, help="default data/prepared/<dataset>")
    ap.add_argument("--out", type=Path, default=Path("gpu-run"))
    ap.add_argument("--minutes", type=float, default=8.5, help="training budget (wall clock)")
    ap.add_argument("--iterations", type=int, default=None, help="override the preset's")
    ap.add_argument("--seed", type=int, default=None, help="override the preset's")
    ap.add_argument("--log-every", type=int, default=100, help="iterations between host syncs")
    ap.add_argument("--strategy", default="auto", help="auto, graph, batched or loop")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--check", action="store_true", help="graph vs eager float64 gradients")
    ap.add_argument("--bench", nargs="*", default=[], metavar="STRATEGY")
    ap.add_argument("--bench-iters", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20, help="iterations before timing/profiling")
    ap.add_argument("--variant-timeout", type=float, default=120)
    ap.add_argument("--profile", type=int, default=0, metavar="N")
    ap.add_argument("--evaluate", action="store_true", help="score the test episodes here")
    ap.add_argument("--eval-limit", type=int, default=None, help="the first N episodes only")
    ap.add_argument("--time-strategy", help=argparse.SUPPRESS)
    args = ap.parse_args()

    cfg = TrainConfig.from_params(load_params(args.params), args.preset)
    overrides = {"iterations": args.iterations, "seed": args.seed, "log_every": args.log_every}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    args.prepared = args.prepared or ROOT / "data" / "prepared" / cfg.dataset
    device = torch.device(args.device)
    if args.time_strategy:  # the child process of `bench`
        timed = time_strategy(with_strategy(cfg, args.time_strategy), args.prepared, device,
                              args.bench_iters, args.warmup)  # fmt: skip
        print(json.dumps(timed), flush=True)
        return
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; use --device cpu only to smoke-test the script")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"preset": cfg.name, "config": cfg.to_dict(), "env": environment(device)}
    log(json.dumps(summary["env"]))
    if args.check and device.type == "cuda":
        summary["graph_check_float64"] = check_graph(device)
        log(f"graph check {json.dumps(summary['graph_check_float64'])}")
    if args.bench:
        summary["bench"] = bench(args, cfg)
    cfg = with_strategy(cfg, args.strategy)
    if args.profile:
        table = profile(cfg, args.prepared, device, args.profile, args.warmup)
        write_text(out / "profile.txt", table)
    if args.minutes > 0:
        t0 = time.perf_counter()
        result = train(cfg, args.prepared, out, out, progress=False, device=device,
                       budget_s=60 * args.minutes)  # fmt: skip
        seconds = time.perf_counter() - t0
        write_history(result.history, out / "history.tsv")
        summary["train"] = {
            "execution": result.strategy,
            "iterations_done": result.step,
            "iterations_planned": cfg.iterations,
            "resumed_from": result.resumed_from,
            "stopped_by": "iterations"
            if result.step == cfg.iterations
            else f"budget of {args.minutes} min",
            "seconds_this_call": round(seconds, 1),
            "train_seconds_all_calls": round(result.seconds, 1),
            "ms_per_iter_incl_validation": round(
                1000 * seconds / max(result.step - result.resumed_from, 1), 3
            ),
            "best_val_acc": result.best_val_acc,
            "best_step": result.best_step,
        }
        log(json.dumps(summary["train"]))
    if args.evaluate and theta_file(out, "best").exists():
        summary["eval"] = evaluate_on_device(cfg, args.prepared, out, device, args.eval_limit)
        write_json(out / "eval.json", summary["eval"])
        log(f"eval {json.dumps(summary['eval'])}")
    write_json(out / "summary.json", summary)
    sys.exit(0 if summary.get("graph_check_float64", {}).get("pass", True) else 1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

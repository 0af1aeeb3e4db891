"""Meta-train a paper preset on one CUDA GPU inside a fixed wall-clock budget.

For a short GPU rental: a machine with PyTorch (plus numpy, pyyaml, safetensors, pillow and
matplotlib, as stock PyTorch images have, and pydantic for the params schema: the script says
how to carry it if it is missing) but not this project's venv. Copy the repository with
its prepared data (``data/prepared/omniglot``, 30 MB, from ``dvc repro prepare``), then::

    python3 benchmarks/gpu_train.py --preset paper-omniglot-5w1s --minutes 8.5 --out gpu-run

and bring ``gpu-run/`` back. Evaluation and export then run on the CPU from those files::

    mkdir -p models/paper-omniglot-5w1s && cp gpu-run/theta*.safetensors models/paper-omniglot-5w1s/
    .venv/bin/mamlops evaluate paper-omniglot-5w1s

What it does, in order, all reported in ``gpu-run/summary.json`` and ``gpu-run/log.txt``:

1. **Gradient check**: batched vs per-task-loop meta-gradients in float64 on the GPU (BatchNorm
   on, second order, 1 and 2 inner steps), ``bench_meta_train.check_grad``.
2. **Step variants** (``--bench``): ms per meta-training iteration of the preset for the batched
   and the loop strategy, TF32 convolutions on and off, bf16 autocast, and the whole iteration
   (sampling, meta-loss, backward, Adam) captured once as a CUDA graph and replayed. Each
   variant runs in its own process, so a failed graph capture cannot poison the others.
3. **Training** with ``--variant`` (default: batched eager, TF32 as PyTorch defaults) until the
   preset's iterations or the budget run out, whichever comes first. Nothing reads a GPU value
   between logging points: tasks are sampled on the GPU by a CUDA generator, losses stay on the
   GPU and are copied once every ``--log-every`` iterations. A non-finite loss is therefore
   noticed at the next logging point; the run then stops and keeps ``theta_best`` from the last
   validation before it. Validation (the preset's ``val_episodes`` fixed episodes, its
   ``test_inner_steps``) runs every ``val_every`` iterations and when the budget ends.

Outputs: ``theta_best.safetensors`` and ``theta.safetensors`` (the project's theta format, the
preset's train config in the metadata, so ``mamlops evaluate``/``export`` take them),
``checkpoint.pt`` (the training state; its task-sampler state is a CUDA generator's, so it
resumes with this script, not with ``mamlops train`` on a CPU), ``history.tsv`` (step, seconds,
tasks seen, loss, train and val accuracy: time-to-accuracy) and ``summary.json``.

Random draws differ from a CPU run of the same preset (a CUDA generator, other kernels): the
same seed gives the same run on the same GPU and software, not the CPU's numbers.
"""

# ruff: noqa: E402  (sys.path is set before the project imports)
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
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
        f"gpu_train.py needs {exc.name}, which this machine lacks. Where pip can download: "
        "pip download pydantic==2.14.4 pyyaml==6.0.4 -d wheels (on a machine of the same "
        "Python and platform), carry wheels/ along, then pip install --no-index wheels/*.whl"
    )

from mamlops import maml
from mamlops.checkpoint import (
    load_checkpoint,
    resume_key,
    resume_mismatch,
    save_checkpoint,
    save_theta,
    theta_file,
)
from mamlops.config import TrainConfig, load_params
from mamlops.episodes import load_bank, load_episodes
from mamlops.files import write_json, write_text
from mamlops.model import ConvNetConfig
from mamlops.splits import resolve_scheme
from mamlops.train import training_sampler, validate

VARIANTS = ("batched", "batched-graph", "batched-notf32", "batched-bf16", "loop")
HISTORY_COLUMNS = ("step", "seconds", "tasks", "loss", "train_acc", "val_acc")


def log(*parts: object) -> None:
    print(*parts, flush=True)


class Trainer:
    """theta, Adam and the task sampler of one preset on one device, and one iteration of it.

    ``variant`` picks the execution: the maml strategy (``batched``/``loop``), ``-notf32``
    (fp32 convolutions), ``-bf16`` (autocast), ``-graph`` (the whole iteration recorded once as
    a CUDA graph and replayed: needs a config whose iteration does not change with the step
    number, i.e. no cosine meta-lr, derivative-order annealing or multi-step-loss annealing).
    """

    def __init__(self, cfg: TrainConfig, prepared: Path, device: torch.device, variant: str):
        if variant not in VARIANTS:
            raise SystemExit(f"unknown --variant {variant!r}; choose from {', '.join(VARIANTS)}")
        self.cfg, self.device, self.variant = cfg, device, variant
        strategy = "loop" if variant == "loop" else "batched"
        self.maml_cfg = maml.MAMLConfig(**{**cfg.maml.to_dict(), "strategy": strategy})
        self.model_cfg = ConvNetConfig.for_dataset(cfg.dataset, cfg.ways)
        torch.backends.cudnn.allow_tf32 = not variant.endswith("notf32")
        self.graph = variant.endswith("graph")
        if self.graph and (
            cfg.cosine_meta_lr
            or self.maml_cfg.first_order_iters
            or (self.maml_cfg.multi_step_loss and self.maml_cfg.inner_steps > 1)
        ):
            raise SystemExit(f"{variant}: {cfg.name}'s iteration changes with the step number")
        self.autocast = torch.autocast(
            device.type, torch.bfloat16, enabled=variant.endswith("bf16")
        )
        scheme = resolve_scheme(prepared, cfg.split)
        bank = load_bank(prepared, "train", scheme).to(device)
        # the default CUDA generator: graph capture tracks its offsets (a user generator would
        # have to be registered with the graph)
        gen = torch.cuda.default_generators[device.index or 0] if device.type == "cuda" else None
        gen = gen if gen is not None else torch.Generator()
        gen.manual_seed(cfg.seed)
        self.sampler = training_sampler(cfg, prepared, scheme, bank, gen)
        init = maml.init_meta_params(
            self.model_cfg, self.maml_cfg, torch.Generator().manual_seed(cfg.seed)
        )
        self.params = {k: v.to(device).requires_grad_(True) for k, v in init.items()}
        self.opt = torch.optim.Adam(
            self.params.values(), lr=cfg.meta_lr, capturable=self.graph, foreach=True
        )
        self._graph: torch.cuda.CUDAGraph | None = None
        self._out: torch.Tensor | None = None

    def _iteration(self, step: int) -> torch.Tensor:
        """One meta-training iteration; returns [loss, query_acc] on the device (no sync)."""
        cfg = self.cfg
        if cfg.cosine_meta_lr:
            for group in self.opt.param_groups:
                group["lr"] = maml.cosine_meta_lr(step, cfg.iterations, cfg.meta_lr)
        tasks = self.sampler.sample(cfg.meta_batch)
        with self.autocast:
            loss, m = maml.meta_loss(self.params, tasks, self.model_cfg, self.maml_cfg, step=step)
        self.opt.zero_grad(set_to_none=not self.graph)
        loss.backward()
        if cfg.grad_clip:
            maml.clip_meta_grad(self.params, cfg.grad_clip)
        self.opt.step()
        return torch.stack((m["loss"].float(), m["query_acc"].float()))

    def step(self, step: int) -> torch.Tensor:
        if not self.graph:
            return self._iteration(step)
        if self._graph is None:  # warm up on a side stream (3 real iterations), then capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    out = self._iteration(step)
            torch.cuda.current_stream().wait_stream(side)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._out = self._iteration(step)
            return out
        self._graph.replay()
        return self._out.clone()

    def state(self, key: dict, step: int, best_val: float, best_step: int, history: list) -> dict:
        return {
            "key": key,
            "params": {k: v.detach().cpu() for k, v in self.params.items()},
            "optimizer": self.opt.state_dict(),
            "sampler_rng": self.sampler.generator.get_state(),
            "step": step,
            "best_val": best_val,
            "best_step": best_step,
            "history": history,
            "variant": self.variant,
        }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(
    cfg: TrainConfig, prepared: Path, device: torch.device, variant: str, iters: int
) -> dict:
    """ms per iteration of ``variant`` over ``iters`` timed iterations after 10 warm-up ones."""
    trainer = Trainer(cfg, prepared, device, variant)
    for i in range(10):
        trainer.step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(iters):
        out = trainer.step(10 + i)
    sync(device)
    ms = 1000 * (time.perf_counter() - t0) / iters
    return {
        "variant": variant,
        "ms_per_iter": round(ms, 3),
        "tasks_per_s": round(1000 * cfg.meta_batch / ms, 1),
        "paper_run_minutes": round(cfg.iterations * ms / 60000, 2),
        "last_loss": float(out[0]),
    }


def bench(args, cfg: TrainConfig) -> list[dict]:
    """Each variant in its own process (a failed CUDA-graph capture leaves no trace here)."""
    rows = []
    for variant in args.bench:
        cmd = [
            sys.executable,
            __file__,
            "--preset",
            args.preset,
            "--prepared",
            str(args.prepared),
            "--params",
            str(args.params),
            "--device",
            args.device,
            "--time-variant",
            variant,
            "--bench-iters",
            str(args.bench_iters),
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.variant_timeout)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            row = json.loads(lines[-1])
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            row = {"variant": variant, "error": " | ".join(tail)}
        row["process_seconds"] = round(time.perf_counter() - t0, 1)
        log(f"bench {cfg.name} {json.dumps(row)}")
        rows.append(row)
    return rows


def train(args, cfg: TrainConfig, device: torch.device, out: Path) -> dict:
    """Train until the preset's iterations or the budget end; write theta, history, checkpoint."""
    trainer = Trainer(cfg, args.prepared, device, args.variant)
    scheme = resolve_scheme(args.prepared, cfg.split)
    val_bank = load_bank(args.prepared, "val", scheme).to(device)
    val_eps = load_episodes(args.prepared, "val", cfg.ways, cfg.shots, scheme)
    ckpt = out / "checkpoint.pt"
    start, best_val, best_step, history, offset = 0, -1.0, -1, [], 0.0
    state = load_checkpoint(ckpt)
    key = resume_key(cfg, args.prepared, device.type)
    if state is not None and resume_mismatch(state, key) is None:
        with torch.no_grad():
            for k, v in state["params"].items():
                trainer.params[k].copy_(v)
        trainer.opt.load_state_dict(state["optimizer"])
        trainer.sampler.generator.set_state(state["sampler_rng"])
        start, best_val, best_step = state["step"], state["best_val"], state["best_step"]
        history = state["history"]
        offset = history[-1]["seconds"] if history else 0.0
        log(f"resuming {ckpt} at iteration {start}")
    budget = args.minutes * 60
    pending: list[torch.Tensor] = []
    t0 = time.perf_counter()
    done, stop_reason = start, "iterations"
    for step in range(start, cfg.iterations):
        pending.append(trainer.step(step))
        done = step + 1
        last = done == cfg.iterations
        if done % args.log_every and not last:
            continue
        values = torch.stack(pending).cpu()  # the one sync per logging interval
        pending.clear()
        elapsed = time.perf_counter() - t0
        over = elapsed > budget
        row = {
            "step": done,
            "seconds": round(offset + elapsed, 3),
            "tasks": done * cfg.meta_batch,
            "loss": float(values[:, 0].mean()),
            "train_acc": float(values[:, 1].mean()),
        }
        if not torch.isfinite(values).all():
            stop_reason = f"non-finite loss before iteration {done}"
            history.append(row)
            break
        if done % cfg.val_every == 0 or last or over:
            row["val_acc"] = validate(trainer.params, cfg, val_bank, val_eps, device)
            if row["val_acc"] > best_val:
                best_val, best_step = row["val_acc"], done
                save_theta(trainer.params, theta_file(out, "best"), cfg, done)
            save_checkpoint(ckpt, trainer.state(key, done, best_val, best_step, history + [row]))
            log(
                f"{cfg.name} {done}/{cfg.iterations} {row['seconds']:.0f}s loss {row['loss']:.4f}"
                f" train {row['train_acc']:.4f} val {row['val_acc']:.4f}"
            )
        history.append(row)
        if over and not last:
            stop_reason = f"budget of {args.minutes} min"
            break
    seconds = time.perf_counter() - t0
    if not stop_reason.startswith("non-finite"):
        save_theta(trainer.params, theta_file(out, "final"), cfg, done)
    lines = ["\t".join(HISTORY_COLUMNS)]
    for row in history:
        lines.append(
            "\t".join("" if row.get(c) is None else f"{row[c]:.6g}" for c in HISTORY_COLUMNS)
        )
    write_text(out / "history.tsv", "\n".join(lines) + "\n")
    trained = done - start
    return {
        "variant": args.variant,
        "iterations_done": done,
        "iterations_planned": cfg.iterations,
        "resumed_from": start,
        "stopped_by": stop_reason,
        "train_seconds": round(seconds, 1),
        "tasks_per_s": round(trained * cfg.meta_batch / max(seconds, 1e-9), 1),
        "ms_per_iter_incl_validation": round(1000 * seconds / max(trained, 1), 3),
        "best_val_acc": best_val,
        "best_step": best_step,
        "full_run_minutes_at_this_rate": round(cfg.iterations * seconds / max(trained, 1) / 60, 1),
    }


def environment(device: torch.device) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor(),
        "tf32_conv_default": torch.backends.cudnn.allow_tf32,
        "tf32_matmul_default": torch.backends.cuda.matmul.allow_tf32,
    }
    with contextlib.suppress(Exception):
        env["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paper-omniglot-5w1s")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--prepared", type=Path, default=None, help="default data/prepared/<dataset>")
    ap.add_argument("--out", type=Path, default=Path("gpu-run"))
    ap.add_argument("--minutes", type=float, default=8.5, help="training budget (wall clock)")
    ap.add_argument("--iterations", type=int, default=None, help="override the preset's")
    ap.add_argument(
        "--variant",
        default="batched",
        choices=("auto", *VARIANTS),
        help="auto: the fastest fp32 variant of --bench (bf16 is not validated)",
    )
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--bench",
        nargs="*",
        default=[],
        metavar="VARIANT",
        help="step variants to time first (each in its own process)",
    )
    ap.add_argument(
        "--bench-presets",
        nargs="*",
        default=[],
        help="other presets to time with the batched variant",
    )
    ap.add_argument("--bench-iters", type=int, default=100)
    ap.add_argument("--variant-timeout", type=float, default=120)
    ap.add_argument("--no-grad-check", action="store_true")
    ap.add_argument("--time-variant", help=argparse.SUPPRESS)
    args = ap.parse_args()

    params = load_params(args.params)
    cfg = TrainConfig.from_params(params, args.preset)
    if args.iterations:
        cfg = dataclasses.replace(cfg, iterations=args.iterations)
    args.prepared = args.prepared or ROOT / "data" / "prepared" / cfg.dataset
    device = torch.device(args.device)
    if args.time_variant:  # the child process of `bench`
        print(
            json.dumps(
                time_variant(cfg, args.prepared, device, args.time_variant, args.bench_iters)
            ),
            flush=True,
        )
        return
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; use --device cpu only to smoke-test the script")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"preset": cfg.name, "config": cfg.to_dict(), "env": environment(device)}
    log(json.dumps(summary["env"]))
    if not args.no_grad_check:
        from bench_meta_train import check_grad

        t0 = time.perf_counter()
        summary["grad_check_float64_pass"] = bool(check_grad(args.device))
        summary["grad_check_seconds"] = round(time.perf_counter() - t0, 1)
    if args.bench:
        summary["bench"] = bench(args, cfg)
    if args.variant == "auto":
        timed = [
            r for r in summary.get("bench", []) if "error" not in r and "bf16" not in r["variant"]
        ]
        args.variant = min(timed, key=lambda r: r["ms_per_iter"])["variant"] if timed else "batched"
        log(f"--variant auto: {args.variant}")
    for name in args.bench_presets:
        other = TrainConfig.from_params(params, name)
        sub = argparse.Namespace(**{**vars(args), "preset": name, "bench": ["batched"]})
        summary.setdefault("bench_presets", []).extend(bench(sub, other))
    if args.minutes > 0:
        summary["train"] = train(args, cfg, device, out)
        log(json.dumps(summary["train"]))
    write_json(out / "summary.json", summary)
    sys.exit(0 if summary.get("grad_check_float64_pass", True) else 1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

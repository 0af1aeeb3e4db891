"""Meta-training: the outer loop around ``maml.meta_loss``, with checkpoints that resume bitwise.

Everything random flows from one ``torch.Generator`` (the task sampler's) and the seeded
initialisation, and a checkpoint stores that generator's state next to theta and Adam's moments.
A run killed at any point therefore resumes from its last checkpoint and ends with exactly the
theta an uninterrupted run reaches (on CPU, where the kernels are deterministic).

I/O here is limited to files the caller names; MLflow stays in the caller through ``on_metrics``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from . import maml
from .episodes import TaskSampler, episode_tasks, load_bank, load_episodes
from .files import atomic_write, write_safetensors, write_text
from .malloc import keep_freed_memory
from .model import ConvNetConfig, Params
from .params import ParamsError

DATASETS = ("omniglot", "miniimagenet")
CHECKPOINT = "checkpoint.pt"
THETA_FILES = {"best": "theta_best.safetensors", "final": "theta.safetensors"}
HISTORY_COLUMNS = ("step", "loss", "train_acc", "val_acc", "meta_lr", "tasks_per_s")


class NonFiniteLossError(RuntimeError):
    """The meta-loss became NaN/inf; the last good checkpoint is kept on disk."""


@dataclass(frozen=True)
class TrainConfig:
    """One training setting: ``train.common`` merged with ``train.presets.<name>``."""

    name: str
    dataset: str
    ways: int
    shots: int
    query: int
    meta_batch: int
    inner_lr: float
    inner_steps: int
    test_inner_steps: int
    meta_lr: float
    iterations: int
    seed: int = 0
    device: str = "auto"
    amp_bf16: bool = False
    strategy: str = "auto"
    first_order: bool = False
    first_order_iters: int = 0
    learn_inner_lr: bool = False
    per_step_bn: bool = False
    multi_step_loss: bool = False
    multi_step_anneal_iters: int = 0
    cosine_meta_lr: bool = False
    grad_clip: float = 0.0
    val_every: int = 250
    val_episodes: int = 100
    checkpoint_every: int = 250
    log_every: int = 10

    @classmethod
    def from_params(cls, params: dict[str, Any], name: str) -> TrainConfig:
        """Merge and check; errors name the params.yaml key and what would work."""
        train = params.get("train")
        if not isinstance(train, dict):
            raise ParamsError("params.yaml: section 'train' is missing")
        presets = train.get("presets") or {}
        if name not in presets:
            known = ", ".join(sorted(presets)) or "none"
            raise ParamsError(
                f"params.yaml: train.presets has no setting {name!r} (known: {known}); "
                "add it under train.presets or pick a known one"
            )
        merged = {**(train.get("common") or {}), **presets[name], "name": name}
        known_keys = {f.name for f in fields(cls)}
        unknown = sorted(set(merged) - known_keys)
        if unknown:
            raise ParamsError(
                f"params.yaml: train.presets.{name} / train.common: unknown key(s) {unknown}"
            )
        missing = sorted(
            f.name for f in fields(cls) if f.name not in merged and f.default is MISSING
        )
        if missing:
            raise ParamsError(f"params.yaml: train.presets.{name} is missing {missing}")
        cfg = cls(**merged)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        where = f"params.yaml: train.presets.{self.name}"
        if self.dataset not in DATASETS:
            raise ParamsError(f"{where}.dataset must be one of {DATASETS}, got {self.dataset!r}")
        for key in ("ways", "shots", "query", "meta_batch", "iterations", "val_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParamsError(f"{where}.{key} must be a positive integer, got {value!r}")
        for key in ("inner_steps", "test_inner_steps", "checkpoint_every", "val_episodes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ParamsError(f"{where}.{key} must be an integer >= 0, got {value!r}")
        if self.ways < 2:
            raise ParamsError(f"{where}.ways must be at least 2, got {self.ways}")
        for key in ("inner_lr", "meta_lr"):
            value = getattr(self, key)
            if not isinstance(value, int | float) or not value > 0:
                raise ParamsError(f"{where}.{key} must be a positive number, got {value!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ParamsError(f"{where}.device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.strategy not in ("auto", "loop", "batched"):
            raise ParamsError(f"{where}.strategy must be auto, loop or batched")

    @property
    def model_cfg(self) -> ConvNetConfig:
        return ConvNetConfig.for_dataset(self.dataset, self.ways)

    @property
    def maml_cfg(self) -> maml.MAMLConfig:
        return maml.MAMLConfig(
            inner_lr=float(self.inner_lr),
            inner_steps=self.inner_steps,
            first_order=self.first_order,
            strategy=self.strategy,  # type: ignore[arg-type]
            learn_inner_lr=self.learn_inner_lr,
            per_step_bn=self.per_step_bn,
            multi_step_loss=self.multi_step_loss,
            multi_step_anneal_iters=self.multi_step_anneal_iters,
            first_order_iters=self.first_order_iters,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ParamsError(f"device {name!r} asked for, but CUDA is not available; use auto or cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------- checkpoints


def save_theta(params: Params, path: Path, metadata: dict[str, str]) -> None:
    """theta as safetensors (loadable without unpickling), written atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in params.items()}
    write_safetensors(path, tensors, metadata)


def theta_file(model_dir: Path, checkpoint: str, key: str) -> Path:
    """The theta a later stage uses: ``best`` (highest val accuracy) or ``final``; ``key`` is the
    params.yaml key that chose it, for the error message."""
    if checkpoint not in THETA_FILES:
        raise ParamsError(f"params.yaml: {key} must be 'best' or 'final', got {checkpoint!r}")
    return Path(model_dir) / THETA_FILES[checkpoint]


def load_theta(path: Path) -> tuple[Params, dict[str, str]]:
    """theta and its metadata (config JSON, setting name); safetensors only."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no meta-model here; run the train stage first")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "train_config" not in metadata:
        raise ValueError(f"{path}: not a mamlops meta-model (no train_config metadata)")
    return load_file(str(path)), metadata


def theta_metadata(cfg: TrainConfig, step: int) -> dict[str, str]:
    return {
        "format": "mamlops-theta-1",
        "train_config": json.dumps(cfg.to_dict()),
        "model_config": json.dumps(cfg.model_cfg.to_dict()),
        "step": str(step),
    }


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    # weights_only: tensors, numbers, strings and dicts; nothing gets unpickled into code
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    step: int
    best_val_acc: float
    best_step: int
    final_loss: float
    tasks_per_s: float
    seconds: float
    resumed_from: int
    history: list[dict[str, float]]
    strategy: str  # the execution ``strategy: auto`` resolved to (loop or batched)


def learned_inner_lrs(params: Params) -> dict[str, float]:
    """MAML++ learned inner lrs (LSLR), one number per layer and step, for tracking."""
    out = {}
    for name, lrs in params.items():
        if name.startswith(maml.LR_PREFIX):
            for step, value in enumerate(lrs.detach().cpu().tolist()):
                out[f"inner_lr/{name[len(maml.LR_PREFIX) :]}/step{step}"] = value
    return out


def validate(
    params: Params, cfg: TrainConfig, val_bank: torch.Tensor, episodes, device, batch: int = 100
) -> float:
    """Mean query accuracy on the fixed val episodes after ``test_inner_steps`` adaptation."""
    n = min(cfg.val_episodes, len(episodes)) if cfg.val_episodes else len(episodes)
    accs = []
    for start in range(0, n, batch):
        tasks = episode_tasks(val_bank, episodes, start, min(start + batch, n)).to(device)
        accs.append(
            maml.evaluate_tasks(
                params, tasks, cfg.model_cfg, cfg.test_inner_steps, float(cfg.inner_lr)
            )
        )
    return float(torch.cat(accs).mean())


def train(
    cfg: TrainConfig,
    prepared_dir: Path,
    out_dir: Path,
    checkpoint_dir: Path,
    *,
    on_metrics: Callable[[dict[str, float], int], None] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Meta-train ``cfg`` and write ``out_dir/theta.safetensors`` and ``theta_best.safetensors``.

    Resumes from ``checkpoint_dir/checkpoint.pt`` when present. ``stop_after`` ends the loop early
    at that step (tests use it to simulate an interruption without killing the process).
    """
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()  # no effect on results; see malloc.py
    model_cfg, maml_cfg = cfg.model_cfg, cfg.maml_cfg
    train_bank = load_bank(prepared_dir, "train").to(device)
    sampler = TaskSampler(train_bank, cfg.ways, cfg.shots, cfg.query, seed=cfg.seed)
    val_bank = load_bank(prepared_dir, "val").to(device)
    val_eps = load_episodes(prepared_dir, "val", cfg.ways, cfg.shots)

    init_gen = torch.Generator().manual_seed(cfg.seed)
    params = {
        k: v.to(device).requires_grad_(True)
        for k, v in maml.init_meta_params(model_cfg, maml_cfg, init_gen).items()
    }
    opt = torch.optim.Adam(params.values(), lr=cfg.meta_lr)

    ckpt_path = checkpoint_dir / CHECKPOINT
    state = _load_checkpoint(ckpt_path)
    start, best_val, best_step, history = 0, -1.0, -1, []
    if state is not None:
        if state["config"] != json.dumps(cfg.to_dict(), sort_keys=True):
            raise ValueError(
                f"{ckpt_path} was written with other train params; delete it (or the "
                "checkpoint folder) to start over, or restore the params it was made with"
            )
        with torch.no_grad():
            for k, v in state["params"].items():
                params[k].copy_(v)
        opt.load_state_dict(state["optimizer"])
        sampler.generator.set_state(state["sampler_rng"])
        start, best_val, best_step = state["step"], state["best_val"], state["best_step"]
        history = state["history"]
    resumed_from = start
    out_dir.mkdir(parents=True, exist_ok=True)

    def checkpoint(step: int) -> None:
        _save_checkpoint(
            ckpt_path,
            {
                "config": json.dumps(cfg.to_dict(), sort_keys=True),
                "params": {k: v.detach().cpu() for k, v in params.items()},
                "optimizer": opt.state_dict(),
                "sampler_rng": sampler.generator.get_state(),
                "step": step,
                "best_val": best_val,
                "best_step": best_step,
                "history": history,
            },
        )

    end = cfg.iterations if stop_after is None else min(stop_after, cfg.iterations)
    bar = _Progress(cfg.iterations, start, enabled=progress)
    t0, tasks_seen, loss_value, rate = time.perf_counter(), 0, float("nan"), 0.0
    window_t, window_tasks = time.perf_counter(), 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp_bf16)
    try:
        for step in range(start, end):
            lr = (
                maml.cosine_meta_lr(step, cfg.iterations, cfg.meta_lr)
                if cfg.cosine_meta_lr
                else cfg.meta_lr
            )
            for group in opt.param_groups:
                group["lr"] = lr
            tasks = sampler.sample(cfg.meta_batch)
            with autocast:
                loss, m = maml.meta_loss(params, tasks, model_cfg, maml_cfg, step=step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            maml.clip_meta_grad(params, cfg.grad_clip or None)
            tasks_seen += cfg.meta_batch
            window_tasks += cfg.meta_batch
            done = step + 1
            log_now = done % cfg.log_every == 0 or done == cfg.iterations
            val_now = done % cfg.val_every == 0 or done == cfg.iterations
            # checked every step, before the update, so no NaN ever reaches theta or a checkpoint
            loss_value = float(m["loss"])
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"meta-loss is {loss_value} at iteration {done}; the last good checkpoint"
                    f" ({ckpt_path}) is kept. Lower train.meta_lr or inner_lr, or enable "
                    "grad_clip, then rerun to resume from it"
                )
            opt.step()
            row: dict[str, float] = {}
            if log_now:
                now = time.perf_counter()
                rate = window_tasks / max(now - window_t, 1e-9)
                window_t, window_tasks = now, 0
                row = {
                    "step": done,
                    "loss": loss_value,
                    "train_acc": float(m["query_acc"]),
                    "meta_lr": lr,
                    "tasks_per_s": rate,
                    **learned_inner_lrs(params),
                }
            if val_now:
                val_acc = validate(params, cfg, val_bank, val_eps, device)
                row = {**row, "step": done, "val_acc": val_acc}
                if val_acc > best_val:
                    best_val, best_step = val_acc, done
                    save_theta(params, theta_file(out_dir, "best", ""), theta_metadata(cfg, done))
            if row:
                history.append(row)
                if on_metrics is not None:
                    on_metrics({k: v for k, v in row.items() if k != "step"}, done)
                bar.update(done, row)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                checkpoint(done)
    finally:
        bar.close()

    final_step = end
    if final_step > start or state is None:
        checkpoint(final_step)
    if final_step == cfg.iterations:
        save_theta(params, theta_file(out_dir, "final", ""), theta_metadata(cfg, final_step))
        if best_step < 0:  # no validation ran (iterations < val_every never happens, but be safe)
            save_theta(params, theta_file(out_dir, "best", ""), theta_metadata(cfg, final_step))
    seconds = time.perf_counter() - t0
    return TrainResult(
        step=final_step,
        best_val_acc=best_val,
        best_step=best_step,
        final_loss=loss_value,
        tasks_per_s=tasks_seen / max(seconds, 1e-9),
        seconds=seconds,
        resumed_from=resumed_from,
        history=history,
        strategy=maml.resolve_strategy(
            cfg.strategy, device, model_cfg, cfg.ways * (cfg.shots + cfg.query)
        ),
    )


def write_history(history: list[dict[str, float]], path: Path) -> None:
    """Per-step TSV for ``dvc plots``; blank cells where a value was not measured that step."""
    lines = ["\t".join(HISTORY_COLUMNS)]
    for row in history:
        lines.append("\t".join(_cell(row.get(c)) for c in HISTORY_COLUMNS))
    write_text(path, "\n".join(lines) + "\n")


def _cell(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() and abs(value) > 1 else f"{value:.6g}"


class _Progress:
    """Rich progress bar: iteration, loss, val accuracy, tasks/s and ETA."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.progress = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]meta-train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  {task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=total, completed=start, loss="-", val="-", rate="-"
        )

    def update(self, step: int, row: dict[str, float]) -> None:
        if self.progress is None:
            return
        fields_: dict[str, str] = {}
        if "loss" in row:
            fields_["loss"] = f"{row['loss']:.3f}"
            fields_["rate"] = f"{row['tasks_per_s']:.0f} tasks/s"
        if "val_acc" in row:
            fields_["val"] = f"{100 * row['val_acc']:.1f}%"
        self.progress.update(self.task, completed=step, **fields_)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()

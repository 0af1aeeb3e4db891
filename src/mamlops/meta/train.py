"""Meta-training: the outer loop around ``maml.meta_loss``, with checkpoints that resume bitwise.

Everything random flows from one ``torch.Generator`` (the task sampler's) and the seeded
initialisation, and a checkpoint stores that generator's state next to theta and Adam's moments.
A run killed at any point therefore resumes from its last checkpoint and ends with exactly the
theta an uninterrupted run reaches (on CPU, where the kernels are deterministic).

I/O here is limited to files the caller names; MLflow stays in the caller through ``on_metrics``
(the stage that runs this loop in an MLflow run and writes metrics and plots: ``train_stage``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mamlops.config import TrainConfig
from mamlops.data.episodes import (
    TaskSampler,
    character_alphabets,
    character_groups,
    episode_tasks,
    load_bank,
    load_episodes,
)
from mamlops.data.splits import resolve_scheme
from mamlops.errors import UserError
from mamlops.files import sweep_temporaries, written_together
from mamlops.hardware import resolve_device
from mamlops.meta import distributed, graph_step, maml, mamlpp
from mamlops.meta.checkpoint import (
    CHECKPOINT,
    load_checkpoint,
    resume_key,
    resume_mismatch,
    save_checkpoint,
    save_theta,
    theta_file,
)
from mamlops.meta.keys import Params, learned_lrs, lr_target


class NonFiniteLossError(UserError):
    """The meta-loss became NaN/inf; the last good checkpoint is kept on disk."""


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
    strategy: str  # the execution ``strategy: auto`` resolved to (loop, batched or graph)


def learned_inner_lrs(params: Params) -> dict[str, float]:
    """MAML++ learned inner lrs (LSLR), one number per layer and step, for tracking."""
    out = {}
    for key, lrs in learned_lrs(params).items():
        for step, value in enumerate(lrs.detach().cpu().tolist()):
            out[f"inner_lr/{lr_target(key)}/step{step}"] = value
    return out


def validate(
    params: Params, cfg: TrainConfig, val_bank: torch.Tensor, episodes, device, batch: int = 100
) -> float:
    """Mean query accuracy on the fixed val episodes after ``test_inner_steps`` adaptation."""
    n = min(cfg.val_episodes, len(episodes)) if cfg.val_episodes else len(episodes)
    model_cfg = cfg.network
    accs = []
    for start in range(0, n, batch):
        tasks = episode_tasks(val_bank, episodes, start, min(start + batch, n)).to(device)
        accs.append(
            maml.evaluate_tasks(
                params,
                tasks,
                model_cfg,
                cfg.test_inner_steps,
                cfg.inner_lr,
                label_smoothing=cfg.maml.label_smoothing,
            )
        )
    return float(torch.cat(accs).mean())


def training_sampler(
    cfg: TrainConfig,
    prepared_dir: Path,
    scheme: str,
    bank: torch.Tensor,
    generator: torch.Generator,
) -> TaskSampler:
    """The training tasks ``cfg`` asks for, from ``bank`` (the ``train`` classes of ``scheme``):
    one home for the task options (``distinct_characters``, ``alphabet_tasks``, ``augment``),
    shared by ``train`` and the GPU runner."""
    by_character = cfg.distinct_characters or cfg.alphabet_tasks
    return TaskSampler(
        bank,
        cfg.ways,
        cfg.shots,
        cfg.query,
        generator=generator,
        dataset=cfg.dataset,
        group=character_groups(prepared_dir, "train", scheme) if by_character else 1,
        augment=cfg.augment,
        alphabets=(
            character_alphabets(prepared_dir, "train", scheme) if cfg.alphabet_tasks else None
        ),
    )


def train(
    cfg: TrainConfig,
    prepared_dir: Path,
    out_dir: Path,
    checkpoint_dir: Path,
    *,
    on_metrics: Callable[[dict[str, float], int], None] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    tracking_run: str | None = None,
    world: distributed.World = distributed.SINGLE,
    device: torch.device | None = None,
    budget_s: float | None = None,
) -> TrainResult:
    """Meta-train ``cfg`` and write ``out_dir/theta.safetensors`` and ``theta_best.safetensors``.

    Resumes from ``checkpoint_dir/checkpoint.pt`` when it was written from the same config,
    prepared data and training code (``checkpoint.resume_key``; any other checkpoint is
    replaced, with a one-line notice). ``stop_after`` ends the
    loop early at that step (tests use it to simulate an interruption without killing it).
    ``tracking_run`` (an MLflow run id) is kept in the checkpoint, so that a resumed run goes on
    logging into it (``checkpoint.resumable_run``). Under torchrun, ``world`` and ``device``
    come from ``distributed.process_group``: each process computes its shard of every
    meta-batch, and only ``world.main`` validates and writes files (the others return the same
    step, loss and timing, without validation results).

    On CUDA in one process the iteration is captured as a CUDA graph and replayed
    (``graph_step``; ``strategy: batched`` keeps it eager). ``budget_s``: stop at the first
    logging point after that many seconds of this call, validate and checkpoint there (a
    short GPU slot; the next call resumes).
    """
    device = resolve_device(cfg.device) if device is None else device
    part = world.shard(cfg.meta_batch)
    model_cfg, maml_cfg = cfg.network, cfg.maml
    scheme = resolve_scheme(prepared_dir, cfg.split)
    train_bank = load_bank(prepared_dir, "train", scheme).to(device)
    graph = graph_step.execution(maml_cfg.strategy, device, world.size) == "graph"
    # tasks are drawn where the bank is: on CUDA no index tensor crosses to the GPU each step
    gen = (
        graph_step.sampler_generator(device, cfg.seed)
        if graph
        else torch.Generator(device=device).manual_seed(cfg.seed)
    )
    sampler = training_sampler(cfg, prepared_dir, scheme, train_bank, gen)
    if world.main:  # the only process that validates
        val_bank = load_bank(prepared_dir, "val", scheme).to(device)
        val_eps = load_episodes(prepared_dir, "val", cfg.ways, cfg.shots, scheme)

    init_gen = torch.Generator().manual_seed(cfg.seed)
    params = {
        k: v.to(device).requires_grad_(True)
        for k, v in mamlpp.init_meta_params(model_cfg, maml_cfg, init_gen).items()
    }
    opt = graph_step.optimizer(params, cfg.meta_lr, capturable=graph)

    ckpt_path = checkpoint_dir / CHECKPOINT
    if world.main:  # the temporary files a kill -9 in the middle of a write left
        for folder in (checkpoint_dir, out_dir):
            sweep_temporaries(folder)
    state = distributed.broadcast(load_checkpoint(ckpt_path) if world.main else None, world)
    key = resume_key(cfg, prepared_dir, device.type)
    start, best_val, best_step, history = 0, -1.0, -1, []
    best_params: dict[str, torch.Tensor] | None = None
    seconds_before = 0.0  # training time of the sessions this checkpoint continues
    why = resume_mismatch(state, key) if state is not None else None
    if why:
        # other params (`dvc exp run -S ...` after a finished run), another split, a code fix,
        # a CPU checkpoint on a GPU: resuming would continue a state this run did not produce,
        # so it starts from scratch and replaces the checkpoint
        if world.main:
            print(f"{ckpt_path} {why}: starting from scratch")
        state = None
    if state is not None:
        with torch.no_grad():
            for k, v in state["params"].items():
                params[k].copy_(v)
        opt.load_state_dict(state["optimizer"])
        sampler.generator.set_state(state["sampler_rng"])
        start, best_val, best_step = state["step"], state["best_val"], state["best_step"]
        history, best_params = state["history"], state.get("best_params")
        seconds_before = state.get("seconds", 0.0)
    resumed_from = start
    out_dir.mkdir(parents=True, exist_ok=True)
    stepper = (
        graph_step.GraphStep(params, opt, sampler, model_cfg, maml_cfg, cfg, start=start)
        if graph
        else None
    )

    def checkpoint(step: int) -> None:
        if not world.main:
            return
        save_checkpoint(
            ckpt_path,
            {
                "key": key,
                "tracking_run": tracking_run,
                "params": {k: v.detach().cpu() for k, v in params.items()},
                "best_params": best_params,
                "seconds": seconds_before + time.perf_counter() - t0,
                "optimizer": opt.state_dict(),
                "sampler_rng": sampler.generator.get_state(),
                "step": step,
                "best_val": best_val,
                "best_step": best_step,
                "history": history,
            },
        )

    end = cfg.iterations if stop_after is None else min(stop_after, cfg.iterations)
    bar = _Progress(cfg.iterations, start, enabled=progress and world.main)
    t0, rate = time.perf_counter(), 0.0
    # the last logged loss (a resume of a finished run trains no step to read one from)
    loss_value = next((row["loss"] for row in reversed(history) if "loss" in row), float("nan"))
    window_t, window_tasks = time.perf_counter(), 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp_bf16)
    defer, pending = device.type == "cuda", []  # losses not yet checked for NaN
    final_step = end
    try:
        for step in range(start, end):
            lr = (
                mamlpp.cosine_meta_lr(step, cfg.iterations, cfg.meta_lr)
                if cfg.cosine_meta_lr
                else cfg.meta_lr
            )
            if stepper is None:
                for group in opt.param_groups:
                    group["lr"] = lr
                tasks = sampler.sample(cfg.meta_batch, part)  # this process's shard (all of it)
                with autocast:
                    loss, m = maml.meta_loss(params, tasks, model_cfg, maml_cfg, step=step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                # one all-reduce: the shards' mean gradients, loss and accuracy (no-op alone)
                m["loss"], m["query_acc"] = distributed.average_gradients(
                    params, world, m["loss"], m["query_acc"]
                )
                mamlpp.clip_meta_grad(params, cfg.grad_clip or None)
            else:  # the whole iteration, Adam's update included, replayed on the GPU
                out = stepper.step(step)
                m = {"loss": out[0], "query_acc": out[1]}
            window_tasks += cfg.meta_batch
            done = step + 1
            log_now = done % cfg.log_every == 0 or done == cfg.iterations
            over = log_now and budget_s is not None and time.perf_counter() - t0 > budget_s
            val_now = done % cfg.val_every == 0 or done == cfg.iterations or over
            ckpt_now = bool(cfg.checkpoint_every) and done % cfg.checkpoint_every == 0
            pending.append(m["loss"])
            if not defer or log_now or val_now or ckpt_now or done == end:
                # on a CPU every step, before the update; on CUDA once per logging interval
                # (reading a GPU value waits for the GPU), before anything is logged or written:
                # either way no NaN ever reaches a theta file or a checkpoint
                losses = torch.stack(pending).tolist()
                pending.clear()
                for k, value in enumerate(losses):
                    if not math.isfinite(value):
                        raise NonFiniteLossError(
                            f"meta-loss is {value} at iteration {done - len(losses) + 1 + k}; the"
                            f" last good checkpoint ({ckpt_path}) is kept. Lower meta_lr or "
                            "inner_lr, or enable grad_clip, then rerun to resume from it"
                        )
                loss_value = losses[-1]
            if stepper is None:
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
            if val_now and world.main:
                val_acc = validate(params, cfg, val_bank, val_eps, device)
                row = {**row, "step": done, "val_acc": val_acc}
                if val_acc > best_val:
                    best_val, best_step = val_acc, done
                    best_params = {k: v.detach().cpu().clone() for k, v in params.items()}
            if row:
                history.append(row)
                if on_metrics is not None:
                    on_metrics({k: v for k, v in row.items() if k != "step"}, done)
                bar.update(done, row)
            if ckpt_now:
                checkpoint(done)
            if over:
                final_step = done
                break
    finally:
        bar.close()

    if final_step > start or state is None:
        checkpoint(final_step)
    # theta files only here, at the end, both together: a run killed midway leaves the previous
    # run's pair as it was, never a new best beside an old final (the best so far lives in
    # the checkpoint until then)
    with written_together():
        if final_step == cfg.iterations and world.main:
            # both files every time, also when a resume finds the run already done: DVC deleted
            # them before it ran the stage (the last iteration always validates: a best exists)
            save_theta(params, theta_file(out_dir, "final"), cfg, final_step)
        if world.main and best_params is not None:
            # a run stopped early on purpose (budget_s, stop_after: a GPU slot) keeps its best,
            # validated where it stopped, to be scored; its final theta comes when it completes
            save_theta(best_params, theta_file(out_dir, "best"), cfg, best_step)
    seconds = seconds_before + time.perf_counter() - t0  # the whole run's, over its sessions
    return TrainResult(
        step=final_step,
        best_val_acc=best_val,
        best_step=best_step,
        final_loss=loss_value,
        tasks_per_s=(final_step * cfg.meta_batch) / max(seconds, 1e-9),
        seconds=seconds,
        resumed_from=resumed_from,
        history=history,
        strategy="graph"
        if graph
        else maml.resolve_strategy(
            maml_cfg.strategy, device, model_cfg, cfg.ways * (cfg.shots + cfg.query)
        ),
    )


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

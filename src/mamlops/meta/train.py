"""Meta-training: the outer loop around ``maml.meta_loss``, with checkpoints that resume bitwise.

Everything random flows from one ``torch.Generator`` (the task sampler's) and the seeded
initialisation, and a checkpoint stores that generator's state next to theta and Adam's moments.
A run killed at any point therefore resumes from its last checkpoint and ends with exactly the
theta an uninterrupted run reaches (on CPU, where the kernels are deterministic).

I/O here is limited to files the caller names; MLflow stays in the caller through ``on_metrics``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mamlops import tracking
from mamlops.config import TrainConfig, hardware, resolve_device
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
from mamlops.files import write_json, write_text
from mamlops.meta import distributed, graph_step, maml
from mamlops.meta.checkpoint import (
    CHECKPOINT,
    load_checkpoint,
    resumable_run,
    resume_key,
    resume_mismatch,
    save_checkpoint,
    save_theta,
    theta_file,
)
from mamlops.meta.figures import training_curves
from mamlops.meta.model import Params

# the plotted columns: deterministic values only (tasks/s is a metric, not a curve), so the
# same seed and params write the same files
TRAIN_COLUMNS = ("step", "loss", "train_acc", "meta_lr")
VAL_COLUMNS = ("step", "val_acc")


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
        for k, v in maml.init_meta_params(model_cfg, maml_cfg, init_gen).items()
    }
    opt = graph_step.optimizer(params, cfg.meta_lr, capturable=graph)

    ckpt_path = checkpoint_dir / CHECKPOINT
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
                maml.cosine_meta_lr(step, cfg.iterations, cfg.meta_lr)
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
                maml.clip_meta_grad(params, cfg.grad_clip or None)
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
                    save_theta(best_params, theta_file(out_dir, "best"), cfg, done)
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
    if final_step == cfg.iterations and world.main:
        # both files every time, also when a resume finds the run already done: DVC deleted
        # them before it ran the stage (the last iteration always validates, so a best exists)
        save_theta(params, theta_file(out_dir, "final"), cfg, final_step)
        if best_params is not None:
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


def write_history(history: list[dict[str, float]], path: Path, columns: tuple[str, ...]) -> None:
    """TSV for ``dvc plots``: the rows of ``history`` that measured ``columns[1]``, so no cell
    is ever blank (a blank is drawn as 0 by Vega-Lite)."""
    lines = ["\t".join(columns)]
    for row in history:
        if row.get(columns[1]) is not None:
            lines.append("\t".join(_cell(row[c]) for c in columns))
    write_text(path, "\n".join(lines) + "\n")


def _cell(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) > 1 else f"{value:.6g}"


def train_stage(
    cfg: TrainConfig,
    prepared_dir: Path,
    model_dir: Path,
    checkpoint_dir: Path,
    metrics_path: Path,
    train_tsv: Path,
    val_tsv: Path,
    curves_png: Path,
    *,
    progress: bool = True,
) -> TrainResult | None:
    """The stage ``train@<setting>`` (and ``mamlops train``): ``train`` inside one MLflow run.

    Writes ``model_dir/theta{,_best}.safetensors``, the summary ``metrics_path`` (JSON, numbers
    only), the per-step curves ``train_tsv`` (loss, query accuracy) and ``val_tsv`` (validation
    accuracy) and their PNG. MLflow gets the effective config as ``train.<key>`` params, the
    prepared data as a dataset input, every logged step (``train/*``, ``val/*``), the theta
    hashes evaluate/export look the run up by, the curves, checkpoint and theta.

    With ``processes`` > 1 and no launcher, the command that called this (the stage script or
    ``mamlops train``) is run in that many processes by torchrun's launcher
    (``distributed.launch``), and this returns None once they are done; in each of them the
    process with rank 0 does all of the above, the others only their shard of the training.
    """
    if cfg.processes > 1 and not distributed.launched():
        tracking.check_store(tracking.tracking_uri())  # a dead server: one line, before spawning
        distributed.launch(cfg.processes)
        return None
    with distributed.process_group(resolve_device(cfg.device)) as (world, device):
        if not world.main:
            return _train_shard(cfg, prepared_dir, model_dir, checkpoint_dir, world, device)
        model_dir, prepared_dir = Path(model_dir), Path(prepared_dir)
        config = {k: v for k, v in cfg.to_dict().items() if k != "name"}
        description = (
            f"Meta-training {cfg.name}: {cfg.ways}-way {cfg.shots}-shot {cfg.dataset}, "
            f"{cfg.iterations} iterations of {cfg.meta_batch} tasks "
            f"({'first' if cfg.maml.first_order else 'second'} order)."
        )
        interrupted = resumable_run(
            Path(checkpoint_dir), resume_key(cfg, prepared_dir, device.type)
        )
        with tracking.start_run(
            f"train@{cfg.name}",
            {"setting": cfg.name, **{f"train.{k}": v for k, v in config.items()}},
            run_name=tracking.run_name(cfg.name),
            resume_run_id=interrupted,
            description=description,
            tags={
                "mamlops.setting": cfg.name,
                "mamlops.hardware": hardware(device),
                "mamlops.processes": str(world.size),
            },
        ) as run:
            tracking.log_dataset(prepared_dir, cfg.dataset, "training")
            result = train(
                cfg,
                prepared_dir,
                model_dir,
                Path(checkpoint_dir),
                on_metrics=tracking.log_training_metrics,
                progress=progress,
                tracking_run=run.info.run_id,
                world=world,
                device=device,
            )
            write_history(result.history, Path(train_tsv), TRAIN_COLUMNS)
            write_history(result.history, Path(val_tsv), VAL_COLUMNS)
            curves = training_curves(result.history, curves_png, f"{cfg.name}: meta-training")
            metrics = {  # the few numbers `dvc exp show` compares runs on; the rest is in MLflow
                "best_val_acc": result.best_val_acc,
                "best_step": result.best_step,
                "tasks_per_s": round(result.tasks_per_s, 2),
                "train_seconds": round(result.seconds, 1),
            }
            write_json(metrics_path, metrics)
            tracking.log_metrics(
                {
                    "val/best_acc": result.best_val_acc,
                    "val/best_step": result.best_step,
                    "train/final_loss": result.final_loss,
                    "train/seconds": result.seconds,
                }
            )
            tracking.set_tags(
                {
                    "mamlops.strategy": result.strategy,
                    "mamlops.resumed_from": str(result.resumed_from),
                    **tracking.theta_tags({k: theta_file(model_dir, k) for k in ("best", "final")}),
                }
            )
            tracking.log_artifacts(
                [
                    (curves, "plots"),
                    (Path(train_tsv), "plots"),
                    (Path(val_tsv), "plots"),
                    (Path(checkpoint_dir) / CHECKPOINT, "checkpoint"),
                    (theta_file(model_dir, "best"), "model"),
                ]
            )
        print(f"{cfg.name}: best val acc {result.best_val_acc:.4f} at step {result.best_step}")
        return result


def _train_shard(
    cfg: TrainConfig,
    prepared_dir: Path,
    model_dir: Path,
    checkpoint_dir: Path,
    world: distributed.World,
    device: torch.device,
) -> TrainResult:
    """A process other than rank 0: its shard of every meta-batch, nothing written or logged."""
    try:
        return train(
            cfg, Path(prepared_dir), Path(model_dir), Path(checkpoint_dir), progress=False,
            world=world, device=device,
        )  # fmt: skip
    except NonFiniteLossError:
        # every process sees the same averaged loss and stops at the same step: rank 0 says
        # so; this one waits for the launcher to end it, so the line is printed once
        time.sleep(30)
        raise


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

"""The DVC stage ``train@<setting>`` (and ``mamlops train``): the training loop inside one MLflow
run, and the files DVC tracks.

``train`` is the loop and writes only theta and the checkpoint; everything a run is compared
and plotted by (the metrics JSON, the curves' TSVs and PNG, MLflow's params, metrics, tags and
artifacts) is written here, around it, so the loop stays testable without a tracking store and
a torchrun launch starts from one place.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mamlops import tracking
from mamlops.config import TrainConfig
from mamlops.files import write_json, write_text, written_together
from mamlops.hardware import hardware, resolve_device
from mamlops.meta import distributed
from mamlops.meta.checkpoint import CHECKPOINT, resumable_run, resume_key, theta_file
from mamlops.meta.figures import training_curves
from mamlops.meta.train import NonFiniteLossError, TrainResult, train

# the plotted columns: deterministic values only (tasks/s is a metric, not a curve), so the
# same seed and params write the same files
TRAIN_COLUMNS = ("step", "loss", "train_acc", "meta_lr")
VAL_COLUMNS = ("step", "val_acc")


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
            metrics = {  # the few numbers `dvc exp show` compares runs on; the rest is in MLflow
                "best_val_acc": result.best_val_acc,
                "best_step": result.best_step,
                "tasks_per_s": round(result.tasks_per_s, 2),
                "train_seconds": round(result.seconds, 1),
            }
            with written_together():  # one run's curves and numbers, never half of each
                write_history(result.history, Path(train_tsv), TRAIN_COLUMNS)
                write_history(result.history, Path(val_tsv), VAL_COLUMNS)
                curves = training_curves(result.history, curves_png, f"{cfg.name}: meta-training")
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

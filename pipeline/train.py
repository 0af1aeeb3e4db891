"""DVC stage `train@<setting>`: meta-train one setting of params.yaml `train.presets`.

Writes models/<setting>/theta{,_best}.safetensors, metrics/train/<setting>.json and
plots/train/<setting>.tsv; checkpoints go to checkpoints/<setting>/ (a persisted DVC output),
so rerunning after a kill resumes. One MLflow run per execution.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mamlops import params as P
from mamlops import tracking
from mamlops.figures import training_curves
from mamlops.files import write_json
from mamlops.train import TrainConfig, train, write_history


def main(setting: str) -> None:
    params = P.load()
    cfg = TrainConfig.from_params(params, setting)
    prepared = Path("data/prepared") / cfg.dataset
    out_dir = Path("models") / setting
    metrics_path = Path("metrics/train") / f"{setting}.json"

    import mlflow

    with tracking.start_run(f"train@{setting}", cfg.to_dict(), run_name=f"train-{setting}") as run:
        result = train(
            cfg,
            prepared,
            out_dir,
            Path("checkpoints") / setting,
            on_metrics=lambda values, step: mlflow.log_metrics(values, step=step),
        )
        write_history(result.history, Path("plots/train") / f"{setting}.tsv")
        metrics = {
            "iterations": result.step,
            "best_val_acc": result.best_val_acc,
            "best_step": result.best_step,
            "final_loss": result.final_loss,
            "tasks_per_s": result.tasks_per_s,
            "train_seconds": result.seconds,
            "resumed_from": result.resumed_from,
        }
        write_json(metrics_path, metrics)
        mlflow.set_tag("mamlops.strategy", result.strategy)
        mlflow.log_metrics({f"final_{k}": float(v) for k, v in metrics.items()})
        curves_png = training_curves(
            result.history, out_dir / "training_curves.png", f"{setting}: meta-training"
        )
        mlflow.log_artifact(str(curves_png), "plots")
        mlflow.log_artifact(str(Path("plots/train") / f"{setting}.tsv"), "plots")
        mlflow.log_artifact(str(Path("checkpoints") / setting / "checkpoint.pt"), "checkpoint")
        mlflow.log_artifact(str(out_dir / "theta_best.safetensors"), "model")
        (out_dir / "mlflow_run_id").write_text(run.info.run_id + "\n")
    print(f"{setting}: best val acc {result.best_val_acc:.4f} at step {result.best_step}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python pipeline/train.py SETTING   (a key of train.presets)")
    main(sys.argv[1])

"""DVC stage `evaluate@<setting>`: adapt the trained meta-model on the 600 fixed test episodes.

Reads params.yaml (`evaluate`, `train.common`, `train.presets.<setting>`), loads
models/<setting>/theta_best.safetensors (or theta.safetensors with `evaluate.checkpoint: final`)
and writes metrics/eval/<setting>.json, plots/eval/<setting>_steps.csv and
plots/episodes/<setting>.png. The same numbers and both plots go to MLflow on the training
run (id in models/<setting>/mlflow_run_id), so one run holds the whole story of a model; without
that file a new run is made, tagged with the setting.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from mamlops import params as P
from mamlops import tracking
from mamlops.episodes import episode_tasks, load_episodes
from mamlops.evaluate import evaluate_setting, hardware, predict_tasks
from mamlops.figures import episode_grid, steps_rows, write_steps_csv
from mamlops.files import write_json
from mamlops.train import TrainConfig, load_theta, resolve_device, theta_file


def eval_params(params: dict[str, Any]) -> dict[str, Any]:
    """The `evaluate` section, checked; errors name the key and what would work."""
    sec = P.section(params, "evaluate")
    checkpoint = sec.get("checkpoint", "best")
    theta_file(Path("models"), checkpoint, "evaluate.checkpoint")  # checks the value
    steps = sec.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise P.ParamsError(f"params.yaml: evaluate.steps must be null or >= 0, got {steps!r}")
    batch = P.require(sec, "batch", int, "evaluate")
    grid = P.require(sec, "grid_episodes", int, "evaluate")
    if batch < 1 or grid < 1:  # the episode grid is a declared DVC output: always draw one
        raise P.ParamsError("params.yaml: evaluate.batch and evaluate.grid_episodes must be >= 1")
    return {"checkpoint": checkpoint, "steps": steps, "batch": batch, "grid_episodes": grid}


def log_to_mlflow(setting: str, metrics: dict[str, Any], rows, artifacts: list[Path]) -> str:
    """Log on the training run when its id is known, else on a new run linked by tag."""
    import mlflow

    numbers = {f"eval_{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    id_file = Path("models") / setting / "mlflow_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    mlflow.set_tracking_uri(tracking.tracking_uri())
    mlflow.set_experiment(tracking.EXPERIMENT)
    if run_id is not None:
        try:
            mlflow.get_run(run_id)
        except Exception as exc:  # store moved or reset: do not lose the evaluation over it
            print(f"warning: training run {run_id} not found ({exc}); logging to a new run")
            run_id = None
    if run_id is not None:
        ctx = mlflow.start_run(run_id=run_id, log_system_metrics=False)
    else:
        tags = {**tracking.run_tags(f"evaluate@{setting}"), "mamlops.setting": setting}
        ctx = mlflow.start_run(run_name=f"evaluate-{setting}", tags=tags)
    with ctx as run:
        mlflow.set_tag("eval.hardware", metrics["hardware"])
        mlflow.set_tag("eval.checkpoint", metrics["checkpoint"])
        mlflow.log_metrics(numbers)
        for row in rows:  # accuracy vs inner steps, as a curve in the MLflow UI
            mlflow.log_metrics(
                {
                    "eval_curve_acc_transductive": row["acc_transductive"],
                    "eval_curve_acc_support": row["acc_support"],
                },
                step=int(row["step"]),
            )
        for path in artifacts:
            mlflow.log_artifact(str(path), "eval")
        return run.info.run_id


def main(setting: str) -> None:
    params = P.load()
    cfg = TrainConfig.from_params(params, setting)
    ev = eval_params(params)
    theta_path = theta_file(Path("models") / setting, ev["checkpoint"], "evaluate.checkpoint")
    theta, meta = load_theta(theta_path)
    prepared = Path("data/prepared") / cfg.dataset
    device = resolve_device(cfg.device)

    t0 = time.perf_counter()
    result = evaluate_setting(
        theta, cfg, prepared, steps=ev["steps"], batch=ev["batch"], device=device
    )
    seconds = time.perf_counter() - t0
    metrics = {
        "acc_transductive": result["transductive"]["acc"],
        "ci95_transductive": result["transductive"]["ci95"],
        "acc_support": result["support"]["acc"],
        "ci95_support": result["support"]["ci95"],
        "n": result["n"],
        "steps": result["steps"],
        "inner_lr": result["inner_lr"],
        "iterations": int(meta.get("step", cfg.iterations)),
        "train_iterations": int(json.loads(meta["train_config"]).get("iterations", cfg.iterations)),
        "seconds": seconds,
        "checkpoint": ev["checkpoint"],
        "dataset": cfg.dataset,
        "ways": cfg.ways,
        "shots": cfg.shots,
        "hardware": hardware(device),
    }
    write_json(Path("metrics/eval") / f"{setting}.json", metrics)
    rows = steps_rows(result)
    csv_path = write_steps_csv(rows, Path("plots/eval") / f"{setting}_steps.csv")
    png_path = Path("plots/episodes") / f"{setting}.png"
    episodes = load_episodes(prepared, "test", cfg.ways, cfg.shots)
    tasks = episode_tasks(prepared, episodes, 0, ev["grid_episodes"])
    preds = predict_tasks(theta, tasks, cfg.model_cfg, result["steps"], result["inner_lr"])
    episode_grid(
        tasks,
        preds,
        png_path,
        episodes=ev["grid_episodes"],
        title=f"{setting}: test episodes after {result['steps']} steps (support-set BN)",
    )
    artifacts = [Path("metrics/eval") / f"{setting}.json", csv_path, png_path]
    run_id = log_to_mlflow(setting, metrics, rows, artifacts)
    t, s = result["transductive"], result["support"]
    print(
        f"{setting}: {100 * t['acc']:.2f} +- {100 * t['ci95']:.2f}% (transductive BN), "
        f"{100 * s['acc']:.2f} +- {100 * s['ci95']:.2f}% (support BN) on {result['n']} "
        f"episodes, {result['steps']} steps; MLflow run {run_id}"
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python pipeline/evaluate.py SETTING   (a key of train.settings)")
    main(sys.argv[1])

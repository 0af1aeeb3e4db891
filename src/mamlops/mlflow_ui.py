"""What the MLflow UI shows of this project's runs, decided here rather than by each user's clicks.

MLflow 3.17 opens an experiment in its GenAI view (traces, tokens, cost: "No data") unless the
URL says ``workflowType=machine_learning``, and its runs table then lists no metric and no param
until the user picks them in *Columns*. The page reads a saved view from the experiment tag
``mlflow.sharedViewState.<key>`` when its URL carries ``viewStateShareKey=<key>`` (MLflow's own
*Share* button writes such tags): ``EXPERIMENT_TAGS`` holds one with the columns that compare
training runs, and ``runs_page`` is the address ``make mlflow-ui`` prints.

The table prints a metric's float64 digits in full, so a float32 accuracy read 0.68979999...:
metrics are logged at ``shown`` precision.
"""

from __future__ import annotations

import json

RUNS_VIEW = "mamlops-runs"
# the runs table's columns: test accuracy (evaluate logs it onto the training run too),
# validation accuracy, speed, and the params a user changes most
RUNS_COLUMNS = {
    "metrics": ("eval/acc_transductive", "eval/acc_support", "val/best_acc", "train/tasks_per_s"),
    "params": ("setting", "train.inner_lr", "train.meta_batch", "train.iterations"),
}
# set on the experiment by tracking.experiment_id; experimentKind: a training experiment, which
# MLflow's experiment list labels as such (the view itself follows the URL in 3.17)
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    f"mlflow.sharedViewState.{RUNS_VIEW}": json.dumps(
        {"selectedColumns": [f"{k}.`{n}`" for k, names in RUNS_COLUMNS.items() for n in names]}
    ),
}


def runs_page(exp_id: str) -> str:
    """The UI's address, after the host, of experiment ``exp_id``'s runs table in the training
    view with ``RUNS_COLUMNS`` shown."""
    view = f"workflowType=machine_learning&viewStateShareKey={RUNS_VIEW}"
    return f"#/experiments/{exp_id}/runs?{view}"


def shown(value: float) -> float:
    """``value`` to 6 significant digits, as metrics are logged: float32 holds about 7, and one
    query of the 600 test episodes (1/45000 of the accuracy) moves the 5th."""
    return float(f"{float(value):.6g}")

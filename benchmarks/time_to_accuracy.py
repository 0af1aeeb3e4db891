"""Time to accuracy: training recipes of one setting run as queued DVC experiments, compared
from what MLflow recorded.

Accuracy per CPU-minute is what a user of this project pays for, so recipes are compared on
validation accuracy against wall-clock seconds and against tasks seen, not on accuracy alone.
Each recipe (``benchmarks/recipes.yaml``) is a set of presets.yaml overrides, queued as the
experiment ``tta-<recipe>`` and run one at a time (``dvc queue start -j 1``: two runs on two
cores would slow each other down), with the pipeline's own evaluate stage giving its test
accuracy. By default every recipe sees the same number of tasks (``--tasks``), so a recipe with
a smaller meta-batch gets more iterations. The report reads each run's ``val/acc`` history and
timestamps back from MLflow::

    .venv/bin/python benchmarks/time_to_accuracy.py run --setting omniglot-5w1s --tasks 16000
    .venv/bin/python benchmarks/time_to_accuracy.py report --setting omniglot-5w1s

``make time-to-accuracy`` does both. The report writes
``benchmarks/results/time-to-accuracy/<setting>.png`` (two panels: val accuracy against seconds
and against tasks) and ``<setting>.md`` (the table docs/performance.md quotes). Seconds are
counted from the start of each MLflow run, so they include loading the data and validation.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "benchmarks" / "recipes.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "time-to-accuracy"
PREFIX = "tta"
# the venv's dvc and python (the stages' commands), also when the venv is not on PATH
# (`.venv/bin/python benchmarks/time_to_accuracy.py ...`)
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def dvc(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["dvc", *args], cwd=ROOT, capture_output=True, text=True)
    if check and proc.returncode != 0:
        sys.exit(f"dvc {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def load_recipes(setting: str, only: list[str] | None) -> dict[str, dict]:
    recipes = yaml.safe_load(RECIPES.read_text()).get(setting)
    if not recipes:
        sys.exit(f"{RECIPES}: no recipes for {setting!r}; add a section named after the setting")
    unknown = sorted(set(only or ()) - set(recipes))
    if unknown:
        sys.exit(f"unknown recipe(s) {', '.join(unknown)}; {RECIPES} has {', '.join(recipes)}")
    return {k: v or {} for k, v in recipes.items() if not only or k in only}


def run(args: argparse.Namespace) -> None:
    """Queue one experiment per recipe (a rerun replaces a recipe's earlier result), run the
    queue one job at a time, wait for it."""
    from mamlops.config import TrainConfig
    from mamlops.params import load_params

    params = load_params(ROOT / "params.yaml")
    base = TrainConfig.from_params(params, args.setting)
    for name, overrides in load_recipes(args.setting, args.recipes).items():
        exp = f"{PREFIX}-{name}"
        values = dict(overrides)
        meta_batch = values.get("meta_batch", base.meta_batch)
        values.setdefault("iterations", max(1, args.tasks // meta_batch))
        # ten validations per run, at the same numbers of tasks for every recipe
        values.setdefault("val_every", max(1, args.tasks // 10 // meta_batch))
        queue(exp, args.setting, base.dataset, values)
        print(f"queued {exp}: {', '.join(f'{k}={v}' for k, v in values.items())}", flush=True)
    if not args.queue_only:  # else a queue worker already running picks them up in turn
        run_queue()


def queue(exp: str, setting: str, dataset: str, overrides: dict) -> None:
    """Queue the DVC experiment ``exp``: ``setting`` trained alone (train.settings replaced),
    with presets.yaml ``overrides``; an earlier experiment of that name is replaced."""
    # ++ adds a key the preset lacks or replaces it (Hydra override syntax)
    sets = [f"presets.yaml:++{setting}.{k}={v}" for k, v in overrides.items()]
    dvc("exp", "remove", exp, check=False)
    cmd = ["exp", "run", "--queue", "-n", exp, "-S", "~train.settings"]
    cmd += ["-S", f"+train.settings={{{setting}: {dataset}}}"]
    for s in sets:
        cmd += ["-S", s]
    dvc(*cmd)


def run_queue() -> None:
    """Run the queued experiments one at a time (two runs on two cores slow each other down
    many times over) and wait until none is queued or running."""
    # not through dvc(): the worker `queue start` leaves behind inherits its stdout, and reading
    # that pipe to its end would wait for the whole queue (`dvc queue logs <exp>` has the output)
    subprocess.run(
        ["dvc", "queue", "start", "-j", "1"],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    t0 = time.monotonic()
    while True:
        status = dvc("queue", "status")
        busy = [ln for ln in status.splitlines() if "Queued" in ln or "Running" in ln]
        if not busy:
            break
        print(f"[{(time.monotonic() - t0) / 60:5.1f} min] {len(busy)} left", flush=True)
        time.sleep(30)
    print(status)


def _history(client, run_id: str, key: str) -> list:
    return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)


def collect(setting: str, names: list[str]) -> list[dict]:
    """The latest training run of each ``tta-<recipe>`` experiment, from the MLflow store."""
    from mlflow import MlflowClient

    from mamlops import tracking

    client = MlflowClient(tracking.tracking_uri(ROOT))
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    if experiment is None:
        sys.exit(f"no MLflow experiment {tracking.EXPERIMENT!r} in {tracking.tracking_uri(ROOT)}")
    rows = []
    for name in names:
        run_name = f"{setting} {PREFIX}-{name}"
        found = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"attributes.run_name = '{run_name}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not found:
            print(f"{run_name}: no MLflow run (not run yet?)", file=sys.stderr)
            continue
        r = found[0]
        start, p = r.info.start_time, r.data.params
        mb = int(p["train.meta_batch"])
        val = [
            (m.step, (m.timestamp - start) / 1000, m.step * mb, m.value)
            for m in _history(client, r.info.run_id, "val/acc")
        ]
        rows.append(
            {
                "recipe": name,
                "params": p,
                "val": val,
                "metrics": r.data.metrics,
                "minutes": ((r.info.end_time or start) - start) / 60000,
            }
        )
    return rows


def table(rows: list[dict], setting: str, changed: dict[str, dict], threshold: float) -> str:
    head = (
        f"| recipe ({setting}) | overrides | iterations × meta-batch | run min | tasks/s "
        f"| s to val ≥ {100 * threshold:.0f}% | best val % | test % (transductive / support) |"
    )
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        p, m = row["params"], row["metrics"]
        reach = next((s for _, s, _, v in row["val"] if v >= threshold), None)
        best = max((v for *_, v in row["val"]), default=float("nan"))
        test = "–"
        if "eval/acc_transductive" in m:
            test = f"{100 * m['eval/acc_transductive']:.2f} / {100 * m['eval/acc_support']:.2f}"
        over = ", ".join(f"{k}={v}" for k, v in changed[row["recipe"]].items()) or "(preset)"
        # the whole run's rate (train_stage logs its training seconds), not the last window's
        tasks = int(p["train.iterations"]) * int(p["train.meta_batch"])
        rate = tasks / m["train/seconds"] if m.get("train/seconds") else float("nan")
        lines.append(
            f"| {row['recipe']} | {over} | {p['train.iterations']} × {p['train.meta_batch']} "
            f"| {row['minutes']:.1f} | {rate:.1f} "
            f"| {'–' if reach is None else f'{reach:.0f}'} | {100 * best:.2f} | {test} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], setting: str, path: Path) -> None:
    from matplotlib.figure import Figure

    from mamlops.files import atomic_write

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    by_time, by_tasks = fig.subplots(1, 2, sharey=True)
    for row in rows:
        _, seconds, tasks, acc = zip(*row["val"], strict=True) if row["val"] else ([],) * 4
        pct = [100 * a for a in acc]
        by_time.plot([s / 60 for s in seconds], pct, marker=".", label=row["recipe"])
        by_tasks.plot(tasks, pct, marker=".", label=row["recipe"])
    by_time.set(xlabel="wall-clock minutes since the run started", ylabel="validation accuracy %")
    by_tasks.set(xlabel="tasks seen")
    by_time.legend()
    for ax in (by_time, by_tasks):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{setting}: time to accuracy (MLflow val/acc)")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def report(args: argparse.Namespace) -> None:
    recipes = load_recipes(args.setting, args.recipes)
    rows = collect(args.setting, list(recipes))
    if not rows:
        sys.exit("nothing to report: run the recipes first (time_to_accuracy.py run)")
    from mamlops.files import write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    md = table(rows, args.setting, recipes, args.threshold)
    write_text(RESULTS / f"{args.setting}.md", md)
    plot(rows, args.setting, RESULTS / f"{args.setting}.png")
    print(md)
    print(f"wrote {RESULTS / f'{args.setting}.md'} and .png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("run", "report", "all"))
    ap.add_argument("--setting", default="omniglot-5w1s")
    ap.add_argument("--recipes", nargs="*", help="a subset of the setting's recipes")
    ap.add_argument("--tasks", type=int, default=16000, help="tasks per recipe (iterations × mb)")
    ap.add_argument(
        "--queue-only", action="store_true", help="queue the runs, start no worker, do not wait"
    )
    ap.add_argument("--threshold", type=float, default=0.95, help="val accuracy to time")
    args = ap.parse_args()
    if args.action in ("run", "all"):
        run(args)
    if args.action in ("report", "all"):
        report(args)


if __name__ == "__main__":
    main()

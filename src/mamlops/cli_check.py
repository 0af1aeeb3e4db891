"""``mamlops check``: the pre-flight ``make run`` does before ``dvc repro`` deletes anything.

Apart from ``cli`` because it is the one command with logic of its own (every other command
is a call into the library): it validates the whole params file, reaches the tracking store,
and cleans up what killed processes left (DVC's lock, MLflow runs left RUNNING, the work
folders of a killed download or prepare, the temporary files of a killed write), each a failure
that would otherwise surface minutes later, mid-pipeline.
"""

from __future__ import annotations

from pathlib import Path

from mamlops import datasets, tracking
from mamlops.config import train_settings
from mamlops.files import release_dead_dvc_locks, sweep_abandoned, sweep_temporaries
from mamlops.layout import Layout
from mamlops.params import load_params
from mamlops.urls import redact


def preflight(params_file: Path) -> list[str]:
    """Run the checks and clean-ups; the lines to report. A failed check raises (one line)."""
    settings = train_settings(load_params(params_file))  # the whole file, checked
    uri = tracking.tracking_uri()
    tracking.check_store(uri)
    root = params_file.parent
    dead = release_dead_dvc_locks(root)
    try:
        runs, unsearched = tracking.close_dead_runs(uri), None  # a kill -9 left them RUNNING
    except Exception as exc:  # a server that answers /health but not the runs API: not fatal
        runs, unsearched = [], " ".join(str(exc).split())[:200]
    # a stage sweeps these itself when it runs, but DVC restores a prepared folder from its
    # run-cache without running prepare, so they would stay until the data changes
    layout = Layout(root)
    outs = [layout.raw_omniglot, *map(layout.prepared, datasets.NAMES)]
    swept = [p for out in outs for p in sweep_abandoned(out)]
    # atomic_write's temporary files that a kill -9 left inside DVC outputs (checkpoints,
    # models, metrics, plots, results), which DVC would otherwise track and push
    folders = [f(s) for s in settings for f in (layout.checkpoint_dir, layout.model_dir)]
    temps = [p for f in folders for p in sweep_temporaries(f)]
    temps += [p for d in ("metrics", "plots", "results") for p in sweep_temporaries(root / d, True)]
    lines = []
    if dead:
        lines.append(f"check: released DVC's lock held by dead process(es) {dead} (a kill -9)")
    if unsearched:
        lines.append(f"check: could not look for MLflow runs left RUNNING: {redact(unsearched)}")
    if runs:
        lines.append(f"check: marked KILLED the MLflow runs of dead processes: {', '.join(runs)}")
    if swept:
        names = ", ".join(str(p) for p in swept)
        lines.append(f"check: removed the work folders of killed stages: {names}")
    if temps:
        names = ", ".join(str(p) for p in temps)
        lines.append(f"check: removed the temporary files of killed writes: {names}")
    lines.append(
        f"check: {params_file} and its presets are valid; trains {', '.join(settings) or 'none'}; "
        f"tracking store {redact(uri)} ready"
    )
    return lines

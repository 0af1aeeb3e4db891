"""Meta-training throughput against the number of processes (torchrun, gloo on CPU).

Trains a preset (default: make run's omniglot-5w1s) for a fixed number of iterations through
`mamlops train`, once with one process of ``--threads`` threads and once with ``--processes``
processes of one thread each (what torchrun sets), and prints tasks/s from the run's own
metrics. A world of several processes splits every meta-batch; the ratio is what data
parallelism buys on this machine::

    .venv/bin/python benchmarks/bench_processes.py --iterations 60
    .venv/bin/python benchmarks/bench_processes.py --device cuda --processes 1 2 4   # GPUs

Needs the prepared data (`dvc repro prepare@omniglot`). Run alone: two jobs on two cores slow
each other down many times over.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(preset: dict, processes: int, threads: int, work: Path, device: str) -> dict:
    name = f"bench-{processes}p"
    common = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["common"]
    preset = {**preset, "processes": processes, "device": device}
    params = {"train": {"common": common, "presets": {name: preset}}}
    (work / f"{name}.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["OMP_NUM_THREADS"] = str(threads)  # torchrun keeps a value that is set
    proc = subprocess.run(
        ["mamlops", "train", name, "--params", f"{name}.yaml"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return json.loads((work / "metrics" / "train" / f"{name}.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", default="omniglot-5w1s")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=2, help="threads of the one-process run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prepared", type=Path, help="default: data/prepared/<dataset>")
    args = ap.parse_args()

    preset = yaml.safe_load((ROOT / "presets.yaml").read_text())[args.setting]
    preset.update(
        iterations=args.iterations,
        val_every=args.iterations,
        val_episodes=10,
        checkpoint_every=0,
        log_every=10,
    )
    prepared = (args.prepared or ROOT / "data" / "prepared" / preset["dataset"]).resolve()
    if not (prepared / "meta.json").is_file():
        sys.exit(f"{prepared}: not prepared; run `dvc repro prepare@{preset['dataset']}` first")
    print(
        f"{args.setting}, {args.iterations} iterations of {preset['meta_batch']} tasks, "
        f"{args.device}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "data" / "prepared").mkdir(parents=True)
        (work / "data" / "prepared" / preset["dataset"]).symlink_to(prepared)
        for n in args.processes:
            threads = args.threads if n == 1 else 1
            metrics = run(preset, n, threads, work, args.device)
            rows.append((n, threads, metrics["tasks_per_s"], metrics["train_seconds"]))
            print(f"{n} process(es) x {threads} thread(s): {rows[-1][2]:.1f} tasks/s", flush=True)
    base = rows[0][2]
    print("\n| processes x threads | tasks/s | training s | vs first row |")
    print("|---|---:|---:|---:|")
    for n, threads, rate, seconds in rows:
        print(f"| {n} x {threads} | {rate:.1f} | {seconds:.1f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()

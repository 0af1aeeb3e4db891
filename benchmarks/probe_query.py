"""Validation accuracy against wall-clock time for the CPU default at several query sizes.

How the `make run` default (train.presets.omniglot-5w1s) was chosen: on a 2-core CPU, is it
better to spend a fixed time budget on many cheap iterations (few query images per class, the
batched strategy) or fewer rich ones (15 query/class, the per-task loop)? Each run trains the
default setting with only ``query`` and ``iterations`` changed, on the prepared Omniglot of
``dvc repro prepare@omniglot``, and prints the validation accuracy (100 fixed val episodes)
with the seconds elapsed. Runs one after the other so they do not share the cores.

    .venv/bin/python benchmarks/probe_query.py --runs 3:3750 15:2000 1:6000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from mamlops.config import TrainConfig
from mamlops.meta.train import train
from mamlops.params import load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=["3:3750", "15:2000"], help="QUERY:ITERATIONS")
    ap.add_argument("--setting", default="omniglot-5w1s")
    ap.add_argument("--val-every", type=int, default=None, help="default: iterations / 5")
    ap.add_argument("--prepared", type=Path, default=Path("data/prepared/omniglot"))
    args = ap.parse_args()
    base = TrainConfig.from_params(load_params(), args.setting)
    for spec in args.runs:
        query, iterations = (int(v) for v in spec.split(":"))
        every = args.val_every or max(iterations // 5, 1)
        cfg = replace(base, query=query, iterations=iterations, val_every=every, checkpoint_every=0)
        t0 = time.perf_counter()

        def report(values: dict[str, float], step: int, q: int = query, t: float = t0) -> None:
            if "val_acc" in values:
                print(
                    f"query {q:2d}  step {step:6d}  {time.perf_counter() - t:7.1f} s  "
                    f"val acc {values['val_acc']:.4f}",
                    flush=True,
                )

        with tempfile.TemporaryDirectory() as tmp:
            result = train(
                cfg,
                args.prepared,
                Path(tmp) / "m",
                Path(tmp) / "c",
                progress=False,
                on_metrics=report,
            )
        print(f"query {query:2d}  done: {result.seconds:.0f} s, strategy {result.strategy}")


if __name__ == "__main__":
    main()

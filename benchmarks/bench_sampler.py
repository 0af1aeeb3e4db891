"""Time the in-memory task sampler: one meta-batch must cost far less than a MAML step.

Usage: ``python benchmarks/bench_sampler.py [prepared_dir] [--device cpu|cuda]``
(default ``data/prepared/omniglot``; run ``python pipeline/prepare.py`` first).
Prints ms per batch of 32 tasks for 5-way 1-shot and 20-way 5-shot, 15 queries per class,
plus the fixed-episode path used by evaluation.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from mamlops.data.episodes import TaskSampler, episode_tasks, load_bank, load_episodes
from mamlops.data.splits import prepared_dataset


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median and best ms per call: the median shows typical cost on a shared machine."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def main() -> None:
    """Load the train/test banks, then time sampling for each setting."""
    ap = argparse.ArgumentParser()
    ap.add_argument("prepared_dir", nargs="?", default="data/prepared/omniglot")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    bank = load_bank(args.prepared_dir, "train").to(args.device)
    print(f"load_bank(train): {tuple(bank.shape)} in {(time.perf_counter() - start) * 1e3:.0f} ms")
    print(f"torch threads: {torch.get_num_threads()}, device: {args.device}")
    for ways, shots in ((5, 1), (20, 5)):
        sampler = TaskSampler(
            bank, ways, shots, query=15, seed=0, dataset=prepared_dataset(args.prepared_dir)
        )
        med, best = _time(lambda s=sampler: s.sample(args.tasks), args.repeats)
        print(
            f"sample {args.tasks} tasks {ways}w{shots}s/15q: {med:.2f} ms/batch (best {best:.2f})"
        )

    test_bank = load_bank(args.prepared_dir, "test").to(args.device)
    for ways, shots in ((5, 1), (20, 5)):
        eps = load_episodes(args.prepared_dir, "test", ways, shots)
        med, best = _time(lambda e=eps: episode_tasks(test_bank, e, 0, args.tasks), args.repeats)
        print(
            f"episode_tasks {args.tasks} fixed {ways}w{shots}s/15q: {med:.2f} ms/batch "
            f"(best {best:.2f})"
        )


if __name__ == "__main__":
    main()

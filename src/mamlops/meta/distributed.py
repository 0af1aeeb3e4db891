"""Data-parallel meta-training under ``torchrun``: the meta-batch split across processes.

MAML's meta-gradient is a mean over independent tasks, so the task is the unit of parallelism.
Every process draws the random numbers of the *whole* meta-batch from the same seeded generator
(a few hundred numbers) and gathers the images of its own contiguous shard only
(``TaskSampler.sample(n, part)``); one all-reduce then averages the shards' gradients, flattened
into one buffer with the logged loss and accuracy. Hence:

- an iteration's tasks are the same whatever the number of processes, and so is the generator
  state in every process: a checkpoint written with one world size resumes with another;
- the averaged gradient is the single process's up to the order of float additions (a mean of
  two means of 16 is not bitwise a mean of 32), so theta matches a one-process run closely, not
  bitwise; every process applies the same update, so the copies of theta never drift apart;
- rank 0 alone validates, logs to MLflow and writes checkpoints and theta.

``torchrun`` starts the processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous; gloo on CPU, NCCL on CUDA (one GPU per process, ``cuda:<LOCAL_RANK>``)::

    torchrun --standalone --nproc-per-node 2 pipeline/train.py omniglot-5w1s ...   # by hand
    mamlops train omniglot-5w1s        # with `processes: 2`: runs itself in 2 processes
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mamlops.errors import UserError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (a world of one without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that validates, logs and writes files."""
        return self.rank == 0

    def shard(self, meta_batch: int) -> slice | None:
        """The tasks of a meta-batch this process computes (None: all of them)."""
        if self.size == 1:
            return None
        if meta_batch % self.size:
            raise UserError(
                f"meta_batch {meta_batch} does not split over {self.size} processes; make it a "
                f"multiple of {self.size}, or start another number of processes"
            )
        per = meta_batch // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


SINGLE = World()


def launched() -> bool:
    """Whether torchrun (or another launcher setting ``WORLD_SIZE``) started this process."""
    return "WORLD_SIZE" in os.environ


def launch(processes: int) -> None:
    """Run this process's command line (a stage script or the ``mamlops`` entry point, both
    Python files) in ``processes`` processes on this node, with torchrun's own launcher
    (``elastic_launch``, what ``torchrun --standalone`` calls), and wait for them.

    A failure raises ``UserError`` in one line: each process has already printed its own
    one-line error, and the launcher's traceback would say nothing more. For several nodes,
    start ``torchrun`` yourself (docs/training.md, "Training on several processes").
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: the cores are shared out
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=f"mamlops-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
    )
    sys.stdout.flush()
    try:
        elastic_launch(config, entrypoint=sys.executable)(*sys.argv)
    except ChildFailedError:
        raise UserError(
            f"the training in {processes} processes stopped: the error above says why"
        ) from None


@contextmanager
def process_group(device: torch.device) -> Iterator[tuple[World, torch.device]]:
    """Join the launcher's process group for the length of a run (gloo on CPU, NCCL on CUDA);
    yields the world and the device this process trains on. Without a launcher: a world of
    one on ``device``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        yield SINGLE, device
        return
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield world, device
    finally:
        dist.destroy_process_group()


def average_gradients(
    params: dict[str, torch.Tensor], world: World, *scalars: torch.Tensor
) -> list[torch.Tensor]:
    """Average every ``.grad`` of ``params`` and the ``scalars`` (the loss, the accuracy) over
    the processes, in place for the gradients, with one all-reduce; returns the scalars'
    means. A world of one returns the scalars unchanged."""
    if world.size == 1:
        return list(scalars)
    grads = [p.grad for p in params.values() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [s.detach().reshape(1) for s in scalars])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return list(flat[offset:])


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's ``obj`` in every process (a checkpoint read by rank 0 alone: several nodes need
    not share a file system)."""
    if world.size == 1:
        return obj
    box = [obj if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]

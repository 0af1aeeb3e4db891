"""One meta-training iteration recorded once as a CUDA graph and replayed every step after.

Why: a MAML iteration is hundreds of small kernels (tasks x inner steps x conv blocks, forward,
backward through the inner loop, Adam), and on a GPU their launches, not their arithmetic, set
the pace. Replaying the whole iteration as one graph cut the 5-way 1-shot paper iteration from
23.3 ms to 5.4 ms on an H200 (docs/performance.md). ``strategy: auto`` picks it for training on
CUDA in one process (``execution``); the math is the batched strategy's.

A graph replays the same kernels on the same memory, so nothing in it may change with the step
number from the host. What does is kept on the device and updated by the graph itself:

- ``step``: the iteration counter, a device scalar the graph increments;
- the meta-lr: MAML++'s cosine schedule computed from ``step`` inside the graph and read by
  Adam (``capturable=True``, the lr a device tensor: ``optimizer``);
- the multi-step-loss weights: ``mamlpp.multi_step_weights`` of ``step``.

First or second order changes the graph's shape, so there are two graphs and the host picks
one per iteration (``mamlpp.use_first_order`` needs no GPU value). The task sampler draws from
the device's default CUDA generator, whose offsets graph capture records
(``sampler_generator``). On a CPU the same iteration runs without capture (``graph=False``):
that is how its tensor schedules are tested where there is no GPU.

Example::

    opt = optimizer(params, cfg.meta_lr, capturable=True)
    stepper = GraphStep(params, opt, sampler, model_cfg, maml_cfg, cfg, start=0)
    for i in range(cfg.iterations):
        loss_and_acc = stepper.step(i)   # a device tensor [2]; no host sync
"""

from __future__ import annotations

import contextlib

import torch

from mamlops.config import MAMLConfig, TrainConfig
from mamlops.data.episodes import TaskSampler
from mamlops.errors import UserError
from mamlops.meta import maml, mamlpp
from mamlops.meta.model import ConvNetConfig, Params

WARMUP = 3  # eager iterations of each order before its capture (cuDNN/cuBLAS workspaces, Adam)


def execution(strategy: str, device: torch.device, world_size: int) -> str | None:
    """``graph`` when the training iteration is captured (``strategy: graph``, or ``auto`` on
    CUDA in one process), else None (eager, ``maml.resolve_strategy``'s choice)."""
    capturable = device.type == "cuda" and world_size == 1
    if strategy == "graph" and not capturable:
        where = "on a CPU" if device.type != "cuda" else f"in {world_size} torchrun processes"
        raise UserError(
            f"strategy: graph captures the training iteration as a CUDA graph, which cannot run"
            f" {where}; use strategy: auto (it picks graph where it can) or batched"
        )
    return "graph" if strategy == "graph" or (strategy == "auto" and capturable) else None


def optimizer(params: Params, meta_lr: float, capturable: bool) -> torch.optim.Adam:
    """Adam over theta. ``capturable``: its lr a device tensor that the graph rewrites and its
    step counts on the device, as a replayed graph needs."""
    if not capturable:
        return torch.optim.Adam(params.values(), lr=meta_lr)
    device = next(iter(params.values())).device
    lr = torch.tensor(meta_lr, dtype=torch.float32, device=device)
    cuda = (
        device.type == "cuda"
    )  # on a CPU (tests): the single-tensor form, which takes a tensor lr
    return torch.optim.Adam(params.values(), lr=lr, capturable=cuda, foreach=cuda)


def sampler_generator(device: torch.device, seed: int) -> torch.Generator:
    """The generator of the training tasks: on CUDA the device's default one, which graph
    capture registers (a user generator would have to be registered with every graph)."""
    if device.type != "cuda":
        return torch.Generator(device=device).manual_seed(seed)
    gen = torch.cuda.default_generators[device.index or torch.cuda.current_device()]
    gen.manual_seed(seed)
    return gen


class GraphStep:
    """The training iteration of ``cfg`` with its step-dependent values on the device, replayed
    as a CUDA graph per derivative order (``graph=False``: run, not captured)."""

    def __init__(
        self,
        params: Params,
        opt: torch.optim.Adam,
        sampler: TaskSampler,
        model_cfg: ConvNetConfig,
        maml_cfg: MAMLConfig,
        cfg: TrainConfig,
        *,
        start: int,
        graph: bool = True,
    ) -> None:
        self.params, self.opt, self.sampler, self.cfg = params, opt, sampler, cfg
        self.model_cfg = model_cfg
        self.maml_cfg = MAMLConfig(**{**maml_cfg.to_dict(), "strategy": "batched"})
        first = next(iter(params.values()))
        device = first.device
        self.step_t = torch.tensor(float(start), dtype=first.dtype, device=device)
        # the lr Adam reads: one tensor, put back after a checkpoint's param_groups replaced it
        self.lr = torch.tensor(cfg.meta_lr, dtype=first.dtype, device=device)
        for group in opt.param_groups:
            group["lr"] = self.lr
        # autocast's cast cache must be off while capturing (a cached cast would be replayed
        # as a stale tensor)
        self.autocast = torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=cfg.amp_bf16, cache_enabled=False
        )
        self.graph = graph
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[bool, torch.Tensor] = {}
        self.warm = {False: 0, True: 0}

    def _iteration(self, first_order: bool) -> torch.Tensor:
        """One iteration, device values only: [loss, query_acc]; advances ``step_t``."""
        cfg = self.cfg
        if cfg.cosine_meta_lr:
            self.lr.copy_(mamlpp.cosine_meta_lr(self.step_t, cfg.iterations, cfg.meta_lr))
        tasks = self.sampler.sample(cfg.meta_batch)
        with self.autocast:
            loss, m = maml.meta_loss(
                self.params, tasks, self.model_cfg, self.maml_cfg, self.step_t, first_order
            )
        # gradients stay allocated: a graph writes them where its capture found them
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        if cfg.grad_clip:
            mamlpp.clip_meta_grad(self.params, cfg.grad_clip)
        self.opt.step()
        self.step_t.add_(1)
        return torch.stack((m["loss"].float(), m["query_acc"].float()))

    def step(self, iteration: int) -> torch.Tensor:
        """Iteration ``iteration`` (the next one: the graph counts for itself), as [loss, acc]
        on the device; nothing here waits for the GPU."""
        first_order = mamlpp.use_first_order(self.maml_cfg, iteration)
        if not self.graph:
            return self._iteration(first_order)
        if first_order not in self.graphs:
            if self.warm[first_order] < WARMUP:  # a real iteration, run on a side stream
                self.warm[first_order] += 1
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = self._iteration(first_order)
                torch.cuda.current_stream().wait_stream(side)
                return out
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # recorded, not run: the replay below runs it
                self.outputs[first_order] = self._iteration(first_order)
            self.graphs[first_order] = graph
        self.graphs[first_order].replay()
        return self.outputs[first_order].clone()

    def release(self) -> None:
        """Free the graphs' memory pools (before evaluation on the same GPU)."""
        self.graphs.clear()
        self.outputs.clear()
        with contextlib.suppress(RuntimeError):
            torch.cuda.empty_cache()

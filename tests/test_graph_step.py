"""The CUDA-graph training iteration (``graph_step``) where there is no GPU: its device-valued
schedules, its iteration run uncaptured on the CPU against the eager loop, and its choice.

Capture itself needs CUDA: ``benchmarks/gpu_train.py --check`` compares graph and eager
float64 meta-gradients for each recipe on a GPU (docs/performance.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import tiny_cfg

from mamlops.config import TrainConfig
from mamlops.data.episodes import load_bank
from mamlops.data.splits import resolve_scheme
from mamlops.errors import UserError
from mamlops.meta import graph_step, maml, mamlpp
from mamlops.meta.train import train, training_sampler

MAMLPP = {  # every step-dependent value at once: cosine lr, both annealings, LSLR, clipping
    "inner_steps": 2,
    "learn_inner_lr": True,
    "per_step_bn": True,
    "multi_step_loss": True,
    "multi_step_anneal_iters": 4,
    "first_order_iters": 3,
    "cosine_meta_lr": True,
    "grad_clip": 1.0,
}


def test_device_schedules_equal_the_host_ones() -> None:
    steps = torch.arange(0, 130, dtype=torch.float32)
    for total in (1, 100, 125):
        on_device = mamlpp.cosine_meta_lr(steps, total, 1e-3)
        on_host = torch.tensor([mamlpp.cosine_meta_lr(int(s), total, 1e-3) for s in steps])
        torch.testing.assert_close(on_device, on_host, rtol=1e-6, atol=1e-9)  # 1e-6 of base
    for inner, anneal in ((2, 4), (5, 100), (3, 0), (1, 10)):
        for it in (0, 1, 3, 4, 50, 100, 200):
            host = mamlpp.multi_step_weights(inner, it, anneal)
            device = mamlpp.multi_step_weights(inner, torch.tensor(float(it)), anneal)
            torch.testing.assert_close(device, torch.tensor(host), rtol=1e-6, atol=1e-9)
            assert abs(float(device.sum()) - 1.0) < 1e-6


def test_a_tensor_step_needs_the_order_from_the_host() -> None:
    with pytest.raises(ValueError, match="first_order"):
        maml.meta_loss({}, None, None, maml.MAMLConfig(), step=torch.tensor(0.0))


def test_graph_is_chosen_only_where_it_can_run() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert graph_step.execution("auto", cuda, 1) == "graph"
    assert graph_step.execution("graph", cuda, 1) == "graph"
    assert graph_step.execution("auto", cpu, 1) is None
    assert graph_step.execution("auto", cuda, 2) is None  # torchrun: all-reduce between steps
    assert graph_step.execution("batched", cuda, 1) is None
    with pytest.raises(UserError, match="strategy: auto"):
        graph_step.execution("graph", cpu, 1)
    with pytest.raises(UserError, match="2 torchrun processes"):
        graph_step.execution("graph", cuda, 2)
    assert maml.resolve_strategy("graph", cpu) == "batched"  # the graph's math


class Float64Tasks:
    """A sampler's tasks with float64 images."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler

    def sample(self, n_tasks: int):
        tasks = self.sampler.sample(n_tasks)
        tasks.xs, tasks.xq = tasks.xs.double(), tasks.xq.double()
        return tasks


def run_both(cfg: TrainConfig, prepared: Path) -> tuple[dict, dict]:
    """theta after ``cfg.iterations`` in float64, from the same init and tasks: ``GraphStep``
    run without capture (device-valued lr, step and loss weights) and the textbook eager loop
    (Python values, as ``train`` computes them: the oracle)."""
    model_cfg = cfg.network
    scheme = resolve_scheme(prepared, cfg.split)
    bank = load_bank(prepared, "train", scheme)
    init = mamlpp.init_meta_params(model_cfg, cfg.maml, torch.Generator().manual_seed(cfg.seed))

    def setup():
        gen = graph_step.sampler_generator(torch.device("cpu"), cfg.seed)
        params = {k: v.double().requires_grad_(True) for k, v in init.items()}
        return params, Float64Tasks(training_sampler(cfg, prepared, scheme, bank, gen))

    ours, sampler = setup()
    opt = graph_step.optimizer(ours, cfg.meta_lr, capturable=True)
    stepper = graph_step.GraphStep(
        ours, opt, sampler, model_cfg, cfg.maml, cfg, start=0, graph=False
    )
    for i in range(cfg.iterations):
        out = stepper.step(i)
        assert out.shape == (2,) and torch.isfinite(out).all()
    assert float(stepper.step_t) == cfg.iterations  # the counter the graph keeps for itself

    oracle, sampler = setup()
    opt = torch.optim.Adam(oracle.values(), lr=cfg.meta_lr)
    for i in range(cfg.iterations):
        for group in opt.param_groups:
            group["lr"] = (
                mamlpp.cosine_meta_lr(i, cfg.iterations, cfg.meta_lr)
                if cfg.cosine_meta_lr
                else cfg.meta_lr
            )
        tasks = sampler.sample(cfg.meta_batch)
        loss, _ = maml.meta_loss(oracle, tasks, model_cfg, cfg.maml, step=i)
        opt.zero_grad()
        loss.backward()
        if cfg.grad_clip:
            mamlpp.clip_meta_grad(oracle, cfg.grad_clip)
        opt.step()
    return ours, oracle


@pytest.mark.parametrize("recipe", ["paper", "maml++"])
def test_the_device_valued_iteration_trains_as_the_eager_loop(
    recipe: str, omniglot_prepared: Path
) -> None:
    """Same init, tasks and updates in float64: the step-dependent values read from device
    tensors (the lr Adam reads, the multi-step weights, the counter) give the eager loop's
    theta through both annealing boundaries. (float32 is no test here: this tiny config's loss
    jumps by 2e-3 under 1e-7 changes of theta, so rounding alone forks the trajectories.)"""
    cfg = tiny_cfg(iterations=6, **(MAMLPP if recipe == "maml++" else {}))
    ours, oracle = run_both(cfg, omniglot_prepared)
    assert ours.keys() == oracle.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], oracle[k], rtol=1e-7, atol=1e-9, msg=k)
    init = mamlpp.init_meta_params(
        cfg.network, cfg.maml,
        torch.Generator().manual_seed(cfg.seed),
    )  # fmt: skip
    moved = max(float((ours[k].detach() - v.double()).abs().max()) for k, v in init.items())
    assert moved > 1e-4  # trained: two untouched inits would prove nothing


def test_a_budget_stops_at_a_logging_point_and_the_next_call_finishes_the_run(
    omniglot_prepared: Path, tmp_path: Path
) -> None:
    """What a short GPU slot does: stop on the wall clock, validated and checkpointed; the
    next call resumes and ends with the theta of an uninterrupted run (CPU: bitwise)."""
    cfg = tiny_cfg(iterations=9, val_every=9, checkpoint_every=0, log_every=3)
    out, ck = tmp_path / "slots", tmp_path / "ck"
    first = train(cfg, omniglot_prepared, out, ck, progress=False, budget_s=0.0)
    assert first.step == 3 and first.best_step == 3  # validated where it stopped
    assert not (out / "theta.safetensors").exists() and (out / "theta_best.safetensors").exists()
    second = train(cfg, omniglot_prepared, out, ck, progress=False)
    assert second.resumed_from == 3 and second.step == 9
    train(cfg, omniglot_prepared, tmp_path / "s", tmp_path / "ck2", progress=False)
    a = load_file(str(out / "theta.safetensors"))
    b = load_file(str(tmp_path / "s" / "theta.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in second.history if "val_acc" in r] == [3, 9]

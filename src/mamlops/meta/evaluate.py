"""Meta-test: adapt theta on the fixed test episodes and score the query sets. No MLflow here.

Both BatchNorm protocols are reported because they answer different questions:

* ``transductive``: the query set is normalised with its own batch statistics, as the MAML paper
  (and its code) does; this is the number comparable to the paper's Table 1.
* ``support``: the support set's statistics under the adapted weights are frozen and each query
  image is scored on its own; this is what a deployed classifier (``mamlops adapt``) does.

The 95% confidence interval is the paper's: ``1.96 * std / sqrt(n)`` over per-episode accuracies
with the *population* standard deviation (``np.std``, ddof=0, as in cbfinn/maml's ``main.py``),
so the numbers are computed the same way as the ones they are compared with. With n = 600 the
sample std would be larger by sqrt(600/599), i.e. 0.08%.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mamlops import tracking
from mamlops.config import EvaluateConfig, TrainConfig
from mamlops.data.episodes import (
    Episodes,
    Tasks,
    episode_path,
    episode_tasks,
    load_bank,
    load_episodes,
)
from mamlops.data.splits import resolve_scheme
from mamlops.files import write_json, written_together
from mamlops.hardware import hardware, resolve_device
from mamlops.meta import maml
from mamlops.meta.checkpoint import load_theta, theta_file
from mamlops.meta.figures import episode_grid, steps_rows, write_steps_csv
from mamlops.meta.model import ConvNetConfig, Params

PROTOCOLS = ("transductive", "support")


def mean_ci95(accs: Tensor | list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% CI: ``1.96 * population std / sqrt(n)`` (the paper's)."""
    t = torch.as_tensor(accs, dtype=torch.float64).flatten()
    n = t.numel()
    if n == 0:
        raise ValueError("no accuracies to summarise")
    std = t.std(correction=0).item()
    return t.mean().item(), 1.96 * std / math.sqrt(n)


def resolve_inner(cfg: TrainConfig, steps: int | None, lr: float | None) -> tuple[int, float]:
    """Test-time inner steps and lr: the preset's ``test_inner_steps`` / ``inner_lr`` unless set."""
    steps = cfg.test_inner_steps if steps is None else int(steps)
    lr = cfg.inner_lr if lr is None else float(lr)
    if steps < 0:
        raise ValueError(f"inner steps must be >= 0, got {steps}")
    if not lr > 0:
        raise ValueError(f"inner lr must be positive, got {lr}")
    return steps, lr


def evaluate_setting(
    theta_params: Params,
    cfg: TrainConfig,
    prepared_dir: str | Path,
    *,
    steps: int | None = None,
    lr: float | None = None,
    batch: int = 50,
    limit: int | None = None,
    device: str | torch.device | None = None,
    within_alphabet: bool = False,
    query: int | None = None,
    curve: bool = True,
    subset: str = "test",
) -> dict[str, Any]:
    """Adapt ``theta_params`` on each fixed test episode of ``cfg``'s setting; score both protocols.

    ``limit`` keeps the first episodes only (tests); ``batch`` episodes are adapted at once (only
    memory, not results, depends on it up to float rounding). Deterministic: the episodes are fixed
    files and test-time adaptation draws no random numbers.

    Returns ``{"n", "steps", "inner_lr", "split", "transductive": {"acc", "ci95", "curve",
    "per_episode"}, "support": ...}`` where ``curve[s]`` is the mean query accuracy after ``s``
    inner steps (0..steps) and ``per_episode`` the final accuracy of each episode (for paired
    comparisons of two models). ``within_alphabet``: also ``"alphabet"``, the same for the
    within-alphabet episodes of the split (``episodes.make_alphabet_episodes``), or None when
    the prepared data have none for this setting. ``query`` keeps the first that many query
    images per class of each episode (the reference code's protocol scores K per class, so
    its transductive BatchNorm sees 1 image per class in 1-shot tasks). ``curve=False`` scores
    the final step only (``curve`` is then that one number): scoring every step costs about
    ten times the adaptation itself. ``subset="val"`` scores the validation episodes instead
    (choosing a recipe without looking at the test classes).
    """
    steps, lr = resolve_inner(cfg, steps, lr)
    dev = resolve_device(cfg.device) if device is None else torch.device(device)
    scheme = resolve_scheme(prepared_dir, cfg.split)
    bank = load_bank(prepared_dir, subset, scheme).to(dev)
    params = {k: v.detach().to(dev) for k, v in theta_params.items()}

    def score(episodes: Episodes) -> dict[str, Any]:
        if query is not None:
            if not 1 <= query <= episodes.query.shape[-1]:
                raise ValueError(f"query must be 1..{episodes.query.shape[-1]}, got {query}")
            episodes = dataclasses.replace(episodes, query=episodes.query[..., :query])
        n = len(episodes) if limit is None else min(int(limit), len(episodes))
        if n < 1:
            raise ValueError("no test episodes to evaluate (limit < 1 or empty episode file)")
        model_cfg = cfg.network
        curves: dict[str, list[Tensor]] = {p: [] for p in PROTOCOLS}
        for start in range(0, n, batch):
            tasks = episode_tasks(bank, episodes, start, min(start + batch, n)).to(dev)
            for protocol in PROTOCOLS:
                acc = maml.evaluate_tasks(
                    params,
                    tasks,
                    model_cfg,
                    steps,
                    lr,
                    protocol,
                    curve=curve,
                    label_smoothing=cfg.maml.label_smoothing,
                )
                curves[protocol].append(acc.cpu().reshape(len(acc), -1))
        out: dict[str, Any] = {"n": n}
        for protocol in PROTOCOLS:
            per_episode = torch.cat(curves[protocol]).to(torch.float64)  # [n, steps + 1]
            acc, ci = mean_ci95(per_episode[:, -1])
            out[protocol] = {
                "acc": acc,
                "ci95": ci,
                "curve": per_episode.mean(dim=0).tolist(),
                "per_episode": per_episode[:, -1].tolist(),
            }
        return out

    standard = score(load_episodes(prepared_dir, subset, cfg.ways, cfg.shots, scheme))
    result: dict[str, Any] = {"steps": steps, "inner_lr": lr, "split": scheme, **standard}
    if within_alphabet:
        path = episode_path(prepared_dir, subset, cfg.ways, cfg.shots, scheme, alphabet=True)
        result["alphabet"] = None
        if path.is_file():
            episodes = load_episodes(
                prepared_dir, subset, cfg.ways, cfg.shots, scheme, alphabet=True
            )
            result["alphabet"] = score(episodes)
    return result


def predict_tasks(
    params: Params,
    tasks: Tasks,
    model_cfg: ConvNetConfig,
    steps: int,
    lr: float,
    bn: str = "support",
    *,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Predicted query labels [T, Q] after ``steps`` inner steps (for figures and spot checks):
    the same test-time adaptation as the accuracies (``maml.adapt_detached``)."""
    if bn not in PROTOCOLS:
        raise ValueError(f"unknown bn protocol {bn!r}: expected one of {PROTOCOLS}")
    *_, fast = maml.adapt_detached(
        params, tasks.xs, tasks.ys, model_cfg, steps, lr, label_smoothing=label_smoothing
    )
    return maml.query_logits(fast, tasks, model_cfg, steps, bn).argmax(-1)


def on_trained_config(cfg: TrainConfig, meta: dict[str, Any], theta_path: Path) -> TrainConfig:
    """``cfg`` with what the theta was meta-trained with where it decides the score: the class
    split (test classes are unseen only under that split; None, the prepared folder's default,
    for thetas older than the key), the inner lr and the label smoothing of test-time
    adaptation (as a served classifier adapts). They differ from the preset only for a theta
    copied in from a run of a preset that has changed since (the paper presets adopted the
    paper code's split and loss after their GPU runs); a retrained one has the preset's."""
    trained = meta["train_config"]
    want = {
        "split": trained.get("split"),
        "inner_lr": float(trained.get("inner_lr", cfg.maml.inner_lr)),
        "label_smoothing": float(trained.get("label_smoothing", 0.0)),
    }
    have = {
        "split": cfg.split,
        "inner_lr": cfg.maml.inner_lr,
        "label_smoothing": cfg.maml.label_smoothing,
    }
    if want == have:
        return cfg
    changed = ", ".join(f"{k} {want[k]} (preset: {have[k]})" for k in want if want[k] != have[k])
    print(f"{theta_path}: meta-trained with {changed}: scored as it was trained")
    maml_cfg = dataclasses.replace(
        cfg.maml, inner_lr=want["inner_lr"], label_smoothing=want["label_smoothing"]
    )
    return dataclasses.replace(cfg, split=want["split"], maml=maml_cfg)


def test_metrics(
    theta: Params,
    cfg: TrainConfig,
    ev: EvaluateConfig,
    prepared_dir: str | Path,
    device: str | torch.device | None = None,
    limit: int | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """The numbers the evaluate stage records for ``theta`` (pure compute, any device: the GPU
    runner scores in its slot with it): accuracy and 95% CI for both BatchNorm protocols, the
    paper's K query images per class (``ev.reference_query``), within one alphabet
    (``ev.within_alphabet``); and ``evaluate_setting``'s full result of the standard episodes.
    ``limit``: the first episodes only (smoke runs)."""
    score = functools.partial(
        evaluate_setting,
        theta,
        cfg,
        prepared_dir,
        steps=ev.steps,
        batch=ev.batch,
        device=device,
        limit=limit,
    )
    result = score(within_alphabet=ev.within_alphabet)
    metrics = {
        "acc_transductive": result["transductive"]["acc"],
        "ci95_transductive": result["transductive"]["ci95"],
        "acc_support": result["support"]["acc"],
        "ci95_support": result["support"]["ci95"],
    }
    episodes = load_episodes(prepared_dir, "test", cfg.ways, cfg.shots, result["split"])
    if ev.reference_query and cfg.shots < episodes.query.shape[-1]:
        # the MAML paper's protocol: K query images per class, so transductive BN sees a
        # batch the size of the training query (docs/accuracy.md); the final step only
        k_query = score(query=cfg.shots, curve=False)["transductive"]
        metrics["acc_k_query_transductive"] = k_query["acc"]
        metrics["ci95_k_query_transductive"] = k_query["ci95"]
    alphabet = result.get("alphabet")
    if alphabet is not None:  # tasks of one script: what a user teaching a script faces
        for protocol in PROTOCOLS:
            metrics[f"acc_alphabet_{protocol}"] = alphabet[protocol]["acc"]
            metrics[f"ci95_alphabet_{protocol}"] = alphabet[protocol]["ci95"]
    return metrics, result


def evaluate_stage(
    cfg: TrainConfig,
    ev: EvaluateConfig,
    prepared_dir: Path,
    model_dir: Path,
    metrics_path: Path,
    results_path: Path,
    steps_csv: Path,
    grid_png: Path,
) -> dict[str, Any]:
    """The stage ``evaluate@<setting>`` (and ``mamlops evaluate``): score the chosen theta on
    the fixed test episodes.

    Writes the metrics JSON (numbers only: accuracy and 95% CI for both BatchNorm protocols),
    the results JSON (what was measured on what: data set, task, checkpoint, hardware), the
    accuracy-per-step CSV and a PNG of test episodes; logs them in an MLflow run nested under
    the training run that wrote the theta. Returns the metrics."""
    theta_path = theta_file(model_dir, ev.checkpoint)
    theta, meta = load_theta(theta_path)
    cfg = on_trained_config(cfg, meta, theta_path)
    device = resolve_device(cfg.device)
    parent = tracking.find_training_run(theta_path, ev.checkpoint)
    with tracking.start_run(
        f"evaluate@{cfg.name}",
        {"setting": cfg.name, **{f"evaluate.{k}": v for k, v in ev.to_dict().items()}},
        run_name=f"evaluate {cfg.name}",
        parent_run_id=parent,
        description=f"{cfg.name} on the fixed test episodes of {prepared_dir}",
        tags={"mamlops.setting": cfg.name},
        system_metrics=False,
    ):
        tracking.log_dataset(Path(prepared_dir), cfg.dataset, "testing")
        t0 = time.perf_counter()
        metrics, result = test_metrics(theta, cfg, ev, prepared_dir, device)
        alphabet = result.get("alphabet")
        episodes = load_episodes(prepared_dir, "test", cfg.ways, cfg.shots, result["split"])
        results = {
            "setting": cfg.name,
            "dataset": cfg.dataset,
            "split": result["split"],
            "alphabet_episodes": None if alphabet is None else alphabet["n"],
            "ways": cfg.ways,
            "shots": cfg.shots,
            "episodes": result["n"],
            "steps": result["steps"],
            "inner_lr": result["inner_lr"],
            "checkpoint": ev.checkpoint,
            "iterations": meta["step"],
            "train_iterations": int(meta["train_config"].get("iterations", cfg.iterations)),
            "hardware": hardware(device),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        rows = steps_rows(result)
        tasks = episode_tasks(prepared_dir, episodes, 0, ev.grid_episodes)
        preds = predict_tasks(
            theta,
            tasks,
            cfg.network,
            result["steps"],
            result["inner_lr"],
            label_smoothing=cfg.maml.label_smoothing,
        )
        # the four outputs of one evaluation, or the earlier run's four: a kill while the picture
        # was drawn left new metrics beside an old picture (issue 25)
        with written_together():
            write_json(metrics_path, metrics)
            write_json(results_path, results)
            write_steps_csv(rows, steps_csv)
            episode_grid(
                tasks,
                preds,
                grid_png,
                episodes=ev.grid_episodes,
                title=f"{cfg.name}: test episodes after {result['steps']} steps (support-set BN)",
            )
        tracking.set_tags({f"mamlops.{k}": str(v) for k, v in results.items()})
        named = {f"eval/{k}": v for k, v in metrics.items()}
        tracking.log_metrics(named)
        if parent:  # the runs list compares training runs on test accuracy too
            tracking.log_to_finished_run(parent, named)
        for row in rows:  # the accuracy after each test-time inner step, as a curve
            tracking.log_metrics(
                {f"eval/by_step/{k}": v for k, v in row.items() if k != "step"},
                step=int(row["step"]),
            )
        tracking.log_artifacts(
            [(p, "eval") for p in (metrics_path, results_path, steps_csv, grid_png)]
        )
    t, s = result["transductive"], result["support"]
    print(
        f"{cfg.name}: {100 * t['acc']:.2f} +- {100 * t['ci95']:.2f}% (transductive BN), "
        f"{100 * s['acc']:.2f} +- {100 * s['ci95']:.2f}% (support BN) on {result['n']} "
        f"episodes of split {result['split']}, {result['steps']} steps"
        + ("" if parent else " (training run not in this MLflow store: logged on its own)")
    )
    if "acc_k_query_transductive" in metrics:
        acc, ci = metrics["acc_k_query_transductive"], metrics["ci95_k_query_transductive"]
        print(
            f"{cfg.name}: {100 * acc:.2f} +- {100 * ci:.2f}% "
            f"(transductive BN) with {cfg.shots} query image(s) per class, as the MAML paper "
            "scores"
        )
    if alphabet is not None:
        t, s = alphabet["transductive"], alphabet["support"]
        print(
            f"{cfg.name}: within one alphabet {100 * t['acc']:.2f} +- {100 * t['ci95']:.2f}% "
            f"(transductive BN), {100 * s['acc']:.2f} +- {100 * s['ci95']:.2f}% (support BN) "
            f"on {alphabet['n']} episodes"
        )
    return metrics

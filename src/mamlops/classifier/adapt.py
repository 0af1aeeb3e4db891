"""The base-learner as a product: adapt a meta-model to a user's folder of labelled images.

Layout of a support (or query) folder: one subfolder per class, named by the label, holding that
class's images (any format and size Pillow reads; dotfiles are skipped). Images go through
``preprocess.load_image`` exactly as in training: grayscale 28x28 for an Omniglot meta-model,
RGB 84x84 for miniImageNet.

Class count: a support folder may have *at most* the meta-model's N classes. With N' < N the
first N' rows of the meta-learned head are used: during meta-training every task assigns labels
to classes in random order, so the N rows are interchangeable initialisations and any N' of them
is one the model has been trained to adapt from. More than N classes is refused: the extra rows
would need an initialisation the meta-model never learned, and a few inner steps from a fresh
random row do not make a reliable classifier; train a preset with more ways instead.

Shots: classes may have different numbers of images (the inner loop takes the mean loss over all
support images); this is allowed, recorded in the provenance and announced with
``UnequalShotsWarning`` because the meta-model was trained on balanced K-shot tasks.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mamlops.classifier.classifier import Classifier
from mamlops.data.preprocess import ImageError, read_image, to_float
from mamlops.errors import UserError
from mamlops.files import file_sha256
from mamlops.meta import maml
from mamlops.meta.checkpoint import load_theta
from mamlops.meta.keys import learned_lrs
from mamlops.meta.model import ConvNetConfig, batch_stats, forward

BATCH = 256


class AdaptInputError(UserError):
    """A support/query folder or image cannot be used; the message names it and the fix."""


class UnequalShotsWarning(UserWarning):
    """Support classes have different numbers of images (allowed, but unlike meta-training)."""


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def read_class_folders(root: str | Path, what: str = "support") -> dict[str, list[Path]]:
    """``{label: [image paths]}`` from one subfolder per class; clear errors for bad layouts."""
    root = Path(root)
    if not root.is_dir():
        raise AdaptInputError(f"{what} folder {root} does not exist or is not a folder")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise AdaptInputError(
            f"{what} folder {root} has no class subfolders; put each class's images in "
            f"{root}/<label>/ (one subfolder per class)"
        )
    out: dict[str, list[Path]] = {}
    for folder in classes:
        files = _image_files(folder)
        if not files:
            raise AdaptInputError(
                f"class folder {folder} has no images; add at least one image of class "
                f"{folder.name!r} or remove the folder"
            )
        out[folder.name] = files
    return out


def load_images(paths: Sequence[str | Path], dataset: str) -> torch.Tensor:
    """Float network input [B, C, H, W] for image files, preprocessed as in training."""
    arrays = []
    for path in paths:
        try:
            arrays.append(read_image(path, dataset))
        except ImageError as exc:
            raise AdaptInputError(f"{exc}, or remove it from the folder") from exc
    return to_float(np.stack(arrays), dataset)


@dataclass(frozen=True)
class MetaModel:
    """A meta-model (theta) read once, with the facts adaptation needs from its metadata.

    ``adapt_classifier`` takes one so that a server adapting per request reads and hashes the
    file at start-up only (reading it was half of a 5-way 1-shot adaptation's 80 ms).
    """

    path: Path
    theta: dict[str, torch.Tensor]
    train_config: dict[str, Any]
    model_cfg: ConvNetConfig
    sha256: str

    @classmethod
    def load(cls, path: str | Path) -> MetaModel:
        theta, meta = load_theta(Path(path))
        return cls(
            Path(path),
            theta,
            meta["train_config"],
            ConvNetConfig(**meta["model_config"]),
            file_sha256(Path(path)),
        )

    @property
    def dataset(self) -> str:
        return str(self.train_config["dataset"])

    @property
    def ways(self) -> int:
        return self.model_cfg.ways

    @property
    def steps(self) -> int:
        """Test-time inner steps: the default of every adaptation."""
        return int(self.train_config["test_inner_steps"])

    @property
    def lr(self) -> float:
        return float(self.train_config["inner_lr"])

    @property
    def label_smoothing(self) -> float:
        """The inner loss's label smoothing theta was meta-trained with (0 before it existed)."""
        return float(self.train_config.get("label_smoothing", 0.0))


def adapt_folder(
    support_dir: str | Path,
    meta_path: str | Path,
    *,
    steps: int | None = None,
    lr: float | None = None,
) -> Classifier:
    """Adapt the meta-model at ``meta_path`` to the classes in ``support_dir``.

    Labels are the class folder names, sorted; images are preprocessed as in training. See
    ``adapt_classifier`` for the adaptation itself.
    """
    meta = MetaModel.load(meta_path)
    classes = read_class_folders(support_dir, "support")
    labels = list(classes)
    shots = {label: len(files) for label, files in classes.items()}
    if len(set(shots.values())) > 1:
        warnings.warn(
            f"support classes have different numbers of images {shots}; the meta-model was "
            "trained on balanced tasks, so accuracy may differ from the evaluated numbers",
            UnequalShotsWarning,
            stacklevel=2,
        )
    xs = load_images([p for files in classes.values() for p in files], meta.dataset)
    ys = torch.tensor([i for i, label in enumerate(labels) for _ in classes[label]])
    return adapt_classifier(
        meta,
        xs,
        ys,
        labels,
        steps=steps,
        lr=lr,
        provenance={
            # names, not paths: a published classifier must not reveal the adapting machine's
            # folders (its metadata is served on /metadata); the sha256 identifies the model
            "support_dir": Path(support_dir).resolve().name,
            "shots_per_class": shots,
            "balanced_shots": len(set(shots.values())) == 1,
        },
    )


def adapt_classifier(
    meta: MetaModel | str | Path,
    xs: torch.Tensor,
    ys: torch.Tensor,
    labels: list[str],
    *,
    steps: int | None = None,
    lr: float | None = None,
    provenance: dict[str, Any] | None = None,
) -> Classifier:
    """Adapt the meta-model ``meta`` (or the one at that path) on support images ``xs``
    (labels ``ys`` index ``labels``) and freeze the support set's BatchNorm statistics for
    deployment.

    Runs ``steps`` inner SGD steps of size ``lr`` (default: the meta-model's ``test_inner_steps``
    and ``inner_lr``; learned MAML++ lrs win over ``lr``), so the returned classifier scores every
    image on its own.
    """
    if not isinstance(meta, MetaModel):
        meta = MetaModel.load(meta)
    meta_path, theta, model_cfg = meta.path, meta.theta, meta.model_cfg
    steps = meta.steps if steps is None else int(steps)
    lr = meta.lr if lr is None else float(lr)
    if steps < 0 or not lr > 0:
        raise AdaptInputError(f"steps must be >= 0 and lr > 0, got steps={steps}, lr={lr}")
    where = (provenance or {}).get("support_dir", "the support set")
    if len(labels) > model_cfg.ways:
        raise AdaptInputError(
            f"support folder {where} has {len(labels)} classes but the meta-model "
            f"{meta_path} is {model_cfg.ways}-way; it can adapt to at most {model_cfg.ways} "
            f"classes (its head has {model_cfg.ways} meta-learned rows). Use at most "
            f"{model_cfg.ways} class folders, or meta-train a preset with ways: {len(labels)}"
        )
    if len(labels) < 2:
        raise AdaptInputError(
            f"support folder {where} has {len(labels)} class; a classifier needs at least 2"
        )

    n_way = len(labels)
    params = dict(theta)
    params["head.weight"] = params["head.weight"][:n_way]
    params["head.bias"] = params["head.bias"][:n_way]
    cfg = dataclasses.replace(model_cfg, ways=n_way)
    # the one test-time adaptation (maml.adapt_detached), for a single task
    *_, fast = maml.adapt_detached(
        params, xs[None], ys[None], cfg, steps, lr, label_smoothing=meta.label_smoothing
    )
    fast = {k: v[0] for k, v in fast.items()}
    stats = batch_stats(fast, xs, cfg, step=steps)
    with torch.no_grad():  # fit on the support set itself: a cheap sanity number for the user
        support_acc = float(
            (forward(fast, xs, cfg, stats, step=steps).argmax(-1) == ys).float().mean()
        )
    return Classifier(
        params=fast,
        bn_stats=stats,
        model_cfg=cfg,
        labels=list(labels),
        dataset=meta.dataset,
        meta_model_sha256=meta.sha256,
        provenance={
            "meta_model": meta_path.name,
            "meta_setting": meta.train_config.get("name"),
            "meta_ways": model_cfg.ways,
            "steps": steps,
            "lr": lr,
            "learned_inner_lr": bool(learned_lrs(theta)),
            **(provenance or {}),
            "support_accuracy": support_acc,
        },
        bn_step=steps,
    )


def _probs(classifier: Classifier, paths: Sequence[str | Path]) -> torch.Tensor:
    """Class probabilities [len(paths), ways], in chunks (frozen BN: chunking changes nothing)."""
    out = []
    for i in range(0, len(paths), BATCH):
        x = load_images(paths[i : i + BATCH], classifier.dataset)
        out.append(classifier.predict_proba(x))
    return torch.cat(out)


def predict_paths(
    classifier: Classifier, paths: Sequence[str | Path], top_k: int = 1
) -> list[list[tuple[str, float]]]:
    """For each image file, in order, the ``top_k`` most likely ``(label, probability)``."""
    if not paths:
        return []
    for p in paths:
        if not Path(p).is_file():
            raise AdaptInputError(f"image {p} not found; pass paths of existing image files")
    probs = _probs(classifier, list(paths))
    k = max(1, min(int(top_k), len(classifier.labels)))
    best, idx = probs.topk(k, dim=-1)
    return [
        [(classifier.labels[int(i)], float(b)) for b, i in zip(row_b, row_i, strict=True)]
        for row_b, row_i in zip(best, idx, strict=True)
    ]


def evaluate_folder(classifier: Classifier, query_dir: str | Path) -> dict[str, Any]:
    """Accuracy of ``classifier`` on a labelled folder (same layout as the support folder).

    Returns ``{"accuracy", "n", "correct", "per_class": {label: {"n", "correct", "accuracy"}}}``.
    Every query label must be one the classifier knows.
    """
    classes = read_class_folders(query_dir, "query")
    unknown = sorted(set(classes) - set(classifier.labels))
    if unknown:
        raise AdaptInputError(
            f"query folder {query_dir} has classes {unknown} the classifier does not know "
            f"(its labels: {classifier.labels}); rename or remove those subfolders"
        )
    paths = [p for files in classes.values() for p in files]
    truth = torch.tensor([classifier.labels.index(lab) for lab, fs in classes.items() for _ in fs])
    pred = _probs(classifier, paths).argmax(-1)
    per_class = {}
    for label in classes:
        mask = truth == classifier.labels.index(label)
        n, correct = int(mask.sum()), int((pred[mask] == truth[mask]).sum())
        per_class[label] = {"n": n, "correct": correct, "accuracy": correct / n}
    correct = int((pred == truth).sum())
    return {
        "accuracy": correct / len(paths),
        "n": len(paths),
        "correct": correct,
        "per_class": per_class,
    }

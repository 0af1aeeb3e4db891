"""The adapted-classifier file: what ``mamlops adapt`` writes and everything downstream reads.

One ``.safetensors`` file holds the adapted weights, the frozen BatchNorm statistics of the
support set, and (as string metadata) the labels, network config, dataset, preprocessing, the
sha256 of the meta-model it was adapted from and free-form provenance. safetensors rather than a
pickle so that loading a file someone hands you cannot run code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mamlops import datasets
from mamlops.errors import UserError
from mamlops.files import read_safetensors, write_safetensors
from mamlops.meta.keys import bn_scale_key, bn_shift_key, conv_key, is_lr_key, is_step_bn
from mamlops.meta.model import (
    BN_EPS,
    N_BLOCKS,
    BNStats,
    ConvNetConfig,
    Params,
    forward,
    init_params,
)

FORMAT_NAME = "mamlops-classifier"
FORMAT_VERSION = "1"


class ClassifierFileError(UserError):
    """A classifier file is missing, unreadable, not ours or inconsistent (message says which)."""


def preprocessing_spec(dataset: str) -> dict[str, Any]:
    """How raw images become the float input, written next to the weights so that a served model
    can never be fed images prepared differently from the ones it was adapted on (the facts
    ``preprocess`` applies, from ``datasets/``)."""
    try:
        data = datasets.get(dataset)
    except ValueError as exc:
        raise ClassifierFileError(str(exc)) from None
    return {
        "color_mode": data.color_mode,
        "image_size": data.image_size,
        "channels": data.channels,
        "resize": "LANCZOS",
        "scale": data.scale,
        "layout": "NCHW",
        "dtype": "float32",
    }


def expected_shapes(cfg: ConvNetConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape for a config (the network's own, plus the frozen BN statistics);
    used to reject files whose weights do not fit it."""
    shapes = {k: tuple(v.shape) for k, v in init_params(cfg, torch.Generator()).items()}
    for i in range(N_BLOCKS):
        shapes[f"bn_stats.{i}.mean"] = shapes[f"bn_stats.{i}.var"] = (cfg.hidden,)
    return shapes


def serving_params(params: Params, bn_step: int | None = None) -> Params:
    """The plain network weights a classifier stores, from whatever the adapter hands over.

    Drops non-network keys (MAML++'s learned inner lrs ``lr.*``) and, for per-step BN weights
    ([steps, C]), keeps the row the final prediction uses: ``bn_step`` clamped to the last row,
    or the last row when ``bn_step`` is None (test-time adaptation runs at least as many steps
    as training did). The BN statistics passed alongside must come from that same step. A
    meta-model without BN scales (the reference code's BatchNorm) gets scales of 1, so every
    classifier file has the same tensors.
    """
    out: Params = {}
    for name, tensor in params.items():
        if is_lr_key(name):
            continue
        if is_step_bn(name, tensor):
            row = tensor.shape[0] - 1 if bn_step is None else min(bn_step, tensor.shape[0] - 1)
            tensor = tensor[row]
        out[name] = tensor
    for i in range(N_BLOCKS):
        shift = out.get(bn_shift_key(i))
        if shift is not None and bn_scale_key(i) not in out:
            out[bn_scale_key(i)] = torch.ones_like(shift)
    return out


@dataclass
class Classifier:
    """An adapted base-learner with frozen BN statistics: the product users serve."""

    params: Params
    bn_stats: BNStats
    model_cfg: ConvNetConfig
    labels: list[str]
    dataset: str
    meta_model_sha256: str
    provenance: dict[str, Any] = field(default_factory=dict)
    bn_step: int | None = None

    def __post_init__(self) -> None:
        self.params = serving_params(self.params, self.bn_step)
        if len(self.labels) != self.model_cfg.ways:
            raise ClassifierFileError(
                f"{len(self.labels)} labels for a {self.model_cfg.ways}-way network"
            )
        if len(self.bn_stats) != N_BLOCKS:
            raise ClassifierFileError(f"expected {N_BLOCKS} BN (mean, var) pairs")

    def tensors(self) -> dict[str, Tensor]:
        """Flat name -> tensor map as stored on disk (contiguous float32 copies, no autograd)."""
        out = dict(self.params)
        for i, (mean, var) in enumerate(self.bn_stats):
            out[f"bn_stats.{i}.mean"] = mean
            out[f"bn_stats.{i}.var"] = var
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}

    def metadata(self) -> dict[str, str]:
        """String metadata: safetensors only stores str -> str, so structured values are JSON."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "labels": json.dumps(self.labels),
            "model_config": json.dumps(self.model_cfg.to_dict()),
            "dataset": self.dataset,
            "meta_model_sha256": self.meta_model_sha256,
            "provenance": json.dumps(self.provenance, default=str),
            "preprocessing": json.dumps(preprocessing_spec(self.dataset)),
        }

    def save(self, path: str | Path) -> Path:
        """Write one .safetensors file atomically (temp file in the same folder, then rename),
        byte-identical for identical content."""
        return write_safetensors(path, self.tensors(), self.metadata())

    @classmethod
    def load(cls, path: str | Path) -> Classifier:
        """Read a file written by ``save``; raises ``ClassifierFileError`` with the reason."""
        path = Path(path)
        if not path.is_file():
            raise ClassifierFileError(f"{path}: classifier file not found")
        tensors, meta = read_safetensors(path, ClassifierFileError)
        if meta.get("format") != FORMAT_NAME:
            raise ClassifierFileError(f"{path}: safetensors file but not a mamlops classifier")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ClassifierFileError(
                f"{path}: classifier format version {meta.get('format_version')!r}, "
                f"this mamlops reads {FORMAT_VERSION!r}"
            )
        try:
            cfg = ConvNetConfig(**json.loads(meta["model_config"]))
            labels = [str(x) for x in json.loads(meta["labels"])]
            provenance = json.loads(meta.get("provenance", "{}"))
            dataset, sha = meta["dataset"], meta["meta_model_sha256"]
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ClassifierFileError(f"{path}: corrupt classifier metadata ({exc})") from exc
        want = expected_shapes(cfg)
        missing = sorted(set(want) - set(tensors))
        extra = sorted(set(tensors) - set(want))
        if missing or extra:
            raise ClassifierFileError(f"{path}: tensors missing {missing}, unexpected {extra}")
        for name, shape in want.items():
            if tuple(tensors[name].shape) != shape:
                raise ClassifierFileError(
                    f"{path}: {name} has shape {tuple(tensors[name].shape)}, "
                    f"config {cfg.to_dict()} needs {shape}"
                )
        params = {k: v for k, v in tensors.items() if not k.startswith("bn_stats.")}
        stats = [
            (tensors[f"bn_stats.{i}.mean"], tensors[f"bn_stats.{i}.var"]) for i in range(N_BLOCKS)
        ]
        return cls(params, stats, cfg, labels, dataset, sha, provenance)

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        """Logits with the frozen support-set statistics, so each image is scored on its own."""
        return forward(self.params, x, self.model_cfg, self.bn_stats)

    @torch.no_grad()
    def predict_proba(self, x: Tensor) -> Tensor:
        """Class probabilities [B, ways] for float images [B, C, H, W] (already preprocessed)."""
        return torch.softmax(self.logits(x), dim=-1)

    def folded(self) -> dict[str, Tensor]:
        """Conv weights and biases with frozen BN folded in, plus the head: the serving weights.

        BN(conv(x)) = gamma * (w*x - mean) / sqrt(var + eps) + beta, which is a conv with
        w' = w * s and b' = beta - mean * s, where s = gamma / sqrt(var + eps).
        """
        out: dict[str, Tensor] = {}
        for i, (mean, var) in enumerate(self.bn_stats):
            scale = self.params[bn_scale_key(i)] / torch.sqrt(var + BN_EPS)
            out[conv_key(i)] = self.params[conv_key(i)] * scale[:, None, None, None]
            out[f"conv{i}.bias"] = self.params[bn_shift_key(i)] - mean * scale
        out["head.weight"] = self.params["head.weight"]
        out["head.bias"] = self.params["head.bias"]
        return {k: v.detach().to(torch.float32).clone() for k, v in out.items()}

"""Export an adapted classifier to a single self-describing ONNX file.

The exported graph is the inference-only network with BatchNorm folded into the convolutions
(frozen support-set statistics), so it has no BatchNormalization node at all: nothing depends
on the rest of the batch, and onnxruntime providers that reject training-mode BN still run it.

Output: one tensor ``probabilities`` [batch, ways] (softmax). A single output keeps MLflow's
pyfunc response and the HTTP API simple; logits are ``log(p)`` up to a per-row constant.
Input: ``x`` float32 [batch, C, H, W], preprocessed as the ``normalisation`` metadata says.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamlops.classifier import Classifier, preprocessing_spec
from mamlops.files import atomic_write
from mamlops.model import N_BLOCKS, ConvNetConfig

DEFAULT_OPSET = 20  # the dynamo exporter's native opset: no version conversion pass needed
INPUT_NAME = "x"
OUTPUT_NAME = "probabilities"


def mamlops_version() -> str:
    """Installed package version, recorded so a served file says which code produced it."""
    try:
        return importlib.metadata.version("mamlops")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class FoldedNet(nn.Module):
    """conv(+folded BN bias) -> ReLU (-> max-pool) x4, mean/flatten, linear, softmax."""

    def __init__(self, weights: dict[str, Tensor], cfg: ConvNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        for name, tensor in weights.items():
            self.register_buffer(name.replace(".", "_"), tensor.detach().clone())

    def logits(self, x: Tensor) -> Tensor:
        h = x
        for i in range(N_BLOCKS):
            w, b = getattr(self, f"conv{i}_weight"), getattr(self, f"conv{i}_bias")
            h = F.relu(F.conv2d(h, w, b, stride=self.cfg.stride, padding=1))
            if self.cfg.max_pool:
                h = F.max_pool2d(h, 2)
        feats = h.flatten(1) if self.cfg.max_pool else h.mean(dim=(2, 3))
        return F.linear(feats, self.head_weight, self.head_bias)

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.logits(x), dim=-1)


def folded_module(classifier: Classifier) -> FoldedNet:
    """The eval-only module the ONNX file is traced from (also handy for parity checks)."""
    return FoldedNet(classifier.folded(), classifier.model_cfg).eval()


def onnx_metadata(classifier: Classifier, opset: int) -> dict[str, str]:
    """Everything a client needs to feed the model and trust its answer, as string props."""
    cfg = classifier.model_cfg
    return {
        "labels": json.dumps(classifier.labels),
        "dataset": classifier.dataset,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_size": str(cfg.image_size),
        "channels": str(cfg.in_channels),
        "normalisation": json.dumps(preprocessing_spec(classifier.dataset)),
        "meta_model_sha256": classifier.meta_model_sha256,
        "params": json.dumps(classifier.provenance, default=str),
        "model_config": json.dumps(cfg.to_dict()),
        "mamlops_version": mamlops_version(),
        "opset": str(opset),
    }


def export_onnx(classifier: Classifier, out_path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``classifier`` as one ONNX file (no external data) with a dynamic batch dimension.

    Traced with a batch of 2: a batch of 1 lets the exporter specialise the batch size.
    """
    cfg = classifier.model_cfg
    module = folded_module(classifier)
    sample = torch.rand(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        module,
        (sample,),
        dynamo=True,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes={"x": {0: batch}},
        external_data=False,
        verbose=False,
    )
    proto = program.model_proto
    del proto.metadata_props[:]
    for key, value in onnx_metadata(classifier, opset).items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"mamlops {classifier.model_cfg.ways}-way {classifier.dataset} classifier"
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    return atomic_write(out_path, lambda tmp: Path(tmp).write_bytes(data))

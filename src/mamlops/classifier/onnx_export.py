"""Write an adapted classifier as a single self-describing ONNX file.

The exported graph is the inference-only network with BatchNorm folded into the convolutions
(frozen support-set statistics), so it has no BatchNormalization node at all: nothing depends
on the rest of the batch, and onnxruntime providers that reject training-mode BN still run it.
It is written directly with ``onnx.helper`` (``onnx_model``), not traced from PyTorch: about a
millisecond instead of a second, which is what lets the server teach a classifier per request.
This module is only the writer, so the export stage (``export``) and teaching (``teach``)
share it without teaching importing the stage's data and tracking code.

Output: one tensor ``probabilities`` [batch, ways] (softmax). A single output keeps MLflow's
pyfunc response and the HTTP API simple; logits are ``log(p)`` up to a per-row constant.
Input: ``x`` float32 [batch, C, H, W], preprocessed as the ``normalisation`` metadata says.

Example::

    export_onnx(Classifier.load("omni.safetensors"), "omni.onnx")
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mamlops.classifier.classifier import Classifier, preprocessing_spec
from mamlops.config import DEFAULT_OPSET, MIN_OPSET
from mamlops.errors import UserError
from mamlops.files import atomic_write
from mamlops.meta.model import N_BLOCKS

INPUT_NAME = "x"
OUTPUT_NAME = "probabilities"


def mamlops_version() -> str:
    """Installed package version, recorded so a served file says which code produced it."""
    try:
        return importlib.metadata.version("mamlops")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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


def onnx_model(classifier: Classifier, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The folded network (``model.forward_folded``) written node by node with ``onnx.helper``.

    Why not ``torch.onnx.export``: its dynamo tracer took 0.9-1.4 s per classifier (14 s for
    the first in a process), while this takes about a millisecond, and teaching a classifier
    over HTTP must answer in well under 100 ms. The graph is small and fixed: per block a Conv
    (stride ``cfg.stride``, padding 1, BN folded into weight and bias), Relu and, for
    miniImageNet, a 2x2 MaxPool; then the spatial mean (GlobalAveragePool) or a flatten, a
    Gemm with the head, and Softmax. ``tests/test_export.py`` checks it against PyTorch's
    ``forward`` on random weights and real drawings. Identical weights give identical bytes.
    """
    if opset < MIN_OPSET:
        raise UserError(
            f"ONNX opset {opset} is not supported: mamlops writes opset {MIN_OPSET} or later "
            f"(default {DEFAULT_OPSET}); onnxruntime 1.16+ runs them"
        )
    cfg = classifier.model_cfg
    weights = {k: v.numpy() for k, v in classifier.folded().items()}
    init = [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in weights.items()]
    nodes, h = [], INPUT_NAME
    for i in range(N_BLOCKS):
        conv = f"block{i}.conv"
        nodes.append(
            helper.make_node(
                "Conv",
                [h, f"conv{i}.weight", f"conv{i}.bias"],
                [conv],
                kernel_shape=[3, 3],
                strides=[cfg.stride, cfg.stride],
                pads=[1, 1, 1, 1],
            )
        )
        h = f"block{i}.relu"
        nodes.append(helper.make_node("Relu", [conv], [h]))
        if cfg.max_pool:
            nodes.append(
                helper.make_node(
                    "MaxPool", [h], [f"block{i}.pool"], kernel_shape=[2, 2], strides=[2, 2]
                )
            )
            h = f"block{i}.pool"
    if not cfg.max_pool:  # the spatial mean, as _head: [N, C, h, w] -> [N, C, 1, 1]
        nodes.append(helper.make_node("GlobalAveragePool", [h], ["pooled"]))
        h = "pooled"
    nodes += [
        helper.make_node("Flatten", [h], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "head.weight", "head.bias"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], axis=-1),
    ]
    shape = ["batch", cfg.in_channels, cfg.image_size, cfg.image_size]
    graph = helper.make_graph(
        nodes,
        "mamlops_classifier",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", cfg.ways])],
        init,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="mamlops",
        producer_version=mamlops_version(),
        doc_string=f"mamlops {cfg.ways}-way {classifier.dataset} classifier",
    )
    # the IR version onnxruntime 1.16+ reads for these opsets (make_model writes the newest)
    model.ir_version = min(model.ir_version, 9 if opset <= 20 else 10)
    for key, value in onnx_metadata(classifier, opset).items():
        model.metadata_props.add(key=key, value=value)
    return model


def onnx_bytes(classifier: Classifier, opset: int = DEFAULT_OPSET) -> bytes:
    """``onnx_model``, checked by ONNX's own checker and serialised."""
    model = onnx_model(classifier, opset)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def export_onnx(classifier: Classifier, out_path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``classifier`` as one ONNX file (weights inside, dynamic batch dimension),
    atomically: a temporary file in the same folder, then a rename."""
    data = onnx_bytes(classifier, opset)
    return atomic_write(out_path, lambda tmp: Path(tmp).write_bytes(data))

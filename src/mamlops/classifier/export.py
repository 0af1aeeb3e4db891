"""Export an adapted classifier to a single self-describing ONNX file; the ``export`` stage.

The exported graph is the inference-only network with BatchNorm folded into the convolutions
(frozen support-set statistics), so it has no BatchNormalization node at all: nothing depends
on the rest of the batch, and onnxruntime providers that reject training-mode BN still run it.
It is written directly with ``onnx.helper`` (``onnx_model``), not traced from PyTorch: about a
millisecond instead of a second, which is what lets the server teach a classifier per request.

Output: one tensor ``probabilities`` [batch, ways] (softmax). A single output keeps MLflow's
pyfunc response and the HTTP API simple; logits are ``log(p)`` up to a per-row constant.
Input: ``x`` float32 [batch, C, H, W], preprocessed as the ``normalisation`` metadata says.

``export_stage`` is the DVC stage ``export@<setting>``: adapt theta on a fixed demo task (the
support set of one fixed test episode), export it, check onnxruntime against PyTorch on that
episode's query images, and register it in MLflow (``registry.register_if_best``).
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mamlops import tracking
from mamlops.classifier.adapt import adapt_classifier
from mamlops.classifier.classifier import Classifier, preprocessing_spec
from mamlops.classifier.onnx_predict import OnnxClassifier
from mamlops.config import DEFAULT_OPSET, MIN_OPSET, ExportConfig, TrainConfig
from mamlops.data.episodes import episode_tasks, load_episodes
from mamlops.data.prepare import read_classes
from mamlops.data.splits import decode_class, read_splits
from mamlops.errors import UserError
from mamlops.files import atomic_write, write_json
from mamlops.meta.checkpoint import theta_file
from mamlops.meta.model import N_BLOCKS

INPUT_NAME = "x"
OUTPUT_NAME = "probabilities"
PARITY_ATOL = 1e-5  # onnxruntime vs PyTorch, probabilities in float32


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


def class_labels(prepared: Path, class_ids: np.ndarray, scheme: str | None = None) -> list[str]:
    """Readable labels for class ids: ``Alphabet/characterNN`` plus the rotation, if any."""
    rows = read_classes(prepared)
    rotations = bool(read_splits(prepared, scheme).get("rotations", False))
    labels = []
    for cid in class_ids.tolist():
        item, k = decode_class(int(cid), rotations)
        row = rows[int(item)]
        name = "/".join(row[c] for c in ("alphabet", "character") if c in row) or str(item)
        labels.append(f"{name}/rot{90 * int(k):03d}" if rotations else name)
    return labels


def export_stage(
    cfg: TrainConfig,
    ex: ExportConfig,
    prepared_dir: Path,
    model_dir: Path,
    eval_metrics: Path,
    metrics_path: Path,
) -> dict[str, Any]:
    """The stage ``export@<setting>``: writes ``model_dir/classifier.safetensors`` and
    ``model_dir/model.onnx`` and the metrics JSON (demo accuracy, ONNX-vs-PyTorch parity), in
    an MLflow run nested under the training run, which also registers the model."""
    from mamlops.classifier.registry import register_if_best  # MLflow: imported only for this stage

    model_dir = Path(model_dir)
    theta_path = theta_file(model_dir, ex.checkpoint)
    with tracking.start_run(
        f"export@{cfg.name}",
        {"setting": cfg.name, **{f"export.{k}": v for k, v in ex.to_dict().items()}},
        run_name=f"export {cfg.name}",
        parent_run_id=tracking.find_training_run(theta_path, ex.checkpoint),
        description=f"{cfg.name}: the demo classifier (test episode {ex.demo_episode}) as ONNX",
        tags={"mamlops.setting": cfg.name},
        system_metrics=False,
    ):
        episodes = load_episodes(prepared_dir, "test", cfg.ways, cfg.shots, cfg.split)
        ex.check_demo_episode(len(episodes))
        e = ex.demo_episode
        tasks = episode_tasks(prepared_dir, episodes, e, e + 1)
        clf = adapt_classifier(
            theta_path,
            tasks.xs[0],
            tasks.ys[0],
            class_labels(prepared_dir, episodes.classes[e], episodes.scheme),
            provenance={"demo_task": f"test episode {e} of {prepared_dir}", "setting": cfg.name},
        )
        clf.save(model_dir / "classifier.safetensors")
        onnx_path = export_onnx(clf, model_dir / "model.onnx", ex.opset)

        # parity and accuracy on the demo episode's query images, one image at a time in ONNX
        ort_model = OnnxClassifier(onnx_path)
        xq = tasks.xq[0]
        ort_probs = np.concatenate([ort_model.predict_array(x[None].numpy()) for x in xq])
        torch_probs = clf.predict_proba(xq).numpy()
        max_diff = float(np.abs(ort_probs - torch_probs).max())
        if max_diff > PARITY_ATOL:
            raise RuntimeError(
                f"onnxruntime differs from PyTorch by {max_diff:.2e} > {PARITY_ATOL}"
            )
        yq = tasks.yq[0].numpy()
        metrics: dict[str, float] = {
            "demo_acc_onnx": float((ort_probs.argmax(1) == yq).mean()),
            # in millionths: DVC shows 5 decimals, and 1e-7 would read 0.0
            "parity_ppm": round(max_diff * 1e6, 4),
        }
        write_json(metrics_path, metrics)
        extra = {  # MLflow only: not compared across DVC experiments
            "demo_acc_torch": float((torch_probs.argmax(1) == yq).mean()),
            "onnx_bytes": onnx_path.stat().st_size,
        }
        tracking.log_metrics({f"export/{k}": v for k, v in {**metrics, **extra}.items()})
        registry = ""
        if ex.register:
            eval_acc = (
                json.loads(eval_metrics.read_text())["acc_support"]
                if eval_metrics.is_file()
                else None
            )
            reg = register_if_best(onnx_path, f"mamlops-{cfg.name}", ex.alias, eval_acc)
            tracking.set_tags({f"mamlops.classifier.registry.{k}": str(v) for k, v in reg.items()})
            registry = (
                f", registered {reg['model']} version {reg['version']}"
                f" (@{reg['alias']} on version {reg['alias_on']})"
            )
    print(
        f"{cfg.name}: {onnx_path} ({onnx_path.stat().st_size} bytes), demo query accuracy "
        f"{100 * metrics['demo_acc_onnx']:.1f}%, max |ORT - torch| {max_diff:.1e}{registry}"
    )
    return metrics

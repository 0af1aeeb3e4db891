"""Export an adapted classifier to a single self-describing ONNX file; the ``export`` stage.

The exported graph is the inference-only network with BatchNorm folded into the convolutions
(frozen support-set statistics), so it has no BatchNormalization node at all: nothing depends
on the rest of the batch, and onnxruntime providers that reject training-mode BN still run it.

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
import torch
from torch import Tensor, nn

from mamlops import tracking
from mamlops.adapt import adapt_classifier
from mamlops.checkpoint import theta_file
from mamlops.classifier import Classifier, preprocessing_spec
from mamlops.config import DEFAULT_OPSET, MIN_OPSET, ExportConfig, TrainConfig
from mamlops.episodes import episode_tasks, load_episodes
from mamlops.errors import UserError
from mamlops.files import atomic_write, write_json
from mamlops.model import ConvNetConfig, forward_folded
from mamlops.onnx_predict import OnnxClassifier
from mamlops.prepare import read_classes
from mamlops.splits import decode_class, read_splits

INPUT_NAME = "x"
OUTPUT_NAME = "probabilities"
PARITY_ATOL = 1e-5  # onnxruntime vs PyTorch, probabilities in float32


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
        self.names = list(weights)
        for name, tensor in weights.items():
            self.register_buffer(name.replace(".", "_"), tensor.detach().clone())

    def logits(self, x: Tensor) -> Tensor:
        weights = {name: getattr(self, name.replace(".", "_")) for name in self.names}
        return forward_folded(weights, x, self.cfg)

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

    Traced with a batch of 2: a batch of 1 lets the exporter specialise the batch size. The
    ``opset`` metadata is the one the file has, read back from the graph.
    """
    if opset < MIN_OPSET:
        raise UserError(
            f"ONNX opset {opset} is not supported: the exporter writes opset {MIN_OPSET} or "
            f"later (default {DEFAULT_OPSET}); onnxruntime 1.16+ runs them"
        )
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
    written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    del proto.metadata_props[:]
    for key, value in onnx_metadata(classifier, written).items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"mamlops {classifier.model_cfg.ways}-way {classifier.dataset} classifier"
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    return atomic_write(out_path, lambda tmp: Path(tmp).write_bytes(data))


def class_labels(prepared: Path, class_ids: np.ndarray) -> list[str]:
    """Readable labels for class ids: ``Alphabet/characterNN`` plus the rotation, if any."""
    rows = read_classes(prepared)
    rotations = bool(read_splits(prepared).get("rotations", False))
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
    from mamlops.registry import register_if_best  # MLflow: imported only for this stage

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
        episodes = load_episodes(prepared_dir, "test", cfg.ways, cfg.shots)
        ex.check_demo_episode(len(episodes))
        e = ex.demo_episode
        tasks = episode_tasks(prepared_dir, episodes, e, e + 1)
        clf = adapt_classifier(
            theta_path,
            tasks.xs[0],
            tasks.ys[0],
            class_labels(prepared_dir, episodes.classes[e]),
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
            tracking.set_tags({f"mamlops.registry.{k}": str(v) for k, v in reg.items()})
            registry = (
                f", registered {reg['model']} version {reg['version']}"
                f" (@{reg['alias']} on version {reg['alias_on']})"
            )
    print(
        f"{cfg.name}: {onnx_path} ({onnx_path.stat().st_size} bytes), demo query accuracy "
        f"{100 * metrics['demo_acc_onnx']:.1f}%, max |ORT - torch| {max_diff:.1e}{registry}"
    )
    return metrics

"""The DVC stage ``export@<setting>``: a deployable ONNX classifier from a trained meta-model.

``export_stage`` adapts theta on a fixed demo task (the support set of one fixed test
episode), writes it as ONNX (``onnx_export``), checks onnxruntime against PyTorch on that
episode's query images, and registers it in MLflow (``registry.register_if_best``). The ONNX
writer itself lives apart, in ``onnx_export``: teaching a classifier over HTTP needs the
writer, not this stage's episodes, splits and tracking.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mamlops import tracking
from mamlops.classifier.adapt import adapt_classifier
from mamlops.classifier.onnx_export import export_onnx
from mamlops.classifier.onnx_predict import OnnxClassifier
from mamlops.config import ExportConfig, TrainConfig
from mamlops.data.episodes import episode_tasks, load_episodes
from mamlops.data.prepare import read_classes
from mamlops.data.splits import decode_class, read_splits
from mamlops.files import write_json
from mamlops.meta.checkpoint import theta_file

PARITY_ATOL = 1e-5  # onnxruntime vs PyTorch, probabilities in float32


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

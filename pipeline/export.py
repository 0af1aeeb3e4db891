"""DVC stage `export@<setting>`: a deployable ONNX classifier from the trained meta-model.

Adapts theta on a fixed demo task (the support set of one of the fixed test episodes), saves the
adapted classifier, exports it to ONNX with BatchNorm folded, checks onnxruntime against PyTorch
on that episode's query images, and (with `export.register`) logs it to MLflow's model registry
as `mamlops-<setting>`, moving the alias to it only when its evaluated accuracy is the best yet.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mamlops import params as P
from mamlops import tracking
from mamlops.adapt import adapt_classifier
from mamlops.episodes import episode_tasks, load_episodes
from mamlops.export import export_onnx
from mamlops.files import write_json
from mamlops.onnx_predict import OnnxClassifier
from mamlops.prepare import read_classes
from mamlops.splits import decode_class, read_splits
from mamlops.train import TrainConfig, theta_file

PARITY_ATOL = 1e-5  # probabilities, float32


def export_params(params: dict[str, Any]) -> dict[str, Any]:
    sec = P.section(params, "export")
    checkpoint = sec.get("checkpoint", "best")
    theta_file(Path("models"), checkpoint, "export.checkpoint")  # checks the value
    out = {
        "checkpoint": checkpoint,
        "demo_episode": P.require(sec, "demo_episode", int, "export"),
        "opset": P.require(sec, "opset", int, "export"),
        "register": P.require(sec, "register", bool, "export"),
        "alias": P.require(sec, "alias", str, "export"),
    }
    if out["demo_episode"] < 0:
        raise P.ParamsError("params.yaml: export.demo_episode must be >= 0")
    return out


def class_labels(prepared: Path, class_ids: np.ndarray) -> list[str]:
    """Readable labels for class ids: `Alphabet/characterNN` plus the rotation, if any."""
    rows = read_classes(prepared)
    rotations = bool(read_splits(prepared).get("rotations", False))
    labels = []
    for cid in class_ids.tolist():
        item, k = decode_class(int(cid), rotations)
        row = rows[int(item)]
        name = "/".join(row[c] for c in ("alphabet", "character") if c in row) or str(item)
        labels.append(f"{name}/rot{90 * int(k):03d}" if rotations else name)
    return labels


def register_if_best(onnx_path: Path, setting: str, alias: str, eval_acc: float | None) -> dict:
    """Register a new version; point `alias` at it if no version with the alias beats it."""
    from mlflow import MlflowClient

    from mamlops.registry import log_and_register

    name = f"mamlops-{setting}"
    uri = tracking.tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    previous = None
    try:
        champion = client.get_model_version_by_alias(name, alias)
        previous = (champion.version, float(champion.tags.get("eval_acc_support", "nan")))
    except Exception:  # no registered model or no alias yet: the new version takes it
        previous = None
    id_file = Path("models") / setting / "mlflow_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    version = log_and_register(onnx_path, name, None, tracking_uri=uri, run_id=run_id)
    if eval_acc is not None:
        client.set_model_version_tag(name, version.version, "eval_acc_support", str(eval_acc))
    better_before = (
        previous is not None
        and eval_acc is not None
        and not np.isnan(previous[1])
        and previous[1] > eval_acc
    )
    holder = previous[0] if better_before else version.version
    client.set_registered_model_alias(name, alias, holder)
    return {"model": name, "version": int(version.version), "alias": alias, "alias_on": int(holder)}


def main(setting: str) -> None:
    params = P.load()
    cfg = TrainConfig.from_params(params, setting)
    ex = export_params(params)
    prepared = Path("data/prepared") / cfg.dataset
    out_dir = Path("models") / setting
    theta_path = theta_file(out_dir, ex["checkpoint"], "export.checkpoint")

    episodes = load_episodes(prepared, "test", cfg.ways, cfg.shots)
    if ex["demo_episode"] >= len(episodes):
        raise P.ParamsError(
            f"params.yaml: export.demo_episode = {ex['demo_episode']} but only "
            f"{len(episodes)} test episodes exist"
        )
    e = ex["demo_episode"]
    tasks = episode_tasks(prepared, episodes, e, e + 1)
    labels = class_labels(prepared, episodes.classes[e])
    clf = adapt_classifier(
        theta_path,
        tasks.xs[0],
        tasks.ys[0],
        labels,
        provenance={"demo_task": f"test episode {e} of {prepared}", "setting": setting},
    )
    clf.save(out_dir / "classifier.safetensors")
    onnx_path = export_onnx(clf, out_dir / "model.onnx", ex["opset"])

    # parity and accuracy on the demo episode's query images, one image at a time in ONNX
    ort_model = OnnxClassifier(onnx_path)
    xq = tasks.xq[0]
    ort_probs = np.concatenate([ort_model.predict_array(x[None].numpy()) for x in xq])
    with torch.no_grad():
        torch_probs = clf.predict_proba(xq).numpy()
    max_diff = float(np.abs(ort_probs - torch_probs).max())
    if max_diff > PARITY_ATOL:
        raise RuntimeError(f"onnxruntime differs from PyTorch by {max_diff:.2e} > {PARITY_ATOL}")
    yq = tasks.yq[0].numpy()
    eval_file = Path("metrics/eval") / f"{setting}.json"
    eval_acc = json.loads(eval_file.read_text())["acc_support"] if eval_file.is_file() else None
    metrics: dict[str, Any] = {
        "parity_max_abs_diff": max_diff,
        "demo_query_acc_onnx": float((ort_probs.argmax(1) == yq).mean()),
        "demo_query_acc_torch": float((torch_probs.argmax(1) == yq).mean()),
        "opset": ex["opset"],
        "onnx_bytes": onnx_path.stat().st_size,
    }
    if ex["register"]:
        metrics["registry"] = register_if_best(onnx_path, setting, ex["alias"], eval_acc)
    write_json(Path("metrics/export") / f"{setting}.json", metrics)
    print(
        f"{setting}: {onnx_path} ({metrics['onnx_bytes']} bytes), demo query accuracy "
        f"{100 * metrics['demo_query_acc_onnx']:.1f}%, max |ORT - torch| {max_diff:.1e}"
        + (f", registry {metrics['registry']}" if "registry" in metrics else "")
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python pipeline/export.py SETTING   (a key of train.settings)")
    main(sys.argv[1])

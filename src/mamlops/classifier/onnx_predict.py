"""Inference from an exported ONNX classifier with onnxruntime and numpy only.

Deliberately free of torch (directly and through imports): a serving image then needs neither
the 1 GB wheel nor its start-up time. Everything needed to prepare inputs is read from the ONNX
file's metadata, so the file alone is enough to serve it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from mamlops import datasets
from mamlops.data import preprocess
from mamlops.errors import UserError

Prediction = dict[str, Any]


class OnnxModelError(UserError):
    """An ONNX file that cannot be served: missing, unreadable, or lacking mamlops metadata."""


class OnnxClassifier:
    """One onnxruntime session plus the labels and input spec from the file's metadata.

    ``session.run`` is thread-safe, so one instance can serve concurrent requests.
    """

    def __init__(self, path: str | Path, intra_op_threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxModelError(f"{self.path}: ONNX model file not found")
        data = self.path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        options = ort.SessionOptions()
        options.log_severity_level = 4  # a bad file is our one-line error, not ORT's log too
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        try:
            self.session = ort.InferenceSession(
                data, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            why = " ".join(str(exc).split())  # ORT's messages span lines
            raise OnnxModelError(f"{self.path}: not a loadable ONNX model ({why})") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.labels: list[str] = list(json.loads(meta["labels"]))
            self.dataset: str = meta["dataset"]
            self.image_size = int(meta["input_size"])
            self.channels = int(meta["channels"])
            self.normalisation: dict[str, Any] = json.loads(meta["normalisation"])
            self.params: dict[str, Any] = json.loads(meta.get("params", "{}"))
        except (KeyError, ValueError, TypeError) as exc:
            raise OnnxModelError(f"{self.path}: missing or bad mamlops metadata ({exc})") from exc
        self.raw_metadata = dict(meta)
        self._check()
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def _check(self) -> None:
        """Refuse at load, with the reason, what would otherwise fail on every request: bad
        metadata values, or a graph whose input/output do not match its own metadata (another
        model carrying mamlops metadata). One inference on a blank image proves the graph."""

        def bad(why: str) -> OnnxModelError:
            return OnnxModelError(f"{self.path}: not a mamlops classifier: {why}")

        labels = self.labels
        if (
            not labels
            or not all(isinstance(x, str) for x in labels)
            or len(set(labels)) < len(labels)
        ):
            raise bad("'labels' metadata must be a non-empty list of distinct strings")
        if not isinstance(self.params, dict) or not isinstance(self.normalisation, dict):
            raise bad("'params' and 'normalisation' metadata must be JSON objects")
        if self.dataset not in datasets.NAMES:
            raise bad(f"unknown dataset {self.dataset!r} in its metadata")
        if not (0 < self.channels <= 4 and 0 < self.image_size <= 1024):
            raise bad(f"input {self.channels}x{self.image_size}x{self.image_size} out of range")
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1 or inputs[0].type != "tensor(float)":
            raise bad("the graph must take one float tensor and give one output")
        x = np.zeros((1, self.channels, self.image_size, self.image_size), np.float32)
        try:
            (probs,) = self.session.run(None, {inputs[0].name: x})
        except Exception as exc:  # onnxruntime's own error types
            raise bad(f"the graph does not take its metadata's input shape ({exc})") from exc
        if probs.shape != (1, len(labels)) or not np.all(np.isfinite(probs)):
            raise bad(f"the graph gives {probs.shape} for one image, expected (1, {len(labels)})")

    @property
    def name(self) -> str:
        return self.path.stem

    def metadata(self) -> dict[str, Any]:
        """Labels, input spec and hashes: what ``/metadata`` returns."""
        meta = self.raw_metadata
        return {
            "name": self.name,
            "labels": self.labels,
            "dataset": self.dataset,
            "input": {
                "name": self.input_name,
                "shape": ["batch", self.channels, self.image_size, self.image_size],
                "dtype": "float32",
                "normalisation": self.normalisation,
            },
            "output": {"name": self.output_name, "shape": ["batch", len(self.labels)]},
            "model_sha256": self.sha256,
            "meta_model_sha256": meta.get("meta_model_sha256"),
            "params": self.params,
            "mamlops_version": meta.get("mamlops_version"),
            "opset": meta.get("opset"),
        }

    def preprocess(self, images: Sequence[Any]) -> np.ndarray:
        """Paths / PIL images -> float32 [N, C, H, W] with the dataset's own preprocessing."""
        return self.to_input(np.stack([preprocess.read_image(im, self.dataset) for im in images]))

    def to_input(self, images: np.ndarray) -> np.ndarray:
        """``uint8`` images as ``preprocess.read_image`` gives them, stacked -> float32 input."""
        x = preprocess.to_float_numpy(images, self.dataset)
        shape = (len(images), self.channels, self.image_size, self.image_size)
        return np.ascontiguousarray(x, dtype=np.float32).reshape(shape)

    def predict_array(self, x: np.ndarray) -> np.ndarray:
        """Probabilities [N, ways] for preprocessed float32 input [N, C, H, W]."""
        want = (self.channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"expected input [N, {want[0]}, {want[1]}, {want[2]}], got {x.shape}")
        feed = {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}
        return self.session.run([self.output_name], feed)[0]

    def describe(self, probs: np.ndarray, top_k: int = 5) -> list[Prediction]:
        """Per row: best label, its probability, all probabilities by label, and the top k."""
        k = max(1, min(int(top_k), len(self.labels)))
        out: list[Prediction] = []
        for row in probs:
            order = np.argsort(-row, kind="stable")
            out.append(
                {
                    "label": self.labels[int(order[0])],
                    "probability": float(row[order[0]]),
                    "probabilities": dict(zip(self.labels, map(float, row), strict=True)),
                    "top_k": [
                        {"label": self.labels[int(j)], "probability": float(row[j])}
                        for j in order[:k]
                    ],
                }
            )
        return out

    def predict_images(self, images: Sequence[Any], top_k: int = 5) -> list[Prediction]:
        """Classify image files or PIL images; one dict per image, in input order."""
        if not images:
            return []
        return self.describe(self.predict_array(self.preprocess(images)), top_k)

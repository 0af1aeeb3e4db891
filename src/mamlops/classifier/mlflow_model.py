"""The registered model's pyfunc: an exported ONNX classifier that answers with labels.

Logged as MLflow "models from code": this file is copied into the model and run by
``mlflow.pyfunc.load_model`` / ``mlflow models serve``, so it imports nothing from mamlops and
needs only mlflow, onnxruntime, numpy and pandas. The ONNX file (artifact ``onnx``) carries its
class labels in its metadata, and onnxruntime runs it on the CPU provider only (listing CUDA
first made every CPU load warn).

Input: a float32 tensor named ``x``, [batch, channels, height, width], preprocessed as
``mamlops predict`` does. Output: one row per image, with ``label``, ``probability`` and one
``p:<label>`` column per class, so a JSON answer reads
``{"predictions": [{"label": "...", "probability": 0.97, "p:...": ...}, ...]}``.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd


class OnnxLabelClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import onnxruntime as ort

        path = context.artifacts["onnx"]
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.labels = [str(label) for label in json.loads(meta["labels"])]
        self.input = self.session.get_inputs()[0].name

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        x = model_input[self.input] if isinstance(model_input, dict) else model_input
        x = np.asarray(x, dtype=np.float32)
        probs = self.session.run(None, {self.input: x})[0]
        best = probs.argmax(axis=1)
        frame = pd.DataFrame(
            {
                "label": [self.labels[i] for i in best],
                "probability": probs[np.arange(len(best)), best].astype(np.float64),
            }
        )
        for j, label in enumerate(self.labels):
            frame[f"p:{label}"] = probs[:, j].astype(np.float64)
        return frame


mlflow.models.set_model(OnnxLabelClassifier())

"""DVC stage ``export@<setting>``: a deployable ONNX classifier adapted on a fixed demo task,
checked against PyTorch and registered in MLflow.

    python pipeline/export.py SETTING PREPARED MODEL_DIR EVAL_METRICS METRICS
    (dvc.yaml: data/prepared/<dataset>, models/<setting>, metrics/eval/<setting>.json,
    metrics/export/<setting>.json)
"""

from pathlib import Path

from mamlops.classifier.export import export_stage
from mamlops.config import ExportConfig, TrainConfig
from mamlops.errors import reported, stage_args
from mamlops.params import load_params

if __name__ == "__main__":
    setting, *paths = stage_args("SETTING", "PREPARED", "MODEL_DIR", "EVAL_METRICS", "METRICS")
    with reported("export"):
        params = load_params()
        cfg, ex = TrainConfig.from_params(params, setting), ExportConfig.from_params(params)
        export_stage(cfg, ex, *map(Path, paths))

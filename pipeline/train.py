"""DVC stage ``train@<setting>``: meta-train one preset (presets.yaml), tracked in MLflow.

python pipeline/train.py SETTING PREPARED MODEL_DIR CHECKPOINT_DIR METRICS TRAIN_TSV VAL_TSV
CURVES_PNG (dvc.yaml: data/prepared/<dataset>, models/<setting>, checkpoints/<setting>,
metrics/train/<setting>.json, plots/{train,val}/<setting>.tsv, plots/curves/<setting>.png)
"""

from pathlib import Path

from mamlops.config import TrainConfig
from mamlops.errors import reported, stage_args
from mamlops.malloc import keep_freed_memory
from mamlops.meta.train_stage import train_stage
from mamlops.params import load_params

if __name__ == "__main__":
    setting, *paths = stage_args(
        "SETTING",
        "PREPARED",
        "MODEL_DIR",
        "CHECKPOINT_DIR",
        "METRICS",
        "TRAIN_TSV",
        "VAL_TSV",
        "CURVES_PNG",
    )
    keep_freed_memory()  # process-wide, no effect on results (malloc.py)
    with reported("train"):
        train_stage(TrainConfig.from_params(load_params(), setting), *map(Path, paths))

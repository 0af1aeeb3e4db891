"""DVC stage ``evaluate@<setting>``: the trained theta on the 600 fixed test episodes.

python pipeline/evaluate.py SETTING PREPARED MODEL_DIR METRICS RESULTS STEPS_CSV EPISODES_PNG
(dvc.yaml: data/prepared/<dataset>, models/<setting>, metrics/eval/<setting>.json,
results/<setting>.json, plots/eval/<setting>.csv, plots/episodes/<setting>.png)
"""

from pathlib import Path

from mamlops.config import EvaluateConfig, TrainConfig
from mamlops.errors import reported, stage_args
from mamlops.malloc import keep_freed_memory
from mamlops.meta.evaluate import evaluate_stage
from mamlops.params import load_params

if __name__ == "__main__":
    setting, *paths = stage_args(
        "SETTING", "PREPARED", "MODEL_DIR", "METRICS", "RESULTS", "STEPS_CSV", "EPISODES_PNG"
    )
    keep_freed_memory()  # process-wide, no effect on results (malloc.py)
    with reported("evaluate"):
        params = load_params()
        cfg, ev = TrainConfig.from_params(params, setting), EvaluateConfig.from_params(params)
        evaluate_stage(cfg, ev, *map(Path, paths))

"""DVC stage ``prepare@<dataset>``: raw images into arrays, class splits and fixed episodes.

python pipeline/prepare.py DATASET RAW_OMNIGLOT OUT
(dvc.yaml: data/raw/omniglot, data/prepared/<dataset>; miniImageNet comes from
params.yaml's data.miniimagenet_dir)
"""

from pathlib import Path

from mamlops.config import DataConfig, PrepareConfig
from mamlops.data.prepare import prepare_stage
from mamlops.errors import reported, stage_args
from mamlops.params import load_params

if __name__ == "__main__":
    dataset, raw_omniglot, out = stage_args("DATASET", "RAW_OMNIGLOT", "OUT")
    with reported("prepare"):
        params = load_params()
        cfg = PrepareConfig.from_params(params)  # every key checked before any work
        source = DataConfig.from_params(params).source(dataset, Path(raw_omniglot))
        prepare_stage(cfg, dataset, source, Path(out))

"""DVC stage ``download``: Omniglot into OUT, verified; the user's miniImageNet checked if set.

python pipeline/download.py OUT        (dvc.yaml: OUT = data/raw/omniglot)
"""

from pathlib import Path

from mamlops.config import DataConfig
from mamlops.data.download import download_stage
from mamlops.errors import reported, stage_args
from mamlops.params import load_params

if __name__ == "__main__":
    (out,) = stage_args("OUT")
    with reported("download"):
        download_stage(DataConfig.from_params(load_params()), Path(out))

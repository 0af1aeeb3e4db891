"""Where the stages read and write by default: the paths ``dvc.yaml`` passes on each stage's
command line (``tests/test_layout.py`` checks the two agree), so ``mamlops train`` without
arguments works on the same files as ``dvc repro``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """Where the stages read and write, relative to the project root; ``dvc.yaml`` passes the
    same paths on each stage's command line."""

    root: Path = Path(".")

    @property
    def raw_omniglot(self) -> Path:
        return self.root / "data" / "raw" / "omniglot"

    def prepared(self, dataset: str) -> Path:
        return self.root / "data" / "prepared" / dataset

    def model_dir(self, setting: str) -> Path:
        return self.root / "models" / setting

    def checkpoint_dir(self, setting: str) -> Path:
        return self.root / "checkpoints" / setting

    def metrics(self, stage: str, setting: str) -> Path:
        return self.root / "metrics" / stage / f"{setting}.json"

    def plot(self, kind: str, setting: str) -> Path:
        """``plots/<kind>/<setting>.<ext>``: one folder per chart of dvc.yaml's ``plots:``."""
        ext = {"train": "tsv", "val": "tsv", "eval": "csv", "curves": "png", "episodes": "png"}
        return self.root / "plots" / kind / f"{setting}.{ext[kind]}"

    def results(self, setting: str) -> Path:
        """What an evaluation measured on what (data set, hardware, ...): not metrics."""
        return self.root / "results" / f"{setting}.json"

    def train_paths(self, setting: str, dataset: str) -> tuple[Path, ...]:
        """The train stage's paths, in its command line's order (after the setting)."""
        return (
            self.prepared(dataset),
            self.model_dir(setting),
            self.checkpoint_dir(setting),
            self.metrics("train", setting),
            self.plot("train", setting),
            self.plot("val", setting),
            self.plot("curves", setting),
        )

    def evaluate_paths(self, setting: str, dataset: str) -> tuple[Path, ...]:
        """The evaluate stage's paths, in its command line's order (after the setting)."""
        return (
            self.prepared(dataset),
            self.model_dir(setting),
            self.metrics("eval", setting),
            self.results(setting),
            self.plot("eval", setting),
            self.plot("episodes", setting),
        )

    def export_paths(self, setting: str, dataset: str) -> tuple[Path, ...]:
        """The export stage's paths, in its command line's order (after the setting)."""
        return (
            self.prepared(dataset),
            self.model_dir(setting),
            self.metrics("eval", setting),
            self.metrics("export", setting),
        )

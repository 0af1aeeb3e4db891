"""miniImageNet validation. There is no real miniImageNet here (ImageNet terms): these tests build
a tiny fake folder in tmp only to drive the error paths, never a stand-in data set.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from mamlops.data.download import DataError
from mamlops.datasets import miniimagenet


def _jpeg(path: Path) -> None:
    Image.new("RGB", (8, 8), (120, 30, 200)).save(path, format="JPEG")


def _tiny_splits(tmp_path: Path, classes: dict[str, int], per_class: int) -> Path:
    """Split CSVs with the given class counts, file names in the Ravi style."""
    splits = tmp_path / "splits"
    splits.mkdir()
    for split, count in classes.items():
        rows = ["filename,label"]
        for c in range(count):
            label = f"n{split[:2]}{c:06d}"
            rows += [f"{label}{i:08d}.jpg,{label}" for i in range(per_class)]
        (splits / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return splits


def test_shipped_splits_have_the_ravi_counts() -> None:
    for split, classes in miniimagenet.EXPECTED_CLASSES.items():
        rows = miniimagenet.read_split(miniimagenet.SPLITS_DIR / f"{split}.csv")
        assert len(rows) == classes * miniimagenet.IMAGES_PER_CLASS
        assert len({label for _, label in rows}) == classes
    assert (miniimagenet.SPLITS_DIR / "LICENSE").is_file()


def test_missing_images_are_named(tmp_path: Path) -> None:
    images = tmp_path / "mini" / "images"
    images.mkdir(parents=True)
    rows = miniimagenet.read_split(miniimagenet.SPLITS_DIR / "train.csv")
    for name, _ in rows[:3]:
        _jpeg(images / name)
    expected = rf"59997 of 60000 images missing: {rows[3][0]}, .*\(and 59992 more\)"
    with pytest.raises(DataError, match=expected):
        miniimagenet.validate(tmp_path / "mini")  # the parent of images/ is accepted too


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="miniImageNet folder not found"):
        miniimagenet.validate(tmp_path / "absent")


def test_wrong_class_count(tmp_path: Path) -> None:
    splits = _tiny_splits(tmp_path, {"train": 3, "val": 16, "test": 20}, per_class=1)
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"train\.csv: 3 classes in split 'train', expected 64"):
        miniimagenet.validate(tmp_path / "images", splits)


def test_unreadable_image_and_valid_tiny_layout(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(miniimagenet, "EXPECTED_CLASSES", {"train": 2, "val": 1, "test": 1})
    monkeypatch.setattr(miniimagenet, "IMAGES_PER_CLASS", 2)
    splits = _tiny_splits(tmp_path, miniimagenet.EXPECTED_CLASSES, per_class=2)
    images = tmp_path / "images"
    images.mkdir()
    names = [
        name
        for s in ("train", "val", "test")
        for name, _ in miniimagenet.read_split(splits / f"{s}.csv")
    ]
    for name in names:
        _jpeg(images / name)
    report = miniimagenet.validate(images, splits)
    assert report["splits"]["train"] == {"classes": 2, "images": 4}
    (images / names[1]).write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=rf"1 image\(s\) cannot be read: {names[1]}"):
        miniimagenet.validate(images, splits)

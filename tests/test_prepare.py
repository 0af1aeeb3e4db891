"""The prepare stage on real Omniglot: arrays, index, splits, params checks, preprocessing."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mamlops.config import PrepareConfig
from mamlops.data.prepare import prepare_dataset, read_classes, staged_dir
from mamlops.data.preprocess import load_image, to_float, to_float_numpy
from mamlops.data.splits import decode_class, read_splits
from mamlops.datasets.omniglot import Character, vinyals_lines
from mamlops.datasets.omniglot import split as make_omniglot_splits
from mamlops.errors import ParamsError

REPO = Path(__file__).resolve().parents[1]


def _characters(prepared: Path) -> list[Character]:
    return [Character(r["set"], r["alphabet"], r["character"]) for r in read_classes(prepared)]


def _char_counts(splits: dict) -> tuple[int, ...]:
    return tuple(
        len(set(decode_class(np.array(splits[s]), splits["rotations"])[0].tolist()))
        for s in ("train", "val", "test")
    )


# --------------------------------------------------------------------------- arrays and index


def test_images_shape_dtype_and_meta(omniglot_prepared: Path) -> None:
    images = np.load(omniglot_prepared / "images.npy", mmap_mode="r")
    assert images.shape == (1623, 20, 28, 28)
    assert images.dtype == np.uint8
    meta = json.loads((omniglot_prepared / "meta.json").read_text())
    assert meta["dataset"] == "omniglot" and meta["shape"] == [1623, 20, 28, 28]
    assert not list(omniglot_prepared.parent.glob(".omniglot.tmp-*"))  # renamed into place


def test_classes_sorted_by_set_alphabet_character(omniglot_prepared: Path) -> None:
    rows = read_classes(omniglot_prepared)
    assert [int(r["char_id"]) for r in rows] == list(range(1623))
    keys = [(r["set"], r["alphabet"], r["character"]) for r in rows]
    assert keys == sorted(keys)
    assert sum(r["set"] == "background" for r in rows) == 964


@pytest.mark.parametrize(("char_id", "drawing"), [(0, 0), (700, 7), (1622, 19)])
def test_resized_image_matches_pil_lanczos(
    omniglot_prepared: Path, omniglot_raw: Path, char_id: int, drawing: int
) -> None:
    row = read_classes(omniglot_prepared)[char_id]
    folder = omniglot_raw / f"images_{row['set']}" / row["alphabet"] / row["character"]
    png = sorted(folder.glob("*.png"))[drawing]
    want = np.asarray(Image.open(png).convert("L").resize((28, 28), Image.Resampling.LANCZOS))
    images = np.load(omniglot_prepared / "images.npy", mmap_mode="r")
    np.testing.assert_array_equal(images[char_id, drawing], want)
    np.testing.assert_array_equal(load_image(png, "omniglot"), want)
    assert 0 < (want < 128).mean() < 0.5  # some dark strokes on a light background


# --------------------------------------------------------------------------- splits


def test_vinyals_split_sizes_and_disjoint(omniglot_prepared: Path) -> None:
    splits = read_splits(omniglot_prepared)
    assert splits["scheme"] == "vinyals" and splits["rotations"] is True
    assert [len(splits[s]) for s in ("train", "val", "test")] == [4112, 688, 1692]
    assert _char_counts(splits) == (1028, 172, 423)
    train, val, test = (set(splits[s]) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    chars = [set(np.array(sorted(s)) // 4) for s in (train, val, test)]
    assert not (chars[0] & chars[1] or chars[0] & chars[2] or chars[1] & chars[2])


def test_vinyals_ids_follow_the_shipped_file(omniglot_prepared: Path) -> None:
    characters = _characters(omniglot_prepared)
    index = {c.name: i for i, c in enumerate(characters)}
    splits = read_splits(omniglot_prepared)
    for split in ("train", "val", "test"):
        line = vinyals_lines(split)[5]  # e.g. Angelic/character02/rot090
        name, rot = line.rsplit("/", 1)
        assert index[name] * 4 + int(rot[3:]) // 90 in splits[split]


def test_random_and_official_splits(omniglot_prepared: Path) -> None:
    characters = _characters(omniglot_prepared)
    rnd = make_omniglot_splits(characters, "random", seed=1)
    assert _char_counts(rnd) == (1100, 100, 423)
    assert [len(rnd[s]) for s in ("train", "val", "test")] == [4400, 400, 1692]
    other = make_omniglot_splits(characters, "random", seed=2)
    assert other["train"] != rnd["train"]
    assert make_omniglot_splits(characters, "random", seed=1) == rnd

    off = make_omniglot_splits(characters, "official", rotations=False)
    assert len(off["train"]) + len(off["val"]) == 964 and len(off["test"]) == 659
    assert all(characters[c].set == "evaluation" for c in off["test"])
    assert {characters[c].alphabet for c in off["train"]}.isdisjoint(
        {characters[c].alphabet for c in off["val"]}
    )


def test_vinyals_without_rotations_uses_char_ids(omniglot_prepared: Path) -> None:
    splits = make_omniglot_splits(_characters(omniglot_prepared), "vinyals", rotations=False)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [1028, 172, 423]
    assert max(max(splits[s]) for s in ("train", "val", "test")) == 1622


# --------------------------------------------------------------------------- params


def _with(params: dict, path: str, value: object) -> dict:
    out = copy.deepcopy(params)
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    node[int(last) if last.isdigit() else last] = value
    return out


def test_repo_params_are_valid(repo_params: dict) -> None:
    PrepareConfig.from_params(repo_params)


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("prepare.omniglot.split", "alphabetical", "prepare.omniglot.split"),
        ("prepare.omniglot.image_size", 0, "prepare.omniglot.image_size"),
        ("prepare.omniglot.rotations", "yes", "prepare.omniglot.rotations"),
        ("prepare.episodes.count", -5, "prepare.episodes.count"),
        ("prepare.episodes.val_count", 0, "prepare.episodes.val_count"),
        ("prepare.episodes.query", 16, "prepare.episodes.settings[1].shots"),  # 5 + 16 > 20
        ("prepare.episodes.settings.0.ways", 700, "prepare.episodes.settings[0].ways"),
        ("prepare.episodes.settings.0.shots", 0, "prepare.episodes.settings[0].shots"),
        ("prepare.episodes.settings", [], "prepare.episodes.settings"),
        ("prepare.miniimagenet.settings.0.ways", 20, "prepare.miniimagenet.settings[0].ways"),
        ("prepare.datasets", ["cifar"], "prepare.datasets"),
    ],
)
def test_bad_params_name_the_key(repo_params: dict, path: str, value: object, named: str) -> None:
    with pytest.raises(ParamsError, match=named.replace("[", r"\[").replace(".", r"\.")):
        PrepareConfig.from_params(_with(repo_params, path, value))


def test_ways_checked_against_the_chosen_split(repo_params: dict) -> None:
    # 600-way fits Vinyals val (688 classes) but not random val (100 distinct characters)
    p = _with(repo_params, "prepare.episodes.settings", [{"ways": 600, "shots": 1}])
    PrepareConfig.from_params(_with(p, "prepare.omniglot.splits", ["vinyals"]))
    with pytest.raises(ParamsError, match=r"settings\[0\]\.ways = 600 .* 100 classes of the val"):
        PrepareConfig.from_params(_with(p, "prepare.omniglot.splits", ["vinyals", "random"]))
    with pytest.raises(ParamsError, match=r"prepare.omniglot.split is now prepare.omniglot.splits"):
        PrepareConfig.from_params(_with(repo_params, "prepare.omniglot.split", "random"))


@pytest.mark.parametrize(
    ("path", "value", "dataset", "named"),
    [
        ("prepare.omniglot.split", "nope", "omniglot", "prepare.omniglot.split"),
        ("prepare.omniglot.splits", ["nope"], "omniglot", "prepare.omniglot.splits"),
        ("prepare.omniglot.image_size", 32, "omniglot", "prepare.omniglot.image_size"),
        ("data.miniimagenet_dir", "", "miniimagenet", "data.miniimagenet_dir"),
        ("data.miniimagenet_dir", "", "cifar", "'cifar'"),
    ],
)
def test_stage_fails_before_any_work(
    repo_params: dict, tmp_path: Path, path: str, value: object, dataset: str, named: str
) -> None:
    """The real stage script, as dvc.yaml runs it: one line naming the key, nothing written."""
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_with(repo_params, path, value)))
    cmd = [sys.executable, str(REPO / "pipeline/prepare.py"), dataset, "data/raw/omniglot"]
    proc = subprocess.run(
        [*cmd, f"data/prepared/{dataset}"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and named in proc.stderr
    assert proc.stderr.startswith("prepare: error:") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "data").exists()
    usage = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)  # one arg short
    assert usage.returncode == 2 and "usage: " in usage.stderr


def test_staged_dir_leaves_nothing_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_dir(out) as tmp:
        (tmp / "half.npy").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- preprocessing


def test_to_float_conventions_and_numpy_torch_agree() -> None:
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 28, 28), dtype=np.uint8)
    t = to_float(torch.from_numpy(x), "omniglot")
    assert t.shape == (2, 3, 1, 28, 28) and t.dtype == torch.float32
    np.testing.assert_array_equal(t.numpy(), to_float_numpy(x, "omniglot"))
    assert to_float_numpy(np.array([[0, 255]], np.uint8), "omniglot").tolist() == [[[1.0, 0.0]]]
    rgb = np.random.default_rng(1).integers(0, 256, (4, 84, 84, 3), dtype=np.uint8)
    m = to_float(rgb, "miniimagenet")
    assert m.shape == (4, 3, 84, 84)
    np.testing.assert_array_equal(m.numpy(), to_float_numpy(rgb, "miniimagenet"))
    assert float(m[1, 2, 3, 4]) == pytest.approx(rgb[1, 3, 4, 2] / 255)


def test_load_image_user_inputs() -> None:
    # a transparent PNG drawing must get a white background, not black (= all strokes)
    rgba = Image.new("RGBA", (105, 105), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (40, 10, 60, 95))
    arr = load_image(rgba, "omniglot")
    assert arr.shape == (28, 28) and arr.dtype == np.uint8
    assert arr[0, 0] == 255 and arr[14, 13] < 10  # Lanczos may ring by a level or two
    assert load_image(Image.new("RGB", (500, 375)), "miniimagenet").shape == (84, 84, 3)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_image(rgba, "cifar")


def test_preprocess_does_not_import_torch() -> None:
    code = (
        "import sys, mamlops.data.preprocess as p; p.load_image; sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --------------------------------------------------------------------------- miniImageNet


def test_miniimagenet_prepare_shapes_and_order_on_generated_jpegs(
    repo_params: dict, tmp_path: Path
) -> None:
    """Synthetic stand-in (solid-colour JPEGs), only to check shapes and ordering."""
    src, csvs = tmp_path / "mini", tmp_path / "csv"
    (src / "images").mkdir(parents=True)
    csvs.mkdir()
    colours = {}
    for s, split in enumerate(("train", "val", "test")):
        lines = ["filename,label"]
        for c, wnid in enumerate(("n02", "n01")):  # reversed: prepare sorts wnids
            for i in (3, 1, 2, 0):  # shuffled: prepare sorts file names
                name = f"{wnid}{s}{i:08d}.jpg"
                colours[name] = (40 * s + 20 * c, 10 * i, 200)
                Image.new("RGB", (100, 90), colours[name]).save(src / "images" / name)
                lines.append(f"{name},{wnid}{s}")
        (csvs / f"{split}.csv").write_text("\n".join(lines) + "\n")
    cfg = PrepareConfig.from_params(repo_params)
    cfg = dataclasses.replace(
        cfg,
        keys={
            **cfg.keys,
            "miniimagenet": dataclasses.replace(cfg.keys["miniimagenet"], settings=((2, 1),)),
        },
        episodes=dataclasses.replace(cfg.episodes, query=2, count=3, val_count=3),
    )
    summary = prepare_dataset("miniimagenet", src, tmp_path / "out", cfg, workers=1, csv_dir=csvs)
    images = np.load(tmp_path / "out" / "images.npy")
    assert images.shape == (6, 4, 84, 84, 3) and images.dtype == np.uint8
    rows = read_classes(tmp_path / "out")
    assert [(r["set"], r["wnid"]) for r in rows][:2] == [("train", "n010"), ("train", "n020")]
    first = colours["n01000000000.jpg"]
    assert np.abs(images[0, 0].mean(axis=(0, 1)) - first).max() < 3
    assert summary["schemes"]["ravi"]["classes"] == {"train": 2, "val": 2, "test": 2}
    assert read_splits(tmp_path / "out")["test"] == [4, 5]

"""The base-learner as a product: adapt to folders of real Omniglot characters, bad inputs."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
from conftest import omniglot_mirror

from mamlops.classifier.adapt import (
    AdaptInputError,
    UnequalShotsWarning,
    adapt_folder,
    evaluate_folder,
    predict_paths,
)
from mamlops.classifier.classifier import Classifier
from mamlops.files import file_sha256

# five characters of the Omniglot evaluation alphabets (Vinyals test split), one per alphabet
CHARACTERS = (
    "images_evaluation/Angelic/character01",
    "images_evaluation/Atlantean/character05",
    "images_evaluation/Glagolitic/character10",
    "images_evaluation/Kannada/character03",
    "images_evaluation/Tibetan/character07",
)


@pytest.fixture(scope="module")
def characters(tmp_path_factory) -> Path:
    """20 drawings of each of five characters, one folder per character."""
    zpath = omniglot_mirror() / "images_evaluation.zip"
    if not zpath.is_file():
        pytest.skip(f"Omniglot mirror not found at {zpath}")
    root = tmp_path_factory.mktemp("chars")
    with zipfile.ZipFile(zpath) as zf:
        for char in CHARACTERS:
            label = char.split("/")[1].lower()
            (root / label).mkdir()
            for name in sorted(n for n in zf.namelist() if n.startswith(char + "/")):
                (root / label / Path(name).name).write_bytes(zf.read(name))
    return root


def split_folders(characters: Path, dest: Path, shots: int) -> tuple[Path, Path]:
    """support/<label>/ with ``shots`` images, query/<label>/ with the rest."""
    for label_dir in sorted(characters.iterdir()):
        files = sorted(label_dir.iterdir())
        for sub, chosen in (("support", files[:shots]), ("query", files[shots:])):
            (dest / sub / label_dir.name).mkdir(parents=True)
            for f in chosen:
                shutil.copy(f, dest / sub / label_dir.name / f.name)
    return dest / "support", dest / "query"


@pytest.mark.parametrize("shots", [1, 5])
def test_adapt_evaluate_predict(trained_theta, characters, tmp_path, shots: int) -> None:
    support, query = split_folders(characters, tmp_path, shots)
    clf = adapt_folder(support, trained_theta.path)
    assert clf.labels == sorted(p.name for p in characters.iterdir())
    assert clf.dataset == "omniglot" and clf.model_cfg.ways == 5
    assert clf.meta_model_sha256 == file_sha256(trained_theta.path)
    assert clf.provenance["steps"] == trained_theta.cfg.test_inner_steps
    assert clf.provenance["lr"] == pytest.approx(0.4)
    assert set(clf.provenance["shots_per_class"].values()) == {shots}

    saved = Classifier.load(clf.save(tmp_path / "clf.safetensors"))
    report = evaluate_folder(saved, query)
    assert report["n"] == 5 * (20 - shots)
    assert report["accuracy"] > 0.5, report  # chance is 0.2
    assert set(report["per_class"]) == set(clf.labels)

    paths = sorted((query / clf.labels[0]).iterdir())[:4]
    preds = [ranked[0] for ranked in predict_paths(saved, paths)]
    assert len(preds) == 4
    assert all(label in clf.labels and 0.2 <= p <= 1.0 for label, p in preds)
    # frozen BN: no batch dependence in the maths, but oneDNN may pick another kernel for a
    # batch of 1 than of 4, so the probability may differ in the last bits: label exact,
    # probability to 1e-5
    [[(label_one, p_one)]] = predict_paths(saved, paths[:1])
    assert label_one == preds[0][0]
    assert p_one == pytest.approx(preds[0][1], abs=1e-5)
    top = predict_paths(saved, paths, top_k=3)  # most likely first, the same best class
    assert [len(r) for r in top] == [3] * 4 and [r[0][0] for r in top] == [p[0] for p in preds]
    assert all(r[0][1] >= r[1][1] >= r[2][1] for r in top)


def test_fewer_classes_use_first_head_rows(trained_theta, characters, tmp_path) -> None:
    support, query = split_folders(characters, tmp_path, 1)
    for d in (support, query):
        for label_dir in sorted(d.iterdir())[3:]:
            shutil.rmtree(label_dir)
    clf = adapt_folder(support, trained_theta.path, steps=5, lr=0.2)
    assert clf.model_cfg.ways == 3 and len(clf.labels) == 3
    assert clf.provenance["steps"] == 5 and clf.provenance["lr"] == 0.2
    assert evaluate_folder(clf, query)["accuracy"] > 0.5  # chance 1/3


def test_unequal_shots_warns_and_is_recorded(trained_theta, characters, tmp_path) -> None:
    support, _ = split_folders(characters, tmp_path, 2)
    first = sorted(support.iterdir())[0]
    sorted(first.iterdir())[0].unlink()
    with pytest.warns(UnequalShotsWarning):
        clf = adapt_folder(support, trained_theta.path)
    assert clf.provenance["balanced_shots"] is False
    assert clf.provenance["shots_per_class"][first.name] == 1


def test_bad_inputs(trained_theta, characters, tmp_path) -> None:
    support, query = split_folders(characters, tmp_path, 1)
    meta = trained_theta.path

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdaptInputError, match="no class subfolders"):
        adapt_folder(empty, meta)
    with pytest.raises(AdaptInputError, match="does not exist"):
        adapt_folder(tmp_path / "nope", meta)

    (support / "extra").mkdir()
    with pytest.raises(AdaptInputError, match=r"extra has no images"):
        adapt_folder(support, meta)
    shutil.copy(next((query / "angelic").iterdir()), support / "extra" / "a.png")
    with pytest.raises(AdaptInputError, match="6 classes but the meta-model .* is 5-way"):
        adapt_folder(support, meta)
    shutil.rmtree(support / "extra")

    bad = support / "angelic" / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(AdaptInputError, match="broken.png"), pytest.warns(UnequalShotsWarning):
        adapt_folder(support, meta)
    bad.unlink()

    clf = adapt_folder(support, meta)
    (query / "zebra").mkdir()
    shutil.copy(next((query / "angelic").iterdir()), query / "zebra" / "z.png")
    with pytest.raises(AdaptInputError, match="zebra"):
        evaluate_folder(clf, query)
    with pytest.raises(AdaptInputError, match="not found"):
        predict_paths(clf, [tmp_path / "missing.png"])
    assert issubclass(AdaptInputError, ValueError)


def test_provenance_names_files_not_paths(trained_theta, characters, tmp_path: Path) -> None:
    """What a classifier publishes (ONNX metadata, /metadata) names its inputs but never the
    adapting machine's folders."""
    import json

    support, _ = split_folders(characters, tmp_path / "private", 1)
    clf = adapt_folder(support, trained_theta.path)
    text = json.dumps(clf.provenance)
    assert str(tmp_path) not in text and "/private/" not in text
    assert clf.provenance["support_dir"] == "support"
    assert clf.provenance["meta_model"] == trained_theta.path.name


def test_diverged_weights_are_never_saved_or_loaded(trained_theta, characters, tmp_path) -> None:
    """`mamlops adapt --lr 1e30` used to save an all-NaN classifier with status 0: now one line,
    status 1, no file; and a NaN file made elsewhere is refused when loaded."""
    import subprocess
    import sys

    import torch

    from mamlops.errors import UserError
    from mamlops.files import read_safetensors, write_safetensors

    support, _ = split_folders(characters, tmp_path, 1)
    out = tmp_path / "nan.safetensors"
    cmd = [sys.executable, "-m", "mamlops", "adapt", str(support), "--meta"]
    cmd += [str(trained_theta.path), "--out", str(out), "--lr", "1e30"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "NaN or inf" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()

    with pytest.raises(UserError, match="NaN or inf"):
        write_safetensors(out, {"w": torch.tensor([1.0, float("nan")])})
    from safetensors.torch import save_file

    save_file({"w": torch.tensor([float("inf")])}, str(out))  # as another tool would
    with pytest.raises(ValueError, match="'w' holds NaN or inf"):
        read_safetensors(out)

"""The adapted-classifier file: round trip, clear errors, frozen-BN prediction.

The classifier here is a randomly initialised network whose BN statistics
come from real Omniglot support images: random weights, but a real, servable classifier.
``build_classifier`` (conftest.py) is shared with test_export.py and test_serve.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_classifier, to_tensor
from safetensors.torch import save_file

from mamlops.classifier.classifier import Classifier, ClassifierFileError
from mamlops.meta.model import per_step_bn


@pytest.fixture(scope="module")
def built() -> tuple[Classifier, list[bytes]]:
    return build_classifier()


def test_round_trip(built, tmp_path: Path) -> None:
    clf, queries = built
    path = clf.save(tmp_path / "clf.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf.safetensors"]  # no temp left
    back = Classifier.load(path)
    assert back.labels == clf.labels and back.dataset == clf.dataset
    assert back.model_cfg == clf.model_cfg and back.provenance == clf.provenance
    assert back.meta_model_sha256 == clf.meta_model_sha256
    for k, v in clf.params.items():
        assert torch.equal(back.params[k], v), k
    for (mean, var), (back_mean, back_var) in zip(clf.bn_stats, back.bn_stats, strict=True):
        assert torch.equal(back_mean, mean) and torch.equal(back_var, var)
    x = to_tensor(queries)
    # the weights above are bitwise equal, but the loaded ones lie in the file buffer, not
    # 64-byte aligned, and MKL's sgemm (the head) may round differently for another alignment
    # on some CPUs: a last-bits tolerance, not torch.equal
    torch.testing.assert_close(back.predict_proba(x), clf.predict_proba(x), atol=1e-6, rtol=0)


def test_frozen_bn_makes_images_independent(built) -> None:
    clf, queries = built
    x = to_tensor(queries)
    together = clf.predict_proba(x)
    alone = torch.cat([clf.predict_proba(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(alone, together, atol=1e-6, rtol=0)
    torch.testing.assert_close(together.sum(-1), torch.ones(len(x)))


def test_per_step_bn_and_lr_keys_are_reduced(built) -> None:
    clf, _ = built
    params = per_step_bn(clf.params, steps=3)
    params["bn0.weight"][-1] *= 2.0
    params["lr.conv0.weight"] = torch.tensor(0.1)
    reduced = Classifier(params, clf.bn_stats, clf.model_cfg, clf.labels, "omniglot", "0", {})
    assert "lr.conv0.weight" not in reduced.params
    assert torch.equal(reduced.params["bn0.weight"], clf.params["bn0.weight"] * 2.0)
    first = Classifier(params, clf.bn_stats, clf.model_cfg, clf.labels, "omniglot", "0", bn_step=0)
    assert torch.equal(first.params["bn0.weight"], clf.params["bn0.weight"])


def test_reference_bn_is_served_like_any_other(built) -> None:
    """A meta-model with the reference code's BatchNorm (no scale, a shift with a step axis)
    becomes an ordinary classifier file: scales of 1, one shift row, the same predictions."""
    from mamlops.meta.model import batch_stats, forward, forward_folded

    clf, queries = built
    theta = {k: v for k, v in clf.params.items() if not k.endswith(".weight") or "bn" not in k}
    theta = per_step_bn(theta, steps=0)
    assert "bn0.weight" not in theta and theta["bn0.bias"].shape == (1, clf.model_cfg.hidden)
    x = to_tensor(queries)
    stats = batch_stats(theta, x, clf.model_cfg)
    served = Classifier(theta, stats, clf.model_cfg, clf.labels, "omniglot", "0", {})
    assert torch.equal(served.params["bn2.weight"], torch.ones(clf.model_cfg.hidden))
    assert served.params["bn2.bias"].shape == (clf.model_cfg.hidden,)
    want = forward(theta, x, clf.model_cfg, stats)
    torch.testing.assert_close(served.logits(x), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        forward_folded(served.folded(), x, clf.model_cfg), want, atol=1e-4, rtol=0
    )


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ClassifierFileError, match="not found"):
        Classifier.load(tmp_path / "nope.safetensors")


def test_not_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00\x01 definitely not a safetensors header")
    with pytest.raises(ClassifierFileError, match="not a safetensors file"):
        Classifier.load(path)


def test_foreign_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ClassifierFileError, match="not a mamlops classifier"):
        Classifier.load(path)


def test_shape_mismatch(built, tmp_path: Path) -> None:
    clf, _ = built
    tensors = clf.tensors()
    tensors["head.weight"] = torch.zeros(3, clf.model_cfg.feature_dim)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=clf.metadata())
    with pytest.raises(ClassifierFileError, match="head.weight has shape"):
        Classifier.load(path)


def test_labels_must_match_ways(built) -> None:
    clf, _ = built
    with pytest.raises(ClassifierFileError, match="labels"):
        Classifier(clf.params, clf.bn_stats, clf.model_cfg, ["a"], "omniglot", "0", {})

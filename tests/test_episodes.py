"""Fixed evaluation episodes and the in-memory task sampler, on the session's prepared Omniglot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mamlops.episodes import (
    TaskSampler,
    episode_tasks,
    load_bank,
    load_episodes,
    make_episodes,
    write_episode_files,
)
from mamlops.preprocess import to_float
from mamlops.splits import read_splits

SETTINGS = [(5, 1), (5, 5), (20, 1), (20, 5)]


@pytest.fixture(scope="module")
def train_bank(omniglot_prepared: Path) -> torch.Tensor:
    return load_bank(omniglot_prepared, "train")


@pytest.fixture(scope="module")
def test_bank(omniglot_prepared: Path) -> torch.Tensor:
    return load_bank(omniglot_prepared, "test")


# --------------------------------------------------------------------------- episode files


@pytest.mark.parametrize(("split", "count"), [("test", 600), ("val", 100)])
@pytest.mark.parametrize(("ways", "shots"), SETTINGS)
def test_episode_files(omniglot_prepared: Path, split: str, count: int, ways: int, shots: int):
    eps = load_episodes(omniglot_prepared, split, ways, shots)
    assert eps.classes.shape == (count, ways)
    assert eps.support.shape == (count, ways, shots)
    assert eps.query.shape == (count, ways, 15)
    assert all(len(set(row)) == ways for row in eps.classes.tolist())  # N distinct classes
    assert set(eps.classes.ravel()) <= set(read_splits(omniglot_prepared)[split])
    both = np.concatenate([eps.support, eps.query], axis=-1)
    assert both.min() >= 0 and both.max() < 20
    assert (np.sort(both, axis=-1)[..., 1:] != np.sort(both, axis=-1)[..., :-1]).all()  # disjoint


def test_episodes_seeded_per_split_and_setting() -> None:
    ids = list(range(0, 800, 2))
    a = make_episodes(ids, 20, 5, 1, 15, 50, seed=0, split="test")
    b = make_episodes(ids, 20, 5, 1, 15, 50, seed=0, split="test")
    c = make_episodes(ids, 20, 5, 1, 15, 50, seed=1, split="test")
    d = make_episodes(ids, 20, 5, 1, 15, 50, seed=0, split="val")
    for key in ("classes", "support", "query"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["classes"], c["classes"])
    assert not np.array_equal(a["classes"], d["classes"])


def test_adding_a_setting_leaves_others_unchanged(tmp_path: Path) -> None:
    splits = {"val": list(range(40)), "test": list(range(40, 100))}
    counts = {"val": 5, "test": 7}
    write_episode_files(tmp_path / "one", splits, 20, [(5, 1)], 15, counts, seed=3)
    write_episode_files(tmp_path / "two", splits, 20, [(20, 1), (5, 1)], 15, counts, seed=3)
    for split in ("val", "test"):
        one = np.load(tmp_path / "one" / "episodes" / f"{split}_5w1s.npz")
        two = np.load(tmp_path / "two" / "episodes" / f"{split}_5w1s.npz")
        for key in ("classes", "support", "query"):
            np.testing.assert_array_equal(one[key], two[key])


def test_missing_episode_file_names_the_setting(omniglot_prepared: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ways: 7, shots: 3"):
        load_episodes(omniglot_prepared, "test", 7, 3)


# --------------------------------------------------------------------------- bank


def test_bank_materialises_rotations(omniglot_prepared: Path, train_bank: torch.Tensor) -> None:
    assert train_bank.shape == (4112, 20, 28, 28) and train_bank.dtype == torch.uint8
    ids = read_splits(omniglot_prepared)["train"]
    images = np.load(omniglot_prepared / "images.npy", mmap_mode="r")
    for row in (0, 1, 2, 3, 2001, 4111):
        char, k = divmod(ids[row], 4)
        want = np.rot90(images[char], k, axes=(1, 2))  # counter-clockwise, as documented
        np.testing.assert_array_equal(train_bank[row].numpy(), want)


def test_episode_tasks_match_the_files(omniglot_prepared: Path, test_bank: torch.Tensor) -> None:
    eps = load_episodes(omniglot_prepared, "test", 5, 1)
    ids = np.array(read_splits(omniglot_prepared)["test"])
    np.testing.assert_array_equal(ids[eps.rows], eps.classes)
    tasks = episode_tasks(test_bank, eps, 10, 14)
    assert len(tasks) == 4 and tasks.xs.shape == (4, 5, 1, 28, 28)
    assert tasks.xq.shape == (4, 75, 1, 28, 28)
    e, j, q = 12, 3, 7  # episode 12, class 3, query image 7
    want = to_float(test_bank[eps.rows[e, j], eps.query[e, j, q]], "omniglot")
    torch.testing.assert_close(tasks.xq[e - 10, j * 15 + q], want, rtol=0, atol=0)
    assert tasks.yq[e - 10, j * 15 + q] == j
    assert tasks.ys[0].tolist() == [0, 1, 2, 3, 4]
    same = episode_tasks(omniglot_prepared, eps, 10, 14)  # from the folder: same tasks
    torch.testing.assert_close(same.xs, tasks.xs, rtol=0, atol=0)


# --------------------------------------------------------------------------- sampler


@pytest.mark.parametrize(("ways", "shots", "query"), [(5, 1, 15), (20, 5, 15), (5, 5, 5)])
def test_sampler_shapes_and_labels(train_bank: torch.Tensor, ways: int, shots: int, query: int):
    tasks = TaskSampler(train_bank, ways, shots, query, seed=0).sample(6)
    assert tasks.xs.shape == (6, ways * shots, 1, 28, 28) and tasks.xs.dtype == torch.float32
    assert tasks.xq.shape == (6, ways * query, 1, 28, 28)
    assert tasks.ys.shape == (6, ways * shots) and tasks.ys.dtype == torch.int64
    assert tasks.yq.shape == (6, ways * query)
    for labels, per in ((tasks.ys, shots), (tasks.yq, query)):
        assert (torch.bincount(labels[0], minlength=ways) == per).all()
    assert 0.0 <= float(tasks.xs.min()) and float(tasks.xs.max()) <= 1.0
    assert float(tasks.xs.mean()) < 0.5  # strokes are 1 on a 0 background


def test_sampler_draws_distinct_classes_and_disjoint_images(train_bank: torch.Tensor) -> None:
    tasks = TaskSampler(train_bank, 20, 5, 15, seed=1).sample(4)
    flat = torch.cat([tasks.xs, tasks.xq], dim=1).flatten(2)  # [T, 400, 784]
    for t in range(4):
        assert len({tuple(row.tolist()) for row in flat[t, ::1]}) > 390  # ~all images distinct


def test_sampler_is_deterministic(train_bank: torch.Tensor) -> None:
    a = TaskSampler(train_bank, 5, 1, 15, seed=7).sample(8)
    b = TaskSampler(train_bank, 5, 1, 15, seed=7).sample(8)
    c = TaskSampler(train_bank, 5, 1, 15, seed=8).sample(8)
    g = torch.Generator().manual_seed(7)
    d = TaskSampler(train_bank, 5, 1, 15, generator=g).sample(8)
    torch.testing.assert_close(a.xs, b.xs, rtol=0, atol=0)
    torch.testing.assert_close(a.xq, d.xq, rtol=0, atol=0)
    assert not torch.equal(a.xs, c.xs)
    sampler = TaskSampler(train_bank, 5, 1, 15, seed=7)
    assert not torch.equal(sampler.sample(8).xs, sampler.sample(8).xs)  # the stream moves on
    assert a.to("cpu").xs.data_ptr() != 0


@pytest.mark.parametrize(
    ("ways", "shots", "query", "message"),
    [
        (5000, 1, 15, "5000-way tasks need 5000 classes"),
        (5, 6, 15, "shots \\+ query = 21"),
        (0, 1, 15, "ways must be a positive integer"),
    ],
)
def test_sampler_rejects_impossible_tasks(train_bank, ways, shots, query, message) -> None:
    with pytest.raises(ValueError, match=message):
        TaskSampler(train_bank, ways, shots, query)

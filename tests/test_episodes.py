"""Fixed evaluation episodes and the in-memory task sampler, on the session's prepared Omniglot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mamlops.data.episodes import (
    TaskSampler,
    episode_tasks,
    load_bank,
    load_episodes,
    make_episodes,
    write_episode_files,
)
from mamlops.data.preprocess import to_float
from mamlops.data.splits import read_splits

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
    splits = {
        "scheme": "s",
        "rotations": False,
        "val": list(range(40)),
        "test": list(range(40, 100)),
    }
    counts = {"val": 5, "test": 7}
    write_episode_files(tmp_path / "one", splits, 20, [(5, 1)], 15, counts, seed=3)
    write_episode_files(tmp_path / "two", splits, 20, [(20, 1), (5, 1)], 15, counts, seed=3)
    for split in ("val", "test"):
        one = np.load(tmp_path / "one" / "episodes" / "s" / f"{split}_5w1s.npz")
        two = np.load(tmp_path / "two" / "episodes" / "s" / f"{split}_5w1s.npz")
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
    tasks = TaskSampler(train_bank, ways, shots, query, seed=0, dataset="omniglot").sample(6)
    assert tasks.xs.shape == (6, ways * shots, 1, 28, 28) and tasks.xs.dtype == torch.float32
    assert tasks.xq.shape == (6, ways * query, 1, 28, 28)
    assert tasks.ys.shape == (6, ways * shots) and tasks.ys.dtype == torch.int64
    assert tasks.yq.shape == (6, ways * query)
    for labels, per in ((tasks.ys, shots), (tasks.yq, query)):
        assert (torch.bincount(labels[0], minlength=ways) == per).all()
    assert 0.0 <= float(tasks.xs.min()) and float(tasks.xs.max()) <= 1.0
    assert float(tasks.xs.mean()) < 0.5  # strokes are 1 on a 0 background


def test_sampler_draws_distinct_classes_and_disjoint_images(train_bank: torch.Tensor) -> None:
    tasks = TaskSampler(train_bank, 20, 5, 15, seed=1, dataset="omniglot").sample(4)
    flat = torch.cat([tasks.xs, tasks.xq], dim=1).flatten(2)  # [T, 400, 784]
    for t in range(4):
        assert len({tuple(row.tolist()) for row in flat[t, ::1]}) > 390  # ~all images distinct


def test_sampler_is_deterministic(train_bank: torch.Tensor) -> None:
    a = TaskSampler(train_bank, 5, 1, 15, seed=7, dataset="omniglot").sample(8)
    b = TaskSampler(train_bank, 5, 1, 15, seed=7, dataset="omniglot").sample(8)
    c = TaskSampler(train_bank, 5, 1, 15, seed=8, dataset="omniglot").sample(8)
    g = torch.Generator().manual_seed(7)
    d = TaskSampler(train_bank, 5, 1, 15, generator=g, dataset="omniglot").sample(8)
    torch.testing.assert_close(a.xs, b.xs, rtol=0, atol=0)
    torch.testing.assert_close(a.xq, d.xq, rtol=0, atol=0)
    assert not torch.equal(a.xs, c.xs)
    sampler = TaskSampler(train_bank, 5, 1, 15, seed=7, dataset="omniglot")
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
        TaskSampler(train_bank, ways, shots, query, dataset="omniglot")


# --------------------------------------------------------------------------- reference tasks


def _coded_bank(rows: int) -> torch.Tensor:
    """A bank whose every image names its row: pixel (0, 0) = row % 256, (0, 1) = row // 256."""
    bank = torch.zeros(rows, 20, 28, 28, dtype=torch.uint8)
    bank[:, :, 0, 0] = (torch.arange(rows) % 256)[:, None]
    bank[:, :, 0, 1] = (torch.arange(rows) // 256)[:, None]
    return bank


def _rows(x: torch.Tensor) -> torch.Tensor:
    code = torch.round(255 * (1 - x[..., 0, 0, :2])).long()  # images are 1 - x / 255
    return code[..., 0] + 256 * code[..., 1]


def test_distinct_character_tasks_take_one_rotation_of_each_character() -> None:
    """group=4: the reference code's tasks, N distinct characters at random rotations."""
    bank = _coded_bank(4 * 30)
    tasks = TaskSampler(bank, 20, 1, 1, seed=0, group=4, dataset="omniglot").sample(200)
    rows = _rows(tasks.xs)  # [T, 20]
    assert (rows == _rows(tasks.xq)).all()  # support and query of a class: the same row
    chars = rows // 4
    assert all(len(set(c.tolist())) == 20 for c in chars)  # never one character twice
    assert set((rows % 4).flatten().tolist()) == {0, 1, 2, 3}  # every rotation drawn
    # the plain sampler puts one character in two rotations in most 20-way tasks of this bank
    plain = _rows(TaskSampler(bank, 20, 1, 1, seed=0, dataset="omniglot").sample(200).xs) // 4
    assert sum(len(set(c.tolist())) < 20 for c in plain) > 100
    with pytest.raises(ValueError, match="30-way tasks need 30 classes, the split has 25"):
        TaskSampler(_coded_bank(100), 30, 1, 1, group=4, dataset="omniglot")


def test_character_groups_of_the_prepared_splits(omniglot_prepared: Path) -> None:
    from mamlops.data.episodes import character_groups

    for scheme in ("vinyals", "random", "official"):
        assert character_groups(omniglot_prepared, "train", scheme) == 4


@pytest.mark.parametrize("scheme", ["random", "official"])
def test_distinct_character_schemes_episodes(omniglot_prepared: Path, scheme: str) -> None:
    eps = load_episodes(omniglot_prepared, "test", 20, 1, scheme)
    assert read_splits(omniglot_prepared, scheme)["distinct_characters"] is True
    assert all(len(set((row // 4).tolist())) == 20 for row in eps.classes)
    assert set((eps.classes % 4).flatten().tolist()) == {0, 1, 2, 3}


def test_within_alphabet_episodes(omniglot_prepared: Path) -> None:
    import csv

    with open(omniglot_prepared / "classes.csv", newline="") as f:
        alphabet = [row["alphabet"] for row in csv.DictReader(f)]
    for scheme in ("vinyals", "official"):
        eps = load_episodes(omniglot_prepared, "test", 20, 1, scheme, alphabet=True)
        assert len(eps) == 600 and (eps.classes % 4 == 0).all()  # upright characters only
        scripts = [{alphabet[c // 4] for c in row.tolist()} for row in eps.classes]
        assert all(len(s) == 1 for s in scripts)
        assert len(set.union(*scripts)) >= 10  # episodes spread over the split's alphabets
        assert all(len(set(row.tolist())) == 20 for row in eps.classes)
    official = {alphabet[c // 4] for c in read_splits(omniglot_prepared, "official")["test"]}
    assert set.union(*scripts) <= official and len(official) == 20


def test_affine_augmentation_warps_each_image_reproducibly(train_bank: torch.Tensor) -> None:
    plain = TaskSampler(train_bank, 5, 1, 3, seed=4, dataset="omniglot").sample(6)
    a = TaskSampler(train_bank, 5, 1, 3, seed=4, augment="affine", dataset="omniglot").sample(6)
    b = TaskSampler(train_bank, 5, 1, 3, seed=4, augment="affine", dataset="omniglot").sample(6)
    torch.testing.assert_close(a.xs, b.xs, rtol=0, atol=0)
    assert a.xs.shape == plain.xs.shape and not torch.equal(a.xs, plain.xs)
    assert float(a.xs.min()) >= 0.0 and float(a.xs.max()) <= 1.0
    # small warps: the same classes and labels, ink moved rather than destroyed
    assert torch.equal(a.ys, plain.ys)
    ink_a, ink_p = a.xq.sum(dim=(2, 3, 4)), plain.xq.sum(dim=(2, 3, 4))
    assert ((ink_a / ink_p - 1).abs() < 0.35).all()
    # a shard draws the same numbers as the whole meta-batch (torchrun)
    half = TaskSampler(train_bank, 5, 1, 3, seed=4, augment="affine", dataset="omniglot").sample(
        6, slice(3, 6)
    )
    torch.testing.assert_close(half.xq, a.xq[3:6], rtol=0, atol=0)


def test_alphabet_tasks_take_characters_of_one_alphabet_at_one_rotation() -> None:
    bank = _coded_bank(4 * 30)
    alphabets = np.array(["a"] * 12 + ["b"] * 4 + ["c"] * 14)  # "b" is too small for 5-way
    sampler = TaskSampler(bank, 5, 1, 2, seed=3, group=4, alphabets=alphabets, dataset="omniglot")
    rows = _rows(sampler.sample(300).xs)
    for task in rows:
        chars = (task // 4).tolist()
        assert len(set(chars)) == 5 and len({alphabets[c] for c in chars}) == 1
        assert len(set((task % 4).tolist())) == 1  # the whole task at one rotation
    scripts = {alphabets[int(task[0]) // 4] for task in rows}
    assert scripts == {"a", "c"}
    with pytest.raises(Exception, match="no alphabet has 15 characters"):
        TaskSampler(bank, 15, 1, 2, group=4, alphabets=alphabets, dataset="omniglot")


def test_character_alphabets_of_the_official_split(omniglot_prepared: Path) -> None:
    from mamlops.data.episodes import character_alphabets

    train = character_alphabets(omniglot_prepared, "train", "official")
    val = character_alphabets(omniglot_prepared, "val", "official")
    assert len(train) == 806 and len(val) == 158
    assert len(set(train)) == 25 and set(train).isdisjoint(val)

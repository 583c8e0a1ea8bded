"""Data a user brings: image folders with or without a test split, and the benchmark regimes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hardneg.data import (DataError, from_tensors, load_train_test_folder, long_tail_subset, save_image_folder,
                          stratified_split)


def _folder(root, n_per_class: int, channels: int = 3, names=("cat", "dog", "frog")) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n_per_class * len(names), channels, 12, 12, generator=g)
    labels = torch.arange(len(names)).repeat_interleave(n_per_class)
    save_image_folder(images, labels.tolist(), list(names), str(root))


def test_train_test_folders_are_read_as_given(tmp_path):
    _folder(tmp_path / "train", 6)
    _folder(tmp_path / "test", 2)
    train, test = load_train_test_folder(str(tmp_path), size=8, channels=3)
    assert train.class_names == test.class_names == ["cat", "dog", "frog"]
    assert train.class_counts() == [6, 6, 6] and test.class_counts() == [2, 2, 2]
    assert train.images.shape == (18, 3, 8, 8) and 0.0 <= float(train.images.min()) <= float(train.images.max()) <= 1.0


def test_one_folder_is_split_stratified_and_seeded(tmp_path):
    _folder(tmp_path, 10, channels=1)
    train, test = load_train_test_folder(str(tmp_path), size=8, channels=1, seed=3, test_fraction=0.2)
    assert train.class_counts() == [8, 8, 8] and test.class_counts() == [2, 2, 2]
    again = load_train_test_folder(str(tmp_path), size=8, channels=1, seed=3, test_fraction=0.2)[1]
    assert torch.equal(again.images, test.images)
    other = load_train_test_folder(str(tmp_path), size=8, channels=1, seed=4, test_fraction=0.2)[1]
    assert not torch.equal(other.images, test.images)
    # no image is both a training and a test image
    flat_tr = {tuple(x.flatten().tolist()) for x in train.images}
    assert not any(tuple(x.flatten().tolist()) in flat_tr for x in test.images)


def test_mismatched_class_folders_are_an_error(tmp_path):
    _folder(tmp_path / "train", 2)
    _folder(tmp_path / "test", 2, names=("cat", "dog"))
    with pytest.raises(DataError, match="different class folders"):
        load_train_test_folder(str(tmp_path), size=8)


def test_long_tail_follows_cao_et_al():
    """n_c = n_max * (1 / imbalance)^(c / (K - 1)): CIFAR-10-LT with n_max 500, imbalance 50."""
    labels = torch.arange(10).repeat_interleave(600)
    data = from_tensors(torch.zeros(6000, 1, 2, 2), labels)
    lt = long_tail_subset(data, 50.0, seed=0, max_per_class=500)
    expected = [int(round(500 * (1 / 50) ** (c / 9))) for c in range(10)]
    assert lt.class_counts() == expected
    assert expected[0] == 500 and expected[-1] == 10
    with pytest.raises(DataError, match="smallest class"):
        long_tail_subset(data, 50.0, max_per_class=601)


def test_stratified_split_needs_two_samples_per_class():
    data = from_tensors(torch.zeros(3, 1, 2, 2), torch.tensor([0, 0, 1]))
    with pytest.raises(DataError, match="hold-out"):
        stratified_split(data, 0.5)
    tr, te = stratified_split(from_tensors(torch.zeros(8, 1, 2, 2), torch.tensor([0] * 4 + [1] * 4)), 0.25)
    assert np.array_equal(te.class_counts(), [1, 1]) and tr.class_counts() == [3, 3]

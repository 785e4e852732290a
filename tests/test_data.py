"""Datasets and DataModules on real offline data (scikit-learn digits, Debian's FashionMNIST)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dn2_lightning.data import (
    DatasetNotFoundError,
    GroupDataModule,
    OneClassDataModule,
    list_datasets,
    load_split,
)
from dn2_lightning.data.sources import DEBIAN_FASHION_MNIST

needs_fmnist = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist (make test does)"
)


def test_registry():
    assert list_datasets() == ["cifar10", "cifar100", "digits", "fashionmnist", "mnist"]
    with pytest.raises(ValueError, match="dataset='svhn'"):
        load_split("svhn", "train")
    with pytest.raises(ValueError, match="split='val'"):
        load_split("digits", "val")


def test_digits_split_is_fixed_disjoint_complete_and_60_40_per_class():
    from sklearn.datasets import load_digits

    train, test = load_split("digits", "train"), load_split("digits", "test")
    assert len(train) + len(test) == 1797
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (8, 8) and train.images.max() == 255
    target = load_digits().target
    for c in range(10):
        n = int((target == c).sum())
        assert int((train.labels == c).sum()) == int(0.6 * n)
        assert int((test.labels == c).sum()) == n - int(0.6 * n)
    # together the splits hold every original image exactly once
    original = np.round(load_digits().images * 255 / 16).astype(np.uint8).reshape(1797, -1)
    ours = torch.cat([train.images, test.images]).reshape(1797, -1).numpy()
    assert sorted(map(bytes, original)) == sorted(map(bytes, ours))


@needs_fmnist
def test_fashionmnist_from_debian_files():
    train, test = load_split("fashionmnist", "train"), load_split("fashionmnist", "test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert torch.equal(train.labels.bincount(), torch.full((10,), 6000))
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"


def test_missing_cifar_offline_names_path_and_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"cifar-10-batches-py.*cifar-10-python.tar.gz"):
        load_split("cifar10", "train", tmp_path)


def test_one_class_train_is_normal_class_and_test_labels_mark_other_classes():
    dm = OneClassDataModule(dataset="digits", normal_class=3, batch_size=50)
    dm.setup("fit")
    test = load_split("digits", "test")
    assert len(dm.train_dataset) == int((load_split("digits", "train").labels == 3).sum())
    assert torch.equal(dm.test_dataset.labels, (test.labels != 3).long())
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (50, 3, 8, 8) and batch["image"].dtype == torch.uint8
    assert torch.equal(batch["index"], torch.arange(50)) and (batch["label"] == 0).all()


def test_normal_class_by_name_and_bad_names():
    dm = OneClassDataModule(dataset="digits", normal_class="7")
    dm.setup()
    assert dm.normal_class_index == 7
    with pytest.raises(ValueError, match=r"normal_class=12 is out of range 0..9"):
        OneClassDataModule(dataset="digits", normal_class=12).setup()
    with pytest.raises(ValueError, match=r"normal_class='dog' is not a class name; choose one of 0='0'"):
        OneClassDataModule(dataset="digits", normal_class="dog").setup()


@needs_fmnist
def test_fashionmnist_class_name_is_case_insensitive():
    dm = OneClassDataModule(dataset="fashionmnist", normal_class="ankle BOOT")
    dm.setup()
    assert dm.normal_class_index == 9 and len(dm.train_dataset) == 6000


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dataset": "imagenet"}, "dataset='imagenet'"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"num_workers": -1}, "num_workers=-1"),
        ({"contamination": 1.0}, "contamination=1.0"),
        ({"contamination": -0.1}, "contamination=-0.1"),
        ({"on_corrupt": "ignore"}, "on_corrupt='ignore'"),
        ({"dataset": "folder", "root": "/nonexistent"}, "root='/nonexistent'"),
    ],
)
def test_bad_datamodule_arguments_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OneClassDataModule(**({"dataset": "digits"} | kwargs))


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.2])
def test_contamination_fraction_bookkeeping_and_seeds(fraction):
    dm = OneClassDataModule(dataset="digits", normal_class=2, contamination=fraction, seed=0)
    dm.setup()
    train = load_split("digits", "train")
    n_normal = int((train.labels == 2).sum())
    n_bad = int(dm.train_is_contaminant.sum())
    assert n_bad == round(fraction * n_normal / (1 - fraction))
    assert abs(n_bad / len(dm.train_dataset) - fraction) < 0.01
    source_classes = train.labels[dm.train_source_indices]
    assert torch.equal(dm.train_is_contaminant, source_classes != 2)  # contaminants never from the normal class
    assert torch.equal(dm.train_dataset.labels, dm.train_is_contaminant.long())
    again = OneClassDataModule(dataset="digits", normal_class=2, contamination=fraction, seed=0)
    again.setup()
    other = OneClassDataModule(dataset="digits", normal_class=2, contamination=fraction, seed=1)
    other.setup()
    assert torch.equal(again.train_source_indices, dm.train_source_indices)
    assert not torch.equal(other.train_source_indices, dm.train_source_indices)


def make_folder(root: Path, corrupt: bool = True) -> Path:
    g = np.random.default_rng(0)
    for sub, n in [("train", 5), ("test/good", 3), ("test/scratch", 2)]:
        (root / sub).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(g.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(root / sub / f"{i}.png")
    if corrupt:
        (root / "test/scratch/broken.png").write_bytes(b"not a png")
    return root


def test_folder_datamodule_layout_labels_and_corrupt_file_skipped(tmp_path):
    dm = OneClassDataModule(dataset="folder", root=str(make_folder(tmp_path)), image_size=16)
    with pytest.warns(UserWarning, match="skipping 1 unreadable image file.*broken.png"):
        dm.setup()
    assert len(dm.train_dataset) == 5 and len(dm.test_dataset) == 5
    assert dm.test_dataset.labels.tolist() == [0, 0, 0, 1, 1]
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (5, 3, 16, 16) and batch["path"][0].endswith("good/0.png")


def test_folder_corrupt_file_raise_policy(tmp_path):
    dm = OneClassDataModule(dataset="folder", root=str(make_folder(tmp_path)), on_corrupt="raise")
    with pytest.raises(ValueError, match="1 unreadable image file.*broken.png"):
        dm.setup()


def test_folder_normal_dir_must_exist(tmp_path):
    dm = OneClassDataModule(dataset="folder", root=str(make_folder(tmp_path, corrupt=False)), normal_dir="ok")
    with pytest.raises(ValueError, match=r"normal_dir='ok' is not a subfolder.*\['good', 'scratch'\]"):
        dm.setup()


def test_group_datamodule_hard_anomalies_are_made_of_normal_classes():
    dm = GroupDataModule(dataset="digits", group_size=4, n_train_groups=30, n_test_groups=40, seed=0)
    dm.setup()
    train_classes = torch.stack([dm.train_dataset[i]["member_classes"] for i in range(30)])
    assert all(len(set(row.tolist())) == 4 for row in train_classes)  # M different classes
    for i in range(40):
        sample = dm.test_dataset[i]
        distinct = len(set(sample["member_classes"].tolist()))
        assert sample["image"].shape == (4, 3, 8, 8)
        assert distinct == (4 if sample["label"] == 0 else 3)  # hard: one class twice, one missing
    assert int(dm.test_dataset.labels.sum()) == 20
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape[1:] == (4, 3, 8, 8)


def test_group_datamodule_easy_anomalies_hold_a_held_out_class_and_seeds_reproduce():
    dm = GroupDataModule(dataset="digits", group_size=3, n_train_groups=20, n_test_groups=20, anomaly="easy",
                         held_out_classes=[9], seed=3)
    dm.setup()
    for i in range(20):
        classes = dm.test_dataset[i]["member_classes"].tolist()
        assert (9 in classes) == bool(dm.test_dataset.labels[i])
    assert all(9 not in dm.train_dataset[i]["member_classes"].tolist() for i in range(20))
    same = GroupDataModule(dataset="digits", group_size=3, n_train_groups=20, n_test_groups=20, anomaly="easy",
                           held_out_classes=[9], seed=3)
    same.setup()
    assert torch.equal(same.test_dataset.members, dm.test_dataset.members)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"group_size": 0}, "group_size=0"),
        ({"anomaly": "medium"}, "anomaly='medium'"),
        ({"anomaly": "easy"}, "held_out_classes"),
        ({"anomaly_ratio": 1.0}, "anomaly_ratio=1.0"),
        ({"n_train_groups": 0}, "n_train_groups=0"),
    ],
)
def test_group_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupDataModule(**({"dataset": "digits"} | kwargs))


def test_group_size_larger_than_classes_is_refused():
    with pytest.raises(ValueError, match="group_size=11 exceeds the 10 normal classes"):
        GroupDataModule(dataset="digits", group_size=11).setup()

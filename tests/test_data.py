"""Datasets and DataModules on real offline data (scikit-learn digits, Debian's FashionMNIST)."""

from __future__ import annotations

import copy
import gzip
import multiprocessing
import os
import pickle
import socket
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dn2_lightning.data import (
    ArrayImageDataset,
    DatasetNotFoundError,
    GroupDataModule,
    ImageFolderDataset,
    OneClassDataModule,
    list_datasets,
    list_image_files,
    load_split,
)
from dn2_lightning.data.datasets import PIXEL_FORMAT, iter_image_batches
from dn2_lightning.data.group import sample_groups
from dn2_lightning.data.images import ImageTooLargeError, UnreadableImageError, image_problem, load_image
from dn2_lightning.data.sources import DEBIAN_FASHION_MNIST, default_data_root, read_idx
from dn2_lightning.inputs import as_image_batches

needs_fmnist = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist (make test does)"
)


@pytest.fixture
def offline(monkeypatch):
    """No network, whatever the machine has: torchvision's download attempts fail at once."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


def test_registry():
    assert list_datasets() == ["cifar10", "cifar100", "digits", "fashionmnist", "mnist"]
    with pytest.raises(ValueError, match=r"name='svhn'.*'cifar10'.*'mnist'"):
        load_split("svhn", "train")
    with pytest.raises(ValueError, match=r"split='val' is not one of \['train', 'test'\]"):
        load_split("digits", "val")


def test_default_root_follows_env_and_splits_are_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("DN2_DATA_DIR", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("DN2_DATA_DIR")
    assert default_data_root() == Path.home() / ".cache" / "dn2_lightning" / "data"
    assert load_split("digits", "train") is load_split("digits", "train")


def test_digits_split_is_fixed_disjoint_complete_and_60_40_per_class():
    from sklearn.datasets import load_digits

    train, test = load_split("digits", "train"), load_split("digits", "test")
    assert len(train) + len(test) == 1797
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (8, 8) and train.images.max() == 255
    assert train.labels.dtype == torch.int64 and train.classes == tuple("0123456789")
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
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert torch.equal(train.labels.bincount(), torch.full((10,), 6000))
    assert torch.equal(test.labels.bincount(), torch.full((10,), 1000))
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"


def test_mnist_idx_files_found_uncompressed_in_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(5 * 4 * 3).reshape(5, 4, 3) % 256
    write_idx(raw / "t10k-images-idx3-ubyte", images)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.array([3, 1, 4, 1, 5]))
    test = load_split("mnist", "test", tmp_path)
    assert test.images.shape == (5, 4, 3) and torch.equal(test.images, torch.from_numpy(images).to(torch.uint8))
    assert test.labels.tolist() == [3, 1, 4, 1, 5] and test.classes[0] == "0"


def test_idx_reader_validates_magic_and_size(tmp_path):
    write_idx(tmp_path / "ok.gz", np.ones((2, 3), dtype=np.uint8))
    assert read_idx(tmp_path / "ok.gz").shape == (2, 3)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + (2).to_bytes(4, "big") + b"\x00" * 8)  # float IDX
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01" + (9).to_bytes(4, "big") + b"\x00" * 2)
    with pytest.raises(ValueError, match=r"holds 2 bytes of data.*\(9,\)"):
        read_idx(tmp_path / "short")


def test_missing_mnist_offline_names_paths_files_and_fix(tmp_path, offline):
    with pytest.raises(DatasetNotFoundError) as info:
        load_split("mnist", "train", tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message and "train-images-idx3-ubyte" in message
    assert f"download the four MNIST IDX files into {tmp_path / 'nowhere' / 'MNIST' / 'raw'}" in message


def test_mnist_and_fashionmnist_files_are_never_read_as_each_other(tmp_path):
    # both were read from the bare root first, where the two datasets' files have the same names: FashionMNIST
    # files put there (as the offline hint said) came back as dataset="mnist", with MNIST's class names
    images = np.arange(5 * 4 * 3).reshape(5, 4, 3) % 256
    for folder in (tmp_path, tmp_path / "FashionMNIST" / "raw"):
        folder.mkdir(parents=True, exist_ok=True)
        write_idx(folder / "t10k-images-idx3-ubyte.gz", images)
        write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.array([3, 1, 4, 1, 5]))
    with pytest.raises(DatasetNotFoundError, match=r"lie directly in .*move them to .*MNIST/raw"):
        load_split("mnist", "test", tmp_path)
    assert load_split("fashionmnist", "test", tmp_path).classes[0] == "T-shirt/top"
    # torchvision's own folder as the root is read as it is
    assert load_split("fashionmnist", "test", tmp_path / "FashionMNIST" / "raw").labels.tolist() == [3, 1, 4, 1, 5]
    with pytest.raises(DatasetNotFoundError, match="lie directly in"):
        load_split("mnist", "test", tmp_path / "FashionMNIST" / "raw")


def test_missing_cifar_offline_names_path_and_fix(tmp_path, offline):
    with pytest.raises(DatasetNotFoundError, match=r"cifar-10-batches-py.*cifar-10-python.tar.gz"):
        load_split("cifar10", "train", tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"cifar-100-python.*cifar-100-python.tar.gz"):
        load_split("cifar100", "test", tmp_path)
    # the download belongs to prepare_data (once per node under DDP), not only to setup (every rank at once)
    with pytest.raises(DatasetNotFoundError, match=r"cifar-10-batches-py"):
        OneClassDataModule("cifar10", root=str(tmp_path)).prepare_data()
    with pytest.raises(DatasetNotFoundError, match=r"cifar-100-python"):
        GroupDataModule("cifar100", root=str(tmp_path)).prepare_data()


class _RunsCode:
    """Unpickling this creates a file: the stand-in for a crafted pickle that runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("crafted", ["a pickle that runs code", "cut short", "another size"])
def test_cifar_files_are_checked_against_their_published_md5_before_unpickling(tmp_path, crafted):
    """A CIFAR folder in a shared data root was unpickled as found: a crafted test_batch ran code, a cut-short one
    raised a bare UnpicklingError, one of 1,000 images instead of 10,000 was read silently."""
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    labels = {"label_names": [f"class {i}" for i in range(10)]}
    batch = {"data": np.zeros((1000, 3072), dtype=np.uint8), "labels": [0] * 1000}
    (folder / "batches.meta").write_bytes(pickle.dumps(labels))
    content = {
        "a pickle that runs code": pickle.dumps({"data": _RunsCode(marker), "labels": []}),
        "cut short": pickle.dumps(batch)[:5000],
        "another size": pickle.dumps(batch),
    }[crafted]
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(ValueError, match=r"cifar-10-batches-py/(test_batch|batches.meta) is not CIFAR10's file .*MD5"):
        load_split("cifar10", "test", tmp_path)
    assert not marker.exists()


def test_array_dataset_expands_grayscale_permutes_rgb_and_resizes():
    gray = torch.arange(2 * 4 * 4, dtype=torch.uint8).reshape(2, 4, 4)
    sample = ArrayImageDataset(gray, torch.tensor([0, 1]))[1]
    assert sample["image"].shape == (3, 4, 4) and torch.equal(sample["image"][2], gray[1])
    assert sample["label"].dtype == torch.int64 and sample["label"] == 1 and sample["index"] == 1
    rgb = torch.zeros(3, 5, 6, 3, dtype=torch.uint8)
    rgb[..., 1] = 200
    image = ArrayImageDataset(rgb, torch.zeros(3), load_size=7)[0]["image"]
    assert image.shape == (3, 7, 7) and image.dtype == torch.uint8
    assert image[1].eq(200).all() and image[0].eq(0).all()


def test_rgb_array_images_keep_their_rows_and_columns():
    """The test above's image is one colour: an RGB array read transposed (height for width) passed it."""
    rgb = torch.randint(0, 256, (4, 5, 7, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    dataset = ArrayImageDataset(rgb, torch.zeros(4))
    expected = np.ascontiguousarray(rgb.numpy().transpose(0, 3, 1, 2))  # [N, H, W, 3] -> [N, 3, H, W]
    assert all(np.array_equal(dataset[i]["image"].numpy(), expected[i]) for i in range(4))
    assert np.array_equal(torch.cat(list(iter_image_batches(dataset, 3))).numpy(), expected)


@pytest.mark.parametrize("shape", [(23, 9, 9), (23, 9, 7, 3)])
@pytest.mark.parametrize("load_size", [None, 9, 13])
def test_image_batches_equal_what_a_dataloader_collates(shape, load_size):
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    dataset = ArrayImageDataset(images, torch.zeros(len(images)), load_size)
    collated = [b["image"] for b in torch.utils.data.DataLoader(dataset, batch_size=10)]
    batches = list(iter_image_batches(dataset, 10))
    assert [len(b) for b in batches] == [10, 10, 3]
    assert all(torch.equal(a, b) and b.is_contiguous() for a, b in zip(collated, batches, strict=True))
    assert torch.equal(dataset.batch(4, 6), torch.stack([dataset[4]["image"], dataset[5]["image"]]))
    assert list(iter_image_batches(ArrayImageDataset(images[:0], torch.zeros(0)), 10)) == []


@pytest.mark.parametrize(
    "images, labels, load_size, match",
    [
        (torch.zeros(2, 4, 4), torch.zeros(2), None, "images must be uint8"),
        (torch.zeros(2, 4, 4, 2, dtype=torch.uint8), torch.zeros(2), None, r"images must be .*\(2, 4, 4, 2\)"),
        (torch.zeros(2, 4, 4, dtype=torch.uint8), torch.zeros(3), None, "labels must be"),
        (torch.zeros(2, 4, 4, dtype=torch.uint8), torch.zeros(2), 0, "load_size=0"),
    ],
)
def test_array_dataset_bad_arguments(images, labels, load_size, match):
    with pytest.raises(ValueError, match=match):
        ArrayImageDataset(images, labels, load_size)


def test_list_image_files_is_recursive_sorted_and_case_insensitive(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    for name in ["b/c/z.PNG", "a.jpg", "b/y.Tiff", "notes.txt", "b/x.webp"]:
        (tmp_path / name).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in list_image_files(tmp_path)]
    assert found == ["a.jpg", "b/c/z.PNG", "b/x.webp", "b/y.Tiff"]


def test_image_folder_dataset_bad_policy_and_lengths(tmp_path):
    with pytest.raises(ValueError, match=r"on_corrupt='ignore' is not one of \['skip', 'raise'\]"):
        ImageFolderDataset([], [], 8, on_corrupt="ignore")
    with pytest.raises(ValueError, match="labels has 1 entries but paths has 0"):
        ImageFolderDataset([], [0], 8)


def test_one_class_train_is_normal_class_and_test_labels_mark_other_classes():
    dm = OneClassDataModule(dataset="digits", normal_class=3, batch_size=50)
    dm.setup("fit")
    test = load_split("digits", "test")
    assert len(dm.train_dataset) == int((load_split("digits", "train").labels == 3).sum())
    assert torch.equal(dm.test_dataset.labels, (test.labels != 3).long())
    assert dm.normal_class_index == 3 and dm.normal_class_name == "3" and dm.classes == tuple("0123456789")
    assert torch.equal(dm.test_source_indices, torch.arange(len(test)))
    assert torch.equal(
        load_split("digits", "train").labels[dm.train_source_indices], torch.full((len(dm.train_dataset),), 3)
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (50, 3, 8, 8) and batch["image"].dtype == torch.uint8
    assert torch.equal(batch["index"], torch.arange(50)) and (batch["label"] == 0).all()
    test_batch = next(iter(dm.test_dataloader()))
    assert torch.equal(test_batch["label"], (test.labels[:50] != 3).long())
    dm.setup("test")  # idempotent: the same datasets
    assert dm.test_dataset is dm.predict_dataset


def test_normal_class_by_name_and_bad_names():
    dm = OneClassDataModule(dataset="digits", normal_class="7")
    dm.setup()
    assert dm.normal_class_index == 7
    with pytest.raises(ValueError, match=r"normal_class=12 is out of range 0..9"):
        OneClassDataModule(dataset="digits", normal_class=12)  # refused when built, before any work
    with pytest.raises(ValueError, match=r"normal_class='dog' is not a class name; choose one of 0='0'"):
        OneClassDataModule(dataset="digits", normal_class="dog")
    with pytest.raises(ValueError, match=r"normal_class=20 is out of range 0..19.*19='vehicles_2'"):
        OneClassDataModule(dataset="cifar100", normal_class=20)  # no files needed to say so


@pytest.mark.parametrize("dataset", ["digits", "fashionmnist"])
def test_the_class_names_known_before_loading_are_the_loaded_ones(dataset):
    from dn2_lightning.data.sources import known_classes

    if dataset == "fashionmnist" and not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    assert load_split(dataset, "test").classes == known_classes(dataset)


@needs_fmnist
def test_fashionmnist_class_name_is_case_insensitive():
    dm = OneClassDataModule(dataset="fashionmnist", normal_class="ankle BOOT")
    dm.setup()
    assert dm.normal_class_index == 9 and dm.normal_class_name == "Ankle boot" and len(dm.train_dataset) == 6000
    assert len(dm.test_dataset) == 10000 and int(dm.test_dataset.labels.sum()) == 9000
    with pytest.raises(ValueError, match=r"normal_class='boot' is not a class name.*9='Ankle boot'"):
        OneClassDataModule(dataset="fashionmnist", normal_class="boot")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dataset": "imagenet"}, r"dataset='imagenet' is not one of \['cifar10', .*'folder'\]"),
        ({"normal_class": 2.5}, "normal_class=2.5"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"num_workers": -1}, "num_workers=-1"),
        ({"load_size": 0}, "load_size=0"),
        ({"contamination": 1.0}, r"contamination=1.0 must be in \[0, 1\)"),
        ({"contamination": -0.1}, "contamination=-0.1"),
        ({"on_corrupt": "ignore"}, r"on_corrupt='ignore' is not one of \['skip', 'raise'\]"),
        ({"dataset": "folder", "root": "/nonexistent"}, "root='/nonexistent'"),
        ({"dataset": "folder"}, "root=None"),
        ({"contamination": 0.1, "seed": 2**64}, r"seed=18446744073709551616 must be an integer in \[-2\*\*63"),
        ({"seed": 1.5}, r"seed=1.5 must be an integer"),  # was torch's "manual_seed expected a long"
    ],
)
def test_bad_datamodule_arguments_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OneClassDataModule(**({"dataset": "digits"} | kwargs))


def test_seeds_are_checked_at_both_ends_of_the_int64_range():
    """seed=2**63 is refused naming the parameter, not later by torch.Generator.manual_seed's overflow message."""
    from dn2_lightning.validation import check_seed

    for valid in (-(2**63), -1, 0, 2**63 - 1):
        check_seed("seed", valid)
    for invalid in (2**63, -(2**63) - 1):
        with pytest.raises(ValueError, match=rf"seed={invalid} must be an integer in \[-2\*\*63, 2\*\*63\)"):
            check_seed("seed", invalid)
    with pytest.raises(ValueError, match=r"seed=9223372036854775808 must be an integer in \[-2\*\*63"):
        OneClassDataModule(dataset="digits", contamination=0.1, seed=2**63)


def test_a_contamination_that_rounds_to_no_anomaly_is_refused_with_the_smallest_that_does_not():
    # 0.004 of digits' 106 zeros gave 0 contaminants, and dn2-protocol still reported the run as contaminated
    with pytest.raises(ValueError, match=r"contamination=0.004 .* 106 normal samples rounds to 0 anomalies.*>= 0.0047"):
        OneClassDataModule(dataset="digits", normal_class=0, contamination=0.004).setup()
    dm = OneClassDataModule(dataset="digits", normal_class=0, contamination=0.0047)
    dm.setup()
    assert int(dm.train_is_contaminant.sum()) == 1


def test_the_contaminant_count_gives_the_share_nearest_to_contamination():
    # 0.2 of digits' 106 zeros is 26.5 contaminants by c * n / (1 - c), which round() made 26: a share of 19.70%,
    # where 27 gives 20.30%, nearer (and 0.2 of 10 normal samples gave 2, 16.7%, where 3 gives 23.1%)
    from fractions import Fraction

    from dn2_lightning.data.classes import contaminant_count

    for n_normal in (1, 2, 7, 10, 59, 106, 6000):
        for contamination in [i / 997 for i in range(1, 997, 13)] + [0.2, 0.05, 0.5]:
            c = Fraction(repr(contamination))
            near = int(contamination * n_normal / (1 - contamination))  # the share m / (n + m) grows with m
            shares = {m: abs(Fraction(m, n_normal + m) - c) for m in range(max(0, near - 3), near + 4)}
            nearest = min(shares, key=lambda m: (shares[m], -m))
            assert contaminant_count(contamination, n_normal) == nearest, (contamination, n_normal)
    dm = OneClassDataModule(dataset="digits", normal_class=0, contamination=0.2)
    dm.setup()
    assert int((~dm.train_is_contaminant).sum()) == 106
    assert int(dm.train_is_contaminant.sum()) == 27


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
    # normal samples first in source order, then the contaminants sorted by source index
    normal_part, bad_part = dm.train_source_indices[:n_normal], dm.train_source_indices[n_normal:]
    assert torch.equal(normal_part, (train.labels == 2).nonzero().flatten())
    assert torch.equal(bad_part, bad_part.sort().values) and len(bad_part.unique()) == n_bad
    again = OneClassDataModule(dataset="digits", normal_class=2, contamination=fraction, seed=0)
    again.setup()
    other = OneClassDataModule(dataset="digits", normal_class=2, contamination=fraction, seed=1)
    other.setup()
    assert torch.equal(again.train_source_indices, dm.train_source_indices)
    assert not torch.equal(other.train_source_indices, dm.train_source_indices)


def test_contamination_larger_than_the_other_classes_is_refused():
    with pytest.raises(ValueError, match=r"contamination=0.95 needs \d+ anomalies"):
        OneClassDataModule(dataset="digits", normal_class=2, contamination=0.95).setup()


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
    dm = OneClassDataModule(dataset="folder", root=str(make_folder(tmp_path)), load_size=16)
    with pytest.warns(UserWarning, match="skipping 1 unreadable image file.*broken.png"):
        dm.setup()
    assert len(dm.train_dataset) == 5 and len(dm.test_dataset) == 5
    assert dm.test_dataset.labels.tolist() == [0, 0, 0, 1, 1]
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (5, 3, 16, 16) and batch["path"][0].endswith("good/0.png")
    assert dm.classes == ("good", "scratch") and dm.test_dataset.skipped == [tmp_path / "test/scratch/broken.png"]
    assert torch.equal(dm.test_source_indices, torch.arange(5))


def test_an_empty_test_kind_folder_is_named_in_a_warning(tmp_path):
    """test/crack/ with no image (a copy that failed, files of another extension) was listed among the classes and
    added no sample, without a word."""
    root = make_folder(tmp_path, corrupt=False)
    (root / "test" / "crack").mkdir()
    (root / "test" / "crack" / "0.heic").write_bytes(b"not read")
    dm = OneClassDataModule(dataset="folder", root=str(root), load_size=16)
    with pytest.warns(UserWarning, match=r"1 test folder\(s\) hold no image .*\['test/crack'\]; they add no sample"):
        dm.setup()
    assert dm.test_dataset.labels.tolist() == [0, 0, 0, 1, 1]


def test_a_flat_predict_folder_leaves_out_root_train_only(tmp_path):
    """Every image under any folder named train was left out of a flat folder's predictions, without a word (e.g.
    day1/train/b.png of a folder of dated runs); only root/train holds training images."""
    for name in ("a.png", "day1/train/b.png", "day2/c.png", "train/d.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), len(name), np.uint8)).save(tmp_path / name)
    dm = OneClassDataModule(dataset="folder", root=str(tmp_path), load_size=8)
    dm.setup("predict")
    scored = sorted(str(Path(p).relative_to(tmp_path)) for p in dm.predict_dataset.paths)
    assert scored == ["a.png", os.path.join("day1", "train", "b.png"), os.path.join("day2", "c.png")]


def test_a_test_kind_named_as_the_normal_one_in_other_letters_is_warned_about(tmp_path):
    """test/Good beside test/good (a case-sensitive disk) was scored as anomalous without a word."""
    for name in ("train/t.png", "test/good/a.png", "test/Good/b.png", "test/crack/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), len(name), np.uint8)).save(tmp_path / name)
    dm = OneClassDataModule(dataset="folder", root=str(tmp_path), load_size=8)
    with pytest.warns(UserWarning, match=r"test/Good is read as an anomalous kind \(label 1\) beside test/good"):
        dm.setup("test")
    labels = {Path(p).parent.name: int(y) for p, y in zip(dm.test_dataset.paths, dm.test_dataset.labels, strict=True)}
    assert labels == {"good": 0, "Good": 1, "crack": 1}


@pytest.mark.parametrize("with_train", [True, False])
def test_a_flat_predict_folder_of_mvtec_layout_leaves_out_its_masks(tmp_path, with_train):
    """MVTec's layout with test/ moved aside (as the folder errors suggest for a flat predict): its
    ground_truth/<kind>/*_mask.png files were scored as images to predict on. Without root/train, a ground_truth
    folder is the user's own and is read."""
    names = ["new/a.png", "ground_truth/crack/0_mask.png", *(["train/good/t.png"] if with_train else [])]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), len(name), np.uint8)).save(tmp_path / name)
    dm = OneClassDataModule(dataset="folder", root=str(tmp_path), load_size=8)
    dm.setup("predict")
    scored = sorted(Path(p).relative_to(tmp_path).as_posix() for p in dm.predict_dataset.paths)
    assert scored == (["new/a.png"] if with_train else ["ground_truth/crack/0_mask.png", "new/a.png"])


def test_folder_default_load_size_and_no_contamination(tmp_path):
    dm = OneClassDataModule(dataset="folder", root=str(make_folder(tmp_path, corrupt=False)))
    dm.setup()
    assert dm.train_dataset[0]["image"].shape == (3, 224, 224)
    with pytest.raises(ValueError, match="contamination=0.1 is not supported for dataset='folder'"):
        OneClassDataModule(dataset="folder", root=str(tmp_path), contamination=0.1)
    # the synthetic set too: it was accepted and set up a clean training set (0 contaminants), no word
    with pytest.raises(ValueError, match="contamination=0.2 is not supported for dataset='synthetic'"):
        OneClassDataModule(dataset="synthetic", root=str(tmp_path / "synthetic"), contamination=0.2)


def test_folder_corrupt_file_raise_policy(tmp_path):
    dm = OneClassDataModule(dataset="folder", root=str(make_folder(tmp_path)), on_corrupt="raise")
    with pytest.raises(ValueError, match="1 unreadable image file.*broken.png"):
        dm.setup()


def test_folder_images_loose_in_test_warn_and_paths_are_absolute_from_a_relative_root(tmp_path, monkeypatch):
    # images directly in test/ were dropped without a word; a relative root gave paths (in reports and in the
    # checkpoint's neighbour paths) that point nowhere from another directory
    make_folder(tmp_path / "parts", corrupt=False)
    Image.new("RGB", (8, 8)).save(tmp_path / "parts/test/loose.png")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    dm = OneClassDataModule(dataset="folder", root="../parts", load_size=16)
    with pytest.warns(
        UserWarning, match=r"1 image\(s\) directly in .*parts/test \(e.g. \['loose.png'\]\) are not scored"
    ):
        dm.setup()
    assert len(dm.test_dataset) == 5
    train_path = Path(dm.train_dataset[0]["path"])
    assert train_path.is_absolute() and train_path == tmp_path / "parts/train/0.png"


def test_folder_normal_dir_must_exist(tmp_path):
    dm = OneClassDataModule(dataset="folder", root=str(make_folder(tmp_path, corrupt=False)), normal_dir="ok")
    with pytest.raises(ValueError, match=r"normal_dir='ok' is not a subfolder.*\['good', 'scratch'\]"):
        dm.setup()
    # the fixes it names (a test/ of defects only stopped fit, test and predict with no way out; a README walk)
    with pytest.raises(ValueError, match=r"Name the folder of normal .*--data.normal_dir.*add ok/ there.*move test/ "):
        dm.setup()
    unlabelled = OneClassDataModule(dataset="folder", root=str(tmp_path / "test"), load_size=8)
    unlabelled.setup()
    assert len(unlabelled.predict_dataset) == 5 and set(unlabelled.predict_dataset.labels.tolist()) == {-1}


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
    options = dict(
        dataset="digits",
        group_size=3,
        n_train_groups=20,
        n_test_groups=20,
        anomaly="easy",
        held_out_classes=[9],
        seed=3,
    )
    dm = GroupDataModule(**options)
    dm.setup()
    for i in range(20):
        classes = dm.test_dataset[i]["member_classes"].tolist()
        assert (9 in classes) == bool(dm.test_dataset.labels[i])
    assert all(9 not in dm.train_dataset[i]["member_classes"].tolist() for i in range(20))
    same = GroupDataModule(**options)
    same.setup()
    assert torch.equal(same.test_dataset.members, dm.test_dataset.members)


def test_group_test_set_does_not_depend_on_the_number_of_training_groups():
    def groups(**kwargs) -> GroupDataModule:
        dm = GroupDataModule(**({"dataset": "digits", "group_size": 4, "n_test_groups": 30, "seed": 5} | kwargs))
        dm.setup()
        return dm

    few, many = groups(n_train_groups=10), groups(n_train_groups=40)
    assert torch.equal(few.test_dataset.members, many.test_dataset.members)
    assert torch.equal(few.test_dataset.labels, many.test_dataset.labels)
    assert torch.equal(few.train_dataset.members, many.train_dataset.members[:10])  # one stream, drawn in order
    # the training stream is the plain seeded generator, so banks built before the streams split still match
    labels = load_split("digits", "train").labels
    expected = sample_groups(labels, list(range(10)), 4, 10, None, torch.Generator().manual_seed(5))
    assert torch.equal(few.train_dataset.members, expected)
    groups(n_train_groups=10, seed=-1)  # torch takes negative seeds: so does the test stream
    # nor do the normal test groups depend on how many anomalous ones are drawn
    normal = few.test_dataset.members[few.test_dataset.labels == 0]
    assert torch.equal(groups(n_train_groups=10, anomaly_ratio=0.2).test_dataset.members[:15], normal)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"group_size": 0}, "group_size=0"),
        ({"anomaly": "medium"}, "anomaly='medium'"),
        ({"anomaly": "easy"}, "held_out_classes"),
        ({"anomaly_ratio": 1.0}, "anomaly_ratio=1.0"),
        ({"n_train_groups": 0}, "n_train_groups=0"),
        # the ratio's count rounds to one kind only: a test set whose AUROC is undefined, seen only at test time
        ({"anomaly_ratio": 0.01, "n_test_groups": 6}, r"gives 0 anomalous test groups: the test set needs both"),
        ({"anomaly_ratio": 0.5, "n_test_groups": 1}, r"n_test_groups=1 gives 0 anomalous"),
        ({"anomaly_ratio": 0.95, "n_test_groups": 10}, r"gives 10 anomalous test groups"),
        ({"anomaly": "easy", "held_out_classes": ["9"]}, r"held_out_classes=\['9'\] must be a list of class indices"),
        ({"anomaly": "easy", "held_out_classes": 9}, r"held_out_classes=9 must be a list"),
        ({"seed": 2**64}, r"seed=18446744073709551616 must be an integer"),
        (
            {"anomaly": "easy", "held_out_classes": np.array([[9]])},
            r"held_out_classes=array\(\[\[9\]\]\) must be a list",
        ),
        ({"pin_memory": "no"}, r"pin_memory='no' must be True or False"),
    ],
)
def test_group_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupDataModule(**({"dataset": "digits"} | kwargs))


def test_group_held_out_classes_take_numpy_integers_and_ranges_as_plain_ints():
    for held_out in ([np.int64(9)], range(9, 10), (9,), np.array([9])):  # an array's truth value is ambiguous
        dm = GroupDataModule(dataset="digits", anomaly="easy", held_out_classes=held_out)
        assert dm.hparams.held_out_classes == [9] and type(dm.hparams.held_out_classes[0]) is int
    with pytest.raises(ValueError, match=r"seed=(np.int64\()?3\)? must be an integer .*pass int\(value\)"):
        GroupDataModule(dataset="digits", seed=np.int64(3))


def test_the_numpy_hint_is_given_to_numpy_integers_only():
    """normal_class=np.int64(3) (a loop over np.unique) got no hint; seed=2**64, a plain int, was told to pass
    int(value)."""
    with pytest.raises(ValueError, match=r"normal_class=(np.int64\()?3\)? must be a class index .*pass int\(value\)"):
        OneClassDataModule(dataset="digits", normal_class=np.int64(3))
    with pytest.raises(ValueError, match=r"seed=18446744073709551616 must be an integer in \[-2\*\*63, 2\*\*63\)\.$"):
        OneClassDataModule(dataset="digits", seed=2**64)


def test_group_classes_that_leave_no_valid_group_are_refused_at_construction():
    """Refused when built, before the dataset's files are read (or downloaded); every class held out gave a torch
    RuntimeError from deep in the sampling (anomaly="easy") or a message about group_size (anomaly="hard")."""
    with pytest.raises(ValueError, match="group_size=11 exceeds the 10 normal classes"):
        GroupDataModule(dataset="digits", group_size=11)
    with pytest.raises(ValueError, match=r"held_out_classes contains 10; valid classes are 0..9"):
        GroupDataModule(dataset="digits", anomaly="easy", held_out_classes=[10])
    for anomaly in ("easy", "hard"):
        with pytest.raises(ValueError, match=r"held_out_classes=\[0, .*, 9\] holds every one of the 10 classes"):
            GroupDataModule(dataset="digits", anomaly=anomaly, held_out_classes=list(range(10)))
    with pytest.raises(ValueError, match=r"anomaly='hard' needs group_size >= 2 .*it is 1 \(the 1 normal class left\)"):
        GroupDataModule(dataset="digits", held_out_classes=list(range(9)))
    GroupDataModule(dataset="digits", anomaly="easy", group_size=9, held_out_classes=[9]).setup()  # one left out


# ------------------------------------------------------------------------------------------------------
# Decoding image files: bit depths, orientation, truncation, size limits (issue 11, items 8, 9 and 15)


def test_16_bit_png_is_scaled_by_its_range_not_clipped(tmp_path):
    values = (np.arange(24 * 32, dtype=np.uint32).reshape(24, 32) * 85).astype(np.uint16)  # 0..65195
    Image.fromarray(values).save(tmp_path / "deep.png")
    expected = np.rint(values / 257.0).astype(np.uint8)  # 65535 -> 255
    image = load_image(tmp_path / "deep.png")
    assert image.dtype == torch.uint8 and image.shape == (3, 24, 32)
    assert all(np.array_equal(image[c].numpy(), expected) for c in range(3))
    sample = ImageFolderDataset([tmp_path / "deep.png"], [0], load_size=24)[0]["image"]  # the folder path too
    assert abs(float(sample.float().mean()) - float(expected.mean())) < 1.0  # 126.4, not 254.6 (clipped)


def test_float_tiff_in_unit_range_is_scaled_and_other_ranges_are_refused(tmp_path):
    values = np.linspace(0.0, 1.0, 16 * 20, dtype=np.float32).reshape(16, 20)
    Image.fromarray(values, mode="F").save(tmp_path / "unit.tif")
    image = load_image(tmp_path / "unit.tif")
    assert np.array_equal(image[0].numpy(), np.rint(values.astype(np.float64) * 255).astype(np.uint8))
    Image.fromarray(values * 1000, mode="F").save(tmp_path / "wide.tif")
    with pytest.raises(UnreadableImageError, match=r"wide.tif: float pixel values span \[0, 1000\].*\[0, 1\]"):
        load_image(tmp_path / "wide.tif")
    assert "wide.tif" in image_problem(tmp_path / "wide.tif")


def test_a_float_image_just_above_the_unit_range_is_refused_not_wrapped_around(tmp_path):
    """A float image slightly above 1 (here [0, 2]) must be refused: accepted, its pixels * 255 wrap around in uint8
    (2.0 read as 254); the [0, 1000] of the test above is refused by a bound of 255 as well."""
    values = np.linspace(0.0, 2.0, 16 * 20, dtype=np.float32).reshape(16, 20)
    Image.fromarray(values, mode="F").save(tmp_path / "over.tif")
    with pytest.raises(UnreadableImageError, match=r"over.tif: float pixel values span \[0, 2\].*\[0, 1\]"):
        load_image(tmp_path / "over.tif")
    assert "over.tif" in image_problem(tmp_path / "over.tif")


@pytest.mark.parametrize("orientation, turns", [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(tmp_path, orientation, turns):
    stored = np.random.default_rng(0).integers(0, 255, (12, 20, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: the camera was turned, display rotated 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    image = load_image(tmp_path / "photo.png").permute(1, 2, 0).numpy()
    assert np.array_equal(image, np.rot90(stored, turns))


def truncated_jpeg(path: Path) -> Path:
    array = np.random.default_rng(1).integers(0, 255, (64, 48, 3), dtype=np.uint8)
    Image.fromarray(array).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_jpeg_is_caught_at_setup_with_its_name_under_both_policies(tmp_path):
    root = make_folder(tmp_path, corrupt=False)
    truncated_jpeg(root / "train" / "cut.jpg")
    dm = OneClassDataModule(dataset="folder", root=str(root), load_size=16)
    with pytest.warns(UserWarning, match=r"skipping 1 unreadable image file.*cut.jpg.*truncated"):
        dm.setup()
    assert len(dm.train_dataset) == 5 and dm.train_dataset.skipped == [root / "train" / "cut.jpg"]
    assert sum(len(batch["image"]) for batch in dm.train_dataloader()) == 5  # the epoch runs to its end
    with pytest.raises(ValueError, match=r"1 unreadable image file.*cut.jpg.*truncated"):
        OneClassDataModule(dataset="folder", root=str(root), on_corrupt="raise").setup()


def test_a_file_broken_after_the_check_fails_with_its_name(tmp_path):
    path = tmp_path / "later.jpg"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(path)
    dataset = ImageFolderDataset([path], [0], load_size=8)
    truncated_jpeg(path)
    with pytest.raises(UnreadableImageError, match=r"later.jpg: cannot decode.*truncated"):
        dataset[0]


def test_a_train_folder_with_no_readable_image_is_an_error(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.png").write_bytes(b"not a png")
    truncated_jpeg(tmp_path / "train" / "b.jpg")
    dm = OneClassDataModule(dataset="folder", root=str(tmp_path))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"none of the 2 image file\(s\) under .*train"):
        dm.setup()


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header announces width x height; its pixel data is a stub (it is never decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("width, height", [(10_000, 10_000), (20_000, 10_000)])
def test_huge_images_are_refused_with_the_reason_before_decoding(tmp_path, width, height):
    path = png_header_only(tmp_path / "huge.png", width, height)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        with pytest.raises(ImageTooLargeError, match=rf"huge.png: .*{width * height} pixels"):
            load_image(path, 224)
        problem = image_problem(path, 224)
    assert "huge.png" in problem and f"{width * height} pixels" in problem and "MAX_IMAGE_PIXELS" in problem
    with pytest.raises(ValueError, match=r"1 unreadable image file.*huge.png.*(exceeds|too large)"):
        ImageFolderDataset([path], [0], 224, on_corrupt="raise")


def test_the_pixel_limit_is_configurable_and_jpeg_drafts_count_after_reduction(tmp_path):
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(small)
    with pytest.raises(ImageTooLargeError, match=r"20x20 = 400 pixels exceeds the limit of 399"):
        load_image(small, max_pixels=399)
    assert load_image(small, max_pixels=400).shape == (3, 20, 20)
    (tmp_path / "train").mkdir()
    small.rename(tmp_path / "train" / "small.png")
    with pytest.raises(ValueError, match="none of the 1 image file"), pytest.warns(UserWarning, match="exceeds"):
        OneClassDataModule(dataset="folder", root=str(tmp_path), max_image_pixels=100).setup()
    # a 2000 x 1600 JPEG (3.2 MP) decodes at 1/8 scale (250 x 200) when 100 px is asked for
    gradient = np.add.outer(np.arange(1600) // 7, np.arange(2000) // 9).astype(np.uint8)
    Image.fromarray(gradient).save(tmp_path / "big.jpg", quality=95)
    image = load_image(tmp_path / "big.jpg", size=100, max_pixels=100_000)
    with pytest.raises(ImageTooLargeError, match="2000x1600"):
        load_image(tmp_path / "big.jpg", max_pixels=100_000)
    full = load_image(tmp_path / "big.jpg", size=100)  # default limit: same reduced decode, same result
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(gradient)[None, None].float(), size=(100, 100), mode="bilinear", antialias=True
    )[0, 0]
    assert torch.equal(image, full) and (image[0].float() - reference).abs().mean() < 2.0


def test_a_jpeg_decoded_at_a_reduced_scale_keeps_the_detail_of_the_size_asked_for(tmp_path):
    """A JPEG four times larger than ``size`` is decoded at 1/4 scale (exactly ``size``), not at 1/8 and upscaled."""
    x = np.arange(512)
    pattern = 127.5 + 100 * np.sin(2 * np.pi * x / 24)[:, None] * np.cos(2 * np.pi * x / 24)[None, :]
    rgb = np.stack([pattern, pattern.T, 255 - pattern], -1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "fine.jpg", quality=95)
    full = torch.from_numpy(np.array(Image.open(tmp_path / "fine.jpg").convert("RGB"))).permute(2, 0, 1)
    # independent reference: the full-size decode, antialiased down to 128 x 128
    reference = torch.nn.functional.interpolate(full[None].float(), size=(128, 128), mode="bilinear", antialias=True)
    image = load_image(tmp_path / "fine.jpg", size=128)
    assert image.shape == (3, 128, 128)
    assert (image.float() - reference[0]).abs().mean() < 10.0  # 5.9 at the 1/4 scale; 20.1 decoded at 1/8


def test_a_raised_pixel_limit_holds_in_spawned_workers(tmp_path, monkeypatch):
    """macOS and Windows start DataLoader workers by spawn, which re-imports the modules at their defaults: the
    limits in force when the dataset checked its files must still be the ones its workers load with."""
    from dn2_lightning.data import images

    Image.fromarray(np.full((32, 32, 3), 7, dtype=np.uint8)).save(tmp_path / "a.png")  # 1024 pixels
    monkeypatch.setenv("DN2_MAX_IMAGE_PIXELS", "100")  # what a fresh import in a worker starts from
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 10_000)  # the user raised it in this process
    dataset = ImageFolderDataset([tmp_path / "a.png"], [0], 16)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1, multiprocessing_context="spawn")
    (batch,) = list(loader)
    assert batch["image"].shape == (1, 3, 16, 16) and int(batch["image"].float().mean().round()) == 7
    # Pillow's own limit (which the library's error message tells users to raise) goes along the same way, into
    # worker processes only: in this process copy.copy and deepcopy unpickle too, and change nothing
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    built_unlimited = ImageFolderDataset([tmp_path / "a.png"], [0], 16)
    shipped = pickle.dumps(built_unlimited)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # the default again, as in a fresh worker
    copy.deepcopy(built_unlimited), copy.copy(built_unlimited), pickle.loads(shipped)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())  # as in a worker
    assert len(pickle.loads(shipped)) == 1 and Image.MAX_IMAGE_PIXELS is None
    Image.MAX_IMAGE_PIXELS = 1_100
    shipped = pickle.dumps(ImageFolderDataset([tmp_path / "a.png"], [0], 16))
    Image.MAX_IMAGE_PIXELS = 5_000
    pickle.loads(shipped)
    assert Image.MAX_IMAGE_PIXELS == 5_000  # a lower limit than the worker's own is not imposed on it
    older = ImageFolderDataset([tmp_path / "a.png"], [0], 16)
    del older._pillow_max_pixels  # pickled by a version without it: nothing is changed
    pickle.loads(pickle.dumps(older))
    assert Image.MAX_IMAGE_PIXELS == 5_000


def test_datamodules_expose_load_size_and_pixel_format(tmp_path):
    folder = OneClassDataModule(dataset="folder", root=str(make_folder(tmp_path, corrupt=False)))
    assert folder.hparams.load_size == 224 and folder.hparams.pixel_format == PIXEL_FORMAT
    digits = OneClassDataModule(dataset="digits", load_size=32)
    assert digits.hparams.load_size == 32 and digits.hparams.pixel_format["dtype"] == "uint8"
    assert next(iter(digits.train_dataloader()))["image"].shape[-2:] == (32, 32)
    groups = GroupDataModule(dataset="digits", group_size=2, n_train_groups=3, n_test_groups=4, load_size=16)
    assert groups.hparams.load_size == 16 and groups.hparams.pixel_format == PIXEL_FORMAT
    assert next(iter(groups.test_dataloader()))["image"].shape[-2:] == (16, 16)


def test_a_pil_jpeg_opened_from_a_file_is_decoded_as_its_file(tmp_path):
    # score_images(Image.open(f)) decoded it at full size, dn2 predict at the JPEG draft scale: pixels 0.8 apart on
    # average, and a review's score 276 instead of 396 for the same file
    x = np.linspace(0, 1, 512)
    pattern = np.sin(40 * x)[:, None] * np.cos(23 * x)[None, :] * 127 + 128
    path = tmp_path / "big.jpg"
    Image.fromarray(np.stack([pattern, pattern.T, 255 - pattern], -1).astype(np.uint8)).save(path, quality=90)
    ((from_file, _),) = as_image_batches(str(path), load_size=64)
    opened = Image.open(path)
    ((from_pil, _),) = as_image_batches(opened, load_size=64)
    assert torch.equal(from_pil, from_file)
    assert opened.size == (512, 512)  # the caller's image is left as it was
    ((decoded, _),) = as_image_batches(Image.open(path).convert("RGB"), load_size=64)  # already decoded
    assert decoded.shape == from_file.shape and not torch.equal(decoded, from_file)


def test_a_contaminated_bank_is_refused_for_another_contamination_seed():
    # the seed drawing the contaminants was not part of the training set's identity: a seed=0 bank scored seed=1 data
    from helpers import linear_backbone, quiet_trainer

    from dn2_lightning import DN2Module

    def digits(**kwargs) -> OneClassDataModule:
        return OneClassDataModule(dataset="digits", batch_size=64, **kwargs)

    seed0, seed1 = digits(contamination=0.1, seed=0), digits(contamination=0.1, seed=1)
    seed0.setup(), seed1.setup()
    assert set(seed0.train_source_indices.tolist()) != set(seed1.train_source_indices.tolist())
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().test(model, datamodule=seed0)
    with pytest.raises(ValueError, match=r"seed=0 \(bank\) vs seed=1 \(datamodule\)"):
        quiet_trainer().test(model, datamodule=seed1)
    clean = DN2Module(k=2, backbone=linear_backbone(), reports=False)  # no contaminants: the seed draws nothing
    quiet_trainer().test(clean, datamodule=digits(seed=0))
    quiet_trainer().test(clean, datamodule=digits(seed=1))


def test_a_group_bank_is_refused_for_other_held_out_classes():
    # held_out_classes was not part of a group bank's identity: groups of classes 0-8 were scored as if of 0-7, 9
    from helpers import linear_backbone, quiet_trainer

    from dn2_lightning import DN2Module

    def groups(held_out: list[int]) -> GroupDataModule:
        options = dict(dataset="digits", group_size=4, n_train_groups=12, n_test_groups=12, anomaly="easy", seed=0)
        return GroupDataModule(held_out_classes=held_out, **options)

    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().test(model, datamodule=groups([9]))
    with pytest.raises(ValueError, match=r"held_out_classes=\[9\] \(bank\) vs held_out_classes=\[8\] \(datamodule\)"):
        quiet_trainer().test(model, datamodule=groups([8]))


def test_a_cifar_file_replaced_in_process_by_a_copy_keeping_size_and_time_is_checked_again(tmp_path, monkeypatch):
    """The MD5 check was remembered per path, size and modification time: a file replaced by another of the same size
    with its time kept (cp -p, rsync -a, an unpacked archive) was unpickled unchecked in the same process."""
    import hashlib
    import pickle

    import torchvision

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    meta = pickle.dumps({"label_names": [f"class {i}" for i in range(10)]})
    batch = pickle.dumps({"data": np.zeros((20, 3072), dtype=np.uint8), "labels": list(range(10)) * 2})
    (folder / "batches.meta").write_bytes(meta)
    (folder / "test_batch").write_bytes(batch)
    published = {name: hashlib.md5(content).hexdigest() for name, content in (("test_batch", batch), ("m", meta))}
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "test_list", [["test_batch", published["test_batch"]]])
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "meta", {"filename": "batches.meta", "md5": published["m"]})
    assert int(load_split("cifar10", "test", tmp_path).images.sum()) == 0  # the published file: read
    other = pickle.dumps({"data": np.ones((20, 3072), dtype=np.uint8), "labels": list(range(10)) * 2})
    assert len(other) == len(batch)
    times = os.stat(folder / "test_batch").st_atime_ns, os.stat(folder / "test_batch").st_mtime_ns
    (folder / "test_batch").write_bytes(other)
    os.utime(folder / "test_batch", ns=times)
    with pytest.raises(ValueError, match=r"test_batch is not CIFAR10's file .*MD5"):
        load_split("cifar10", "test", tmp_path)


def _cifar_row(image: np.ndarray) -> np.ndarray:
    """One CIFAR data row from an [32, 32, 3] image, by the format's description: the 1024 red values of the image in
    row-major order, then the green, then the blue."""
    return np.concatenate([image[:, :, 0].ravel(), image[:, :, 1].ravel(), image[:, :, 2].ravel()])


def _publish(monkeypatch, cls, files: dict, meta_name: str) -> None:
    """Makes the MD5 of the files written the "published" ones of torchvision's ``cls``."""
    import hashlib

    md5 = {name: hashlib.md5(path.read_bytes()).hexdigest() for name, path in files.items()}
    monkeypatch.setattr(cls, "train_list", [])
    monkeypatch.setattr(cls, "test_list", [[name, md5[name]] for name in files if name != meta_name])
    monkeypatch.setattr(cls, "meta", {"filename": meta_name, "md5": md5[meta_name]})


def test_cifar10_images_are_read_upright_from_the_files_channel_planes(tmp_path, monkeypatch):
    """The crafted batches above are all zeros: an image read transposed (height for width) passed them."""
    import torchvision

    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    images[:, 0, :, :] = 255  # a white top row: an image read transposed has a white left column instead
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batch = {"data": np.stack([_cifar_row(image) for image in images]), "labels": [0, 1, 2, 3, 4, 5]}
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class {i}" for i in range(10)]}))
    files = {name: folder / name for name in ("test_batch", "batches.meta")}
    _publish(monkeypatch, torchvision.datasets.CIFAR10, files, "batches.meta")
    split = load_split("cifar10", "test", tmp_path)
    assert split.images.shape == (6, 32, 32, 3) and np.array_equal(split.images.numpy(), images)
    assert split.labels.tolist() == [0, 1, 2, 3, 4, 5]


def test_cifar100_is_read_with_its_20_coarse_superclasses(tmp_path, monkeypatch):
    """The labels are the 20 superclasses (coarse_labels), not the 100 fine classes; no test read a CIFAR-100 file."""
    import torchvision

    coarse_names = [f"superclass {i}" for i in range(20)]
    fine, coarse = [3, 97, 40, 11, 58], [17, 2, 19, 0, 6]
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.zeros((5, 3072), dtype=np.uint8)
    (folder / "test").write_bytes(pickle.dumps({"data": data, "fine_labels": fine, "coarse_labels": coarse}))
    meta = {"fine_label_names": [f"class {i}" for i in range(100)], "coarse_label_names": coarse_names}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    _publish(monkeypatch, torchvision.datasets.CIFAR100, {n: folder / n for n in ("test", "meta")}, "meta")
    split = load_split("cifar100", "test", tmp_path)
    assert split.labels.tolist() == coarse and split.classes == tuple(coarse_names)


def test_a_held_out_class_that_is_not_the_last_never_joins_normal_groups():
    # held-out classes were dropped by position (the last ones) instead of by value: held_out_classes=[0] left
    # class 0 in every normal group and took class 9 out instead
    dm = GroupDataModule(
        dataset="digits", group_size=4, n_train_groups=40, n_test_groups=40, anomaly="easy", held_out_classes=[0]
    )
    dm.setup()
    train_classes = {c for i in range(len(dm.train_dataset)) for c in dm.train_dataset[i]["member_classes"].tolist()}
    assert 0 not in train_classes and 9 in train_classes
    for i in range(len(dm.test_dataset)):
        sample = dm.test_dataset[i]
        assert (0 in sample["member_classes"].tolist()) == bool(sample["label"])


def test_group_member_classes_and_images_follow_the_members_order():
    # member_classes must be the class of members[j], image[j] its image: they were only checked as sets
    dm = GroupDataModule(dataset="digits", group_size=5, n_train_groups=10, n_test_groups=10, seed=2)
    dm.setup()
    source = load_split("digits", "test")
    for i in range(len(dm.test_dataset)):
        sample = dm.test_dataset[i]
        members = sample["members"].tolist()
        assert sample["member_classes"].tolist() == [int(source.labels[j]) for j in members]
        for slot, j in enumerate(members):
            expected = torch.as_tensor(np.asarray(source.images[j]))
            assert torch.equal(sample["image"][slot][0], expected)


def test_a_flat_folder_inside_a_folder_named_train_is_predicted_on(tmp_path):
    # guards the "root/train only" rule against looking at folders above root (as a mutation did)
    root = tmp_path / "train" / "inbox"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"{i}.png")
    dm = OneClassDataModule(dataset="folder", root=str(root), load_size=8)
    dm.setup()
    assert dm.predict_dataset is not None and len(dm.predict_dataset) == 3


def test_load_image_and_anomaly_label_refuse_what_would_read_wrong(tmp_path):
    """load_image(size=0) failed inside torch's resize and max_pixels=-1 refused every image as too large;
    AnomalyLabel(-1) made every sample anomalous and AnomalyLabel("Good") every sample of class "good" (names are
    case-insensitive for normal_class). A review of the public API."""
    from dn2_lightning.data import AnomalyLabel

    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(tmp_path / "a.png")
    for kwargs, match in [
        ({"size": 0}, r"size=0 must be None \(the decoded size\) or an integer >= 1"),
        ({"size": 32.0}, r"size=32.0 must be"),
        ({"size": True}, r"size=True must be"),
        ({"max_pixels": -1}, r"max_pixels=-1 must be None \(MAX_IMAGE_PIXELS\) or an integer >= 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            load_image(tmp_path / "a.png", **kwargs)
    assert load_image(tmp_path / "a.png", size=6, max_pixels=144).shape == (3, 6, 6)
    assert load_image(tmp_path / "a.png", size=np.int64(6), max_pixels=float("inf")).shape == (3, 6, 6)
    with pytest.raises(ValueError, match=r"AnomalyLabel\(normal=-1\): a class index is 0 or more"):
        AnomalyLabel(-1)
    assert [AnomalyLabel("Good")(name) for name in ("good", "GOOD", "crack")] == [0, 0, 1]


def test_a_data_root_that_is_a_file_is_refused(tmp_path):
    """dataset="fashionmnist" with root set to a file passed over it for Debian's copy without a word (a review of
    the public API); a missing folder is fine (a download makes it)."""
    (tmp_path / "notes.txt").write_text("not a folder")
    for make in (OneClassDataModule, GroupDataModule):
        with pytest.raises(ValueError, match=r"root='.*notes.txt' is a file; give the folder that holds"):
            make(dataset="fashionmnist", root=str(tmp_path / "notes.txt"))
        make(dataset="fashionmnist", root=str(tmp_path / "not_yet"))
        make(dataset="fashionmnist", root=tmp_path / "not_yet")
        for wrong in (["a"], 123):  # were accepted here, then failed at set-up inside pathlib (a TypeError)
            with pytest.raises(ValueError, match=r"root=.* must be a folder's path \(a str or pathlib.Path\)"):
                make(dataset="fashionmnist", root=wrong)


def test_a_data_root_given_for_the_bundled_digits_is_said_to_be_unused(tmp_path, monkeypatch):
    """dataset="digits" with root=<a folder> read scikit-learn's bundled copy without a word: a user pointing root at
    their own digits got others. The datamodules, the CLI and dn2-protocol say so; without root, nothing is said."""
    from dn2_lightning import protocol

    unused = r"root='.*mine' is not used for dataset='digits': the digits come bundled with scikit-learn .*'folder'"
    for make in (OneClassDataModule, GroupDataModule):
        with pytest.warns(UserWarning, match=unused):
            make(dataset="digits", root=str(tmp_path / "mine"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            make(dataset="digits")
            make(dataset="fashionmnist", root=str(tmp_path / "mine"))
    monkeypatch.setattr(protocol, "load_split", lambda *args: (_ for _ in ()).throw(RuntimeError("stop here")))
    with pytest.warns(UserWarning, match=unused), pytest.raises(RuntimeError, match="stop here"):
        protocol.run_protocol("digits", root=str(tmp_path / "mine"))


def test_array_image_dataset_takes_numpy_arrays_as_its_tensors():
    """A NumPy uint8 array was refused with "images must be uint8 [N, H, W] ...; got uint8 (10, 8, 8)"."""
    from dn2_lightning.data import ArrayImageDataset

    pixels = np.arange(10 * 8 * 8, dtype=np.uint8).reshape(10, 8, 8)
    from_numpy = ArrayImageDataset(pixels, np.arange(10))
    from_torch = ArrayImageDataset(torch.from_numpy(pixels), torch.arange(10))
    assert torch.equal(from_numpy.batch(0, 10), from_torch.batch(0, 10))
    assert from_numpy[3]["label"] == 3
    with pytest.raises(ValueError, match=r"got torch.float64 \(10, 8, 8\)"):
        ArrayImageDataset(pixels.astype(np.float64), np.arange(10))
    pixels.setflags(write=False)  # as np.load(..., mmap_mode="r") gives: no warning, the memory shared
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shared = ArrayImageDataset(pixels, np.arange(10))
    assert shared.images.data_ptr() == pixels.ctypes.data
    big_endian = ArrayImageDataset(pixels, np.arange(10).astype(">i8"))  # labels read from a file: converted
    assert big_endian[4]["label"] == 4
    flipped = ArrayImageDataset(pixels[:, ::-1], np.arange(10)[::-1])  # negative strides: copied
    assert torch.equal(flipped.batch(0, 10), from_torch.batch(0, 10).flip(2))
    assert flipped[0]["label"] == 9

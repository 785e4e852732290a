"""Raw labelled images of the classification datasets DN2 is evaluated on, one loader per name.

Every loader returns a :class:`LabeledImages` of uint8 images, read once per process (cached). Files are
looked up locally first; datasets that torchvision can download are downloaded only when missing, and a
failed download raises :class:`DatasetNotFoundError` naming the paths searched and the fix.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dn2_lightning.cache import file_stamp
from dn2_lightning.validation import check_choice

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DIGIT_CLASSES = tuple(str(d) for d in range(10))  # digits and MNIST
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR100_COARSE_CLASSES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables", "household_electrical_devices",
    "household_furniture", "insects", "large_carnivores", "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes", "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates",
    "people", "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
)  # fmt: skip
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SPLITS = ("train", "test")
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class LabeledImages:
    """``images`` uint8 ``[N, H, W]`` (grayscale) or ``[N, H, W, 3]``; ``labels`` int64 ``[N]`` indexing
    ``classes``; ``files``: the resolved paths they were read from (empty when built in memory)."""

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]
    files: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.labels.shape[0]

    @functools.cached_property
    def fingerprint(self) -> str:
        """BLAKE2b digest (32 hex digits) of the images, labels and class names: equal iff the content is.

        Computed once per object (about 0.1 s for FashionMNIST's 47 MB train split).
        """
        digest = hashlib.blake2b(digest_size=16)
        for tensor in (self.images, self.labels):
            array = tensor.contiguous().numpy()
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(memoryview(array).cast("B"))
        digest.update(repr(self.classes).encode())
        return digest.hexdigest()


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not on disk and could not be downloaded."""


def default_data_root() -> Path:
    """``$DN2_DATA_DIR`` if set, else ``~/.cache/dn2_lightning/data``."""
    return Path(os.environ.get("DN2_DATA_DIR", Path.home() / ".cache" / "dn2_lightning" / "data"))


def known_classes(name: str) -> tuple[str, ...]:
    """The class names of dataset ``name`` without reading its files (so a ``normal_class`` is checked before any
    work); the files' own names are used once loaded."""
    check_choice("dataset", name, list_datasets())
    return {
        "digits": DIGIT_CLASSES,
        "mnist": DIGIT_CLASSES,
        "fashionmnist": FASHION_MNIST_CLASSES,
        "cifar10": CIFAR10_CLASSES,
        "cifar100": CIFAR100_COARSE_CLASSES,
    }[name]


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_split` (and ``OneClassDataModule(dataset=...)``, plus ``"folder"``)."""
    return sorted(_LOADERS)


def warn_if_root_unused(name: str, root: str | Path | None) -> None:
    """A datamodule's ``root`` for a dataset that is not read from it (scikit-learn's bundled digits): said, as a
    user pointing ``root`` at their own copy would otherwise get the bundled one without a word."""
    if name == "digits" and root is not None:
        warnings.warn(
            f"root={os.fspath(root)!r} is not used for dataset='digits': the digits come bundled with scikit-learn "
            f"({_digits_files()[0]}). For your own images, use dataset='folder' with root=<folder>; otherwise leave "
            "root unset.",
            stacklevel=3,
        )


def load_split(name: str, split: str, root: str | Path | None = None) -> LabeledImages:
    """The ``"train"`` or ``"test"`` split of dataset ``name``, cached in the process per ``(name, split, root)``
    until one of its files changes on disk or the lookup would find other files (a link retargeted, a relative
    ``root`` after a change of directory, a file that now takes precedence).

    Args:
        name: one of :func:`list_datasets`. ``"cifar100"`` uses the 20 coarse superclasses (as the DN2 paper
            does); ``"digits"`` is scikit-learn's bundled 8x8 digits with a fixed split: within each class, in
            dataset order, the first 60% (rounded down) are train and the rest test.
        split: ``"train"`` or ``"test"``.
        root: folder holding the files; ``None`` = :func:`default_data_root`.

    Raises:
        DatasetNotFoundError: the files are neither on disk nor downloadable.

    >>> digits = load_split("digits", "train")
    >>> digits.images.shape[1:], digits.images.dtype, len(digits.classes)
    (torch.Size([8, 8]), torch.uint8, 10)
    """
    if name not in _LOADERS:
        raise ValueError(f"name={name!r} is not a known dataset; choose one of {list_datasets()}.")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {list(SPLITS)}.")
    # absolute (not resolved): a relative root read again after a change of working directory is another folder
    return _load_cached(name, split, os.path.abspath(Path(root) if root is not None else default_data_root()))


_LOADED: OrderedDict[tuple[str, str, str], tuple[tuple, LabeledImages]] = OrderedDict()  # the 8 latest splits


def _file_stamps(files: tuple[str, ...]) -> tuple:
    """(path, inode, size, modification and change times) of each file: a file rewritten or replaced on disk
    changes its stamp."""
    try:
        return tuple((file, *file_stamp(file)) for file in files)
    except OSError:
        return ()  # gone: never equal to the stamps recorded at load time


def _load_cached(name: str, split: str, root: str) -> LabeledImages:
    """``load_split``'s in-process cache: a split is read again when one of its files changed on disk (a
    notebook or service that rewrites the data between runs gets the new images, as a new process would)."""
    key = (name, split, root)
    cached = _LOADED.get(key)
    # the files the loader would read now (a link retargeted, a file that now takes precedence: other files) and
    # their stamps (rewritten or replaced in place)
    if (
        cached is not None
        and _locate_files(name, split, Path(root)) == cached[1].files
        and _file_stamps(cached[1].files) == cached[0]
    ):
        _LOADED.move_to_end(key)
        return cached[1]
    loaded = _LOADERS[name](split, Path(root))
    _LOADED[key] = (_file_stamps(loaded.files), loaded)
    while len(_LOADED) > 8:
        _LOADED.popitem(last=False)
    return loaded


# --------------------------------------------------------------------------------------------------
# MNIST-style IDX files


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzip-compressed) of unsigned bytes as a numpy array.

    Raises:
        ValueError: the magic number is not that of an unsigned-byte IDX file, or the size does not match.
    """
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    # magic: two zero bytes, the element type (0x08 = unsigned byte), the number of dimensions
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] == 0:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()}, expected 000008xx).")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise ValueError(f"{path} holds {len(data) - offset} bytes of data, its header says shape {shape}.")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def _locate_files(name: str, split: str, root: Path) -> tuple[str, ...] | None:
    """The resolved files dataset ``name``'s loader would read from ``root`` now, found without reading them;
    ``None`` where it would download them (never equal to a loaded split's files)."""
    if name in ("fashionmnist", "mnist"):
        torchvision_name = "FashionMNIST" if name == "fashionmnist" else "MNIST"
        found = _find_idx(split, _idx_folders(root, torchvision_name))
        return None if found is None else tuple(str(p.resolve()) for p in found)
    if name in ("cifar10", "cifar100"):
        folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
        return tuple(str((folder / n).resolve()) for n in _cifar_names(name, split))
    return _digits_files()


def _idx_folders(root: Path, torchvision_name: str) -> list[Path]:
    """Where MNIST-style IDX files of ``torchvision_name`` are looked for, first match first."""
    # never a bare root: MNIST and FashionMNIST files have the same names, so one would be read as the other
    folders = [root / torchvision_name / "raw"]
    if root.name == "raw" and root.parent.name == torchvision_name:  # root given as torchvision's own folder
        folders.insert(0, root)
    if torchvision_name == "FashionMNIST":
        folders.append(DEBIAN_FASHION_MNIST)
    return folders


def _find_idx(split: str, folders: list[Path]) -> tuple[Path, Path] | None:
    for folder in folders:
        found = []
        for stem in _IDX_FILES[split]:
            candidates = [folder / f"{stem}.gz", folder / stem]
            found.append(next((p for p in candidates if p.is_file()), None))
        if all(found):
            return found[0], found[1]
    return None


def _mnist_like(split: str, root: Path, torchvision_name: str, classes: tuple[str, ...], hint: str) -> LabeledImages:
    folders = _idx_folders(root, torchvision_name)
    found = _find_idx(split, folders)
    if found is None and _find_idx(split, [root]) is not None:
        raise DatasetNotFoundError(
            f"{torchvision_name} {split} files were looked for in {[str(f) for f in folders]}; IDX files of these "
            f"names lie directly in {root}, but MNIST and FashionMNIST name their files alike, so neither is read "
            f"from there. If they are {torchvision_name}'s, move them to {folders[0]} (torchvision's layout)."
        )
    if found is None:
        import torchvision

        try:
            getattr(torchvision.datasets, torchvision_name)(str(root), train=split == "train", download=True)
        except Exception as err:
            raise DatasetNotFoundError(
                f"{torchvision_name} {split} files {list(_IDX_FILES[split])} (.gz or not) were not found in "
                f"{[str(f) for f in folders]} and could not be downloaded ({type(err).__name__}: {err}). {hint}"
            ) from err
        found = _find_idx(split, folders)
        assert found is not None, "torchvision downloaded the files to an unexpected place"
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{found[0]} {images.shape} and {found[1]} {labels.shape} are not N images and N labels.")
    files = tuple(str(p.resolve()) for p in found)
    return LabeledImages(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)), classes, files)


def _fashionmnist(split: str, root: Path) -> LabeledImages:
    hint = (
        f"Offline: `apt-get install dataset-fashion-mnist` (files land in {DEBIAN_FASHION_MNIST}) "
        f"or download them into {root / 'FashionMNIST' / 'raw'}."
    )
    return _mnist_like(split, root, "FashionMNIST", FASHION_MNIST_CLASSES, hint)


def _mnist(split: str, root: Path) -> LabeledImages:
    hint = f"Offline: download the four MNIST IDX files into {root / 'MNIST' / 'raw'}."
    return _mnist_like(split, root, "MNIST", DIGIT_CLASSES, hint)


# --------------------------------------------------------------------------------------------------
# CIFAR


def _cifar_files(cls_name: str, folder: str, archive: str, files: list[str], root: Path) -> Path:
    """``root/folder``, downloading the archive with torchvision only when one of ``files`` is missing; each
    file is checked against its published MD5 before anything unpickles it."""
    import torchvision

    dataset = getattr(torchvision.datasets, cls_name)
    path = root / folder
    if not all((path / f).is_file() for f in files):
        try:
            dataset(str(root), download=True)
        except Exception as err:
            raise DatasetNotFoundError(
                f"{cls_name}: {files} not found in {path} and the download failed ({type(err).__name__}: {err}). "
                f"Download {archive} from https://www.cs.toronto.edu/~kriz/ and extract it into {root} "
                f"(it creates the folder {folder})."
            ) from err
    published = dict([*dataset.train_list, *dataset.test_list, (dataset.meta["filename"], dataset.meta["md5"])])
    for name in files:
        file = path / name
        if not _has_md5(str(file), file_stamp(file), published[name]):
            raise ValueError(
                f"{file} is not {cls_name}'s file {name}: its MD5 differs from the published one (a download cut "
                f"short, a damaged copy or another file), so it is not read (CIFAR files are pickles, which can run "
                f"code). Delete {path} and run again to download it, or extract {archive} from "
                f"https://www.cs.toronto.edu/~kriz/ into {root}."
            )
    return path


@functools.cache
def _has_md5(file: str, stamp: tuple[int, int, int, int], md5: str) -> bool:
    """Whether ``file`` has this MD5, remembered per :func:`~dn2_lightning.cache.file_stamp` (checked once per
    process and version of the file)."""
    from torchvision.datasets.utils import check_integrity

    return check_integrity(file, md5)


def _unpickle(path: Path) -> dict:
    # the CIFAR archives are pickles by design (torchvision reads them the same way); only files whose MD5
    # matched the published one get here
    with path.open("rb") as f:
        return pickle.load(f, encoding="latin1")


def _cifar_names(name: str, split: str) -> list[str]:
    """The files of a CIFAR split, in the folder its archive extracts to."""
    if name == "cifar100":
        return [split]
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


def _cifar10(split: str, root: Path) -> LabeledImages:
    names = _cifar_names("cifar10", split)
    folder = _cifar_files("CIFAR10", "cifar-10-batches-py", "cifar-10-python.tar.gz", [*names, "batches.meta"], root)
    batches = [_unpickle(folder / n) for n in names]
    images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.concatenate([b["labels"] for b in batches])
    classes = tuple(_unpickle(folder / "batches.meta")["label_names"])
    files = tuple(str((folder / n).resolve()) for n in names)
    return LabeledImages(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)), classes, files)


def _cifar100_coarse(split: str, root: Path) -> LabeledImages:
    """CIFAR-100 with its 20 coarse superclasses as classes, as the DN2 paper evaluates it."""
    folder = _cifar_files("CIFAR100", "cifar-100-python", "cifar-100-python.tar.gz", [split, "meta"], root)
    batch = _unpickle(folder / split)
    images = np.asarray(batch["data"]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.asarray(batch["coarse_labels"], dtype=np.int64)
    classes = tuple(_unpickle(folder / "meta")["coarse_label_names"])
    files = tuple(str((folder / n).resolve()) for n in _cifar_names("cifar100", split))
    return LabeledImages(torch.from_numpy(images.copy()), torch.from_numpy(labels), classes, files)


# --------------------------------------------------------------------------------------------------
# scikit-learn digits: bundled with scikit-learn, works with no network at all


def _digits_files() -> tuple[str, ...]:
    import sklearn.datasets

    return (str((Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz").resolve()),)


def _digits(split: str, root: Path) -> LabeledImages:
    """scikit-learn's 1,797 8x8 digits (0..16 scaled to 0..255).

    Fixed split, no randomness: within each class, in dataset order, the first 60% (rounded down) of that
    class's samples are train and the rest test (1,074 train / 723 test).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    files = _digits_files()
    images = np.round(bunch.images * 255.0 / 16.0).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    in_train = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        members = np.flatnonzero(labels == c)
        in_train[members[: int(0.6 * len(members))]] = True
    keep = in_train if split == "train" else ~in_train
    return LabeledImages(torch.from_numpy(images[keep].copy()), torch.from_numpy(labels[keep]), DIGIT_CLASSES, files)


_LOADERS: dict[str, Callable[[str, Path], LabeledImages]] = {
    "cifar10": _cifar10,
    "cifar100": _cifar100_coarse,
    "digits": _digits,
    "fashionmnist": _fashionmnist,
    "mnist": _mnist,
}

"""One-class (unimodal) DataModule: one class is normal, the whole test split is scored.

With ``contamination > 0`` it gives the unsupervised setting of the paper (§3.2): the train set also
holds a seeded sample of anomalies from the other classes, and keeps the bookkeeping of which ones.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from dn2_lightning.console import info
from dn2_lightning.data.classes import check_class_ref, draw_contaminants, resolve_class
from dn2_lightning.data.datasets import (
    CORRUPT_POLICIES,
    IMAGE_EXTENSIONS,
    PIXEL_FORMAT,
    REPORTS_DIR,
    ArrayImageDataset,
    CorruptPolicy,
    ImageFolderDataset,
    files_fingerprint,
    is_hidden,
    list_image_files,
)
from dn2_lightning.data.masks import with_mvtec_masks
from dn2_lightning.data.sources import SPLITS, known_classes, list_datasets, load_split, warn_if_root_unused
from dn2_lightning.data.synthetic import ensure_synthetic_defects
from dn2_lightning.validation import (
    as_python,
    check_bool,
    check_choice,
    check_contamination,
    check_data_root,
    check_int,
    check_load_size,
    check_positive_int,
    check_seed,
)

FOLDER = "folder"
SYNTHETIC = "synthetic"  # a folder in MVTec AD layout that dn2_lightning.data.synthetic writes on first use
DEFAULT_FOLDER_LOAD_SIZE = 224


def _refuse_files_reached_twice(paths: list[Path], labels: list[int], test: Path) -> None:
    """ValueError when one file is listed more than once under ``test`` (a folder link from one kind to another
    kind's folder, or to a folder another kind links to): it would be scored twice, perhaps with both labels."""
    reached: dict[str, list[str]] = {}
    for path, label in zip(paths, labels, strict=True):
        reached.setdefault(os.path.realpath(path), []).append(f"{path} (label {label})")
    twice = [listed for listed in reached.values() if len(listed) > 1]
    if twice:
        raise ValueError(
            f"{len(twice)} test image file(s) are reached more than once under {test} through links, so they would "
            f"be scored more than once, perhaps under two labels: e.g. {' and '.join(twice[0])}. Keep each image in "
            "one kind's folder (remove the link, or copy the files)."
        )


class OneClassDataModule(LightningDataModule):
    """Train on one normal class, test on the whole test split (label 1 = any other class).

    Args:
        dataset: a name from :func:`dn2_lightning.data.list_datasets`, or ``"folder"`` for your own images:
            ``root/train/`` holds normal images, ``root/test/<name>/`` one folder per kind, the normal one
            named ``normal_dir``. A ``root`` without ``test/`` is predicted on as a flat folder. Test images
            get ground-truth masks (``gt_mask``) from ``root/ground_truth/<kind>/<stem>_mask.png`` when that
            folder exists (MVTec AD). ``"synthetic"``: a folder of textures with pasted defects and exact
            masks, written on first use (:mod:`dn2_lightning.data.synthetic`).
        normal_class: index or (case-insensitive) name of the normal class; ignored for folders.
        root: where the files are (default ``$DN2_DATA_DIR`` or ``~/.cache/dn2_lightning/data``).
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        load_size: resize images to this square size while loading (CPU, uint8); ``None`` keeps the native
            size (folders: 224). Not the model's resolution: the backbone resizes to its own ``input_size`` on
            the device. ``hparams.load_size`` holds the size actually used, ``hparams.pixel_format`` what
            the images are (uint8 RGB 0..255), for the model to record.
        contamination: fraction of the train set made of anomalies from the other classes (unsupervised
            setting); 0 = clean.
        seed: seeds the choice of contaminants.
        normal_dir: name of the normal test subfolder (folders only).
        on_corrupt: unreadable image files (checked at set-up) are ``"skip"``-ped with a warning naming each
            file and reason, or ``"raise"`` an error; a split left with no readable image is an error either way.
        pin_memory: pin batches when CUDA is available.
        max_image_pixels: folders: larger images are unreadable (reason given); ``None`` =
            ``dn2_lightning.data.images.MAX_IMAGE_PIXELS`` (89.5 MP unless changed).
    """

    def __init__(
        self,
        dataset: str = "fashionmnist",
        normal_class: int | str = 0,
        root: str | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        load_size: int | None = None,
        contamination: float = 0.0,
        seed: int = 0,
        normal_dir: str = "good",
        on_corrupt: CorruptPolicy = "skip",
        pin_memory: bool = True,
        max_image_pixels: int | None = None,
    ) -> None:
        super().__init__()
        check_choice("dataset", dataset, [*list_datasets(), SYNTHETIC, FOLDER])
        check_class_ref("normal_class", normal_class)
        if dataset in list_datasets():  # out of range or an unknown name: refused now, not at set-up
            resolve_class(normal_class, known_classes(dataset))
        check_positive_int("batch_size", batch_size)
        check_int("num_workers", num_workers, minimum=0)
        check_load_size(load_size)
        check_bool("pin_memory", pin_memory)
        check_data_root(root)
        warn_if_root_unused(dataset, root)
        check_contamination(contamination)
        check_seed("seed", seed)
        check_choice("on_corrupt", on_corrupt, CORRUPT_POLICIES)
        check_positive_int("max_image_pixels", max_image_pixels, allow_none=True)
        if dataset == FOLDER and (root is None or not Path(root).is_dir()):
            raise ValueError(f"root={root!r} must be an existing directory for dataset='folder'.")
        if dataset in (FOLDER, SYNTHETIC) and contamination:  # (synthetic's training set was silently clean)
            raise ValueError(
                f"contamination={contamination!r} is not supported for dataset={dataset!r} (only 0.0): "
                "contaminants are drawn from the other classes of a classification dataset."
            )
        self.save_hyperparameters()
        self.hparams.update(as_python(dict(self.hparams)))  # NumPy numbers as Python ones, for checkpoints
        if dataset in (FOLDER, SYNTHETIC) and load_size is None:
            self.hparams.load_size = DEFAULT_FOLDER_LOAD_SIZE  # the size used, for the model to record
        self.hparams.pixel_format = dict(PIXEL_FORMAT)
        self.train_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self.predict_dataset: Dataset | None = None
        self.classes: tuple[str, ...] = ()
        self.normal_class_index: int | None = None
        self.normal_class_name: str | None = None
        self.train_is_contaminant = torch.empty(0, dtype=torch.bool)
        self.train_source_indices = torch.empty(0, dtype=torch.long)
        self.test_source_indices = torch.empty(0, dtype=torch.long)
        self._train_listing: tuple[Path, list[Path]] | None = None  # folders: root/train and its image files

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets (once; later calls do nothing)."""
        if self._train_listing is not None or self.test_dataset is not None or self.predict_dataset is not None:
            return
        if self.hparams.dataset == SYNTHETIC:
            self.hparams.root = str(ensure_synthetic_defects(self.hparams.root))
        try:
            if self.hparams.dataset in (FOLDER, SYNTHETIC):
                self._setup_folder()
            else:
                self._setup_classes()
        except BaseException:  # e.g. a mask refused after the test images were read: the next call starts afresh
            self.train_dataset = self.test_dataset = self.predict_dataset = self._train_listing = None
            raise

    def train_set_identity(self) -> dict[str, Any] | None:
        """What defines the training images (dataset, normal class by index, contamination and its seed), for
        a memory bank built from them to recognise other training data. Folders: the number of image files under
        ``root/train`` (readable or not) and a fingerprint of their names (relative to it, so the folder may move)
        and sizes (also for ``"synthetic"``); ``None`` for a flat folder to predict on, which has no training
        images."""
        hp = self.hparams
        kind = type(self).__name__
        if hp.dataset in (FOLDER, SYNTHETIC):  # a synthetic set's files tell its settings (seed, sizes) apart
            self.setup()
            if self._train_listing is None or not self._train_listing[1]:
                return None
            folder, files = self._train_listing
            fingerprint = files_fingerprint(files, folder)
            return {"datamodule": kind, "dataset": hp.dataset, "train_images": len(files), "train_files": fingerprint}
        self.setup()  # the class index of a class given by name
        identity = {"datamodule": kind, "dataset": hp.dataset, "normal_class": self.normal_class_index}
        identity["contamination"] = hp.contamination
        if hp.contamination:
            identity["seed"] = hp.seed
        return identity

    def _setup_classes(self) -> None:
        hp = self.hparams
        train, test = load_split(hp.dataset, "train", hp.root), load_split(hp.dataset, "test", hp.root)
        self.classes = train.classes
        self.normal_class_index = resolve_class(hp.normal_class, train.classes)
        self.normal_class_name = train.classes[self.normal_class_index]
        normal = (train.labels == self.normal_class_index).nonzero().flatten()
        if len(normal) == 0:
            raise ValueError(f"normal_class={hp.normal_class!r} has no training samples in {hp.dataset}.")
        contaminants = draw_contaminants(train.labels, self.normal_class_index, hp.contamination, hp.seed)
        train_indices = torch.cat([normal, contaminants])
        self.train_is_contaminant = torch.cat(
            [torch.zeros(len(normal), dtype=torch.bool), torch.ones(len(contaminants), dtype=torch.bool)]
        )
        self.train_source_indices = train_indices
        self.test_source_indices = torch.arange(len(test))
        self.train_dataset = ArrayImageDataset(
            train.images[train_indices], self.train_is_contaminant.long(), hp.load_size
        )
        self.test_dataset = ArrayImageDataset(
            test.images, (test.labels != self.normal_class_index).long(), hp.load_size
        )
        self.predict_dataset = self.test_dataset

    def _setup_folder(self) -> None:
        hp = self.hparams
        root = Path(os.path.abspath(hp.root))  # paths in reports and checkpoints point at the files from anywhere
        self.normal_class_index, self.normal_class_name = 0, hp.normal_dir
        if (root / "train").is_dir():
            paths = list_image_files(root / "train")
            self._train_listing = (root / "train", paths)
            if not paths:
                raise ValueError(f"root={hp.root!r}: no images under {root / 'train'} (extensions {IMAGE_EXTENSIONS}).")
            self.train_dataset = self._folder_dataset(paths, [0] * len(paths), root / "train")
            self.train_is_contaminant = torch.zeros(len(self.train_dataset), dtype=torch.bool)
            self.train_source_indices = torch.arange(len(self.train_dataset))
        if (root / "test").is_dir():
            entries = [p for p in (root / "test").iterdir() if not is_hidden(p.name)]
            if (root / "test" / REPORTS_DIR).is_dir():  # reports of a run whose log dir was test/: not a kind
                info(f"DN2: {root / 'test' / REPORTS_DIR} holds this library's reports: its images are not read.")
            kinds = sorted(p.name for p in entries if p.is_dir() and p.name != REPORTS_DIR)
            dangling = sorted(p.name for p in entries if p.is_symlink() and not p.exists())
            if dangling:
                warnings.warn(
                    f"{len(dangling)} test folder(s) are not read: "
                    f"{'; '.join(f'test/{name} (a link to nothing)' for name in dangling)}; their images are not "
                    "scored: mend the links (e.g. mount the disk they point at).",
                    stacklevel=2,
                )
            if hp.normal_dir not in kinds:
                raise ValueError(
                    f"normal_dir={hp.normal_dir!r} is not a subfolder of {root / 'test'}; found {kinds}. Name the "
                    f"folder of normal test images (normal_dir=..., --data.normal_dir=...), add {hp.normal_dir}/ "
                    f"there with normal images, or move test/ aside (a fit does not read it; a predict on "
                    f"root={str(root / 'test')!r} scores its images without labels)."
                )
            alike = [k for k in kinds if k != hp.normal_dir and k.casefold() == hp.normal_dir.casefold()]
            if alike:  # on a case-sensitive disk, two folders of normal images by intent
                warnings.warn(
                    f"test/{alike[0]} is read as an anomalous kind (label 1) beside test/{hp.normal_dir}, the normal "
                    f"one: folder names are compared as they are written. If its images are normal, move them into "
                    f"test/{hp.normal_dir}.",
                    stacklevel=2,
                )
            self.classes = tuple(kinds)
            loose = sorted(
                p.name for p in (root / "test").iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if loose:
                warnings.warn(
                    f"{len(loose)} image(s) directly in {root / 'test'} (e.g. {loose[:3]}) are not scored: a test "
                    f"image's folder is its kind. Move them into test/{hp.normal_dir}/ (normal) or test/<defect>/.",
                    stacklevel=2,
                )
            paths, labels, empty = [], [], []
            for kind in kinds:
                files = list_image_files(root / "test" / kind)
                paths += files
                labels += [int(kind != hp.normal_dir)] * len(files)
                empty += [] if files else [kind]
            _refuse_files_reached_twice(paths, labels, root / "test")
            if empty:
                warnings.warn(
                    f"{len(empty)} test folder(s) hold no image (extensions {IMAGE_EXTENSIONS}): "
                    f"{[f'test/{kind}' for kind in empty]}; they add no sample to the test set.",
                    stacklevel=2,
                )
            self.test_dataset = self._folder_dataset(paths, labels, root / "test")
            self.test_dataset = with_mvtec_masks(self.test_dataset, root, hp.normal_dir)
            self.test_source_indices = torch.arange(len(self.test_dataset))
            self.predict_dataset = self.test_dataset
        else:  # a flat folder of images to score: labels unknown
            # root/train holds the training images (MVTec's layout without test/), and then root/ground_truth its
            # masks, not images to score; a train/ deeper down, or a ground_truth/ without train/, is the user's
            left_out = ("train", "ground_truth") if (root / "train").is_dir() else ("train",)
            paths = [p for p in list_image_files(root) if p.relative_to(root).parts[0] not in left_out]
            self.predict_dataset = self._folder_dataset(paths, [-1] * len(paths), root) if paths else None

    def _folder_dataset(self, paths: list[Path], labels: list[int], folder: Path) -> ImageFolderDataset:
        """The checked dataset of ``paths``; ValueError when files were listed but none of them is readable."""
        hp = self.hparams
        dataset = ImageFolderDataset(paths, labels, hp.load_size, hp.on_corrupt, hp.max_image_pixels)
        if paths and not len(dataset):
            reasons = "; ".join(dataset.problems[:3]) + (" ..." if len(dataset.problems) > 3 else "")
            raise ValueError(
                f"root={hp.root!r}: none of the {len(paths)} image file(s) under {folder} can be read, so there "
                f"is nothing to {'train on' if folder.name == 'train' else 'score'}. Reasons: {reasons}"
            )
        return dataset

    def prepare_data(self) -> None:
        """Download the dataset's files (``dataset="synthetic"``: write them) unless they are there. Lightning runs
        this once per node (``prepare_data_per_node``), not on every rank as ``setup`` is."""
        if self.hparams.dataset == SYNTHETIC:
            ensure_synthetic_defects(self.hparams.root)
        elif self.hparams.dataset != FOLDER:
            for split in SPLITS:
                load_split(self.hparams.dataset, split, self.hparams.root)

    def _loader(self, split: str) -> DataLoader:
        self.setup()
        dataset = {"train": self.train_dataset, "test": self.test_dataset, "predict": self.predict_dataset}[split]
        hp = self.hparams
        if dataset is None:
            where = "image files outside train/" if split == "predict" else f"the folder {Path(hp.root) / split}"
            raise ValueError(f"root={hp.root!r} has no {split} images: expected {where}.")
        return DataLoader(
            dataset,
            batch_size=hp.batch_size,
            shuffle=False,  # a deterministic bank order
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """The train set (normal class, plus contaminants if any), in a fixed order."""
        return self._loader("train")

    def test_dataloader(self) -> DataLoader:
        """The whole test split, label 1 for every class other than the normal one."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test split (for folders without ``test/``, every image outside ``train/``)."""
        return self._loader("predict")

    def source_paths(self, split: str = "test") -> list[str] | None:
        """File paths of a split's samples by index (folders only)."""
        self.setup()
        dataset = {"train": self.train_dataset, "test": self.test_dataset}.get(split, self.predict_dataset)
        paths = getattr(dataset, "paths", None)  # image-file datasets, with or without masks
        return [str(p) for p in paths] if paths is not None else None

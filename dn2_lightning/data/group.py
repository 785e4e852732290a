"""Group anomaly detection data (paper §3.3): a sample is a set of M images.

A normal group holds M images of M different classes. The hard anomaly keeps every image individually
normal but breaks the composition: one class appears twice and another is missing. The easy anomaly
swaps one member for an image of a class that never appears in normal groups (``held_out_classes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any, Literal, get_args

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dn2_lightning.data.datasets import PIXEL_FORMAT, to_chw_uint8
from dn2_lightning.data.sources import (
    SPLITS,
    LabeledImages,
    known_classes,
    list_datasets,
    load_split,
    warn_if_root_unused,
)
from dn2_lightning.validation import (
    as_python,
    check_bool,
    check_choice,
    check_data_root,
    check_fraction,
    check_int,
    check_load_size,
    check_positive_int,
    check_seed,
)

GroupAnomaly = Literal["hard", "easy"]
ANOMALY_KINDS: tuple[str, ...] = get_args(GroupAnomaly)


class GroupDataset(Dataset):
    """Groups of images from one source split.

    Samples are dicts: ``image`` uint8 ``[M, 3, H, W]``, ``label`` (1 = anomalous group), ``index``,
    ``members`` (source indices ``[M]``) and ``member_classes`` (``[M]``).
    """

    def __init__(self, source: LabeledImages, members: Tensor, labels: Tensor, load_size: int | None = None) -> None:
        check_load_size(load_size)
        self.source, self.members, self.labels, self.load_size = source, members, labels, load_size

    def __len__(self) -> int:
        return self.members.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        members = self.members[i]
        images = torch.stack([to_chw_uint8(self.source.images[j], self.load_size) for j in members.tolist()])
        return {
            "image": images,
            "label": self.labels[i],
            "index": torch.tensor(i),
            "members": members,
            "member_classes": self.source.labels[members],
        }


def sample_groups(
    labels: Tensor,
    classes: Sequence[int],
    group_size: int,
    n_groups: int,
    kind: str | None,
    generator: torch.Generator,
    held_out: Sequence[int] = (),
) -> Tensor:
    """Source indices ``[n_groups, group_size]`` of groups of the given kind (``None`` = normal).

    Normal: ``group_size`` distinct classes drawn from ``classes``, one random image of each.
    ``"hard"``: as normal, then one member's class is replaced by another member's class (one class
    twice, one missing). ``"easy"``: as normal, then one member is replaced by an image of a class from
    ``held_out``.
    """
    by_class = {c: (labels == c).nonzero().flatten() for c in {*classes, *held_out}}
    pool = torch.tensor(list(classes))
    groups = torch.empty(n_groups, group_size, dtype=torch.long)
    for g in range(n_groups):
        chosen = pool[torch.randperm(len(pool), generator=generator)[:group_size]].tolist()
        if kind == "hard":
            missing, duplicated = torch.randperm(group_size, generator=generator)[:2].tolist()
            chosen[missing] = chosen[duplicated]
        elif kind == "easy":
            slot = int(torch.randint(group_size, (1,), generator=generator))
            chosen[slot] = held_out[int(torch.randint(len(held_out), (1,), generator=generator))]
        for slot, c in enumerate(chosen):
            candidates = by_class[c]
            groups[g, slot] = candidates[torch.randint(len(candidates), (1,), generator=generator)]
    return groups


def group_streams(seed: int) -> tuple[torch.Generator, torch.Generator, torch.Generator]:
    """Independent generators for the training, normal test and anomalous test groups of ``seed``.

    The training stream is ``torch.Generator().manual_seed(seed)``; the test streams come from NumPy's
    ``SeedSequence`` children, so how many training (or normal test) groups are drawn never changes the others.
    """
    children = np.random.SeedSequence(seed % 2**64).spawn(2)  # SeedSequence takes no negative seed; torch does
    test_seeds = [int(s.generate_state(1, np.uint64)[0]) for s in children]
    return tuple(torch.Generator().manual_seed(s) for s in (seed, *test_seeds))  # type: ignore[return-value]


def draw_group_sets(
    train_labels: Tensor,
    test_labels: Tensor,
    classes: Sequence[int],
    group_size: int,
    n_train_groups: int,
    n_test_groups: int,
    anomaly: str,
    anomaly_ratio: float,
    seed: int,
    held_out: Sequence[int] = (),
) -> tuple[Tensor, Tensor, Tensor]:
    """Training groups, test groups (normal first) and test labels (1 = anomalous) of one group setting.

    Each set comes from its own stream (:func:`group_streams`): the same ``seed`` gives the same test groups
    whatever ``n_train_groups``, and the same normal test groups whatever the anomaly kind or ratio.
    """
    train_stream, normal_stream, anomalous_stream = group_streams(seed)
    n_anomalous = round(anomaly_ratio * n_test_groups)
    train = sample_groups(train_labels, classes, group_size, n_train_groups, None, train_stream)
    normal = sample_groups(test_labels, classes, group_size, n_test_groups - n_anomalous, None, normal_stream)
    anomalous = sample_groups(test_labels, classes, group_size, n_anomalous, anomaly, anomalous_stream, held_out)
    labels = torch.cat([torch.zeros(len(normal)), torch.ones(len(anomalous))]).long()
    return train, torch.cat([normal, anomalous]), labels


def _check_classes(n_classes: int, held_out: list[int], group_size: int | None, anomaly: str) -> tuple[list[int], int]:
    """The normal classes (those not held out) and the group size (``None``: one image of each), or a ``ValueError``
    naming the setting that leaves no valid group."""
    for c in held_out:
        if not 0 <= c < n_classes:
            raise ValueError(f"held_out_classes contains {c}; valid classes are 0..{n_classes - 1}.")
    normal_classes = [c for c in range(n_classes) if c not in held_out]
    if not normal_classes:
        raise ValueError(
            f"held_out_classes={sorted(set(held_out))} holds every one of the {n_classes} classes: no class is left "
            "for the normal groups. Hold out only the classes anomalous groups take their odd member from."
        )
    size = group_size or len(normal_classes)
    if size > len(normal_classes):
        raise ValueError(
            f"group_size={size} exceeds the {len(normal_classes)} normal classes: a normal group holds "
            "one image of each of M different classes."
        )
    if anomaly == "hard" and size < 2:
        raise ValueError(
            f"anomaly='hard' needs group_size >= 2 (one class twice, another missing); it is {size}"
            + (f" (the {len(normal_classes)} normal class left)." if group_size is None else ".")
        )
    return normal_classes, size


class GroupDataModule(LightningDataModule):
    """Group anomaly detection on a classification dataset (paper §3.3).

    Args:
        dataset: a name from :func:`dn2_lightning.data.list_datasets`.
        group_size: images per group, M; ``None`` = the number of normal classes.
        n_train_groups: normal groups in the train set (from the train split).
        n_test_groups: test groups (from the test split); ``anomaly_ratio`` of them anomalous.
        anomaly: ``"hard"`` (one class twice, one missing) or ``"easy"`` (one member from a held-out class).
        held_out_classes: classes never used in normal groups (required for ``anomaly="easy"``).
        anomaly_ratio: fraction of anomalous test groups.
        seed: seeds every random draw; the same seed gives the same groups. The training, normal test and
            anomalous test groups are drawn from independent streams of it, so changing ``n_train_groups``
            keeps the test groups (:func:`draw_group_sets`).
        root: where the files are, as in :class:`OneClassDataModule`.
        batch_size: groups per batch.
        num_workers: DataLoader worker processes.
        load_size: resize images to this square size while loading (CPU), as in :class:`OneClassDataModule`;
            not the model's ``input_size``.
        pin_memory: pin batches when CUDA is available.
    """

    def __init__(
        self,
        dataset: str = "fashionmnist",
        group_size: int | None = None,
        n_train_groups: int = 1000,
        n_test_groups: int = 1000,
        anomaly: GroupAnomaly = "hard",
        held_out_classes: list[int] | None = None,
        anomaly_ratio: float = 0.5,
        seed: int = 0,
        root: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        load_size: int | None = None,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        check_choice("dataset", dataset, list_datasets())
        check_positive_int("group_size", group_size, allow_none=True, none_means="the number of normal classes")
        check_positive_int("n_train_groups", n_train_groups)
        check_positive_int("n_test_groups", n_test_groups)
        check_choice("anomaly", anomaly, ANOMALY_KINDS)
        if (
            isinstance(held_out_classes, np.ndarray)
            and held_out_classes.ndim == 1
            and held_out_classes.dtype.kind in "iu"
        ):
            held_out_classes = held_out_classes.tolist()  # (its truth value is ambiguous to the checks below)
        if held_out_classes is not None and (
            not isinstance(held_out_classes, Sequence)
            or isinstance(held_out_classes, str)
            or any(isinstance(c, bool) or not isinstance(c, Integral) for c in held_out_classes)
        ):
            raise ValueError(f"held_out_classes={held_out_classes!r} must be a list of class indices, e.g. [9].")
        if anomaly == "easy" and not held_out_classes:
            raise ValueError("anomaly='easy' needs held_out_classes, e.g. held_out_classes=[9].")
        check_fraction("anomaly_ratio", anomaly_ratio, low_inclusive=False, hint="; the test set needs both kinds")
        n_anomalous = round(anomaly_ratio * n_test_groups)
        if not 0 < n_anomalous < n_test_groups:
            raise ValueError(
                f"anomaly_ratio={anomaly_ratio} of n_test_groups={n_test_groups} gives {n_anomalous} anomalous test "
                "groups: the test set needs both kinds (its AUROC is undefined otherwise); raise n_test_groups or "
                "move anomaly_ratio towards 0.5."
            )
        if held_out_classes is not None:  # plain ints (NumPy's, a range) for the hyperparameters a checkpoint keeps
            held_out_classes = [int(c) for c in held_out_classes]
        # the classes against the dataset's known ones now, not after its files are read (or downloaded)
        _check_classes(len(known_classes(dataset)), held_out_classes or [], group_size, anomaly)
        check_seed("seed", seed)
        check_positive_int("batch_size", batch_size)
        check_int("num_workers", num_workers, minimum=0)
        check_load_size(load_size)
        check_bool("pin_memory", pin_memory)
        check_data_root(root)
        warn_if_root_unused(dataset, root)
        self.save_hyperparameters()
        self.hparams.update(as_python(dict(self.hparams)))  # NumPy numbers as Python ones, for checkpoints
        self.hparams.pixel_format = dict(PIXEL_FORMAT)  # what the images are, for the model to record
        self.train_dataset: GroupDataset | None = None
        self.test_dataset: GroupDataset | None = None

    def train_set_identity(self) -> dict[str, Any]:
        """What defines the training groups, for a memory bank built from them to recognise other ones."""
        hp = self.hparams
        self.setup()  # the group size that None resolves to
        return {
            "datamodule": type(self).__name__,
            "dataset": hp.dataset,
            "group_size": self.group_size,
            "n_train_groups": hp.n_train_groups,
            "held_out_classes": sorted(set(hp.held_out_classes or [])),
            "seed": hp.seed,
        }

    def prepare_data(self) -> None:
        """Download the dataset's files unless they are there (once per node, not on every rank)."""
        for split in SPLITS:
            load_split(self.hparams.dataset, split, self.hparams.root)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        hp = self.hparams
        train, test = load_split(hp.dataset, "train", hp.root), load_split(hp.dataset, "test", hp.root)
        held_out = list(hp.held_out_classes or [])
        normal_classes, group_size = _check_classes(len(train.classes), held_out, hp.group_size, hp.anomaly)
        train_groups, test_groups, test_labels = draw_group_sets(
            train.labels, test.labels, normal_classes, group_size, hp.n_train_groups, hp.n_test_groups,
            hp.anomaly, hp.anomaly_ratio, hp.seed, held_out,
        )  # fmt: skip
        self.group_size = group_size
        self.train_dataset = GroupDataset(
            train, train_groups, torch.zeros(len(train_groups), dtype=torch.long), hp.load_size
        )
        self.test_dataset = GroupDataset(test, test_groups, test_labels, hp.load_size)

    def _loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            shuffle=False,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_dataset)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_dataset)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

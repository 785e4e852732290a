"""One reading of a dataloader batch, whatever shape the user's dataset gives it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class Batch(NamedTuple):
    """Images ``[B, C, H, W]`` (or groups ``[B, M, C, H, W]`` with ``mask [B, M]``), labels ``[B]``
    (1 = anomalous, -1 = unknown), dataset indices ``[B]`` (``None`` if the dataset gives none)."""

    images: Tensor
    labels: Tensor
    indices: Tensor | None
    mask: Tensor | None = None
    paths: list[str] | None = None


def unpack_batch(batch: object) -> Batch:
    """Accepts the dict samples of this library's datasets (``image``, ``label``, ``index``, ``mask``),
    ``(images, labels[, indices])`` tuples as torchvision datasets give, or a bare image tensor."""
    if isinstance(batch, Mapping):
        if "image" not in batch:
            raise ValueError(f"a dict batch needs an 'image' key; got keys {sorted(batch)}.")
        images, labels, indices, mask = batch["image"], batch.get("label"), batch.get("index"), batch.get("mask")
        paths = batch.get("path")
    elif isinstance(batch, Tensor):
        images, labels, indices, mask, paths = batch, None, None, None, None
    elif isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) in (2, 3):
        images, labels = batch[0], batch[1]
        indices, mask, paths = (batch[2] if len(batch) == 3 else None), None, None
    else:
        raise ValueError(
            "cannot read the batch: give dicts with 'image' (and 'label', 'index'), (images, labels[, indices]) "
            f"tuples, or image tensors; got {type(batch).__name__}."
        )
    if not isinstance(images, Tensor) or images.ndim not in (4, 5):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"batch images must be [B, C, H, W] or groups [B, M, C, H, W], got {shape}.")
    if labels is None:
        labels = torch.full((images.shape[0],), -1, dtype=torch.long, device=images.device)
    labels = torch.as_tensor(labels, device=images.device)
    check_labels(labels)
    return Batch(images, labels.long(), indices, mask, paths)


LABEL_CONVENTION = "0 = normal, 1 = anomalous, -1 = unknown"


def check_labels(labels: Tensor) -> None:
    """Refuse labels outside DN2's convention (0 normal, 1 anomalous, -1 unknown) instead of misreading them.

    >>> check_labels(torch.tensor([0, 1, -1]))
    >>> check_labels(torch.tensor([0, 3]))
    Traceback (most recent call last):
    ...
    ValueError: batch labels must be 0 = normal, 1 = anomalous, -1 = unknown; got the values [0, 3]. ...
    """
    if labels.is_floating_point() and not bool(((labels == labels.round()) | labels.isnan()).all()):
        raise ValueError(f"batch labels must be integers ({LABEL_CONVENTION}); got dtype {labels.dtype}.")
    bad = (labels != 0) & (labels != 1) & (labels != -1)
    if bool(bad.any()):
        values = sorted({int(v) for v in labels.flatten().tolist() if v == v})
        raise ValueError(
            f"batch labels must be {LABEL_CONVENTION}; got the values {values[:10]}. Class indices (as "
            "torchvision's ImageFolder gives) are not anomaly labels: map them, e.g. "
            "ImageFolder(root, target_transform=lambda y: int(y != normal_index)), or use "
            "OneClassDataModule(dataset='folder', root=...), which labels the test/<normal_dir> folder 0 and "
            "every other folder 1."
        )

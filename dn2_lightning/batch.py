"""One reading of a dataloader batch, whatever shape the user's dataset gives it."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Subset

Check = Callable[[], None]  # a check of one batch: raises ValueError naming what is wrong


class ChecksBehind:
    """A stream of batches' checks that read values off the device (finite embeddings, labels in range, float
    pixels in [0, 1], group masks), each read one batch later. Reading a value waits for the device to compute it,
    and everything queued before it: checked at once, the host waited for the batch before after every batch, and
    the device idled while the host fetched and queued the next. Read once the next batch's work is queued
    (:meth:`advance`), they cost no wait. The errors are the same, in the same order (:meth:`first_on_error`),
    raised a batch later or at the stream's end (:meth:`flush`)."""

    def __init__(self) -> None:
        self._previous: list[Check] = []  # the batch before's checks, not read yet
        self._current: list[Check] = []  # this batch's

    def add(self, check: Check) -> None:
        """Queue a check of the current batch."""
        self._current.append(check)

    def advance(self) -> None:
        """The current batch's work is queued: read the batch before's checks; the current batch's wait."""
        previous, self._previous, self._current = self._previous, self._current, []
        try:
            _run_all(previous)
        except Exception:
            self.drop()  # a later batch's checks never come before an earlier batch's error
            raise

    def flush(self) -> None:
        """Read every queued check, the earlier batch's first."""
        checks, self._previous, self._current = [*self._previous, *self._current], [], []
        _run_all(checks)

    def drop(self) -> None:
        """Forget the queued checks (a stream that stopped, or a new one)."""
        self._previous, self._current = [], []

    @property
    def pending(self) -> bool:
        return bool(self._previous or self._current)

    @contextlib.contextmanager
    def first_on_error(self) -> Iterator[None]:
        """An error in a batch: the checks queued before it come first, as when each check ran at once (its error
        stopped the stream before the later work ran)."""
        try:
            yield
        except Exception:
            try:
                self.flush()
            except ValueError as earlier:
                raise earlier from None
            raise


def _run_all(checks: list[Check]) -> None:
    for check in checks:
        check()


class Batch(NamedTuple):
    """Images ``[B, C, H, W]`` (or groups ``[B, M, C, H, W]`` with ``mask [B, M]`` and, from
    :class:`~dn2_lightning.data.GroupDataModule`, ``members [B, M]``: each member's image index in the source
    dataset), labels ``[B]`` (1 = anomalous, -1 = unknown), dataset indices ``[B]`` (``None`` if the dataset
    gives none)."""

    images: Tensor
    labels: Tensor
    indices: Tensor | None
    mask: Tensor | None = None
    paths: list[str] | None = None
    members: Tensor | None = None


def unpack_batch(batch: object, batch_idx: int | None = None, defer: Callable[[Check], None] | None = None) -> Batch:
    """Accepts the dict samples of this library's datasets (``image``, ``label``, ``index``, ``mask``),
    ``(images, labels[, indices])`` tuples as torchvision datasets give, or a bare image tensor; refuses labels
    and pixels it would misread (``batch_idx`` names the batch in the message). ``defer``: the checks that read
    values off the device (pixels, labels, group masks) are handed to it instead of run (:class:`ChecksBehind`)."""
    run = defer or (lambda check: check())
    if isinstance(batch, Mapping):
        if "image" not in batch:
            raise ValueError(f"a dict batch needs an 'image' key; got keys {sorted(batch)}.")
        images, labels, indices, mask = batch["image"], batch.get("label"), batch.get("index"), batch.get("mask")
        paths, members = batch.get("path"), batch.get("members")
    elif isinstance(batch, Tensor):
        images, labels, indices, mask, paths, members = batch, None, None, None, None, None
    elif isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) in (1, 2, 3):
        # (images,) is what a one-tensor TensorDataset gives: unlabelled
        images, labels = batch[0], (batch[1] if len(batch) > 1 else None)
        indices, mask, paths, members = (batch[2] if len(batch) == 3 else None), None, None, None
        if indices is not None:
            check_tuple_indices(indices)
    else:
        length = f" of {len(batch)} elements" if isinstance(batch, Sequence) else ""
        raise ValueError(f"cannot read a {type(batch).__name__} batch{length}. {BATCH_LAYOUTS}.")
    if not isinstance(images, Tensor) or images.ndim not in (4, 5) or _channels_last(images):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        hint = ""
        if isinstance(images, Tensor) and images.ndim == 3:
            hint = (
                " (one image [C, H, W], e.g. from batch_size=None? batch it: images[None]; grayscale images "
                "[B, H, W]? add the channel: images[:, None], or transforms.ToImage())"
            )
        elif isinstance(images, Tensor) and _channels_last(images):
            hint = " (channels last [B, H, W, C]? images.permute(0, 3, 1, 2), or transforms.ToImage())"
        raise ValueError(f"batch images must be [B, C, H, W] or groups [B, M, C, H, W], got {shape}{hint}.")
    run(pixel_check(images, indices, batch_idx))
    if images.dtype == torch.uint8 and images.numel():  # (an empty batch, e.g. every sample filtered out, has no max)
        run(functools.partial(_warn_if_zero_one, images.amax()))
    if labels is None:
        labels = torch.full((images.shape[0],), -1, dtype=torch.long, device=images.device)
    if _holds_strings(labels):
        raise ValueError(
            f"batch labels must be {LABEL_CONVENTION}; got strings {list(labels)[:5]}. Map them to integers, e.g. "
            "target_transform=dn2_lightning.data.AnomalyLabel(normal='good')."
        )
    labels = torch.as_tensor(labels, device=images.device)
    if labels.numel() != images.shape[0]:
        raise ValueError(
            f"batch labels must be one per sample ([B] or [B, 1], {LABEL_CONVENTION}; a group batch: one per group); "
            f"got shape {tuple(labels.shape)} for {images.shape[0]} samples. One-hot, per-class or per-member labels "
            "are not a sample's anomaly label: give each sample's 0 or 1, e.g. "
            "target_transform=dn2_lightning.data.AnomalyLabel(normal=...)."
        )
    labels = labels.reshape(images.shape[0])
    run(functools.partial(check_labels, labels))
    if mask is not None and images.ndim == 5:
        run(group_mask_check(mask, images, batch_idx))
    if not (isinstance(members, Tensor) and members.shape == images.shape[:2] and images.ndim == 5):
        members = None  # only group batches' member sources are used
    return Batch(images, labels.long(), indices, mask, paths, members)


BATCH_LAYOUTS = (
    "DN2 reads a batch as a dict ({'image', 'label', 'index', 'path', 'gt_mask', 'gt_regions'}: only 'image' "
    "required), an (images,), (images, labels) or (images, labels, indices) tuple, or an image tensor"
)


def check_tuple_indices(indices: object) -> None:
    """The third element of a tuple batch is read as dataset indices: refuse what cannot be one (paths, masks)."""
    if _holds_strings(indices):
        found = f"strings such as {indices[0]!r}"
    elif isinstance(indices, np.ndarray) and indices.dtype.kind not in "iub":
        found = f"a NumPy array of dtype {indices.dtype}"
    elif not isinstance(indices, Tensor | Sequence | np.ndarray):
        found = type(indices).__name__
    else:
        tensor = torch.as_tensor(np.asarray(indices)) if not isinstance(indices, Tensor) else indices
        if tensor.ndim == 1 and not tensor.is_floating_point() and not tensor.is_complex():
            return
        found = f"a {tensor.dtype} tensor of shape {tuple(tensor.shape)}"
    raise ValueError(
        f"the third element of a tuple batch is read as the samples' dataset indices ([B] integers); got {found}. "
        f"{BATCH_LAYOUTS}: return a dict from the dataset to pass paths or masks."
    )


def _channels_last(images: Tensor) -> bool:
    """[B, H, W, 1|3] that cannot be [B, C, H, W] (its 'channels' are not 1 or 3), e.g. np.array(image) batches."""
    return images.ndim == 4 and images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3)


def _holds_strings(values: object) -> bool:
    """Whether a collated field is a list of strings (class names or paths where numbers belong)."""
    return isinstance(values, Sequence) and any(isinstance(v, str) for v in values)


def check_pixels(images: Tensor, indices: object = None, batch_idx: int | None = None) -> None:
    """Refuse pixels the backbone would misread: uint8 images are 0..255, float images must be finite and in
    [0, 1] (the backbone normalises them itself: a ``Normalize`` transform before it would normalise twice).
    One check and one device sync per float batch; the details are computed only for the message."""
    pixel_check(images, indices, batch_idx)()


def pixel_check(images: Tensor, indices: object = None, batch_idx: int | None = None) -> Check:
    """:func:`check_pixels`, its reduction queued on the device now and read when the check is called: a check read
    later holds each sample's range ``[B]``, not the images (the device would keep a batch of images more)."""
    if images.dtype == torch.uint8:
        return _no_check
    if not images.is_floating_point():
        return functools.partial(_refuse_pixel_dtype, images.dtype)
    low, high = torch.aminmax(images.flatten(1), dim=1)  # NaN propagates
    return functools.partial(_refuse_pixels, low, high, indices, batch_idx)


def _no_check() -> None:
    pass


def _warn_if_zero_one(high: Tensor) -> None:
    """Warn for a uint8 batch of 0s and 1s (masks, or [0, 1] floats cast to uint8): read as 0..255 pixels, its
    images are nearly black, and would score as such without a word."""
    if int(high) == 1:
        warnings.warn(  # one message for every batch: Python shows it once
            "a batch holds uint8 images of 0s and 1s only, read as 0..255 pixels: nearly black images. Masks, or "
            "[0, 1] floats cast to uint8? Give [0, 1] floats as they are, or multiply 0/1 values by 255.",
            stacklevel=2,
        )


def _refuse_pixel_dtype(dtype: torch.dtype) -> None:
    raise ValueError(
        f"batch images must be uint8 (0..255) or float (0..1), got {dtype}; convert them, e.g. "
        "images.to(torch.uint8) for 0..255 integers."
    )


def _refuse_pixels(low: Tensor, high: Tensor, indices: object, batch_idx: int | None) -> None:
    """Raise for the samples whose range ``[low, high]`` leaves [0, 1] or holds NaN or Inf."""
    rows = ~((low >= 0) & (high <= 1))  # also True for NaN
    if not bool(rows.any()):
        return
    where = f"positions {rows.nonzero().flatten().tolist()[:10]}"
    if indices is not None:
        where += f" (dataset indices {torch.as_tensor(indices)[rows.cpu()].tolist()[:10]})"
    where = f"batch {batch_idx} at {where}" if batch_idx is not None else where
    if not bool((torch.isfinite(low) & torch.isfinite(high)).all()):
        raise ValueError(f"NaN or Inf in input images in {where}; fix or drop those samples.")
    raise ValueError(
        f"float images must hold values in [0, 1] (the backbone normalises them itself); got "
        f"[{float(low.min()):.3g}, {float(high.max()):.3g}] in {where}. Pass raw images, not normalised ones: drop "
        "transforms.Normalize (ToTensor gives [0, 1]), divide 0..255 floats by 255, or give uint8 images."
    )


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
            "ImageFolder(root, target_transform=dn2_lightning.data.AnomalyLabel(normal=normal_index)), or use "
            "OneClassDataModule(dataset='folder', root=...), which labels the test/<normal_dir> folder 0 and "
            "every other folder 1."
        )


NORMAL_FOLDER_NAMES = ("good", "normal", "ok")  # an ImageFolder class of normal images, in any case


def check_dataset_labels(dataset: object) -> bool:
    """Refuse a torchvision ``ImageFolder`` (any ``DatasetFolder``) of several classes without a
    ``target_transform``: its labels are class indices, and with two classes they pass as 0/1 anomaly labels,
    inverted whenever the normal folder does not sort first (``{'crack': 0, 'good': 1}``).

    Returns whether the labels are to be read as unknown (-1): one class folder not named as the normal one
    (``good``, ``normal``, ``ok``), without a ``target_transform``: the folder ``ImageFolder`` needs around
    unlabelled images, whose class index 0 would count every image as normal."""
    from torchvision.datasets import DatasetFolder

    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if isinstance(dataset, ConcatDataset):  # e.g. one ImageFolder per production line: each is checked
        unknown = []
        for i, part in enumerate(dataset.datasets):
            try:
                unknown.append(check_dataset_labels(part))
            except ValueError as err:
                raise ValueError(f"part {i} of the ConcatDataset: {err}") from None
        if any(unknown) and not all(unknown):  # e.g. ImageFolder("good") + ImageFolder("crack"): both index 0
            part = unknown.index(True)
            raise ValueError(
                f"part {part} of the ConcatDataset holds an ImageFolder of one class folder, whose images would all "
                "be labelled 0 (normal) beside labelled parts. Give each such ImageFolder a target_transform, e.g. "
                "target_transform=dn2_lightning.data.AnomalyLabel(1) labels every image of one anomalous (any class "
                "other than index 1 is)."
            )
        return all(unknown)
    if not isinstance(dataset, DatasetFolder) or dataset.target_transform is not None:
        return False
    if len(dataset.classes) == 1:  # (a find_classes mapping it to 1 labels it anomalous, as it says)
        name = dataset.classes[0]
        return dataset.class_to_idx.get(name) == 0 and name.lower() not in NORMAL_FOLDER_NAMES
    normal = next((c for c in dataset.classes if c.lower() in NORMAL_FOLDER_NAMES), None)
    if normal is not None and all(i == int(c != normal) for c, i in dataset.class_to_idx.items()):
        return False  # the indices already are the labels ({'good': 0, 'scratch': 1}, or a find_classes that maps them)
    normal = normal or dataset.classes[0]
    raise ValueError(
        f"the dataset is a {type(dataset).__name__} whose labels are class indices {dataset.class_to_idx}, not "
        f"anomaly labels ({LABEL_CONVENTION}). Map them, e.g. {type(dataset).__name__}(root, "
        f"target_transform=dn2_lightning.data.AnomalyLabel({dataset.class_to_idx[normal]})) if {normal!r} holds "
        "the normal images, or use OneClassDataModule(dataset='folder', root=...), which labels test/<normal_dir> 0."
    )


def check_group_mask(mask: Tensor, images: Tensor, batch_idx: int | None = None) -> None:
    """A group batch's ``mask [B, M]`` marks each group's real members: it must match the groups, and every group
    needs one (an empty group was scored as a zero embedding, or never flagged)."""
    group_mask_check(mask, images, batch_idx)()


def group_mask_check(mask: Tensor, images: Tensor, batch_idx: int | None = None) -> Check:
    """:func:`check_group_mask`, its shape compared now (nothing to read off the device) and its empty groups
    read when the check is called (a check read later holds the groups' ``[B]`` verdicts, not the images)."""
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(images.shape[:2]):
        shape = list(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        return functools.partial(_refuse_mask_shape, list(images.shape[:2]), shape)
    return functools.partial(_refuse_empty_groups, (~mask.bool()).all(1), batch_idx)


def _refuse_mask_shape(groups: list[int], shape: object) -> None:
    raise ValueError(f"a group batch's mask must be [B, M] = {groups} (True: a real member), got {shape}.")


def _refuse_empty_groups(empty_rows: Tensor, batch_idx: int | None) -> None:
    empty = empty_rows.nonzero().flatten().tolist()
    if empty:
        where = f" of batch {batch_idx}" if batch_idx is not None else ""
        raise ValueError(
            f"group(s) {empty[:10]}{where} have no real member (mask rows all False): a group needs at least one "
            "image; leave empty groups out of the dataset."
        )

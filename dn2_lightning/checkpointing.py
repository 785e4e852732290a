"""Checkpoints that are safe to load and checked against the settings they are used with.

* Every load is weights-only (tensors and plain types, no pickled code), local or remote: Lightning turns
  ``weights_only`` off for URLs, so :class:`WeightsOnlyCheckpointIO` pins it for ``Trainer(...,
  ckpt_path=...)`` and ``DN2Module.load_from_checkpoint`` pins it for direct loads.
* The bank records how it was built (:data:`BANK_SETTINGS`); :func:`check_bank_settings` refuses a
  checkpoint whose bank was built with other settings than the model or data it meets, naming both values,
  and :func:`check_train_set` a bank built from other training data (another normal class, contamination,
  seed or groups) than the datamodule's.
  Settings that only affect scoring (``k``, the threshold, the kNN backend, its memory budget, reports)
  are the user's to change.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn

from dn2_lightning.cache import atomic_write

# model settings that define the bank's content: a bank built with other values scores differently
BANK_SETTINGS = (
    "backbone",
    "trunk",
    "pretrained",
    "input_size",
    "mean",
    "std",
    "clean_fraction",
    "clean_k",
    "group_pooling",
    "group_clusters",
    "group_temperature",
    "map_layers",
)
# the data settings that define it: the datamodule's CPU resize and decoding of the images
DATA_SETTINGS = ("load_size", "pixel_format")
# The layout of a bank's record (``bank.spec``): 2 since the record names single images vs groups. A newer
# layout may hold settings this version would not check, so it is refused.
BANK_FORMAT = 2


class WeightsOnlyCheckpointIO(CheckpointIO):
    """Delegates to the strategy's checkpoint IO, with every load weights-only (even for remote paths)."""

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        fs, local_path = url_to_fs(str(path))
        if type(self.inner) is TorchCheckpointIO and storage_options is None and isinstance(fs, LocalFileSystem):
            # Lightning's save serialises the whole checkpoint into memory first (a second copy of the bank);
            # torch.save streams it into the file, written as atomically (a crash leaves the old file or none)
            with atomic_write(local_path) as file:
                torch.save(checkpoint, file)
            return
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        refuse_unsafe_load(weights_only)
        with readable_checkpoint(path):
            return self.inner.load_checkpoint(path, map_location=map_location, weights_only=True)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


@contextlib.contextmanager
def readable_checkpoint(path: Any) -> Iterator[None]:
    """Turn what torch and Lightning raise for a checkpoint file that is empty, cut short (a run stopped while
    writing it) or not a Lightning checkpoint (a plain ``state_dict``) into a ``ValueError`` naming the file."""
    try:
        yield
    except KeyError as error:
        if error.args in (("pytorch-lightning_version",), ("state_dict",)):
            raise ValueError(
                f"{path} is not a Lightning checkpoint (it has no {error.args[0]!r}): a file of "
                "torch.save(model.state_dict()) loads with model.load_state_dict(torch.load(path)) into a DN2Module "
                "built with the same settings."
            ) from error
        _raise_if_unreadable(path, error)  # torch's unpickler fails so on a file that is no pickle at all
        raise
    except Exception as error:  # bytes that are no pickle fail torch's unpickler in many ways (IndexError, ...)
        _raise_if_unreadable(path, error)
        _raise_if_unsafe_type(path, error)
        raise


def _raise_if_unsafe_type(path: Any, error: BaseException) -> None:
    """Torch's error, said for dn2, when a whole checkpoint holds a type that weights-only loading refuses: torch
    advises ``weights_only=False``, which dn2 refuses; allowing the one type is the way, for a trusted file."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if found is None:
        return
    name = found.group(1)
    raise pickle.UnpicklingError(
        f"Weights only load failed: the checkpoint {path} holds an object of type {name}, which weights-only "
        "loading refuses (dn2-lightning loads every checkpoint weights-only). A file from elsewhere may be crafted "
        f"to run code when loaded. Only if you trust it and {name} is a plain data type (e.g. pathlib.PosixPath in "
        "an older checkpoint's saved hyperparameters), allow it for this load: `with "
        f"torch.serialization.safe_globals([{name}]): ...` (import its module first)."
    ) from error


def _raise_if_unreadable(path: Any, error: BaseException) -> None:
    """A ``ValueError`` naming ``path`` when torch cannot read the file at all (empty, cut short, not a checkpoint);
    nothing when it is missing or whole (the error then stands)."""
    file = Path(str(path))
    if not file.is_file() or zipfile.is_zipfile(file) or _loads(file):
        return
    size = file.stat().st_size
    state = "is empty (0 bytes)" if size == 0 else f"is cut short, damaged or not a checkpoint file ({size} bytes)"
    raise ValueError(
        f"the checkpoint {path} {state}: a run stopped while writing it, or another file? Use another checkpoint "
        f"(one saved before it, where ModelCheckpoint kept several), or fit again. ({type(error).__name__}: {error})"
    ) from error


def _loads(file: Path) -> bool:
    """Whether torch reads the file (e.g. one in torch's legacy, non-zip format), whatever failed after."""
    try:
        torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:  # read, but holding a type weights-only loading refuses: torch says which
        return "Unsupported global" in str(error)  # (bytes that are no pickle: "Unsupported operand")
    except Exception:  # noqa: BLE001 (any other failure means the file itself is unreadable)
        return False
    return True


def refuse_unsafe_load(weights_only: bool | None) -> None:
    if weights_only is False:
        raise ValueError(
            "weights_only=False would let a checkpoint run arbitrary code when loaded; dn2-lightning "
            "checkpoints hold tensors and plain values only, so every load is weights-only. Drop the argument."
        )


def check_bank_format(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Refuse a bank recorded by a newer dn2-lightning; warn about model settings an older record lacks, which
    therefore cannot be checked (``map_layers`` is recorded only for banks with anomaly maps)."""
    version = saved.get("format", 1)
    if version > BANK_FORMAT:
        raise ValueError(
            f"the memory bank was saved by a newer dn2-lightning (bank format {version}; this version reads up to "
            f"{BANK_FORMAT}), which may depend on settings this version does not check. Upgrade dn2-lightning, or "
            "build the bank again with fit."
        )
    missing = [
        name
        for name in BANK_SETTINGS
        if name != "map_layers" and current.get(name) is not None and name not in saved  # None: does not apply
    ]
    if missing:
        shown = ", ".join(f"{name}={_show(current[name])}" for name in missing)
        rank_zero_warn(
            f"this memory bank does not record {', '.join(missing)} (a checkpoint saved by an earlier "
            f"dn2-lightning), so nothing checks that it was built with this model's {shown}: make sure it was, "
            "or fit again to record it.",
            stacklevel=6,
        )


def check_bank_settings(
    saved: Mapping[str, Any], current: Mapping[str, Any], names: tuple[str, ...], where: str
) -> None:
    """Raise ``ValueError`` naming every setting whose ``current`` value differs from the one the bank was
    built with (``saved``). Settings missing on either side are not compared."""
    mismatches = [
        f"{name}={_show(saved[name])} (checkpoint) vs {name}={_show(current[name])} ({where})"
        for name in names
        if name in saved and name in current and not _same(saved[name], current[name])
    ]
    if mismatches:
        raise ValueError(
            "the memory bank was built with other settings than the ones it is used with, so its distances "
            f"would not be comparable: {'; '.join(mismatches)}. Use the checkpoint's values (e.g. "
            "DN2Module.load_from_checkpoint(path) without overriding them, or the same --model/--data flags "
            "as at fit time), or build a new bank with fit."
        )


def check_train_set(saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> None:
    """Refuse a bank built from other training data than the datamodule's (another normal class, contamination,
    seed or groups; for folders, other image files under ``root/train``): its scores would be distances to the
    bank's images, not to this data's normal images. Either side ``None`` (a plain dataloader, a flat folder to
    predict on, a checkpoint saved before banks recorded it) is not compared."""
    if saved is None or current is None:
        return
    if saved.get("datamodule") != current.get("datamodule"):
        raise ValueError(
            f"the memory bank was built from a {saved.get('datamodule')}'s training data ({_describe(saved)}); "
            f"this is a {current.get('datamodule')} ({_describe(current)}). Use a checkpoint built from this kind "
            "of data, or a new DN2Module."
        )
    # a synthetic set's bank saved before sets recorded their files: the rest is compared
    unrecorded = {"train_images", "train_files"} - set(saved)
    names = sorted({*saved, *current} - unrecorded)
    differing = [name for name in names if not _same(saved.get(name), current.get(name))]
    if differing:
        pairs = "; ".join(
            f"{name}={_show(saved.get(name))} (bank) vs {name}={_show(current.get(name))} (datamodule)"
            for name in differing
        )
        if saved.get("dataset") in ("folder", "synthetic") and "train_files" in differing:
            raise ValueError(
                f"the memory bank was built from other images than those under this datamodule's root/train: {pairs} "
                "(train_files: a fingerprint of the files' names and sizes). Point root at the folder the bank was "
                "built from, predict on a folder without train/ (a flat folder of images, or root/test/...), or fit "
                "again on this one (without ckpt_path: a fit resumed from a checkpoint keeps its bank)."
            )
        raise ValueError(
            f"the memory bank was built from other training data than this datamodule's: {pairs}. Its scores "
            "would measure the distance to those images, not to this datamodule's normal data. Use a new "
            "DN2Module for each training set (e.g. one per normal class; a fit resumed from a checkpoint, ckpt_path, "
            "keeps its bank), a checkpoint built from this data, or the datamodule settings the bank was built with."
        )


def _describe(identity: Mapping[str, Any]) -> str:
    return ", ".join(f"{name}={_show(value)}" for name, value in identity.items() if name != "datamodule")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))
        except (TypeError, ValueError):
            return False
    return a == b


def _show(value: Any) -> str:
    return repr(list(value) if isinstance(value, tuple) else value)


def batch_count(seen: int, total: int | None) -> str:
    """How much of a pass was read, for messages; ``total`` ``None``: a dataloader without a length that a batch
    limit stopped."""
    if total is None:
        return f"the first {seen} training batches of a dataloader without a length (maybe not all of them)"
    return f"{seen} of {total} training batches"


class QuietOptimizerAdvice(Callback):
    """Silences, during a DN2 fit only, the advice ``ModelCheckpoint(every_n_train_steps=N)`` gives a module without
    automatic optimisation at each save (save the weights before ``optimizer.step()``, 17 lines): DN2 has no
    optimizer. Other modules fitted in the process still get it."""

    ADVICE = "Using ModelCheckpoint with manual optimization and every_n_train_steps"

    def __init__(self) -> None:
        self._filter: tuple | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        warnings.filterwarnings("ignore", message=re.escape(self.ADVICE))
        self._filter = warnings.filters[0]

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._remove()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._remove()

    def _remove(self) -> None:
        if self._filter is not None:
            with contextlib.suppress(ValueError):  # (a warnings.catch_warnings block may have restored the list)
                warnings.filters.remove(self._filter)
            self._filter = None


def lightning_finds_it(ckpt_path: str) -> bool:
    """A ``ckpt_path`` that the Trainer resolves itself: ``best``, ``last``, ``hpc``, ``registry[:...]`` or a URL."""
    from lightning.pytorch.utilities.model_registry import _is_registry

    return ckpt_path in ("best", "last", "hpc") or _is_registry(ckpt_path) or "://" in ckpt_path


def absolute_checkpoint_path(ckpt_path: str) -> str:
    """A local checkpoint file by its absolute path, as the run's config.yaml and summary.json name it (they must
    find it from another directory); whatever the Trainer resolves itself (:func:`lightning_finds_it`), or a path to
    no file, as given."""
    if lightning_finds_it(ckpt_path) or os.path.isabs(ckpt_path) or not os.path.isfile(ckpt_path):
        return ckpt_path
    return os.path.abspath(ckpt_path)

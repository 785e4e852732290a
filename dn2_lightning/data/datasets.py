"""torch Datasets yielding dict samples: ``image`` uint8 [3, H, W], ``label`` (1 = anomalous), ``index``.

Images stay uint8 on the CPU (cheap to decode, collate and pin), optionally resized to ``load_size`` while
loading; resizing to the backbone's resolution (``input_size``) and normalisation happen on the model's
device, in the backbone. Files are decoded by :func:`dn2_lightning.data.images.load_image`.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import unicodedata
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, get_args

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dn2_lightning.console import info
from dn2_lightning.data import images
from dn2_lightning.data.images import image_problem, load_image, resize_square
from dn2_lightning.validation import check_choice, check_load_size, check_positive_int, tensor_of

REPORTS_DIR = "dn2_reports"  # where the reports write (dn2_lightning.reports): never read as data
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
CorruptPolicy = Literal["skip", "raise"]
CORRUPT_POLICIES: tuple[str, ...] = get_args(CorruptPolicy)
#: What every dataset here yields, whatever the backbone: DataModules expose it as ``hparams.pixel_format`` so a
#: model can record and check it (the backbone's own normalisation, mean/std, is applied on the device).
PIXEL_FORMAT = {"dtype": "uint8", "channels": 3, "min": 0, "max": 255, "resize": "bilinear, antialiased"}


def to_chw_uint8(image: Tensor, load_size: int | None = None) -> Tensor:
    """[H, W] or [H, W, 3] uint8 -> [3, H, W], resized to ``load_size`` squared when given."""
    return to_bchw_uint8(image[None], load_size)[0]


def to_bchw_uint8(images: Tensor, load_size: int | None = None) -> Tensor:
    """[B, H, W] or [B, H, W, 3] uint8 -> contiguous [B, 3, H, W]: the stack of :func:`to_chw_uint8` of each
    image (the same values, bit for bit), in one batched operation."""
    bchw = images.unsqueeze(1).expand(-1, 3, -1, -1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    if load_size is not None and tuple(bchw.shape[-2:]) != (load_size, load_size):
        bchw = resize_square(bchw, load_size)
    return bchw.contiguous()


class ArrayImageDataset(Dataset):
    """In-memory images with per-sample labels (0 = normal, 1 = anomalous).

    Args:
        images: uint8 ``[N, H, W]`` (grayscale, expanded to 3 channels) or ``[N, H, W, 3]``, a tensor or NumPy array.
        labels: ``[N]`` integer labels (a tensor or NumPy array).
        load_size: resize to this square size; ``None`` keeps the native size.
    """

    def __init__(self, images: Tensor, labels: Tensor, load_size: int | None = None) -> None:
        images, labels = tensor_of(images), tensor_of(labels)
        if images.dtype != torch.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise ValueError(
                f"images must be uint8 [N, H, W] or [N, H, W, 3]; got {images.dtype} {tuple(images.shape)}."
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"labels must be [N] with N={len(images)} (one per image); got {tuple(labels.shape)}.")
        check_load_size(load_size)
        self.images, self.labels, self.load_size = images, labels.long(), load_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {
            "image": to_chw_uint8(self.images[i], self.load_size),
            "label": self.labels[i],
            "index": torch.tensor(i),
        }

    def batch(self, start: int, stop: int) -> Tensor:
        """Images ``start:stop`` as one contiguous uint8 ``[B, 3, H, W]`` tensor, equal to the ``"image"`` entry a
        DataLoader collates from those samples, without the per-sample Python."""
        return to_bchw_uint8(self.images[start:stop], self.load_size)


def iter_image_batches(
    dataset: ArrayImageDataset, batch_size: int, device: torch.device | str = "cpu"
) -> Iterator[Tensor]:
    """The images of ``dataset`` in order, ``batch_size`` at a time (the last batch may be smaller), as uint8
    ``[B, 3, H, W]`` on ``device``: what a DataLoader over it yields as ``batch["image"]``, without the per-sample
    Python and collation.

    On CUDA each batch is pinned and uploaded with ``non_blocking=True``, one batch ahead: the next batch is
    sliced, pinned and queued for upload before the current one is handed out, so the host work overlaps the
    device's computation on the batch before (nothing here waits for the device).
    """
    check_positive_int("batch_size", batch_size)
    device = torch.device(device)
    pin = device.type == "cuda"

    def upload(start: int) -> Tensor:
        batch = dataset.batch(start, min(start + batch_size, len(dataset)))
        return batch.pin_memory().to(device, non_blocking=True) if pin else batch.to(device)

    starts = range(0, len(dataset), batch_size)
    ahead = upload(starts[0]) if starts else None
    for position in range(len(starts)):
        current = ahead
        ahead = upload(starts[position + 1]) if position + 1 < len(starts) else None
        yield current


class Renumbered(Dataset):
    """``dataset``'s dict samples with ``index`` set to their position in it.

    Rows are matched to samples by ``index``, which this library's datasets number from 0; a ``ConcatDataset`` of
    several of them repeats indices (and is refused). Wrapped, every sample gets its own:
    ``Renumbered(ConcatDataset([a, b]))``.
    """

    def __init__(self, dataset: Dataset) -> None:
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise ValueError(
                f"dataset must be a map-style dataset (with __len__ and __getitem__, e.g. a ConcatDataset), got a "
                f"{type(dataset).__name__}."
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, object]:
        sample = self.dataset[i]
        if not isinstance(sample, dict):
            raise ValueError(f"Renumbered wraps datasets of dict samples; sample {i} is a {type(sample).__name__}.")
        return {**sample, "index": torch.tensor(i)}


def is_hidden(name: str) -> bool:
    """A name that tools keep beside the data (``.ipynb_checkpoints``, ``.DS_Store``, macOS's ``._x.png`` and
    ``__MACOSX``): never a class folder or an image to read."""
    return name.startswith(".") or name == "__MACOSX"


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder``, sorted for a deterministic order: recursive, following folder links (each
    folder once), hidden names (:func:`is_hidden`) and ``dn2_reports`` folders (the reports' figures) left out.
    Files Pillow reads under other extensions, and links to nothing (to files or folders), are not read: a warning
    names them."""
    files, unread, broken, seen, pillow = [], [], [], set(), _pillow_extensions()
    for top, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a link back up the tree, or a second link to a folder already listed
            folders[:] = []
            continue
        seen.add(real)
        # in a fixed order (os.walk's is the filesystem's), real folders before links within a folder: a folder
        # reached more than one way is listed under the same path on every machine, so a copy gets the same
        # fingerprint
        if REPORTS_DIR in folders:  # e.g. a predict root that is also the run's default_root_dir: last run's figures
            info(f"DN2: {Path(top) / REPORTS_DIR} holds this library's reports: its images are not read as data.")
        shown = (name for name in folders if not is_hidden(name) and name != REPORTS_DIR)
        folders[:] = sorted(shown, key=lambda name: (os.path.islink(os.path.join(top, name)), name))
        for name in names:
            path = Path(top) / name
            suffix = path.suffix.lower()
            if is_hidden(name):
                continue
            if suffix in IMAGE_EXTENSIONS:
                (files if path.exists() else broken).append(path)
            elif suffix in pillow:
                unread.append(path)
            elif os.path.islink(path) and not path.exists():  # a folder link to nothing (an unmounted disk) too
                broken.append(path)
    if unread or broken:
        listing = [
            *(f"{p} (extension {p.suffix})" for p in unread[:3]),
            *(f"{p} (a link to nothing)" for p in broken[:3]),
        ]
        warnings.warn(
            f"{len(unread) + len(broken)} file(s) under {folder} are not read: {'; '.join(listing)}. Images are read "
            f"with the extensions {', '.join(IMAGE_EXTENSIONS)}: convert the others (e.g. to PNG), or mend the links.",
            stacklevel=2,
        )
    return sorted(files)


def _pillow_extensions() -> set[str]:
    """Extensions of the formats Pillow opens (not those it only writes, such as PDF)."""
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def files_fingerprint(files: list[Path], folder: Path) -> str:
    """A short hash of the files' names relative to ``folder`` and their sizes: the same for a copy of the
    folder elsewhere, another for other files (MVTec's categories share names like ``000.png``)."""
    digest = hashlib.blake2b(digest_size=8)
    # NFC: a copy through macOS or SMB may spell accented names decomposed
    for name, size in sorted(
        (unicodedata.normalize("NFC", f.relative_to(folder).as_posix()), f.stat().st_size) for f in files
    ):
        digest.update(f"{name}\0{size}\n".encode())
    return digest.hexdigest()


class ImageFolderDataset(Dataset):
    """Image files with 0/1 labels, decoded by :func:`~dn2_lightning.data.images.load_image` (upright RGB, high
    bit depths scaled) and resized to ``load_size``; samples also carry their ``path``.

    Args:
        paths: image files, in the order the samples get their ``index``.
        labels: one label per path (0 = normal, 1 = anomalous).
        load_size: every image is resized to ``load_size`` x ``load_size``.
        on_corrupt: every file is checked at construction (:func:`~dn2_lightning.data.images.image_problem`:
            PNG checksums, other formats decoded once); ``"skip"`` drops unreadable ones with one warning
            listing them and the reasons (kept in ``skipped``), ``"raise"`` raises ValueError listing them.
        max_pixels: larger images are unreadable; ``None`` = ``dn2_lightning.data.images.MAX_IMAGE_PIXELS``.

    The size limits in force at construction (this one, and Pillow's ``PIL.Image.MAX_IMAGE_PIXELS``) go with the
    dataset into DataLoader workers: a spawned worker (macOS, Windows) re-imports both modules at their defaults,
    and would refuse images that the check at construction accepted.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int],
        load_size: int = 224,
        on_corrupt: CorruptPolicy = "skip",
        max_pixels: int | None = None,
    ) -> None:
        check_choice("on_corrupt", on_corrupt, CORRUPT_POLICIES)
        if len(paths) != len(labels):
            raise ValueError(f"labels has {len(labels)} entries but paths has {len(paths)}; they must match.")
        check_positive_int("load_size", load_size)
        check_positive_int("max_pixels", max_pixels, allow_none=True)
        readable: list[tuple[Path, int]] = []
        self.skipped: list[Path] = []
        self.problems: list[str] = []
        for path, label in zip(map(Path, paths), labels, strict=True):
            problem = image_problem(path, load_size, max_pixels)
            if problem is None:
                readable.append((path, int(label)))
            else:
                self.skipped.append(path)
                self.problems.append(problem)
        if self.skipped:
            listing = "; ".join(self.problems[:20]) + (" ..." if len(self.problems) > 20 else "")
            if on_corrupt == "raise":
                raise ValueError(f"{len(self.skipped)} unreadable image file(s): {listing}")
            warnings.warn(f"skipping {len(self.skipped)} unreadable image file(s): {listing}", stacklevel=2)
        self.paths = [p for p, _ in readable]
        self.labels = torch.tensor([label for _, label in readable], dtype=torch.long)
        self.load_size = load_size
        self.max_pixels = images.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels  # the limit checked above
        self._pillow_max_pixels = Image.MAX_IMAGE_PIXELS

    def __setstate__(self, state: dict[str, object]) -> None:
        # in a spawned worker: Pillow's limit as the check at construction had it (raised only, never lowered;
        # not in this process, where copy.copy and deepcopy also come here)
        self.__dict__.update(state)
        if "_pillow_max_pixels" not in state or multiprocessing.parent_process() is None:
            return
        saved, current = state["_pillow_max_pixels"], Image.MAX_IMAGE_PIXELS
        if current is not None and (saved is None or saved > current):
            Image.MAX_IMAGE_PIXELS = saved

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, object]:
        image = load_image(self.paths[i], self.load_size, self.max_pixels)  # names the file if it fails
        return {"image": image, "label": self.labels[i], "index": torch.tensor(i), "path": str(self.paths[i])}

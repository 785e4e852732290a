"""torch Datasets yielding dict samples: ``image`` uint8 [3, H, W], ``label`` (1 = anomalous), ``index``.

Images stay uint8 on the CPU (cheap to decode, collate and pin); resizing to the backbone's resolution and
normalisation happen on the model's device, in the backbone.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2.functional import pil_to_tensor, resize

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
CORRUPT_POLICIES = ("skip", "raise")


def to_chw_uint8(image: Tensor, image_size: int | None = None) -> Tensor:
    """[H, W] or [H, W, 3] uint8 -> [3, H, W], resized to ``image_size`` squared when given."""
    chw = image.expand(3, *image.shape) if image.ndim == 2 else image.permute(2, 0, 1)
    if image_size is not None and tuple(chw.shape[-2:]) != (image_size, image_size):
        chw = resize(chw, [image_size, image_size], antialias=True)
    return chw


class ArrayImageDataset(Dataset):
    """In-memory images with 0/1 anomaly labels.

    Args:
        images: uint8 ``[N, H, W]`` or ``[N, H, W, 3]``.
        labels: ``[N]`` 0 = normal, 1 = anomalous.
        image_size: resize to this square size; ``None`` keeps the native size.
    """

    def __init__(self, images: Tensor, labels: Tensor, image_size: int | None = None) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels.")
        self.images, self.labels, self.image_size = images, labels.long(), image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"image": to_chw_uint8(self.images[i], self.image_size), "label": self.labels[i], "index": torch.tensor(i)}


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted for a deterministic order."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageFolderDataset(Dataset):
    """Image files with 0/1 labels; samples also carry their ``path``.

    Every file is checked at construction. ``on_corrupt="skip"`` drops unreadable files with one warning
    listing them (kept in ``skipped``); ``"raise"`` fails with the list.
    """

    def __init__(
        self, paths: Sequence[str | Path], labels: Sequence[int], image_size: int = 224, on_corrupt: str = "skip"
    ) -> None:
        if on_corrupt not in CORRUPT_POLICIES:
            raise ValueError(f"on_corrupt={on_corrupt!r} is not one of {list(CORRUPT_POLICIES)}.")
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels.")
        readable, self.skipped = [], []
        for path, label in zip(map(Path, paths), labels):
            (readable.append((path, int(label))) if _is_readable(path) else self.skipped.append(path))
        if self.skipped:
            listing = ", ".join(str(p) for p in self.skipped[:20]) + (" ..." if len(self.skipped) > 20 else "")
            if on_corrupt == "raise":
                raise ValueError(f"{len(self.skipped)} unreadable image file(s): {listing}")
            warnings.warn(f"skipping {len(self.skipped)} unreadable image file(s): {listing}", stacklevel=2)
        self.paths = [p for p, _ in readable]
        self.labels = torch.tensor([label for _, label in readable], dtype=torch.long)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, object]:
        with Image.open(self.paths[i]) as img:
            image = pil_to_tensor(img.convert("RGB"))
        image = resize(image, [self.image_size, self.image_size], antialias=True)
        return {"image": image, "label": self.labels[i], "index": torch.tensor(i), "path": str(self.paths[i])}


def _is_readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:
        return False

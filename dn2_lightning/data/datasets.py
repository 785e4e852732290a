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


def check_image_size(image_size: int | None, allow_none: bool = True) -> None:
    """Raise ValueError unless ``image_size`` is an integer >= 1 (or ``None`` when allowed)."""
    if image_size is None and allow_none:
        return
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        valid = "None or an integer >= 1" if allow_none else "an integer >= 1"
        raise ValueError(f"image_size={image_size!r} must be {valid}.")


class ArrayImageDataset(Dataset):
    """In-memory images with per-sample labels (0 = normal, 1 = anomalous).

    Args:
        images: uint8 ``[N, H, W]`` (grayscale, expanded to 3 channels) or ``[N, H, W, 3]``.
        labels: ``[N]`` integer labels.
        image_size: resize to this square size; ``None`` keeps the native size.
    """

    def __init__(self, images: Tensor, labels: Tensor, image_size: int | None = None) -> None:
        if images.dtype != torch.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise ValueError(
                f"images must be uint8 [N, H, W] or [N, H, W, 3]; got {images.dtype} {tuple(images.shape)}."
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"labels must be [N] with N={len(images)} (one per image); got {tuple(labels.shape)}.")
        check_image_size(image_size)
        self.images, self.labels, self.image_size = images, labels.long(), image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {
            "image": to_chw_uint8(self.images[i], self.image_size),
            "label": self.labels[i],
            "index": torch.tensor(i),
        }


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted for a deterministic order."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageFolderDataset(Dataset):
    """Image files with 0/1 labels, loaded with PIL as RGB and resized; samples also carry their ``path``.

    Args:
        paths: image files, in the order the samples get their ``index``.
        labels: one label per path (0 = normal, 1 = anomalous).
        image_size: every image is resized to ``image_size`` x ``image_size``.
        on_corrupt: every file is checked at construction; ``"skip"`` drops unreadable ones with one warning
            listing them (kept in ``skipped``), ``"raise"`` raises ValueError listing them.
    """

    def __init__(
        self, paths: Sequence[str | Path], labels: Sequence[int], image_size: int = 224, on_corrupt: str = "skip"
    ) -> None:
        if on_corrupt not in CORRUPT_POLICIES:
            raise ValueError(f"on_corrupt={on_corrupt!r} is not one of {list(CORRUPT_POLICIES)}.")
        if len(paths) != len(labels):
            raise ValueError(f"labels has {len(labels)} entries but paths has {len(paths)}; they must match.")
        check_image_size(image_size, allow_none=False)
        readable: list[tuple[Path, int]] = []
        self.skipped: list[Path] = []
        for path, label in zip(map(Path, paths), labels, strict=True):
            if _is_readable(path):
                readable.append((path, int(label)))
            else:
                self.skipped.append(path)
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
        image = load_image(self.paths[i])
        image = resize(image, [self.image_size, self.image_size], antialias=True)
        return {"image": image, "label": self.labels[i], "index": torch.tensor(i), "path": str(self.paths[i])}


def load_image(path: str | Path) -> Tensor:
    """Decode an image file as uint8 RGB ``[3, H, W]``."""
    with Image.open(path) as img:
        return pil_to_tensor(img.convert("RGB"))


def _is_readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:
        return False

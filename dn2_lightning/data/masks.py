"""Ground-truth segmentation masks for image-file datasets, in MVTec AD's layout.

``root/test/<kind>/<stem>.<ext>`` has the mask ``root/ground_truth/<kind>/<stem>_mask.png`` (non-zero =
anomalous pixel); images of the normal kind have none (all zero). Samples get it as ``gt_mask`` (uint8
``[H, W]``, at the image's size): the batch key ``mask`` already marks the members of a group.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2.functional import resize

MASK_SUFFIX = "_mask.png"


def mvtec_mask_path(root: str | Path, image: str | Path, normal_dir: str = "good") -> Path | None:
    """MVTec AD's mask of test image ``root/test/<kind>/<stem>.<ext>``: ``root/ground_truth/<kind>/<stem>_mask.png``,
    or ``None`` for the normal kind (all zero)."""
    image = Path(image)
    kind = image.relative_to(Path(root) / "test").parts[0]
    return None if kind == normal_dir else Path(root) / "ground_truth" / kind / f"{image.stem}{MASK_SUFFIX}"


class MaskedImageDataset(Dataset):
    """Adds ``gt_mask`` (uint8 ``[H, W]``, 1 = anomalous pixel, at the sample image's size) to the samples of
    an image-file dataset with ``paths``. (The batch key ``mask`` marks group members; segmentation masks
    use ``gt_mask``.)

    Args:
        dataset: samples with an ``image`` ``[3, H, W]``; ``dataset.paths[i]`` is sample i's file.
        mask_paths: one mask file per ``dataset.paths`` entry, ``None`` for an all-normal image. Masks are
            binarised (non-zero = anomalous) and resized to the image with nearest-neighbour interpolation.

    Raises:
        ValueError: a mask file is missing (all are listed).
    """

    def __init__(self, dataset: Dataset, mask_paths: Sequence[str | Path | None]) -> None:
        paths = getattr(dataset, "paths", None)
        if paths is None or len(paths) != len(mask_paths):
            raise ValueError(f"mask_paths has {len(mask_paths)} entries; the dataset has {len(paths or [])} files.")
        missing = [str(p) for p in mask_paths if p is not None and not Path(p).is_file()]
        if missing:
            listing = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise ValueError(
                f"{len(missing)} ground-truth mask(s) missing: {listing}. Every anomalous test image needs "
                f"root/ground_truth/<kind>/<stem>{MASK_SUFFIX}, or remove root/ground_truth to test without masks."
            )
        self.dataset, self.mask_paths = dataset, [None if p is None else Path(p) for p in mask_paths]

    @property
    def paths(self) -> list[Path]:
        return self.dataset.paths

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, object]:
        sample = dict(self.dataset[i])
        size = list(sample["image"].shape[-2:])
        if self.mask_paths[i] is None:
            sample["gt_mask"] = torch.zeros(size, dtype=torch.uint8)
            return sample
        with Image.open(self.mask_paths[i]) as img:
            mask = (torch.from_numpy(np.array(img.convert("L"))) > 0).to(torch.uint8)[None]
        if list(mask.shape[-2:]) != size:
            mask = resize(mask, size, interpolation=InterpolationMode.NEAREST_EXACT)
        sample["gt_mask"] = mask[0]
        return sample


def with_mvtec_masks(dataset: Dataset, root: str | Path, normal_dir: str = "good") -> Dataset:
    """``dataset`` (test files under ``root/test``) with ``gt_mask`` added when ``root/ground_truth`` exists,
    else ``dataset`` unchanged."""
    if not (Path(root) / "ground_truth").is_dir():
        return dataset
    return MaskedImageDataset(dataset, [mvtec_mask_path(root, p, normal_dir) for p in dataset.paths])

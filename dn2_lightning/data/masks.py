"""Ground-truth segmentation masks for image-file datasets, in MVTec AD's layout.

``root/test/<kind>/<stem>.<ext>`` has the mask ``root/ground_truth/<kind>/<stem>_mask.png`` (non-zero =
anomalous pixel); images of the normal kind have none (all zero). Samples get it as ``gt_mask`` (uint8
``[H, W]``, at the image's size): the batch key ``mask`` already marks the members of a group. They also get
``gt_regions`` (int32 ``[H, W]``): the mask's 8-connected regions, labelled at the mask file's own resolution and
resized with it, so that PRO counts a thin scratch that resizing breaks into pieces as the one defect it is.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2.functional import resize

from dn2_lightning.data.images import (
    UnreadableImageError,
    fix_png_transparency,
    has_transparency,
    integer_max,
    on_black,
    said,
    say_once,
    tiff_min_is_white,
    warn_if_many_frames,
)
from dn2_lightning.data.png_data import decoded_png_problem, png_data_problem
from dn2_lightning.pixel_metrics import label_regions

MASK_SUFFIX = "_mask.png"
# a mask with transparency that shows nothing on black although it holds a drawing: in its colours (an alpha channel
# at 0 throughout, its drawn colour marked transparent) or in its alpha channel alone (a black brush on a layer)
HIDDEN_DRAWING = (
    "its transparency hides its drawing (an alpha channel at 0 throughout, its drawn colour marked transparent, or a "
    "black drawing on a transparent layer), so it would read as empty: save the mask as a plain grey image, e.g. "
    "Image.fromarray(np.asarray(Image.open(path).convert('RGB')).max(2)).save(path) if its pixels are the mask, "
    "Image.open(path).getchannel('A').save(path) if its alpha channel is, or all black if it is empty"
)
# a palette mask whose palette shows every pixel black although its pixels hold palette index 0 and others
BLACK_PALETTE = (
    "its palette shows every pixel black although its pixels hold palette index 0 and others, so it would read as "
    "empty: save the indices as a plain grey mask, e.g. "
    "Image.fromarray((np.asarray(Image.open(path)) > 0).astype(np.uint8) * 255).save(path)"
)


class HiddenDrawingError(ValueError):
    """A mask that would read as empty although it holds a drawing; ``reason`` is :data:`HIDDEN_DRAWING` or
    :data:`BLACK_PALETTE`."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = reason


# masks with transparency or a palette are decoded at set-up to find hidden drawings: a few (one tool's are alike)
_TRANSPARENT_MASKS_CHECKED = 16
# EXIF orientation -> the transpose that shows the image upright (what PIL.ImageOps.exif_transpose applies)
_UPRIGHT = {
    2: "FLIP_LEFT_RIGHT",
    3: "ROTATE_180",
    4: "FLIP_TOP_BOTTOM",
    5: "TRANSPOSE",
    6: "ROTATE_270",
    7: "TRANSVERSE",
    8: "ROTATE_90",
}
# (lower-cased; "ground_truth" itself: another capitalisation of it, since the exact one is looked for first)
_LIKELY_MASK_FOLDERS = (
    "ground_truth", "groundtruth", "ground-truth", "ground truth", "gt", "masks", "mask", "ground_truths",
)  # fmt: skip


def mvtec_mask_path(root: str | Path, image: str | Path, normal_dir: str = "good") -> Path | None:
    """MVTec AD's mask of test image ``root/test/<kind>/<stem>.<ext>``: ``root/ground_truth/<kind>/<stem>_mask.png``
    (an image in a subfolder, ``test/<kind>/<sub>/<stem>.<ext>``, has it in the same subfolder of
    ``ground_truth/<kind>``), or ``None`` for the normal kind (all zero)."""
    image = Path(image)
    relative = image.relative_to(Path(root) / "test")
    if relative.parts[0] == normal_dir:
        return None
    return Path(root) / "ground_truth" / relative.parent / f"{image.stem}{MASK_SUFFIX}"


def _headers(image: str | Path, mask: str | Path) -> tuple[tuple[int, int], int, tuple[int, int]] | None:
    """(stored image size W x H, its EXIF orientation, upright mask size W x H) from the headers; ``None`` if
    unreadable."""
    try:
        with Image.open(image) as img:
            size, orientation = img.size, img.getexif().get(0x0112, 1)
        with Image.open(mask) as img:
            turned = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # a mask is read upright too
            return size, orientation, img.size[::-1] if turned else img.size
    except (OSError, SyntaxError, ValueError):
        return None  # unreadable files are reported where they are loaded


def mask_problem(mask: str | Path) -> str | None:
    """Why a mask file cannot be read (cut short, damaged, not an image), or ``None``; PNGs are checked without
    decoding (every chunk's checksum, the length of their decompressed pixel data), other formats are decoded."""
    try:
        with Image.open(mask) as img:
            fix_png_transparency(img, mask)  # refuses what read_mask refuses
            img.verify() if img.format == "PNG" else img.load()
            return png_data_problem(mask) if img.format == "PNG" else None
    except UnreadableImageError as err:
        return str(err)
    except (OSError, SyntaxError, ValueError) as err:
        return f"{mask}: {type(err).__name__}: {err}"


def hidden_drawings(masks: Sequence[str | Path]) -> dict[str, list[str]]:
    """The masks that would read as empty although they hold a drawing, by reason (:data:`HIDDEN_DRAWING`,
    :data:`BLACK_PALETTE`), among the first few with transparency or a palette (each decoded: tens of ms for a
    large RGBA mask; those of one tool are alike, and the others are refused when they are read)."""
    hidden: dict[str, list[str]] = {}
    decoded = 0
    for mask in masks:
        if decoded == _TRANSPARENT_MASKS_CHECKED:
            break
        with Image.open(mask) as img:
            if not (has_transparency(img) or img.mode == "P"):
                continue
        decoded += 1
        try:
            read_mask(mask)
        except HiddenDrawingError as err:
            hidden.setdefault(err.reason, []).append(str(mask))
    return hidden


def read_mask(path: str | Path) -> Tensor:
    """A mask file as uint8 ``[1, H, W]`` (1 = anomalous: a pixel with any channel non-zero after transparent
    pixels are put on black), upright (its EXIF orientation applied, as images are)."""
    with Image.open(path) as img:
        fix_png_transparency(img, path)  # (before decoding: its file's bit depth is known until then)
        if (problem := decoded_png_problem(img, path)) is not None:
            raise UnreadableImageError(problem)  # Pillow would read its missing rows as normal
        warn_if_many_frames(img, path, "mask")
        min_is_white, top = tiff_min_is_white(img), integer_max(img)
        upright = ImageOps.exif_transpose(img)
        values = _pixel_values(on_black(upright))
        if min_is_white:  # a 16-bit or float WhiteIsZero TIFF, read as its image is (Pillow inverts only 8 bits)
            values = (1.0 if upright.mode == "F" else top) - values.astype(
                np.float64 if upright.mode == "F" else np.int64
            )
        shown = values != 0
        if not shown.any():
            if has_transparency(upright) and _holds_a_drawing(upright):
                raise HiddenDrawingError(path, HIDDEN_DRAWING)
            if upright.mode == "P" and len(np.unique(np.asarray(upright))) > 1:  # index 0 and others, all black
                raise HiddenDrawingError(path, BLACK_PALETTE)
        _warn_if_faint(values, path)
        return torch.from_numpy(shown).to(torch.uint8)[None]


def _pixel_values(img: Image.Image) -> np.ndarray:
    """``[H, W]``: a one-channel image's values as stored (16-bit and float masks too), else the largest of the
    R, G and B values (a mask drawn in one channel, e.g. (0, 0, 1), is not black)."""
    if img.mode in ("1", "L", "I", "F") or img.mode.startswith("I;16"):
        return np.asarray(img)
    return np.asarray(img.convert("RGB")).max(axis=2)


def _warn_if_faint(values: np.ndarray, path: str | Path) -> None:
    """Said once per process: a drawing with faint pixels (above 0, at most half its largest value, in 8 or more
    levels: a rim or specks, as JPEG compression or an antialiased brush leaves; a few levels are labels), which
    the non-zero rule reads as anomalous."""
    if said("faint mask pixels"):  # (read_mask runs per sample: no work once said)
        return
    top = values.max()
    faint = values[(values > 0) & (values <= top / 2)]
    if len(np.unique(faint)) < 8:
        return
    say_once(
        "faint mask pixels",
        f"{path} holds {faint.size} faint pixels (values up to half its drawing's {top:g}), as JPEG compression or "
        "an antialiased brush leaves around a drawing: every non-zero pixel is read as anomalous, so they widen its "
        "regions and may add small ones, each of which PRO counts as a defect. If they are not anomalous, binarise "
        "the masks at half the drawing's value, e.g. for 8-bit masks "
        "Image.fromarray(((np.asarray(Image.open(path).convert('RGB')).max(2) > 127) * 255).astype(np.uint8))"
        ".save(path).",
        stacklevel=4,
    )


def _holds_a_drawing(img: Image.Image) -> bool:
    """Whether a mask with transparency holds a drawing: non-zero colours, or an alpha channel that varies."""
    rgba = np.asarray(img.convert("RGBA"))
    return bool(rgba[..., 3].min() != rgba[..., 3].max() or rgba[..., :3].any())


def _same_shape(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """The same aspect ratio within a pixel of rounding, on whichever side was resized."""
    return abs(a[0] * b[1] - a[1] * b[0]) <= max(*a, *b)


def mask_geometry_problem(headers: tuple[tuple[int, int], int, tuple[int, int]]) -> str | None:
    """Why a mask cannot be its image's, from their :func:`_headers`, or ``None``: its aspect ratio must be the
    upright image's (EXIF orientation applied, as the image is loaded; a mask at another scale is resized)."""
    (width, height), orientation, mask_size = headers
    rotated = orientation in (5, 6, 7, 8)
    upright = (height, width) if rotated else (width, height)
    if _same_shape(mask_size, upright):
        return None
    found = f"{mask_size[0]} x {mask_size[1]} mask for a {upright[0]} x {upright[1]} (W x H) image"
    if rotated and _same_shape(mask_size, (width, height)):
        return (
            f"{found} shown upright (EXIF orientation {orientation}): the mask follows the stored pixel grid; "
            f"save it upright, e.g. mask.transpose(Image.Transpose.{_UPRIGHT[orientation]})"
        )
    return f"{found}: not the image's shape"


def unconfirmed_orientation(headers: tuple[tuple[int, int], int, tuple[int, int]]) -> int | None:
    """From an image's and its mask's :func:`_headers`: the EXIF orientation that turns the image when it is loaded
    when the mask's shape fits both the upright image and the stored pixel grid (a flip or a half turn; a quarter
    turn of a square image), so nothing shows which one the mask was drawn on; else ``None``."""
    (width, height), orientation, mask_size = headers
    if orientation not in _UPRIGHT:
        return None
    upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    return orientation if _same_shape(mask_size, (width, height)) and _same_shape(mask_size, upright) else None


def mask_regions(mask: Tensor) -> Tensor:
    """A mask ``[1, H, W]``'s 8-connected regions, numbered 1..R (0 = normal pixel), int32 ``[1, H, W]``."""
    labels, _ = label_regions(mask)
    return torch.from_numpy(labels).to(torch.int32)


def _found_instead(missing: list[Path]) -> str:
    """For a missing mask's error: the files beside where it was looked for named as the image's stem with another
    extension or its case (``000_mask.PNG``), or without ``_mask`` (``000.png``): near misses of the expected name."""
    expected = missing[0]
    near_miss = re.compile(re.escape(expected.name[: -len(MASK_SUFFIX)]) + r"(_mask)?\.[^.]+", re.IGNORECASE)
    try:  # (not 10_mask.png for 1.png: another image's mask)
        near = sorted(p.name for p in expected.parent.iterdir() if near_miss.fullmatch(p.name))
    except OSError:
        return ""
    return f" (in {expected.parent}, found instead: {', '.join(near[:5])})" if near else ""


class MaskedImageDataset(Dataset):
    """Adds ``gt_mask`` (uint8 ``[H, W]``, 1 = anomalous pixel, at the sample image's size) and ``gt_regions``
    (int32 ``[H, W]``, the mask's 8-connected regions numbered 1..R, labelled at the mask file's resolution) to the
    samples of an image-file dataset with ``paths``. (The batch key ``mask`` marks group members; segmentation
    masks use ``gt_mask``.)

    Args:
        dataset: samples with an ``image`` ``[3, H, W]``; ``dataset.paths[i]`` is sample i's file.
        mask_paths: one mask file per ``dataset.paths`` entry, ``None`` for an all-normal image. Masks are
            binarised (non-zero = anomalous), their regions labelled, and both resized to the image with
            nearest-neighbour interpolation (a region that resizing breaks apart keeps one id).

    Raises:
        ValueError: a mask file is missing (all are listed).
    """

    def __init__(self, dataset: Dataset, mask_paths: Sequence[str | Path | None]) -> None:
        paths = getattr(dataset, "paths", None)
        if paths is None or len(paths) != len(mask_paths):
            raise ValueError(f"mask_paths has {len(mask_paths)} entries; the dataset has {len(paths or [])} files.")
        missing = [Path(p) for p in mask_paths if p is not None and not Path(p).is_file()]
        if missing:
            listing = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise ValueError(
                f"{len(missing)} ground-truth mask(s) missing: {listing}{_found_instead(missing)}. Every anomalous "
                f"test image needs root/ground_truth/<kind>/<stem>{MASK_SUFFIX} (that name exactly), or remove "
                "root/ground_truth to test without masks."
            )
        pairs = [(image, mask) for image, mask in zip(paths, mask_paths, strict=True) if mask is not None]
        unreadable = [problem for _, mask in pairs if (problem := mask_problem(mask)) is not None]
        if unreadable:  # found here, not by a traceback part-way through a run
            listing = "; ".join(unreadable[:5]) + (f"; ... ({len(unreadable)} in all)" if len(unreadable) > 5 else "")
            raise ValueError(
                f"{len(unreadable)} ground-truth mask(s) cannot be read: {listing}. Save them again (PNG, non-zero = "
                "anomalous), or remove root/ground_truth to test without masks."
            )
        hidden = hidden_drawings([mask for _, mask in pairs])
        if hidden:
            reasons = "; ".join(
                ", ".join(paths[:5]) + (" ...: " if len(paths) > 5 else ": ") + why for why, paths in hidden.items()
            )
            count = sum(map(len, hidden.values()))
            raise ValueError(f"{count} ground-truth mask(s) would read as empty: {reasons}.")
        # both checks read the headers only, once per pair (unreadable images are reported where they are loaded)
        headers = [(image, mask, found) for image, mask in pairs if (found := _headers(image, mask)) is not None]
        mismatched = [
            f"{mask}: {problem}" for _, mask, found in headers if (problem := mask_geometry_problem(found)) is not None
        ]
        if mismatched:
            listing = "; ".join(mismatched[:5]) + (f"; ... ({len(mismatched)} in all)" if len(mismatched) > 5 else "")
            raise ValueError(
                f"{len(mismatched)} ground-truth mask(s) do not match their image's shape, so their pixels would "
                f"land elsewhere: {listing}."
            )
        turned = [
            (image, orientation)
            for image, _, found in headers
            if (orientation := unconfirmed_orientation(found)) is not None
        ]
        if turned:
            image, orientation = turned[0]
            warnings.warn(
                f"{len(turned)} test image(s) with a mask carry an EXIF orientation that turns them when loaded (e.g. "
                f"{image}: orientation {orientation}, {_UPRIGHT[orientation]}), and the mask's shape cannot show "
                "whether it was drawn on the upright image or on the stored pixels: it is read as drawn on the "
                "upright image (as viewers show it). If it follows the stored pixels, its anomalous pixels land "
                "elsewhere: save the images upright (PIL.ImageOps.exif_transpose) or transpose the masks.",
                stacklevel=2,
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
            sample["gt_regions"] = torch.zeros(size, dtype=torch.int32)
        else:
            regions = mask_regions(read_mask(self.mask_paths[i]))
            if not regions.any():
                _warn_empty_mask(self.mask_paths[i])
            if list(regions.shape[-2:]) != size:
                regions = resize(regions, size, interpolation=InterpolationMode.NEAREST_EXACT)
            sample["gt_regions"] = regions[0]
        sample["gt_mask"] = (sample["gt_regions"] != 0).to(torch.uint8)
        return sample


def with_mvtec_masks(dataset: Dataset, root: str | Path, normal_dir: str = "good") -> Dataset:
    """``dataset`` (test files under ``root/test``) with ``gt_mask`` added when ``root/ground_truth`` exists,
    else ``dataset`` unchanged (with a warning when a folder looks like a misnamed ``ground_truth``).

    An image in a subfolder of its kind takes the mask in the same subfolder of ``ground_truth/<kind>``, else
    ``ground_truth/<kind>/<stem>_mask.png``; two images that would share one mask file are refused."""
    root = Path(root)
    if not (root / "ground_truth").is_dir():
        lookalikes = [p.name for p in root.iterdir() if p.is_dir() and p.name.lower() in _LIKELY_MASK_FOLDERS]
        if lookalikes:
            warnings.warn(
                f"{root} has no ground_truth folder but has {lookalikes}: masks are read from "
                f"root/ground_truth/<kind>/<stem>{MASK_SUFFIX} only, so no pixel metrics are computed; rename it.",
                stacklevel=2,
            )
        return dataset
    masks: list[Path | None] = []
    for image in dataset.paths:
        mask = mvtec_mask_path(root, image, normal_dir)
        if mask is not None and not mask.is_file():
            kind = Path(image).relative_to(root / "test").parts[0]
            flat = root / "ground_truth" / kind / mask.name
            mask = flat if flat.is_file() else mask
        masks.append(mask)
    takers: dict[Path, list[str]] = {}
    for image, mask in zip(dataset.paths, masks, strict=True):
        if mask is not None:
            takers.setdefault(mask, []).append(str(image))
    shared = {mask: images for mask, images in takers.items() if len(images) > 1}
    if shared:
        mask, images = next(iter(shared.items()))
        raise ValueError(
            f"{len(shared)} ground-truth mask file(s) would be read for several test images, e.g. {mask} for "
            f"{images}: masks are matched by file stem (part.png and part.jpg share one), and an image in a "
            f"subfolder takes the mask in the same subfolder of ground_truth/<kind>. Rename the images or mirror "
            "their subfolders under ground_truth."
        )
    return MaskedImageDataset(dataset, masks)


def _warn_empty_mask(path: Path) -> None:
    """Said once per process: the mask of an image in an anomalous kind's folder marks no pixel."""
    say_once(
        "empty mask",
        f"{path} marks no anomalous pixel, although its image is in an anomalous kind's folder: the image counts as "
        "anomalous in the image AUROC but adds no anomalous pixel to the pixel metrics. If its drawing is lost (e.g. "
        "saved in a colour that reads as 0), draw it again.",
        stacklevel=4,
    )

"""Images as users hold them (tensors, PIL images, file paths, lists of these) -> batches for the backbone.

:func:`as_image_batches` applies the same decoding and CPU resize as the folder datasets, so an image
scored with :meth:`DN2Module.score_images` gets the same score as through ``dn2 predict``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2.functional import resize

from dn2_lightning.batch import check_pixels
from dn2_lightning.data.images import load_image, pil_to_uint8

ImageLike = Union[Tensor, Image.Image, str, os.PathLike]  # noqa: UP007 (a runtime alias)
ImagesLike = Union[ImageLike, Sequence[ImageLike]]  # noqa: UP007


def as_image_batches(
    images: ImagesLike, load_size: int | tuple[int, int] | None = None
) -> Iterator[tuple[Tensor, list[str] | None]]:
    """Yield ``(images [b, C, H, W], paths or None)`` batches of equal-sized images, in input order.

    Args:
        images: a uint8 (0..255) or float (0..1) tensor ``[B, C, H, W]`` or ``[C, H, W]`` with 1 or 3
            channels, a PIL image, a file path, or a list of these.
        load_size: resize every image to ``load_size`` squared (or ``(H, W)``) on the CPU first, as the loader
            the bank was built from did, in 8 bits as the datasets resize (``None``: keep the size; the backbone
            resizes to its input size anyway).

    Raises:
        ValueError: an input of another type, shape or value range, naming it and its position.
    """
    if isinstance(images, Iterator):  # read as one item, it was refused as "images[0]", which misled
        raise ValueError(
            f"images is a {type(images).__name__}; give a tensor, a PIL image, a path, or a list of these, "
            "e.g. list(images)."
        )
    items = list(images) if isinstance(images, list | tuple) else [images]
    if not items:
        raise ValueError("images is empty: give a tensor, a PIL image, a path, or a non-empty list of these.")
    size = (load_size, load_size) if isinstance(load_size, int) else load_size
    square = size[0] if size is not None and size[0] == size[1] else None  # decoded at this size (JPEG draft)
    run: list[Tensor] = []
    run_paths: list[str | None] = []
    for position, item in enumerate(items):
        chw, path = _to_chw(item, position, square)
        for image in chw.unbind(0) if chw.ndim == 4 else [chw]:
            if size is not None and tuple(image.shape[-2:]) != tuple(size):
                if image.is_floating_point():  # [0, 1] floats: resized in 8 bits, as the same image's file is
                    image = image.mul(255).round().to(torch.uint8)
                image = resize(image, list(size), antialias=True)
            if run and (image.shape != run[0].shape or image.dtype != run[0].dtype):
                yield _flush(run, run_paths)
                run, run_paths = [], []
            run.append(image)
            run_paths.append(path)
    yield _flush(run, run_paths)


def _flush(run: list[Tensor], paths: list[str | None]) -> tuple[Tensor, list[str] | None]:
    return torch.stack(run), (None if all(p is None for p in paths) else [p or "" for p in paths])


def _to_chw(item: ImageLike, position: int, load_size: int | None) -> tuple[Tensor, str | None]:
    where = f"images[{position}]"
    if isinstance(item, str | os.PathLike):
        path = Path(item)
        if path.is_dir():
            raise ValueError(
                f"{where}: {str(path)!r} is a folder; give its image files, e.g. "
                "sorted(glob.glob(folder + '/*.png')) (dn2 predict --data.root=... reads a whole folder)."
            )
        if not path.is_file():
            raise ValueError(f"{where}: no such image file {str(path)!r}.")
        return load_image(path, load_size), str(path)  # the datasets' decoding, JPEG draft scale included
    if isinstance(item, Image.Image):
        if not item.width or not item.height:
            raise ValueError(f"{where}: an empty image ({item.width} x {item.height} pixels).")
        _warn_if_eight_bit_values_in_a_wide_mode(item, where)
        if (path := _file_as_opened(item)) is not None:  # decoded as dn2 predict decodes it (draft, PNG checks)
            return load_image(path, load_size), None
        return pil_to_uint8(item, load_size), None
    if isinstance(item, Tensor):
        if item.ndim not in (3, 4) or item.shape[-3] not in (1, 3):
            hint = ""
            if item.ndim in (3, 4) and item.shape[-1] in (1, 3):
                hint = f" (channels last [..., H, W, C]? item.permute({'0, 3, 1, 2' if item.ndim == 4 else '2, 0, 1'}))"
            elif item.ndim == 2:
                hint = " (one grayscale image [H, W]? item[None])"
            raise ValueError(
                f"{where}: a tensor image must be [C, H, W] or [B, C, H, W] with C = 1 or 3, got "
                f"{tuple(item.shape)}{hint}."
            )
        if not item.numel():
            raise ValueError(f"{where}: an empty tensor of shape {tuple(item.shape)}.")
        if item.dtype == torch.bool:  # .to(torch.uint8), the general hint, would give a black 0/1 image
            raise ValueError(f"{where}: a bool tensor is not an image; give item.to(torch.uint8) * 255 (True: white).")
        try:
            check_pixels(item if item.ndim == 4 else item[None])  # the DataLoader path's rule and message
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if item.dtype == torch.uint8 and int(item.max()) == 1:
            warnings.warn(
                f"{where}: a uint8 tensor of 0s and 1s is read as 0..255 pixels, a nearly black image: a mask or "
                "[0, 1] floats cast to uint8? Give [0, 1] floats as they are, or multiply 0/1 values by 255.",
                stacklevel=4,
            )
        return item.cpu(), None
    if isinstance(item, np.ndarray):
        raise ValueError(
            f"{where}: cannot read a NumPy array; give torch.from_numpy(array).permute(2, 0, 1) for an [H, W, C] "
            "array (np.array(image)), torch.from_numpy(array) for a [C, H, W] one, or Image.fromarray(array)."
        )
    raise ValueError(
        f"{where}: cannot read a {type(item).__name__}; give a tensor, a PIL image or a file path (str/Path)."
    )


def _warn_if_eight_bit_values_in_a_wide_mode(image: Image.Image, where: str) -> None:
    """An image built in memory in a 16/32-bit integer mode (``Image.fromarray`` of an int32 or uint16 array) has
    no bit depth on record: it is read as 16 bit (values / 65535), which makes 8-bit values nearly black."""
    if image.format is None and image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        high = int(np.asarray(image).max())  # getextrema() does not take the big-endian "I;16B"
        if high <= 255:
            warnings.warn(
                f"{where}: a mode {image.mode!r} image is read as 16 bit (0..65535), but its values are at most "
                f"{high}: if it holds 8-bit data, pass Image.fromarray(array.astype(np.uint8)) (mode 'L') or a uint8 "
                "tensor; its score is that of a nearly black image otherwise.",
                stacklevel=4,
            )


def _file_as_opened(image: Image.Image) -> Path | None:
    """The file ``image`` was opened from, when reading that file gives the caller's image: not decoded yet
    (``Image.open`` without ``load``, ``convert``, ...), at its first frame, not reduced (``draft``), and the path
    still names the file it opened (not replaced since, nor another file after a ``chdir``). Read from its file,
    it decodes exactly as the datasets decode that file (a JPEG at its draft scale; a PNG's bit depth,
    transparency and data checks, which a decoded copy no longer tells); otherwise the image is read as it is."""
    filename, fp = getattr(image, "filename", None), getattr(image, "fp", None)
    if not filename or fp is None or not getattr(image, "tile", None) or image.tell() != 0:
        return None
    try:
        opened, named = os.fstat(fp.fileno()), os.stat(filename)
        if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
            return None
        with warnings.catch_warnings():  # (the caller's own open said it already)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(filename) as fresh:  # (the header only)
                as_opened = (fresh.mode, fresh.size) == (image.mode, image.size)
    except Exception:  # a file object without a descriptor, a file gone or changed: read as it is
        return None
    return Path(filename) if as_opened else None

"""Decode image files into uint8 RGB tensors: the one place every file-reading path goes through.

:func:`load_image` applies the EXIF orientation, maps high-bit-depth pixels onto 0..255 by their value range
(16-bit integers divide by 257, [0, 1] floats multiply by 255) instead of clipping them, and refuses images
larger than :data:`MAX_IMAGE_PIXELS` before decoding them. JPEGs are decoded at a reduced scale (DCT scaling,
``Image.draft``) when a ``size`` at least twice smaller is asked for. :func:`image_problem` is the cheap
check run over a folder before training: it returns the reason a file will not load, or ``None``.
"""

from __future__ import annotations

import numbers
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from dn2_lightning.data.png_data import decoded_png_problem

#: Largest image (width x height, in pixels, after any JPEG scale reduction) that is decoded; larger files are
#: refused with :class:`ImageTooLargeError` before any pixel is read. The default is Pillow's own
#: decompression-bomb warning threshold (about 89.5 MP, 256 MiB as 8-bit RGB). Change it here, with the
#: environment variable ``DN2_MAX_IMAGE_PIXELS``, or per call/datamodule (``max_pixels``/``max_image_pixels``).
#: Above twice Pillow's ``PIL.Image.MAX_IMAGE_PIXELS`` Pillow itself refuses to open a file; raise both.
MAX_IMAGE_PIXELS: int = int(os.environ.get("DN2_MAX_IMAGE_PIXELS", 89_478_485))

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class UnreadableImageError(ValueError):
    """An image file cannot be decoded; the message names the file and the reason."""


class ImageTooLargeError(UnreadableImageError):
    """An image has more pixels than the configured limit (:data:`MAX_IMAGE_PIXELS`)."""


def load_image(path: str | Path, size: int | None = None, max_pixels: int | None = None) -> Tensor:
    """Decode an image file into uint8 ``[3, H, W]`` RGB, upright, resized to ``size`` x ``size`` if given.

    Grayscale is repeated over the three channels; transparent pixels are put on black (:func:`on_black`). 16-bit
    (and other integer) images are scaled from their full range (``round(v * 255 / 65535)``), float images must
    hold values in [0, 1] and are scaled by 255. The EXIF orientation tag is applied before resizing.

    Args:
        path: the image file.
        size: square output size (antialiased bilinear resize); ``None`` keeps the decoded size.
        max_pixels: refuse images with more pixels (after JPEG draft reduction); ``None`` =
            :data:`MAX_IMAGE_PIXELS`.

    Returns:
        uint8 tensor ``[3, size, size]`` (or ``[3, H, W]``).

    Raises:
        ImageTooLargeError: more pixels than ``max_pixels``.
        UnreadableImageError: anything else that stops the decoding (truncated file, unknown format, float
            values outside [0, 1], ...); the message names the file and the reason.
    """
    _check_size("size", size, numbers.Integral, "the decoded size")
    _check_size("max_pixels", max_pixels, numbers.Real, "MAX_IMAGE_PIXELS")  # (float("inf") lifts the limit)
    path = Path(path)
    try:
        with _open(path) as img:
            if size is not None:
                img.draft(None, (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale when that stays >= size
            _check_pixels(img, path, max_pixels)
            warn_if_many_frames(img, path)
            array = _to_uint8_rgb(img, path)
            _refuse_short_png_data(img, path)
    except UnreadableImageError:
        raise
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ... depending on the format
        raise UnreadableImageError(f"{path}: cannot decode ({type(err).__name__}: {err}).") from err
    image = torch.from_numpy(array).permute(2, 0, 1)
    if size is not None and tuple(image.shape[-2:]) != (size, size):
        image = resize_square(image, size)
    return image


def _check_size(name: str, value: object, kind: type, none_means: str) -> None:
    """``None`` or a number of ``kind`` >= 1 (NumPy's too: nothing here is saved in a checkpoint)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind) or not value >= 1):
        raise ValueError(f"{name}={value!r} must be None ({none_means}) or an integer >= 1.")


def pil_to_uint8(img: Image.Image, size: int | None = None) -> Tensor:
    """An in-memory PIL image as :func:`load_image` decodes a file: uint8 ``[3, H, W]`` RGB, upright, scaled
    from its bit depth, resized to ``size`` x ``size`` if given."""
    image = torch.from_numpy(_to_uint8_rgb(img, Path("<PIL image>"))).permute(2, 0, 1)
    if size is not None and tuple(image.shape[-2:]) != (size, size):
        image = resize_square(image, size)
    return image


def image_problem(path: str | Path, size: int | None = None, max_pixels: int | None = None) -> str | None:
    """Why :func:`load_image` would fail on ``path`` (a one-line reason naming the file), or ``None``.

    PNGs are checked without decoding (every chunk's checksum up to the end marker, so truncation is caught; pixel
    data that ends early within whole chunks is refused when the file is read); other formats are decoded as
    :func:`load_image` would (JPEGs at their reduced draft scale).
    """
    path = Path(path)
    try:
        if path.suffix.lower() != ".png":
            load_image(path, size, max_pixels)
            return None
        with _open(path) as img:
            _check_pixels(img, path, max_pixels)
            fix_png_transparency(img, path)
            img.verify()
        return None
    except UnreadableImageError as err:
        return str(err)
    except Exception as err:
        return f"{path}: cannot decode ({type(err).__name__}: {err})."


def _open(path: Path) -> Image.Image:
    """``Image.open`` with Pillow's decompression-bomb warning silenced: :func:`_check_pixels` decides."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except Image.DecompressionBombError as err:
            raise ImageTooLargeError(
                f"{path}: too large to decode ({err}). Raise PIL.Image.MAX_IMAGE_PIXELS and "
                "dn2_lightning.data.images.MAX_IMAGE_PIXELS (or max_image_pixels) if you mean it."
            ) from err


def _refuse_short_png_data(img: Image.Image, path: Path) -> None:
    """Pillow reads the rows a PNG's pixel data lacks as black without a word (:mod:`.png_data`)."""
    problem = decoded_png_problem(img, path)
    if problem is not None:
        raise UnreadableImageError(problem)


def _check_pixels(img: Image.Image, path: Path, max_pixels: int | None) -> None:
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    width, height = img.size
    if width * height > limit:
        raise ImageTooLargeError(
            f"{path}: {width}x{height} = {width * height} pixels exceeds the limit of {limit} pixels "
            "(max_image_pixels / dn2_lightning.data.images.MAX_IMAGE_PIXELS / $DN2_MAX_IMAGE_PIXELS); "
            "downscale the file or raise the limit."
        )


def _to_uint8_rgb(img: Image.Image, path: Path) -> np.ndarray:
    """Upright uint8 ``[H, W, 3]`` from any Pillow mode, scaling high-bit-depth values by their range and putting
    transparent pixels on black."""
    # before exif_transpose, whose copy no longer says it is a TIFF or what its file holds (the bit depths)
    top, stored_bits = integer_max(img), _stored_bits_per_channel(img)
    fix_png_transparency(img, path)
    min_is_white = tiff_min_is_white(img)
    img = ImageOps.exif_transpose(img)
    if img.mode in (*_SIXTEEN_BIT_MODES, "I"):
        values, bits = np.asarray(img), max(top.bit_length(), stored_bits)  # (a 32-bit TIFF's "I" is signed)
        if min_is_white:  # Pillow reads a 16-bit WhiteIsZero TIFF's values as stored: 0 (white) as black
            values = top - values.astype(np.int64)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > top:
            raise UnreadableImageError(
                f"{path}: {img.mode} pixel values span {low}..{high}, outside 0..{top}; save it as 8 or 16 bit."
            )
        if top > 65535 and 0 < high <= 65535:  # e.g. uint16 camera data saved through .astype(np.int32)
            raise UnreadableImageError(
                f"{path}: a {bits}-bit image whose values reach only {high} (of {top}): read by its "
                "range it is all black. If it holds 16-bit (or 12-bit) data, save it as 16 bit (np.uint16)."
            )
        if 0 < high < (top + 1) // 16:
            data = "12-bit (or 10-bit) camera data" if top == 65535 else "16-bit (or 12-bit) data"
            fix = "values * 16 for 12-bit" if top == 65535 else "or save 16-bit data as np.uint16"
            _warn_low_bit_depth(path, f"a {bits}-bit image whose values reach only {high} (of {top})", data, fix)
        array = np.rint(values.astype(np.float64) * (255.0 / top)).astype(np.uint8)
        transparent = img.info.get("transparency")  # a grey level marked transparent: on black, as 8-bit images
        if isinstance(transparent, int):
            array[values == transparent] = 0
    elif img.mode == "F":
        values = np.asarray(img)
        low, high = float(values.min()), float(values.max())
        if not (np.isfinite(low) and np.isfinite(high) and low >= 0.0 and high <= 1.0):
            raise UnreadableImageError(
                f"{path}: float pixel values span [{low:g}, {high:g}]; float images must hold values in [0, 1] "
                "(rescale it, or save it as 8 or 16 bit)."
            )
        array = np.rint((1.0 - values if min_is_white else values).astype(np.float64) * 255.0).astype(np.uint8)
    else:
        array = np.array(on_black(img).convert("RGB"))  # a writable copy (torch refuses read-only buffers)
        if stored_bits == 16 and 0 < int(array.max()) < 16:  # Pillow keeps the high byte of 16-bit colour channels
            found = f"a 16-bit colour image whose values stay below {(int(array.max()) + 1) * 256}"
            _warn_low_bit_depth(path, found, "12-bit (or 10-bit) camera data", "values * 16 for 12-bit")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array)


#: The once-per-process warnings already given (their keys); each DataLoader worker process has its own.
SAID: set[str] = set()


def said(key: str) -> bool:
    """Whether :func:`say_once` said ``key`` in this process."""
    return key in SAID


def say_once(key: str, message: str, stacklevel: int = 3) -> None:
    """``warnings.warn(message)`` the first time ``key`` is said in this process."""
    if said(key):
        return
    SAID.add(key)
    warnings.warn(f"{message} Said once per process (each DataLoader worker may say it).", stacklevel=stacklevel)


def _warn_low_bit_depth(path: Path, found: str, data: str, fix: str) -> None:
    """Said once per process: low-bit data stored in a wider file, scaled by the file's range, keeps at most 16 of
    the 256 levels the backbone sees."""
    say_once(
        f"low bit depth: {data}",
        f"{path} is {found}: if it holds {data}, it is read nearly black, with at most 16 (or 4) levels of 256, and "
        f"the embeddings lose its detail. Scale such images to the file's range ({fix}) or save them as 8 bit.",
        stacklevel=4,
    )


def warn_if_many_frames(img: Image.Image, path: str | Path, what: str = "image") -> None:
    """Said once per process (for images, for masks): a file of several frames of one size (a TIFF stack, an
    animated GIF/PNG/WebP) is read as its first frame. A phone's MPO JPEG (the photo, then previews or depth) and
    a TIFF's reduced pages (a thumbnail, a pyramid) are not said."""
    key = f"{what} of several frames"
    if said(key) or getattr(img, "n_frames", 1) == 1 or img.format == "MPO":
        return
    size = img.size
    img.seek(1)
    alike = img.size == size
    img.seek(0)
    if alike:
        say_once(
            key,
            f"{path} holds {img.n_frames} frames (a stack or an animation): only its first frame is read as the "
            f"{what}. Save each frame you mean as a file of its own.",
            stacklevel=4,
        )


def has_transparency(img: Image.Image) -> bool:
    """Whether ``img`` has an alpha channel or a palette's or colour's ``transparency`` (from its header)."""
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def on_black(img: Image.Image) -> Image.Image:
    """``img`` with its transparency (an alpha channel, or a palette's or colour's ``transparency``) composited onto
    black: ``convert("RGB")`` would keep the colour stored under transparent pixels, which no viewer shows and which
    differs from file to file (two images that look alike would score apart)."""
    if not has_transparency(img):
        return img
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)


def fix_png_transparency(img: Image.Image, path: str | Path) -> None:
    """Before ``img`` (a file just opened) is decoded: Pillow keeps a 2- or 4-bit grey PNG's transparent level (its
    ``tRNS``) as stored (0..3, 0..15) while it scales the pixels to 0..255, so no pixel matched it and the
    transparent ones were read in their grey, not on black; the level is scaled as the pixels are. A 16-bit colour
    PNG's transparent colour is 16-bit while Pillow keeps 8 bits of each channel, so its pixels cannot be told
    apart: refused, naming the file and the fix."""
    key, rawmode = img.info.get("transparency"), _rawmode(img)
    if img.format != "PNG" or key is None or rawmode is None:
        return
    if rawmode in ("L;2", "L;4") and isinstance(key, int):
        img.info["transparency"] = key * (255 // (2 ** int(rawmode[2:]) - 1))
    elif rawmode == "RGB;16B" and isinstance(key, tuple):
        raise UnreadableImageError(
            f"{path}: a 16-bit colour PNG with a transparent colour (tRNS {key}): its colours are read as 8 bit, so "
            "its transparent pixels cannot be found. Save it as RGBA (its transparent pixels at alpha 0) or as 8 bit."
        )


def tiff_min_is_white(img: Image.Image) -> bool:
    """Whether ``img`` is a 16-bit or float grey TIFF stored WhiteIsZero (PhotometricInterpretation 0), whose values
    Pillow reads as stored (it inverts 1- to 8-bit ones itself)."""
    modes = (*_SIXTEEN_BIT_MODES, "I", "F")
    return img.format == "TIFF" and img.mode in modes and img.tag_v2.get(262) == 0


def _rawmode(img: Image.Image) -> str | None:
    """How a file's pixels are stored (Pillow's raw mode of its first tile, e.g. PNG's ``"RGB;16B"``), ``None`` once
    decoded or for an image made in memory."""
    tile = getattr(img, "tile", None)
    rawmode = tile[0][3] if tile else None
    rawmode = rawmode[0] if isinstance(rawmode, tuple) and rawmode else rawmode
    return rawmode if isinstance(rawmode, str) else None


def _stored_bits_per_channel(img: Image.Image) -> int:
    """The bits per channel a file stores, from its header (16 for a 48-bit colour PNG or TIFF, which Pillow
    decodes to 8 bits); 8 when nothing says (an image in memory)."""
    if img.format == "TIFF":
        return _tiff_bits(img, default=8)
    rawmode = _rawmode(img)  # a file's, before it is decoded (an image made in memory has none); PNG: "RGB;16B"
    return 16 if rawmode is not None and ";16" in rawmode else 8


def integer_max(img: Image.Image) -> int:
    """The largest value of an integer image's pixel format (16-bit unless a TIFF says otherwise)."""
    if img.mode == "I" and img.format == "TIFF":
        return 2 ** min(_tiff_bits(img, default=32), 31) - 1  # a 32-bit TIFF is signed in Pillow's mode "I"
    return 65535


def _tiff_bits(img: Image.Image, default: int) -> int:
    """A TIFF's BitsPerSample (of its first channel), ``default`` when the tag is missing."""
    bits = img.tag_v2.get(258, default)
    return int(bits[0] if isinstance(bits, tuple) else bits)


def resize_square(image: Tensor, size: int) -> Tensor:
    """Antialiased resize of ``[..., H, W]`` to ``size`` x ``size`` by torchvision, imported on first use
    (importing torchvision costs seconds of start-up, which ``dn2-protocol`` never needs)."""
    from torchvision.transforms.v2.functional import resize

    return resize(image, [size, size], antialias=True)

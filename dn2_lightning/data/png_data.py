"""Whether a PNG's compressed pixel data holds every row its header promises.

Pillow decodes a PNG whose zlib stream ends early (a complete stream, every chunk checksum right, but fewer bytes
than the image needs: a writer that stopped, a tool that re-wrapped a cut stream) without a word, leaving the
missing rows black. libpng refuses such a file ("Not enough image data"); :func:`png_data_problem` lets
:func:`~dn2_lightning.data.images.load_image` and the mask reader refuse it too. It inflates the ``IDAT`` data
once more, counting bytes without keeping them (about 9 ms for a megapixel photo, half a decode), so the readers
run it only when the decoded image could hide short data (:func:`decoded_png_problem`).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type: grey, RGB, palette, grey + alpha, RGBA
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PIECE = 1 << 20  # inflate at most this many bytes at a time


def expected_data_bytes(width: int, height: int, bit_depth: int, colour_type: int, interlaced: bool) -> int:
    """Bytes of filtered pixel data (one filter byte per row of each pass) a PNG of this header decompresses to."""
    bits_per_pixel = _CHANNELS[colour_type] * bit_depth
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns > 0 and rows > 0:  # an empty pass has no rows, not even filter bytes
            total += rows * (1 + -(-columns * bits_per_pixel // 8))
    return total


def decoded_png_problem(img: Image.Image, path: str | Path) -> str | None:
    """:func:`png_data_problem` for a PNG ``img`` opened from ``path``, run only where short data can hide: Pillow
    refuses a stream that ends within a row, and leaves the rows after its end zero, so a non-interlaced image
    whose last row holds a non-zero value had data to its end (a bottom row of zeros, as masks and dark borders
    have, is counted). ``None`` for other formats."""
    if img.format != "PNG":
        return None
    img.load()
    width, height = img.size
    if not img.info.get("interlace") and np.asarray(img.crop((0, height - 1, width, height))).any():
        return None
    return png_data_problem(path)


def png_data_problem(path: str | Path) -> str | None:
    """Why the pixel data of the PNG at ``path`` is short of its header's rows (one line naming the file), or
    ``None`` when it is whole. Only the data is counted: Pillow reports other damage (checksums, a cut file)."""
    data = Path(path).read_bytes()
    if not data.startswith(_SIGNATURE):
        return None
    position, header, inflater, inflated = len(_SIGNATURE), None, zlib.decompressobj(), 0
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        body = data[position + 8 : position + 8 + length]
        position += 12 + length
        if kind == b"IHDR" and len(body) == 13:
            width, height, bit_depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if colour_type not in _CHANNELS:
                return None  # Pillow refuses it
            header = expected_data_bytes(width, height, bit_depth, colour_type, interlace == 1)
        elif kind == b"IDAT" and header is not None and inflated < header:
            try:
                inflated += _inflated_size(inflater, body, header - inflated)
            except zlib.error:
                return None  # damaged data: Pillow's decoder says so
        elif kind == b"IEND":
            break
    if header is None or inflated >= header:
        return None
    return (
        f"{path}: its PNG pixel data ends early ({inflated} of the {header} bytes its header needs), so the missing "
        "rows would read as zeros (black, or a palette's first colour). The file is damaged: write it again from its "
        "source."
    )


def _inflated_size(inflater: zlib._Decompress, compressed: bytes, wanted: int) -> int:
    """Bytes ``compressed`` inflates to, fed into the running ``inflater``, stopping once ``wanted`` are out."""
    out = 0
    while out < wanted and not inflater.eof:
        piece = len(inflater.decompress(compressed, _PIECE))
        out += piece
        compressed = inflater.unconsumed_tail
        if not compressed and piece < _PIECE:  # (after a full piece, ask again: nothing says zlib has no more)
            break
    return out

"""Files whose pixels Pillow decodes otherwise than the file holds, without a word: compared with the pixels each
file was written from (NumPy), as libpng and libtiff read them."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dn2_lightning.data import UnreadableImageError, load_image
from dn2_lightning.data.images import image_problem
from dn2_lightning.data.masks import read_mask


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _packed_rows(values: np.ndarray, bits: int) -> bytes:
    """``[H, W]`` grey levels of ``bits`` (1, 2, 4, 8) bits as PNG rows with filter type 0, packed high bits first."""
    per_byte = 8 // bits
    rows = b""
    for row in values.astype(np.uint8):
        row = np.concatenate([row, np.zeros(-len(row) % per_byte, np.uint8)]).reshape(-1, per_byte)
        shifts = np.array([8 - bits * (i + 1) for i in range(per_byte)], np.uint8)
        rows += b"\x00" + (row << shifts).sum(axis=1).astype(np.uint8).tobytes()
    return rows


def _png(width: int, height: int, bits: int, colour_type: int, rows: bytes, trns: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bits, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"tRNS", trns)
        + _chunk(b"IDAT", zlib.compress(rows))
        + _chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("bits", [2, 4])
def test_a_low_bit_grey_png_s_transparent_level_is_on_black(tmp_path, bits):
    """Pillow kept the tRNS level as stored (0..3, 0..15) and scaled the pixels to 0..255: no pixel matched it, so
    the transparent pixels were read in their grey (a mask's as anomalous)."""
    top = 2**bits - 1
    values = np.arange(6 * 7).reshape(6, 7) % (top + 1)
    key = 1
    path = tmp_path / "grey.png"
    path.write_bytes(_png(7, 6, bits, 0, _packed_rows(values, bits), struct.pack(">H", key)))
    expected = np.where(values == key, 0, np.rint(values * 255 / top)).astype(np.uint8)

    image = load_image(path).numpy()
    assert (image == expected[None]).all()
    assert (read_mask(path)[0].numpy() == (expected != 0)).all()


def test_a_16_bit_colour_png_with_a_transparent_colour_is_refused(tmp_path):
    """Its 16-bit tRNS colour was compared with the 8 bits Pillow keeps of each channel: the transparent pixels
    were read in their colour (and an 8-bit colour equal to the key's numbers would have been put on black)."""
    pixels = np.array([[[1000, 2000, 3000], [40000, 50000, 60000]]], np.uint16)
    rows = b"\x00" + pixels.astype(">u2").tobytes()
    path = tmp_path / "colour16.png"
    path.write_bytes(_png(2, 1, 16, 2, rows, pixels[0, 0].astype(">u2").tobytes()))

    with pytest.raises(UnreadableImageError, match=r"colour16\.png: a 16-bit colour PNG with a transparent colour"):
        load_image(path)
    with pytest.raises(UnreadableImageError, match=r"colour16\.png: .*Save it as RGBA"):
        read_mask(path)
    assert "colour16.png: a 16-bit colour PNG" in image_problem(path)


def _white_is_zero(path, grey: np.ndarray) -> None:
    """A grey TIFF of ``grey`` with its PhotometricInterpretation (tag 262) set to 0, WhiteIsZero."""
    Image.fromarray(grey).save(path)
    data = bytearray(path.read_bytes())
    directory = struct.unpack("<I", data[4:8])[0]
    for entry in range(struct.unpack("<H", data[directory : directory + 2])[0]):
        at = directory + 2 + 12 * entry
        if struct.unpack("<H", data[at : at + 2])[0] == 262:
            data[at + 8 : at + 10] = struct.pack("<H", 0)
            path.write_bytes(bytes(data))
            return
    raise AssertionError("no PhotometricInterpretation tag")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_a_white_is_zero_grey_tiff_is_not_read_inverted(tmp_path, dtype):
    """Pillow inverts 8-bit WhiteIsZero TIFFs (scanners, X-ray detectors) but read 16-bit and float ones as
    stored: white as black."""
    rng = np.random.default_rng(0)
    if dtype is np.float32:
        grey = rng.random((5, 6)).astype(dtype)
        inverted = np.rint((1.0 - grey.astype(np.float64)) * 255)
    else:
        top = np.iinfo(dtype).max
        grey = rng.integers(0, top + 1, (5, 6)).astype(dtype)
        inverted = np.rint((top - grey.astype(np.float64)) * 255 / top)
    _white_is_zero(tmp_path / "scan.tif", grey)

    assert (load_image(tmp_path / "scan.tif").numpy() == inverted.astype(np.uint8)[None]).all()

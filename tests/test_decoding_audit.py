"""Files whose pixels Pillow decodes otherwise than the file holds, without a word: compared with the pixels each
file was written from (NumPy), as libpng and libtiff read them."""

from __future__ import annotations

import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from dn2_lightning.data import UnreadableImageError, load_image
from dn2_lightning.data import images as images_module
from dn2_lightning.data.images import image_problem
from dn2_lightning.data.masks import mask_problem, read_mask
from dn2_lightning.inputs import as_image_batches


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


# PIL images handed to score_images, and masks: decoded as load_image decodes their files


def _review_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _file_png(header: bytes, raw: bytes, before_idat: bytes = b"") -> bytes:
    return (
        b"\x89PNG\r\n\x1a\n"
        + _review_chunk(b"IHDR", header)
        + before_idat
        + _review_chunk(b"IDAT", zlib.compress(raw))
        + _review_chunk(b"IEND", b"")
    )


def _first_image(item) -> np.ndarray:
    return next(iter(as_image_batches([item])))[0][0].numpy()


def test_a_pil_png_opened_from_a_file_keeps_its_two_bit_transparency_fix(tmp_path):
    """score_images' PIL image opened from a file is decoded as its file is: a decoded copy no longer tells the
    file's raw mode, and a 2-bit grey PNG's transparent pixels were read in their grey where load_image puts them
    on black."""
    values = np.array([[3, 3, 1, 1, 3, 3, 1, 1]] * 4, np.uint8)
    rows = b"".join(
        b"\x00"
        + bytes([(r[0] << 6) | (r[1] << 4) | (r[2] << 2) | r[3], (r[4] << 6) | (r[5] << 4) | (r[6] << 2) | r[7]])
        for r in values
    )
    path = tmp_path / "grey2.png"
    path.write_bytes(
        _file_png(struct.pack(">IIBBBBB", 8, 4, 2, 0, 0, 0, 0), rows, _review_chunk(b"tRNS", struct.pack(">H", 3)))
    )
    assert load_image(path)[0, 0].tolist() == [0, 0, 85, 85, 0, 0, 85, 85]
    assert _first_image(Image.open(path))[0, 0].tolist() == [0, 0, 85, 85, 0, 0, 85, 85]


def test_a_pil_16_bit_colour_png_with_trns_is_refused_as_its_file_is(tmp_path):
    """Same cause: the refusal of a 16-bit colour PNG's transparent colour needs the file's raw mode."""
    pixels = np.full((4, 4, 3), 1000, ">u2")
    header = struct.pack(">IIBBBBB", 4, 4, 16, 2, 0, 0, 0)
    path = tmp_path / "rgb16.png"
    path.write_bytes(
        _file_png(
            header, b"".join(b"\x00" + r.tobytes() for r in pixels), _review_chunk(b"tRNS", pixels[0, 0].tobytes())
        )
    )
    with pytest.raises(UnreadableImageError):
        load_image(path)
    with pytest.raises(UnreadableImageError):
        _first_image(Image.open(path))


def test_a_pil_16_bit_colour_png_of_12_bit_data_still_warns(tmp_path):
    """score_images warns for a 16-bit colour PNG of 12-bit data opened from a file (its raw mode says 16 bit), as
    load_image does: the PNG data check's load() had hidden it, and the image read nearly black without a word."""
    pixels = np.full((4, 4, 3), 3000, ">u2")
    path = tmp_path / "rgb16low.png"
    path.write_bytes(
        _file_png(struct.pack(">IIBBBBB", 4, 4, 16, 2, 0, 0, 0), b"".join(b"\x00" + r.tobytes() for r in pixels))
    )
    images_module.SAID.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _first_image(Image.open(path))
    assert any("16-bit colour image" in str(w.message) for w in caught)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_a_white_is_zero_mask_is_read_as_its_image_is(tmp_path, dtype):
    """16-bit and float WhiteIsZero TIFF masks are inverted back as their images are: read as stored, the mask read
    inverted (its background anomalous, its drawing normal)."""
    top = 65535 if dtype is np.uint16 else 1.0
    drawn = np.zeros((4, 6), bool)
    drawn[1:3, 2:4] = True
    path = tmp_path / "mask.tif"
    _white_is_zero(path, np.where(drawn, 0, top).astype(dtype))  # stored 0 = white = the drawing
    assert (load_image(path)[0].numpy()[drawn] == 255).all()
    assert (read_mask(path)[0].numpy().astype(bool) == drawn).all()


def test_mask_problem_refuses_what_read_mask_refuses(tmp_path):
    """The set-up check refuses a 16-bit colour mask with tRNS, as read_mask does: it passed set-up (beyond the first
    16 transparent masks) and stopped the test run when read."""
    pixels = np.zeros((4, 4, 3), ">u2")
    pixels[1:3, 1:3] = 65535
    path = tmp_path / "0_mask.png"
    header = struct.pack(">IIBBBBB", 4, 4, 16, 2, 0, 0, 0)
    path.write_bytes(
        _file_png(header, b"".join(b"\x00" + r.tobytes() for r in pixels), _review_chunk(b"tRNS", bytes(6)))
    )
    with pytest.raises(UnreadableImageError):
        read_mask(path)
    assert mask_problem(path) is not None


def test_a_pil_image_moved_to_a_later_frame_is_read_at_that_frame(tmp_path):
    """Only an image at its first frame is read from its file: one the caller moved on (``seek``) is read as it is."""
    frames = [Image.fromarray(np.full((4, 4, 3), value, np.uint8)) for value in (10, 200)]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    image = Image.open(tmp_path / "stack.tif")
    image.seek(1)
    assert np.unique(_first_image(image)).tolist() == [200]


def _flat_png(path: str, value: tuple[int, int, int]) -> None:
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_a_png_replaced_on_disk_after_opening_is_scored_as_opened(tmp_path):
    """An unread PIL image is read from its file only while the path still names the file it opened: one replaced
    since (os.replace) gave other pixels than the caller's image (a reviewer)."""
    path = str(tmp_path / "a.png")
    _flat_png(path, (255, 0, 0))
    image = Image.open(path)
    _flat_png(str(tmp_path / "b.png"), (0, 0, 255))
    os.replace(tmp_path / "b.png", path)
    batch, _ = next(as_image_batches([image]))
    assert batch[0, :, 0, 0].tolist() == list(image.convert("RGB").getpixel((0, 0)))


def test_a_png_opened_by_a_relative_path_is_scored_as_opened_after_chdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _flat_png("rel.png", (10, 10, 10))
    image = Image.open("rel.png")
    (tmp_path / "sub").mkdir()
    _flat_png("sub/rel.png", (250, 250, 250))
    monkeypatch.chdir(tmp_path / "sub")
    batch, _ = next(as_image_batches([image]))
    assert batch[0, :, 0, 0].tolist() == list(image.convert("RGB").getpixel((0, 0)))


def test_a_jpeg_the_caller_reduced_with_draft_is_read_as_reduced(tmp_path):
    """``img.draft("L", ...)`` changes what the opened image decodes to: it is read as the caller's image, not
    as the file."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(tmp_path / "x.jpg")
    image = Image.open(tmp_path / "x.jpg")
    image.draft("L", (16, 16))
    batch, _ = next(as_image_batches([image]))
    assert batch.shape[-2:] == (16, 16) and bool((batch[0, 0] == batch[0, 1]).all())


def test_a_large_pil_image_read_from_its_file_is_not_warned_about_twice(tmp_path, monkeypatch):
    """Reading the header again to see the file is still as opened repeated Pillow's decompression-bomb warning,
    which the caller's own Image.open had given."""
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "large.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)  # "large": above Pillow's warning, below its refusal
    with pytest.warns(Image.DecompressionBombWarning):
        image = Image.open(tmp_path / "large.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        batch, _ = next(iter(as_image_batches([image])))
    assert batch.shape == (1, 3, 64, 64)

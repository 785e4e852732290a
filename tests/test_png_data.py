"""PNGs whose compressed pixel data ends before their last row (every checksum right): Pillow reads the missing rows
as black without a word, so a damaged training image or mask scored as if it were whole."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dn2_lightning.data import ImageFolderDataset, OneClassDataModule, UnreadableImageError, load_image
from dn2_lightning.data.masks import mask_problem, read_mask
from dn2_lightning.data.png_data import expected_data_bytes, png_data_problem
from dn2_lightning.inputs import as_image_batches

_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(header: bytes, raw: bytes, idat_size: int | None = None) -> bytes:
    """A PNG of ``header`` (IHDR's 13 bytes) whose pixel data is ``raw`` as one complete zlib stream, in IDAT
    chunks of ``idat_size`` bytes (one chunk if ``None``)."""
    stream = zlib.compress(raw)
    size = idat_size or len(stream)
    idats = b"".join(_chunk(b"IDAT", stream[i : i + size]) for i in range(0, len(stream), size))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + idats + _chunk(b"IEND", b"")


def _parts(path: Path) -> tuple[bytes, bytes]:
    """(IHDR's 13 bytes, the inflated IDAT data) of a PNG file, read by zlib directly."""
    data, position, header, stream = path.read_bytes(), 8, b"", b""
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        body = data[position + 8 : position + 8 + length]
        header = body if kind == b"IHDR" else header
        stream += body if kind == b"IDAT" else b""
        position += 12 + length
    return header, zlib.decompress(stream)


def _rgb_header(width: int, height: int, interlace: int = 0) -> bytes:
    return struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, interlace)


def _filtered_rows(pixels: np.ndarray) -> bytes:
    """8-bit ``[H, W, C]`` pixels as PNG rows with filter type 0 (none)."""
    return b"".join(b"\x00" + row.tobytes() for row in pixels)


def test_pixel_data_that_ends_early_is_refused_wherever_a_file_is_read(tmp_path):
    whole = np.full((8, 8, 3), 200, np.uint8)
    rows = _filtered_rows(whole)
    (tmp_path / "whole.png").write_bytes(_png(_rgb_header(8, 8), rows))
    (tmp_path / "short.png").write_bytes(_png(_rgb_header(8, 8), rows[: len(rows) // 2]))
    assert np.asarray(Image.open(tmp_path / "short.png").convert("RGB"))[4:].max() == 0  # Pillow: black, no word

    assert load_image(tmp_path / "whole.png").unique().tolist() == [200]
    reason = r"short\.png: its PNG pixel data ends early \(100 of the 200 bytes its header needs\)"
    with pytest.raises(UnreadableImageError, match=reason):
        load_image(tmp_path / "short.png", size=4)
    with pytest.raises(UnreadableImageError, match=reason):  # score_images' path, a PIL image read from its file
        list(as_image_batches([tmp_path / "whole.png", Image.open(tmp_path / "short.png")]))
    # the check at construction reads no pixels (a fraction of a ms a file): the file is refused when it is read
    dataset = ImageFolderDataset([tmp_path / "whole.png", tmp_path / "short.png"], [0, 0], 4, on_corrupt="raise")
    assert dataset[0]["image"].unique().tolist() == [200]
    with pytest.raises(UnreadableImageError, match=reason):
        dataset[1]


def test_a_whole_png_whose_last_row_is_black_is_read(tmp_path):
    """A black bottom row (a border, a digit's background) is what short data leaves, so it is counted, and the
    whole file is read; a row of one non-zero channel of one pixel is not zero."""
    pixels = np.zeros((6, 5, 3), np.uint8)
    pixels[:3] = 90
    path = tmp_path / "border.png"
    Image.fromarray(pixels).save(path)
    assert np.array_equal(load_image(path).permute(1, 2, 0).numpy(), pixels)
    pixels[-1, -1, -1] = 1
    Image.fromarray(pixels).save(path)
    assert load_image(path)[2, -1, -1] == 1


def test_a_mask_whose_pixel_data_ends_early_is_refused_at_set_up(tmp_path):
    """Its missing rows would read as normal pixels: an anomaly's region cut in half, PRO and pixel AUROC wrong."""
    root = tmp_path / "set"
    for folder in ("train/good", "test/good", "test/scratch"):
        (root / folder).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (8, 8, 3), np.uint8)).save(
                root / folder / f"{i}.png"
            )
    (root / "ground_truth" / "scratch").mkdir(parents=True)
    drawing = np.zeros((8, 8, 1), np.uint8)
    drawing[1:7, 2:6] = 255
    rows = _filtered_rows(drawing)
    grey = struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0)
    (root / "ground_truth" / "scratch" / "0_mask.png").write_bytes(_png(grey, rows))
    short = root / "ground_truth" / "scratch" / "1_mask.png"
    short.write_bytes(_png(grey, rows[:36]))  # the drawing's first three rows only
    assert int(read_mask(root / "ground_truth" / "scratch" / "0_mask.png").sum()) == 24
    assert mask_problem(root / "ground_truth" / "scratch" / "0_mask.png") is None

    with pytest.raises(UnreadableImageError, match=r"1_mask\.png: its PNG pixel data ends early \(36 of the 72"):
        read_mask(short)
    assert "ends early" in mask_problem(short)
    with pytest.raises(ValueError, match=r"1 ground-truth mask\(s\) cannot be read: .*1_mask\.png: its PNG pixel"):
        OneClassDataModule("folder", root=str(root)).setup()


@pytest.mark.parametrize("size", [(1, 1), (7, 3), (13, 17)])
@pytest.mark.parametrize("mode", ["1", "L", "LA", "P4", "P", "RGB", "RGBA", "I;16"])
def test_the_length_a_header_needs_is_what_pillow_writes(tmp_path, mode, size):
    """Every colour type and bit depth Pillow writes, odd widths included (rows of 1- and 4-bit pixels end in a
    partly used byte): the count is zlib's, one byte less is refused, trailing bytes are not."""
    values = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 4), np.uint8)
    if mode == "I;16":
        image = Image.fromarray(values[..., 0].astype(np.uint16) * 257)
    elif mode.startswith("P"):
        image = Image.fromarray(values[..., :3]).quantize(16 if mode == "P4" else 200)
    else:
        image = Image.fromarray(values).convert(mode)
    path = tmp_path / "written.png"
    image.save(path, bits=4) if mode == "P4" else image.save(path)
    header, raw = _parts(path)
    width, height, bit_depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", header)
    one_colour = mode.startswith("P") and size == (1, 1)  # a palette of one colour is written 1-bit
    assert (bit_depth, interlace) == (1 if one_colour else {"1": 1, "P4": 4, "I;16": 16}.get(mode, 8), 0)
    assert expected_data_bytes(width, height, bit_depth, colour_type, False) == len(raw)
    assert png_data_problem(path) is None

    path.write_bytes(_png(header, raw[:-1]))
    assert f"({len(raw) - 1} of the {len(raw)} bytes" in png_data_problem(path)
    path.write_bytes(_png(header, raw + b"\x00" * 5))  # too much data: libpng warns and reads the image
    assert png_data_problem(path) is None


@pytest.mark.parametrize("size", [(1, 1), (2, 1), (5, 3), (9, 10), (16, 16), (17, 33)])
def test_interlaced_data_is_counted_pass_by_pass(tmp_path, size):
    """Adam7: seven sub-images, an empty one (no columns or no rows) has no filter bytes. The hand-made file is
    checked against Pillow's decoder, which must read back the pixels it was made of."""
    width, height = size
    pixels = np.random.default_rng(width * height).integers(0, 255, (height, width, 3), np.uint8)
    raw = b"".join(_filtered_rows(pixels[y0::dy, x0::dx]) for x0, y0, dx, dy in _ADAM7 if pixels[y0::dy, x0::dx].size)
    path = tmp_path / "interlaced.png"
    path.write_bytes(_png(_rgb_header(width, height, interlace=1), raw))
    assert np.array_equal(np.asarray(Image.open(path)), pixels)
    assert expected_data_bytes(width, height, 8, 2, True) == len(raw)
    assert png_data_problem(path) is None
    path.write_bytes(_png(_rgb_header(width, height, interlace=1), raw[:-1]))
    assert "ends early" in png_data_problem(path)


def test_an_interlaced_png_missing_its_last_pass_is_refused_though_its_last_row_is_whole(tmp_path):
    """Three rows: the seventh pass holds row 1 alone, so without it Pillow fills rows 0 and 2 and leaves row 1
    black, and the bottom row says nothing."""
    pixels = np.random.default_rng(0).integers(1, 255, (3, 5, 3), np.uint8)
    raw = b"".join(_filtered_rows(pixels[y0::dy, x0::dx]) for x0, y0, dx, dy in _ADAM7 if pixels[y0::dy, x0::dx].size)
    path = tmp_path / "interlaced.png"
    path.write_bytes(_png(_rgb_header(5, 3, interlace=1), raw[: -len(_filtered_rows(pixels[1:2]))]))
    decoded = np.asarray(Image.open(path))
    assert decoded[1].max() == 0 and decoded[2].min() > 0  # Pillow: no word
    with pytest.raises(UnreadableImageError, match=r"interlaced\.png: its PNG pixel data ends early \(36 of the 52"):
        load_image(path)


@pytest.mark.parametrize("idat_size", [None, 7, 65536])
def test_data_that_inflates_far_beyond_its_size_is_counted_whole(tmp_path, idat_size):
    """A flat image compresses a thousandfold: a chunk inflates to several of the counter's 1 MiB pieces, and a
    stream split in chunks of 7 bytes is counted across them."""
    rows = _filtered_rows(np.zeros((1000, 1200, 3), np.uint8))
    path = tmp_path / "flat.png"
    path.write_bytes(_png(_rgb_header(1200, 1000), rows, idat_size))
    assert png_data_problem(path) is None
    path.write_bytes(_png(_rgb_header(1200, 1000), rows[:-1], idat_size))
    assert f"({len(rows) - 1} of the {len(rows)} bytes" in png_data_problem(path)

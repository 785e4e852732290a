"""What the safety checks of the data path cost: file decoding, the set-up check, the cache key.

    python benchmarks/loading_bench.py [--repeats 20]

Prints a markdown table. Rows: ``load_image`` of a camera-sized JPEG with and without the reduced-scale (draft)
decode, 1024 px PNGs (one with a black bottom row, whose pixel data is counted once more: ``png_data``), a mask
read and checked; ``image_problem`` (the check every folder file gets at set-up); the data fingerprint and
weights identity that key the embedding cache.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_args import at_least
from torchvision.transforms.v2.functional import resize

from dn2_lightning.backbones import get_backbone_spec
from dn2_lightning.data.images import image_problem, load_image
from dn2_lightning.data.masks import mask_problem, read_mask
from dn2_lightning.data.png_data import png_data_problem
from dn2_lightning.data.sources import load_split


def per_call_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=at_least(1), default=20)
    args = parser.parse_args()
    from PIL import Image

    rng = np.random.default_rng(0)
    scratch = tempfile.TemporaryDirectory(prefix="dn2-loading-")  # removed when the script ends
    folder = Path(scratch.name)
    smooth = np.add.outer(np.arange(3000) // 5, np.arange(4000) // 7).astype(np.uint8)
    photo = np.stack([smooth, smooth[::-1], smooth[:, ::-1]], axis=-1)
    Image.fromarray(photo).save(folder / "photo.jpg", quality=90)  # 4000 x 3000, 12 MP
    Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).save(folder / "scan.png")
    jpeg, png = folder / "photo.jpg", folder / "scan.png"
    dark = photo[:1024, :1024].copy()
    dark[-16:] = 0  # a black bottom row, as short pixel data leaves: its data is counted once more (png_data)
    Image.fromarray(dark).save(folder / "dark_edge.png")
    Image.fromarray(photo[:1024, :1024]).save(folder / "smooth.png")
    mask = np.zeros((1024, 1024), np.uint8)
    mask[300:500, 200:700] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    rows = [
        ("load_image, 12 MP JPEG -> 224 (draft: decoded at 1/8)", lambda: load_image(jpeg, 224)),
        (
            "full 12 MP JPEG decode, then resize -> 224 (no draft)",
            lambda: resize(load_image(jpeg), [224, 224], antialias=True),
        ),
        ("load_image, 1024 px PNG -> 224", lambda: load_image(png, 224)),
        ("load_image, 1024 px smooth PNG -> 224", lambda: load_image(folder / "smooth.png", 224)),
        (
            "load_image, the same with a black bottom row -> 224 (its pixel data counted)",
            lambda: load_image(folder / "dark_edge.png", 224),
        ),
        ("png_data_problem alone, that PNG", lambda: png_data_problem(folder / "dark_edge.png")),
        ("read_mask, 1024 px mask (black bottom row: its data counted)", lambda: read_mask(folder / "mask.png")),
        (
            "set-up check mask_problem, 1024 px mask (checksums, data counted)",
            lambda: mask_problem(folder / "mask.png"),
        ),
        ("set-up check image_problem, 12 MP JPEG (decode at 1/8)", lambda: image_problem(jpeg, 224)),
        ("set-up check image_problem, 1024 px PNG (checksums only)", lambda: image_problem(png, 224)),
    ]
    train = load_split("fashionmnist", "train")
    spec = get_backbone_spec("efficientnet_lite0")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats\n")
    print("| operation | ms per call |")
    print("|---|---:|")
    for name, fn in rows:
        print(f"| {name} | {per_call_ms(fn, args.repeats):.1f} |")
    # drop the cached value first on every call (``pop(...) or fingerprint`` returned the cache every other call)
    fingerprint = per_call_ms(lambda: (train.__dict__.pop("fingerprint", None), train.fingerprint), 3)
    print(f"| cache key: fingerprint of FashionMNIST train (60k x 28 x 28 + labels) | {fingerprint:.1f} |")
    start = time.perf_counter()
    spec.weights_id()
    print(
        f"| cache key: weights_id of efficientnet_lite0 (SHA-256 of its file, once per process) | "
        f"{1000 * (time.perf_counter() - start):.1f} |"
    )


if __name__ == "__main__":
    main()

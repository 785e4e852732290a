"""A deterministic synthetic-defect data set with exact masks, written in MVTec AD's folder layout.

Normal images are a woven texture (oriented sinusoidal gratings with per-image phase, orientation
jitter and fine noise). Defective test images carry one defect whose pixels are exactly its mask:

* ``patch``: a square of the texture turned by 90 degrees and tinted;
* ``scratch``: a thin dark or bright line segment;
* ``blob``: an ellipse of shifted colour.

Layout (what ``OneClassDataModule(dataset="folder")`` reads, masks included)::

    root/train/good/000.png
    root/test/good/000.png
    root/test/<kind>/000.png
    root/ground_truth/<kind>/000_mask.png     # 255 = defect, 0 = normal

``python -m dn2_lightning.data.synthetic --root DIR`` writes it; ``OneClassDataModule(dataset="synthetic")``
writes it on first use (into ``root`` or ``<data root>/synthetic_defects``) and then reads it as a folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from dn2_lightning.validation import check_seed

DEFECT_KINDS = ("patch", "scratch", "blob")
NORMAL_KIND = "good"
_MARKER = "synthetic_defects.json"


def synthetic_defects_root(root: str | Path | None = None) -> Path:
    """Where ``dataset="synthetic"`` keeps its files: ``root``, or ``<default data root>/synthetic_defects``."""
    from dn2_lightning.data.sources import default_data_root

    return Path(root) if root is not None else default_data_root() / "synthetic_defects"


def ensure_synthetic_defects(root: str | Path | None = None) -> Path:
    """The synthetic set at :func:`synthetic_defects_root` ``(root)``: kept as it is if a complete one is
    there (whatever its settings), else written with the defaults of :func:`write_synthetic_defects`."""
    folder = synthetic_defects_root(root)
    return folder if (folder / _MARKER).is_file() else write_synthetic_defects(folder)


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A normal image: float ``[size, size, 3]`` in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    image = np.zeros((size, size))
    for angle, frequency, weight in ((0.0, 9.0, 0.5), (np.pi / 2, 9.0, 0.5), (np.pi / 4, 23.0, 0.15)):
        a = angle + rng.normal(0.0, 0.04)
        phase = rng.uniform(0, 2 * np.pi)
        image += weight * np.sin(2 * np.pi * frequency * (x * np.cos(a) + y * np.sin(a)) + phase)
    image = 0.5 + 0.35 * image / 1.15 + rng.normal(0.0, 0.03, (size, size))
    colour = np.array([0.75, 0.6, 0.45]) + rng.normal(0.0, 0.02, 3)
    return np.clip(image[..., None] * colour[None, None, :] * 1.3, 0.0, 1.0)


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(defective image, bool mask [H, W])``: ``kind`` painted onto ``image``; the mask is exactly the
    changed region."""
    size = image.shape[0]
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    out = image.copy()
    if kind == "patch":
        side = int(rng.integers(size // 8, size // 5 + 1))
        top, left = (int(v) for v in rng.integers(size // 10, size - side - size // 10, 2))
        mask = np.zeros((size, size), dtype=bool)
        mask[top : top + side, left : left + side] = True
        turned = np.rot90(texture(rng, size), 1) * np.array([0.8, 1.0, 1.25])
        out[mask] = np.clip(turned[mask], 0.0, 1.0)
    elif kind == "scratch":
        length = rng.uniform(0.25, 0.45) * size
        angle = rng.uniform(0, np.pi)
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        dy, dx = np.sin(angle), np.cos(angle)
        along = (y - cy) * dy + (x - cx) * dx
        across = np.abs(-(y - cy) * dx + (x - cx) * dy)
        mask = (np.abs(along) <= length / 2) & (across <= max(1.0, size / 64))
        out[mask] = 0.05 if rng.uniform() < 0.5 else 0.95
    elif kind == "blob":
        ry, rx = rng.uniform(0.05, 0.1, 2) * size
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        mask = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
        out[mask] = np.clip(out[mask] * np.array([0.45, 0.7, 1.1]) + np.array([0.0, 0.05, 0.25]), 0.0, 1.0)
    else:
        raise ValueError(f"kind={kind!r} is not one of {list(DEFECT_KINDS)}.")
    return out, mask


def _refuse_foreign_folder(root: Path) -> None:
    """A set written here before (its marker file) may be replaced; anything else at ``root`` is the user's."""
    if root.exists() and not (root / _MARKER).is_file() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(
            f"root={str(root)!r} holds files that are not a synthetic set (no {_MARKER}), and writing the set "
            "there would replace them. Give dataset='synthetic' an empty or new folder as root (or none: "
            "<data root>/synthetic_defects), or dataset='folder' to read the images that are there."
        )


def _to_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)).save(path)


def write_synthetic_defects(
    root: str | Path,
    n_train: int = 100,
    n_test_good: int = 20,
    n_test_per_kind: int = 10,
    image_size: int = 128,
    seed: int = 0,
    kinds: tuple[str, ...] = DEFECT_KINDS,
) -> Path:
    """Write the data set to ``root`` (replacing what a previous call with other settings wrote; any other
    non-empty folder is refused, never deleted).

    Files are rendered into a temporary folder next to ``root`` and moved into place at the end, so a
    crashed run never leaves a half-written set that looks complete. A call with the settings already on
    disk does nothing.

    Args:
        root: target folder (created).
        n_train: normal training images.
        n_test_good: normal test images.
        n_test_per_kind: defective test images per kind.
        image_size: square image size in pixels (>= 32).
        seed: the whole set is a function of the settings and this seed.
        kinds: defect kinds, a subset of :data:`DEFECT_KINDS`.

    Returns:
        ``root`` as a Path.
    """
    kinds = (kinds,) if isinstance(kinds, str) else kinds  # one kind, not its letters
    settings = {
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_per_kind": n_test_per_kind,
        "image_size": image_size,
        "seed": seed,
        "kinds": list(kinds),
        "version": 1,
    }
    _validate(settings)
    root = Path(root)
    if _holds(root, settings):
        return root
    _refuse_foreign_folder(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        _render(staging, settings)
        (staging / _MARKER).write_text(json.dumps(settings))
        if _holds(root, settings):  # another job wrote the same set meanwhile (and may be reading it): keep it
            return root
        if root.exists():  # moved aside before it is deleted, so the new set appears in one rename
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}-old-", dir=root.parent))
            os.replace(root, old / root.name)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(staging, root)
        except OSError:
            if not _holds(root, settings):  # another job moved its set in first: fine if it is this one
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return root


def _holds(root: Path, settings: dict) -> bool:
    """Whether ``root`` holds a complete set written with ``settings``."""
    try:
        return json.loads((root / _MARKER).read_text()) == settings
    except (OSError, ValueError):
        return False


def _validate(settings: dict) -> None:
    for name in ("n_train", "n_test_good", "n_test_per_kind"):
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1.")
    size = settings["image_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise ValueError(f"image_size={size!r} must be an integer >= 32.")
    check_seed("seed", settings["seed"])
    unknown = [k for k in settings["kinds"] if k not in DEFECT_KINDS]
    if unknown or not settings["kinds"]:
        raise ValueError(f"kinds={settings['kinds']!r} must be a non-empty subset of {list(DEFECT_KINDS)}.")


def _render(root: Path, settings: dict) -> None:
    size, seed = settings["image_size"], settings["seed"]
    # one independent stream per image, so every file depends only on (seed, split, kind, number)
    streams = np.random.SeedSequence(seed % 2**64)  # SeedSequence takes no negative seed; torch does

    def rng(*key: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([streams.entropy, *key]))

    folders = {"train": root / "train" / NORMAL_KIND, "test": root / "test" / NORMAL_KIND}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for i in range(settings["n_train"]):
        _to_png(texture(rng(0, 0, i), size), folders["train"] / f"{i:03d}.png")
    for i in range(settings["n_test_good"]):
        _to_png(texture(rng(1, 0, i), size), folders["test"] / f"{i:03d}.png")
    for k, kind in enumerate(settings["kinds"], start=1):
        images, masks = root / "test" / kind, root / "ground_truth" / kind
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for i in range(settings["n_test_per_kind"]):
            generator = rng(1, k, i)
            image, mask = add_defect(texture(generator, size), kind, generator)
            _to_png(image, images / f"{i:03d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(masks / f"{i:03d}_mask.png")


def main(argv: list[str] | None = None) -> None:
    """``python -m dn2_lightning.data.synthetic --root DIR [--n_train 100 ...]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="target folder (default: <data root>/synthetic_defects)")
    parser.add_argument("--n_train", type=int, default=100)
    parser.add_argument("--n_test_good", type=int, default=20)
    parser.add_argument("--n_test_per_kind", type=int, default=10)
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k != "root"}
    try:
        print(write_synthetic_defects(synthetic_defects_root(args.root), **options))
    except (FileExistsError, ValueError) as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()

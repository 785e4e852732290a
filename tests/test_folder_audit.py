"""The folder datamodule's test set against an independent listing of MVTec AD's layout (os.walk): a
``dn2_reports`` folder inside ``test/``, one folder reached as two kinds through a link, a kind that is a link to
nothing."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dn2_lightning.data import OneClassDataModule

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((10, 12, 3), value, np.uint8)).save(path)


def _layout(root: Path) -> Path:
    names = ("train/0.png", "train/1.png", "test/good/0.png", "test/good/1.png", "test/scratch/0.png")
    for i, name in enumerate(names):
        _image(root / name, 20 * i)
    return root


def _expected(root: Path, normal_dir: str = "good") -> dict[str, int]:
    """What the layout means, listed independently: real images under test/<kind>/ (not dn2_reports), each file
    once, label 0 for the normal kind."""
    found: dict[str, int] = {}
    for kind in sorted(os.listdir(root / "test")):
        if kind.startswith(".") or kind == "dn2_reports" or not os.path.isdir(root / "test" / kind):
            continue
        for top, folders, names in os.walk(root / "test" / kind):  # real folders only: a link adds no image
            folders[:] = [f for f in folders if not f.startswith(".") and f != "dn2_reports"]
            for name in names:
                if not name.startswith(".") and os.path.splitext(name)[1].lower() in EXTENSIONS:
                    found[os.path.join(top, name)] = int(kind != normal_dir)
    return found


def _scored(dm: OneClassDataModule) -> dict[str, int]:
    dataset = dm.test_dataset
    labels = [int(dataset[i]["label"]) for i in range(len(dataset))]
    return dict(zip(map(str, dataset.paths), labels, strict=True))


def test_a_reports_folder_inside_test_is_not_a_kind(tmp_path):
    """test/dn2_reports/ (reports written by a run whose log dir was test/, e.g. logger=False run from inside it)
    became an anomalous kind: the reports' figures were scored as anomalous test images."""
    root = _layout(tmp_path / "set")
    _image(root / "test" / "dn2_reports" / "predict_0" / "anomaly_maps" / "0_good_0.png", 250)
    dm = OneClassDataModule("folder", root=str(root), load_size=8)
    dm.setup()
    assert _scored(dm) == _expected(root)
    assert "dn2_reports" not in dm.classes


@pytest.mark.parametrize("link", ["test/scratch_copy", "test/scratch/more_good"])
def test_a_folder_reached_as_two_kinds_through_a_link_is_refused_not_scored_twice(tmp_path, link):
    """test/scratch_copy -> test/scratch scored each anomalous image twice; test/scratch/more_good -> test/good
    scored each normal image twice, once labelled anomalous (folder links are followed each folder once within a
    kind, not across kinds)."""
    root = _layout(tmp_path / "set")
    target = root / "test" / ("good" if link.endswith("good") else "scratch")
    os.symlink(target, root / link)
    dm = OneClassDataModule("folder", root=str(root), load_size=8)
    with pytest.raises(ValueError, match=r"reached more than once") as caught:
        dm.setup()
    assert str(root / link) in str(caught.value)
    os.remove(root / link)
    dm = OneClassDataModule("folder", root=str(root), load_size=8)
    dm.setup()
    assert _scored(dm) == _expected(root)


def test_a_kind_that_is_a_link_to_nothing_is_said(tmp_path):
    """test/crack -> an unmounted disk vanished from the test set without a word (links to nothing among the files
    are said)."""
    root = _layout(tmp_path / "set")
    os.symlink(tmp_path / "unmounted" / "crack", root / "test" / "crack")
    dm = OneClassDataModule("folder", root=str(root), load_size=8)
    with pytest.warns(UserWarning, match=r"test/crack.*a link to nothing"):
        dm.setup()
    assert _scored(dm) == _expected(root)


def test_a_folder_link_to_nothing_inside_a_split_is_said(tmp_path):
    """train/batch2 -> an unmounted disk: its images left the bank without a word (a file link to nothing is said)."""
    root = _layout(tmp_path / "set")
    os.symlink(tmp_path / "unmounted" / "batch2", root / "train" / "batch2")
    dm = OneClassDataModule("folder", root=str(root), load_size=8)
    with pytest.warns(UserWarning, match=r"batch2 \(a link to nothing\)"):
        dm.setup()
    assert len(dm.train_dataset) == 2


def test_upper_case_extensions_unicode_spaces_nested_kinds_and_links_agree_with_the_layout(tmp_path):
    """What agreed in the audit, kept: the listing, labels and mask pairing for awkward but valid names."""
    root = _layout(tmp_path / "set")
    elsewhere = tmp_path / "elsewhere"
    names = ["test/good/A B.PNG", "test/good/ü.JPG", "test/scratch/deep/0.tiff", "test/scratch/ñ 1.jpeg"]
    for i, name in enumerate(names + ["train/sub/x.BMP", "test/good/.hidden.png", "test/scratch/._0.png"]):
        _image(root / name, 30 + i)
    _image(elsewhere / "7.webp", 99)
    os.symlink(elsewhere, root / "test" / "dent")
    (root / "test" / "good" / "Thumbs.db").write_bytes(b"x")
    (root / "test" / "good" / "notes.txt").write_text("x")
    expected = _expected(root)
    expected[str(root / "test" / "dent" / "7.webp")] = 1  # a kind that is a link to a folder elsewhere
    masks = {}
    for path, label in expected.items():
        if label:
            relative = Path(path).relative_to(root / "test")
            masks[path] = root / "ground_truth" / relative.parent / f"{relative.stem}_mask.png"
            masks[path].parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((10, 12), 255, np.uint8)).save(masks[path])
    dm = OneClassDataModule("folder", root=str(root) + "/", load_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.setup()
    assert _scored(dm) == expected
    assert {str(p): m for p, m in zip(dm.test_dataset.paths, dm.test_dataset.mask_paths, strict=True)} == {
        path: masks.get(path) for path in expected
    }
    assert {p.relative_to(root).as_posix() for p in dm.train_dataset.paths} == {"train/0.png", "train/1.png"} | {
        "train/sub/x.BMP"
    }

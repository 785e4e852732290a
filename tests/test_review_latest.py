"""Review of the latest changes: defects found, each with a test that failed before its fix."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_data import make_folder  # noqa: E402

from dn2_lightning.data import GroupDataModule, OneClassDataModule  # noqa: E402


class _PathLike(os.PathLike):
    """An os.PathLike that is no pathlib path (as pytest's legacy ``tmpdir`` is)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __fspath__(self) -> str:
        return self.path


def test_a_data_root_given_as_an_os_pathlike_is_taken_as_its_path(tmp_path):
    """root=<an os.PathLike that is not a pathlib path> was read as a folder before, and is now refused as 'no
    folder's path' (the new type check knew str and PurePath only); it is kept as its string, for checkpoints."""
    root = make_folder(tmp_path / "data", corrupt=False)
    dm = OneClassDataModule(dataset="folder", root=_PathLike(str(root)), load_size=16)
    assert dm.hparams.root == str(root)
    dm.setup()
    assert len(dm.train_dataset) == 5
    group = GroupDataModule(dataset="fashionmnist", root=_PathLike(str(tmp_path / "not_yet")))
    assert group.hparams.root == str(tmp_path / "not_yet")
    for wrong in (b"/data", ["a"], 123):  # still refused
        with pytest.raises(ValueError, match=r"root=.* must be a folder's path"):
            OneClassDataModule(dataset="fashionmnist", root=wrong)

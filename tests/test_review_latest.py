"""Review of the latest changes: defects found, each with a test that failed before its fix."""

from __future__ import annotations

import os
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from helpers import BlobDataModule, brute_force_scores, linear_backbone, quiet_trainer  # noqa: E402
from test_data import make_folder  # noqa: E402

from dn2_lightning import DN2Detector, DN2Module  # noqa: E402
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


def test_a_threshold_as_a_numpy_long_double_saves_a_checkpoint_that_loads(tmp_path):
    """check_threshold took any numbers.Real: an np.longdouble (float128 on Linux) stayed one in the hyperparameters
    (its .item() is no Python float), so the fit saved a checkpoint that weights-only loading refused; a Fraction
    passed the check and failed inside torch.quantile (TypeError naming no parameter)."""
    dm = BlobDataModule()
    for settings in ({"threshold": np.longdouble(0.5)}, {"threshold_quantile": np.longdouble(0.9)}):
        model = DN2Module(backbone=linear_backbone(), k=2, **settings)
        trainer = quiet_trainer(max_epochs=1)
        trainer.fit(model, datamodule=dm)
        trainer.save_checkpoint(tmp_path / "bank.ckpt")
        loaded = DN2Module.load_from_checkpoint(tmp_path / "bank.ckpt", backbone=linear_backbone())
        assert type(loaded.hparams.threshold_quantile) is float
        expected = brute_force_scores(linear_backbone(), dm.train_images, dm.test_images, k=2)
        scores = loaded.score_images(dm.test_images).scores.double().numpy()
        np.testing.assert_allclose(scores, expected, rtol=1e-5)
        assert float(loaded.threshold) == float(model.threshold)
    for make in (lambda: DN2Detector(threshold_quantile=Fraction(9, 10)), lambda: DN2Module(threshold=Fraction(1))):
        with pytest.raises(ValueError, match=r"threshold(_quantile)?=Fraction.*; pass float\(value\)"):
            make()


class _RenamedKeyDataModule(BlobDataModule):
    """Batches with the images under "img", which the datamodule's on_before_batch_transfer renames to "image"."""

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        return {"image": batch.pop("img"), **batch}

    def _loader(self, images: torch.Tensor, labels: torch.Tensor) -> DataLoader:
        rows = [
            {"img": x, "label": y, "index": torch.tensor(i)}
            for i, (x, y) in enumerate(zip(images, labels, strict=True))
        ]
        return DataLoader(rows, batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_images, torch.zeros(len(self.train_images), dtype=torch.long))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_images, self.test_labels)


def test_a_bank_built_on_first_need_goes_through_the_datamodules_batch_hooks():
    """DN2's own pass (a bank built on first need at test) called the module's on_before_batch_transfer and
    transfer_batch_to_device, never the datamodule's, which Lightning's loops call: a datamodule renaming a key
    there fitted, but its test without fit failed with "a dict batch needs an 'image' key"."""
    dm = _RenamedKeyDataModule()
    model = DN2Module(backbone=linear_backbone(), k=2)
    quiet_trainer().test(model, datamodule=dm)
    expected = brute_force_scores(linear_backbone(), dm.train_images, dm.test_images, k=2)
    np.testing.assert_allclose(model.test_scores.scores.double().numpy(), expected, rtol=1e-5)

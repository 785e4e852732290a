"""Review of the latest changes: defects found, each with a test that failed before its fix."""

from __future__ import annotations

import os
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

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

"""Checkpoint reloads that must not score queries embedded one way against a bank embedded another way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import BlobDataModule, brute_force_scores, linear_backbone, quiet_trainer
from torch import nn

from dn2_lightning import DN2Module


def renamed_linear_backbone(seed: int) -> nn.Module:
    """linear_backbone's architecture, its weights named ``2.*`` instead of ``1.*`` (and drawn from another seed)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Identity(), nn.Linear(192, 16))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    dm = BlobDataModule()
    trainer = quiet_trainer()
    trainer.fit(DN2Module(k=2, backbone=linear_backbone(0), reports=False), datamodule=dm)
    path = tmp_path_factory.mktemp("reload") / "fitted.ckpt"
    trainer.save_checkpoint(path)
    return dm, path


def test_strict_false_with_a_backbone_named_otherwise_is_refused(fitted):
    """strict=False with a backbone whose weights are named otherwise left the new backbone's own random weights in
    place: queries were embedded by them and searched in a bank embedded by the checkpoint's, with only Lightning's
    note about missing keys (test scores unlike a brute force with the checkpoint's weights or with the new ones)."""
    dm, path = fitted
    with pytest.raises(ValueError, match=r"embedded with its own backbone weights.*missing from the checkpoint"):
        DN2Module.load_from_checkpoint(path, backbone=renamed_linear_backbone(5), strict=False)
    model = DN2Module(k=2, backbone=renamed_linear_backbone(5), reports=False)
    model.strict_loading = False
    with pytest.raises(ValueError, match=r"embedded with its own backbone weights"):
        quiet_trainer().test(model, datamodule=dm, ckpt_path=path)


def test_a_checkpoint_without_backbone_weights_is_refused_under_strict_false(fitted, tmp_path):
    dm, path = fitted
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("backbone.")}
    torch.save(checkpoint, tmp_path / "no_weights.ckpt")
    with pytest.raises(ValueError, match=r"embedded with its own backbone weights"):
        DN2Module.load_from_checkpoint(tmp_path / "no_weights.ckpt", backbone=linear_backbone(5), strict=False)


def test_strict_false_with_the_same_backbone_scores_as_a_brute_force(fitted, tmp_path):
    """What strict=False may still do: a checkpoint without its bank (the bank is built with this backbone), and one
    whose keys all fit."""
    dm, path = fitted
    loaded = DN2Module.load_from_checkpoint(path, backbone=linear_backbone(5), strict=False)
    quiet_trainer().test(loaded, datamodule=dm)
    expected = brute_force_scores(loaded.backbone, dm.train_images, dm.test_images, 2)
    np.testing.assert_allclose(loaded.test_scores.scores.numpy(), expected, rtol=1e-5)

    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("bank.")}
    torch.save(checkpoint, tmp_path / "no_bank.ckpt")
    backbone = renamed_linear_backbone(5)
    rebuilt = DN2Module.load_from_checkpoint(tmp_path / "no_bank.ckpt", backbone=backbone, strict=False)
    quiet_trainer().test(rebuilt, datamodule=dm)
    expected = brute_force_scores(rebuilt.backbone, dm.train_images, dm.test_images, 2)
    np.testing.assert_allclose(rebuilt.test_scores.scores.numpy(), expected, rtol=1e-5)

"""Queries must be embedded and scored as the bank's rows were, or refused: settings changed after fit, inputs given
in another form, checked against a brute force computed here (the backbone called directly, NumPy kNN)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import DictDataset, brute_force_scores, linear_backbone, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader

from dn2_lightning import DN2Module


@pytest.fixture(scope="module")
def fitted():
    g = torch.Generator().manual_seed(0)
    train, test = torch.rand(40, 3, 8, 8, generator=g), torch.rand(10, 3, 8, 8, generator=g)
    backbone = linear_backbone(0)
    model = DN2Module(k=2, backbone=backbone, reports=False)
    loader = DataLoader(DictDataset(train, torch.zeros(40, dtype=torch.long)), batch_size=16)
    quiet_trainer(max_epochs=1).fit(model, train_dataloaders=loader)
    return model, backbone, train, test


def test_a_setting_assigned_as_an_attribute_is_refused(fitted):
    """``model.k = 5`` made a new attribute that nothing read: score_images kept scoring at k=2 (0.8106 for the first
    image, where k=5 gives 0.8678), without a word."""
    model, backbone, train, test = fitted
    with pytest.raises(AttributeError, match=r"model\.k = 5 .*never reads.*model\.hparams\.k = 5"):
        model.k = 5
    with pytest.raises(AttributeError, match=r"model\.input_size = 64 .*DN2Module\(input_size=\.\.\.\)"):
        model.input_size = 64
    with pytest.raises(AttributeError, match=r"threshold_quantile"):
        model.threshold_quantile = 0.5
    with pytest.raises(AttributeError):  # a property without a setter, as before
        model.threshold = 3.0
    model.hparams.k = 5  # the way that is read
    try:
        expected = brute_force_scores(backbone, train, test, 5)
        np.testing.assert_allclose(model.score_images(test).scores.numpy(), expected, rtol=1e-5)
    finally:
        model.hparams.k = 2
    model.some_attribute_of_mine = 1  # other attributes stay the user's


def test_a_subclass_sets_its_own_constructor_arguments_as_attributes():
    """A subclass storing its own argument (``self.margin = margin``, which Lightning's save_hyperparameters also puts
    in hparams) was refused as if it were a DN2 setting: the subclass could not be built."""

    class WithMargin(DN2Module):
        def __init__(self, margin: float = 1.0, **kwargs) -> None:
            super().__init__(**kwargs)
            self.margin = margin

    model = WithMargin(margin=2.0, k=2, backbone=linear_backbone(0), reports=False)
    assert model.margin == 2.0 and model.hparams.margin == 2.0
    with pytest.raises(AttributeError, match=r"model\.k = 5 .*never reads"):
        model.k = 5  # its DN2 settings are still refused


def test_the_embedder_called_directly_refuses_pixels_it_would_misread(fitted):
    """``model(images)``, README's deployed embedder, embedded 0..255 floats (or int64 0..255 pixels) as if they were
    [0, 1] floats: scored against the bank (DN2Detector, as README shows) the first blob image got 97,657 where its
    [0, 1] pixels score 0.81, without a word, where the loaders and score_images refuse such pixels."""
    model, backbone, train, test = fitted
    from dn2_lightning import DN2Detector

    detector = DN2Detector(k=2).fit(model.bank.embeddings)
    expected = brute_force_scores(backbone, train, test, 2)
    np.testing.assert_allclose(detector.decision_function(model(test)).numpy(), expected, rtol=1e-5)
    pixels = (test * 255).round()
    np.testing.assert_allclose(
        detector.decision_function(model(pixels.to(torch.uint8))).numpy(),
        brute_force_scores(backbone, train, pixels / 255, 2),
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match=r"float images must hold values in \[0, 1\].*divide 0\.\.255 floats by 255"):
        model(pixels)
    with pytest.raises(ValueError, match=r"must be uint8 \(0\.\.255\) or float \(0\.\.1\), got torch\.int64"):
        model(pixels.long())
    exported = torch.export.export(model.eval(), (test,)).module()  # the export traces without the check
    np.testing.assert_allclose(detector.decision_function(exported(test)).numpy(), expected, rtol=1e-5)


def test_another_backbone_assigned_after_construction_is_refused(fitted):
    """``model.backbone = build_backbone(other)`` (same settings, other weights) was taken without a word: queries
    embedded by it were searched in the bank embedded by the first (1.55 for the first image, where the bank's own
    backbone gives 0.81), every recorded setting still matching."""
    from dn2_lightning.backbones import build_backbone

    model, backbone, train, test = fitted
    built = model.backbone
    with pytest.raises(AttributeError, match=r"model\.backbone = \.\.\. would embed queries with another backbone"):
        model.backbone = build_backbone(linear_backbone(1))
    assert model.backbone is built
    model.backbone = built  # the same module again: nothing changes
    np.testing.assert_allclose(
        model.score_images(test).scores.numpy(), brute_force_scores(backbone, train, test, 2), rtol=1e-5
    )


def test_a_custom_trunk_of_another_structure_under_the_same_weight_names_is_refused(fitted, tmp_path):
    """A checkpoint fitted with ``Sequential(Flatten, Linear)`` loaded into ``Sequential(Flatten, Linear, Tanh)``: same
    class, same weight names and shapes, so it loaded, and queries embedded through the Tanh scored 0.72 against the
    bank's rows where the fitted backbone gives 0.81, without a word."""
    _, backbone, train, test = fitted
    model = DN2Module(k=2, backbone=backbone, reports=False)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(
        model, train_dataloaders=DataLoader(DictDataset(train, torch.zeros(40, dtype=torch.long)), batch_size=16)
    )
    trainer.save_checkpoint(tmp_path / "fitted.ckpt")
    with pytest.raises(ValueError, match=r"trunk='Sequential of 3 modules.*\(checkpoint\) vs trunk='Sequential of 4"):
        DN2Module.load_from_checkpoint(
            tmp_path / "fitted.ckpt", backbone=nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.Tanh())
        )
    same = DN2Module.load_from_checkpoint(tmp_path / "fitted.ckpt", backbone=linear_backbone(7))  # its weights load
    np.testing.assert_allclose(
        same.score_images(test).scores.numpy(), brute_force_scores(backbone, train, test, 2), rtol=1e-5
    )


def test_a_trunk_whose_batchnorms_a_ddp_fit_synced_keeps_its_bank(fitted, tmp_path):
    """``Trainer(strategy="ddp", sync_batchnorm=True)`` makes a custom trunk's BatchNorms SyncBatchNorm for the fit
    (the bank records that layout) and ``_BatchNormXd`` after it: the same trunk was refused (trunk=... differing)
    by the test run after the fit and by the checkpoint's load, though it embeds alike (eval statistics)."""
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm

    _, _, train, test = fitted

    def trunk() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.BatchNorm1d(16))

    model = DN2Module(k=2, backbone=trunk(), reports=False)
    synced = TorchSyncBatchNorm()
    synced.apply(model)  # what the DDP strategy does when a fit starts (in eval mode SyncBatchNorm syncs nothing)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(
        model, train_dataloaders=DataLoader(DictDataset(train, torch.zeros(40, dtype=torch.long)), batch_size=16)
    )
    trainer.save_checkpoint(tmp_path / "fitted.ckpt")
    synced.revert(model)  # and at its teardown
    expected = brute_force_scores(trunk().eval(), train, test, 2)
    np.testing.assert_allclose(model.score_images(test).scores.numpy(), expected, rtol=1e-5)
    loaded = DN2Module.load_from_checkpoint(tmp_path / "fitted.ckpt", backbone=trunk())
    np.testing.assert_allclose(loaded.score_images(test).scores.numpy(), expected, rtol=1e-5)


def test_a_backbone_normalising_by_batch_statistics_is_named():
    """A BatchNorm with ``track_running_stats=False`` normalises by the batch even in eval mode: score_images gave the
    first test image 24.09 in a batch of 10 and 22.04 in batches of 2, without a word."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.BatchNorm1d(16, track_running_stats=False))
    with pytest.warns(UserWarning, match=r"BatchNorm layer\(s\) \['2'\] keep no running statistics.*batch size"):
        DN2Module(backbone=trunk)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DN2Module(backbone=nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.BatchNorm1d(16)))
        DN2Module(backbone=nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4), nn.AdaptiveAvgPool2d(1)))

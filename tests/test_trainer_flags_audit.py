"""Trainer callbacks users add from their usual set-up, on DN2's fit without an optimizer: refused by name with
the fix, or the scores of an independent float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import BlobWithValDataModule, brute_force_scores, linear_backbone, quiet_trainer
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder, StochasticWeightAveraging

from dn2_lightning import DN2Module


@pytest.mark.parametrize(
    "callback", [StochasticWeightAveraging(swa_lrs=1e-2), LearningRateFinder()], ids=lambda c: type(c).__name__
)
def test_callbacks_that_tune_an_optimizer_are_refused_by_name(callback):
    """StochasticWeightAveraging failed with Lightning's 'SWA currently works with 1 `optimizer`', LearningRateFinder
    asked for an ``lr`` attribute (and, given one, failed on 'configure_optimizers() returned 0'): neither said that
    DN2 trains nothing nor what to do."""
    dm = BlobWithValDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    name = type(callback).__name__
    with pytest.raises(ValueError, match=rf"callbacks=\[{name}\(\)\].*no optimizer.*remove it from the callbacks"):
        quiet_trainer(callbacks=[callback]).fit(model, datamodule=dm)
    trainer = quiet_trainer()  # the same module, fitted without it, scores as the reference
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm)
    expected = brute_force_scores(linear_backbone(), dm.train_images, dm.test_images, k=2)
    np.testing.assert_allclose(model.test_scores.scores.double().numpy(), expected, rtol=1e-5)
    assert torch.equal(model.test_scores.indices, torch.arange(len(expected)))


def test_batch_size_finder_is_refused_by_name():
    """BatchSizeFinder's first trial fit (3 steps) ran DN2's pass, stopped the Trainer and left a bank of 3 of 7
    batches: the real fit then ran no epoch (global_step 0), so no validation, no val/auroc, no checkpoint, a
    'partial bank' warning about a bank that was in the end read whole after the loop, and 'succeeded' trials that
    never ran."""
    dm = BlobWithValDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    with pytest.raises(ValueError, match=r"callbacks=\[BatchSizeFinder\(\)\].*remove it from the callbacks.*and set"):
        quiet_trainer(callbacks=[BatchSizeFinder()]).fit(model, datamodule=dm)
    assert model.trainer.global_step == 0 and not model.fit_built_bank  # refused before any trial ran


def test_ckpt_path_best_and_last_reload_a_bank_that_scores_as_the_reference(tmp_path):
    """ModelCheckpoint(monitor="val/auroc", save_top_k=2, save_last=True) with max_epochs=3: one pass, one best file
    and last.ckpt, each holding the whole bank; test/predict from them score as the reference."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    dm = BlobWithValDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    saver = ModelCheckpoint(dirpath=tmp_path, monitor="val/auroc", mode="max", save_top_k=2, save_last=True)
    trainer = quiet_trainer(max_epochs=3, enable_checkpointing=True, callbacks=[saver])
    trainer.fit(model, datamodule=dm)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=7.ckpt", "last.ckpt"]
    expected = brute_force_scores(linear_backbone(), dm.train_images, dm.test_images, k=2)
    for ckpt_path in ("best", "last"):
        fresh = DN2Module(k=2, backbone=linear_backbone(), reports=False)
        tester = quiet_trainer(enable_checkpointing=True, callbacks=[saver])
        tester.test(fresh, datamodule=dm, ckpt_path=ckpt_path)
        assert len(fresh.bank) == len(dm.train_images) and not fresh.fit_built_bank
        np.testing.assert_allclose(fresh.test_scores.scores.double().numpy(), expected, rtol=1e-5)
        predicted = torch.cat([o["score"] for o in tester.predict(fresh, datamodule=dm, ckpt_path=ckpt_path)])
        np.testing.assert_allclose(predicted.double().numpy(), expected, rtol=1e-5)

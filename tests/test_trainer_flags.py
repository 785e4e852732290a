"""Ordinary Lightning Trainer flags: fit, test and predict give the scores of an independent reference (the same
tiny backbone's embeddings in float64, scikit-learn's exact kNN), or say why not."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import BlobDataModule, BlobWithValDataModule, linear_backbone, quiet_trainer
from lightning.pytorch.callbacks import EarlyStopping
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from dn2_lightning import DN2Module


def reference_scores(dm: BlobDataModule, k: int = 2) -> np.ndarray:
    backbone = linear_backbone()
    with torch.no_grad():
        train = backbone(dm.train_images).double().numpy()
        test = backbone(dm.test_images).double().numpy()
    distances, _ = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(train).kneighbors(test)
    return (distances**2).mean(1)


def assert_scores(model: DN2Module, dm: BlobDataModule, results: list[dict] | None = None) -> None:
    expected = reference_scores(dm)
    scores = model.test_scores
    assert torch.equal(scores.indices, torch.arange(len(expected)))
    np.testing.assert_allclose(scores.scores.double().numpy(), expected, rtol=1e-5)
    if results is not None:
        auroc = roc_auc_score(dm.test_labels.numpy(), expected)
        assert results[0]["test/auroc"] == pytest.approx(auroc, abs=1e-6)


@pytest.mark.parametrize("cast", ["64-true", "double()"])
def test_float64_bank_is_not_edited_by_evaluation(cast):
    """A float64 bank (Trainer(precision="64-true"), or model.double() after fit) was summed for the ranks' check
    with an in-place abs_ on rows that .double() returned as themselves: every negative coordinate of the bank
    turned positive at the first test, and scores and AUROC were wrong without a word."""
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    trainer = quiet_trainer(precision="64-true" if cast == "64-true" else "32-true")
    trainer.fit(model, datamodule=dm)
    if cast == "double()":
        model.double()
    bank = model.bank.embeddings.double().clone()
    assert (bank < 0).any()
    for _ in range(2):  # a second test reads the bank the first one left
        results = trainer.test(model, datamodule=dm)
        assert torch.equal(model.bank.embeddings.double(), bank)
        assert_scores(model, dm, results)
    predicted = torch.cat([o["score"] for o in trainer.predict(model, datamodule=dm)])
    np.testing.assert_allclose(predicted.double().numpy(), reference_scores(dm), rtol=1e-5)


@pytest.mark.parametrize(
    "flags",
    [
        dict(max_epochs=3),
        dict(max_epochs=3, reload_dataloaders_every_n_epochs=1),
        dict(deterministic=True),
        dict(detect_anomaly=True),
        dict(inference_mode=False),
        dict(use_distributed_sampler=False),
        dict(max_epochs=5, callbacks=[EarlyStopping(monitor="val/auroc", mode="max", patience=0)]),
        dict(num_sanity_val_steps=-1, check_val_every_n_epoch=2),
    ],
    ids=lambda flags: ",".join(f"{k}={type(v).__name__ if k == 'callbacks' else v}" for k, v in flags.items()),
)
def test_flags_that_keep_the_whole_bank_give_the_reference_scores(flags):
    dm = BlobWithValDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    trainer = quiet_trainer(**flags)
    trainer.fit(model, datamodule=dm)
    assert len(model.bank) == len(dm.train_images)  # one pass, neither rebuilt from part nor duplicated
    assert_scores(model, dm, trainer.test(model, datamodule=dm))
    predicted = torch.cat([o["score"] for o in trainer.predict(model, datamodule=dm)])
    np.testing.assert_allclose(predicted.numpy(), reference_scores(dm), rtol=1e-5)


def test_barebones_scores_match_but_logs_nothing():
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    trainer = quiet_trainer(barebones=True, enable_progress_bar=None, enable_model_summary=None, logger=None)
    trainer.fit(model, datamodule=dm)
    with pytest.warns(UserWarning, match="barebones"):  # Lightning says that self.log is off: no test/auroc
        trainer.test(model, datamodule=dm)
    assert_scores(model, dm)


def test_limit_predict_batches_scores_the_first_batches_exactly():
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    out = quiet_trainer(limit_predict_batches=2).predict(model, datamodule=dm)
    predicted = torch.cat([o["score"] for o in out])
    assert len(predicted) == 2 * dm.batch_size
    np.testing.assert_allclose(predicted.numpy(), reference_scores(dm)[: len(predicted)], rtol=1e-5)


@pytest.mark.parametrize("flags", [dict(limit_test_batches=3), dict(limit_test_batches=0.6), dict(fast_dev_run=3)])
def test_a_limited_test_pass_says_its_auroc_covers_part_of_the_test_set(flags):
    """limit_test_batches (or fast_dev_run) scored the first batches only and logged their AUROC as test/auroc,
    with nothing but an info line's sample count to tell it from the whole test set's."""
    dm = BlobDataModule(n_normal=10, n_anomalous=61)  # both labels within the first batches
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    trainer = quiet_trainer(**flags)
    trainer.fit(model, datamodule=dm)
    with pytest.warns(UserWarning, match=r"read 3 of 5 test batches \(limit_test_batches or fast_dev_run\)"):
        results = trainer.test(model, datamodule=dm)
    scored = model.test_scores
    assert len(scored.scores) == 48
    expected = reference_scores(dm)[:48] if "fast_dev_run" not in flags else None
    if expected is not None:
        np.testing.assert_allclose(scored.scores.numpy(), expected, rtol=1e-5)
    labels = dm.test_labels[scored.indices].numpy()
    assert results[0]["test/auroc"] == pytest.approx(roc_auc_score(labels, scored.scores.numpy()), abs=1e-6)


def test_a_whole_test_pass_does_not_warn_of_a_limit():
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*limit_test_batches.*")
        quiet_trainer(limit_test_batches=1.0).test(model, datamodule=dm)
    assert len(model.test_scores.scores) == len(dm.test_images)

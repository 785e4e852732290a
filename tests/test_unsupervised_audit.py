"""Unsupervised setting end to end against an independent brute force on the module's own embeddings."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import BlobDataModule, DictDataset, linear_backbone, quiet_trainer
from torch.utils.data import DataLoader

from dn2_lightning import DN2Module


def test_cleaning_with_exact_duplicate_images_keeps_copies_as_neighbours_and_cuts_ties_by_index():
    """Duplicated training images (a pair, a triple, 3 copies spread over batches): each copy's leave-one-out score
    counts the other copies at distance 0 but never itself; at clean_k=1 the 0.9 cut falls inside the tie of zeros,
    which row (dataset index) order breaks. Kept rows and the threshold's scores against a float64 brute force."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(30, 3, 8, 8, generator=g) * 0.6
    images[[10, 11]] = images[3].clone()  # copies in other batches (batch_size=7)
    images[20] = images[25]
    images[[5, 6]] = images[7].clone()  # a triple: a row's 2 nearest may be its copies, itself left out
    loader = DataLoader(DictDataset(images, torch.zeros(30, dtype=torch.long)), batch_size=7)
    for fraction, clean_k in [(0.9, 1), (0.5, 2)]:
        model = DN2Module(k=1, backbone=linear_backbone(), clean_fraction=fraction, clean_k=clean_k, reports=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few threshold scores
            quiet_trainer().fit(model, train_dataloaders=loader)
        ids = torch.cat([model.bank.sample_indices, model.bank.removed_indices]).numpy()
        rows = torch.cat([model.bank.embeddings, model.bank.removed]).double().numpy()[np.argsort(ids)]
        assert np.array_equal(np.sort(ids), np.arange(30))
        distances = ((rows[:, None] - rows[None]) ** 2).sum(-1)
        np.fill_diagonal(distances, np.inf)  # by index: the copies stay at 0
        loo = np.sort(distances, axis=1)[:, :clean_k].mean(1)
        # at clean_k=1 a copy's score is its copy's distance (copies embedded in other batches may differ in the
        # last bits: BLAS blocks a batch by its size); the other rows lie far apart
        copies = [3, 10, 11, 20, 25, 5, 6, 7]
        if clean_k == 1:
            assert (loo[copies] < 1e-9).all() and (np.delete(loo, copies) > 1e-3).all()
        kept = np.sort(np.argsort(loo, kind="stable")[: 30 - int(np.floor(fraction * 30 + 0.5))])
        assert np.array_equal(np.sort(model.bank.sample_indices.numpy()), kept)
        against_kept = ((rows[:, None] - rows[kept][None]) ** 2).sum(-1)
        against_kept[kept, np.arange(len(kept))] = np.inf  # a kept image leaves itself out, a removed one not
        expected = np.sort(against_kept.min(1))
        np.testing.assert_allclose(model.bank.loo_scores.double().numpy(), expected, rtol=1e-5, atol=1e-7)


def test_a_fit_refused_for_cleaning_too_far_leaves_no_bank_behind():
    # the refusal came after the too-small cleaned bank was set: the next use blamed k ("k=2 must be ... <= bank size
    # (1)") instead of saying again what is wrong
    dm = BlobDataModule()
    model = DN2Module(k=2, reports=False, backbone=linear_backbone(), clean_fraction=0.99)
    refused = r"clean_fraction=0.99 leaves 1 embeddings, fewer than k=2; lower clean_fraction or k"
    with pytest.raises(ValueError, match=refused):
        quiet_trainer(max_epochs=1).fit(model, dm)
    assert len(model.bank) == 0 and len(model.bank.removed) == 0
    with pytest.raises(RuntimeError, match="no memory bank"):
        model.score_images(dm.test_images)
    with pytest.raises(ValueError, match=refused):  # built on first need: refused for the same reason
        quiet_trainer().test(model, dm)

"""Review of the day's changes: defects found in them, each shown by a test that failed before its fix."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from helpers import BlobDataModule, brute_force_scores, quiet_trainer
from torch import nn

from dn2_lightning import DN2Module

REFUSED = r"does not embed as the one that built the memory bank"


class SparseProjection(nn.Module):
    """A custom trunk whose weights are a sparse buffer (a random sparse projection of the pixels)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        dense = torch.randn(16, 192, generator=g) * (torch.rand(16, 192, generator=g) < 0.2)
        self.register_buffer("proj", dense.to_sparse())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(self.proj, x.flatten(1).T).T


def test_a_trunk_with_a_sparse_buffer_fits_scores_and_still_sees_its_weights_edited():
    # the backbone weights' key read data_ptr() of every buffer: a sparse one has no storage, so every fit ended in
    # "RuntimeError: Cannot access data pointer of Tensor that doesn't have storage" (it fitted and scored before)
    dm = BlobDataModule()
    trunk = SparseProjection()
    model = DN2Module(k=2, reports=False, backbone=trunk)
    quiet_trainer(max_epochs=1).fit(model, dm)
    expected = brute_force_scores(trunk, dm.train_images, dm.test_images, 2)
    scores = model.score_images(dm.test_images).scores.double().numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    with torch.no_grad():
        model.backbone.trunk.proj.mul_(2.0)  # an in-place edit of the sparse weights: compared again, refused
    with pytest.raises(ValueError, match=re.compile(REFUSED)):
        model.score_images(dm.test_images)


@pytest.mark.parametrize("own_hook", [False, True], ids=["plain datamodule", "datamodule with its own hook"])
def test_a_run_with_a_datamodule_meets_no_warning_about_batch_transfer_hooks(own_hook):
    # DN2Module overrode transfer_batch_to_device (for MPS's float64), so every fit/test/predict with a datamodule got
    # Lightning's "You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a
    # `LightningDataModule`" (and one with its own hook: "... in both"), for nothing the user did
    from lightning.pytorch.trainer.connectors.data_connector import warning_cache

    class OwnHook(BlobDataModule):
        def transfer_batch_to_device(self, batch, device, dataloader_idx):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)

    dm = OwnHook() if own_hook else BlobDataModule()
    model = DN2Module(k=2, reports=False, backbone=SparseProjection())
    warning_cache.clear()  # (Lightning says each once per process)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(max_epochs=1)
        trainer.fit(model, dm)
        trainer.test(model, dm)
    said = [str(w.message) for w in caught if "transfer_batch_to_device" in str(w.message)]
    assert said == []
    expected = brute_force_scores(SparseProjection(), dm.train_images, dm.test_images, 2)
    np.testing.assert_allclose(model.test_scores.scores.double().numpy(), expected, rtol=1e-4)

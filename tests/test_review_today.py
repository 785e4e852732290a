"""Review of the day's changes: defects found in them, each shown by a test that failed before its fix."""

from __future__ import annotations

import re

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

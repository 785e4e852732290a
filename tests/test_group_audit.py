"""Audit of the group setting against independent NumPy references (embeddings recomputed from the linear
backbone's weights, distances by brute force)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import MemberGroups, linear_backbone, quiet_trainer
from torch.utils.data import DataLoader, Dataset

from dn2_lightning import DN2Module


class PaddedPoolGroups(Dataset):
    """Groups of 1-3 images drawn with replacement from a small pool, padded to 3 slots (``mask``), each member's
    pool image given as ``members`` (padded slots -1): many groups hold a single real image, some of them the same."""

    def __init__(self, n: int, pool: torch.Tensor, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.pool = pool
        sizes = torch.randint(1, 4, (n,), generator=g)
        self.mask = torch.arange(3)[None] < sizes[:, None]
        self.members = torch.where(self.mask, torch.randint(len(pool), (n, 3), generator=g), -1)
        self.images = torch.where(self.mask[..., None, None, None], pool[self.members.clamp(min=0)], 0.7)

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": self.images[i],
            "label": torch.tensor(0),
            "index": torch.tensor(i),
            "mask": self.mask[i],
            "members": self.members[i],
        }


def _embed(images: torch.Tensor) -> np.ndarray:
    """The linear backbone by hand, in float64: [0, 1] images flattened through ``linear_backbone()``'s weights."""
    layer = linear_backbone()[1]
    w, b = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
    return images.double().numpy().reshape(*images.shape[:-3], -1) @ w.T + b


@pytest.mark.parametrize("k", [1, 2])
def test_a_padded_group_of_one_real_image_leaves_that_images_copies_out_of_the_threshold(k):
    # README: "Groups of one image, pooled or not, leave their image's copies in other groups out of the threshold".
    # A padded group whose mask holds one real member is a group of one image (its mean is that image's
    # embedding); only groups stored as [B, 1, ...] left their copies out, so a padded one-image group met its copy
    # at distance 0 and the threshold came out low (0.29 instead of 0.43 at k = 1 here).
    pool = torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.6
    train = PaddedPoolGroups(40, pool, seed=1)
    model = DN2Module(k=k, backbone=linear_backbone(), threshold_quantile=0.8, threshold_samples=None, reports=False)
    quiet_trainer().fit(model, train_dataloaders=DataLoader(train, batch_size=8))

    mask = train.mask.numpy()
    members = _embed(train.images)
    pooled = (members * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    alone = mask.sum(1) == 1
    image = np.where(alone, train.members[:, 0].numpy(), -1)  # the image a one-image group is
    copies = alone[:, None] & alone[None] & (image[:, None] == image[None])
    assert (copies & ~np.eye(len(train), dtype=bool)).any(), "the draw must give one-image groups of the same image"
    distances = ((pooled[:, None] - pooled[None]) ** 2).sum(-1)
    distances[np.eye(len(train), dtype=bool) | copies] = np.inf
    loo = np.sort(distances, axis=1)[:, :k].mean(1)
    np.testing.assert_allclose(model.bank.loo_scores.double().numpy(), np.sort(loo), rtol=1e-5)
    assert float(model.threshold) == pytest.approx(np.quantile(loo, 0.8), rel=1e-5)


def test_a_threshold_whose_rows_meet_only_their_own_group_and_copies_says_it_comes_out_low():
    # Groups of one image each, drawn from a pool: with a pool of 1, every row's only others are copies of its own
    # image, so the leave-one-out scores fall back on them (distance 0) and the threshold comes out 0. It used to be
    # set so without a word; a pool of 40 images needs no fallback and gives no warning.
    for pool_size, warns in ((1, True), (40, False)):
        pool = torch.rand(pool_size, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.6
        train = PaddedPoolGroups(30, pool, seed=1)
        train.mask[:, 1:] = False  # one real member each
        train.members[:, 1:] = -1
        model = DN2Module(k=1, backbone=linear_backbone(), threshold_samples=None, reports=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_trainer().fit(model, train_dataloaders=DataLoader(train, batch_size=8))
            threshold = float(model.threshold)
        said = [str(w.message) for w in caught if "rows outside their own group" in str(w.message)]
        assert bool(said) == warns, said
        if warns:
            assert threshold == pytest.approx(0.0, abs=1e-6)
            assert said[0].startswith("30 of 30 bank rows have fewer than k=1 rows outside")
        else:
            assert threshold > 0


def test_point_wise_cleaning_of_a_small_bank_scores_each_member_on_rows_outside_its_group_and_copies():
    # README: cleaning scores each member "its group and its image's copies left out", with clean_k capped. With
    # clean_k=200 and 27 member rows, k was capped at 26 rows but a member has at most 24 outside its group, so its
    # own group (itself at distance 0) and copies filled in: this draw kept groups [1, 2, 3, 4] where scoring
    # outside the group and copies keeps [3, 4, 5, 8]. k is now capped at 27 - 3 - (most copies of one image).
    rng = np.random.default_rng(2)
    pool = torch.as_tensor(rng.random((12, 3, 8, 8)) * 0.6, dtype=torch.float32)
    members = torch.as_tensor(np.stack([rng.choice(12, 3, replace=False) for _ in range(9)]))

    model = DN2Module(
        k=2, backbone=linear_backbone(), clean_fraction=0.5, group_pooling="none", threshold_samples=None, reports=False
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer().fit(model, train_dataloaders=DataLoader(MemberGroups(pool, members), batch_size=4))
    assert not [w for w in caught if "rows outside their own group" in str(w.message)]

    rows, group, source = _embed(pool[members.flatten()]), np.repeat(np.arange(9), 3), members.flatten().numpy()
    k = len(rows) - 3 - (np.bincount(source).max() - 1)  # the documented cap of clean_k=200
    distances = ((rows[:, None] - rows[None]) ** 2).sum(-1)
    outside = (group[:, None] != group[None]) & (source[:, None] != source[None])
    scores = np.array([np.sort(d[o])[:k].mean() for d, o in zip(distances, outside, strict=True)])
    worst = scores.reshape(9, 3).max(1)
    kept = np.sort(np.argsort(worst, kind="stable")[:4])  # 0.5 of 9 groups removes 5 (half up)
    assert np.unique(model.bank.sample_indices.numpy() // 3).tolist() == kept.tolist()

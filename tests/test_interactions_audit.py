"""Audit of feature pairs of ``DN2Module`` (cleaning, group pooling, thresholds, anomaly maps, ...), each checked
against an independent float64 reference or a clear refusal naming the parameters."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from helpers import MemberGroups, linear_backbone, quiet_trainer
from test_maps import reference_maps, tiny_conv
from torch.utils.data import DataLoader, Subset

from dn2_lightning import DN2Module, GroupDataModule, OneClassDataModule
from dn2_lightning.data.synthetic import write_synthetic_defects


@pytest.mark.parametrize("pooling", ["mean", "histogram", "none"])
def test_anomaly_maps_with_group_training_batches_are_refused_naming_the_settings(pooling):
    # anomaly_maps=True on group batches: mean pooling said "group batches have no map", but histogram and point-wise
    # pooling embedded the whole pass and then failed with RuntimeError "no training patches were collected for the
    # anomaly maps", which names neither the groups nor the fix
    dm = GroupDataModule(dataset="digits", group_size=3, n_train_groups=12, n_test_groups=6, seed=1, batch_size=4)
    model = DN2Module(
        k=2, backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "3"], group_pooling=pooling, group_clusters=3,
        reports=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"anomaly_maps=True.*groups \[B, M, C, H, W\].*anomaly_maps=False"):
        quiet_trainer().fit(model, datamodule=dm)
    assert not model.bank.is_fitted


def test_a_sharded_bank_set_after_construction_is_refused_with_anomaly_maps(defects):
    # DN2Module(anomaly_maps=True, bank_sharding="shard") is refused, but hparams.bank_sharding = "shard" afterwards
    # (a run setting, editable) was accepted: the patch bank is not sharded
    dm = defects
    model = DN2Module(backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "3"], map_images=3, reports=False)
    quiet_trainer().fit(model, datamodule=dm)
    model.hparams.bank_sharding = "shard"
    refused = r"hparams.bank_sharding='shard' with anomaly_maps=True: the patch bank is not sharded; use .*'replicate'"
    with pytest.raises(ValueError, match=refused):
        model.score_images(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=refused):
        quiet_trainer().test(model, datamodule=dm)
    model.hparams.bank_sharding = "replicate"
    quiet_trainer().test(model, datamodule=dm)


def test_point_wise_groups_cleaned_with_a_drawn_threshold_match_a_brute_force():
    # group_pooling="none" + clean_fraction + threshold_samples: cleaning removes whole groups by their worst member
    # (each member scored outside its group and its image's copies), and the threshold is the quantile of the worst
    # member scores of the groups drawn (fixed seed, kept and removed groups alike) against the kept rows
    rng = np.random.default_rng(3)
    n_groups, m, n_pool = 20, 3, 30
    pool = torch.as_tensor(rng.random((n_pool, 3, 8, 8)) * 0.6, dtype=torch.float32)
    members = torch.as_tensor(np.stack([rng.choice(n_pool, m, replace=False) for _ in range(n_groups)]))

    model = DN2Module(
        k=2, backbone=linear_backbone(), clean_fraction=0.3, clean_k=5, group_pooling="none", threshold_samples=8,
        threshold_quantile=0.8, reports=False,
    )  # fmt: skip
    quiet_trainer().fit(model, train_dataloaders=DataLoader(MemberGroups(pool, members), batch_size=4))

    with torch.no_grad():
        rows = linear_backbone()(pool[members.flatten()]).double().numpy()
    group, source = np.repeat(np.arange(n_groups), m), members.flatten().numpy()
    distances = ((rows[:, None] - rows[None]) ** 2).sum(-1)
    outside = (group[:, None] != group[None]) & (source[:, None] != source[None])
    copies = np.bincount(source).max() - 1
    k_clean = min(5, len(rows) - m - copies)
    cleaning = np.array([np.sort(d[o])[:k_clean].mean() for d, o in zip(distances, outside, strict=True)])
    kept = np.sort(np.argsort(cleaning.reshape(n_groups, m).max(1), kind="stable")[:14])  # 0.3 of 20 removed
    assert np.unique(model.bank.sample_indices.numpy() // m).tolist() == kept.tolist()
    kept_rows = np.isin(group, kept)
    drawn = torch.randperm(n_groups, generator=torch.Generator().manual_seed(0))[:8].sort().values.numpy()
    worst = [
        max(np.sort(distances[r][outside[r] & kept_rows])[:2].mean() for r in np.flatnonzero(group == g)) for g in drawn
    ]
    assert bool(model.bank.loo_drawn) and len(model.bank.loo_scores) == 8
    assert float(model.threshold) == pytest.approx(np.quantile(worst, 0.8), rel=1e-5)


@pytest.fixture(scope="module")
def defects(tmp_path_factory) -> OneClassDataModule:
    root = write_synthetic_defects(
        tmp_path_factory.mktemp("set") / "set", n_train=12, n_test_good=2, n_test_per_kind=1, image_size=32
    )
    return OneClassDataModule(dataset="folder", root=str(root), load_size=32, batch_size=5)


def test_nearest_image_maps_of_a_bank_cleaned_with_a_validation_inside_the_pass_use_the_kept_images(defects):
    # cleaning + patch_bank="nearest_images" + a validation inside the training pass: the nearest images are found
    # among the kept images and their patches only are searched; the final banks are the whole pass's, cleaned
    dm = defects
    dm.setup("fit")
    model = DN2Module(
        backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "3"], map_images=3, clean_fraction=0.25, clean_k=3,
        reports=False,
    )  # fmt: skip
    trainer = quiet_trainer(val_check_interval=0.5, num_sanity_val_steps=0)
    trainer.fit(model, train_dataloaders=dm.train_dataloader(), val_dataloaders=dm.test_dataloader())
    with torch.no_grad():
        train = model.backbone(torch.stack([dm.train_dataset[i]["image"] for i in range(12)])).double().numpy()
    distances = ((train[:, None] - train[None]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    kept = np.sort(np.argsort(np.sort(distances, 1)[:, :3].mean(1), kind="stable")[:9]).tolist()  # 3 of 12 removed
    assert sorted(model.bank.sample_indices.tolist()) == kept
    assert sorted(model.maps.bank.sample_indices.tolist()) == kept
    trainer.test(model, datamodule=dm)
    only_kept = types.SimpleNamespace(train_dataset=Subset(dm.train_dataset, kept), test_dataset=dm.test_dataset)
    expected = reference_maps(model, only_kept, num_images=3, kappa=1, sigma=4.0)
    np.testing.assert_allclose(model.maps.test_results.maps.numpy(), expected, rtol=1e-4, atol=1e-5 * expected.max())


def test_maps_of_a_bf16_mixed_bank_are_those_of_its_bf16_test_from_a_float32_trainer_and_score_images(defects):
    # maps + precision="bf16-mixed": queries are embedded under the bank's autocast whatever is in force, so a float32
    # Trainer and score_images give the bf16 test's maps and scores (the bf16 pass differs from a float32 one)
    dm = defects
    model = DN2Module(backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "3"], map_images=3, reports=False)
    trainer = quiet_trainer(precision="bf16-mixed")
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm)
    maps, scores = model.maps.test_results.maps.clone(), model.test_scores.scores.clone()
    full = reference_maps(model, dm, num_images=3, kappa=1, sigma=4.0)
    assert not np.allclose(maps.numpy(), full, rtol=1e-4, atol=1e-6), "bf16 must have been used"
    quiet_trainer().test(model, datamodule=dm)
    torch.testing.assert_close(model.maps.test_results.maps, maps, rtol=0, atol=0)
    result = model.score_images(dm.source_paths("test"))
    torch.testing.assert_close(result.anomaly_maps, maps, rtol=0, atol=0)
    torch.testing.assert_close(result.scores, scores, rtol=0, atol=0)

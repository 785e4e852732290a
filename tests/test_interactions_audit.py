"""Audit of feature pairs of ``DN2Module`` (cleaning, group pooling, thresholds, anomaly maps, ...), each checked
against an independent float64 reference or a clear refusal naming the parameters."""

from __future__ import annotations

import pytest
from helpers import quiet_trainer
from test_maps import tiny_conv

from dn2_lightning import DN2Module, GroupDataModule


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

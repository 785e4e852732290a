"""The unsupervised and group settings end to end through DN2Module, against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import linear_backbone, quiet_trainer
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from dn2_lightning import DN2Module, GroupDataModule, OneClassDataModule


def embed(model: DN2Module, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.backbone(images).double().numpy()


def stacked_images(dataset) -> torch.Tensor:
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def knn_mean_sq(bank: np.ndarray, queries: np.ndarray, k: int, leave_one_out: bool = False) -> np.ndarray:
    nn = NearestNeighbors(n_neighbors=k + leave_one_out, algorithm="brute").fit(bank)
    distances, _ = nn.kneighbors(queries)
    return (distances[:, int(leave_one_out) :] ** 2).mean(1)


@pytest.mark.parametrize("clean_k", [4, None], ids=["clean_k=4", "default clean_k, capped at bank size - 1"])
def test_unsupervised_cleaning_matches_independent_reference(clean_k):
    dm = OneClassDataModule(dataset="digits", normal_class=1, contamination=0.2, seed=0, batch_size=64)
    options = {} if clean_k is None else {"clean_k": clean_k}
    model = DN2Module(k=2, backbone=linear_backbone(), clean_fraction=0.5, **options)
    quiet_trainer().test(model, datamodule=dm)
    train = embed(model, stacked_images(dm.train_dataset))
    reference_k = min(model.hparams.clean_k, len(train) - 1)
    assert clean_k is not None or reference_k == len(train) - 1  # digits' bank is smaller than the default
    loo = knn_mean_sq(train, train, reference_k, leave_one_out=True)  # no duplicate digits in this class
    keep = np.argsort(loo, kind="stable")[: len(train) - round(0.5 * len(train))]
    assert torch.equal(model.bank.sample_indices, torch.from_numpy(np.sort(keep)))
    test = embed(model, stacked_images(dm.test_dataset))
    expected = knn_mean_sq(train[np.sort(keep)], test, 2)
    np.testing.assert_allclose(model.test_scores.scores.numpy(), expected, rtol=1e-5)
    report = model.bank_report
    assert report["bank/removed"] == len(train) - len(keep)
    contaminated = dm.train_is_contaminant.numpy()
    assert report["bank/contaminants_before"] == contaminated.sum()
    assert report["bank/contaminants_kept"] == contaminated[keep].sum()
    assert report["bank/contaminants_kept"] < 0.5 * report["bank/contaminants_before"]


def test_cleaning_that_leaves_fewer_rows_than_k_is_a_clear_error():
    dm = OneClassDataModule(dataset="digits", normal_class=1, batch_size=64)
    model = DN2Module(k=100, backbone=linear_backbone(), clean_fraction=0.5)
    with pytest.raises(ValueError, match="clean_fraction=0.5 leaves 54 embeddings, fewer than k=100"):
        quiet_trainer().test(model, datamodule=dm)


def group_datamodule() -> GroupDataModule:
    return GroupDataModule(dataset="digits", group_size=4, n_train_groups=60, n_test_groups=40, seed=1, batch_size=8)


def test_group_mean_pooling_matches_reference():
    dm = group_datamodule()
    model = DN2Module(k=2, backbone=linear_backbone())
    quiet_trainer().test(model, datamodule=dm)

    def pooled(dataset):
        return np.stack([embed(model, dataset[i]["image"]).mean(0) for i in range(len(dataset))])

    expected = knn_mean_sq(pooled(dm.train_dataset), pooled(dm.test_dataset), 2)
    np.testing.assert_allclose(model.test_scores.scores.numpy(), expected, rtol=1e-5)
    assert len(model.bank) == 60
    assert model.trainer.callback_metrics["test/auroc"].item() == pytest.approx(
        roc_auc_score(dm.test_dataset.labels.numpy(), expected), abs=1e-7
    )


def test_group_pointwise_baseline_scores_each_member_against_single_images():
    dm = group_datamodule()
    model = DN2Module(k=2, backbone=linear_backbone(), group_pooling="none")
    quiet_trainer().test(model, datamodule=dm)
    members = np.concatenate([embed(model, dm.train_dataset[i]["image"]) for i in range(60)])
    assert len(model.bank) == 240
    expected = [knn_mean_sq(members, embed(model, dm.test_dataset[i]["image"]), 2).max() for i in range(40)]
    np.testing.assert_allclose(model.test_scores.scores.numpy(), expected, rtol=1e-5)


def test_fit_then_test_for_groups_equals_test_without_fit():
    dm = group_datamodule()
    a = DN2Module(k=2, backbone=linear_backbone())
    quiet_trainer().test(a, datamodule=dm)
    b = DN2Module(k=2, backbone=linear_backbone())
    trainer = quiet_trainer()
    trainer.fit(b, datamodule=dm)
    trainer.test(b, datamodule=dm)
    assert torch.equal(a.test_scores.scores, b.test_scores.scores)

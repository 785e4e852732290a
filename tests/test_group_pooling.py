"""Composition-aware group pooling (histogram over k-means centroids): the functional core against numpy and
scikit-learn references, and DN2Module's use of it (fit, checkpoint, masks, order, DDP)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BlobDataModule, linear_backbone, quiet_trainer
from lightning import LightningDataModule
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dn2_lightning import DN2Module, GroupDataModule
from dn2_lightning.batch import Batch
from dn2_lightning.data.datasets import to_chw_uint8
from dn2_lightning.group_pooling import (
    GroupPooling,
    composition_histogram,
    fit_kmeans,
    pack_members,
    soft_assignments,
    unpack_members,
)


def blobs(n_per_class: int = 50, classes: int = 4, dim: int = 8, spread: float = 0.3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g) * 10
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return means[labels] + spread * torch.randn(len(labels), dim, generator=g), labels, means


def knn_mean_sq(bank: np.ndarray, queries: np.ndarray, k: int = 2) -> np.ndarray:
    distances, _ = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(bank).kneighbors(queries)
    return (distances**2).mean(1)


# ----------------------------------------------------------------------------------------- k-means


def test_kmeans_is_deterministic_for_a_seed_and_a_lloyd_fixed_point():
    points, _, _ = blobs(classes=5, spread=3.0)  # overlapping blobs: the seed matters
    a, nearest = fit_kmeans(points, 5, seed=3)
    b, _ = fit_kmeans(points, 5, seed=3)
    assert torch.equal(a, b)
    # converged: every centroid is the mean of the points nearest to it (numpy brute force)
    x, c = points.double().numpy(), a.double().numpy()
    distances = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    owner = distances.argmin(1)
    for j in range(5):
        np.testing.assert_allclose(c[j], x[owner == j].mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(nearest.numpy(), distances.min(1), rtol=1e-4, atol=1e-4)


def test_kmeans_depends_on_the_points_not_their_order_and_counts_duplicates():
    points, _, _ = blobs(classes=5, spread=3.0)  # overlapping blobs: the start decides the local optimum
    points = torch.cat([points, points[:40]])  # 40 points occur twice
    shuffled = points[torch.randperm(len(points), generator=torch.Generator().manual_seed(7))]
    for seed in range(3):
        a, nearest_a = fit_kmeans(points, 5, seed=seed)
        b, nearest_b = fit_kmeans(shuffled, 5, seed=seed)
        assert torch.equal(a, b)
        # each point's distance stays its own (returned in input order)
        np.testing.assert_allclose(
            nearest_a.numpy(), ((points[:, None] - a[None]) ** 2).sum(-1).min(1).values.numpy(), rtol=1e-4
        )
        assert torch.equal(nearest_a.sort().values, nearest_b.sort().values)
    # duplicates weigh as often as they occur: a converged centroid is the mean of all its points (numpy)
    x, c = points.double().numpy(), a.double().numpy()
    owner = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
    for j in range(5):
        np.testing.assert_allclose(c[j], x[owner == j].mean(0), rtol=1e-4, atol=1e-4)


def test_kmeans_recovers_well_separated_blob_centres():
    points, _, means = blobs()
    centroids, _ = fit_kmeans(points, 4)
    distances = torch.cdist(centroids.double(), means.double())
    assert sorted(distances.argmin(1).tolist()) == [0, 1, 2, 3]  # one centroid per blob
    assert distances.min(1).values.max() < 0.3  # at each blob's centre (its mean of 50 noisy points)


def test_kmeans_plus_plus_seeds_a_centroid_in_every_small_far_blob():
    """One blob of 1000 points and four of 5 points each, 1e4 away: k-means++ draws each next seed with weight
    D^2, so the small far blobs get their own centroids whatever the seed. Guards the D^2 weighting: seeds drawn
    by weight alone almost all land in the large blob, and Lloyd steps cannot move them out (most seeds failed)."""
    g = torch.Generator().manual_seed(0)
    means = torch.cat([torch.zeros(1, 4), 1e4 * torch.eye(4)]).double()
    labels = torch.arange(5).repeat_interleave(torch.tensor([1000, 5, 5, 5, 5]))
    points = (means[labels] + torch.randn(len(labels), 4, generator=g, dtype=torch.float64)).float()
    x, blob = points.double().numpy(), labels.numpy()
    for seed in range(10):
        centroids, _ = fit_kmeans(points, 5, seed=seed)
        c = centroids.double().numpy()
        owner = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)  # numpy brute force
        # each blob has a centroid of its own, at the mean of the blob's points
        assert len({owner[blob == b][0] for b in range(5)}) == 5, seed
        for b in range(5):
            assert (owner[blob == b] == owner[blob == b][0]).all(), seed
            np.testing.assert_allclose(c[owner[blob == b][0]], x[blob == b].mean(0), atol=1e-2)


def test_kmeans_needs_as_many_distinct_points_as_clusters():
    with pytest.raises(ValueError, match="group_clusters=5 exceeds the 3 member embeddings"):
        fit_kmeans(torch.randn(3, 2), 5)
    with pytest.raises(ValueError, match="group_clusters=3 exceeds the 1 distinct member embeddings"):
        fit_kmeans(torch.zeros(10, 2), 3)


# ---------------------------------------------------------------------------------- pure functions


def test_soft_assignments_and_histogram_match_a_numpy_reference():
    g = torch.Generator().manual_seed(0)
    members, centroids = torch.randn(3, 4, 5, generator=g), torch.randn(6, 5, generator=g)
    temperature, scale = 0.7, 2.5
    x, c = members.double().numpy().reshape(12, 5), centroids.double().numpy()
    logits = -((x[:, None, :] - c[None]) ** 2).sum(-1) / (temperature * scale)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    assignments = soft_assignments(members.view(12, 5), centroids, temperature, scale)
    np.testing.assert_allclose(assignments.numpy(), expected, rtol=1e-5, atol=1e-6)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]).bool()
    histogram = composition_histogram(members, centroids, temperature, scale, mask)
    per_group = expected.reshape(3, 4, 6)
    reference = np.stack([per_group[i, mask[i].numpy()].mean(0) for i in range(3)])
    np.testing.assert_allclose(histogram.numpy(), reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(histogram.sum(1).numpy(), 1.0, rtol=1e-6)


def test_pack_and_unpack_members_round_trip():
    members, mask = torch.randn(2, 3, 4), torch.tensor([[True, False, True], [True, True, True]])
    out_members, out_mask = unpack_members(pack_members(members, mask))
    assert torch.equal(out_members, members) and torch.equal(out_mask, mask)
    assert unpack_members(pack_members(members))[1].all()


def test_pooling_is_orderless_and_ignores_masked_members():
    points, _, _ = blobs()
    pooling = GroupPooling("histogram", clusters=4, temperature=0.5)
    pooling.fit(points[torch.randperm(200, generator=torch.Generator().manual_seed(0))].view(50, 4, 8))
    g = torch.Generator().manual_seed(1)
    groups = points[torch.randint(200, (6, 5), generator=g)]
    pooled = pooling(groups)
    perm = torch.randperm(5, generator=g)
    torch.testing.assert_close(pooling(groups[:, perm]), pooled)
    # padded groups: whatever sits in the masked slots, the result is that of the real members alone
    padded = torch.cat([groups, 1e3 * torch.randn(6, 2, 8, generator=g)], dim=1)
    mask = torch.cat([torch.ones(6, 5), torch.zeros(6, 2)], dim=1).bool()
    torch.testing.assert_close(pooling(padded, mask), pooled)


def test_mean_pooling_has_no_state_and_equals_the_paper_mean():
    pooling = GroupPooling("mean")
    assert pooling.is_fitted and not pooling.needs_fit and list(pooling.state_dict()) == []
    members = torch.randn(3, 4, 5)
    torch.testing.assert_close(pooling(members), members.mean(1))


def test_unfitted_histogram_pooling_is_a_clear_error():
    with pytest.raises(RuntimeError, match="group_pooling='histogram' has no centroids yet"):
        GroupPooling("histogram")(torch.randn(2, 3, 4))


def test_histogram_beats_mean_pooling_on_a_composition_task():
    """Normal group: one member of each of 6 classes; hard anomaly: one class twice, another missing.
    Classes are tight and far apart in 8 dimensions, so k-means finds them and the composition is all
    there is to see; members also vary broadly in 56 dimensions shared by all classes, which swamps the
    anomaly's 1/6 shift of the mean (as within-class variation does for real embeddings)."""
    g = torch.Generator().manual_seed(0)
    classes, m, noise_dims = 6, 6, 56
    means = torch.cat([torch.randn(classes, 8, generator=g) * 12, torch.zeros(classes, noise_dims)], dim=1)

    def groups(n: int, hard: bool) -> torch.Tensor:
        chosen = torch.stack([torch.randperm(classes, generator=g) for _ in range(n)])
        if hard:
            chosen[:, 0] = chosen[:, 1]
        x = means[chosen] + 0.3 * torch.randn(n, m, 8 + noise_dims, generator=g)
        x[..., 8:] += 5 * torch.randn(n, m, noise_dims, generator=g)
        return x

    train, normal, anomalous = groups(600, False), groups(200, False), groups(200, True)
    test, labels = torch.cat([normal, anomalous]), np.r_[np.zeros(200), np.ones(200)]
    aurocs = {}
    for method in ("mean", "histogram"):
        pooling = GroupPooling(method, clusters=classes, temperature=0.3)
        pooling.fit(train)
        scores = knn_mean_sq(pooling(train).double().numpy(), pooling(test).double().numpy())
        aurocs[method] = roc_auc_score(labels, scores)
    assert aurocs["histogram"] > 0.98, aurocs
    assert aurocs["mean"] < 0.9, aurocs
    assert aurocs["histogram"] > aurocs["mean"] + 0.08, aurocs


# ------------------------------------------------------------------------------------- DN2Module


def group_datamodule() -> GroupDataModule:
    return GroupDataModule(dataset="digits", group_size=4, n_train_groups=60, n_test_groups=40, seed=1, batch_size=8)


def embed(model: DN2Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.backbone(images)


def members_of(model: DN2Module, dataset) -> torch.Tensor:
    return torch.stack([embed(model, dataset[i]["image"]) for i in range(len(dataset))])


def test_module_histogram_pooling_matches_an_independent_reference():
    dm = group_datamodule()
    model = DN2Module(k=2, backbone=linear_backbone(), group_pooling="histogram", group_clusters=5, reports=False)
    quiet_trainer().test(model, datamodule=dm)
    train, test = members_of(model, dm.train_dataset), members_of(model, dm.test_dataset)
    expected_centroids, _ = fit_kmeans(train.flatten(0, 1), 5, seed=0)
    torch.testing.assert_close(model.group_pool.centroids, expected_centroids)
    # numpy: soft assignments to the module's centroids -> per-group mean -> brute-force kNN score
    c, scale = model.group_pool.centroids.double().numpy(), float(model.group_pool.scale)
    nearest = ((train.flatten(0, 1).double().numpy()[:, None] - c[None]) ** 2).sum(-1).min(1)
    assert scale == pytest.approx(np.median(nearest), rel=1e-4)

    def histogram(members: torch.Tensor) -> np.ndarray:
        logits = -((members.double().numpy()[..., None, :] - c) ** 2).sum(-1) / (0.3 * scale)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        return (p / p.sum(-1, keepdims=True)).mean(1)

    expected = knn_mean_sq(histogram(train), histogram(test))
    assert model.bank.embeddings.shape == (60, 5)
    np.testing.assert_allclose(model.test_scores.scores.numpy(), expected, rtol=1e-4, atol=1e-7)
    assert model.trainer.callback_metrics["test/auroc"].item() == pytest.approx(
        roc_auc_score(dm.test_dataset.labels.numpy(), expected), abs=1e-6
    )


def test_checkpoint_round_trip_gives_the_same_scores(tmp_path):
    dm = group_datamodule()
    model = DN2Module(k=2, backbone=linear_backbone(), group_pooling="histogram", group_clusters=5, reports=False)
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm)
    ckpt = tmp_path / "group.ckpt"
    trainer.save_checkpoint(ckpt)
    restored = DN2Module.load_from_checkpoint(ckpt, backbone=linear_backbone(seed=1))  # weights from ckpt
    assert restored.hparams.group_pooling == "histogram" and restored.group_pool.is_fitted
    torch.testing.assert_close(restored.group_pool.centroids, model.group_pool.centroids, rtol=0, atol=0)
    torch.testing.assert_close(restored.group_pool.scale, model.group_pool.scale, rtol=0, atol=0)
    quiet_trainer().test(restored, datamodule=dm)
    torch.testing.assert_close(restored.test_scores.scores, model.test_scores.scores, rtol=0, atol=0)


@pytest.mark.parametrize("group_size", [1, 4])
def test_mean_pooled_groups_cleaned_score_as_a_brute_force_of_the_members_mean(group_size):
    """Mean pooling with cleaning at k = 1: whole training groups removed by their leave-one-out score over the
    members' means, the threshold over every training group (groups of one image leave their image's copies out),
    the scores and AUROC, all against a brute force on the mean of each group's member embeddings."""
    easy = dict(anomaly="easy", held_out_classes=[9]) if group_size == 1 else {}  # seed 2: two images drawn twice
    dm = GroupDataModule(
        dataset="digits", group_size=group_size, n_train_groups=60, n_test_groups=30, seed=2, batch_size=8, **easy
    )
    model = DN2Module(
        k=1, backbone=linear_backbone(), clean_fraction=0.3, clean_k=5, threshold_quantile=0.9, reports=False
    )
    quiet_trainer().fit(model, datamodule=dm)
    train = members_of(model, dm.train_dataset).double().mean(1).numpy()
    test = members_of(model, dm.test_dataset).double().mean(1).numpy()
    sources = np.array([dm.train_dataset[i]["members"][0].item() for i in range(len(train))])
    left_out = np.eye(len(train), dtype=bool)
    if group_size == 1:  # a group of one image is that image: its copies in other groups are left out too
        left_out |= sources[:, None] == sources[None]
    distances = ((train[:, None] - train[None]) ** 2).sum(-1)
    distances[left_out] = np.inf
    cleaning = np.sort(distances, axis=1)[:, :5].mean(1)
    kept = np.sort(np.argsort(cleaning, kind="stable")[:42])  # 0.3 of 60 groups removed
    assert np.array_equal(np.sort(model.bank.sample_indices.numpy()), kept)
    threshold = np.quantile(distances[:, kept].min(1), 0.9)
    assert float(model.threshold) == pytest.approx(threshold, rel=1e-5)
    expected = ((test[:, None] - train[kept][None]) ** 2).sum(-1).min(1)
    metrics = quiet_trainer().test(model, datamodule=dm)
    np.testing.assert_allclose(model.test_scores.scores.numpy(), expected, rtol=1e-5, atol=1e-7)
    auroc = roc_auc_score(dm.test_dataset.labels.numpy(), expected)
    assert metrics[0]["test/auroc"] == pytest.approx(auroc, abs=1e-6)


def test_module_scores_are_orderless_in_the_members():
    dm = group_datamodule()
    model = DN2Module(k=2, backbone=linear_backbone(), group_pooling="histogram", group_clusters=5, reports=False)
    quiet_trainer().test(model, datamodule=dm)
    images = torch.stack([dm.test_dataset[i]["image"] for i in range(8)]).float() / 255
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        a = model.score(Batch(images, torch.zeros(8), None))[0]
        b = model.score(Batch(images[:, perm], torch.zeros(8), None))[0]
    torch.testing.assert_close(a, b)


class Renumbered(Dataset):
    """``dataset``'s items in ``order``, each numbered by its new position (as a re-listed folder would be)."""

    def __init__(self, dataset: Dataset, order: list[int]) -> None:
        self.dataset, self.order = dataset, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[self.order[i]], "index": torch.tensor(i)}


def test_the_order_of_the_training_groups_changes_neither_centroids_nor_scores():
    dm = group_datamodule()
    dm.setup("fit")
    results = []
    for order in (range(60), reversed(range(60))):  # the same training groups, listed in two orders
        train = Renumbered(dm.train_dataset, list(order))
        model = DN2Module(k=2, backbone=linear_backbone(), group_pooling="histogram", group_clusters=5, reports=False)
        trainer = quiet_trainer()
        trainer.fit(model, train_dataloaders=DataLoader(train, batch_size=8))
        trainer.test(model, dataloaders=DataLoader(dm.test_dataset, batch_size=8))
        results.append(model)
    torch.testing.assert_close(results[0].group_pool.centroids, results[1].group_pool.centroids, rtol=0, atol=0)
    torch.testing.assert_close(results[0].test_scores.scores, results[1].test_scores.scores, rtol=1e-6, atol=1e-7)


class PaddedGroups(Dataset):
    """Groups of 2-4 real members padded to 4 slots; the padded slots hold ``fill`` noise."""

    def __init__(self, n: int, fill: float, seed: int, with_anomalies: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 4, 3, 8, 8, generator=g) * 0.6
        self.sizes = torch.randint(2, 5, (n,), generator=g)
        self.mask = torch.arange(4)[None] < self.sizes[:, None]
        noise = torch.rand(n, 4, 3, 8, 8, generator=torch.Generator().manual_seed(seed + 100)) * fill
        self.images = torch.where(self.mask[..., None, None, None], self.images, noise)
        self.labels = torch.zeros(n, dtype=torch.long)
        if with_anomalies:
            self.labels[n // 2 :] = 1
            self.images[n // 2 :, 0] += 0.3  # one bright member
        self.images = self.images.clamp(0, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i), "mask": self.mask[i]}


class PaddedGroupsDataModule(LightningDataModule):
    def __init__(self, fill: float) -> None:
        super().__init__()
        self.fill = fill

    def train_dataloader(self) -> DataLoader:
        return DataLoader(PaddedGroups(50, self.fill, seed=0), batch_size=8)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(PaddedGroups(30, self.fill, seed=1, with_anomalies=True), batch_size=8)


def test_padded_members_change_neither_centroids_nor_scores():
    results = []
    for fill in (0.0, 1.0):  # black or bright noise in the padded slots
        model = DN2Module(k=2, backbone=linear_backbone(), group_pooling="histogram", group_clusters=4, reports=False)
        quiet_trainer().test(model, datamodule=PaddedGroupsDataModule(fill))
        results.append(model)
    torch.testing.assert_close(results[0].group_pool.centroids, results[1].group_pool.centroids)
    torch.testing.assert_close(results[0].test_scores.scores, results[1].test_scores.scores)


def test_single_image_data_is_unchanged_by_the_group_pooling():
    dm = BlobDataModule()
    scores = []
    for method in ("mean", "histogram"):
        model = DN2Module(k=2, backbone=linear_backbone(), group_pooling=method, reports=False)
        quiet_trainer().test(model, datamodule=dm)
        scores.append(model.test_scores.scores)
    assert torch.equal(scores[0], scores[1])


def test_mean_pooling_checkpoints_hold_no_pooling_state():
    assert not any(key.startswith("group_pool.") for key in DN2Module(backbone=linear_backbone()).state_dict())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"group_pooling": "hist"}, "group_pooling='hist'"),
        ({"group_pooling": "mean+histogram"}, "group_pooling='mean\\+histogram'"),
        ({"group_clusters": 1}, "group_clusters=1"),
        ({"group_clusters": 2.5}, "group_clusters=2.5"),
        ({"group_clusters": True}, "group_clusters=True"),
        ({"group_temperature": 0.0}, "group_temperature=0.0"),
        ({"group_temperature": -1}, "group_temperature=-1"),
        ({"group_temperature": float("inf")}, "group_temperature=inf"),
        ({"group_temperature": float("nan")}, "group_temperature=nan"),
        ({"group_temperature": "warm"}, "group_temperature='warm'"),
    ],
)
def test_bad_group_hyperparameters_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DN2Module(backbone=linear_backbone(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature=0.0 must be a finite number > 0"),
        ({"temperature": float("nan")}, "temperature=nan"),
        ({"clusters": 1}, "clusters=1 must be an integer >= 2"),
        ({"iterations": 0}, "iterations=0"),
    ],
)
def test_group_pooling_used_directly_checks_its_arguments(kwargs, match):
    # a NaN temperature would make every histogram NaN, and a zero one divides by zero
    with pytest.raises(ValueError, match=match):
        GroupPooling("histogram", **kwargs)


def test_more_clusters_than_training_members_is_a_clear_error():
    dm = GroupDataModule(dataset="digits", group_size=2, n_train_groups=3, n_test_groups=4, seed=0, batch_size=8)
    model = DN2Module(k=2, backbone=linear_backbone(), group_pooling="histogram", group_clusters=10, reports=False)
    with pytest.raises(ValueError, match="group_clusters=10 exceeds the 6 member embeddings"):
        quiet_trainer().test(model, datamodule=dm)


# ------------------------------------------------------------------------------------------- DDP

DDP_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
from helpers import linear_backbone
from lightning import Trainer
from dn2_lightning import DN2Module, GroupDataModule

def main(out, devices, sharding):
    dm = GroupDataModule(dataset="digits", group_size=4, n_train_groups=61, n_test_groups=41, seed=1, batch_size=8)
    model = DN2Module(k=2, backbone=linear_backbone(), group_pooling="histogram", group_clusters=5,
                      bank_sharding=sharding, reports=False)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir={root!r})
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm)
    if trainer.global_rank == 0:
        torch.save({{"world_size": trainer.world_size, "centroids": model.group_pool.centroids,
                    "scale": model.group_pool.scale, "indices": model.test_scores.indices,
                    "scores": model.test_scores.scores}}, out)

if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    if torch.distributed.is_initialized():  # gloo's threads can abort the interpreter's exit otherwise
        torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize("sharding", ["replicate", "shard"])
def test_ddp_fits_the_same_centroids_and_scores_as_one_device(tmp_path, sharding):
    script = tmp_path / "group_ddp_run.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), root=str(tmp_path)))
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"{devices}.pt"
        proc = subprocess.run(
            [sys.executable, str(script), str(out), str(devices), sharding], capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = torch.load(out, weights_only=True)
    single, ddp = results[1], results[2]
    assert single["world_size"] == 1 and ddp["world_size"] == 2
    assert torch.equal(ddp["indices"], torch.arange(41))
    torch.testing.assert_close(ddp["centroids"], single["centroids"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ddp["scale"], single["scale"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ddp["scores"], single["scores"], rtol=1e-4, atol=1e-6)


def test_point_wise_groups_padded_per_batch_are_refused_and_group_banks_refuse_single_images():
    """group_pooling='none' numbers member rows group * M + member with one M for the bank: batches padded to their
    own largest group (M = 2 then 4) made the threshold regroup rows wrongly (a reviewer: 40 'groups' instead of
    50, threshold 34.860 vs 34.506), silently."""
    groups = PaddedGroups(16, 0.0, seed=0)

    def per_batch_padding(samples):  # a pad_sequence-style collate: each batch padded to its own largest group
        m = max(int(s["mask"].sum()) for s in samples)
        return {
            "image": torch.stack([s["image"][:m] for s in samples]),
            "mask": torch.stack([s["mask"][:m] for s in samples]),
            "label": torch.stack([s["label"] for s in samples]),
            "index": torch.stack([s["index"] for s in samples]),
        }

    order = sorted(range(16), key=lambda i: int(groups.sizes[i]))  # smallest groups first: M grows per batch
    loader = DataLoader(torch.utils.data.Subset(groups, order), batch_size=4, collate_fn=per_batch_padding)
    model = DN2Module(k=2, backbone=linear_backbone(), group_pooling="none", reports=False)
    with pytest.raises(ValueError, match=r"same group size M .* got batches of M = 2 and M = 3"):
        quiet_trainer().fit(model, train_dataloaders=loader)
    pooled = DN2Module(k=2, backbone=linear_backbone(), group_pooling="mean", reports=False)
    quiet_trainer().fit(pooled, train_dataloaders=DataLoader(groups, batch_size=4))
    with pytest.raises(ValueError, match=r"single images \[B, C, H, W\], but this memory bank holds pooled"):
        pooled.score_images(groups.images[0])
    point_wise = DN2Module(k=2, backbone=linear_backbone(), group_pooling="none", reports=False)
    quiet_trainer().fit(point_wise, train_dataloaders=DataLoader(groups, batch_size=4))
    assert len(point_wise.score_images(groups.images[0]).scores) == 4  # its rows are member images: scorable


@pytest.mark.parametrize("pooling", ["mean", "histogram"])
def test_predict_and_test_refuse_single_images_against_groups_and_groups_against_images(pooling):
    """score_images refused single images against a bank of groups, but trainer.predict/test scored them silently
    (mean) or blamed the backbone (histogram); groups against a bank of single images were mean-pooled silently."""
    groups = PaddedGroups(16, 0.0, seed=0)
    images = DataLoader(TensorDataset(groups.images[:, 0]), batch_size=4)  # single images [B, C, H, W]
    model = DN2Module(k=2, backbone=linear_backbone(), group_pooling=pooling, group_clusters=3, reports=False)
    quiet_trainer().fit(model, train_dataloaders=DataLoader(groups, batch_size=4))
    with pytest.raises(ValueError, match=r"single images \[B, C, H, W\], but this memory bank holds pooled"):
        quiet_trainer().predict(model, dataloaders=images)
    with pytest.raises(ValueError, match=r"single images \[B, C, H, W\], but this memory bank holds pooled"):
        quiet_trainer().test(model, dataloaders=DataLoader(TensorDataset(groups.images[:, 0], groups.labels)))
    on_images = DN2Module(k=2, backbone=linear_backbone(), group_pooling=pooling, reports=False)
    quiet_trainer().fit(on_images, train_dataloaders=images)
    with pytest.raises(ValueError, match=r"groups \[B, M, C, H, W\], but this memory bank holds single training"):
        quiet_trainer().predict(on_images, dataloaders=DataLoader(groups, batch_size=4))
    point_wise = DN2Module(k=2, backbone=linear_backbone(), group_pooling="none", reports=False)
    quiet_trainer().fit(point_wise, train_dataloaders=images)  # members scored as images: allowed
    quiet_trainer().predict(point_wise, dataloaders=DataLoader(groups, batch_size=4))
    assert len(point_wise.predict_scores) == 16


PER_RANK_M_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
from helpers import linear_backbone
from lightning import Trainer
from torch.utils.data import DataLoader
from test_group_pooling import PaddedGroups
from dn2_lightning import DN2Module

groups = PaddedGroups(16, 0.0, seed=0)
groups.mask = torch.arange(4)[None] < torch.tensor([2, 3] * 8)[:, None]  # at most 3 real members of 4 slots

def pad_per_rank(samples):  # a collate that pads rank 0's batches to 3 slots and rank 1's to 4 (as a
    m = 3 + torch.distributed.get_rank()  # per-batch padding does when the ranks' groups differ in size)
    keys = ("image", "mask", "label", "index")
    return {{k: torch.stack([s[k][:m] if k in ("image", "mask") else s[k] for s in samples]) for k in keys}}

model = DN2Module(k=2, backbone=linear_backbone(), group_pooling="none", reports=False)
trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, default_root_dir={root!r})
trainer.fit(model, train_dataloaders=DataLoader(groups, batch_size=4, collate_fn=pad_per_rank))
"""


def test_point_wise_groups_padded_differently_on_each_rank_are_refused(tmp_path):
    script = tmp_path / "per_rank_m.py"
    script.write_text(PER_RANK_M_SCRIPT.format(tests=str(Path(__file__).parent), root=str(tmp_path)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "got batches of M = 3 and M = 4" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("pooling", ["none", "mean", "histogram"])
def test_a_group_without_real_members_is_refused(pooling):
    """A mask row of all False was scored: -inf ('none', never flagged, the most normal in AUROC), a zero vector
    ('mean', 0.51) or a zero 'histogram' flagged as anomalous."""
    groups = PaddedGroups(16, 0.0, seed=0)
    model = DN2Module(k=2, backbone=linear_backbone(), group_pooling=pooling, group_clusters=3, reports=False)
    quiet_trainer().fit(model, train_dataloaders=DataLoader(groups, batch_size=4))
    images, mask = groups.images[:3], groups.mask[:3].clone()
    mask[1] = False
    with pytest.raises(ValueError, match=r"group\(s\) \[1\] of batch 0 have no real member"):
        model.score(Batch(images, torch.zeros(3, dtype=torch.long), None, mask))
    with pytest.raises(ValueError, match=r"group\(s\) \[1\] have no real member"):
        model(images, mask)
    batch = [{**groups[i], "mask": mask[i]} for i in range(3)]
    with pytest.raises(ValueError, match=r"group\(s\) \[1\] of batch 0 have no real member"):
        quiet_trainer().test(model, DataLoader(batch, batch_size=3))
    with pytest.raises(ValueError, match=r"mask must be \[B, M\] = \[3, 4\]"):
        model.score(Batch(images, torch.zeros(3, dtype=torch.long), None, mask[:, :2]))


def test_a_validation_inside_the_pass_reads_the_checks_of_batches_that_gave_no_rows():
    # point-wise groups all masked out add no bank row: the validation after that batch saw no rows collected, skipped
    # reading its deferred checks and built a bank on first need instead, failing with "no memory bank yet"
    groups = PaddedGroups(16, 0.0, seed=0)
    groups.mask[:4] = False  # batch 0
    model = DN2Module(k=2, backbone=linear_backbone(), group_pooling="none", reports=False)
    trainer = quiet_trainer(max_epochs=1, val_check_interval=1, num_sanity_val_steps=0)
    val = DataLoader(PaddedGroups(8, 0.0, seed=1), batch_size=4)
    with pytest.raises(ValueError, match=r"group\(s\) \[0, 1, 2, 3\] of batch 0 have no real member"):
        trainer.fit(model, train_dataloaders=DataLoader(groups, batch_size=4), val_dataloaders=val)
    assert not model._checks_behind.pending and not model.bank.is_fitted


@pytest.mark.parametrize("pooling", ["mean", "histogram"])
def test_the_training_pass_reads_its_group_masks_one_batch_later_also_in_the_pooling_forward(monkeypatch, pooling):
    # forward checked the mask at once too, so the pass still waited for the device after every group batch
    import dn2_lightning.module as module_code

    def at_once(*args):
        raise AssertionError("the training pass checked a group mask at once")

    monkeypatch.setattr(module_code, "check_group_mask", at_once)
    model = DN2Module(k=2, backbone=linear_backbone(), group_pooling=pooling, group_clusters=3, reports=False)
    quiet_trainer().fit(model, train_dataloaders=DataLoader(PaddedGroups(16, 0.0, seed=0), batch_size=4))
    assert model.bank.is_fitted


def test_histogram_pooling_refuses_embeddings_too_small_for_float32():
    """At 1e-22 the members' squared distances flushed to 0 in float32, the scale fell back to 1 and every group's
    histogram was uniform (all scores 0, AUROC 0.5); the same data at scale 1 gives distinct histograms."""
    points, _, _ = blobs()
    members = points[torch.randperm(200, generator=torch.Generator().manual_seed(0))].view(50, 4, 8)
    fitted = GroupPooling("histogram", clusters=4)
    fitted.fit(members)
    assert len(torch.unique(fitted(members[:10]), dim=0)) > 5  # (uniform histograms would be one)
    with pytest.raises(ValueError, match=r"below float32's normal range .* too small for the pooling"):
        GroupPooling("histogram", clusters=4).fit(members * 1e-22)
    on_centroids = (4 * torch.eye(4, 8))[torch.randint(4, (20, 3), generator=torch.Generator().manual_seed(1))]
    exact = GroupPooling("histogram", clusters=4)
    exact.fit(on_centroids)  # members on their centroids: a zero median distance that is no underflow
    assert float(exact.scale) == 1.0


@pytest.mark.parametrize("pooling", ["none", "mean"])
def test_groups_of_one_image_leave_their_images_copies_out_of_the_threshold(pooling):
    # 1,500 groups of one image drawn from fewer images: copies of a member's own image in other groups must be
    # left out of its leave-one-out score, as for groups of several (they were counted for M = 1: 53% of normal
    # test groups flagged at threshold_quantile=0.9 instead of 23%)
    dm = GroupDataModule(
        dataset="digits", group_size=1, anomaly="easy", held_out_classes=[9], n_train_groups=1500, n_test_groups=50
    )
    model = DN2Module(
        k=2, backbone=linear_backbone(0, 192, 16), group_pooling=pooling, threshold_quantile=0.9, threshold_samples=None
    )
    quiet_trainer().fit(model, datamodule=dm)
    sources = dm.train_dataset.members.flatten().numpy()
    assert len(np.unique(sources)) < len(sources), "the draw must repeat images"
    images = torch.stack([dm.train_dataset[i]["image"] for i in range(len(dm.train_dataset))]).flatten(0, 1)
    with torch.no_grad():
        rows = model.backbone(images).double().numpy()
    d = ((rows[:, None] - rows[None]) ** 2).sum(-1)
    own = sources[:, None] == sources[None]  # the row itself and its image's copies
    expected = np.quantile([np.sort(d[r][~own[r]])[:2].mean() for r in range(len(rows))], 0.9)
    assert float(model.threshold) == pytest.approx(expected, rel=1e-4)


def test_histogram_pooling_takes_training_batches_of_other_group_sizes_as_padded_ones():
    # batches of M = 3, 4, 3, 5 without a mask stopped in torch.cat ("Sizes of tensors must match"); they must give
    # what the same groups padded to M = 5 with a mask give
    g = torch.Generator().manual_seed(0)
    sizes = [3, 4, 3, 5]
    images = [torch.rand(6, m, 3, 4, 4, generator=g) for m in sizes]

    def batch(i: int, padded: bool) -> dict:
        x, m = images[i], sizes[i]
        out = {"image": x, "label": torch.zeros(6, dtype=torch.long), "index": torch.arange(6) + 6 * i}
        if padded:
            out["image"] = torch.cat([x, torch.zeros(6, 5 - m, 3, 4, 4)], 1)
            out["mask"] = torch.arange(5).expand(6, 5) < m
        return out

    tests = [{"image": torch.rand(5, 4, 3, 4, 4, generator=g), "label": torch.tensor([0, 1, 0, 1, 1])}]
    scores = []
    for padded in (False, True):
        model = DN2Module(k=2, backbone=linear_backbone(0, 48, 8), group_pooling="histogram", group_clusters=4)
        train = DataLoader([batch(i, padded) for i in range(4)], batch_size=None)
        quiet_trainer().fit(model, train_dataloaders=train)
        quiet_trainer().test(model, dataloaders=DataLoader(tests, batch_size=None))
        scores.append(model.test_scores.scores)
    assert len(model.bank) == 24
    torch.testing.assert_close(scores[0], scores[1])


def test_a_quantile_threshold_set_on_the_other_kind_of_sample_is_named():
    # point-wise groups against a bank of single images flagged 63.5% of normal groups at q = 0.9 (32.0% against a
    # bank of training groups), single images against a group bank 7.6%: the scores are right, the threshold not
    dm = GroupDataModule(dataset="digits", group_size=3, n_train_groups=40, n_test_groups=20, batch_size=16, seed=0)
    dm.setup()
    source = dm.train_dataset.source  # the training groups' distinct member images, as single images
    singles = torch.stack([to_chw_uint8(source.images[j], None) for j in dm.train_dataset.members.unique().tolist()])
    single_bank = DN2Module(k=2, backbone=linear_backbone(0, 192, 16), group_pooling="none", reports=False)
    quiet_trainer().fit(single_bank, train_dataloaders=DataLoader(TensorDataset(singles), batch_size=64))
    with pytest.warns(UserWarning, match="groups score as their worst member against a bank of single training"):
        quiet_trainer().test(single_bank, dataloaders=dm.test_dataloader())
    group_bank = DN2Module(k=2, backbone=linear_backbone(0, 192, 16), group_pooling="none", reports=False)
    quiet_trainer().fit(group_bank, datamodule=dm)
    with pytest.warns(UserWarning, match="single images score against a bank of training groups' members"):
        group_bank.score_images(singles[:4])
    group_bank.set_threshold(value=float(group_bank.threshold))  # a fixed threshold: the user's choice, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        group_bank.score_images(singles[:4])


class _GroupsOfPoolImages(torch.utils.data.Dataset):
    """Groups of 2 images of a seeded pool, numbered in order, the pool image ``outlier`` moved far from the others
    (its group's worst member) and put in the slot ``copy`` too; groups before ``named_groups`` say their members'
    pool images (``members``), the others do not."""

    def __init__(self, n_groups: int, seed: int, outlier: int, copy: tuple[int, int], named_groups: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.pool = torch.rand(2 * n_groups, 3, 8, 8, generator=g) * 0.5
        self.pool[outlier] = (self.pool[outlier] + 0.45).clamp(max=1.0)
        self.members = torch.arange(2 * n_groups).view(n_groups, 2)
        self.members[copy] = outlier
        self.named_groups = named_groups

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, i: int) -> dict:
        m = self.members[i]
        sample = {"image": self.pool[m], "label": torch.tensor(0), "index": torch.tensor(i)}
        return sample | ({"members": m} if i < self.named_groups else {})


def test_point_wise_threshold_leaves_out_the_copy_of_the_last_member_row():
    # the member row with the largest id (last group, last member) holds a copy of another group's image: both
    # must leave the other out of their leave-one-out neighbours, as every other row's copies are
    train = _GroupsOfPoolImages(20, seed=5, outlier=0, copy=(19, 1), named_groups=20)  # group 0's image, again
    model = DN2Module(k=1, backbone=linear_backbone(), group_pooling="none", reports=False)
    quiet_trainer().fit(model, train_dataloaders=DataLoader(train, batch_size=8))
    group_loo = _worst_member_loo(model, train, known=train.members.flatten().numpy())
    assert group_loo[0] > 0  # no copy is anyone's neighbour
    np.testing.assert_allclose(model.bank.loo_scores.numpy(), group_loo, rtol=1e-5)


def _worst_member_loo(model: DN2Module, train, known: np.ndarray) -> np.ndarray:
    """The sorted k=1 leave-one-out scores of point-wise training groups (each group's worst member) by brute force:
    a member's neighbours leave out its own group and the rows of the same ``known`` source image (-1: unknown)."""
    with torch.no_grad():
        pool = model.backbone(train.pool).double().numpy()
    images = train.members.flatten().numpy()
    groups, size = train.members.shape
    group_of = np.repeat(np.arange(groups), size)
    distances = ((pool[images][:, None] - pool[images][None]) ** 2).sum(-1)
    same_source = (known[:, None] == known[None]) & (known[:, None] >= 0)
    distances[(group_of[:, None] == group_of[None]) | same_source] = np.inf
    member_loo = distances.min(1)
    return np.sort([member_loo[group_of == g].max() for g in range(groups)])


def test_point_wise_rows_beyond_the_known_sources_count_as_unknown_images():
    # group 8's first member is a copy of group 7's last one (an outlier), which no source names as a copy
    train = _GroupsOfPoolImages(16, seed=7, outlier=15, copy=(8, 0), named_groups=8)
    model = DN2Module(k=1, backbone=linear_backbone(), group_pooling="none", reports=False)
    quiet_trainer().fit(model, train_dataloaders=DataLoader(train, batch_size=8))
    known = np.where(np.arange(32) < 16, train.members.flatten().numpy(), -1)  # groups 8-15 name no source
    np.testing.assert_allclose(model.bank.loo_scores.numpy(), _worst_member_loo(model, train, known), rtol=1e-5)

"""What a user does to a fitted DN2Module (casts, copies, edits of the bank) and what it scores next, against an
independent reference: the same tiny backbone's embeddings in float64 and scikit-learn's exact kNN."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from helpers import BlobDataModule, linear_backbone, quiet_trainer
from sklearn.neighbors import NearestNeighbors

from dn2_lightning import DN2Module
from dn2_lightning import bank as bank_module
from dn2_lightning.bank import BankBuilder

K = 2
QUANTILE = 0.99


def embeddings(images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return linear_backbone()(images).double().numpy()


def reference(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """(test scores, the quantile threshold of the training rows' leave-one-out scores, those sorted scores)."""
    search = NearestNeighbors(n_neighbors=K + 1, algorithm="brute").fit(train)
    distances, _ = search.kneighbors(test, n_neighbors=K)
    own, _ = search.kneighbors(train)  # each row's own distance (0) first
    loo = np.sort((own[:, 1:] ** 2).mean(1))
    return (distances**2).mean(1), float(np.quantile(loo, QUANTILE)), loo


def fitted() -> tuple[DN2Module, BlobDataModule]:
    dm = BlobDataModule()
    model = DN2Module(k=K, backbone=linear_backbone(), reports=False, threshold_quantile=QUANTILE)
    quiet_trainer().fit(model, datamodule=dm)
    return model, dm


def assert_reference(model: DN2Module, dm: BlobDataModule, train: np.ndarray) -> None:
    scores, threshold, loo = reference(train, embeddings(dm.test_images))
    scored = model.score_images(dm.test_images)
    np.testing.assert_allclose(scored.scores.double().numpy(), scores, rtol=1e-5)
    assert scored.threshold == pytest.approx(threshold, rel=1e-5)
    np.testing.assert_array_equal(scored.is_anomaly.numpy(), scores > threshold)
    below = np.searchsorted(loo, scored.scores.double().numpy()) / len(loo)
    np.testing.assert_allclose(scored.normalized.double().numpy(), below, atol=1.5 / len(loo))
    predicted = quiet_trainer().predict(model, datamodule=dm)
    np.testing.assert_array_equal(torch.cat([o["is_anomaly"] for o in predicted]).numpy(), scores > threshold)


@pytest.mark.parametrize("edit", ["mul_", "assign"])
def test_an_edited_bank_gets_the_threshold_of_its_rows(edit):
    """Scores followed an in-place edit of the bank (the search sees its version counter) or a new tensor assigned to
    it, but the threshold and the normalised scores kept the old rows' leave-one-out scores: scores of one bank
    were compared with the threshold of another without a word (a state dict saved afterwards carried them too)."""
    model, dm = fitted()
    model.score_images(dm.test_images)  # the old bank's search copy and threshold are in use
    if edit == "mul_":
        model.bank.embeddings.mul_(2)
    else:
        model.bank.embeddings = model.bank.embeddings * 2
    train = 2 * embeddings(dm.train_images)
    assert_reference(model, dm, train)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    loaded = DN2Module(k=K, backbone=linear_backbone(), reports=False, threshold_quantile=QUANTILE)
    loaded.load_state_dict(torch.load(buffer))
    assert_reference(loaded, dm, train)


def test_a_state_dict_saved_after_an_edit_does_not_carry_the_old_threshold():
    model, dm = fitted()
    float(model.threshold)
    model.bank.embeddings.mul_(2)
    loaded = DN2Module(k=K, backbone=linear_backbone(), reports=False, threshold_quantile=QUANTILE)
    loaded.load_state_dict(model.state_dict())
    assert_reference(loaded, dm, 2 * embeddings(dm.train_images))


@pytest.mark.parametrize(
    "transform",
    [
        lambda m: m.double(),
        lambda m: m.double().float(),
        lambda m: m.to(torch.float64),
        lambda m: m.cpu(),
        lambda m: m.to(memory_format=torch.channels_last),
        lambda m: copy.deepcopy(m),
        lambda m: pickle.loads(pickle.dumps(m)),
        lambda m: m.requires_grad_(True),
        lambda m: m.freeze() or m,
        lambda m: m.train(),
    ],
    ids=[
        "double",
        "double-float",
        "to-float64",
        "cpu",
        "channels_last",
        "deepcopy",
        "pickle",
        "requires_grad",
        "freeze",
        "train",
    ],
)
def test_transforms_that_keep_the_bank_give_the_reference(transform):
    model, dm = fitted()
    bank = model.bank.embeddings.clone()
    model = transform(model)
    assert_reference(model, dm, embeddings(dm.train_images))
    assert torch.equal(model.bank.embeddings.float(), bank)


@pytest.mark.parametrize("edit", ["mul_", "assign"])
def test_an_edit_after_pickling_or_a_cast_is_seen(edit):
    """Leave-one-out scores stay current through a cast or a copy, and stale after an edit, whichever came first."""
    model, dm = fitted()
    float(model.threshold)
    model = pickle.loads(pickle.dumps(model.double()))
    if edit == "mul_":
        model.bank.embeddings.mul_(2)
    else:
        model.bank.embeddings = model.bank.embeddings * 2
    model = copy.deepcopy(model).float()
    assert_reference(model, dm, 2 * embeddings(dm.train_images))


def test_a_copy_fitted_again_leaves_the_original_alone():
    model, dm = fitted()
    bank, threshold = model.bank.embeddings.clone(), float(model.threshold)
    other = copy.deepcopy(model)
    dm2 = BlobDataModule(seed=5)
    quiet_trainer().fit(other, datamodule=dm2)
    assert torch.equal(model.bank.embeddings, bank) and float(model.threshold) == threshold
    assert_reference(model, dm, embeddings(dm.train_images))
    assert_reference(other, dm, embeddings(dm2.train_images))


@pytest.mark.parametrize("cast", ["double()", "64-true"])
@pytest.mark.parametrize("patch_bank", ["nearest_images", "all"])
def test_anomaly_maps_of_a_float64_module_equal_the_float32_ones(cast, patch_bank):
    """patch_bank="all" searched the patch bank as it was cast (float64) where it takes float32 candidates: a
    KeyError (torch.float64) at the first map, after model.double() or a Trainer(precision="64-true") fit."""
    from test_maps import tiny_conv

    dm = BlobDataModule()
    options = dict(anomaly_maps=True, map_layers=["1", "3"], map_images=4, patch_bank=patch_bank, reports=False)
    plain = DN2Module(k=K, backbone=tiny_conv(), **options)
    quiet_trainer().fit(plain, datamodule=dm)
    expected = plain.score_images(dm.test_images)
    model = DN2Module(k=K, backbone=tiny_conv(), **options)
    trainer = quiet_trainer(precision="64-true" if cast == "64-true" else "32-true")
    trainer.fit(model, datamodule=dm)
    if cast == "double()":
        model.double()
    scored = model.score_images(dm.test_images)
    np.testing.assert_allclose(scored.scores.double().numpy(), expected.scores.double().numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        scored.anomaly_maps.double().numpy(), expected.anomaly_maps.double().numpy(), rtol=1e-5, atol=1e-6
    )
    predicted = trainer.predict(model, datamodule=dm)
    maps = torch.cat([o["anomaly_map"] for o in predicted]).double().numpy()
    np.testing.assert_allclose(maps, expected.anomaly_maps.double().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("move", [lambda m: m.to("meta"), lambda m: m.to_empty(device="meta")], ids=["to", "to_empty"])
def test_a_fitted_module_is_not_moved_to_the_meta_device(move):
    """.to("meta") was accepted and dropped the bank's rows: every later score failed with PyTorch's "Cannot copy
    out of meta tensor", far from the cause. Refused before anything moves; an unfitted module still moves."""
    model, dm = fitted()
    with pytest.raises(ValueError, match="meta device"):
        move(model)
    assert model.device.type == "cpu" and model.bank.embeddings.device.type == "cpu"
    assert_reference(model, dm, embeddings(dm.train_images))
    empty = DN2Module(k=K, backbone=linear_backbone(), reports=False).to("meta")
    assert empty.bank.embeddings.is_meta


def _fitted_for_review() -> DN2Module:
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().fit(model, datamodule=BlobDataModule())
    return model


def test_loading_a_models_state_dict_into_another_keeps_the_sources_scores(monkeypatch):
    """load_state_dict takes the saved tensors themselves (no second bank while loading); nn.Module's copy_ into
    them bumped the version counter the source model's buffers share, so the source's leave-one-out scores looked
    stale, were recomputed (O(N^2)), and its state dict said loo_k = 0 meanwhile (a reviewer)."""
    source = _fitted_for_review()
    copy = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    copy.load_state_dict(source.state_dict())
    assert int(source.state_dict()["bank.loo_k"]) == 2
    calls = []
    update = bank_module.BankBuilder.update_loo_scores
    monkeypatch.setattr(
        bank_module.BankBuilder, "update_loo_scores", lambda *a, **k: calls.append(1) or update(*a, **k)
    )
    float(source.threshold)
    assert not calls, "the unchanged source bank's leave-one-out scores were recomputed"


def test_keeping_a_shard_of_an_edited_bank_does_not_revive_its_old_scores():
    """A whole bank meeting bank_sharding='shard' (BankBuilder.keep_own_shard) carries its leave-one-out scores
    over only while they are its rows': after an edit they were marked current again (a reviewer)."""
    model = _fitted_for_review()
    model.bank.embeddings.mul_(2)
    assert not model.bank.has_loo_scores(2, None)
    BankBuilder(model.bank, True, {}).keep_own_shard()  # one process: its shard is the whole bank
    assert not model.bank.has_loo_scores(2, None), "the old rows' scores are taken as the edited rows'"

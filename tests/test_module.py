"""DN2Module life cycle on synthetic data with a tiny fixed backbone: exact, fast, no mocks."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from helpers import BlobDataModule, BlobWithValDataModule, linear_backbone, quiet_trainer
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors
from torch.utils.data import DataLoader, TensorDataset

from dn2_lightning import DN2Detector, DN2Module


def reference_scores(model: DN2Module, dm: BlobDataModule, k: int) -> np.ndarray:
    """DN2 scores computed independently: embeddings in float64 + sklearn exact kNN."""
    with torch.no_grad():
        train = model.backbone(dm.train_images).double().numpy()
        test = model.backbone(dm.test_images).double().numpy()
    distances, _ = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(train).kneighbors(test)
    return (distances**2).mean(1)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_test_without_fit_matches_independent_reference(k):
    dm = BlobDataModule()
    model = DN2Module(k=k, backbone=linear_backbone())
    results = quiet_trainer().test(model, datamodule=dm)
    scores = model.test_scores
    assert torch.equal(scores.indices, torch.arange(len(dm.test_images)))
    np.testing.assert_allclose(scores.scores.numpy(), reference_scores(model, dm, k), rtol=1e-5)
    expected_auroc = roc_auc_score(dm.test_labels.numpy(), scores.scores.numpy())
    assert results[0]["test/auroc"] == pytest.approx(expected_auroc, abs=1e-7)
    assert 0.5 < expected_auroc <= 1.0


def test_fit_then_test_equals_test_without_fit_and_checkpoint_round_trip(tmp_path):
    dm = BlobDataModule()
    direct = DN2Module(k=2, backbone=linear_backbone())
    quiet_trainer().test(direct, datamodule=dm)

    model = DN2Module(k=2, backbone=linear_backbone())
    trainer = quiet_trainer(default_root_dir=tmp_path, enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm)
    messages = " ".join(str(w.message) for w in caught)
    for forbidden in ("optimizer", "training_step", "eval mode", "None"):
        assert forbidden not in messages, messages
    assert trainer.current_epoch == 1 and len(model.bank) == len(dm.train_images)
    trainer.test(model, datamodule=dm)
    assert torch.equal(model.test_scores.scores, direct.test_scores.scores)

    ckpt = trainer.checkpoint_callback.best_model_path
    assert ckpt, "ModelCheckpoint must save after fit even though no optimizer stepped"
    state = torch.load(ckpt, weights_only=True)  # no pickle execution needed
    assert state["state_dict"]["bank.embeddings"].shape == (len(dm.train_images), 16)
    restored = DN2Module.load_from_checkpoint(ckpt, backbone=linear_backbone(seed=1))  # weights come from ckpt
    assert torch.equal(restored.bank.embeddings, model.bank.embeddings)
    quiet_trainer().test(restored, datamodule=BlobDataModule())
    assert torch.equal(restored.test_scores.scores, direct.test_scores.scores)
    assert torch.equal(restored.threshold, model.threshold)


def test_fit_with_validation_and_sanity_check_logs_val_auroc():
    dm = BlobWithValDataModule()
    model = DN2Module(k=2, backbone=linear_backbone())
    trainer = quiet_trainer(num_sanity_val_steps=2)
    trainer.fit(model, datamodule=dm)
    assert "val/auroc" in trainer.callback_metrics
    expected = roc_auc_score(dm.test_labels.numpy(), model.val_scores.scores.numpy())
    assert trainer.callback_metrics["val/auroc"].item() == pytest.approx(expected, abs=1e-7)


def test_partial_training_pass_warns():
    model = DN2Module(k=2, backbone=linear_backbone())
    with pytest.warns(UserWarning, match="2 of 7 training batches"):
        quiet_trainer(limit_train_batches=2).fit(model, datamodule=BlobDataModule())
    assert len(model.bank) == 32


def test_test_then_refit_then_reload_outside_inference_mode():
    """A bank built inside test's inference mode must not break a later fit or load_state_dict."""
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone())
    quiet_trainer().test(model, datamodule=dm)
    quiet_trainer().fit(model, datamodule=BlobDataModule(n_train=50))
    assert len(model.bank) == 50
    fresh = DN2Module(k=2, backbone=linear_backbone())
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.bank.embeddings, model.bank.embeddings)


def test_test_without_datamodule_or_bank_says_what_to_do():
    model = DN2Module(k=2, backbone=linear_backbone())
    with pytest.raises(RuntimeError, match="call trainer.fit"):
        quiet_trainer().test(model, dataloaders=BlobDataModule().test_dataloader())


def test_predict_returns_scores_labels_indices_and_threshold_decisions():
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone())
    out = quiet_trainer().predict(model, datamodule=dm)
    scores = torch.cat([o["score"] for o in out])
    assert torch.equal(torch.cat([o["index"] for o in out]), torch.arange(len(dm.test_images)))
    assert torch.equal(torch.cat([o["label"] for o in out]), dm.test_labels)
    np.testing.assert_allclose(scores.numpy(), reference_scores(model, dm, 2), rtol=1e-5)
    assert torch.equal(torch.cat([o["is_anomaly"] for o in out]), scores > model.threshold)


def test_threshold_comes_from_leave_one_out_train_scores():
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), threshold_quantile=0.9)
    quiet_trainer().fit(model, datamodule=dm)
    with torch.no_grad():
        train = model.backbone(dm.train_images).double().numpy()
    distances, _ = NearestNeighbors(n_neighbors=3, algorithm="brute").fit(train).kneighbors(train)
    loo = (distances[:, 1:] ** 2).mean(1)  # first neighbour is the sample itself (no duplicates here)
    assert model.threshold.item() == pytest.approx(np.quantile(loo, 0.9), rel=1e-5)


def threshold_reference(model: DN2Module, dm: BlobDataModule, k: int) -> np.ndarray:
    """Every training image's threshold score, independently: leave-one-out in the bank for kept images, against
    the bank for those cleaning removed (float64, brute force), by dataset index."""
    with torch.no_grad():
        train = model.backbone(dm.train_images).double().numpy()
    kept = model.bank.sample_indices.numpy()
    distances = ((train[:, None] - train[kept][None]) ** 2).sum(-1)
    distances[kept, np.arange(len(kept))] = np.inf  # a kept image leaves itself out
    return np.sort(distances, axis=1)[:, :k].mean(1)


@pytest.mark.parametrize("clean_fraction", [0.0, 0.3])
def test_threshold_samples_draws_training_images_and_scores_them_exactly(tmp_path, clean_fraction):
    dm = BlobDataModule(n_train=101)
    every = DN2Module(k=2, backbone=linear_backbone(), clean_fraction=clean_fraction, clean_k=5, reports=False)
    quiet_trainer().fit(every, datamodule=dm)
    assert len(every.bank.loo_scores) == 101 and not every.bank.loo_drawn  # the default 20,000 > 101: all
    model = DN2Module(
        k=2, backbone=linear_backbone(), clean_fraction=clean_fraction, clean_k=5, threshold_samples=40, reports=False
    )
    trainer = quiet_trainer(enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    drawn = model._bank_builder.threshold_draw(40)
    assert len(drawn) == 40 and len(drawn.unique()) == 40 and bool(model.bank.loo_drawn)
    reference = threshold_reference(model, dm, 2)
    np.testing.assert_allclose(model.bank.loo_scores.numpy(), np.sort(reference[drawn.numpy()]), rtol=1e-5)
    assert float(model.threshold) == pytest.approx(np.quantile(np.sort(reference[drawn.numpy()]), 0.99), rel=1e-5)
    np.testing.assert_allclose(every.bank.loo_scores.numpy(), np.sort(reference), rtol=1e-5)
    # the checkpoint keeps the draw (no recompute at load); asking for all of them recomputes all
    path = trainer.checkpoint_callback.best_model_path
    loaded = DN2Module.load_from_checkpoint(path, backbone=linear_backbone())
    assert loaded.bank.has_loo_scores(2, 40) and float(loaded.threshold) == float(model.threshold)
    everything = DN2Module.load_from_checkpoint(path, backbone=linear_backbone(), threshold_samples=None)
    assert float(everything.threshold) == pytest.approx(float(every.threshold), rel=1e-6)
    assert len(everything.bank.loo_scores) == 101 and not everything.bank.loo_drawn
    with pytest.raises(ValueError, match=r"threshold_samples=0 must be None \(all of them\) or an integer >= 1"):
        DN2Module(threshold_samples=0, backbone=linear_backbone())


def cleaned_reference(train: np.ndarray, fraction: float, clean_k: int) -> np.ndarray:
    """The rows cleaning keeps, independently: the ``fraction`` (rounded half up) of largest leave-one-out scores over
    ``clean_k`` neighbours removed, ties by row order (float64, brute force)."""
    distances = ((train[:, None] - train[None]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    scores = np.sort(distances, axis=1)[:, :clean_k].mean(1)
    removed = int(np.floor(fraction * len(train) + 0.5))
    return np.sort(np.argsort(scores, kind="stable")[: len(train) - removed])


@pytest.mark.parametrize("k", [1, 5])
def test_a_cleaned_bank_scores_as_brute_force_through_every_entry_point_and_the_detector(tmp_path, k):
    """Unsupervised setting, k other than 2: the kept rows, test/predict/score_images scores, AUROC, threshold and
    is_anomaly against a brute force; DN2Detector on the same embeddings and the reloaded checkpoint agree."""
    dm = BlobDataModule(n_train=60, n_normal=21, n_anomalous=15, seed=k)
    dm.train_images[:8] += 0.3  # contaminants
    model = DN2Module(
        k=k, backbone=linear_backbone(), clean_fraction=0.3, clean_k=5, threshold_quantile=0.9, reports=False
    )
    trainer = quiet_trainer(default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    with torch.no_grad():
        train = model.backbone(dm.train_images).double().numpy()
        test = model.backbone(dm.test_images).double().numpy()
    kept = cleaned_reference(train, 0.3, 5)
    assert np.array_equal(np.sort(model.bank.sample_indices.numpy()), kept)
    distances = ((test[:, None] - train[kept][None]) ** 2).sum(-1)
    expected = np.sort(distances, axis=1)[:, :k].mean(1)
    threshold = np.quantile(threshold_reference(model, dm, k), 0.9)
    assert float(model.threshold) == pytest.approx(threshold, rel=1e-5)

    results = trainer.test(model, datamodule=dm)
    np.testing.assert_allclose(model.test_scores.scores.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(model.test_scores.distances.numpy(), np.sort(distances, 1)[:, :k], rtol=1e-5)
    assert results[0]["test/auroc"] == pytest.approx(roc_auc_score(dm.test_labels.numpy(), expected), abs=1e-6)
    out = trainer.predict(model, datamodule=dm)
    np.testing.assert_allclose(torch.cat([o["score"] for o in out]).numpy(), expected, rtol=1e-5)
    assert np.array_equal(torch.cat([o["is_anomaly"] for o in out]).numpy(), expected > threshold)
    images = model.score_images(dm.test_images)
    np.testing.assert_allclose(images.scores.numpy(), expected, rtol=1e-5)

    detector = DN2Detector(k=k, clean_fraction=0.3, clean_k=5, threshold_quantile=0.9).fit(train.astype(np.float32))
    assert np.array_equal(np.flatnonzero(detector.kept_), kept)
    assert detector.threshold_ == pytest.approx(threshold, rel=1e-5)
    np.testing.assert_allclose(detector.decision_function(test.astype(np.float32)), expected, rtol=1e-5)

    trainer.save_checkpoint(tmp_path / "cleaned.ckpt")
    loaded = DN2Module.load_from_checkpoint(tmp_path / "cleaned.ckpt", backbone=linear_backbone(seed=1))
    assert float(loaded.threshold) == pytest.approx(threshold, rel=1e-5)
    np.testing.assert_allclose(loaded.score_images(dm.test_images).scores.numpy(), expected, rtol=1e-5)


def test_a_quantile_of_too_few_leave_one_out_scores_is_warned_about_once():
    # the 0.99 quantile of 40 scores flags about 3.4% of normal images, not 1%
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    dm = BlobDataModule(n_train=40)
    with pytest.warns(UserWarning) as caught:
        quiet_trainer().test(model, datamodule=dm)
        quiet_trainer().test(model, datamodule=dm)
    coarse = [str(w.message) for w in caught if "is set from 40 scores" in str(w.message)]
    assert len(coarse) == 1, coarse  # once, not per batch or run
    assert "(n (1 - q) + q) / (n + 1) = 3.39%, and 0.99 needs about 97 scores" in coarse[0]
    assert "Use more training samples" in coarse[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*is set from")
        model.set_threshold(quantile=0.9)  # (40 x 0.1 + 0.9) / 41 = 12%: about 10%
        fixed = DN2Module(k=2, backbone=linear_backbone(), reports=False, threshold=5.0)  # no quantile: no warning
        quiet_trainer().test(fixed, datamodule=dm)
    # a draw of 30 of 101 training images: the fix is to draw them all
    drawn = DN2Module(k=2, backbone=linear_backbone(), reports=False, threshold_samples=30)
    with pytest.warns(UserWarning, match=r"set from 30 scores.*Use threshold_samples=None \(every training sample\)"):
        quiet_trainer().test(drawn, datamodule=BlobDataModule(n_train=101))


def test_a_module_pickled_before_the_newest_warnings_still_evaluates():
    """A module pickled by an earlier dn2-lightning (e.g. saved whole with torch.save) lacks the newest attributes."""
    dm = BlobDataModule(n_train=40)
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().fit(model, datamodule=dm)
    for name in ("_other_size", "_warned_few_threshold_scores"):
        del model.__dict__[name]
    restored = pickle.loads(pickle.dumps(model))
    with pytest.warns(UserWarning, match="is set from 40 scores"):
        quiet_trainer().test(restored, datamodule=dm)
    np.testing.assert_array_equal(restored.bank.embeddings.numpy(), model.bank.embeddings.numpy())


def test_a_checkpoint_saved_before_threshold_samples_keeps_its_scores(tmp_path):
    dm = BlobDataModule(n_train=101)
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    for key in ("bank.loo_samples", "bank.loo_drawn"):
        del checkpoint["state_dict"][key]
    del checkpoint["hyper_parameters"]["threshold_samples"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    old = DN2Module.load_from_checkpoint(tmp_path / "old.ckpt", backbone=linear_backbone())  # strict: loads
    assert old.hparams.threshold_samples == 20_000 and old.bank.has_loo_scores(2, 20_000)
    # every image's scores are kept also where a draw is asked for: the draw would only be less exact (a bank of
    # more than 20,000 images saved before threshold_samples keeps its threshold)
    fewer = DN2Module.load_from_checkpoint(tmp_path / "old.ckpt", backbone=linear_backbone(), threshold_samples=50)
    for loaded in (old, fewer):
        assert float(loaded.threshold) == float(model.threshold)
        assert torch.equal(loaded.bank.loo_scores, model.bank.loo_scores) and len(loaded.bank.loo_scores) == 101


def test_tuple_batches_without_indices_work():
    from torch.utils.data import DataLoader, TensorDataset

    dm = BlobDataModule()
    train = DataLoader(TensorDataset(dm.train_images, torch.zeros(len(dm.train_images))), batch_size=16)
    test = DataLoader(TensorDataset(dm.test_images, dm.test_labels), batch_size=16)
    model = DN2Module(k=2, backbone=linear_backbone())
    trainer = quiet_trainer()
    trainer.fit(model, train_dataloaders=train)
    trainer.test(model, dataloaders=test)
    np.testing.assert_allclose(model.test_scores.scores.numpy(), reference_scores(model, dm, 2), rtol=1e-5)


def test_nan_input_names_batch_and_samples():
    dm = BlobDataModule()
    dm.test_images[20, 0, 0, 0] = float("nan")
    model = DN2Module(k=2, backbone=linear_backbone())
    with pytest.raises(ValueError, match=r"batch 1 at positions \[4\] \(dataset indices \[20\]\)"):
        quiet_trainer().test(model, datamodule=dm)


def test_single_class_test_set_warns_auroc_undefined():
    dm = BlobDataModule(n_anomalous=0)
    model = DN2Module(k=2, backbone=linear_backbone())
    with pytest.warns(UserWarning, match="AUROC is undefined"):
        results = quiet_trainer().test(model, datamodule=dm)
    assert "test/auroc" not in results[0]
    assert len(model.test_scores) == 41


def test_k_larger_than_bank_is_a_clear_error():
    model = DN2Module(k=200, backbone=linear_backbone())
    with pytest.raises(ValueError, match=r"k=200 exceeds the number of training embeddings \(101\)"):
        quiet_trainer().test(model, datamodule=BlobDataModule())


def test_checkpoint_with_other_bank_dimension_is_refused(tmp_path):
    model = DN2Module(k=2, backbone="efficientnet_lite0", pretrained=False)
    model.bank.set(torch.zeros(5, 512), torch.arange(5))
    path = tmp_path / "bad.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": "2.6.0",
        },
        path,
    )
    with pytest.raises(ValueError, match="512-d embeddings but backbone='efficientnet_lite0' gives 1280-d"):
        DN2Module.load_from_checkpoint(path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k=0"),
        ({"knn_backend": "annoy"}, "knn_backend='annoy'"),
        ({"clean_fraction": 1.0}, "clean_fraction=1.0"),
        ({"clean_fraction": -0.1}, "clean_fraction=-0.1"),
        ({"clean_k": 0}, "clean_k=0"),
        ({"group_pooling": "max"}, "group_pooling='max'"),
        ({"threshold_quantile": 0.0}, "threshold_quantile=0.0"),
        ({"threshold": -5.0}, r"threshold=-5.0 is below 0, where no DN2 score .* lies: every sample would be flagged"),
        ({"backbone": "resnet9000"}, "backbone='resnet9000'"),
        ({"input_size": 2}, "input_size=2"),
        ({"pretrained": "no"}, "pretrained='no' must be True or False"),  # was read as True: a download
        ({"reports": "yes"}, "reports='yes' must be True or False"),
        ({"anomaly_maps": 1}, "anomaly_maps=1 must be True or False"),
        ({"clean_k": np.float64(5.0)}, r"clean_k=5.0 must be an integer >= 1"),
        ({"clean_k": np.int64(0)}, r"clean_k=0 must be an integer >= 1"),  # NumPy numbers are read as Python's
    ],
)
def test_bad_hyperparameters_name_the_parameter(kwargs, match):
    args = {"backbone": linear_backbone()} | kwargs
    with pytest.raises(ValueError, match=match):
        DN2Module(**args)


def test_test_without_fit_on_tuple_datasets_without_indices():
    from lightning import LightningDataModule
    from torch.utils.data import DataLoader, TensorDataset

    blobs = BlobDataModule()

    class TupleDataModule(LightningDataModule):
        def train_dataloader(self):
            return DataLoader(TensorDataset(blobs.train_images, torch.zeros(101)), batch_size=16)

        def test_dataloader(self):
            return DataLoader(TensorDataset(blobs.test_images, blobs.test_labels), batch_size=16)

    model = DN2Module(k=2, backbone=linear_backbone())
    quiet_trainer().test(model, datamodule=TupleDataModule())
    np.testing.assert_allclose(model.test_scores.scores.numpy(), reference_scores(model, blobs, 2), rtol=1e-5)


def test_nan_embeddings_from_the_backbone_are_refused():
    class Broken(torch.nn.Module):
        def forward(self, x):
            out = x.flatten(1)[:, :4].clone()
            out[1] = float("inf")
            return out

    with pytest.raises(ValueError, match=r"NaN or Inf in embeddings of batch 0 at positions \[1\]"):
        quiet_trainer().test(DN2Module(k=2, backbone=Broken()), datamodule=BlobDataModule())


class _PoisonedOnCall(torch.nn.Module):
    """A linear backbone whose ``bad_call``-th forward (counted from 0) puts NaN in row 3, logging each forward."""

    def __init__(self, bad_call: int, log: list) -> None:
        super().__init__()
        self.linear, self.bad_call, self.log, self.calls = linear_backbone(), bad_call, log, 0

    def forward(self, x):
        out = self.linear(x)
        if self.calls == self.bad_call:
            out = out.clone()
            out[3] = float("nan")
        self.log.append(("forward", self.calls))
        self.calls += 1
        return out


@pytest.fixture
def verdicts(monkeypatch):
    """The log of backbone forwards and finiteness verdicts read, in order."""
    import dn2_lightning.module as module_code

    log, read = [], module_code._refuse_nonfinite

    def logged(bad, what, indices, batch_idx):
        log.append(("verdict", batch_idx))
        return read(bad, what, indices, batch_idx)

    monkeypatch.setattr(module_code, "_refuse_nonfinite", logged)
    return log


@pytest.mark.parametrize("bad_batch", [2, 6])  # 6: the pass's last batch (101 images by 16)
def test_nan_embeddings_in_the_training_pass_are_refused_one_batch_later_and_leave_no_bank(verdicts, bad_batch):
    # each batch's verdict is read after the next batch's forward is queued: on a GPU, reading it waits for that
    # batch, and checked at once the device idled while the host fetched the next
    model = DN2Module(k=2, backbone=_PoisonedOnCall(bad_batch, verdicts), reports=False)
    at = rf"at positions \[3\] \(dataset indices \[{16 * bad_batch + 3}\]\)"
    match = rf"NaN or Inf in embeddings of batch {bad_batch} {at}"
    with pytest.raises(ValueError, match=match):
        quiet_trainer(max_epochs=1).fit(model, datamodule=BlobDataModule())
    forwards = [event for event in verdicts if event[0] == "forward"]
    assert len(forwards) == bad_batch + 1 + (bad_batch < 6), verdicts  # the next batch embedded, not the rest
    for position, (kind, batch_idx) in enumerate(verdicts):
        if kind == "verdict" and batch_idx < 6:
            assert ("forward", batch_idx + 1) in verdicts[:position], f"batch {batch_idx} read too early: {verdicts}"
    assert verdicts[-1] == ("verdict", bad_batch)
    assert not model.bank.is_fitted


def test_nan_embeddings_before_a_validation_inside_the_pass_stop_it_before_a_partial_bank(verdicts):
    model = DN2Module(k=2, backbone=_PoisonedOnCall(2, verdicts), reports=False)
    trainer = quiet_trainer(max_epochs=1, val_check_interval=3, num_sanity_val_steps=0)
    with pytest.raises(ValueError, match=r"NaN or Inf in embeddings of batch 2 at positions \[3\]"):
        trainer.fit(model, datamodule=BlobWithValDataModule())
    assert ("forward", 3) not in verdicts and not model.bank.is_fitted  # raised at the validation, before batch 3


def test_nan_embeddings_in_a_bank_built_on_first_need_are_refused_before_any_score(verdicts):
    model = DN2Module(k=2, backbone=_PoisonedOnCall(6, verdicts), reports=False)
    with pytest.raises(ValueError, match=r"NaN or Inf in embeddings of batch 6 at positions \[3\]"):
        quiet_trainer().test(model, datamodule=BlobDataModule())
    assert model.test_scores is None and not model.bank.is_fitted


@pytest.mark.parametrize("run", ["fit", "test"])  # test: the bank built on first need
def test_an_error_in_the_batch_after_nan_embeddings_does_not_hide_them(verdicts, run):
    # checked at once, batch 2's NaN stopped the pass before batch 3 ran: its error comes first, also one batch later
    class FailingAfter(_PoisonedOnCall):
        def forward(self, x):
            if self.calls == 3:
                raise RuntimeError("batch 3 failed")
            return super().forward(x)

    model = DN2Module(k=2, backbone=FailingAfter(2, verdicts), reports=False)
    with pytest.raises(
        ValueError, match=r"NaN or Inf in embeddings of batch 2 at positions \[3\] \(dataset indices \[35\]\)"
    ):
        getattr(quiet_trainer(max_epochs=1), run)(model, datamodule=BlobDataModule())
    assert not model._checks_behind.pending and not model.bank.is_fitted


def test_an_unread_verdict_of_a_fit_that_crashed_is_not_raised_by_the_next_fit(tmp_path, verdicts):
    """A callback stops the fit after batch 4, whose NaN verdict is still unread; the same module's next fit, resumed
    mid-epoch (no pass started before its validation inside the epoch), never raises it: the error named a batch
    that fit never embedded."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    class CrashAtBatch4(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 4:
                raise RuntimeError("crash")

    dm = BlobWithValDataModule(batch_size=8)  # 101 images: 13 batches
    model = DN2Module(k=2, backbone=_PoisonedOnCall(4, verdicts), reports=False)
    every3 = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    with pytest.raises(RuntimeError, match="crash"):
        trainer = quiet_trainer(enable_checkpointing=True, callbacks=[every3, CrashAtBatch4()], limit_val_batches=0)
        trainer.fit(model, datamodule=dm)
    clean = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer(limit_val_batches=0).fit(clean, datamodule=dm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the partial bank of the validation inside the pass
        trainer = quiet_trainer(val_check_interval=0.5, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=dm, ckpt_path=tmp_path / "epoch=0-step=3.ckpt")
    assert torch.equal(model.bank.sample_indices, clean.bank.sample_indices)
    torch.testing.assert_close(model.bank.embeddings, clean.bank.embeddings)


class _TrainDataModule(BlobDataModule):
    """Blobs whose training labels are given (class indices, say, instead of 0/1)."""

    def __init__(self, labels: torch.Tensor, **kwargs) -> None:
        super().__init__(**kwargs)
        self.labels = labels

    def train_dataloader(self) -> DataLoader:
        from helpers import DictDataset

        return DataLoader(DictDataset(self.train_images, self.labels), batch_size=self.batch_size)


@pytest.mark.parametrize("problem", ["labels", "pixels", "labels and NaN embeddings", "NaN embeddings, then labels"])
def test_the_training_pass_reads_its_labels_and_pixels_checks_one_batch_later_with_the_same_errors(verdicts, problem):
    # labels and float pixels are checked on the device too: read at once, each batch waited for the one before
    labels = torch.zeros(101, dtype=torch.long)
    dm = _TrainDataModule(labels)
    if "then" in problem:
        labels[3 * 16 + 1] = 5  # batch 3, whose checks must not come before batch 2's error
    elif "labels" in problem:
        labels[2 * 16 + 1] = 5  # batch 2
    else:
        dm.train_images[2 * 16 + 1] *= 300  # 0..255 floats in batch 2
    bad_call = 2 if "NaN" in problem else -1
    model = DN2Module(k=2, backbone=_PoisonedOnCall(bad_call, verdicts), reports=False)
    match = "got the values \\[0, 5\\]" if "labels" in problem else "float images must hold values in \\[0, 1\\]"
    match = "NaN or Inf in embeddings of batch 2" if "then" in problem else match
    with pytest.raises(ValueError, match=match):  # the label error first, as when it was read before the forward
        quiet_trainer(max_epochs=1).fit(model, datamodule=dm)
    assert [event for event in verdicts if event[0] == "forward"][-1] == ("forward", 3), verdicts  # read at batch 3
    assert not model.bank.is_fitted and not model._checks_behind.pending


@pytest.mark.parametrize("images", ["float images", "uint8 images", "float groups"])
def test_the_checks_read_one_batch_later_keep_no_batch_of_images(images):
    # they held the images (the pixel and the group mask checks): the device kept a batch of images more
    import gc
    import weakref

    from dn2_lightning.batch import ChecksBehind, unpack_batch

    shape = (4, 2, 3, 8, 8) if "groups" in images else (4, 3, 8, 8)
    batch = {"image": torch.rand(shape), "label": torch.zeros(4), "index": torch.arange(4)}
    if "uint8" in images:
        batch["image"] = (batch["image"] * 255).to(torch.uint8)
    if "groups" in images:
        batch["mask"] = torch.ones(4, 2, dtype=torch.bool)
    held, behind = weakref.ref(batch["image"]), ChecksBehind()
    unpack_batch(batch, 0, defer=behind.add)
    del batch
    gc.collect()
    assert held() is None and behind.pending
    behind.flush()


def test_empty_train_folder_is_a_clear_error(tmp_path):
    from dn2_lightning import OneClassDataModule

    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="no images under"):
        OneClassDataModule(dataset="folder", root=str(tmp_path)).setup()


def test_bf16_mixed_precision_embeds_in_bf16_and_scores_exactly_in_float32():
    """Trainer(precision="bf16-mixed"): the backbone runs under autocast, the bank and the kNN stay float32,
    and the scores are the exact DN2 scores of the embeddings the backbone produced."""
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone())
    results = quiet_trainer(precision="bf16-mixed").test(model, datamodule=dm)
    assert model.bank.embeddings.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train = model.backbone(dm.train_images).float().double().numpy()
        test = model.backbone(dm.test_images).float().double().numpy()
    distances, _ = NearestNeighbors(n_neighbors=2, algorithm="brute").fit(train).kneighbors(test)
    np.testing.assert_allclose(model.test_scores.scores.numpy(), (distances**2).mean(1), rtol=1e-4)
    full = reference_scores(model, dm, 2)
    assert not np.allclose(model.test_scores.scores.numpy(), full, rtol=1e-6), "bf16 must have been used"
    assert results[0]["test/auroc"] == pytest.approx(roc_auc_score(dm.test_labels.numpy(), full), abs=0.05)


def test_queries_are_embedded_at_the_banks_precision_from_every_entry_point(tmp_path):
    """A bank embedded under bf16-mixed: score_images, a float32 Trainer and a reloaded checkpoint give the
    scores of the bf16 test (before, they embedded queries in float32 against bf16 rows); and a float32 bank
    tested under bf16-mixed keeps its float32 scores."""
    dm = BlobDataModule()
    trainer = quiet_trainer(precision="bf16-mixed", default_root_dir=tmp_path, enable_checkpointing=True)
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm)
    bf16 = model.test_scores.scores
    assert model.bank.spec["autocast"] == "bfloat16"
    assert not np.allclose(bf16.numpy(), reference_scores(model, dm, 2), rtol=1e-6), "bf16 must have been used"
    torch.testing.assert_close(model.score_images(dm.test_images).scores, bf16, rtol=1e-6, atol=0)
    quiet_trainer().test(model, datamodule=dm)
    torch.testing.assert_close(model.test_scores.scores, bf16, rtol=1e-6, atol=0)
    loaded = DN2Module.load_from_checkpoint(trainer.checkpoint_callback.best_model_path, backbone=linear_backbone())
    torch.testing.assert_close(loaded.score_images(dm.test_images).scores, bf16, rtol=1e-6, atol=0)

    float32 = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().test(float32, datamodule=dm)
    assert float32.bank.spec["autocast"] is None
    expected = float32.test_scores.scores
    quiet_trainer(precision="bf16-mixed").test(float32, datamodule=dm)
    torch.testing.assert_close(float32.test_scores.scores, expected, rtol=1e-6, atol=0)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoint_with_pickled_code_is_refused_without_running_it(tmp_path):
    """Checkpoints load with weights_only=True semantics: a pickled callable is refused, never executed."""
    marker, ckpt = tmp_path / "code_ran", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"k": 2}, "payload": _RunsCodeWhenUnpickled(marker)}, ckpt)
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only"):
        DN2Module.load_from_checkpoint(ckpt, backbone=linear_backbone())
    assert not marker.exists()


def test_a_bank_loaded_by_load_state_dict_is_checked_against_the_model_settings():
    # on_load_checkpoint (a Lightning hook) checked the bank's settings, plain load_state_dict nothing: a bank built
    # at input_size=32 was searched with queries embedded at 64 (a reviewer: AUROC 0.3346 for 0.9921), silently
    dm = BlobDataModule()
    cleaned = DN2Module(k=2, backbone=linear_backbone(), clean_fraction=0.5, reports=False)
    quiet_trainer().fit(cleaned, datamodule=dm)
    plain = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    plain.load_state_dict(cleaned.state_dict())
    match = r"clean_fraction=0.5 \(checkpoint\) vs clean_fraction=0.0 \(this model\)"
    with pytest.raises(ValueError, match=match):
        quiet_trainer().test(plain, datamodule=dm)
    with pytest.raises(ValueError, match=match):
        plain.score_images(dm.test_images[:3])
    same = DN2Module(k=2, backbone=linear_backbone(), clean_fraction=0.5, reports=False)
    same.load_state_dict(cleaned.state_dict())
    torch.testing.assert_close(
        same.score_images(dm.test_images[:3]).scores, cleaned.score_images(dm.test_images[:3]).scores
    )


def test_threshold_samples_with_cleaning_draws_from_every_training_image_removed_ones_included():
    # guards the draw built from the kept rows only (removed images never scored for the threshold)
    dm = BlobDataModule(n_train=101)
    model = DN2Module(
        k=2, backbone=linear_backbone(), clean_fraction=0.3, clean_k=5, threshold_samples=40, reports=False
    )
    quiet_trainer().fit(model, datamodule=dm)
    draw = torch.randperm(101, generator=torch.Generator().manual_seed(0))[:40].sort().values.numpy()
    removed = model.bank.removed_indices.numpy()
    assert len(removed) > 0 and np.isin(draw, removed).any()  # the draw reaches images cleaning removed
    reference = threshold_reference(model, dm, 2)
    np.testing.assert_allclose(model.bank.loo_scores.numpy(), np.sort(reference[draw]), rtol=1e-5)


def test_predict_normalized_is_the_share_of_leave_one_out_scores_below_each_score():
    # guards predict_step normalizing something other than the score (e.g. the nearest distance alone)
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().fit(model, datamodule=dm)
    out = quiet_trainer().predict(model, datamodule=dm)
    scores = torch.cat([o["score"] for o in out]).double().numpy()
    normalized = torch.cat([o["normalized"] for o in out]).double().numpy()
    loo = model.bank.loo_scores.double().numpy()
    expected = (loo[None, :] < scores[:, None]).mean(1)
    assert 0 < expected.min() < expected.max() < 1  # scores spread among the training scores: a real comparison
    np.testing.assert_allclose(normalized, expected, atol=1e-6)
    np.testing.assert_allclose(model.predict_scores.normalized.double().numpy(), normalized, atol=1e-6)


def test_is_anomaly_is_a_score_strictly_above_the_threshold():
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=dm)
    scores = torch.cat([o["score"] for o in trainer.predict(model, datamodule=dm)])
    # a fixed threshold equal to one sample's score: that sample is not above it
    at = int(scores.argsort()[len(scores) // 2])
    model.set_threshold(value=float(scores[at]))
    out = trainer.predict(model, datamodule=dm)
    flagged = torch.cat([o["is_anomaly"] for o in out])
    assert torch.equal(torch.cat([o["score"] for o in out]), scores)
    assert not bool(flagged[at])
    expected = scores.numpy() > np.float32(scores[at])
    assert flagged.tolist() == expected.tolist()
    assert torch.equal(model.predict_scores.is_anomaly, flagged)


def test_auroc_is_the_scores_auroc_when_scores_are_far_above_one():
    # squared distances of a wide-range backbone reach thousands: the AUROC must rank the scores themselves, not
    # squash them through a sigmoid (which saturates to 1.0 for all of them: 0.5)
    from sklearn.metrics import roc_auc_score

    dm = BlobDataModule()
    backbone = linear_backbone()
    with torch.no_grad():
        backbone[1].weight.mul_(1000.0)
    model = DN2Module(k=2, backbone=backbone, reports=False)
    results = quiet_trainer().test(model, datamodule=dm)
    scores = model.test_scores.scores
    assert float(scores.min()) > 100.0
    expected = roc_auc_score(model.test_scores.labels.numpy(), scores.double().numpy())
    assert abs(expected - 0.5) > 0.02  # a sigmoid-saturated AUROC (every score 1.0) is 0.5
    assert results[0]["test/auroc"] == pytest.approx(expected, abs=1e-6)


def test_a_perfectly_separated_test_set_logs_an_auroc_of_one_not_above():
    # torchmetrics' float32 sums gave 1.0000001 for 10 normal images below 12 anomalous ones (a README walk)
    dm = BlobDataModule(n_normal=10, n_anomalous=12)
    dm.test_images[10:] = dm.test_images[10:] * 0.3 + 0.7  # far from every training image (in [0, 0.6])
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    results = quiet_trainer().test(model, datamodule=dm)
    assert float(model.test_scores.scores[:10].max()) < float(model.test_scores.scores[10:].min())
    assert results[0]["test/auroc"] == 1.0


def test_a_test_set_with_some_unknown_labels_is_scored_without_an_auroc():
    # -1 = unknown: one such label leaves the AUROC undefined, whatever the other samples' labels are
    dm = BlobDataModule()
    labels = dm.test_labels.clone()
    labels[::7] = -1
    loader = DataLoader(TensorDataset(dm.test_images, labels), batch_size=16)
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=dm)
    results = trainer.test(model, dataloaders=loader)
    assert "test/auroc" not in results[0]
    assert torch.equal(model.test_scores.labels, labels)


def test_a_fit_stopped_by_an_error_leaves_no_rows_for_a_later_test():
    # the rows read before the error are no bank: a later test builds the whole bank from the datamodule
    dm = BlobDataModule()
    images = dm.train_images.clone()
    images[40, 0, 0, 0] = float("nan")  # batch 2 of 16
    broken = DataLoader(TensorDataset(images, torch.zeros(len(images), dtype=torch.long)), batch_size=16)
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    with pytest.raises(ValueError, match="NaN"):
        quiet_trainer().fit(model, train_dataloaders=broken)
    quiet_trainer().test(model, datamodule=dm)
    assert model.bank.sample_indices.tolist() == list(range(len(dm.train_images)))
    np.testing.assert_allclose(model.test_scores.scores.numpy(), reference_scores(model, dm, 2), rtol=1e-5, atol=1e-7)


def test_a_test_run_stopped_by_an_error_leaves_no_rows_in_the_next_one():
    dm = BlobDataModule()
    images = dm.test_images.clone()
    images[40, 0, 0, 0] = float("nan")  # batch 2 of 16: batches 0 and 1 were scored before the error
    broken = DataLoader(TensorDataset(images, dm.test_labels), batch_size=16)
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=dm)
    with pytest.raises(ValueError, match="NaN"):
        trainer.test(model, dataloaders=broken)
    trainer.test(model, datamodule=dm)
    assert model.test_scores.indices.tolist() == list(range(len(dm.test_images)))
    np.testing.assert_allclose(model.test_scores.scores.numpy(), reference_scores(model, dm, 2), rtol=1e-5, atol=1e-7)


def test_neighbour_paths_name_the_last_training_sample_too():
    dm = BlobDataModule(n_train=20)
    train = [
        {"image": img, "label": 0, "index": i, "path": f"/data/train/{i:03d}.png"}
        for i, img in enumerate(dm.train_images)
    ]
    model = DN2Module(k=1, backbone=linear_backbone(), reports=False)
    quiet_trainer().fit(model, train_dataloaders=DataLoader(train, batch_size=8))
    result = model.score_images(dm.train_images[[19, 0]])
    assert result.neighbours[:, 0].tolist() == [19, 0]  # each image's nearest row is its own
    assert [row[0] for row in result.neighbour_paths] == ["/data/train/019.png", "/data/train/000.png"]


def test_a_checkpoint_saved_at_the_max_steps_step_holds_the_bank(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    dm = BlobDataModule(batch_size=8)  # 13 batches; max_steps=5 ends the pass after 5
    every = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5)
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    with pytest.warns(UserWarning, match="partial bank"):
        quiet_trainer(enable_checkpointing=True, callbacks=[every], max_steps=5).fit(model, datamodule=dm)
    assert len(model.bank) == 40
    with pytest.warns(UserWarning, match="partial bank"):
        loaded = DN2Module.load_from_checkpoint(tmp_path / "epoch=0-step=5.ckpt", backbone=linear_backbone())
    torch.testing.assert_close(loaded.bank.embeddings, model.bank.embeddings)


def test_a_quantile_set_before_the_bank_exists_is_said_as_kept_and_used_by_the_fit():
    """set_threshold(quantile=0.9) before a fit said "no decision threshold (is_anomaly undefined)", as if it had
    failed; the quantile is kept and sets the threshold once the bank exists (a review of the public API)."""
    from helpers import dn2_messages

    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    with dn2_messages() as messages:
        assert np.isnan(model.set_threshold(quantile=0.9))
    assert messages == ["DN2: threshold_quantile 0.9 set; the threshold is computed once the model has a memory bank."]
    dm = BlobDataModule()
    quiet_trainer().fit(model, datamodule=dm)
    loo = threshold_reference(model, dm, 2)
    assert float(model.threshold) == pytest.approx(float(np.quantile(loo, 0.9)), rel=1e-5)

"""Apple silicon: on a Mac, ``Trainer()`` picks the MPS device, which has no float64. The backbone runs there; the
memory bank, the exact search and everything after it run on the CPU, with the CPU's exact results.

No Mac here: ``fake_mps`` is a CPU-backed "mps" device that refuses float64 (and mixed devices) as MPS does, so
every test below fails on code that sends float64 to the device.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from fake_mps import FakeMPSAccelerator, fake_mps
from helpers import BlobDataModule, linear_backbone, quiet_trainer
from lightning import Callback, Trainer
from test_maps import tiny_conv

from dn2_lightning import DN2Detector, DN2Module
from dn2_lightning.data import GroupDataModule, OneClassDataModule
from dn2_lightning.data.synthetic import write_synthetic_defects
from dn2_lightning.knn import brute_force_knn, knn_distances, lacks_float64, prepare_bank

# on a Mac the real device answers instead (and the fake's guard errors never occur): run these elsewhere
pytestmark = pytest.mark.skipif(torch.backends.mps.is_available(), reason="emulates MPS where there is none")


class WhereThingsAre(Callback):
    """Devices of the backbone and of the banks' buffers while batches are scored (Lightning moves the module
    back to the CPU when a run ends, so they are recorded during it)."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()

    def on_test_batch_end(self, trainer, pl_module, *args) -> None:
        self.seen.add(("backbone", next(pl_module.backbone.parameters()).device.type))
        banks = [pl_module.bank] + ([pl_module.maps.bank] if pl_module.maps is not None else [])
        self.seen |= {("bank", b.device.type) for bank in banks for b in bank.buffers()}


def mps_trainer(*callbacks: Callback) -> Trainer:
    return Trainer(
        accelerator=FakeMPSAccelerator(),
        callbacks=list(callbacks),
        devices=1,
        inference_mode=False,  # (the fake device's tensors cannot be inference tensors; no_grad is used instead)
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tempfile.mkdtemp(prefix="dn2-test-"),
    )


def test_the_fake_device_refuses_float64_as_mps_does():
    with fake_mps():
        x = torch.ones(3, device="mps")
        assert x.device.type == "mps" and lacks_float64(x.device)
        for make in (
            lambda: torch.zeros(3, dtype=torch.float64, device="mps"),
            lambda: x.double(),
            lambda: x.sum(dtype=torch.float64),
            lambda: torch.linalg.vector_norm(x, dtype=torch.float64),
            lambda: torch.ones(3, dtype=torch.float64).to("mps"),
        ):
            with pytest.raises(TypeError, match="MPS framework doesn't support float64"):
                make()
        with pytest.raises(RuntimeError, match="same device"):
            x + torch.ones(3)
        assert x.cpu().double().sum().item() == 3.0


def test_exact_knn_of_mps_tensors_equals_brute_force_and_comes_back_on_the_device():
    g = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(9, 6, generator=g), torch.randn(70, 6, generator=g)
    expected = brute_force_knn(queries, bank, 3)
    with fake_mps():
        for q, b in [
            (queries.to("mps"), bank.to("mps")),
            (queries.to("mps"), prepare_bank(bank.to("mps"))),  # prepared (and kept) on the CPU
            (queries.to("mps"), bank),
            (queries, bank.to("mps")),
        ]:
            found = knn_distances(q, b, 3)
            assert found.values.device == q.device and found.indices.device == q.device
            assert torch.equal(found.indices.cpu(), expected.indices)
            torch.testing.assert_close(found.values.cpu().double(), expected.values, rtol=1e-6, atol=1e-6)


def run_on_both(make_model, datamodule, stage: str) -> tuple[DN2Module, DN2Module]:
    """The same model run on the CPU and on the (fake) MPS device, where the backbone runs on the device and the
    banks stay on the CPU."""
    on_cpu = make_model()
    getattr(quiet_trainer(), stage)(on_cpu, datamodule)
    where = WhereThingsAre()
    with fake_mps():
        on_mps = make_model()
        getattr(mps_trainer(where), stage)(on_mps, datamodule)
    assert where.seen == {("backbone", "mps"), ("bank", "cpu")} or stage != "test", where.seen
    return on_cpu, on_mps


@pytest.mark.parametrize(
    "settings",
    [{}, {"clean_fraction": 0.5, "clean_k": 5}, {"threshold_samples": 30}],
    ids=["plain", "cleaned", "threshold_drawn"],
)
def test_test_without_fit_on_mps_scores_as_on_the_cpu(settings):
    dm = BlobDataModule()
    cpu, mps = run_on_both(lambda: DN2Module(k=2, backbone=linear_backbone(), reports=False, **settings), dm, "test")
    assert torch.equal(mps.test_scores.scores, cpu.test_scores.scores)
    assert mps.test_scores.threshold == cpu.test_scores.threshold
    assert torch.equal(mps.test_scores.normalized, cpu.test_scores.normalized)


def test_fit_then_predict_on_mps_and_the_bank_stays_on_the_cpu():
    dm = BlobDataModule()
    cpu = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().fit(cpu, dm)
    expected = torch.cat([out["score"] for out in quiet_trainer().predict(cpu, dm)])
    with fake_mps():
        model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
        trainer = mps_trainer()
        trainer.fit(model, dm)  # (Lightning moves the module back to the CPU when it is done)
        model.to("mps")
        assert next(model.backbone.parameters()).device.type == "mps"
        assert {b.device.type for b in model.bank.buffers()} == {"cpu"}
        predicted = torch.cat([out["score"].cpu() for out in trainer.predict(model, dm)])
        model.to("mps")
        one_by_one = model.score_images(dm.test_images[:5])  # the Python path of README's "One image"
    torch.testing.assert_close(model.bank.embeddings, cpu.bank.embeddings)
    assert torch.equal(predicted, expected)
    assert torch.equal(one_by_one.scores.cpu(), cpu.score_images(dm.test_images[:5]).scores)


def test_a_checkpoint_fitted_on_the_cpu_is_checked_and_scored_on_mps(tmp_path):
    # the fingerprint's comparison cast the probe's MPS embedding to float64 on the device: every checkpoint loaded
    # on a Mac stopped at its first use ("Cannot convert a MPS Tensor to float64 dtype")
    dm = BlobDataModule()
    cpu = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    trainer = quiet_trainer()
    trainer.fit(cpu, dm)
    trainer.save_checkpoint(tmp_path / "bank.ckpt")
    expected = cpu.score_images(dm.test_images).scores
    with fake_mps():
        loaded = DN2Module.load_from_checkpoint(tmp_path / "bank.ckpt", backbone=linear_backbone()).to("mps")
        assert loaded.bank.fingerprint_unchecked
        scores = loaded.score_images(dm.test_images).scores.cpu()
        assert not loaded.bank.fingerprint_unchecked
        fresh = DN2Module.load_from_checkpoint(tmp_path / "bank.ckpt", backbone=linear_backbone())
        mps_trainer().test(fresh, dm)
    assert torch.equal(scores, expected)
    assert torch.equal(fresh.test_scores.scores, expected)


def test_float64_labels_and_images_of_a_plain_dataloader_score_on_mps_as_on_the_cpu():
    # labels given as NumPy floats (float64) and float64 images: Lightning's copy of the batch to MPS raised "Cannot
    # convert a MPS Tensor to float64 dtype" before any DN2 code ran, where the CPU scores them
    from torch.utils.data import DataLoader, TensorDataset

    dm = BlobDataModule()
    train = DataLoader(TensorDataset(dm.train_images.double()), batch_size=16)
    labels = torch.as_tensor(dm.test_labels.numpy().astype("float64"))
    test = DataLoader(TensorDataset(dm.test_images.double(), labels), batch_size=16)
    cpu = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    trainer = quiet_trainer()
    trainer.fit(cpu, train_dataloaders=train)
    trainer.test(cpu, dataloaders=test)
    with fake_mps():
        model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
        trainer = mps_trainer()
        trainer.fit(model, train_dataloaders=train)
        trainer.test(model, dataloaders=test)
        predicted = torch.cat([out["score"].cpu() for out in trainer.predict(model, test)])
    assert torch.equal(model.test_scores.scores, cpu.test_scores.scores)
    assert torch.equal(model.test_scores.labels, cpu.test_scores.labels)
    assert torch.equal(predicted, cpu.test_scores.scores)
    with fake_mps():
        one_by_one = model.to("mps").score_images(dm.test_images[:5].double()).scores.cpu()  # raised the same way
    assert torch.equal(one_by_one, cpu.score_images(dm.test_images[:5].double()).scores)


@pytest.mark.parametrize("pooling", ["mean", "histogram", "none"])
def test_groups_on_mps_score_as_on_the_cpu(pooling):
    dm = GroupDataModule(dataset="digits", group_size=4, n_train_groups=12, n_test_groups=12, seed=0, batch_size=16)

    def model() -> DN2Module:
        backbone = linear_backbone(in_features=3 * 32 * 32)
        return DN2Module(k=2, backbone=backbone, input_size=32, group_pooling=pooling, group_clusters=3, reports=False)

    cpu, mps = run_on_both(model, dm, "test")
    torch.testing.assert_close(mps.test_scores.scores, cpu.test_scores.scores, rtol=1e-5, atol=1e-6)
    assert mps.test_scores.threshold == pytest.approx(cpu.test_scores.threshold, rel=1e-5)


def test_anomaly_maps_on_mps_equal_the_cpus():
    dm = BlobDataModule()

    def model() -> DN2Module:
        return DN2Module(
            k=2, backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "3"], map_images=4, reports=False
        )

    cpu, mps = run_on_both(model, dm, "test")
    assert torch.equal(mps.test_scores.scores, cpu.test_scores.scores)
    torch.testing.assert_close(mps.maps.test_results.maps, cpu.maps.test_results.maps)
    with fake_mps():
        maps = torch.cat([out["anomaly_map"].cpu() for out in mps_trainer().predict(mps, dm)])
    torch.testing.assert_close(maps, cpu.maps.test_results.maps[cpu.maps.test_results.indices.argsort()])


def test_pixel_metrics_of_maps_on_mps_equal_the_cpus(tmp_path):
    root = write_synthetic_defects(tmp_path / "set", n_train=6, n_test_good=3, n_test_per_kind=1, image_size=32)

    def datamodule() -> OneClassDataModule:
        return OneClassDataModule(dataset="folder", root=str(root), load_size=32, batch_size=4, pin_memory=False)

    def model() -> DN2Module:
        maps = dict(anomaly_maps=True, map_layers=["1", "3"], map_images=3, input_size=32)
        return DN2Module(k=2, backbone=tiny_conv(), reports=False, **maps)

    on_cpu = quiet_trainer().test(model(), datamodule())[0]
    with fake_mps():
        on_mps = mps_trainer().test(model(), datamodule())[0]
    assert {"test/pixel_auroc", "test/pro"} <= set(on_cpu)
    assert on_mps == pytest.approx(on_cpu, rel=1e-6)


def test_the_detector_takes_mps_tensors():
    g = torch.Generator().manual_seed(1)
    train, queries = torch.randn(80, 5, generator=g), torch.randn(12, 5, generator=g) * 2
    expected = DN2Detector(k=2, clean_fraction=0.2, clean_k=5).fit(train).decision_function(queries)
    with fake_mps():
        detector = DN2Detector(k=2, clean_fraction=0.2, clean_k=5).fit(train.to("mps"))
        scores = detector.decision_function(queries.to("mps"))
        assert scores.device.type == "mps"  # on X's device, as documented
        scores = scores.cpu()
        fitted_on_cpu = DN2Detector(k=2, clean_fraction=0.2, clean_k=5).fit(train)
        assert fitted_on_cpu.decision_function(queries.to("mps")).device.type == "mps"
        assert fitted_on_cpu.predict_proba(queries.to("mps")).device.type == "mps"
        counts = torch.randint(0, 2**30, (60, 3), generator=g)  # integers beyond float32's 2**24: kept in float64
        large = DN2Detector(k=2).fit(counts.to("mps")).decision_function(counts[:4].to("mps"))
    assert large.device.type == "cpu" and large.dtype == torch.float64  # float64 scores cannot live on MPS
    assert torch.equal(large, DN2Detector(k=2).fit(counts).decision_function(counts[:4]))
    assert torch.equal(scores, expected)


def test_a_detector_fitted_on_mps_gives_probabilities_of_float64_rows():
    # predict_proba compared the float64 rows' scores with the training scores cast to float64 on the device: a
    # detector fitted on MPS features stopped at NumPy's default float64 rows ("Cannot convert a MPS Tensor to float64")
    g = torch.Generator().manual_seed(2)
    train, queries = torch.randn(80, 5, generator=g), torch.randn(12, 5, generator=g).double() * 2
    expected = DN2Detector(k=2).fit(train).predict_proba(queries)
    with fake_mps():
        detector = DN2Detector(k=2).fit(train.to("mps"))
        from_numpy = detector.predict_proba(queries.numpy())
        from_tensor = detector.predict_proba(queries)
    assert from_tensor.device.type == "cpu"  # on X's device, as documented
    assert torch.equal(torch.from_numpy(from_numpy), expected)
    assert torch.equal(from_tensor, expected)


def test_exact_knn_of_mps_queries_in_a_float64_bank_keeps_float64_distances_on_the_cpu():
    # the float64 distances of a float64 bank were sent back to the queries' device, which has no float64: every
    # search of MPS queries in a float64 bank (plain or prepared) raised "Cannot convert a MPS Tensor to float64"
    g = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(9, 6, generator=g), torch.randn(70, 6, generator=g).double()
    expected = brute_force_knn(queries, bank, 3)
    with fake_mps():
        for b in (bank, prepare_bank(bank)):
            found = knn_distances(queries.to("mps"), b, 3)
            assert found.values.device.type == "cpu" and found.indices.device.type == "cpu"
            assert found.values.dtype == torch.float64
            assert torch.equal(found.indices, expected.indices)
            torch.testing.assert_close(found.values, expected.values, rtol=1e-12, atol=1e-12)


def test_a_checkpoint_with_maps_loaded_onto_mps_scores_and_maps_as_on_the_cpu(tmp_path):
    dm = BlobDataModule()

    def model() -> DN2Module:
        return DN2Module(
            k=2, backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "3"], map_images=4, reports=False
        )

    cpu = model()
    trainer = quiet_trainer()
    trainer.fit(cpu, dm)
    trainer.save_checkpoint(tmp_path / "maps.ckpt")
    expected = cpu.score_images(dm.test_images[:6])
    predicted = torch.cat([out["anomaly_map"] for out in quiet_trainer().predict(cpu, dm)])
    with fake_mps():
        loaded = DN2Module.load_from_checkpoint(tmp_path / "maps.ckpt", backbone=tiny_conv(), map_location="mps")
        assert next(loaded.backbone.parameters()).device.type == "mps"
        assert {b.device.type for b in (*loaded.bank.buffers(), *loaded.maps.bank.buffers())} == {"cpu"}
        scored = loaded.score_images(dm.test_images[:6])
        maps = torch.cat([out["anomaly_map"].cpu() for out in mps_trainer().predict(loaded, dm)])
    assert torch.equal(scored.scores, expected.scores)
    assert torch.equal(scored.anomaly_maps, expected.anomaly_maps)
    assert torch.equal(maps, predicted)

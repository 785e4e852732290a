"""What users reach beyond the datamodules: joined datasets, their own transforms and loaders, thresholds carried
by checkpoints, point-wise group scoring, maps checkpoints, several or empty loaders. Each answer is the
number a user would see, compared with an independent brute force, or a clear error."""

from __future__ import annotations

import functools
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import BlobDataModule, BlobWithValDataModule, DictDataset, dn2_messages, linear_backbone, quiet_trainer
from sklearn.metrics import roc_auc_score
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from dn2_lightning import DN2Detector, DN2Module, GroupDataModule, OneClassDataModule
from dn2_lightning.cli import build_cli
from dn2_lightning.data import Renumbered

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def brute_force_scores(model: DN2Module, bank_images: torch.Tensor, images: torch.Tensor, k: int) -> np.ndarray:
    with torch.no_grad():
        bank = model.backbone(bank_images).double().numpy()
        queries = model.backbone(images).double().numpy()
    distances = ((queries[:, None] - bank[None]) ** 2).sum(-1)
    return np.sort(distances, axis=1)[:, :k].mean(1)


def test_a_concat_dataset_numbered_twice_is_refused_and_renumbered_scores_every_sample():
    a, b = BlobDataModule(seed=0), BlobDataModule(seed=1, n_train=37, n_normal=9, n_anomalous=5)
    train = ConcatDataset([DictDataset(dm.train_images, torch.zeros(len(dm.train_images))) for dm in (a, b)])
    test = ConcatDataset([DictDataset(dm.test_images, dm.test_labels) for dm in (a, b)])
    model = DN2Module(k=2, backbone=linear_backbone())
    with pytest.raises(ValueError, match=r"37 of 138 training samples share their dataset 'index'.*Renumbered"):
        quiet_trainer().fit(model, train_dataloaders=DataLoader(train, batch_size=16))

    model = DN2Module(k=2, backbone=linear_backbone())
    quiet_trainer().fit(model, train_dataloaders=DataLoader(Renumbered(train), batch_size=16))
    assert len(model.bank) == 138
    with pytest.raises(ValueError, match=r"14 of 85 scored samples share"):
        quiet_trainer().test(model, dataloaders=DataLoader(test, batch_size=16))
    quiet_trainer().test(model, dataloaders=DataLoader(Renumbered(test), batch_size=16))
    images = torch.cat([a.test_images, b.test_images])
    expected = brute_force_scores(model, torch.cat([a.train_images, b.train_images]), images, 2)
    assert torch.equal(model.test_scores.indices, torch.arange(85))
    np.testing.assert_allclose(model.test_scores.scores.numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "transform, match",
    [
        (lambda x: (x - 0.5) / 0.25, r"float images must hold values in \[0, 1\].*drop transforms.Normalize"),
        (lambda x: x * 255, r"got \[0.*, 15\d\].*divide 0..255 floats by 255"),
        (lambda x: (x * 255).long(), r"must be uint8 \(0..255\) or float \(0..1\), got torch.int64"),
        (
            lambda x: x.index_fill(0, torch.tensor([3]), float("nan")),
            r"NaN or Inf in input images in batch 0 at positions \[3\]",
        ),
    ],
    ids=["normalised", "0-255 floats", "int64", "nan"],
)
def test_images_the_backbone_would_misread_are_refused_in_the_dataloader_path(transform, match):
    dm = BlobDataModule()
    loader = DataLoader(TensorDataset(transform(dm.train_images), torch.zeros(len(dm.train_images))), batch_size=16)
    with pytest.raises(ValueError, match=match):
        quiet_trainer().fit(DN2Module(k=2, backbone=linear_backbone()), train_dataloaders=loader)


def test_a_uint8_loader_of_zeros_and_ones_warns_that_its_images_read_nearly_black():
    dm = BlobDataModule()
    binary = (dm.train_images > 0.3).to(torch.uint8)  # masks, or [0, 1] floats cast to uint8
    assert int(binary.max()) == 1
    model = DN2Module(k=2, backbone=linear_backbone())
    with pytest.warns(UserWarning, match="uint8 images of 0s and 1s only"):
        quiet_trainer().fit(model, train_dataloaders=DataLoader(TensorDataset(binary), batch_size=16))
    with pytest.warns(UserWarning, match="uint8 images of 0s and 1s only"):
        quiet_trainer().test(model, dataloaders=DataLoader(TensorDataset(binary[:8], torch.zeros(8)), batch_size=8))
    with warnings.catch_warnings(record=True) as caught:  # 0..255 images, and a batch of black images: no warning
        warnings.simplefilter("always")
        quiet_trainer().fit(DN2Module(k=2, backbone=linear_backbone()), dm)
        quiet_trainer().predict(model, DataLoader(TensorDataset(torch.zeros_like(binary[:4])), batch_size=4))
    assert not [w for w in caught if "0s and 1s" in str(w.message)]


def test_an_empty_uint8_batch_is_scored_as_none():
    """A collate_fn that filters every sample of a batch out (unreadable files, say) gives an empty batch: a uint8 one
    stopped predict with ``amax(): Expected reduction dim`` (the 0s-and-1s check took its max), where a float one, and
    the same loader before that check, scored the other batches: [8, 0, 8, ...]."""
    dm = BlobDataModule()
    train, test = ((x * 255).round().to(torch.uint8) for x in (dm.train_images, dm.test_images))
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().fit(model, train_dataloaders=DataLoader(DictDataset(train, torch.zeros(len(train))), batch_size=16))

    def collate(items: list) -> dict:
        batch = torch.utils.data.default_collate(items)
        return {key: value[:0] for key, value in batch.items()} if int(batch["index"][0]) == 8 else batch

    loader = DataLoader(DictDataset(test, dm.test_labels), batch_size=8, collate_fn=collate)
    outputs = quiet_trainer().predict(model, loader)
    assert [len(out["score"]) for out in outputs][:3] == [8, 0, 8]


def test_a_shuffled_loader_without_indices_warns_that_neighbour_indices_are_positions_read():
    dm = BlobDataModule()
    dataset = TensorDataset(dm.train_images, torch.zeros(len(dm.train_images)))
    model = DN2Module(k=2, backbone=linear_backbone())
    with pytest.warns(UserWarning, match="does not read in order .* carry no 'index'"):
        quiet_trainer().fit(model, train_dataloaders=DataLoader(dataset, batch_size=16, shuffle=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer().fit(model, train_dataloaders=DataLoader(dataset, batch_size=16))
    assert not [w for w in caught if "carry no 'index'" in str(w.message)]  # read in order: nothing to warn about
    scores = model.score_images(dm.train_images[:5])
    assert scores.neighbours[:, 0].tolist() == [0, 1, 2, 3, 4]
    # predict: Lightning moves the loader's RandomSampler into its batch sampler (loader.sampler is sequential)
    with pytest.warns(UserWarning, match="does not read in order .* carry no 'index'"):
        quiet_trainer().predict(
            model, dataloaders=DataLoader(TensorDataset(dm.test_images), batch_size=8, shuffle=True)
        )


def test_the_threshold_saved_by_set_threshold_is_used_by_cli_ckpt_path_runs(tmp_path):
    common = [
        "--config",
        "configs/digits.yaml",
        "--model.input_size=32",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ]
    fit = build_cli(["fit", *common])
    model = DN2Module.load_from_checkpoint(fit.trainer.checkpoint_callback.best_model_path)
    model.set_threshold(value=2000.0)
    trainer = quiet_trainer()
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "fixed.ckpt")
    assert DN2Module.load_from_checkpoint(tmp_path / "fixed.ckpt").threshold == 2000.0
    # a quantile asked for replaces it, from Python as from the command line (it kept 2000.0)
    requantiled = DN2Module.load_from_checkpoint(tmp_path / "fixed.ckpt", threshold_quantile=0.9)
    expected = float(np.quantile(requantiled.bank.loo_scores.double().numpy(), 0.9))
    assert requantiled.hparams.threshold is None and float(requantiled.threshold) == pytest.approx(expected, rel=1e-6)

    with dn2_messages() as messages:
        predict = build_cli(["predict", *common, f"--ckpt_path={tmp_path / 'fixed.ckpt'}"])
    assert float(predict.model.threshold) == 2000.0
    bank = len(predict.model.bank)
    assert any(f"samples scored against a bank of {bank} embeddings" in line for line in messages), messages
    flagged = predict.model.predict_scores.scores > 2000.0
    assert torch.equal(predict.model.predict_scores.is_anomaly, flagged)
    # a threshold given by the run wins over the checkpoint's
    quantile = build_cli(
        ["predict", *common, f"--ckpt_path={tmp_path / 'fixed.ckpt'}", "--model.threshold_quantile=0.9"]
    )
    assert quantile.model.hparams.threshold is None and quantile.model.hparams.threshold_quantile == 0.9
    # also when the value given is DN2Module's default
    default = build_cli(
        ["predict", *common, f"--ckpt_path={tmp_path / 'fixed.ckpt'}", "--model.threshold_quantile=0.99"]
    )
    assert default.model.hparams.threshold is None and default.model.hparams.threshold_quantile == 0.99
    # a fixed value is a score at the k it was set for: another k keeps it, and says so (it was silent: a reviewer
    # saw 18 of 72 normal digits flagged at k=50 with k=2's value, 2 of 72 at k=2)
    with pytest.warns(UserWarning, match=r"threshold=2000 is a fixed score set for k=2 scores, .* k=5"):
        assert float(DN2Module.load_from_checkpoint(tmp_path / "fixed.ckpt", k=5).threshold) == 2000.0
    with pytest.warns(UserWarning, match=r"threshold=2000 is a fixed score set for k=2 scores, .* k=5"):
        build_cli(["predict", *common, f"--ckpt_path={tmp_path / 'fixed.ckpt'}", "--model.k=5"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DN2Module.load_from_checkpoint(tmp_path / "fixed.ckpt", k=5, threshold=2500.0)  # a value for k=5: quiet
    assert not [w for w in caught if "fixed score" in str(w.message)]


def _fixed_score_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "fixed score" in str(w.message)]


def test_the_console_explains_the_threshold_once_and_then_gives_its_value():
    """Building the bank and testing in one run said the threshold's whole explanation twice, and the bank's size
    line repeated its size when nothing was cleaned."""
    model, dm = DN2Module(k=2, backbone=linear_backbone(), reports=False), BlobDataModule()
    with dn2_messages() as messages:
        quiet_trainer().fit(model, datamodule=dm)
        quiet_trainer().test(model, datamodule=dm)
        quiet_trainer().predict(model, datamodule=dm)
    value = f"threshold {float(model.threshold):.6g}"
    explained = [m for m in messages if f"{value} (quantile 0.99 of the training images' leave-one-out" in m]
    assert len(explained) == 1 and "memory bank of 101 embeddings" in explained[0], messages
    assert sum(m.endswith(f"{value} (as above).") for m in messages) == 2, messages
    assert not any("bank/size_before_cleaning" in m for m in messages), messages
    with dn2_messages() as messages:  # asked for by the user: explained again
        model.set_threshold(quantile=0.9)
        quiet_trainer().test(model, datamodule=dm)
    # about (101 x 0.1 + 0.9) / 102 of normal images, the expected share above the 0.9 quantile of 101 scores
    assert "(quantile 0.9 of the training images' leave-one-out scores: about 10.8% of" in messages[0], messages
    assert messages[1].endswith("(as above)."), messages
    unsupervised = DN2Module(k=2, backbone=linear_backbone(), reports=False, clean_fraction=0.2)
    with dn2_messages() as messages:  # the cleaning's figures are still said
        quiet_trainer().fit(unsupervised, datamodule=dm)
    assert any("bank/removed=20" in m and "bank/size_before_cleaning=101" in m for m in messages), messages
    for pooling in ("mean", "none"):  # a bank of groups: its threshold is said of groups, not images
        groups = DN2Module(k=2, backbone=linear_backbone(in_features=3 * 8 * 8), reports=False, group_pooling=pooling)
        dm = GroupDataModule(dataset="digits", group_size=3, n_train_groups=20, n_test_groups=10, seed=0)
        with dn2_messages() as messages:
            quiet_trainer().fit(groups, datamodule=dm)
        bank_line = next(m for m in messages if "memory bank of" in m)
        # (20 x 0.01 + 0.99) / 21: the expected share above the 0.99 quantile of 20 scores
        assert "training groups' leave-one-out scores: about 5.67% of normal groups are flagged" in bank_line, bank_line


def test_as_above_follows_only_the_modules_own_threshold_line():
    """Two models in one process: after model B explained its threshold, model A's next line said "threshold ...
    (as above)", pointing at B's different threshold."""
    a = DN2Module(k=2, backbone=linear_backbone(0), reports=False)
    b = DN2Module(k=2, backbone=linear_backbone(1), reports=False)
    dm_a, dm_b = BlobDataModule(seed=0), BlobDataModule(seed=1)
    quiet_trainer().fit(a, datamodule=dm_a)
    quiet_trainer().fit(b, datamodule=dm_b)
    assert f"{float(a.threshold):.6g}" != f"{float(b.threshold):.6g}"
    with dn2_messages() as messages:
        quiet_trainer().test(a, datamodule=dm_a)
        quiet_trainer().test(b, datamodule=dm_b)
        quiet_trainer().test(b, datamodule=dm_b)
    explained = f"threshold {float(a.threshold):.6g} (quantile 0.99 of the training images' leave-one-out scores"
    assert explained in messages[0], messages  # B explained its threshold since A's last line
    assert "(quantile 0.99 of the training images' leave-one-out" in messages[1], messages
    assert messages[2].endswith(f"threshold {float(b.threshold):.6g} (as above)."), messages  # its own line above


def test_a_module_loaded_in_another_process_says_its_threshold_in_full(tmp_path):
    """ "(as above)" matched a module's saved line number against another process's count: a module pickled after
    its line, loaded where another module had said one line, said "threshold 1.5 (as above)" under that other line."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    a = DN2Module(k=2, backbone=linear_backbone(0), threshold=1.5, reports=False)
    assert "(as above)" not in a._say_threshold()
    torch.save(a, tmp_path / "a.pt")
    code = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from helpers import linear_backbone\n"
        "from dn2_lightning import DN2Module\n"
        "print(DN2Module(k=2, backbone=linear_backbone(1), threshold=7.0, reports=False)._say_threshold())\n"
        f"print(torch.load({str(tmp_path / 'a.pt')!r}, weights_only=False)._say_threshold())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and len(lines) == 2, done.stderr[-2000:]
    assert lines[0].startswith("threshold 7 (") and "(as above)" not in lines[1], lines
    assert lines[1].startswith("threshold 1.5 ("), lines


def test_score_images_says_when_a_fixed_threshold_meets_another_k():
    """An evaluation run warned that a fixed threshold (a score at k=2) now meets k=5 scores; score_images, the same
    decisions without a Trainer, flagged by it silently."""
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().fit(model, datamodule=dm)
    model.set_threshold(value=float(np.median(model.score_images(dm.test_images).scores.numpy())))
    model.hparams.k = 5
    with pytest.warns(UserWarning, match=r"is a fixed score set for k=2 scores, but this model scores with k=5"):
        scored = model.score_images(dm.test_images)
    assert torch.equal(scored.is_anomaly, scored.scores > scored.threshold)  # still the value: said, not changed


def test_a_fixed_threshold_travels_with_a_plain_state_dict(tmp_path):
    """The threshold lived only in the hyperparameters: DN2Module(...).load_state_dict(other.state_dict()) (the path
    dn2 advises for files of torch.save(model.state_dict())) scored with the quantile threshold instead of the value
    set, and flipped decisions without a word."""
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().fit(model, datamodule=dm)
    value = float(np.median(model.score_images(dm.test_images).scores.numpy()))
    model.set_threshold(value=value)
    expected = model.score_images(dm.test_images)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    copy = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    with dn2_messages() as messages:
        copy.load_state_dict(torch.load(tmp_path / "weights.pt"))  # weights-only
    assert float(copy.threshold) == value and any(f"fixed threshold {value:.6g}" in m for m in messages), messages
    got = copy.score_images(dm.test_images)
    assert torch.equal(got.scores, expected.scores) and torch.equal(got.is_anomaly, expected.is_anomaly)
    assert "fixed_threshold" not in copy.bank.spec  # a record in the state dict, not a setting of the bank
    own = DN2Module(k=2, backbone=linear_backbone(), reports=False, threshold=1.0)  # a module's own threshold wins
    own.load_state_dict(model.state_dict())
    assert float(own.threshold) == 1.0
    model.set_threshold(quantile=0.9)  # a quantile follows the bank: nothing is recorded
    quantile = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quantile.load_state_dict(model.state_dict())
    assert quantile.hparams.threshold is None and quantile.hparams.threshold_quantile == 0.99


def test_a_fixed_threshold_travels_with_the_state_dict_of_a_parent_module(tmp_path):
    """The record was written and read by DN2Module's own state_dict/load_state_dict, which a parent module (or
    torch.compile's wrapper) never calls: the parent's load left the quantile threshold in force and the record in
    the bank's spec, from where it leaked into the next state dict. A prefix given positionally was ignored."""
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().fit(model, datamodule=dm)
    quantile_threshold = float(model.threshold)
    value = float(np.median(model.score_images(dm.test_images).scores.numpy()))
    model.set_threshold(value=value)
    parent = torch.nn.ModuleDict({"detector": model})
    state = parent.state_dict()
    assert state["detector.bank._extra_state"]["fixed_threshold"] == {"value": value, "k": 2}
    assert model.state_dict(None, "outer.")["outer.bank._extra_state"]["fixed_threshold"]["value"] == value
    fresh = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    torch.nn.ModuleDict({"detector": fresh}).load_state_dict(state)
    assert float(fresh.threshold) == value != quantile_threshold
    assert "fixed_threshold" not in fresh.bank.spec
    fresh.set_threshold(quantile=0.99)  # nothing left behind to come back in the next state dict
    again = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    again.load_state_dict(fresh.state_dict())
    assert again.hparams.threshold is None and float(again.threshold) == pytest.approx(quantile_threshold)


def test_a_failed_checkpoint_restore_leaves_the_next_state_dict_load_as_it_is(tmp_path):
    """A ckpt_path restore that stopped with an error left a flag telling the next load_state_dict to ignore the
    state dict's fixed threshold."""
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=dm)
    model.set_threshold(value=0.25)
    trainer.save_checkpoint(tmp_path / "fitted.ckpt")
    checkpoint = torch.load(tmp_path / "fitted.ckpt", weights_only=True)
    checkpoint["state_dict"]["bank.embeddings"] = checkpoint["state_dict"]["bank.embeddings"][:, :3]
    checkpoint["state_dict"]["bank.removed"] = checkpoint["state_dict"]["bank.removed"][:, :3]
    torch.save(checkpoint, tmp_path / "other_dim.ckpt")
    other = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    with pytest.raises(ValueError, match="holds 3-d"):
        quiet_trainer().test(other, datamodule=dm, ckpt_path=tmp_path / "other_dim.ckpt")
    other.load_state_dict(model.state_dict())
    assert float(other.threshold) == 0.25


def test_fixed_threshold_keeps_the_k_it_was_set_for(tmp_path):
    """A checkpoint recorded the k in force when saved, not the k the value was set for: set at k=2, loaded with k=5
    and saved again, it said k=5, so loading it at k=5 was quiet and at k=2 warned (both the wrong way round)."""
    dm, backbone = BlobDataModule(), linear_backbone()
    model = DN2Module(k=2, backbone=backbone)
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=dm)
    model.set_threshold(value=0.3)
    trainer.save_checkpoint(tmp_path / "k2.ckpt")
    with pytest.warns(UserWarning, match=r"threshold=0.3 is a fixed score set for k=2 scores, .* k=5"):
        moved = DN2Module.load_from_checkpoint(tmp_path / "k2.ckpt", k=5, backbone=backbone)
    trainer = quiet_trainer()
    trainer.test(moved, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "k5.ckpt")
    assert torch.load(tmp_path / "k5.ckpt", weights_only=True)["dn2_threshold"] == {"value": 0.3, "k": 2}
    with pytest.warns(UserWarning, match=r"threshold=0.3 is a fixed score set for k=2 scores, .* k=5"):
        DN2Module.load_from_checkpoint(tmp_path / "k5.ckpt", backbone=backbone)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = DN2Module.load_from_checkpoint(tmp_path / "k5.ckpt", k=2, backbone=backbone)
    assert not _fixed_score_warnings(caught) and back.hparams.k == 2 and float(back.threshold) == pytest.approx(0.3)
    # a new value is set for the k in force; k changed in the same process after it is said at the next evaluation
    model.set_threshold(value=0.4)
    model.hparams.k = 5
    with pytest.warns(UserWarning, match=r"threshold=0.4 is a fixed score set for k=2 scores, .* k=5"):
        quiet_trainer().test(model, datamodule=dm)
    model.set_threshold(value=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer().test(model, datamodule=dm)
    assert not _fixed_score_warnings(caught)


def test_settings_built_in_at_construction_are_refused_when_edited_in_hparams(tmp_path):
    """group_temperature edited in hparams after construction was recorded with the bank and the checkpoint while the
    pooling kept 0.3: the model scored 0.6775 AUROC, its own reloaded checkpoint 0.6025. Live settings (k) still
    follow edits, and are checked as at construction."""
    dm = GroupDataModule(dataset="digits", group_size=4, n_train_groups=12, n_test_groups=12, seed=0, batch_size=16)
    model = DN2Module(k=2, backbone=linear_backbone(in_features=3 * 64 * 64), group_pooling="histogram",
                      group_clusters=3, input_size=64)  # fmt: skip
    model.hparams.group_temperature = 1.0
    with pytest.raises(ValueError, match=r"hparams.group_temperature was changed to 1.0 .* built with 0.3"):
        quiet_trainer().fit(model, datamodule=dm)
    with pytest.raises(
        ValueError, match=r"hparams.group_temperature .* build and fit a new DN2Module\(group_temperature=...\)"
    ):
        model.score_images(torch.rand(2, 3, 8, 8))
    model.hparams.group_temperature = 0.3
    model.hparams.k = 0
    with pytest.raises(ValueError, match=r"\bk\b"):
        quiet_trainer().test(model, datamodule=dm)
    model.hparams.k = 3
    quiet_trainer().test(model, datamodule=dm)
    assert model.test_scores is not None and len(model.test_scores) == 12
    # map settings are read by the maps head at construction: a load_from_checkpoint override is the fix, no refit
    from test_maps import tiny_conv

    maps = DN2Module(backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "3"], reports=False)
    maps.hparams.map_sigma = 1.0
    with pytest.raises(ValueError, match=r"hparams.map_sigma .*\.load_from_checkpoint\(path, map_sigma=...\)"):
        maps.score_images(torch.rand(1, 3, 32, 32))
    maps.hparams.map_sigma, maps.hparams.max_memory_bytes = 4.0, 2**20
    with pytest.raises(RuntimeError, match="no memory bank|fit"):
        maps.score_images(torch.rand(1, 3, 32, 32))
    assert maps.maps.max_memory_bytes == 2**20  # the patch search follows the live setting, as the image search does


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_no_shipped_config_sets_a_threshold(config):
    # configs/folder.yaml set threshold_quantile: 0.99, so README's own `dn2 test|predict --config configs/folder.yaml
    # --ckpt_path=...` replaced a threshold saved with set_threshold (408 vs 657 images flagged)
    model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
    assert not {"threshold", "threshold_quantile"} & set(model.get("init_args", model)), config


def real_member_rows(model: DN2Module, groups) -> tuple[np.ndarray, np.ndarray]:
    """The embeddings (float64) of the real members of ``PaddedGroups`` of 4, and the group of each."""
    with torch.no_grad():
        members = model.backbone(groups.images.flatten(0, 1)).double().numpy()
    real = groups.mask.flatten().numpy()
    return members[real], np.repeat(np.arange(len(groups.images)), 4)[real]


def test_point_wise_group_scores_are_thresholded_on_per_group_leave_one_out_scores():
    from test_group_pooling import PaddedGroups

    train = PaddedGroups(60, fill=0.0, seed=0)
    model = DN2Module(k=2, backbone=linear_backbone(), group_pooling="none", threshold_quantile=0.9)
    quiet_trainer().fit(model, train_dataloaders=DataLoader(train, batch_size=8))
    # reference: every real member's score over the members of the other groups (a test group's members are never
    # in the bank, so a training group leaves itself out); a group's is its worst member's
    rows, group_of = real_member_rows(model, train)
    distances = ((rows[:, None] - rows[None]) ** 2).sum(-1)
    distances[group_of[:, None] == group_of[None]] = np.inf
    member_loo = np.sort(distances, axis=1)[:, :2].mean(1)
    group_loo = np.array([member_loo[group_of == g].max() for g in range(60)])
    np.testing.assert_allclose(model.bank.loo_scores.numpy(), np.sort(group_loo), rtol=1e-5)
    assert float(model.threshold) == pytest.approx(np.quantile(group_loo, 0.9), rel=1e-5)


class GroupsSharingImages(torch.utils.data.Dataset):
    """Groups of 4 images drawn with replacement from a pool of 50, as GroupDataModule draws members: different
    groups share images. Samples carry each member's pool index as ``members``."""

    def __init__(self, n: int = 60, pool: int = 50) -> None:
        g = torch.Generator().manual_seed(3)
        self.pool = torch.rand(pool, 3, 8, 8, generator=g) * 0.6
        self.members = torch.randint(pool, (n, 4), generator=g)

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, i: int) -> dict:
        members = self.members[i]
        return {"image": self.pool[members], "label": torch.tensor(0), "index": torch.tensor(i), "members": members}


def test_point_wise_group_threshold_also_leaves_out_copies_of_a_members_image_in_other_groups(tmp_path):
    # a member's copy in another training group is at distance 0: the threshold was far too low (digits, M = 4,
    # q = 0.95: 18.5% of normal test groups flagged instead of about 5%)
    train = GroupsSharingImages()
    model = DN2Module(k=2, backbone=linear_backbone(), group_pooling="none", threshold_quantile=0.9, reports=False)
    trainer = quiet_trainer()
    trainer.fit(model, train_dataloaders=DataLoader(train, batch_size=8))
    with torch.no_grad():
        pool = model.backbone(train.pool).double().numpy()

    def reference(k: int) -> np.ndarray:
        source = train.members.flatten().numpy()
        group_of = np.repeat(np.arange(len(train)), 4)
        distances = ((pool[source][:, None] - pool[source][None]) ** 2).sum(-1)
        distances[(group_of[:, None] == group_of[None]) | (source[:, None] == source[None])] = np.inf
        member_loo = np.sort(distances, axis=1)[:, :k].mean(1)
        return np.sort([member_loo[group_of == g].max() for g in range(len(train))])

    np.testing.assert_allclose(model.bank.loo_scores.numpy(), reference(2), rtol=1e-5)
    assert float(model.threshold) == pytest.approx(np.quantile(reference(2), 0.9), rel=1e-5)
    trainer.save_checkpoint(tmp_path / "groups.ckpt")  # a checkpoint at another k: the same rule
    loaded = DN2Module.load_from_checkpoint(tmp_path / "groups.ckpt", backbone=linear_backbone(), k=3)
    assert float(loaded.threshold) == pytest.approx(np.quantile(reference(3), 0.9), rel=1e-5)


def test_a_maps_checkpoint_loads_without_maps_and_a_plain_one_refuses_maps(tmp_path):
    dm = OneClassDataModule(dataset="digits", normal_class=0, batch_size=128)
    options = dict(k=2, backbone="efficientnet_lite0", input_size=32, reports=False, map_images=3)
    for maps in (True, False):
        trainer = quiet_trainer(default_root_dir=tmp_path / str(maps), enable_checkpointing=True)
        trainer.fit(DN2Module(**options, anomaly_maps=maps), datamodule=dm)
        (tmp_path / f"maps_{maps}.ckpt").write_bytes(open(trainer.checkpoint_callback.best_model_path, "rb").read())
    plain = DN2Module.load_from_checkpoint(tmp_path / "maps_True.ckpt", anomaly_maps=False)
    assert plain.maps is None
    reference = DN2Module.load_from_checkpoint(tmp_path / "maps_False.ckpt")
    dm.setup("test")
    images = torch.stack([dm.test_dataset[i]["image"] for i in range(20)])
    torch.testing.assert_close(plain.score_images(images).scores, reference.score_images(images).scores)
    with pytest.raises(ValueError, match=r"anomaly_maps=True, but the checkpoint was fitted with anomaly_maps=False"):
        DN2Module.load_from_checkpoint(tmp_path / "maps_False.ckpt", anomaly_maps=True)


def test_several_test_dataloaders_and_an_empty_train_loader_are_clear_errors():
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone())
    quiet_trainer().fit(model, datamodule=dm)
    with pytest.raises(ValueError, match=r"one dataloader per trainer.test\(\) call"):
        quiet_trainer().test(model, dataloaders=[dm.test_dataloader(), dm.test_dataloader()])
    empty = DataLoader(DictDataset(dm.train_images[:0], torch.zeros(0)), batch_size=4)
    with pytest.raises(ValueError, match="fit read no training batches"):
        quiet_trainer().fit(DN2Module(k=2, backbone=linear_backbone()), train_dataloaders=empty)


def test_one_dataloader_in_a_list_or_dict_is_read_and_checked_as_itself(tmp_path):
    """Lightning keeps the container it was given: checks that read trainer.test_dataloaders saw a list, so an
    ImageFolder's inverted class indices gave AUROC 0.0 for 1.0 (the bare loader is refused), drop_last and shuffling
    went unsaid; train_dataloader() returning [loader] failed with "batch images must be [B, C, H, W]"."""
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import TensorDataset

    dm = BlobDataModule()
    bare = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().fit(bare, train_dataloaders=dm.train_dataloader())
    wrapped = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().fit(wrapped, train_dataloaders=[dm.train_dataloader()])
    torch.testing.assert_close(wrapped.bank.embeddings, bare.bank.embeddings)
    from_datamodule = DN2Module(k=2, backbone=linear_backbone(), reports=False)

    class ListDataModule(BlobDataModule):
        def train_dataloader(self):
            return {"only": super().train_dataloader()}

    quiet_trainer().test(from_datamodule, datamodule=ListDataModule())
    torch.testing.assert_close(from_datamodule.bank.embeddings, bare.bank.embeddings)
    test = TensorDataset(dm.test_images, dm.test_labels)
    with pytest.warns(UserWarning, match="drop_last=True: its last 7 samples are not scored"):
        quiet_trainer().test(bare, dataloaders=[DataLoader(test, batch_size=16, drop_last=True)])
    with pytest.warns(UserWarning, match="does not read in order .* carry no 'index'"):
        quiet_trainer().test(bare, dataloaders={"a": DataLoader(test, batch_size=16, shuffle=True)})
    for both in ({"a": dm.train_dataloader(), "b": dm.train_dataloader()}, [dm.train_dataloader()] * 2):
        with pytest.raises(ValueError, match=r"one dataloader per trainer.fit\(\) call"):
            quiet_trainer().fit(DN2Module(k=2, backbone=linear_backbone()), train_dataloaders=both)
    # a CombinedLoader of one in a mode that wraps its batches ({"a": batch})
    from lightning.pytorch.utilities import CombinedLoader

    combined = CombinedLoader({"a": dm.test_dataloader()}, "max_size_cycle")
    quiet_trainer().test(wrapped, dataloaders=combined)
    quiet_trainer().test(bare, datamodule=dm)
    torch.testing.assert_close(wrapped.test_scores.scores, bare.test_scores.scores)
    # cleaning's bank/* metrics reach the logger whatever log_every_n_steps (they were logged on one step only)
    cleaned = DN2Module(k=2, backbone=linear_backbone(), clean_fraction=0.2, clean_k=3, reports=False)
    quiet_trainer(logger=CSVLogger(tmp_path)).fit(cleaned, datamodule=dm)
    rows = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("bank/removed,bank/size,bank/size_before_cleaning") and rows[1].startswith(
        "20.0,81.0,101.0"
    )


def test_a_cleaned_fit_resumed_from_a_capped_checkpoint_reads_its_pass_again_and_logs_it(tmp_path):
    # the pass read again in on_fit_end logged bank/* there, where Lightning refuses self.log: the fit crashed
    from lightning.pytorch.loggers import CSVLogger

    dm = BlobDataModule()
    options = dict(k=2, backbone=linear_backbone(), clean_fraction=0.2, clean_k=3, reports=False)
    capped = quiet_trainer(limit_train_batches=2, max_epochs=1)
    capped.fit(DN2Module(**options), datamodule=dm)
    capped.save_checkpoint(tmp_path / "capped.ckpt")
    model = DN2Module(**options)  # its one epoch is done: the pass is read again once the fit ends
    trainer = quiet_trainer(logger=CSVLogger(tmp_path), max_epochs=1)
    trainer.fit(model, datamodule=dm, ckpt_path=tmp_path / "capped.ckpt")
    assert len(model.bank) + len(model.bank.removed) == 101 and len(model.bank) == 81
    rows = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    assert any(row.startswith("20.0,81.0,101.0") for row in rows[1:]), rows


def test_a_single_test_or_predict_sample_keeps_its_shape_and_score():
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone())
    quiet_trainer().fit(model, datamodule=dm)
    one = DataLoader(DictDataset(dm.test_images[:1], dm.test_labels[:1]), batch_size=4)
    expected = brute_force_scores(model, dm.train_images, dm.test_images[:1], 2)
    quiet_trainer().test(model, dataloaders=one)
    quiet_trainer().predict(model, dataloaders=one)
    for scores in (model.test_scores, model.predict_scores):
        assert scores.indices.tolist() == [0] and scores.neighbours.shape == (1, 2)
        np.testing.assert_allclose(scores.scores.numpy(), expected, rtol=1e-5)


def test_a_bank_build_that_fails_part_way_leaves_no_partial_bank():
    broken, good = BlobDataModule(), BlobDataModule()
    broken.train_images = broken.train_images.clone()
    broken.train_images[40, 0, 0, 0] = float("nan")  # batch 2 of 16
    model = DN2Module(k=2, backbone=linear_backbone())
    with pytest.raises(ValueError, match="NaN or Inf in input images in batch 2"):
        quiet_trainer().test(model, datamodule=broken)
    quiet_trainer().test(model, datamodule=good)
    assert len(model.bank) == 101
    expected = brute_force_scores(model, good.train_images, good.test_images, 2)
    np.testing.assert_allclose(model.test_scores.scores.numpy(), expected, rtol=1e-5)


def test_renumbered_names_what_it_cannot_wrap():
    with pytest.raises(ValueError, match=r"dataset must be a map-style dataset .* got a int"):
        Renumbered(5)
    with pytest.raises(ValueError, match="Renumbered wraps datasets of dict samples; sample 0 is a tuple"):
        Renumbered(TensorDataset(torch.zeros(2, 3, 4, 4)))[0]


def digits(normal_class: int | str = 0, **kwargs) -> OneClassDataModule:
    return OneClassDataModule(dataset="digits", normal_class=normal_class, batch_size=64, **kwargs)


def test_a_bank_is_never_reused_for_another_normal_class_contamination_or_groups(tmp_path):
    # a loop over classes with one module (or a class-0 checkpoint tested on class 3) scored every class against
    # the first class's bank: AUROC 0.27 instead of 0.88 on digits, without any message
    model = DN2Module(k=2, backbone=linear_backbone())
    trainer = quiet_trainer()
    trainer.test(model, datamodule=digits(0))
    first = model.test_scores.scores.clone()
    trainer.save_checkpoint(tmp_path / "class0.ckpt")
    for other, match in (
        (digits(3), r"normal_class=0 \(bank\) vs normal_class=3 \(datamodule\).*new DN2Module for each"),
        (digits(0, contamination=0.1), r"contamination=0.0 \(bank\) vs contamination=0.1"),
    ):
        with pytest.raises(ValueError, match=match):
            quiet_trainer().test(model, datamodule=other)
        loaded = DN2Module.load_from_checkpoint(tmp_path / "class0.ckpt", backbone=linear_backbone())
        with pytest.raises(ValueError, match=match):
            quiet_trainer().test(loaded, datamodule=other)
    quiet_trainer().test(model, datamodule=digits("0"))  # the same class, by name
    torch.testing.assert_close(model.test_scores.scores, first)

    fresh = DN2Module(k=2, backbone=linear_backbone())  # what the error asks for: one module per class
    quiet_trainer().test(fresh, datamodule=digits(3))
    class3 = digits(3)
    class3.setup()
    assert len(fresh.bank) == len(class3.train_dataset) != len(model.bank)


def test_a_group_bank_is_never_reused_for_other_training_groups():
    def groups(seed: int = 0, **kwargs) -> GroupDataModule:
        options = dict(dataset="digits", group_size=4, n_train_groups=30, n_test_groups=40, seed=seed)
        return GroupDataModule(**(options | kwargs))

    model = DN2Module(k=2, backbone=linear_backbone())
    quiet_trainer().test(model, datamodule=groups(0))
    with pytest.raises(ValueError, match=r"seed=0 \(bank\) vs seed=1 \(datamodule\)"):
        quiet_trainer().test(model, datamodule=groups(1))
    with pytest.raises(ValueError, match=r"built from a GroupDataModule's training data .* is a OneClassDataModule"):
        quiet_trainer().test(model, datamodule=digits(0))
    # settings that resolve to the same groups are the same training data
    everything = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().test(everything, datamodule=groups(group_size=None, held_out_classes=[8, 9]))
    quiet_trainer().test(everything, datamodule=groups(group_size=8, held_out_classes=[9, 8]))


def _digit_folder(root: Path, normal: int, anomalous: int) -> Path:
    """An MVTec-like folder of digits; file names 000.png... as in every MVTec category."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images * 255 / 16).astype(np.uint8)
    normal_rows, anomalous_rows = np.flatnonzero(data.target == normal), np.flatnonzero(data.target == anomalous)
    for folder, rows in [
        ("train/good", normal_rows[:40]),
        ("test/good", normal_rows[40:60]),
        ("test/bad", anomalous_rows[:20]),
    ]:
        (root / folder).mkdir(parents=True)
        for n, row in enumerate(rows):
            Image.fromarray(images[row]).save(root / folder / f"{n:03d}.png")
    return root


def test_a_folder_bank_is_never_reused_for_another_folders_training_images(tmp_path):
    """Fitted on one folder ("bottle"), tested with its checkpoint on another ("cable"): folders had no training
    identity, so the other folder was scored against the first one's bank without a word (a reviewer: 30 of 30
    normal images flagged). A copy of the same folder elsewhere (another machine) is the same training data."""
    import shutil

    def folder(root: Path) -> OneClassDataModule:
        return OneClassDataModule("folder", root=str(root), load_size=8, batch_size=16)

    bottle, cable = _digit_folder(tmp_path / "bottle", 0, 5), _digit_folder(tmp_path / "cable", 1, 7)
    model = DN2Module(k=2, backbone=linear_backbone(in_features=3 * 8 * 8), reports=False)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, datamodule=folder(bottle))
    trainer.save_checkpoint(tmp_path / "bottle.ckpt")
    fresh = DN2Module(k=2, backbone=linear_backbone(in_features=3 * 8 * 8), reports=False)
    with pytest.raises(
        ValueError,
        match=r"other images than those under this datamodule's root/train: train_files=.* \(bank\) vs "
        r"train_files=.*names and sizes",
    ):
        quiet_trainer().test(fresh, datamodule=folder(cable), ckpt_path=tmp_path / "bottle.ckpt")
    moved = shutil.copytree(bottle, tmp_path / "elsewhere" / "bottle")
    quiet_trainer().test(fresh, datamodule=folder(moved), ckpt_path=tmp_path / "bottle.ckpt")
    quiet_trainer().test(model, datamodule=folder(bottle))
    assert torch.equal(fresh.test_scores.scores, model.test_scores.scores)
    (moved / "train" / "good" / "000.png").unlink()  # the training images changed since the fit
    with pytest.raises(ValueError, match=r"train_images=40 \(bank\) vs train_images=39 \(datamodule\)"):
        quiet_trainer().test(fresh, datamodule=folder(moved))
    # a fit resumed from a finished one (as dn2 fit's max_epochs=1) keeps its bank: the fix is to leave ckpt_path
    # out, where the message said "fit again on this one" to a user fitting on it
    resumed = DN2Module(k=2, backbone=linear_backbone(in_features=3 * 8 * 8), reports=False)
    with pytest.raises(ValueError, match=r"fit again on this one \(without ckpt_path: a fit resumed from"):
        quiet_trainer(max_epochs=1).fit(resumed, datamodule=folder(moved), ckpt_path=tmp_path / "bottle.ckpt")
    quiet_trainer(max_epochs=1).fit(resumed, datamodule=folder(moved))  # which works
    assert len(resumed.bank) == 39


def test_a_folder_bank_counts_the_listed_training_files_whatever_can_be_read(tmp_path):
    """The fingerprint is of the files listed under root/train, not of those read: an unreadable file skipped at fit
    (on_corrupt="skip") or unreadable only later does not make the same folder "other training data"."""
    import os

    root = _digit_folder(tmp_path / "parts", 0, 5)
    (root / "train" / "good" / "broken.png").write_bytes(b"not an image")
    dm = OneClassDataModule("folder", root=str(root), load_size=8, batch_size=16)
    model = DN2Module(k=2, backbone=linear_backbone(in_features=3 * 8 * 8), reports=False)
    with pytest.warns(UserWarning, match="skipping 1 unreadable"):
        quiet_trainer().fit(model, datamodule=dm)
    assert len(model.bank) == 40 and model.bank.spec["train_set"]["train_images"] == 41
    os.chmod(root / "train" / "good" / "000.png", 0)  # unreadable now (as root it may still read: no matter)
    try:
        quiet_trainer().test(model, datamodule=OneClassDataModule("folder", root=str(root), load_size=8))
    finally:
        os.chmod(root / "train" / "good" / "000.png", 0o644)
    (root / "train" / "good" / "041.png").write_bytes((root / "train" / "good" / "000.png").read_bytes())
    with pytest.raises(
        ValueError,
        match=r"other images than those under this datamodule's root/train: .*train_images=41 \(bank\) vs "
        r"train_images=42",
    ):
        quiet_trainer().test(model, datamodule=OneClassDataModule("folder", root=str(root), load_size=8))


def test_a_synthetic_sets_bank_refuses_a_set_written_with_other_settings(tmp_path):
    """dataset="synthetic" recorded only its name: a bank fitted on a set of one seed scored a set of another seed
    (or size) at another root without a word. Its files now identify it as a folder's do; an older record without
    them is still accepted."""
    from dn2_lightning.data.synthetic import write_synthetic_defects

    def synthetic(root: Path, seed: int) -> OneClassDataModule:
        write_synthetic_defects(root, n_train=12, n_test_good=2, n_test_per_kind=1, image_size=32, seed=seed)
        return OneClassDataModule("synthetic", root=str(root), load_size=8, batch_size=16)

    model = DN2Module(k=2, backbone=linear_backbone(in_features=3 * 8 * 8), reports=False)
    quiet_trainer().fit(model, datamodule=synthetic(tmp_path / "seed0", 0))
    assert model.bank.spec["train_set"]["train_images"] == 12
    quiet_trainer().test(model, datamodule=synthetic(tmp_path / "copy", 0))  # the same set elsewhere
    with pytest.raises(ValueError, match=r"other images than those under this datamodule's root/train: train_files="):
        quiet_trainer().test(model, datamodule=synthetic(tmp_path / "seed1", 1))
    for name in ("train_images", "train_files"):  # a record from before sets listed their files
        del model.bank.spec["train_set"][name]
    quiet_trainer().test(model, datamodule=synthetic(tmp_path / "seed1", 1))
    model.bank.spec["train_set"]["dataset"] = "folder"  # other differences are still refused
    with pytest.raises(ValueError, match=r"dataset='synthetic' \(datamodule\)"):
        quiet_trainer().test(model, datamodule=synthetic(tmp_path / "seed1", 1))


def test_a_bank_that_does_not_record_its_training_data_warns_that_it_cannot_be_checked():
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().test(model, datamodule=digits(0))
    del model.bank.spec["train_set"]  # as in a checkpoint saved before banks recorded it
    with pytest.warns(UserWarning, match=r"does not record the training data .*'normal_class': 3"):
        quiet_trainer().test(model, datamodule=digits(3))


def test_the_unsupervised_threshold_scores_every_training_row_against_the_cleaned_bank(tmp_path):
    # the kept half alone (the densest rows, each against the others) set the threshold: 25-30% of normal digits
    # test images were flagged at threshold_quantile=0.99 after cleaning half the bank, not about 1%
    dm = BlobDataModule()
    options = dict(k=2, backbone=linear_backbone(), clean_fraction=0.5, clean_k=5, threshold_quantile=0.9)
    model = DN2Module(**options, reports=False)
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=dm)
    with torch.no_grad():
        rows = model.backbone(dm.train_images).double().numpy()
    distances = ((rows[:, None] - rows[None]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    cleaning = np.sort(distances, axis=1)[:, :5].mean(1)
    kept = np.zeros(len(rows), dtype=bool)
    kept[np.argsort(cleaning, kind="stable")[: len(rows) - int(np.floor(0.5 * len(rows) + 0.5))]] = True

    def reference(k: int) -> np.ndarray:  # every training row against the kept rows, without itself
        to_kept = distances[:, kept]
        return np.sort(to_kept, axis=1)[:, :k].mean(1)

    assert len(model.bank) == kept.sum() and len(model.bank.removed) == (~kept).sum()
    np.testing.assert_allclose(model.bank.loo_scores.numpy(), np.sort(reference(2)), rtol=1e-5)
    assert float(model.threshold) == pytest.approx(np.quantile(reference(2), 0.9), rel=1e-5)
    trainer.save_checkpoint(tmp_path / "cleaned.ckpt")
    loaded = DN2Module.load_from_checkpoint(tmp_path / "cleaned.ckpt", backbone=linear_backbone(), k=3)
    assert float(loaded.threshold) == pytest.approx(np.quantile(reference(3), 0.9), rel=1e-5)

    detector = DN2Detector(k=2, threshold_quantile=0.9, clean_fraction=0.5, clean_k=5).fit(rows)
    np.testing.assert_array_equal(detector.kept_, kept)
    np.testing.assert_allclose(detector.decision_scores_, reference(2), rtol=1e-9)
    assert detector.threshold_ == pytest.approx(np.quantile(reference(2), 0.9), rel=1e-9)


def test_point_wise_group_cleaning_removes_whole_groups_and_the_threshold_covers_them_too():
    train = GroupsSharingImages()
    model = DN2Module(k=2, backbone=linear_backbone(), group_pooling="none", clean_fraction=0.3, clean_k=3)
    quiet_trainer().fit(model, train_dataloaders=DataLoader(train, batch_size=8))
    with torch.no_grad():
        pool = model.backbone(train.pool).double().numpy()
    source = train.members.flatten().numpy()
    group_of = np.repeat(np.arange(len(train)), 4)
    distances = ((pool[source][:, None] - pool[source][None]) ** 2).sum(-1)
    # each member against the rows outside its group, copies of its image left out (as its threshold score)
    distances[(group_of[:, None] == group_of[None]) | (source[:, None] == source[None])] = np.inf
    # cleaning removes 30% of the groups (18 of 60), by their worst member; it removed member rows one by one,
    # each judged with its own group-mates as neighbours (while the threshold left them out)
    cleaning = np.sort(distances, axis=1)[:, :3].mean(1)
    worst = np.array([cleaning[group_of == g].max() for g in range(len(train))])
    kept_groups = np.zeros(len(train), dtype=bool)
    kept_groups[np.argsort(worst, kind="stable")[: len(train) - 18]] = True
    kept = kept_groups[group_of]
    # every member (kept or removed) against the kept rows outside its group
    member = np.sort(distances[:, kept], axis=1)[:, :2].mean(1)
    groups = np.sort([member[group_of == g].max() for g in range(len(train))])
    assert (len(model.bank), len(model.bank.removed)) == (4 * 42, 4 * 18)
    assert set((model.bank.sample_indices // 4).tolist()) == set(np.flatnonzero(kept_groups).tolist())
    np.testing.assert_allclose(model.bank.loo_scores.numpy(), groups, rtol=1e-5)


def test_removed_rows_follow_the_bank_and_checkpoints_without_them_warn(tmp_path):
    model = DN2Module(k=2, backbone=linear_backbone(), clean_fraction=0.5, clean_k=5, reports=False)
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=BlobDataModule())
    trainer.save_checkpoint(tmp_path / "cleaned.ckpt")
    checkpoint = torch.load(tmp_path / "cleaned.ckpt", weights_only=True)
    for name in ("bank.removed", "bank.removed_indices"):  # as saved before the bank kept them
        del checkpoint["state_dict"][name]
    torch.save(checkpoint, tmp_path / "older.ckpt")
    with pytest.warns(UserWarning, match="does not hold the rows that cleaning removed"):
        DN2Module.load_from_checkpoint(tmp_path / "older.ckpt", backbone=linear_backbone())
    checkpoint = torch.load(tmp_path / "cleaned.ckpt", weights_only=True)
    checkpoint["state_dict"]["bank.removed"] = checkpoint["state_dict"]["bank.removed"][:, :3]
    torch.save(checkpoint, tmp_path / "damaged.ckpt")
    with pytest.raises(ValueError, match=r"bank.removed has shape \(51, 3\)"):
        DN2Module.load_from_checkpoint(tmp_path / "damaged.ckpt", backbone=linear_backbone())
    model.bank.set(model.bank.embeddings[:10], model.bank.sample_indices[:10])  # a new bank: no stale rows
    assert len(model.bank.removed) == 0
    with pytest.raises(ValueError, match=r"removed rows \(3, 5\) and sample_indices \(3,\) must be .* D = 16"):
        model.bank.set_removed(torch.zeros(3, 5), torch.arange(3))


@pytest.mark.parametrize("with_index", [True, False])
def test_fit_resumed_mid_epoch_builds_the_whole_bank_of_a_clean_fit(tmp_path, with_index):
    """A fit that crashed mid-pass, resumed from a mid-epoch checkpoint (ModelCheckpoint every_n_train_steps):
    Lightning restarts the train iterator and feeds only the epoch's remaining batch count, so the pass is read
    again whole; the bank, its threshold and the test scores are a clean fit's, never "restored from ckpt_path"."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    class CrashAtBatch4(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 4:
                raise RuntimeError("crash")

    dm = BlobDataModule(batch_size=8)  # 101 images: 13 batches
    if not with_index:  # samples numbered by the order they are read
        dm.train_dataloader = lambda: DataLoader(TensorDataset(dm.train_images, torch.zeros(101).long()), batch_size=8)
    clean = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().fit(clean, datamodule=dm)
    every3 = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    crashing = quiet_trainer(enable_checkpointing=True, callbacks=[every3, CrashAtBatch4()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="crash"):
            crashing.fit(DN2Module(k=2, backbone=linear_backbone(), reports=False), datamodule=dm)
        # Lightning's 17-line advice to save the weights before optimizer.step(), at each save: DN2 has no optimizer
        assert not [w for w in caught if "optimiz" in str(w.message)], [str(w.message)[:80] for w in caught]
        warnings.warn("Using ModelCheckpoint with manual optimization and every_n_train_steps, but ...", stacklevel=1)
        assert "optimiz" in str(caught[-1].message)  # quiet for DN2's fit only: a GAN's fit gets the advice
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    trainer = quiet_trainer()
    with dn2_messages() as messages, warnings.catch_warnings():
        warnings.filterwarnings("error", message="the memory bank was built from")  # no partial-bank warning
        trainer.fit(model, datamodule=dm, ckpt_path=tmp_path / "epoch=0-step=3.ckpt")
    assert model.fit_built_bank and trainer.global_step == 13
    assert any("mid-epoch checkpoint" in m for m in messages)
    assert not any("restored the memory bank" in m for m in messages)
    assert torch.equal(model.bank.sample_indices, clean.bank.sample_indices)
    torch.testing.assert_close(model.bank.embeddings, clean.bank.embeddings)
    torch.testing.assert_close(model.threshold, clean.threshold)
    resumed = quiet_trainer().test(model, datamodule=dm)[0]["test/auroc"]
    assert resumed == quiet_trainer().test(clean, datamodule=dm)[0]["test/auroc"]


def test_fit_resumed_mid_epoch_keeps_limit_train_batches(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    dm = BlobDataModule(batch_size=8)
    every3 = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    quiet_trainer(enable_checkpointing=True, callbacks=[every3], limit_train_batches=5).fit(
        DN2Module(k=2, backbone=linear_backbone(), reports=False), datamodule=dm
    )
    assert not [f for f in warnings.filters if f[1] is not None and "every_n_train_steps" in f[1].pattern]  # gone
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    with pytest.warns(UserWarning, match="built from 5 of 13 training batches"):
        quiet_trainer(limit_train_batches=5).fit(model, datamodule=dm, ckpt_path=tmp_path / "epoch=0-step=3.ckpt")
    assert torch.equal(model.bank.sample_indices, torch.arange(40))


def test_a_checkpoint_saved_at_the_passs_last_step_holds_the_bank(tmp_path):
    """ModelCheckpoint(every_n_train_steps) saves in on_train_batch_end: the bank is finalised in the last
    training_step, so the checkpoint of that step (and save_last's) holds it; earlier ones warn that they hold none."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    dm = BlobDataModule(batch_size=8)  # 101 images: 13 batches
    every = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=13, save_last=True)
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer(enable_checkpointing=True, callbacks=[every]).fit(model, datamodule=dm)
    for name in ("epoch=0-step=13.ckpt", "last.ckpt"):
        loaded = DN2Module.load_from_checkpoint(tmp_path / name, backbone=linear_backbone())
        torch.testing.assert_close(loaded.bank.embeddings, model.bank.embeddings)
        assert loaded.bank.spec["train_batches"] == [13, 13]
    mid = ModelCheckpoint(dirpath=tmp_path / "mid", every_n_train_steps=5)  # saves at 5 and 10 of 13 steps
    with pytest.warns(UserWarning, match="no checkpoint of this fit holds its memory bank: .* at step 10"):
        quiet_trainer(enable_checkpointing=True, callbacks=[mid]).fit(
            DN2Module(k=2, backbone=linear_backbone(), reports=False), datamodule=dm
        )
    with pytest.warns(UserWarning, match="holds no memory bank: it was saved before its fit's training pass ended"):
        empty = DN2Module.load_from_checkpoint(tmp_path / "mid" / "epoch=0-step=10.ckpt", backbone=linear_backbone())
    test = quiet_trainer().test(empty, datamodule=dm)[0]["test/auroc"]  # built from the datamodule, as said
    assert test == quiet_trainer().test(model, datamodule=dm)[0]["test/auroc"]


def test_a_capped_fit_resumed_without_its_cap_reads_the_whole_pass(tmp_path):
    dm = BlobDataModule(batch_size=8)
    clean = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().fit(clean, datamodule=dm)
    capped = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    with pytest.warns(UserWarning, match="built from 4 of 13 training batches"):
        trainer = quiet_trainer(limit_train_batches=4, enable_checkpointing=True, default_root_dir=tmp_path)
        trainer.fit(capped, datamodule=dm)
    Path(trainer.checkpoint_callback.best_model_path).rename(tmp_path / "capped.ckpt")  # saved at the epoch's end
    with pytest.warns(UserWarning, match="built from 4 of 13 training batches .* of it without the limit"):
        DN2Module.load_from_checkpoint(tmp_path / "capped.ckpt", backbone=linear_backbone())
    resumed = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    with dn2_messages() as messages:  # max_epochs=1 (as `dn2 fit`): Lightning sees the checkpoint's epoch as done
        quiet_trainer(max_epochs=1).fit(resumed, datamodule=dm, ckpt_path=tmp_path / "capped.ckpt")
    assert any("built from 4 of 13 training batches: reading the training pass again" in m for m in messages)
    assert torch.equal(resumed.bank.sample_indices, clean.bank.sample_indices)
    torch.testing.assert_close(resumed.threshold, clean.threshold)
    assert resumed.bank.spec["train_batches"] == [13, 13]
    again = DN2Module(k=2, backbone=linear_backbone(), reports=False)  # resumed with the same cap: kept as it is
    with pytest.warns(UserWarning, match="built from 4 of 13"):
        quiet_trainer(max_epochs=1, limit_train_batches=4).fit(again, datamodule=dm, ckpt_path=tmp_path / "capped.ckpt")
    assert len(again.bank) == 32


def test_a_resumed_fit_keeps_max_steps_and_validation_inside_the_pass_keeps_every_row(tmp_path):
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    class CrashAtBatch4(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 4:
                raise RuntimeError("crash")

    dm = BlobWithValDataModule(batch_size=8)  # 101 images: 13 batches
    capped = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    with pytest.warns(UserWarning, match="built from 6 of 13"):
        quiet_trainer(max_steps=6, limit_val_batches=0).fit(capped, datamodule=dm)
    every3 = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    with pytest.raises(RuntimeError, match="crash"):
        quiet_trainer(max_steps=6, enable_checkpointing=True, callbacks=[every3, CrashAtBatch4()]).fit(
            DN2Module(k=2, backbone=linear_backbone(), reports=False), datamodule=dm
        )
    resumed = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    with pytest.warns(UserWarning, match="built from 6 of 13"):
        quiet_trainer(max_steps=6, limit_val_batches=0).fit(
            resumed, datamodule=dm, ckpt_path=tmp_path / "epoch=0-step=3.ckpt"
        )
    assert torch.equal(resumed.bank.sample_indices, capped.bank.sample_indices) and len(capped.bank) == 48

    clean = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer(limit_val_batches=0).fit(clean, datamodule=dm)
    validated = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    with pytest.warns(UserWarning, match="validation inside a training epoch sees a partial memory bank"):
        quiet_trainer(val_check_interval=0.5).fit(validated, datamodule=dm)  # was a bank of the last batch only
    assert torch.equal(validated.bank.sample_indices, clean.bank.sample_indices)
    torch.testing.assert_close(validated.threshold, clean.threshold)


def test_fits_that_run_no_epoch_for_other_reasons_are_not_called_spent_nor_warn_about_checkpoints():
    dm = BlobDataModule()
    with pytest.raises(ValueError, match="fit read no training batches"):
        quiet_trainer(max_steps=0).fit(DN2Module(k=2, backbone=linear_backbone(), reports=False), datamodule=dm)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="no checkpoint of this fit holds")
        quiet_trainer(fast_dev_run=True).fit(DN2Module(k=2, backbone=linear_backbone(), reports=False), datamodule=dm)


def test_a_second_fit_on_a_used_trainer_says_the_trainer_is_spent():
    dm = BlobDataModule()
    trainer = quiet_trainer(max_epochs=1)  # as `dn2 fit` (with Lightning's default 1000 a second fit runs an epoch)
    trainer.fit(DN2Module(k=2, backbone=linear_backbone(), reports=False), datamodule=dm)
    with pytest.raises(RuntimeError, match=r"already ran its max_epochs=1 .* Use a new Trainer for each fit"):
        trainer.fit(DN2Module(k=2, backbone=linear_backbone(), reports=False), datamodule=dm)


def test_fit_on_an_iterable_dataset_without_length():
    from torch.utils.data import IterableDataset

    dm = BlobDataModule()

    class Stream(IterableDataset):  # no __len__: Lightning cannot count its batches
        def __iter__(self):
            for i, image in enumerate(dm.train_images):
                yield {"image": image, "label": 0, "index": i}

    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().fit(model, train_dataloaders=DataLoader(Stream(), batch_size=16))
    assert torch.equal(model.bank.sample_indices, torch.arange(len(dm.train_images)))
    assert model.bank.spec["train_batches"] == [7, 7]

    # capped: whether the pass was whole cannot be known, so the bank is said (and recorded) to be maybe partial
    capped = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    trainer = quiet_trainer(limit_train_batches=3, max_epochs=1)
    with pytest.warns(UserWarning, match="built from the first 3 training batches of a dataloader without a length"):
        trainer.fit(capped, train_dataloaders=DataLoader(Stream(), batch_size=16))
    assert len(capped.bank) == 48 and capped.bank.spec["train_batches"] == [3, None]
    path = Path(trainer.default_root_dir) / "capped.ckpt"
    trainer.save_checkpoint(path)
    resumed = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    with dn2_messages() as messages:  # without the cap: the whole stream is read again
        quiet_trainer(max_epochs=1).fit(resumed, train_dataloaders=DataLoader(Stream(), batch_size=16), ckpt_path=path)
    assert len(resumed.bank) == 101 and any("reading the training pass again" in m for m in messages)


# --------------------------------------------------------------------------- Trainer flags beyond one epoch


@pytest.mark.parametrize("flags", [{"min_steps": 10}, {"min_epochs": 2, "max_steps": 10}, {"min_steps": 20}])
def test_epochs_forced_by_min_steps_or_min_epochs_keep_the_whole_bank(flags):
    """DN2 stops fit after its one pass, but Lightning runs on to min_steps / min_epochs: those epochs used to
    start a new pass that the stop flag cut after the first steps (48 of 101 rows, AUROC 0.62 for 0.54)."""
    dm = BlobDataModule()  # 101 images, 7 batches
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    trainer = quiet_trainer(**flags)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the memory bank was built from")
        trainer.fit(model, datamodule=dm)
    assert trainer.current_epoch >= 2
    assert sorted(model.bank.sample_indices.tolist()) == list(range(101))
    results = trainer.test(model, datamodule=dm)
    expected = brute_force_scores(model, dm.train_images, dm.test_images, k=2)
    np.testing.assert_allclose(model.test_scores.scores.numpy(), expected, rtol=1e-5)
    assert results[0]["test/auroc"] == pytest.approx(roc_auc_score(dm.test_labels.numpy(), expected), abs=1e-6)


def test_a_best_checkpoint_saved_by_a_validation_inside_the_pass_says_its_bank_is_partial(tmp_path):
    """With val_check_interval=0.5 the validation after 3 of 7 batches scores a partial bank; ModelCheckpoint may
    keep that one as best. Loading it used to give the partial bank's AUROC without a word."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    dm = BlobWithValDataModule()
    best = ModelCheckpoint(dirpath=tmp_path, monitor="val/auroc", mode="max", save_top_k=-1)
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    trainer = quiet_trainer(val_check_interval=0.5, enable_checkpointing=True, callbacks=[best])
    with pytest.warns(UserWarning, match="validation inside a training epoch") as caught:
        trainer.fit(model, datamodule=dm)  # validations after 3 and 6 of 7 batches
    assert any("no checkpoint of this fit holds its memory bank" in str(w.message) for w in caught)
    for step, rows in ((3, 48), (6, 96)):
        with pytest.warns(UserWarning, match=rf"from {step} of 7 training batches .*validation inside the training"):
            partial = DN2Module.load_from_checkpoint(tmp_path / f"epoch=0-step={step}.ckpt", backbone=linear_backbone())
        assert len(partial.bank) == rows
    trainer.save_checkpoint(tmp_path / "whole.ckpt")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="this checkpoint's memory bank was built from")
        whole = DN2Module.load_from_checkpoint(tmp_path / "whole.ckpt", backbone=linear_backbone())
    assert sorted(whole.bank.sample_indices.tolist()) == list(range(101))


def test_a_fit_whose_model_checkpoint_saves_nothing_says_so_and_dn2_fit_saves_the_bank(tmp_path):
    """check_val_every_n_epoch=2: DN2's one epoch ends before the first validation, after which ModelCheckpoint
    would save: no file, and README says ModelCheckpoint saves the bank."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    dm = BlobWithValDataModule()
    saver = ModelCheckpoint(dirpath=tmp_path / "plain")
    with pytest.warns(UserWarning, match="ModelCheckpoint saved no checkpoint in this fit"):
        quiet_trainer(check_val_every_n_epoch=2, enable_checkpointing=True, callbacks=[saver]).fit(
            DN2Module(k=2, backbone=linear_backbone(), reports=False), datamodule=dm
        )
    assert not (tmp_path / "plain").exists() or not list((tmp_path / "plain").iterdir())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="ModelCheckpoint saved no checkpoint")
        quiet_trainer(enable_checkpointing=True, default_root_dir=tmp_path / "default").fit(
            DN2Module(k=2, backbone=linear_backbone(), reports=False), datamodule=dm
        )
        none_asked = ModelCheckpoint(dirpath=tmp_path / "none", save_top_k=0)  # saves nothing, as asked
        quiet_trainer(enable_checkpointing=True, callbacks=[none_asked]).fit(
            DN2Module(k=2, backbone=linear_backbone(), reports=False), datamodule=dm
        )

    config = CONFIGS / "digits.yaml"
    cli = build_cli(
        [
            "fit", f"--config={config}", f"--trainer.default_root_dir={tmp_path / 'cli'}",
            "--trainer.check_val_every_n_epoch=2", "--model.input_size=32", "--model.pretrained=false",
            "--model.reports=false", "--trainer.enable_progress_bar=false",
        ]
    )  # fmt: skip
    saved = list((tmp_path / "cli").rglob("bank.ckpt"))
    assert len(saved) == 1
    loaded = DN2Module.load_from_checkpoint(saved[0])
    torch.testing.assert_close(loaded.bank.embeddings, cli.model.bank.embeddings)


def test_a_bank_built_on_first_need_meeting_another_datamodule_is_said():
    """test(dm1) builds the bank from dm1's training data; test(dm2), a datamodule with other training data that
    DN2 cannot compare, scored against dm1's bank without a word (AUROC 0.56 for 0.60)."""
    dm1, dm2 = BlobDataModule(seed=0), BlobDataModule(seed=1, n_train=57)
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    trainer = quiet_trainer()
    trainer.test(model, datamodule=dm1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="is not the datamodule this memory bank was built from")
        trainer.test(model, datamodule=dm1)  # the same one again
    with pytest.warns(UserWarning, match=r"BlobDataModule is not the datamodule .* on first need .*train_set_identity"):
        trainer.test(model, datamodule=dm2)
    copy = pickle.loads(pickle.dumps(model))  # the record of dm1 (a weakref) does not travel
    torch.testing.assert_close(copy.score_images(dm1.test_images).scores, model.score_images(dm1.test_images).scores)
    fitted = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().fit(fitted, datamodule=dm1)
    with warnings.catch_warnings():  # a fitted bank is the user's choice: tested on other data as asked
        warnings.filterwarnings("error", message="is not the datamodule this memory bank was built from")
        quiet_trainer().test(fitted, datamodule=dm2)


# --------------------------------------------------------------------------- DataLoader workers


class _WorkerIterable(torch.utils.data.IterableDataset):
    """Blob samples streamed; ``split``: each worker yields its share (torch's recipe), else all of them."""

    def __init__(self, images, labels, split=True, index=True, length=True):
        self.images, self.labels, self.split, self.index, self.length = images, labels, split, index, length

    def __len__(self):
        if not self.length:
            raise TypeError("no length")
        return len(self.images)

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        ids = range(len(self.images))
        if self.split and worker is not None:
            ids = range(worker.id, len(self.images), worker.num_workers)
        for i in ids:
            sample = {"image": self.images[i], "label": self.labels[i]}
            yield sample | {"index": torch.tensor(i)} if self.index else sample


def test_an_iterable_with_a_length_read_by_two_workers_is_not_cut_short_silently():
    """Each worker ends its share with a short batch: 8 batches for len(dataloader) = 7, and Lightning stops at 7.
    The bank held 99 of 101 rows and test scored 68 of 71 (AUROC 0.5104 for 0.5382), silently."""
    dm = BlobDataModule()
    train = DataLoader(_WorkerIterable(dm.train_images, torch.zeros(101)), batch_size=16, num_workers=2)
    test = DataLoader(_WorkerIterable(dm.test_images, dm.test_labels), batch_size=16, num_workers=2)
    with pytest.raises(ValueError, match=r"training dataloader read 99 of its IterableDataset's 101 samples.*workers"):
        quiet_trainer().fit(DN2Module(k=2, backbone=linear_backbone(), reports=False), train_dataloaders=train)
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().fit(model, datamodule=dm)
    with pytest.raises(ValueError, match=r"test dataloader read 68 of its IterableDataset's 71 samples"):
        quiet_trainer().test(model, dataloaders=test)
    one_worker = DataLoader(_WorkerIterable(dm.test_images, dm.test_labels), batch_size=16, num_workers=1)
    quiet_trainer().test(model, dataloaders=one_worker)
    expected = brute_force_scores(model, dm.train_images, dm.test_images, k=2)
    np.testing.assert_allclose(model.test_scores.scores.numpy(), expected, rtol=1e-5)
    # drop_last: each worker drops the remainder of its share (51 and 50 in batches of 20: 80 read), counted
    dropping = DataLoader(train.dataset, batch_size=20, num_workers=2, drop_last=True)
    with pytest.warns(UserWarning, match=r"drop_last=True and 2 workers.*: 21 of the IterableDataset's 101 samples"):
        quiet_trainer().fit(model, train_dataloaders=dropping)
    assert len(model.bank) == 80
    # an unnumbered iterable read in its own order by one process: numbered as read, nothing to say
    plain = DataLoader(_WorkerIterable(dm.train_images, torch.zeros(101), index=False), batch_size=16)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the dataloader does not read in order")
        quiet_trainer().fit(model, train_dataloaders=plain)
    assert model.bank.sample_indices.tolist() == list(range(101))


def test_an_unsplit_iterable_of_unnumbered_samples_under_workers_is_said():
    """Every worker yields every sample: without an 'index' each is embedded twice and its copy is its nearest
    neighbour (k = 2 scores became 1-NN distances, the threshold halved), under a warning that said the scores
    were right."""
    dm = BlobDataModule()
    unsplit = _WorkerIterable(dm.train_images, torch.zeros(101), split=False, index=False, length=False)
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    with pytest.warns(UserWarning, match=r"IterableDataset read by 2 workers, whose samples carry no 'index'"):
        quiet_trainer().fit(model, train_dataloaders=DataLoader(unsplit, batch_size=16, num_workers=2))
    indexed = _WorkerIterable(dm.train_images, torch.zeros(101), split=False, index=True, length=False)
    with pytest.raises(ValueError, match="share their dataset 'index'"):  # with an index the copies are refused
        quiet_trainer().fit(
            DN2Module(k=2, backbone=linear_backbone(), reports=False),
            train_dataloaders=DataLoader(indexed, batch_size=16, num_workers=2),
        )


def test_a_validation_inside_the_pass_does_not_renumber_the_training_samples_after_it():
    """Samples without an 'index' are numbered as read; the validation inside the epoch restarted that count, so
    the training rows after it took its numbers: a false "share their dataset 'index'" error (20 validation
    samples), or bank rows numbered past the training set."""
    dm = BlobDataModule()
    train = DataLoader(TensorDataset(dm.train_images, torch.zeros(101)), batch_size=16)
    for n_val in (20, 213):
        val = DataLoader(TensorDataset(dm.test_images.repeat(3, 1, 1, 1)[:n_val], dm.test_labels.repeat(3)[:n_val]))
        model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
        with pytest.warns(UserWarning, match="validation inside a training epoch"):
            quiet_trainer(val_check_interval=0.5, num_sanity_val_steps=0).fit(model, train, val)
        assert sorted(model.bank.sample_indices.tolist()) == list(range(101))


def _pooled_conv() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )


def _photos(folder: Path, n: int, seed: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)  # smooth content, 90 x 120 pixels
        Image.fromarray(coarse).resize((120, 90), Image.BILINEAR).save(folder / f"{i}.png")
        paths.append(folder / f"{i}.png")
    return paths


def test_score_images_resizes_as_a_plain_training_loader_did(tmp_path):
    """README's ImageFolder(root, loader=partial(load_image, size=32)) bank: nothing recorded its 32 px, so
    score_images fed the same files at 90 x 120 (scores 11-26% off with EfficientNet-Lite0, 100x with a backbone
    that does not resize)."""
    from torchvision.datasets import ImageFolder

    from dn2_lightning.data.images import load_image

    _photos(tmp_path / "train" / "normal", 9, seed=0)
    dataset = ImageFolder(str(tmp_path / "train"), loader=functools.partial(load_image, size=32))
    model = DN2Module(k=2, backbone=_pooled_conv(), reports=False)
    trainer = quiet_trainer()
    trainer.fit(model, train_dataloaders=DataLoader(dataset, batch_size=4))
    assert model.bank.spec["train_image_size"] == [32, 32]
    predicted = torch.cat([out["score"] for out in trainer.predict(model, DataLoader(dataset, batch_size=4))])
    files = [path for path, _ in dataset.samples]
    torch.testing.assert_close(model.score_images(files).scores, predicted, rtol=1e-5, atol=1e-7)
    as_uint8 = torch.stack([load_image(path) for path in files])  # native 90 x 120: resized as the files are
    torch.testing.assert_close(model.score_images(as_uint8).scores, predicted, rtol=1e-5, atol=1e-7)
    # the same after a checkpoint
    trainer.save_checkpoint(tmp_path / "bank.ckpt")
    loaded = DN2Module.load_from_checkpoint(tmp_path / "bank.ckpt", backbone=_pooled_conv())
    torch.testing.assert_close(loaded.score_images(files).scores, predicted, rtol=1e-5, atol=1e-7)


def test_a_plain_loader_of_another_image_size_than_the_bank_is_warned_about(tmp_path):
    """A bank of 32 px images tested through a plain DataLoader at 16 px: the backbone resizes both, but the scores
    shift (a reviewer's 20 px loader flagged 8 of 8 normal images against a 48 px bank), without a word."""
    from torchvision.datasets import ImageFolder

    from dn2_lightning.data.images import load_image

    _photos(tmp_path / "train" / "normal", 9, seed=0)
    model = DN2Module(k=2, backbone=_pooled_conv(), reports=False)
    trainer = quiet_trainer()

    def loader(size: int) -> DataLoader:
        return DataLoader(ImageFolder(str(tmp_path / "train"), loader=functools.partial(load_image, size=size)))

    trainer.fit(model, train_dataloaders=loader(32))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*memory bank was built from")  # the training images' own size
        same = torch.cat([out["score"] for out in trainer.predict(model, loader(32))])
    with pytest.warns(
        UserWarning, match=r"16x16 pixels, but the memory bank was built from 32x32 .*Resize\(\(32, 32\)\)"
    ) as caught:
        smaller = torch.cat([out["score"] for out in trainer.predict(model, loader(16))])
    assert len([w for w in caught if "memory bank was built from" in str(w.message)]) == 1  # once per run
    assert not torch.allclose(smaller, same, rtol=0.05)  # what the warning is about


def test_float_images_are_resized_in_eight_bits_as_files_are(tmp_path):
    """score_images resized [0, 1] float tensors in float, the datasets resize 8-bit pixels: normal images' scores
    moved by up to 3.9% (a training image 12%) against the same image given by path or as uint8."""
    _photos(tmp_path / "set" / "train", 9, seed=0)
    tests = _photos(tmp_path / "set" / "test" / "good", 3, seed=1)
    dm = OneClassDataModule(dataset="folder", root=str(tmp_path / "set"), load_size=32, batch_size=4)
    model = DN2Module(k=2, backbone=_pooled_conv(), reports=False)
    quiet_trainer().fit(model, datamodule=dm)
    from dn2_lightning.data.images import load_image

    uint8 = torch.stack([load_image(path) for path in tests])
    by_path = model.score_images(tests).scores
    torch.testing.assert_close(model.score_images(uint8).scores, by_path, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.score_images(uint8.float() / 255).scores, by_path, rtol=1e-5, atol=1e-7)


def test_numpy_numbers_in_settings_give_a_checkpoint_that_loads(tmp_path):
    # a grid search hands NumPy numbers: before, fit and save worked but every load of the file failed
    # (weights-only loading refuses NumPy scalars, found in the hyperparameters, the threshold's k and the bank's
    # record of its training data)
    settings = dict(k=np.int64(2), threshold_quantile=np.float64(0.95), clean_fraction=np.float64(0.2))
    model = DN2Module(backbone=linear_backbone(in_features=192), clean_k=np.int64(5), **settings)
    assert type(model.hparams.k) is int and type(model.hparams.clean_fraction) is float
    dm = OneClassDataModule("digits", normal_class=0, contamination=np.float64(0.05), load_size=8, batch_size=64)
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=dm)
    model.hparams.k = np.int64(3)  # an edit after construction, saved with the checkpoint
    trainer.save_checkpoint(tmp_path / "numpy.ckpt")
    loaded = DN2Module.load_from_checkpoint(tmp_path / "numpy.ckpt", backbone=linear_backbone(in_features=192))
    assert loaded.hparams.k == 3 and loaded.hparams.threshold_quantile == 0.95
    assert torch.equal(loaded.bank.embeddings, model.bank.embeddings)
    test = quiet_trainer().test(loaded, datamodule=dm, verbose=False)[0]["test/auroc"]
    assert test == pytest.approx(quiet_trainer().test(model, datamodule=dm, verbose=False)[0]["test/auroc"], abs=1e-7)


def test_as_python_keeps_a_namedtuple_and_converts_what_is_around_it():
    # a namedtuple rebuilt as type(value)(generator) is refused by its constructor (TypeError): settings holding one
    # could no longer be stored; it keeps its own type and is left as it is
    from collections import namedtuple

    from dn2_lightning.validation import as_python

    Window = namedtuple("Window", "low high")
    window = Window(1, 2)
    converted = as_python({"k": np.int64(3), "window": window, "pairs": [window, (np.float32(0.5), "x")]})
    assert converted == {"k": 3, "window": window, "pairs": [window, (0.5, "x")]}
    assert type(converted["window"]) is Window and type(converted["pairs"][0]) is Window
    assert type(converted["k"]) is int and type(converted["pairs"][1][0]) is float


@pytest.mark.parametrize("clean_fraction", [0.0, 0.3])
def test_point_wise_group_threshold_draw_is_pinned_over_every_training_group(clean_fraction):
    # guards the draw picking members or removed rows by row id instead of group id (ids // members)
    from test_group_pooling import PaddedGroups

    train = PaddedGroups(60, fill=0.0, seed=0)
    model = DN2Module(
        k=2,
        backbone=linear_backbone(),
        group_pooling="none",
        clean_fraction=clean_fraction,
        clean_k=5,
        threshold_samples=25,
        reports=False,
    )
    quiet_trainer().fit(model, train_dataloaders=DataLoader(train, batch_size=8))
    rows, group_of = real_member_rows(model, train)
    kept = np.isin(group_of, np.unique(model.bank.sample_indices.numpy() // 4))  # kept groups' members form the bank
    distances = ((rows[:, None] - rows[kept][None]) ** 2).sum(-1)
    distances[group_of[:, None] == group_of[kept][None]] = np.inf  # a group leaves itself out
    member_loo = np.sort(distances, axis=1)[:, :2].mean(1)
    group_loo = np.array([member_loo[group_of == g].max() for g in range(60)])
    draw = torch.randperm(60, generator=torch.Generator().manual_seed(0))[:25].sort().values.numpy()
    if clean_fraction:
        removed_groups = np.unique(model.bank.removed_indices.numpy() // 4)
        assert np.isin(draw, removed_groups).any() and not kept.all()  # removed groups are in the draw
    assert len(model.bank.loo_scores) == 25 and bool(model.bank.loo_drawn)
    np.testing.assert_allclose(model.bank.loo_scores.numpy(), np.sort(group_loo[draw]), rtol=1e-5)


def test_point_wise_group_scores_use_real_members_only_whatever_the_padding_holds():
    # guards padded slots entering the bank or the test scores, and the best member taken instead of the worst
    from test_group_pooling import PaddedGroups

    results = []
    for fill in (0.0, 1.0):
        train, test = PaddedGroups(60, fill=fill, seed=0), PaddedGroups(30, fill=fill, seed=1, with_anomalies=True)
        model = DN2Module(k=2, backbone=linear_backbone(), group_pooling="none", reports=False)
        trainer = quiet_trainer()
        trainer.fit(model, train_dataloaders=DataLoader(train, batch_size=8))
        trainer.test(model, dataloaders=DataLoader(test, batch_size=8))
        assert len(model.bank) == int(train.mask.sum())  # one bank row per real member, none for padding
        with torch.no_grad():
            bank = model.backbone(train.images.flatten(0, 1)).double().numpy()[train.mask.flatten().numpy()]
            queries = model.backbone(test.images.flatten(0, 1)).double().numpy()
        nearest = np.sort(((queries[:, None] - bank[None]) ** 2).sum(-1), axis=1)[:, :2]
        member = nearest.mean(1).reshape(30, 4)
        member[~test.mask.numpy()] = -np.inf  # padded slots never score
        worst = member.argmax(1)
        assert (member.argmin(1) != worst).any()
        np.testing.assert_allclose(model.test_scores.scores.numpy(), member.max(1), rtol=1e-5)
        expected_distances = nearest.reshape(30, 4, 2)[np.arange(30), worst]
        np.testing.assert_allclose(model.test_scores.distances.numpy(), expected_distances, rtol=1e-5)
        results.append(model.test_scores.scores)
    torch.testing.assert_close(results[0], results[1])


def test_fitting_a_module_fresh_from_load_from_checkpoint_gives_no_eval_mode_warning(tmp_path):
    """load_from_checkpoint returns eval mode; a fit of it had Lightning warn "Found 12 module(s) in eval mode at
    the start of training. This may lead to unexpected behavior", false for DN2's backbone."""
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=BlobDataModule())
    trainer.save_checkpoint(tmp_path / "bank.ckpt")
    loaded = DN2Module.load_from_checkpoint(tmp_path / "bank.ckpt", backbone=linear_backbone())
    assert not loaded.training
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer().fit(loaded, datamodule=BlobDataModule())
    assert not [str(w.message) for w in caught if "eval mode" in str(w.message)]
    torch.testing.assert_close(loaded.bank.embeddings, model.bank.embeddings)


def test_score_images_does_not_resize_when_the_training_images_had_several_sizes():
    # a training loader of two image sizes records none: score_images then scores images at their own size, as
    # trainer.predict does (resizing to one of the training sizes would change the embedding)
    g = torch.Generator().manual_seed(0)
    small, large = torch.rand(16, 3, 8, 8, generator=g), torch.rand(16, 3, 10, 10, generator=g)
    train = [{"image": img, "label": 0, "index": i} for i, img in enumerate([*small, *large])]
    model = DN2Module(k=2, backbone=_pooled_conv(), reports=False)
    trainer = quiet_trainer()
    trainer.fit(model, train_dataloaders=DataLoader(train, batch_size=16))
    query = torch.rand(3, 3, 12, 12, generator=g)
    predicted = torch.cat([o["score"] for o in trainer.predict(model, DataLoader(TensorDataset(query), batch_size=3))])
    torch.testing.assert_close(model.score_images(query).scores, predicted, rtol=1e-5, atol=1e-7)


class _LoadSizeBlobs(BlobDataModule):
    """Blobs whose datamodule records a CPU resize to 8 px (as OneClassDataModule's load_size does)."""

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters({"load_size": 8})


def test_score_images_resizes_to_the_datamodules_load_size():
    from torchvision.transforms.v2.functional import resize

    dm = _LoadSizeBlobs()
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=dm)
    assert model.bank.spec["load_size"] == 8
    g = torch.Generator().manual_seed(1)
    large = (torch.rand(3, 3, 16, 16, generator=g) * 150).to(torch.uint8)
    small = resize(large, [8, 8], antialias=True)
    expected = torch.cat([o["score"] for o in trainer.predict(model, DataLoader(TensorDataset(small), batch_size=3))])
    torch.testing.assert_close(model.score_images(large).scores, expected, rtol=1e-5, atol=1e-7)


class _SplitIterable(torch.utils.data.IterableDataset):
    """Indexed samples with a length, each worker yielding its share (torch's recipe)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        ids = range(len(self.images)) if worker is None else range(worker.id, len(self.images), worker.num_workers)
        for i in ids:
            yield {"image": self.images[i], "label": torch.tensor(0), "index": torch.tensor(i)}


def test_an_iterable_read_whole_by_two_workers_is_accepted():
    # 32 samples, 2 workers of 16, batches of 8: 4 full batches = len(dataloader), every sample read
    dm = BlobDataModule(n_train=32)
    loader = DataLoader(_SplitIterable(dm.train_images), batch_size=8, num_workers=2)
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().fit(model, train_dataloaders=loader)
    assert sorted(model.bank.sample_indices.tolist()) == list(range(32))

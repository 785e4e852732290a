"""Issue 11 (module side): no silent wrong numbers from modes, labels, checkpoints, thresholds or loads."""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import math
import pickle
import re
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BlobDataModule, DictDataset, dn2_messages, linear_backbone, quiet_trainer
from PIL import Image
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Subset, TensorDataset

from dn2_lightning import DN2Module
from dn2_lightning.batch import unpack_batch
from dn2_lightning.data import AnomalyLabel


def bn_backbone(seed: int = 0) -> nn.Module:
    """A small trunk whose output depends on BatchNorm statistics and dropout in train mode."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    with torch.no_grad():  # pretrained-like running statistics, far from a batch's own
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    return net


def bn_buffers(model: DN2Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in model.backbone.named_buffers() if "running" in name or "num_batches" in name}


def test_frozen_backbone_ignores_train_mode_issue11_1(tmp_path):
    dm = BlobDataModule()
    trainer = quiet_trainer(default_root_dir=tmp_path, enable_checkpointing=True)
    model = DN2Module(k=2, backbone=bn_backbone())
    trainer.fit(model, datamodule=dm)
    reference = quiet_trainer().predict(model.eval(), datamodule=dm)
    reference = torch.cat([o["score"] for o in reference])

    restored = DN2Module.load_from_checkpoint(trainer.checkpoint_callback.best_model_path, backbone=bn_backbone())
    assert not restored.training, "load_from_checkpoint returns a module ready to score"
    before = bn_buffers(restored)
    restored.train()  # as a user or a training loop might leave it
    batch = {"image": dm.test_images, "label": dm.test_labels, "index": torch.arange(len(dm.test_images))}
    with torch.no_grad():
        in_train_mode = restored.predict_step(batch, 0)["score"]
    with torch.inference_mode():
        in_inference_mode = restored.score_images(dm.test_images).scores
    torch.testing.assert_close(in_train_mode, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(in_inference_mode, reference, rtol=1e-6, atol=1e-6)
    after = bn_buffers(restored)
    assert all(torch.equal(before[name], after[name]) for name in before), "BatchNorm buffers must not move"
    assert restored.training, "the module's own mode is left to its owner"


def _image_folder(root, classes: dict[str, list[float]]) -> None:
    for name, levels in classes.items():
        (root / name).mkdir(parents=True)
        for i, level in enumerate(levels):
            pixels = np.full((8, 8, 3), int(level * 255), dtype=np.uint8)
            pixels[i % 8, :, :] = 255 - pixels[i % 8, :, :]
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_class_index_labels_are_refused_with_the_mapping_issue11_2(tmp_path):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import functional as tvf

    _image_folder(tmp_path / "train", {"good": [0.2, 0.25, 0.3, 0.35, 0.4]})
    _image_folder(tmp_path / "test", {"a_bad": [0.8, 0.9], "b_bad": [0.7], "c_bad": [0.95], "good": [0.3, 0.33]})
    train = DataLoader(ImageFolder(tmp_path / "train", transform=tvf.pil_to_tensor), batch_size=4)
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().fit(model, train_dataloaders=train)

    raw = ImageFolder(tmp_path / "test", transform=tvf.pil_to_tensor)  # labels 0..3, "good" is 3
    with pytest.raises(ValueError, match=r"class indices \{'a_bad': 0, .*'good': 3\}.*AnomalyLabel\(3\)"):
        quiet_trainer().test(model, dataloaders=DataLoader(raw, batch_size=4))
    # the same labels from a plain dataset of tuples: refused by value
    tuples = [(image, y) for image, y in raw]
    with pytest.raises(ValueError, match=r"labels must be 0 = normal, 1 = anomalous, -1 = unknown.*\[0, 1, 2\]"):
        quiet_trainer().test(model, dataloaders=DataLoader(tuples, batch_size=4))

    good = raw.class_to_idx["good"]
    for nonsense in (None, 1.5, True):
        with pytest.raises(TypeError, match=r"AnomalyLabel\(normal=.*index or name"):
            AnomalyLabel(nonsense)
    # the mapping the message names, through a worker started by spawn (macOS, Windows), which pickles it
    mapped = ImageFolder(tmp_path / "test", transform=tvf.pil_to_tensor, target_transform=AnomalyLabel(good))
    spawned = DataLoader(mapped, batch_size=4, num_workers=1, multiprocessing_context="spawn")
    results = quiet_trainer().test(model, dataloaders=spawned)
    labels = [int(y != good) for _, y in raw.samples]
    assert results[0]["test/auroc"] == pytest.approx(roc_auc_score(labels, model.test_scores.scores.numpy()))


def test_one_hot_labels_are_refused_at_the_first_batch_and_column_labels_score_alike():
    # [B, 2] one-hot labels hold only 0 and 1: they passed the value check and failed after the whole test pass
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().fit(model, datamodule=dm)
    one_hot = torch.nn.functional.one_hot(dm.test_labels.long(), 2)
    test = DataLoader(list(zip(dm.test_images, one_hot, strict=True)), batch_size=8)
    with pytest.raises(ValueError, match=r"one per sample .*got shape \(8, 2\) for 8 samples"):
        quiet_trainer().test(model, dataloaders=test)
    column = DataLoader(list(zip(dm.test_images, dm.test_labels[:, None], strict=True)), batch_size=8)
    auroc = quiet_trainer().test(model, dataloaders=column)[0]["test/auroc"]
    assert auroc == pytest.approx(roc_auc_score(dm.test_labels.numpy(), model.test_scores.scores.numpy()))


def test_two_class_image_folder_labels_are_refused_not_read_inverted(tmp_path):
    """{'crack': 0, 'good': 1}: class indices that pass as 0/1 labels, with normal and anomalous swapped."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import functional as tvf

    _image_folder(tmp_path / "train", {"good": [0.2, 0.25, 0.3, 0.35, 0.4]})
    _image_folder(tmp_path / "test", {"crack": [0.8, 0.9, 0.7], "good": [0.3, 0.33, 0.27]})
    train = DataLoader(ImageFolder(tmp_path / "train", transform=tvf.pil_to_tensor), batch_size=4)
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().fit(model, train_dataloaders=train)

    raw = ImageFolder(tmp_path / "test", transform=tvf.pil_to_tensor)
    for run in (quiet_trainer().test, quiet_trainer().predict):
        with pytest.raises(ValueError, match=r"class indices \{'crack': 0, 'good': 1\}.*AnomalyLabel\(1\)"):
            run(model, dataloaders=DataLoader(Subset(raw, range(6)), batch_size=4))
    # one ImageFolder per production line, concatenated (a reviewer's run: AUROC 0.8419 for a true 0.1581)
    lines = ConcatDataset([raw, ImageFolder(tmp_path / "test", transform=tvf.pil_to_tensor)])
    with pytest.raises(ValueError, match=r"class indices \{'crack': 0, 'good': 1\}"):
        quiet_trainer().test(model, dataloaders=DataLoader(Subset(lines, range(12)), batch_size=4))
    mapped = ImageFolder(tmp_path / "test", transform=tvf.pil_to_tensor, target_transform=AnomalyLabel(1))
    results = quiet_trainer().test(model, dataloaders=DataLoader(mapped, batch_size=4))
    assert model.test_scores.labels.tolist() == [1, 1, 1, 0, 0, 0]
    assert results[0]["test/auroc"] == pytest.approx(roc_auc_score([1, 1, 1, 0, 0, 0], model.test_scores.scores))

    # class indices that already are the labels are read as they are: {'good': 0, 'scratch': 1}, or a
    # find_classes (torchvision's hook) that maps every folder to 0/1
    class GoodIsZero(ImageFolder):
        def find_classes(self, directory):
            classes = sorted(p.name for p in Path(directory).iterdir())
            return classes, {c: int(c != "good") for c in classes}

    (tmp_path / "test" / "crack").rename(tmp_path / "test" / "scratch")
    for dataset in (ImageFolder(tmp_path / "test", transform=tvf.pil_to_tensor), GoodIsZero(tmp_path / "test")):
        dataset.transform = tvf.pil_to_tensor
        quiet_trainer().test(model, dataloaders=DataLoader(dataset, batch_size=4))
        assert model.test_scores.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_a_one_folder_image_folder_is_unlabelled_unless_the_folder_is_named_normal(tmp_path):
    """ImageFolder needs a class folder around unlabelled images: its class index 0 passed as label 0, so predict's
    report counted every flag among normal images (2 of 7 normal flagged, both anomalies; a review)."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import functional as tvf

    _image_folder(tmp_path / "train", {"good": [0.2, 0.25, 0.3, 0.35, 0.4]})
    _image_folder(tmp_path / "new", {"images": [0.3, 0.9, 0.33]})
    train = DataLoader(ImageFolder(tmp_path / "train", transform=tvf.pil_to_tensor), batch_size=4)
    model = DN2Module(k=2, backbone=linear_backbone(), threshold=1.0)
    trainer = quiet_trainer(default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=train)
    with dn2_messages() as said:
        trainer.predict(model, DataLoader(ImageFolder(tmp_path / "new", transform=tvf.pil_to_tensor)))
    assert model.predict_scores.labels.tolist() == [-1, -1, -1] and "read as unlabelled (label -1)" in "\n".join(said)
    summary = json.loads(sorted((tmp_path / "dn2_reports").glob("predict_*"))[-1].joinpath("summary.json").read_text())
    assert summary.get("n_flagged_normal") is None and summary["n_flagged"] == 1
    (tmp_path / "new" / "images").rename(tmp_path / "new" / "Good")  # named as the normal folder: labelled 0
    trainer.predict(model, DataLoader(ImageFolder(tmp_path / "new", transform=tvf.pil_to_tensor)))
    assert model.predict_scores.labels.tolist() == [0, 0, 0]

    _image_folder(tmp_path / "crack", {"crack": [0.9]})

    class Anomalies(ImageFolder):  # a find_classes labelling its one folder anomalous: kept
        def find_classes(self, directory):
            return ["crack"], {"crack": 1}

    trainer.predict(model, DataLoader(Anomalies(tmp_path / "crack", transform=tvf.pil_to_tensor)))
    assert model.predict_scores.labels.tolist() == [1]
    # one-folder ImageFolders concatenated, one named as normal: the other's index 0 would pass as normal too
    lines = ConcatDataset([ImageFolder(tmp_path / "new", transform=tvf.pil_to_tensor)] * 2)
    trainer.predict(model, DataLoader(lines))
    assert model.predict_scores.labels.tolist() == [0] * 6
    mixed = ConcatDataset([lines, ImageFolder(tmp_path / "crack", transform=tvf.pil_to_tensor)])
    nested = ConcatDataset([ConcatDataset([mixed.datasets[1]] * 2), lines])  # (nested: named by its part)
    for dataset, part in ((mixed, 1), (nested, 0)):
        with pytest.raises(ValueError, match=rf"part {part} of the ConcatDataset holds an ImageFolder of one class"):
            trainer.predict(model, DataLoader(dataset))


def test_numpy_indices_in_tuple_batches_are_read():
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    samples = [(x, int(y), i) for i, (x, y) in enumerate(zip(dm.test_images, dm.test_labels, strict=True))]

    def collate(batch):
        images, labels, indices = zip(*batch, strict=True)
        return torch.stack(images), torch.tensor(labels), np.array(indices)

    quiet_trainer().test(model, datamodule=dm)
    expected = model.test_scores.scores
    quiet_trainer().test(model, dataloaders=DataLoader(samples, batch_size=8, collate_fn=collate))
    assert torch.equal(model.test_scores.indices, torch.arange(len(samples)))
    torch.testing.assert_close(model.test_scores.scores, expected)


def test_numpy_paths_as_tuple_indices_are_named():
    from dn2_lightning.batch import check_tuple_indices

    with pytest.raises(ValueError, match=r"third element .* got a NumPy array of dtype <U5"):
        check_tuple_indices(np.array(["a.png", "b.png"]))
    check_tuple_indices(np.array([3, 4]))


def test_an_empty_bank_is_no_bank():
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    model.bank.set(torch.empty(0, 16), torch.empty(0, dtype=torch.long))
    with pytest.raises(RuntimeError, match="no memory bank yet"):
        model.score_images(BlobDataModule().test_images)


@pytest.mark.parametrize(
    "extra, match",
    [
        (lambda i: f"img_{i}.png", r"third element .* dataset indices .* got strings such as 'img_0.png'"),
        (lambda i: torch.zeros(8, 8), r"third element .* got a torch.float32 tensor of shape \(4, 8, 8\)"),
        (None, r"labels must be 0 = normal, 1 = anomalous, -1 = unknown; got strings \['good', 'good'"),
    ],
    ids=["(image, label, path)", "(image, label, mask)", "(image, class name)"],
)
def test_tuple_batches_dn2_cannot_read_are_refused_naming_the_layouts(extra, match):
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().fit(model, datamodule=dm)
    images = dm.test_images[:8]
    samples = [(x, 0, extra(i)) if extra else (x, "good") for i, x in enumerate(images)]
    with pytest.raises(ValueError, match=match) as error:
        quiet_trainer().test(model, dataloaders=DataLoader(samples, batch_size=4))
    assert extra is None or "return a dict from the dataset" in str(error.value)


def test_scoring_settings_follow_the_user_not_the_checkpoint_issue11_5(tmp_path):
    dm = BlobDataModule()
    trainer = quiet_trainer(default_root_dir=tmp_path, enable_checkpointing=True)
    trainer.fit(DN2Module(k=2, backbone=linear_backbone()), datamodule=dm)
    ckpt = trainer.checkpoint_callback.best_model_path

    model = DN2Module(k=7, backbone=linear_backbone(seed=3), threshold_quantile=0.5)
    quiet_trainer().test(model, datamodule=dm, ckpt_path=ckpt)
    with torch.no_grad():
        train, test = model.backbone(dm.train_images).double(), model.backbone(dm.test_images).double()
    nn_ = NearestNeighbors(n_neighbors=8, algorithm="brute").fit(train.numpy())
    expected = (nn_.kneighbors(test.numpy(), 7)[0] ** 2).mean(1)
    np.testing.assert_allclose(model.test_scores.scores.numpy(), expected, rtol=1e-5)
    loo = (nn_.kneighbors(train.numpy(), 8)[0][:, 1:] ** 2).mean(1)  # k=7 leave-one-out, as the score
    assert float(model.threshold) == pytest.approx(np.quantile(loo, 0.5), rel=1e-5)

    loaded = DN2Module.load_from_checkpoint(ckpt, backbone=linear_backbone(), threshold_quantile=0.5)
    loo_k2 = (nn_.kneighbors(train.numpy(), 3)[0][:, 1:] ** 2).mean(1)
    assert float(loaded.threshold) == pytest.approx(np.quantile(loo_k2, 0.5), rel=1e-5)


def test_bank_settings_are_checked_against_the_checkpoint_issue11_5(tmp_path):
    from dn2_lightning import OneClassDataModule

    dm = OneClassDataModule(dataset="digits", normal_class=1, load_size=16, batch_size=512)
    trainer = quiet_trainer(default_root_dir=tmp_path, enable_checkpointing=True, limit_train_batches=1)
    trainer.fit(DN2Module(k=2, backbone="efficientnet_lite0", pretrained=False, input_size=32), datamodule=dm)
    ckpt = trainer.checkpoint_callback.best_model_path
    with pytest.raises(ValueError, match=r"input_size=32 \(checkpoint\) vs input_size=64"):
        DN2Module.load_from_checkpoint(ckpt, input_size=64)
    with pytest.raises(ValueError, match=r"clean_fraction=0.0 \(checkpoint\) vs clean_fraction=0.5"):
        quiet_trainer().test(
            DN2Module(backbone="efficientnet_lite0", pretrained=False, input_size=32, clean_fraction=0.5),
            datamodule=dm,
            ckpt_path=ckpt,
        )
    other_size = OneClassDataModule(dataset="digits", normal_class=1, load_size=24, batch_size=512)
    with pytest.raises(ValueError, match=r"load_size=16 \(checkpoint\) vs load_size=24 \(this datamodule\)"):
        quiet_trainer().test(DN2Module.load_from_checkpoint(ckpt), datamodule=other_size)


def test_bank_no_larger_than_k_leaves_is_anomaly_undefined_issue11_7():
    dm = BlobDataModule(n_train=2)
    model = DN2Module(k=2, backbone=linear_backbone())
    with pytest.warns(UserWarning, match="no leave-one-out scores to set a threshold from"):
        out = quiet_trainer().predict(model, datamodule=dm)
    assert all(o["is_anomaly"] is None for o in out)
    assert model.predict_scores.is_anomaly is None
    assert torch.isnan(model.threshold)
    model.set_threshold(value=float(model.predict_scores.scores.median()))
    assert int(model.score_images(dm.test_images).is_anomaly.sum()) == (len(dm.test_images) - 1) // 2


def test_k_given_at_load_that_leaves_no_threshold_warns_once(tmp_path):
    trainer = quiet_trainer(default_root_dir=tmp_path, enable_checkpointing=True)
    dm = BlobDataModule(n_train=6)
    trainer.fit(DN2Module(k=2, backbone=linear_backbone(), reports=False), datamodule=dm)
    ckpt = trainer.checkpoint_callback.best_model_path
    model = DN2Module.load_from_checkpoint(ckpt, backbone=linear_backbone(), k=6)  # k = the bank's 6 rows
    with pytest.warns(UserWarning, match="holds 6 embeddings, not more than k=6") as caught:
        result = model.score_images(dm.test_images)
        quiet_trainer().predict(model, datamodule=dm)
    assert result.is_anomaly is None and model.predict_scores.is_anomaly is None
    assert sum("not more than k" in str(w.message) for w in caught) == 1
    assert not math.isnan(float(DN2Module.load_from_checkpoint(ckpt, backbone=linear_backbone(), k=5).threshold))


def test_a_bank_record_of_a_newer_format_is_refused_and_an_older_ones_gaps_are_said(tmp_path):
    """The record's "format" was never read: a newer layout's bank loaded and scored silently, and an older record
    without input_size scored with input_size=64 a bank built at 32 (a reviewer: AUROC 0.335, 0.992 at 32)."""
    from dn2_lightning import OneClassDataModule

    dm = OneClassDataModule(dataset="digits", normal_class=1, load_size=16, batch_size=512)
    trainer = quiet_trainer()
    trainer.fit(DN2Module(k=2, backbone="efficientnet_lite0", pretrained=False, input_size=32), datamodule=dm)
    trainer.save_checkpoint(tmp_path / "bank.ckpt")
    checkpoint = torch.load(tmp_path / "bank.ckpt", weights_only=True)
    spec = checkpoint["state_dict"]["bank._extra_state"]
    assert spec["format"] == 2
    checkpoint["state_dict"]["bank._extra_state"] = dict(spec, format=3, feature_layer="stage6")
    torch.save(checkpoint, tmp_path / "newer.ckpt")
    with pytest.raises(
        ValueError, match=r"saved by a newer dn2-lightning \(bank format 3; this version reads up to 2\)"
    ):
        quiet_trainer().test(DN2Module.load_from_checkpoint(tmp_path / "newer.ckpt"), datamodule=dm)
    with pytest.raises(ValueError, match=r"saved by a newer dn2-lightning"):  # outside a Trainer too
        DN2Module.load_from_checkpoint(tmp_path / "newer.ckpt").score_images(
            torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
        )
    checkpoint["state_dict"]["bank._extra_state"] = {k: v for k, v in spec.items() if k != "input_size"}
    torch.save(checkpoint, tmp_path / "gap.ckpt")
    # the backbone fingerprint (recorded since) still tells that the bank was embedded at another size
    with pytest.raises(ValueError, match=r"does not embed as the one that built the memory bank"):
        quiet_trainer().test(DN2Module.load_from_checkpoint(tmp_path / "gap.ckpt", input_size=64), datamodule=dm)
    # an older dn2-lightning recorded no fingerprint either
    checkpoint["state_dict"]["bank._extra_state"].pop("fingerprint_size")
    del checkpoint["state_dict"]["bank.fingerprint"]
    torch.save(checkpoint, tmp_path / "older.ckpt")
    with pytest.warns(UserWarning, match=r"does not record input_size .*this model's input_size=64"):
        quiet_trainer().test(DN2Module.load_from_checkpoint(tmp_path / "older.ckpt", input_size=64), datamodule=dm)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*does not record")  # a whole record: nothing to say
        quiet_trainer().test(DN2Module.load_from_checkpoint(tmp_path / "bank.ckpt"), datamodule=dm)


def test_inconsistent_checkpoint_bank_is_a_clear_error_issue11_13(tmp_path):
    trainer = quiet_trainer(default_root_dir=tmp_path, enable_checkpointing=True)
    trainer.fit(DN2Module(k=2, backbone=linear_backbone()), datamodule=BlobDataModule())
    ckpt = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=True)
    ckpt["state_dict"]["bank.sample_indices"] = ckpt["state_dict"]["bank.sample_indices"][:-3]
    torch.save(ckpt, tmp_path / "cut.ckpt")
    with pytest.raises(ValueError, match=r"sample_indices has \(98,\); expected \[N, D\] and \[N\]"):
        DN2Module.load_from_checkpoint(tmp_path / "cut.ckpt", backbone=linear_backbone())


def test_empty_cut_short_or_plain_state_dict_checkpoints_are_named(tmp_path, capsys):
    # a bare EOFError (empty file), KeyError 'pytorch-lightning_version' (a plain state_dict); from the CLI also an
    # AttributeError for a file of one tensor (now a command line error, exit code 2, naming the file)
    from dn2_lightning.cli import build_cli

    def cli_error(ckpt: Path) -> str:
        with pytest.raises(SystemExit) as stopped:
            build_cli(["test", "--config", "configs/digits.yaml", f"--ckpt_path={ckpt}"])
        assert stopped.value.code == 2
        return " ".join(capsys.readouterr().err.split())

    trainer = quiet_trainer(default_root_dir=tmp_path, enable_checkpointing=True)
    model = DN2Module(k=2, backbone=linear_backbone())
    trainer.fit(model, datamodule=BlobDataModule())
    whole = Path(trainer.checkpoint_callback.best_model_path).read_bytes()
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "cut.ckpt").write_bytes(whole[: len(whole) // 2])
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    cases = [
        ("empty.ckpt", r"empty.ckpt is empty \(0 bytes\): a run stopped while writing it, or another file\?"),
        ("cut.ckpt", rf"cut.ckpt is cut short, damaged or not a checkpoint file \({len(whole) // 2} bytes\)"),
        ("plain.pt", r"plain.pt is not a Lightning checkpoint .*model.load_state_dict\(torch.load\(path\)\)"),
        (
            "config.ckpt",
            r"config.ckpt is cut short, damaged or not a checkpoint file \(22 bytes\)",
        ),  # was KeyError: 101
        # bytes that end torch's unpickler with an IndexError: "pop from empty list" (a short YAML file),
        # "index out of range" (a pickle header cut after 4 bytes) were tracebacks, also from dn2 --ckpt_path
        ("short.yaml", r"short.yaml is cut short, damaged or not a checkpoint file \(5 bytes\)"),
        ("header.ckpt", r"header.ckpt is cut short, damaged or not a checkpoint file \(4 bytes\)"),
    ]
    (tmp_path / "config.ckpt").write_text("model:\n  k: 2\nseed: 0\n")
    (tmp_path / "short.yaml").write_text("a: 1\n")
    (tmp_path / "header.ckpt").write_bytes(b"\x80\x02}q")
    for name, match in cases:
        with pytest.raises(ValueError, match=match):
            DN2Module.load_from_checkpoint(tmp_path / name, backbone=linear_backbone())
    assert re.search(r"error: .*tensor.pt is not a Lightning checkpoint", cli_error(tmp_path / "tensor.pt"))
    # a whole checkpoint holding a type weights-only loading refuses (legacy format too): torch's own message
    # advised weights_only=False, which dn2 refuses; the error names the type and how to allow it
    legacy = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=True)
    legacy["extra"] = argparse.Namespace(a=1)
    torch.save(legacy, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    with pytest.raises(
        pickle.UnpicklingError,
        match=r"legacy.ckpt holds an object of type argparse.Namespace.*safe_globals\(\[argparse.Namespace\]\)",
    ):
        DN2Module.load_from_checkpoint(tmp_path / "legacy.ckpt", backbone=linear_backbone())
    with torch.serialization.safe_globals([argparse.Namespace]):  # the way out the message gives
        DN2Module.load_from_checkpoint(tmp_path / "legacy.ckpt", backbone=linear_backbone())
    for name, match in (cases[0], cases[3], cases[4], cases[5]):
        assert re.search(rf"error: .*{match}", cli_error(tmp_path / name))
    with pytest.raises(ValueError, match=cases[1][1]):
        quiet_trainer().test(
            DN2Module(k=2, backbone=linear_backbone()), BlobDataModule(), ckpt_path=tmp_path / "cut.ckpt"
        )


def test_a_datamodule_given_a_path_saves_a_checkpoint_that_loads(tmp_path):
    """``root=pathlib.Path(...)``: Lightning saved the datamodule's hyperparameters with the PosixPath, which
    weights-only loading refuses, so the checkpoint dn2 had written could never be loaded again."""
    from dn2_lightning import OneClassDataModule

    dm = OneClassDataModule("digits", normal_class=0, root=tmp_path / "data", load_size=8, batch_size=64)
    model = DN2Module(k=2, backbone=linear_backbone(in_features=192), reports=False)
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "bank.ckpt")
    assert torch.load(tmp_path / "bank.ckpt", weights_only=True)["datamodule_hyper_parameters"]["root"] == str(
        tmp_path / "data"
    )
    loaded = DN2Module.load_from_checkpoint(tmp_path / "bank.ckpt", backbone=linear_backbone(in_features=192))
    assert torch.equal(loaded.bank.embeddings, model.bank.embeddings)
    fresh = DN2Module(k=2, backbone=linear_backbone(in_features=192), reports=False)
    quiet_trainer().test(fresh, datamodule=dm, ckpt_path=tmp_path / "bank.ckpt")
    quiet_trainer().test(model, datamodule=dm)
    assert torch.equal(fresh.test_scores.scores, model.test_scores.scores)


def test_custom_backbone_checkpoint_asks_for_the_backbone_issue11_14(tmp_path):
    trainer = quiet_trainer(default_root_dir=tmp_path, enable_checkpointing=True)
    trainer.fit(DN2Module(k=2, backbone=linear_backbone()), datamodule=BlobDataModule())
    ckpt = trainer.checkpoint_callback.best_model_path
    with pytest.raises(ValueError, match=r"custom backbone \(Sequential\).*backbone=MyBackbone\(\)"):
        DN2Module.load_from_checkpoint(ckpt)
    assert len(DN2Module.load_from_checkpoint(ckpt, backbone=linear_backbone()).bank) == 101


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def http_server(tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_remote_checkpoints_load_weights_only_issue11_16(tmp_path, http_server, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # where Lightning downloads URLs to
    marker = tmp_path / "code_ran"
    evil = {"state_dict": {}, "hyper_parameters": {"k": 2}, "payload": _RunsCodeWhenUnpickled(marker)}
    torch.save(evil, tmp_path / "evil.ckpt")
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only"):
        DN2Module.load_from_checkpoint(f"{http_server}/evil.ckpt", backbone=linear_backbone())
    with pytest.raises(ValueError, match="weights_only=False would let a checkpoint run arbitrary code"):
        DN2Module.load_from_checkpoint(tmp_path / "evil.ckpt", backbone=linear_backbone(), weights_only=False)
    torch.save(evil, tmp_path / "evil2.ckpt")  # a new name: the first download is cached
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only"):
        quiet_trainer().test(
            DN2Module(backbone=linear_backbone()), datamodule=BlobDataModule(), ckpt_path=f"{http_server}/evil2.ckpt"
        )
    assert not marker.exists(), "the checkpoint's pickled code ran"


def test_predict_tuple_batches_gathers_scores_in_dataset_order():
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone())
    loader = DataLoader(DictDataset(dm.test_images, dm.test_labels), batch_size=7)
    quiet_trainer().test(model, datamodule=dm)
    out = quiet_trainer().predict(model, dataloaders=loader)
    assert torch.equal(model.predict_scores.indices, torch.arange(len(dm.test_images)))
    torch.testing.assert_close(model.predict_scores.scores, torch.cat([o["score"] for o in out]))
    torch.testing.assert_close(model.predict_scores.scores, model.test_scores.scores)


def test_checkpoint_bank_with_a_nan_row_is_refused_issue11_6(tmp_path):
    trainer = quiet_trainer(default_root_dir=tmp_path, enable_checkpointing=True)
    trainer.fit(DN2Module(k=2, backbone=linear_backbone()), datamodule=BlobDataModule())
    ckpt = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=True)
    ckpt["state_dict"]["bank.embeddings"][17, 3] = float("nan")
    torch.save(ckpt, tmp_path / "nan.ckpt")
    model = DN2Module.load_from_checkpoint(tmp_path / "nan.ckpt", backbone=linear_backbone())
    with pytest.raises(ValueError, match=r"NaN or Inf.*\b17\b"):
        quiet_trainer().test(model, datamodule=BlobDataModule())


def test_drop_last_is_named_and_one_tensor_tuples_and_channels_last_batches_are_read_or_explained():
    from torch.utils.data import TensorDataset

    dm = BlobDataModule()  # 101 training images, 71 test images
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    with pytest.warns(UserWarning, match="drop_last=True: its last 5 training samples are not in the memory bank"):
        quiet_trainer().fit(model, train_dataloaders=DataLoader(dm.train_images, batch_size=16, drop_last=True))
    assert len(model.bank) == 96  # what the warning says
    test = TensorDataset(dm.test_images, dm.test_labels)
    with pytest.warns(UserWarning, match="drop_last=True: its last 7 samples are not scored"):
        quiet_trainer().test(model, dataloaders=DataLoader(test, batch_size=16, drop_last=True))

    class Stream(torch.utils.data.IterableDataset):  # an iterable with a length: its sampler has none
        def __iter__(self):
            yield from dm.train_images

        def __len__(self):
            return len(dm.train_images)

    with pytest.warns(UserWarning, match="drop_last=True: its last 5 training samples are not in the memory bank"):
        quiet_trainer().fit(
            DN2Module(k=2, backbone=linear_backbone(), reports=False),
            train_dataloaders=DataLoader(Stream(), batch_size=16, drop_last=True),
        )
    # (images,) from a one-tensor TensorDataset: unlabelled images, scored as a bare tensor batch is
    quiet_trainer().predict(model, dataloaders=DataLoader(TensorDataset(dm.test_images), batch_size=16))
    unlabelled = model.predict_scores.scores
    quiet_trainer().predict(model, dataloaders=DataLoader(dm.test_images, batch_size=16))
    torch.testing.assert_close(unlabelled, model.predict_scores.scores)
    channels_last = DataLoader(dm.test_images.permute(0, 2, 3, 1).contiguous()[:, :7], batch_size=16)
    with pytest.raises(ValueError, match=r"channels last \[B, H, W, C\]\? images.permute\(0, 3, 1, 2\)"):
        quiet_trainer().predict(model, dataloaders=channels_last)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_true_half_precision_is_refused_by_name(precision):
    # it failed deep inside the backbone's first convolution (float32 input, bfloat16 weights)
    with pytest.raises(ValueError, match=rf"precision='{precision}'\) casts .* use precision='bf16-mixed'"):
        quiet_trainer(precision=precision).test(DN2Module(k=2, backbone=linear_backbone()), BlobDataModule())


# --------------------------------------------------------------------------- bad input at the public entry points


def test_score_images_names_empty_inputs_a_bad_batch_size_and_eight_bit_values_in_a_wide_mode(tmp_path):
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer().fit(model, datamodule=dm)
    cases = [  # were torch's aminmax / resize / split errors
        (lambda: model.score_images(torch.zeros(0, 3, 8, 8)), r"images\[0\]: an empty tensor of shape \(0, 3, 8, 8\)"),
        (lambda: model.score_images(torch.zeros(3, 8, 0)), r"images\[0\]: an empty tensor of shape \(3, 8, 0\)"),
        (lambda: model.score_images([dm.test_images[0], Image.new("RGB", (0, 0))]), r"images\[1\]: an empty image"),
        (lambda: model.score_images(dm.test_images, batch_size=0), r"batch_size=0 must be an integer >= 1"),
        # a folder was "no such image file"
        (lambda: model.score_images(tmp_path), rf"images\[0\]: '{tmp_path}' is a folder; give its image files"),
        (lambda: model.score_images(tmp_path / "x.png"), r"images\[0\]: no such image file"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    gray = (dm.test_images[0, 0] * 255).round().to(torch.uint8).numpy()
    with pytest.warns(UserWarning, match=r"a mode 'I' image is read as 16 bit .* values are at most \d+"):
        wide = model.score_images(Image.fromarray(gray.astype(np.int32))).scores
    eight_bit = model.score_images(Image.fromarray(gray)).scores
    assert not torch.allclose(wide, eight_bit)  # what the warning is about: 8-bit values read as 16 bit
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="a mode 'I")
        model.score_images(Image.fromarray(gray.astype(np.int32) * 257))  # 16-bit values: read as meant


def test_a_clean_fraction_that_removes_no_row_says_so():
    """0.01 of 101 rows rounds to 1 removed; 0.004 to none: the bank was left uncleaned without a word."""
    dm = BlobDataModule()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="clean_fraction=")
        quiet_trainer().fit(DN2Module(k=2, backbone=linear_backbone(), clean_fraction=0.01), datamodule=dm)
    model = DN2Module(k=2, backbone=linear_backbone(), clean_fraction=0.004, reports=False)
    with pytest.warns(UserWarning, match=r"clean_fraction=0.004 of 101 training embeddings rounds to none removed"):
        quiet_trainer().fit(model, datamodule=dm)
    assert len(model.bank) == 101


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_dn2_protocol_on_cuda_without_a_gpu_is_refused_before_loading_data():
    from dn2_lightning.protocol import run_protocol

    with pytest.raises(ValueError, match=r"device='cuda', but torch sees no CUDA device here"):
        run_protocol("digits", device="cuda", root="/nonexistent")


def test_synthetic_defects_take_one_kind_as_a_string_and_any_seed(tmp_path):
    from dn2_lightning.data.synthetic import write_synthetic_defects

    small = {"n_train": 1, "n_test_good": 1, "n_test_per_kind": 1, "image_size": 32}
    root = write_synthetic_defects(tmp_path / "one", kinds="scratch", **small)  # was kinds=['s','c','r',...]
    assert sorted(p.name for p in (root / "test").iterdir()) == ["good", "scratch"]
    write_synthetic_defects(tmp_path / "negative", seed=-1, **small)  # as GroupDataModule takes it
    with pytest.raises(ValueError, match=r"seed=1.5 must be an integer"):
        write_synthetic_defects(tmp_path / "bad", seed=1.5, **small)


def test_synthetic_image_sizes_below_32_are_refused(tmp_path):
    """At 8 px a blob's radius (0.4-0.8 px) can miss every pixel centre: test images labelled defective with no
    defect in them. Sizes below the documented minimum of 32 are refused before anything is written."""
    from dn2_lightning.data.synthetic import write_synthetic_defects

    for size in (8, 16, 31):
        with pytest.raises(ValueError, match=rf"image_size={size} must be an integer >= 32"):
            write_synthetic_defects(tmp_path / "set", image_size=size)
    assert not (tmp_path / "set").exists()


def test_a_checkpoint_cleaned_with_one_clean_k_is_refused_with_another(tmp_path):
    # the bank's clean_k was not checked: a clean_k=5 bank loaded with clean_k=50 kept the clean_k=5 cleaning silently
    dm = BlobDataModule()
    for clean_fraction in (0.3, 0.0):
        trainer = quiet_trainer()
        trainer.fit(
            DN2Module(k=2, backbone=linear_backbone(), clean_fraction=clean_fraction, clean_k=5, reports=False),
            datamodule=dm,
        )
        trainer.save_checkpoint(tmp_path / f"{clean_fraction}.ckpt")
    with pytest.raises(ValueError, match=r"clean_k=5 \(checkpoint\) vs clean_k=50"):
        DN2Module.load_from_checkpoint(tmp_path / "0.3.ckpt", backbone=linear_backbone(), clean_k=50)
    # without cleaning, clean_k does not shape the bank: any value loads
    loaded = DN2Module.load_from_checkpoint(tmp_path / "0.0.ckpt", backbone=linear_backbone(), clean_k=50)
    assert loaded.hparams.clean_k == 50 and len(loaded.bank) == len(dm.train_images)


def test_one_dataset_index_shared_by_two_training_samples_is_refused():
    # one process tolerated one repeated index (as if DDP padding): the second sample's row was silently dropped
    class SharedLastIndex(DictDataset):
        def __getitem__(self, i: int) -> dict:
            return {**super().__getitem__(i), "index": torch.tensor(min(i, len(self) - 2))}

    dm = BlobDataModule(n_train=101)
    data = SharedLastIndex(dm.train_images, torch.zeros(len(dm.train_images), dtype=torch.long))
    with pytest.raises(ValueError, match=r"1 of 101 .*share their dataset 'index' with another sample .*\[99\]"):
        quiet_trainer().fit(DN2Module(k=2, backbone=linear_backbone(), reports=False), DataLoader(data, batch_size=16))


def test_float_pixels_exactly_at_zero_and_one_are_read_and_just_outside_refused():
    # ToTensor maps 0 and 255 to exactly 0.0 and 1.0: both ends of [0, 1] are valid pixels
    images = torch.zeros(2, 3, 4, 4)
    images[0] = 1.0
    parsed = unpack_batch(images)
    assert torch.equal(parsed.images, images)
    for outside in (1 + 2**-20, -(2**-20)):
        bad = images.clone()
        bad[1, 0, 0, 0] = outside
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            unpack_batch(bad)


def test_samples_without_labels_are_labelled_unknown_not_normal():
    images = torch.rand(3, 3, 8, 8) * 0.5
    for batch in (images, (images,), {"image": images}):
        assert unpack_batch(batch).labels.tolist() == [-1, -1, -1]
    # through the module: an unlabelled predict set comes back labelled -1 (unknown), never 0 (normal)
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    loader = DataLoader(TensorDataset(dm.test_images), batch_size=16)
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=dm)
    out = trainer.predict(model, dataloaders=loader)
    assert torch.cat([o["label"] for o in out]).tolist() == [-1] * len(dm.test_images)
    assert model.predict_scores.labels.tolist() == [-1] * len(dm.test_images)


def test_a_tuple_batchs_third_element_of_more_than_one_dimension_is_not_read_as_indices():
    images, labels = torch.rand(4, 3, 8, 8) * 0.5, torch.zeros(4, dtype=torch.long)
    assert unpack_batch((images, labels, torch.arange(4))).indices.tolist() == [0, 1, 2, 3]
    for third in (torch.zeros(4, 8, 8, dtype=torch.long), torch.arange(4)[:, None]):  # a mask, a column of ids
        with pytest.raises(ValueError, match="dataset indices"):
            unpack_batch((images, labels, third))


def test_a_checkpoint_whose_weights_have_other_shapes_is_refused_naming_them(tmp_path):
    # same embedding size (16), other hidden layer: the weights cannot be loaded into this backbone
    def backbone(hidden: int) -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, hidden), torch.nn.Linear(hidden, 16))

    model = DN2Module(k=2, backbone=backbone(8), reports=False)
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=BlobDataModule())
    trainer.save_checkpoint(tmp_path / "eight.ckpt")
    expected = r"do not fit this model: backbone\.trunk\.1\.weight is \[8, 192\] in the checkpoint but \[4, 192\]"
    with pytest.raises(ValueError, match=expected):
        DN2Module.load_from_checkpoint(tmp_path / "eight.ckpt", backbone=backbone(4))
    loaded = DN2Module.load_from_checkpoint(tmp_path / "eight.ckpt", backbone=backbone(8))
    assert torch.equal(loaded.bank.embeddings, model.bank.embeddings)


def test_a_misspelt_load_from_checkpoint_override_is_refused_naming_the_setting(tmp_path):
    """Lightning drops keyword arguments that are no __init__ parameter: threshhold_quantile=0.5 left the saved
    0.99 in force, and K=5 left k=2, without a word (a review of the public API)."""
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=BlobDataModule())
    trainer.save_checkpoint(tmp_path / "bank.ckpt")
    with pytest.raises(TypeError, match=r"'threshhold_quantile' \(did you mean 'threshold_quantile'\?\)"):
        DN2Module.load_from_checkpoint(tmp_path / "bank.ckpt", backbone=linear_backbone(), threshhold_quantile=0.5)
    with pytest.raises(TypeError, match=r"'K' \(did you mean 'k'\?\)|'K'.*settings it takes: k, backbone"):
        DN2Module.load_from_checkpoint(tmp_path / "bank.ckpt", backbone=linear_backbone(), K=5)
    loaded = DN2Module.load_from_checkpoint(
        tmp_path / "bank.ckpt", map_location="cpu", backbone=linear_backbone(), threshold_quantile=0.5, k=3
    )
    assert (loaded.hparams.threshold_quantile, loaded.hparams.k) == (0.5, 3)

    # a misspelt hparams_file: Lightning warned "Missing Tags" and used the checkpoint's settings
    import fsspec

    with pytest.raises(FileNotFoundError, match=r"hparams_file='.*hparam\.yaml' is not a file: give the path of"):
        DN2Module.load_from_checkpoint(tmp_path / "bank.ckpt", hparams_file=tmp_path / "hparam.yaml")
    (tmp_path / "hparams.yaml").write_text("k: 5\n")
    from_file = DN2Module.load_from_checkpoint(
        tmp_path / "bank.ckpt", hparams_file=tmp_path / "hparams.yaml", backbone=linear_backbone()
    )
    assert from_file.hparams.k == 5
    with fsspec.open("memory://dn2-hparams/hparams.yaml", "w") as f:  # read through fsspec, as Lightning reads it
        f.write("k: 4\n")
    remote = DN2Module.load_from_checkpoint(
        tmp_path / "bank.ckpt", hparams_file="memory://dn2-hparams/hparams.yaml", backbone=linear_backbone()
    )
    assert remote.hparams.k == 4
    with pytest.raises(FileNotFoundError, match="is not a file"):
        DN2Module.load_from_checkpoint(tmp_path / "bank.ckpt", hparams_file="memory://dn2-hparams/hparam.yaml")

    class Sub(DN2Module):  # a subclass taking **kwargs: Lightning passes every keyword on, and so do we
        def __init__(self, extra: int = 1, **kwargs) -> None:
            super().__init__(**kwargs)

    assert Sub.load_from_checkpoint(tmp_path / "bank.ckpt", backbone=linear_backbone(), k=3).hparams.k == 3


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 18.00 GiB."),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: 9663676416"),
    ],
)
def test_a_backbone_out_of_memory_names_the_batch_size_and_input_size(error):
    """Out of memory inside the backbone gave torch's message alone, from deep inside the forward: it now says what to
    lower, keeping the exception's type (Lightning and user code catch torch.OutOfMemoryError)."""
    from helpers import BlobDataModule, linear_backbone, quiet_trainer

    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)

    def out_of_memory(*args, **kwargs):
        raise error

    model.backbone.forward = out_of_memory
    expected = r"(?s)alloc.*DN2 ran out of memory embedding a batch of 16 images on cpu: lower the batch size .*size"
    with pytest.raises(type(error), match=expected) as caught:
        quiet_trainer().fit(model, datamodule=BlobDataModule())
    assert type(caught.value) is type(error)
    assert "--data.batch_size" in str(caught.value) and "--model.input_size" in str(caught.value)


def test_an_out_of_memory_it_cannot_rebuild_keeps_its_type_and_message():
    """A RuntimeError subclass with its own constructor (torch._dynamo's BackendCompilerFailed wraps an OOM raised
    while compiling a backbone) became a TypeError from the hint's re-raise, the OOM only its context."""
    import sys

    from dn2_lightning.backbones import out_of_memory_hint

    class Wrapped(RuntimeError):
        def __init__(self, backend: str, inner: str) -> None:
            super().__init__(f"{backend}: {inner}")

    with pytest.raises(Wrapped, match="inductor: DefaultCPUAllocator: can't allocate memory") as caught:
        with out_of_memory_hint(lambda: "lower the batch size"):
            raise Wrapped("inductor", "DefaultCPUAllocator: can't allocate memory")
    if sys.version_info >= (3, 11):
        assert caught.value.__notes__ == ["lower the batch size"]
    with pytest.raises(RuntimeError, match="^shape mismatch$"):  # not an OOM: untouched
        with out_of_memory_hint(lambda: "lower the batch size"):
            raise RuntimeError("shape mismatch")

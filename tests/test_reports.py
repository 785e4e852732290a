"""Reports: per-sample CSV, PNG figures, predictions on a folder with a corrupt file."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from helpers import BlobDataModule, linear_backbone, quiet_trainer
from PIL import Image
from test_data import make_folder

from dn2_lightning import DN2Module, OneClassDataModule
from dn2_lightning.cli import build_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_test_writes_scores_csv_and_valid_png_figures(tmp_path):
    dm = OneClassDataModule(dataset="digits", normal_class=0, batch_size=128)
    model = DN2Module(k=3, backbone=linear_backbone())
    quiet_trainer(default_root_dir=tmp_path).test(model, datamodule=dm)
    rows = read_csv(tmp_path / "scores.csv")
    assert list(rows[0]) == [
        "index",
        "path",
        "label",
        "score",
        "is_anomaly",
        "neighbour_0",
        "neighbour_1",
        "neighbour_2",
    ]
    assert len(rows) == len(dm.test_dataset)
    np.testing.assert_allclose([float(r["score"]) for r in rows], model.test_scores.scores.numpy(), rtol=1e-6)
    assert [int(r["is_anomaly"]) for r in rows] == (model.test_scores.scores > model.threshold).int().tolist()
    for name in ("roc.png", "score_histogram.png", "top_anomalies.png"):
        png = tmp_path / "figures" / name
        assert png.read_bytes()[:8] == PNG_MAGIC
        with Image.open(png) as img:
            assert img.size[0] > 100 and img.size[1] > 100


def test_reports_can_be_switched_off(tmp_path):
    quiet_trainer(default_root_dir=tmp_path).test(
        DN2Module(k=2, backbone=linear_backbone(), reports=False), datamodule=BlobDataModule()
    )
    assert not (tmp_path / "scores.csv").exists()


def test_threshold_uses_train_data_only():
    """Changing every test label changes the AUROC but never the threshold."""
    a, b = BlobDataModule(), BlobDataModule()
    b.test_labels = 1 - b.test_labels
    ma, mb = DN2Module(k=2, backbone=linear_backbone()), DN2Module(k=2, backbone=linear_backbone())
    ra = quiet_trainer().test(ma, datamodule=a)[0]["test/auroc"]
    rb = quiet_trainer().test(mb, datamodule=b)[0]["test/auroc"]
    assert ra != rb and torch.equal(ma.threshold, mb.threshold) and torch.isfinite(ma.threshold)


def test_cli_predict_on_a_folder_with_a_corrupt_file(tmp_path):
    images = make_folder(tmp_path / "images")
    common = [
        "--config",
        "configs/folder.yaml",
        f"--data.root={images}",
        "--model.backbone=efficientnet_lite0",
        "--model.input_size=32",
        "--data.load_size=32",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=false",
    ]
    fit = build_cli(["fit", *common])
    ckpt = fit.trainer.checkpoint_callback.best_model_path
    new = tmp_path / "new"
    new.mkdir()
    for i in range(3):
        Image.fromarray(np.full((12, 12, 3), 40 * i, dtype=np.uint8)).save(new / f"img{i}.jpg")
    (new / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
    predict = build_cli(["predict", *common, f"--data.root={new}", f"--ckpt_path={ckpt}"])
    rows = read_csv(Path(predict.trainer.default_root_dir) / "predictions.csv")
    assert [Path(r["path"]).name for r in rows] == ["img0.jpg", "img1.jpg", "img2.jpg"]
    assert {r["is_anomaly"] for r in rows} <= {"0", "1"} and all(float(r["score"]) >= 0 for r in rows)
    assert predict.datamodule.predict_dataset.skipped == [new / "corrupt.jpg"]

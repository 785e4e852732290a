"""Reports: one CSV layout for test and predict, summary.json, PNG figures, run folders, safe text cells."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BlobDataModule, dn2_messages, linear_backbone, quiet_trainer
from PIL import Image
from test_data import make_folder
from torch.utils.data import DataLoader, TensorDataset

from dn2_lightning import AnomalyScores, DN2Module, OneClassDataModule
from dn2_lightning.cli import build_cli
from dn2_lightning.reports import (
    csv_columns,
    escape_cell,
    read_report,
    scores_from_predictions,
    summarize,
    unescape_cell,
    write_scores_csv,
    write_summary,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def only_run_dir(root: Path, stage: str) -> Path:
    runs = sorted((root / "dn2_reports").glob(f"{stage}_*"))
    assert len(runs) == 1, runs
    return runs[0]


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as img:
        assert img.size[0] > 100 and img.size[1] > 100


def test_test_writes_scores_csv_summary_and_valid_png_figures(tmp_path):
    dm = OneClassDataModule(dataset="digits", normal_class=0, batch_size=128)
    model = DN2Module(k=3, backbone=linear_backbone())
    quiet_trainer(default_root_dir=tmp_path).test(model, datamodule=dm)
    out = only_run_dir(tmp_path, "test")
    rows = read_csv(out / "scores.csv")
    assert list(rows[0]) == csv_columns(3)
    assert list(rows[0])[:7] == ["index", "path", "label", "score", "normalized_score", "is_anomaly", "threshold"]
    assert len(rows) == len(dm.test_dataset)
    scores = model.test_scores
    np.testing.assert_allclose([float(r["score"]) for r in rows], scores.scores.numpy(), rtol=1e-6)
    assert [int(r["is_anomaly"]) for r in rows] == (scores.scores > model.threshold).int().tolist()
    assert all(float(r["threshold"]) == pytest.approx(float(model.threshold), rel=1e-7) for r in rows)
    for j in range(3):
        assert [int(r[f"neighbour_{j}"]) for r in rows] == scores.neighbours[:, j].tolist()
        np.testing.assert_allclose([float(r[f"distance_{j}"]) for r in rows], scores.distances[:, j], rtol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_scored"] == len(dm.test_dataset)
    assert summary["n_flagged"] == sum(int(r["is_anomaly"]) for r in rows)
    caught = sum(int(r["is_anomaly"]) for r in rows if r["label"] == "1")
    false_alarms = sum(int(r["is_anomaly"]) for r in rows if r["label"] == "0")
    assert (summary["n_flagged_anomalous"], summary["n_flagged_normal"]) == (caught, false_alarms)
    assert summary["threshold"] == pytest.approx(float(model.threshold))
    from sklearn.metrics import roc_auc_score

    # exact (it was torchmetrics' float32 value, 1e-7 off)
    assert summary["auroc"] == pytest.approx(roc_auc_score(scores.labels, scores.scores.double()), abs=1e-12)
    for name in ("roc.png", "score_histogram.png", "top_anomalies.png"):
        assert_png(out / "figures" / name)
    assert set(summary["files"]) == {"csv", "roc", "histogram", "top_anomalies"}


def test_the_users_own_report_callback_is_kept_and_a_second_stage_overrides_nothing(tmp_path, caplog):
    """Trainer(callbacks=[EvaluationReport(out_dir=...)]) was replaced by the module's own report (reports went to
    default_root_dir), and every stage after the first said it overrode "callbacks passed to Trainer"."""
    import logging

    from dn2_lightning.reports import EvaluationReport

    dm = BlobDataModule()
    trainer = quiet_trainer(default_root_dir=tmp_path / "root", callbacks=[EvaluationReport(out_dir=tmp_path / "mine")])
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        trainer.test(DN2Module(k=2, backbone=linear_backbone()), datamodule=dm)
        model = DN2Module(k=2, backbone=linear_backbone())
        plain = quiet_trainer(default_root_dir=tmp_path / "plain")
        plain.fit(model, datamodule=dm)
        plain.test(model, datamodule=dm)
        plain.predict(model, datamodule=dm)
    assert "will override existing callbacks" not in caplog.text
    assert only_run_dir(tmp_path / "mine", "test").joinpath("scores.csv").is_file()
    assert not (tmp_path / "root" / "dn2_reports").exists()
    assert sum(isinstance(c, EvaluationReport) for c in trainer.callbacks) == 1
    assert only_run_dir(tmp_path / "plain", "test").joinpath("scores.csv").is_file()
    assert only_run_dir(tmp_path / "plain", "predict").joinpath("predictions.csv").is_file()


def test_normalized_score_is_the_models_when_it_offers_one(tmp_path):
    model = DN2Module(k=2, backbone=linear_backbone())
    quiet_trainer(default_root_dir=tmp_path).test(model, datamodule=BlobDataModule())
    rows = read_csv(only_run_dir(tmp_path, "test") / "scores.csv")
    if not hasattr(model, "normalized"):
        assert {r["normalized_score"] for r in rows} == {""}
        pytest.skip("DN2Module.normalized is not merged yet")
    expected = model.normalized(model.test_scores.scores).numpy()
    np.testing.assert_allclose([float(r["normalized_score"]) for r in rows], expected, rtol=1e-5)
    order = np.argsort([float(r["score"]) for r in rows])
    assert (np.diff(expected[order]) >= 0).all() and ((expected >= 0) & (expected <= 1)).all()


def test_predict_writes_the_same_columns_a_summary_and_figures(tmp_path):
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone())
    trainer = quiet_trainer(default_root_dir=tmp_path)
    trainer.test(model, datamodule=dm)
    trainer.predict(model, datamodule=dm)
    test_rows = read_csv(only_run_dir(tmp_path, "test") / "scores.csv")
    out = only_run_dir(tmp_path, "predict")
    rows = read_csv(out / "predictions.csv")
    assert list(rows[0]) == list(test_rows[0]) == csv_columns(2)
    assert [r["index"] for r in rows] == [str(i) for i in range(len(dm.test_images))]
    for mine, theirs in zip(rows, test_rows, strict=True):  # the same images: the same scores and neighbours
        assert float(mine["score"]) == pytest.approx(float(theirs["score"]), rel=1e-6)
        assert mine["neighbour_0"] == theirs["neighbour_0"] and mine["is_anomaly"] == theirs["is_anomaly"]
    summary = json.loads((out / "summary.json").read_text())
    scores = np.array([float(r["score"]) for r in rows])
    assert summary["stage"] == "predict" and summary["n_scored"] == len(rows)
    assert summary["threshold"] == pytest.approx(float(model.threshold))
    flagged = int((scores > float(model.threshold)).sum())
    assert summary["n_flagged"] == flagged == sum(int(r["is_anomaly"]) for r in rows)
    for name in ("score_histogram.png", "top_anomalies.png"):
        assert_png(out / "figures" / name)


class ModuleWithPredictScores(DN2Module):
    """Exposes ``predict_scores`` (gathered by the module in its own on_predict_epoch_end, as DDP needs), here
    rank 0's predictions with every score doubled, so the report shows which source it used."""

    def on_predict_epoch_end(self) -> None:
        scores, _ = scores_from_predictions(self.trainer.predict_loop.predictions)
        scores.scores = scores.scores * 2
        self.predict_scores = scores


def test_predict_reports_use_the_modules_predict_scores_when_it_has_them(tmp_path):
    dm = BlobDataModule()
    plain, gathered = (
        DN2Module(k=2, backbone=linear_backbone()),
        ModuleWithPredictScores(k=2, backbone=linear_backbone()),
    )
    quiet_trainer(default_root_dir=tmp_path / "plain").predict(plain, datamodule=dm)
    quiet_trainer(default_root_dir=tmp_path / "gathered").predict(gathered, datamodule=dm)
    a = read_csv(only_run_dir(tmp_path / "plain", "predict") / "predictions.csv")
    b = read_csv(only_run_dir(tmp_path / "gathered", "predict") / "predictions.csv")
    assert len(a) == len(b) == len(dm.test_images)
    for x, y in zip(a, b, strict=True):
        assert float(y["score"]) == pytest.approx(2 * float(x["score"]), rel=1e-6)


def test_reports_never_overwrite_and_never_land_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = DN2Module(k=2, backbone=linear_backbone())
    for _ in range(2):
        quiet_trainer(default_root_dir=None).test(model, datamodule=BlobDataModule())
    assert not (tmp_path / "scores.csv").exists() and not (tmp_path / "figures").exists()
    runs = sorted(p.name for p in (tmp_path / "dn2_reports").iterdir())
    assert runs == ["test_0", "test_1"]
    first = (tmp_path / "dn2_reports/test_0/scores.csv").read_bytes()
    assert first == (tmp_path / "dn2_reports/test_1/scores.csv").read_bytes()  # same run twice, both kept


def test_a_test_refused_before_scoring_leaves_no_empty_report_folder_and_summaries_name_k_and_checkpoint(tmp_path):
    dm = OneClassDataModule("digits", normal_class=0, batch_size=128)
    model = DN2Module(k=2, backbone=linear_backbone(in_features=3 * 32 * 32), input_size=32)
    trainer = quiet_trainer(default_root_dir=tmp_path)
    trainer.test(model, datamodule=dm)
    with pytest.raises(ValueError, match="normal_class=0 \\(bank\\) vs normal_class=3"):
        quiet_trainer(default_root_dir=tmp_path).test(model, datamodule=OneClassDataModule("digits", normal_class=3))
    assert sorted(p.name for p in (tmp_path / "dn2_reports").iterdir()) == ["test_0"]  # no empty test_1
    trainer.save_checkpoint(tmp_path / "bank.ckpt")
    quiet_trainer(default_root_dir=tmp_path).test(model, datamodule=dm, ckpt_path=tmp_path / "bank.ckpt")
    first, second = (json.loads((tmp_path / f"dn2_reports/test_{n}/summary.json").read_text()) for n in "01")
    assert (first["k"], first["ckpt_path"]) == (2, None)
    assert (second["k"], second["ckpt_path"]) == (2, str(tmp_path / "bank.ckpt"))


def test_a_run_refused_before_writing_leaves_no_empty_report_folders(tmp_path):
    model = DN2Module(k=2, backbone=linear_backbone())  # no bank, and no train data to build one from
    with pytest.raises(Exception, match="memory bank"):
        quiet_trainer(default_root_dir=tmp_path).test(model, BlobDataModule().test_dataloader())
    assert not (tmp_path / "dn2_reports").exists()


def test_reports_can_be_switched_off(tmp_path):
    quiet_trainer(default_root_dir=tmp_path).test(
        DN2Module(k=2, backbone=linear_backbone(), reports=False), datamodule=BlobDataModule()
    )
    assert not (tmp_path / "dn2_reports").exists() and not (tmp_path / "scores.csv").exists()


def test_threshold_uses_train_data_only():
    """Changing every test label changes the AUROC but never the threshold."""
    a, b = BlobDataModule(), BlobDataModule()
    b.test_labels = 1 - b.test_labels
    ma, mb = DN2Module(k=2, backbone=linear_backbone()), DN2Module(k=2, backbone=linear_backbone())
    ra = quiet_trainer().test(ma, datamodule=a)[0]["test/auroc"]
    rb = quiet_trainer().test(mb, datamodule=b)[0]["test/auroc"]
    assert ra != rb and torch.equal(ma.threshold, mb.threshold) and torch.isfinite(ma.threshold)


def test_a_score_equal_to_the_threshold_is_not_an_anomaly():
    """is_anomaly is score > threshold, strictly: the median of five scores is one of them and stays normal.
    Guards the comparison (>= flagged 3 of 5 scores above their own median)."""
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    threshold = float(np.quantile(scores.numpy(), 0.5))
    assert threshold in scores.tolist()
    zeros = torch.zeros(5, dtype=torch.long)
    result = AnomalyScores(torch.arange(5), scores, zeros, zeros[:, None], torch.zeros(5, 1), threshold=threshold)
    assert torch.equal(result.is_anomaly, scores > threshold)
    assert result.is_anomaly.tolist() == [False, False, False, True, True]


def test_summary_records_how_the_threshold_was_set(tmp_path):
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), threshold=0.25)
    trainer = quiet_trainer(default_root_dir=tmp_path)
    trainer.test(model, datamodule=dm)
    model.set_threshold(quantile=0.9)
    trainer.test(model, datamodule=dm)
    model.set_threshold(value=0.5)
    trainer.test(model, datamodule=dm)
    summaries = [json.loads((tmp_path / f"dn2_reports/test_{n}/summary.json").read_text()) for n in range(3)]
    fixed, quantile, fixed_again = summaries
    for summary, value in ((fixed, 0.25), (fixed_again, 0.5)):
        assert summary["threshold"] == value
        assert summary["threshold_source"] == "value" and summary["threshold_quantile"] is None
    assert quantile["threshold_source"] == "quantile of the training images' leave-one-out scores"
    assert quantile["threshold_quantile"] == 0.9
    assert quantile["threshold"] == pytest.approx(np.quantile(model.bank.loo_scores.double().numpy(), 0.9))


# ------------------------------------------------------------------------------------ text cells

TRICKY = ["=HYPERLINK(1)", "+1", "-2+3", "@SUM(A1)", "\tx.png", "\rx.png", "'quoted.png", "/data/a.png", "ü.png", ""]


def owasp_reference(text: str) -> str:
    """OWASP CSV-injection advice, written out independently: prefix a single quote to a cell that starts
    with = + - @ tab or carriage return (and to one starting with a quote, so the rule can be undone)."""
    return "'" + text if text[:1] in {"=", "+", "-", "@", "\t", "\r", "'"} else text


def small_scores(n: int) -> AnomalyScores:
    zeros = torch.zeros(n, dtype=torch.long)
    return AnomalyScores(torch.arange(n), torch.linspace(0, 1, n), zeros, zeros[:, None], torch.zeros(n, 1))


def test_formula_like_paths_are_escaped_as_owasp_advises_and_restored(tmp_path):
    assert [escape_cell(t) for t in TRICKY] == [owasp_reference(t) for t in TRICKY]
    assert [unescape_cell(escape_cell(t)) for t in TRICKY] == TRICKY
    path = write_scores_csv(small_scores(len(TRICKY)), tmp_path / "scores.csv", TRICKY, threshold=0.5)
    cells = [r["path"] for r in read_csv(path)]
    assert cells == [owasp_reference(t) for t in TRICKY]
    assert not any(c[:1] in {"=", "+", "-", "@", "\t", "\r"} for c in cells)
    assert [r["path"] for r in read_report(path)] == TRICKY


def test_a_report_cut_short_is_refused_naming_the_file(tmp_path):
    scores = small_scores(20)
    paths = [f"/data/part_{i}.png" for i in range(20)]
    csv_path = write_scores_csv(scores, tmp_path / "scores.csv", paths, threshold=0.5)
    write_summary(summarize("test", scores, 0.5), tmp_path / "summary.json")
    assert [r["path"] for r in read_report(csv_path)] == paths  # complete: reads
    data = csv_path.read_bytes()
    row_end = data.index(b"\r\n", len(data) // 2) + 2
    for cut, reason in [(row_end + 25, "cut short"), (row_end, r"holds \d+ rows but summary.json says 20")]:
        csv_path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"scores\.csv is incomplete \(.*{reason}.*\).*Rerun `dn2 test`"):
            read_report(csv_path)
    (tmp_path / "summary.json").unlink()  # without a summary, a row cut short is still caught
    csv_path.write_bytes(data[: row_end + 25])
    with pytest.raises(ValueError, match="incomplete"):
        read_report(csv_path)


def test_a_failed_write_leaves_the_previous_csv_whole(tmp_path):
    class FailingPaths(list):
        def __getitem__(self, i):
            if i == 10:
                raise OSError("disk full")
            return super().__getitem__(i)

    scores = small_scores(20)
    csv_path = write_scores_csv(scores, tmp_path / "scores.csv", [f"old_{i}.png" for i in range(20)])
    before = csv_path.read_bytes()
    with pytest.raises(OSError, match="disk full"):
        write_scores_csv(scores, csv_path, FailingPaths(f"new_{i}.png" for i in range(20)))
    assert csv_path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["scores.csv"]  # no temporary file left behind


@pytest.mark.skipif(sys.platform != "linux", reason="file names with undecodable bytes are a POSIX thing")
def test_a_non_utf8_file_name_does_not_stop_the_reports(tmp_path):
    images = make_folder(tmp_path / "images", corrupt=False)
    odd = os.path.join(os.fsencode(images / "test" / "scratch"), b"\xe9t\xe9.png")
    Image.fromarray(np.full((20, 30, 3), 200, dtype=np.uint8)).save(odd)
    dm = OneClassDataModule(dataset="folder", root=str(images), load_size=16, batch_size=4)
    model = DN2Module(k=2, backbone=linear_backbone(in_features=3 * 16 * 16))
    trainer = quiet_trainer(default_root_dir=tmp_path / "runs")
    trainer.test(model, datamodule=dm)
    trainer.predict(model, datamodule=dm)
    true_paths = [str(p) for p in dm.test_dataset.paths]
    assert os.fsdecode(odd) in true_paths
    for stage, name in (("test", "scores.csv"), ("predict", "predictions.csv")):
        out = only_run_dir(tmp_path / "runs", stage)
        raw = (out / name).read_bytes()
        raw.decode("utf-8")  # the whole file is valid UTF-8
        rows = read_csv(out / name)
        assert len(rows) == len(true_paths) == 6  # every row, not stopped at the odd name
        assert any(r["path"].endswith("\\xe9t\\xe9.png") for r in rows)  # readable escape in the CSV
        restored = [r["path"] for r in read_report(out / name)]
        assert restored == true_paths and all(os.path.exists(p) for p in restored)
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        index = str(true_paths.index(os.fsdecode(odd)))
        assert bytes.fromhex(summary["escaped_paths"][index]) == odd
        assert summary["n_scored"] == 6


# ------------------------------------------------------------------------------------------- CLI


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
    out = only_run_dir(Path(predict.trainer.default_root_dir), "predict")
    rows = read_report(out / "predictions.csv")
    assert [Path(r["path"]).name for r in rows] == ["img0.jpg", "img1.jpg", "img2.jpg"]
    assert {r["is_anomaly"] for r in rows} <= {"0", "1"} and all(float(r["score"]) >= 0 for r in rows)
    assert {r["label"] for r in rows} == {"-1"}  # a flat folder: labels unknown
    assert predict.datamodule.predict_dataset.skipped == [new / "corrupt.jpg"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_scored"] == 3 and summary["auroc"] is None
    assert summary["n_flagged"] == sum(int(r["is_anomaly"]) for r in rows)
    assert "roc" not in summary["files"] and Path(summary["files"]["top_anomalies"]).is_file()


def test_predict_on_dataloaders_after_a_datamodule_fit_reports_the_samples_it_read(tmp_path):
    """A Trainer keeps the datamodule of an earlier call: predicting other dataloaders on it wrote the old
    datamodule's files into predictions.csv and predict_scores, drew its images in top_anomalies.png under the new
    scores, and crashed (IndexError) given more samples than it has."""
    from dn2_lightning.reports import _dataset_of, _image_reader

    dm = OneClassDataModule(dataset="folder", root=str(make_folder(tmp_path / "images", corrupt=False)), load_size=8)
    model = DN2Module(k=2, backbone=linear_backbone())
    trainer = quiet_trainer(default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    new = torch.rand(9, 3, 8, 8, generator=torch.Generator().manual_seed(3))  # 9 > the folder's 5, no files
    trainer.predict(model, dataloaders=DataLoader(TensorDataset(new), batch_size=4))
    out = only_run_dir(tmp_path, "predict")
    rows = read_csv(out / "predictions.csv")
    assert [r["index"] for r in rows] == [str(i) for i in range(9)] and {r["path"] for r in rows} == {""}
    assert not any(model.predict_scores.paths or [])
    reference = model.score_images(new).scores
    np.testing.assert_allclose([float(r["score"]) for r in rows], reference.numpy(), rtol=1e-5)
    assert "top_anomalies" in json.loads((out / "summary.json").read_text())["files"]  # of these samples:
    image_of = _image_reader(*_dataset_of(trainer, "predict"))
    assert all(torch.equal(image_of(i), new[i]) for i in range(9))
    fresh, loader = DN2Module(k=2, backbone=linear_backbone()), DataLoader(TensorDataset(new, new[:, 0, 0, 0]))
    with pytest.raises(RuntimeError, match="has no memory bank yet"):  # nor builds a new model's bank from it
        trainer.test(fresh, dataloaders=loader)
    trainer.predict(model, datamodule=dm)  # the datamodule's own samples keep their files
    rows = read_csv(sorted((tmp_path / "dn2_reports").glob("predict_*"))[-1] / "predictions.csv")
    assert [Path(r["path"]).name for r in rows] == ["0.png", "1.png", "2.png", "0.png", "1.png"]


def test_a_score_equal_to_the_threshold_is_not_flagged_in_any_output(tmp_path):
    # guards >= in place of > in predict_step, score_images, the CSVs or summary.json's n_flagged
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone())
    trainer = quiet_trainer(default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    reference = model.score_images(dm.test_images).scores
    j = int(torch.argsort(reference)[len(reference) // 2])
    model.set_threshold(value=float(reference[j]))
    t = float(model.threshold)
    assert t == float(reference[j])  # the threshold is exactly one image's score
    expected = int((reference > t).sum())
    direct = model.score_images(dm.test_images)
    assert not bool(direct.is_anomaly[j]) and int(direct.is_anomaly.sum()) == expected
    out = trainer.predict(model, datamodule=dm)
    scores, flags = torch.cat([o["score"] for o in out]), torch.cat([o["is_anomaly"] for o in out])
    assert float(scores[j]) == t and not bool(flags[j]) and int(flags.sum()) == expected
    trainer.test(model, datamodule=dm)
    for stage, name in (("predict", "predictions.csv"), ("test", "scores.csv")):
        folder = only_run_dir(tmp_path, stage)
        rows = {int(r["index"]): r for r in read_report(folder / name)}
        assert rows[j]["is_anomaly"] == "0"
        assert sum(int(r["is_anomaly"]) for r in rows.values()) == expected
        assert json.loads((folder / "summary.json").read_text())["n_flagged"] == expected


def test_top_anomalies_show_the_samples_scored_or_are_not_drawn(tmp_path):
    """The figure read sample ``index`` at ``dataset[index]``: a Subset of a folder dataset (its samples carry the
    wrapped dataset's indices) raised IndexError after scoring, losing summary.json and trainer.test's result, or
    drew other images under the scores; so did samples whose index is not their position, or that carry none and
    were read shuffled."""
    from torch.utils.data import Dataset, IterableDataset, Subset

    from dn2_lightning.reports import _dataset_of, _image_reader

    dm = OneClassDataModule(dataset="folder", root=str(make_folder(tmp_path / "images", corrupt=False)), load_size=8)
    dm.setup()
    model = DN2Module(k=2, backbone=linear_backbone())
    trainer = quiet_trainer(default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, dataloaders=DataLoader(Subset(dm.test_dataset, [4, 2, 3]), batch_size=2))
    assert sorted(model.test_scores.indices.tolist()) == [2, 3, 4]
    assert "top_anomalies" in json.loads((only_run_dir(tmp_path, "test") / "summary.json").read_text())["files"]
    image_of = _image_reader(*_dataset_of(trainer, "test"))
    for index in model.test_scores.indices.tolist():
        assert torch.equal(image_of(index), dm.test_dataset[index]["image"])

    class Renumbered(Dataset):  # indices that are no positions
        def __len__(self) -> int:
            return len(dm.test_dataset)

        def __getitem__(self, i: int) -> dict:
            return {**dm.test_dataset[i], "index": i + 10}

    class Unnumbered(Renumbered):
        def __getitem__(self, i: int) -> dict:
            return {key: value for key, value in dm.test_dataset[i].items() if key != "index"}

    with pytest.warns(
        UserWarning, match=r"top anomalies are not drawn \(LookupError: no sample of the Renumbered at position 1\d "
    ):
        trainer.test(model, dataloaders=DataLoader(Renumbered(), batch_size=2))
    with pytest.warns(UserWarning, match=r"does not read in order .*draws no top anomalies"):
        trainer.test(model, dataloaders=DataLoader(Unnumbered(), batch_size=2, shuffle=True))
    reversed_batches = [[4, 3], [2, 1], [0]]  # a custom batch sampler (e.g. by size) over samples without an index
    with pytest.warns(UserWarning, match=r"custom batch sampler regroups.*draws no top anomalies"):
        trainer.test(model, dataloaders=DataLoader(Unnumbered(), batch_sampler=reversed_batches))

    class Stream(IterableDataset):  # no positions at all: the figure's reader crashed after scoring
        def __iter__(self):
            return (dm.test_dataset[i] for i in range(len(dm.test_dataset)))

    trainer.test(model, dataloaders=DataLoader(Stream(), batch_size=2))
    for run in sorted((tmp_path / "dn2_reports").glob("test_*"))[1:]:
        summary = json.loads((run / "summary.json").read_text())
        assert "top_anomalies" not in summary["files"] and summary["auroc"] is not None


def test_scores_csv_names_each_row_by_its_dataset_index_not_its_row_number(tmp_path):
    # paths[i] in place of paths[index]: a report of a subset of a dataset (indices 1, 3, 4 of 0..4) put the
    # wrong file name beside every score
    from dn2_lightning.reports import read_report, write_scores_csv

    paths = [f"/data/img_{i}.png" for i in range(5)]
    indices = torch.tensor([1, 3, 4])
    scores = AnomalyScores(
        indices,
        torch.tensor([0.5, 2.0, 1.0]),
        torch.tensor([0, 1, 0]),
        torch.zeros(3, 1, dtype=torch.long),
        torch.zeros(3, 1),
    )
    rows = read_report(write_scores_csv(scores, tmp_path / "scores.csv", paths, threshold=0.75))
    assert [r["index"] for r in rows] == ["1", "3", "4"]
    assert [r["path"] for r in rows] == [paths[i] for i in indices.tolist()]


def test_a_plain_imagefolder_loader_gets_file_paths_and_top_anomalies(tmp_path):
    """A plain DataLoader over torchvision's ImageFolder gives (image, label) batches: scores.csv and predictions.csv
    had an empty path column and no top_anomalies.png was drawn, without a word (a reviewer)."""
    import functools

    from torch.utils.data import Subset
    from torchvision.datasets import ImageFolder

    from dn2_lightning.data import AnomalyLabel, load_image
    from dn2_lightning.reports import _dataset_of, _image_reader

    root = make_folder(tmp_path / "images", corrupt=False)
    (root / "train" / "normal").mkdir()
    for file in (root / "train").glob("*.png"):
        file.rename(root / "train" / "normal" / file.name)
    load = functools.partial(load_image, size=8)
    test_set = ImageFolder(str(root / "test"), loader=load)
    test_set.target_transform = AnomalyLabel(test_set.class_to_idx["good"])
    model = DN2Module(k=2, backbone=linear_backbone())
    trainer = quiet_trainer(default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(ImageFolder(str(root / "train"), loader=load), batch_size=2))
    trainer.test(model, DataLoader(test_set, batch_size=2))
    run = only_run_dir(tmp_path, "test")
    rows = read_report(run / "scores.csv")
    files = [path for path, _ in test_set.samples]
    assert [row["path"] for row in rows] == [files[int(row["index"])] for row in rows]
    assert {row["label"] for row in rows} == {"0", "1"} and len(rows) == 5
    assert_png(run / "figures" / "top_anomalies.png")
    image_of = _image_reader(*_dataset_of(trainer, "test"))
    for index in range(5):  # the figure shows each score's own image
        assert torch.equal(image_of(index), load(files[index]))

    subset = Subset(test_set, [4, 1, 2])  # positions 0, 1, 2 of the subset: files 4, 1, 2
    trainer.predict(model, DataLoader(subset, batch_size=2))
    rows = read_report(only_run_dir(tmp_path, "predict") / "predictions.csv")
    assert [row["path"] for row in rows] == [files[4], files[1], files[2]]
    with pytest.warns(UserWarning, match="does not read in order"):  # positions unknown: no paths, no figure
        trainer.predict(model, DataLoader(subset, batch_size=2, shuffle=True))
    latest = sorted((tmp_path / "dn2_reports").glob("predict_*"))[-1]
    assert [row["path"] for row in read_report(latest / "predictions.csv")] == ["", "", ""]
    assert "top_anomalies" not in json.loads((latest / "summary.json").read_text())["files"]


def test_a_subset_of_an_image_folder_carrying_its_own_index_names_the_file_scored(tmp_path):
    """An ImageFolder subclass returning (image, label, index) under a Subset: rows are keyed by the index carried
    (the folder's position), but the path column was listed by the Subset's position: every row of
    Subset(ds, [6, 7, 0, ...]) named another file than the one scored, and random_split(ds, [0.5, 0.5]) ended in an
    IndexError after every sample was scored (a review of the predict path)."""
    import functools

    from torch.utils.data import Subset, random_split
    from torchvision.datasets import ImageFolder

    from dn2_lightning.data import AnomalyLabel, load_image

    class IndexedImageFolder(ImageFolder):
        def __getitem__(self, i: int) -> tuple:
            return (*super().__getitem__(i), i)

    root = make_folder(tmp_path / "images", corrupt=False)
    load = functools.partial(load_image, size=8)
    folder = IndexedImageFolder(str(root / "test"), loader=load)
    folder.target_transform = AnomalyLabel(folder.class_to_idx["good"])
    files = [path for path, _ in folder.samples]
    model = DN2Module(k=2, backbone=linear_backbone())
    trainer = quiet_trainer(default_root_dir=tmp_path)
    trainer.fit(model, datamodule=OneClassDataModule("folder", root=str(root), load_size=8))
    direct = model.score_images(files)  # each file's own score, read from its path

    generator = torch.Generator().manual_seed(0)
    split = random_split(folder, [0.6, 0.4], generator=generator)[1]
    for dataset in (Subset(folder, [3, 4, 0, 1, 2]), split, Subset(folder, [0, 2, 1, 3]), Subset(folder, [0, 4, 1, 3])):
        trainer.predict(model, DataLoader(dataset, batch_size=2))
        rows = read_report(sorted((tmp_path / "dn2_reports").glob("predict_*"))[-1] / "predictions.csv")
        assert len(rows) == len(dataset)
        for row in rows:  # the file named is the file whose score the row holds
            assert row["path"] == files[int(row["index"])]
            assert float(row["score"]) == pytest.approx(float(direct.scores[int(row["index"])]), rel=1e-5)
    latest = sorted((tmp_path / "dn2_reports").glob("predict_*"))[-1]
    assert "top_anomalies" in json.loads((latest / "summary.json").read_text())["files"]


def test_predicting_a_flat_folder_that_holds_the_runs_reports_does_not_score_their_figures(tmp_path):
    """`cd my_images && dn2 predict --data.root=.`: the run's reports land under the folder being predicted on, and
    the second run scored the first one's figures as images (15 rows for 13 images, a review of the predict path)."""
    root = make_folder(tmp_path / "images", corrupt=False)
    for file in (root / "test").rglob("*.png"):  # a flat folder to score: images beside train/, no test/
        file.rename(root / f"{file.parent.name}_{file.name}")
    for folder in ("test/good", "test/scratch", "test"):
        (root / folder).rmdir()
    model = DN2Module(k=2, backbone=linear_backbone())
    for run in range(2):
        dm = OneClassDataModule("folder", root=str(root), load_size=8)
        with dn2_messages() as said:
            quiet_trainer(default_root_dir=root).predict(model, datamodule=dm)
        assert len(model.predict_scores) == 5, run
        assert (f"{root / 'dn2_reports'} holds this library's reports" in "\n".join(said)) == (run == 1)
    assert len(list((root / "dn2_reports").rglob("*.png"))) >= 2  # the figures the second run did not score


def test_tuples_that_carry_their_index_are_drawn_by_it_or_not_at_all(tmp_path):
    """(image, label, index) tuples are numbered by the index they carry: read back by position, the figure drew
    other samples' images under the scores (an own-diff review of the tuple reader)."""
    from dn2_lightning.reports import _dataset_of, _image_reader

    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone())
    trainer = quiet_trainer(default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    images, labels = dm.test_images[:10], dm.test_labels[:10]
    trainer.test(model, DataLoader(TensorDataset(images, labels, torch.arange(10)), batch_size=4))
    image_of = _image_reader(*_dataset_of(trainer, "test"))
    assert all(torch.equal(image_of(i), images[i]) for i in range(10))
    drawn_by_position = r"not drawn \(LookupError: no sample of the TensorDataset at position \d+ carries"
    with pytest.warns(UserWarning, match=drawn_by_position):
        trainer.test(model, DataLoader(TensorDataset(images, labels, torch.arange(10).flip(0)), batch_size=4))
    latest = sorted((tmp_path / "dn2_reports").glob("test_*"))[-1]
    assert "top_anomalies" not in json.loads((latest / "summary.json").read_text())["files"]


def top_anomalies_title(tmp_path: Path, labels: list[int], monkeypatch) -> str:
    """The title of ``figures/top_anomalies.png`` drawn for samples with these ``labels``."""
    import dn2_lightning.reports as reports

    titles, save = {}, reports._save

    def spy(fig, path: Path) -> Path:
        titles[path.name] = fig._suptitle.get_text() if fig._suptitle is not None else None
        return save(fig, path)

    monkeypatch.setattr(reports, "_save", spy)
    n = len(labels)
    zeros = torch.zeros(n, dtype=torch.long)
    scores = AnomalyScores(
        torch.arange(n), torch.linspace(0, 1, n), torch.tensor(labels), zeros[:, None], torch.zeros(n, 1)
    )
    reports.save_figures(scores, tmp_path / f"figures_{labels[0]}", image_of=lambda i: torch.rand(3, 8, 8))
    return titles["top_anomalies.png"]


def test_top_anomalies_name_the_label_marker_only_when_a_sample_shown_is_labelled(tmp_path, monkeypatch):
    """A predict run over unlabelled data (labels -1) was titled "... (score; A = labelled anomalous)", a marker no
    sample shown could carry."""
    assert top_anomalies_title(tmp_path, [-1] * 5, monkeypatch) == "Most anomalous samples (score)"
    labelled = "Most anomalous samples (score; A = labelled anomalous)"
    assert top_anomalies_title(tmp_path, [0, 0, 1, 0, 1], monkeypatch) == labelled

"""An audit of the report files against the in-memory results and an independent recomputation (scikit-learn's
AUROC over the CSV's own columns, ``score > threshold`` over the cells as read back, the CSV's row counts)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from helpers import BlobDataModule, dn2_messages, linear_backbone, quiet_trainer
from sklearn.metrics import roc_auc_score

from dn2_lightning import AnomalyScores, DN2Module
from dn2_lightning.reports import escaped_paths, read_report, summarize, write_scores_csv, write_summary


def latest_run(root, stage: str):
    return sorted((root / "dn2_reports").glob(f"{stage}_*"), key=lambda p: int(p.name.split("_")[1]))[-1]


def test_a_float64_run_reports_the_flags_and_scores_it_returned(tmp_path):
    """Under Trainer(precision="64-true") trainer.predict returned (and score_images gave) float64 scores and flags
    from them, but predict_scores, predictions.csv and summary.json held the scores rounded to float32: with a
    threshold read off the CSV (a score rounded down), the image returned flagged was written as is_anomaly 0 and
    n_flagged counted one image fewer."""
    dm = BlobDataModule()
    model = DN2Module(k=3, backbone=linear_backbone())
    trainer = quiet_trainer(default_root_dir=tmp_path, precision="64-true")
    trainer.fit(model, datamodule=dm)
    first = torch.cat([o["score"] for o in trainer.predict(model, datamodule=dm)])
    assert first.dtype == torch.float64
    rounded_down = [i for i, s in enumerate(first.tolist()) if float(torch.tensor(s, dtype=torch.float32)) < s]
    j = rounded_down[len(rounded_down) // 2]
    model.set_threshold(value=float(first[j].float()))  # the score as a float32 CSV printed it
    out = trainer.predict(model, datamodule=dm)
    scores, flags = torch.cat([o["score"] for o in out]), torch.cat([o["is_anomaly"] for o in out])
    assert bool(flags[j]) and bool(model.score_images(dm.test_images).is_anomaly[j])  # in memory: above it
    run = latest_run(tmp_path, "predict")
    rows = read_report(run / "predictions.csv")
    summary = json.loads((run / "summary.json").read_text())
    assert [int(r["is_anomaly"]) for r in rows] == flags.int().tolist()
    read_back = np.array([float(r["score"]) for r in rows])
    assert read_back.tolist() == scores.tolist()  # every digit of the float64 scores
    assert [int(r["is_anomaly"]) for r in rows] == (read_back > float(rows[0]["threshold"])).astype(int).tolist()
    assert summary["n_flagged"] == int(flags.sum()) == int(model.predict_scores.is_anomaly.sum())

    trainer.test(model, datamodule=dm)
    run = latest_run(tmp_path, "test")
    rows = read_report(run / "scores.csv")
    summary = json.loads((run / "summary.json").read_text())
    direct = model.score_images(dm.test_images)
    assert [int(r["is_anomaly"]) for r in rows] == direct.is_anomaly.int().tolist()
    labels, read_back = [int(r["label"]) for r in rows], [float(r["score"]) for r in rows]
    assert roc_auc_score(labels, read_back) == roc_auc_score(labels, direct.scores.numpy())
    assert summary["auroc"] == pytest.approx(roc_auc_score(labels, read_back), abs=1e-12)


def test_float64_scores_keep_their_digits_so_the_csv_agrees_with_itself(tmp_path):
    """Scores apart only beyond 9 significant digits were printed alike: read back, is_anomaly contradicted
    score > threshold and tied scores changed the AUROC recomputed from the CSV."""
    base = 1.0 + 2.0**-40  # float64 scores 2^-45 apart: one number to 9 digits
    values = torch.tensor([base + i * 2.0**-45 for i in range(6)], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    threshold = float(values[2])
    zeros = torch.zeros(6, dtype=torch.long)
    scores = AnomalyScores(torch.arange(6), values, labels, zeros[:, None], values[:, None])
    path = write_scores_csv(scores, tmp_path / "scores.csv", threshold=threshold)
    summary = summarize("test", scores, threshold)
    summary["escaped_paths"] = escaped_paths(None, scores.indices)
    write_summary(summary, tmp_path / "summary.json")
    rows = read_report(path)
    read_back = np.array([float(r["score"]) for r in rows])
    flags = [int(r["is_anomaly"]) for r in rows]
    assert flags == (values > threshold).int().tolist() == (read_back > float(rows[0]["threshold"])).tolist()
    assert summary["n_flagged"] == sum(flags)
    exact = roc_auc_score(labels, values.numpy())  # no ties: 2/3 (tied, as printed before, it was 1/2)
    assert roc_auc_score(labels, read_back) == exact and summary["auroc"] == pytest.approx(exact, abs=1e-12)
    assert [float(r["distance_0"]) for r in rows] == values.tolist()


def test_read_report_reads_a_csv_saved_with_a_byte_order_mark(tmp_path):
    """Excel's "CSV UTF-8" (and Notepad) save a BOM: read_report kept it in the first header, "\\ufeffindex", and
    failed with KeyError: 'index' on the file the user had only opened and saved."""
    n = 4
    zeros = torch.zeros(n, dtype=torch.long)
    scores = AnomalyScores(torch.arange(n), torch.linspace(0, 1, n), zeros, zeros[:, None], torch.zeros(n, 1))
    paths = ["=1+1.png", "a,b.png", 'q"uote.png', "ü.png"]
    path = write_scores_csv(scores, tmp_path / "scores.csv", paths, threshold=0.5)
    expected = read_report(path)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    rows = read_report(path)
    assert list(rows[0]) == list(expected[0]) and rows == expected
    assert [r["path"] for r in rows] == paths


def test_an_undefined_normalised_score_is_an_empty_cell(tmp_path):
    """A bank of at most k embeddings has no leave-one-out scores: normalized_score is NaN in memory, and the CSV
    wrote the text "nan" where reports.py promises an empty cell (as is_anomaly and threshold are)."""
    model = DN2Module(k=3, backbone=linear_backbone())
    quiet_trainer(default_root_dir=tmp_path).test(model, datamodule=BlobDataModule(n_train=3))
    assert model.test_scores.normalized.isnan().all()
    rows = read_report(latest_run(tmp_path, "test") / "scores.csv")
    assert {(r["normalized_score"], r["is_anomaly"], r["threshold"]) for r in rows} == {("", "", "")}


@pytest.mark.parametrize("value", [1e39, -1.0, float("inf")])
def test_a_fixed_threshold_beyond_float32_is_refused_by_name(value):
    """1e39, beyond float32 (where no score of float32 embeddings lies), was accepted as finite and kept as a float32
    inf, and summary.json then held Infinity, which strict JSON readers refuse (the threshold is float64 now)."""
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    with pytest.raises(ValueError, match=re.escape(f"threshold={value!r} ")):
        model.set_threshold(value=value)
    with pytest.raises(ValueError, match=re.escape(f"threshold={value!r} ")):
        DN2Module(k=2, backbone=linear_backbone(), threshold=value)


def test_a_test_set_with_some_samples_unlabelled_is_said_so():
    """The run's line said "test data has no labels" when only some samples were unlabelled (-1)."""
    dm = BlobDataModule()
    dm.test_labels[:3] = -1
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    with dn2_messages() as said:
        quiet_trainer().test(model, datamodule=dm)
    assert any(f"test data has 3 of {len(dm.test_labels)} samples unlabelled (-1)" in line for line in said), said
    assert int((model.test_scores.labels < 0).sum()) == 3

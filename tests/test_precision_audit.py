"""Precision modes end to end: the threshold and ``is_anomaly`` of test, predict, ``score_images`` and the reports
against independent float64 references, at the rounding edge of float32."""

from __future__ import annotations

import glob
import json
import os
import warnings

import numpy as np
import pytest
import torch
from helpers import BlobDataModule, linear_backbone, quiet_trainer

from dn2_lightning import DN2Module
from dn2_lightning.reports import read_report


def brute_loo(bank: np.ndarray, k: int) -> np.ndarray:
    """Each row's mean squared distance to its k nearest other rows, in float64."""
    d = ((bank[:, None] - bank[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, :k].mean(1)


def latest_report(trainer, stage: str) -> tuple[list[dict[str, str]], dict]:
    csv_name = "scores.csv" if stage == "test" else "predictions.csv"
    folder = sorted(glob.glob(os.path.join(trainer.default_root_dir, "dn2_reports", f"{stage}_*")))[-1]
    with open(os.path.join(folder, "summary.json")) as f:
        return read_report(os.path.join(folder, csv_name)), json.load(f)


@pytest.fixture
def default_dtype(request):
    before = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(before)


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64], indirect=True)
def test_a_threshold_just_below_a_float32_score_flags_it_in_every_output(default_dtype):
    """The threshold was rounded to torch's default dtype (float32): set_threshold(value=v) reported and judged by
    float32(v), so a float32 score s with v < s == float32(v) was not flagged (and the reports' threshold was not v);
    with a float64 default dtype, the CSV flagged it (Python floats) while predict and summary.json did not."""
    dm = BlobDataModule()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DN2Module(k=2, backbone=linear_backbone())
        trainer = quiet_trainer()
        trainer.fit(model, datamodule=dm)
        trainer.test(model, datamodule=dm)
    scores = model.test_scores.scores
    assert scores.dtype == torch.float32
    i = int(scores.argmax())
    s = float(scores[i])
    value = s - float(np.spacing(np.float32(s))) / 4  # below s, and float32(value) == s
    assert value < s and float(np.float32(value)) == s
    reference = scores.double().numpy() > value  # score > threshold, as README defines is_anomaly
    assert reference[i]

    assert model.set_threshold(value=value) == value
    assert float(model.threshold) == value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.test(model, datamodule=dm)
        predictions = trainer.predict(model, datamodule=dm)
    np.testing.assert_array_equal(model.test_scores.is_anomaly.numpy(), reference)
    np.testing.assert_array_equal(torch.cat([p["is_anomaly"] for p in predictions]).numpy(), reference)
    np.testing.assert_array_equal(model.score_images(dm.test_images).is_anomaly.numpy(), reference)
    for stage in ("test", "predict"):
        rows, summary = latest_report(trainer, stage)
        assert summary["threshold"] == value
        assert summary["n_flagged"] == int(reference.sum())
        np.testing.assert_array_equal([r["is_anomaly"] == "1" for r in rows], reference)
        assert {float(r["threshold"]) for r in rows} == {value}


def test_the_quantile_threshold_of_a_float64_run_is_numpys_quantile_of_its_leave_one_out_scores():
    """precision="64-true" scores in float64, but the threshold was rounded to float32: not the 0.9 quantile of the
    leave-one-out scores that README defines it as."""
    dm = BlobDataModule()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DN2Module(k=2, backbone=linear_backbone(), threshold_quantile=0.9037, reports=False)
        trainer = quiet_trainer(precision="64-true")
        trainer.fit(model, datamodule=dm)
        trainer.test(model, datamodule=dm)
    assert model.test_scores.scores.dtype == torch.float64
    loo = model.bank.loo_scores.double().numpy()
    # the leave-one-out scores of the float32 bank are float32 results (README: float32 rows give float32 distances)
    np.testing.assert_allclose(np.sort(loo), np.sort(brute_loo(model.bank.embeddings.double().numpy(), 2)), rtol=2**-22)
    assert float(model.threshold) == np.quantile(loo, 0.9037)  # between two scores (101 of them)
    flagged = model.test_scores.scores.numpy() > np.quantile(loo, 0.9037)
    np.testing.assert_array_equal(model.test_scores.is_anomaly.numpy(), flagged)

"""Plausible mistakes at the public API: each ends in a clear error naming the parameter and the fix (never a
traceback from inside torch or NumPy), or is read as the user meant (never silently otherwise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import BlobDataModule, linear_backbone, quiet_trainer

from dn2_lightning import DN2Detector, DN2Module


@pytest.fixture(scope="module")
def fitted():
    model = DN2Module(backbone=linear_backbone(), pretrained=False, reports=False)
    quiet_trainer(max_epochs=1).fit(model, BlobDataModule(n_train=30))
    return model


def _images() -> torch.Tensor:
    return torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.6


def test_a_numpy_float32_threshold_read_off_scores_is_taken_as_the_float_it_holds(fitted):
    """``np.percentile(result.scores.numpy(), 99)`` is a NumPy float32: it was refused as "must be None or a finite DN2
    score" (it is one), and a float32 quantile as "must be in (0, 1]" (it is)."""
    scores = fitted.score_images(_images()).scores
    value = np.percentile(scores.numpy(), 90)
    assert isinstance(value, np.float32)
    assert fitted.set_threshold(value=value) == float(value)
    assert fitted.hparams.threshold == float(value) and type(fitted.hparams.threshold) is float
    expected = fitted.set_threshold(quantile=0.75)
    assert fitted.set_threshold(quantile=np.float32(0.75)) == pytest.approx(expected, rel=1e-6)
    assert type(fitted.hparams.threshold_quantile) is float

    x = np.random.default_rng(0).normal(size=(120, 4))
    reference = DN2Detector(threshold_quantile=0.5).fit(x).threshold_
    assert DN2Detector(threshold_quantile=np.float32(0.5)).fit(x).threshold_ == pytest.approx(reference)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda m, s: m.set_threshold(value=s.max()), "threshold"),
        (lambda m, s: m.set_threshold(quantile=torch.tensor(0.9)), "threshold_quantile"),
    ],
    ids=["value=scores.max()", "quantile=0-d tensor"],
)
def test_a_zero_dim_tensor_threshold_is_refused_with_float_as_the_fix(fitted, call, name):
    """``set_threshold(value=scores.max())`` was refused as "must be None or a finite DN2 score", which it is."""
    scores = fitted.score_images(_images()).scores
    with pytest.raises(ValueError, match=rf"^{name}=tensor\(.*a tensor: pass float\(value\)"):
        call(fitted, scores)


def _overlay_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.rand(3, 16, 12, generator=g), torch.rand(16, 12, generator=g)


@pytest.mark.parametrize(
    "image, match",
    [
        (lambda x: x * 255, r"image: float images must hold values in \[0, 1\]"),
        (lambda x: (x * 255).long(), r"image: .*must be uint8 \(0\.\.255\) or float \(0\.\.1\), got torch\.int64"),
        (lambda x: x.permute(1, 2, 0), r"image \[C, H, W\].*channels last.*image\.permute\(2, 0, 1\)"),
        (lambda x: torch.rand(4, 16, 12), r"image \[C, H, W\] and its map \[H, W\], C = 1 or 3; got \(4, 16, 12\)"),
        (lambda x: x.permute(1, 2, 0).numpy(), r"image must be a tensor.*torch\.from_numpy"),
    ],
    ids=["float 0..255", "int64 0..255", "[H, W, 3]", "4 channels", "numpy [H, W, 3]"],
)
def test_map_overlay_refuses_images_it_would_misdraw(image, match):
    """A [0, 255] float or int64 image was clamped to [0, 1] and drawn nearly white without a word; a channels-last or
    4-channel one failed in NumPy ("operands could not be broadcast"); a NumPy array with AttributeError 'detach'."""
    from dn2_lightning.maps import map_overlay

    x, anomaly_map = _overlay_inputs()
    with pytest.raises(ValueError, match=match):
        map_overlay(image(x), anomaly_map)
    overlay = map_overlay(x, anomaly_map)  # the image as it should be given
    assert overlay.shape == (16, 12, 3)
    heat_only = map_overlay(torch.zeros_like(x), anomaly_map).astype(int)
    assert np.abs(overlay.astype(int) - heat_only - np.round(127.5 * x.permute(1, 2, 0).numpy())).max() <= 1


def test_map_overlay_refuses_a_numpy_map():
    from dn2_lightning.maps import map_overlay

    x, anomaly_map = _overlay_inputs()
    with pytest.raises(ValueError, match=r"anomaly_map must be a tensor.*torch\.from_numpy"):
        map_overlay(x, anomaly_map.numpy())


@pytest.mark.parametrize(
    "text, match",
    [
        ("index;path;score\r\n0;a.png;1.5\r\n", r"no 'index', 'path' columns.*\['index;path;score'\].*comma"),
        ("index,score\r\n0,1.5\r\n", r"no 'path' column.*\['index', 'score'\]"),
    ],
    ids=["saved with semicolons", "path column deleted"],
)
def test_read_report_of_a_csv_edited_by_hand_names_the_missing_columns(tmp_path, text, match):
    """A report re-saved with ';' separators (a spreadsheet in many locales) or with a column deleted failed with a
    bare KeyError: 'index' / 'path'."""
    from dn2_lightning.reports import read_report

    path = tmp_path / "scores.csv"
    path.write_text(text, encoding="utf-8", newline="")
    with pytest.raises(ValueError, match=match) as error:
        read_report(path)
    assert "scores.csv" in str(error.value)
    path.write_text("index,path,score\r\n0,a.png,1.5\r\n", encoding="utf-8", newline="")
    assert read_report(path) == [{"index": "0", "path": "a.png", "score": "1.5"}]


def test_read_report_beside_a_summary_json_edited_into_invalid_json_names_that_file(tmp_path):
    """A summary.json edited by hand into invalid JSON failed with json's JSONDecodeError, which names no file."""
    from dn2_lightning.reports import read_report

    (tmp_path / "scores.csv").write_text("index,path,score\r\n0,a.png,1.5\r\n", encoding="utf-8", newline="")
    (tmp_path / "summary.json").write_text('{"n_scored": 1,}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"summary\.json.*is not valid JSON.*line 1"):
        read_report(tmp_path / "scores.csv")


@pytest.mark.parametrize("dtype", [np.longdouble, np.clongdouble], ids=["longdouble", "clongdouble"])
@pytest.mark.parametrize("method", ["fit", "decision_function"])
def test_detector_refuses_numpy_long_double_rows_naming_x_and_the_cast(dtype, method):
    """X as np.longdouble (float128 on Linux) failed inside torch.as_tensor: TypeError "can't convert np.ndarray of
    type numpy.longdouble", naming no parameter."""
    if np.dtype(dtype).itemsize <= np.dtype(np.complex128 if np.dtype(dtype).kind == "c" else np.float64).itemsize:
        pytest.skip("long double is double on this platform")
    x = np.random.default_rng(0).normal(size=(120, 4))
    detector = DN2Detector(threshold_quantile=0.5).fit(x)
    what = "real numbers" if np.dtype(dtype).kind == "c" else "floats of at most 64 bits"
    with pytest.raises(
        ValueError, match=rf"^X must hold {what}, got a NumPy {np.dtype(dtype)} array: .*astype\(np\.float64\)"
    ):
        getattr(detector, method)(x.astype(dtype))

"""The decision threshold and normalised scores against NumPy references: which quantile, leave-one-out with
duplicates, ties, strict comparisons and the few-scores warning's condition."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from dn2_lightning import DN2Detector
from dn2_lightning.scoring import coarse_quantile_note, expected_flagged_share, normalized_scores, quantile_threshold


def brute_loo(x: np.ndarray, k: int) -> np.ndarray:
    """Each row's mean squared distance to its k nearest other rows (by index: copies stay neighbours)."""
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, :k].mean(1)


def fit_quietly(x: np.ndarray, **params: object) -> DN2Detector:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few rows: the coarse-quantile warning
        return DN2Detector(**params).fit(x)


@pytest.mark.parametrize("n", range(2, 11))
def test_small_banks_use_numpys_linear_quantile_of_brute_force_leave_one_out_scores(n):
    rng = np.random.default_rng(n)
    for k in range(1, n):
        x = rng.normal(size=(n, 3))
        reference = brute_loo(x, k)
        for q in (0.01, 0.3, 0.5, 0.9, 0.99, 1.0):
            detector = fit_quietly(x, k=k, threshold_quantile=q)
            np.testing.assert_allclose(detector.decision_scores_, reference, rtol=1e-10)
            expected = np.quantile(reference, q, method="linear")
            assert detector.threshold_ == pytest.approx(expected, rel=1e-10)
            assert quantile_threshold(torch.from_numpy(reference), q) == pytest.approx(expected, rel=1e-12)


def test_a_duplicated_row_leaves_itself_out_but_not_its_copy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 2))
    x = np.vstack([x, x[:1]])  # row 7 is a copy of row 0
    detector = fit_quietly(x, k=1, threshold_quantile=0.5)
    reference = brute_loo(x, 1)
    assert reference[0] == reference[7] == 0.0
    np.testing.assert_allclose(detector.decision_scores_, reference, rtol=1e-10)


def test_ties_normalised_scores_count_strictly_below_and_equal_scores_are_not_anomalous():
    x = np.arange(5.0)[:, None]  # every leave-one-out score at k=1 is 1
    detector = fit_quietly(x, k=1, threshold_quantile=0.5)
    reference = brute_loo(x, 1)
    assert detector.threshold_ == np.quantile(reference, 0.5)
    test = np.array([[5.0], [-0.5], [10.0]])  # scores 1 (= every training score and the threshold), 0.25, 36
    scores = detector.decision_function(test)
    below = (reference[None] < scores[:, None]).mean(1)  # strictly below
    proba = detector.predict_proba(test)
    np.testing.assert_array_equal(proba[:, 1], below)
    np.testing.assert_array_equal(proba[:, 0], 1 - below)
    np.testing.assert_array_equal(detector.predict(test), (scores > detector.threshold_).astype(int))
    assert detector.predict(test[:1]).item() == 0  # equal to the threshold: not anomalous
    ordered = torch.from_numpy(np.sort(reference))
    np.testing.assert_array_equal(normalized_scores(ordered, torch.from_numpy(scores)).numpy(), below)


@pytest.mark.parametrize("q", [0.001, 0.05, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999])
def test_the_few_scores_warning_fires_when_the_expected_share_is_off_by_more_than_min_q_1_minus_q(q):
    for n in range(2, 2000, 7):
        # the expected share, by exchangeability over n + 1 uniform scores (exact for the linear quantile)
        position = (n - 1) * q
        share = 1 - (position + 1) / (n + 1)
        assert expected_flagged_share(n, q) == pytest.approx(share, abs=1e-12)
        off = abs(share - (1 - q)) > min(q, 1 - q) * (1 + 1e-9)
        assert (coarse_quantile_note(n, q) is not None) == off, (n, q)
    assert coarse_quantile_note(5, 1.0) is None  # documented: none at 1.0
    assert coarse_quantile_note(1, 0.5) is not None  # documented: always for a single score

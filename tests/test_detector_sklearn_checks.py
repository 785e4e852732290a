"""DN2Detector against scikit-learn's estimator conventions (``sklearn.utils.estimator_checks``).

Each check that fails is either a defect (tested here against scikit-learn's brute-force neighbours) or one of
the intended differences listed in ``EXPECTED_FAILED_CHECKS``, which follow PyOD's conventions.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import sklearn.utils.validation
import torch
from sklearn.exceptions import NotFittedError
from sklearn.neighbors import NearestNeighbors
from sklearn.utils.estimator_checks import check_estimator

from dn2_lightning import DN2Detector


def reference_scores(train: np.ndarray, test: np.ndarray, k: int = 2) -> np.ndarray:
    distances = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(train).kneighbors(test)[0]
    return (distances**2).mean(1)


def data(seed: int = 0, n: int = 200, d: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(scale=1.5, size=(30, d))


@pytest.mark.parametrize("container", [sp.csr_matrix, sp.csr_array, sp.coo_matrix])
def test_sparse_input_is_refused_as_sparse(container):
    """A SciPy sparse X was refused as "X must hold numbers (bool, integer or float), got a NumPy object array"
    (np.asarray wraps the matrix in a 0-d object array): a message that says nothing of sparsity or the fix."""
    train, test = data()
    with pytest.raises(TypeError, match=r"(?s)sparse.*toarray\(\)"):
        DN2Detector().fit(container(train))
    detector = DN2Detector().fit(train)
    with pytest.raises(TypeError, match=r"(?s)sparse.*toarray\(\)"):
        detector.decision_function(container(test))
    # the dense rows it names as the fix are scored as scikit-learn's neighbours score them
    np.testing.assert_allclose(
        DN2Detector().fit(container(train).toarray()).decision_function(container(test).toarray()),
        reference_scores(train, test),
        rtol=1e-6,
    )


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_tensor_is_refused_as_sparse(layout):
    """A sparse torch tensor failed deep inside torch ("Could not run 'aten::ne.Scalar' with arguments from the
    'SparseCPU' backend", "unsupported tensor layout: SparseCsr")."""
    train, test = (torch.from_numpy(a) for a in data())
    sparse = (lambda t: t.to_sparse()) if layout == "coo" else (lambda t: t.to_sparse_csr())
    with pytest.raises(TypeError, match=r"(?s)sparse.*to_dense\(\)"):
        DN2Detector().fit(sparse(train))
    detector = DN2Detector().fit(train)
    with pytest.raises(TypeError, match=r"(?s)sparse.*to_dense\(\)"):
        detector.predict(sparse(test))
    np.testing.assert_allclose(
        detector.decision_function(sparse(test).to_dense()).numpy(), reference_scores(train, test), rtol=1e-6
    )


@pytest.mark.parametrize("method", ["decision_function", "predict", "predict_proba"])
def test_unfitted_detector_raises_not_fitted_error(method):
    """Before fit, decision_function and predict raised a RuntimeError (scikit-learn's and PyOD's detectors raise
    NotFittedError, which callers catch), and predict_proba an AttributeError about a private '_sorted_scores'."""
    _, test = data()
    with pytest.raises(NotFittedError, match=r"not fitted yet: call fit\(X\) first"):
        getattr(DN2Detector(), method)(test)


def test_n_features_in_is_set_by_fit_and_checked_by_the_methods():
    """fit set no n_features_in_ (scikit-learn's convention since 1.0, which pipelines and meta-estimators read)."""
    train, test = data()
    detector = DN2Detector().fit(train)
    assert detector.n_features_in_ == train.shape[1]
    np.testing.assert_allclose(detector.decision_function(test), reference_scores(train, test), rtol=1e-6)
    with pytest.raises(ValueError, match=rf"X has 3 features, but DN2Detector is expecting {train.shape[1]} features"):
        detector.predict(test[:, :3])
    # a second fit replaces the first one's: no state of the first fit left behind
    detector.fit(train[:, :3])
    assert detector.n_features_in_ == 3
    np.testing.assert_allclose(
        detector.decision_function(test[:, :3]), reference_scores(train[:, :3], test[:, :3]), rtol=1e-6
    )
    # tensors and lists count their features too (a tensor is not copied to NumPy for it)
    assert DN2Detector().fit(torch.from_numpy(train[:, :4])).n_features_in_ == 4
    assert DN2Detector().fit(train[:, :5].tolist()).n_features_in_ == 5
    assert not hasattr(detector, "feature_names_in_")


def test_dataframe_feature_names_are_kept_and_checked():
    """Columns fitted by name were scored by position: a DataFrame with the columns in another order was accepted."""
    pd = pytest.importorskip("pandas")
    train, test = data()
    columns = [f"f{i}" for i in range(train.shape[1])]
    detector = DN2Detector().fit(pd.DataFrame(train, columns=columns))
    np.testing.assert_array_equal(detector.feature_names_in_, columns)
    np.testing.assert_allclose(
        detector.decision_function(pd.DataFrame(test, columns=columns)), reference_scores(train, test), rtol=1e-6
    )
    with pytest.raises(ValueError, match="feature names should match"):
        detector.decision_function(pd.DataFrame(test, columns=columns[::-1]))


# Intended differences from scikit-learn's conventions, as PyOD's detectors have them.
EXPECTED_FAILED_CHECKS = {
    "check_do_not_raise_errors_in_init_or_set_params": "parameters are checked in __init__ (and again in fit), as "
    "PyOD's BaseDetector checks contamination in __init__",
    "check_dtype_object": "object arrays are refused with a clear error rather than cast to float64",
    "check_complex_data": "complex X is refused, with 'must hold real numbers' rather than scikit-learn's wording",
    "check_estimators_empty_data_messages": "refused, with the detector's own wording",
    "check_fit2d_1sample": "refused ('needs more than k rows'), with the detector's own wording",
    "check_fit2d_predict1d": "refused ('must be a 2-D array'), with the detector's own wording",
}


@pytest.mark.skipif(
    not hasattr(sklearn.utils.validation, "validate_data"),
    reason="scikit-learn < 1.6: check_estimator takes no expected_failed_checks",
)
def test_scikit_learn_estimator_checks():
    """scikit-learn's checks pass but for the intended differences above. DN2Detector, like PyOD's detectors, is
    not tagged an outlier detector: its predict gives PyOD's 0 = normal / 1 = anomalous, not scikit-learn's -1/+1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the threshold's few-rows note, on the checks' small data
        results = check_estimator(DN2Detector(), expected_failed_checks=EXPECTED_FAILED_CHECKS, on_fail=None)
    failed = {r["check_name"]: repr(r["exception"]) for r in results if r["status"] == "failed"}
    assert not failed
    passing = {r["check_name"] for r in results if r["status"] == "passed"}
    assert not passing & set(EXPECTED_FAILED_CHECKS), "an intended difference passes now: take it off the list"


def test_a_failed_refit_keeps_the_fitted_detector_consistent():
    """n_features_in_ belongs to the fitted bank: a refit refused (too few rows) leaves the first fit whole."""
    train, test = data()
    detector = DN2Detector().fit(train)
    with pytest.raises(ValueError, match="needs more than k rows"):
        detector.fit(train[:2, :3])
    assert detector.n_features_in_ == train.shape[1]
    np.testing.assert_allclose(detector.decision_function(test), reference_scores(train, test), rtol=1e-6)

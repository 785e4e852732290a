"""DN2Detector: PyOD-style DN2 on feature arrays, against scikit-learn's brute-force neighbours."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from dn2_lightning import DN2Detector


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train = rng.normal(size=(300, 16))
    test = np.vstack([rng.normal(size=(80, 16)), rng.normal(loc=1.5, size=(40, 16))])
    return train, test, np.r_[np.zeros(80), np.ones(40)]


@pytest.mark.parametrize("k", [1, 2, 7])
def test_scores_threshold_and_labels_match_sklearn(k):
    train, test, labels = blobs()
    detector = DN2Detector(k=k, threshold_quantile=0.9).fit(train)
    nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(train)
    expected = (nn.kneighbors(test, k)[0] ** 2).mean(1)
    np.testing.assert_allclose(detector.decision_function(test), expected, rtol=1e-4)
    loo = (nn.kneighbors(train)[0][:, 1:] ** 2).mean(1)
    # NumPy in, NumPy out, as PyOD's attributes (they were tensors beside the methods' arrays)
    assert isinstance(detector.decision_scores_, np.ndarray) and isinstance(detector.labels_, np.ndarray)
    np.testing.assert_allclose(detector.decision_scores_, loo, rtol=1e-4)
    np.testing.assert_array_equal(detector.labels_, (loo > detector.threshold_).astype(int))
    assert detector.threshold_ == pytest.approx(np.quantile(loo, 0.9), rel=1e-4)
    np.testing.assert_array_equal(detector.predict(test), (expected > detector.threshold_).astype(int))
    assert roc_auc_score(labels, detector.decision_function(test)) > 0.9
    proba = detector.predict_proba(test)
    np.testing.assert_allclose(proba[:, 1], (np.sort(loo)[None, :] < expected[:, None]).mean(1), atol=1e-6)


def test_scores_follow_a_bank_replaced_or_edited_in_place_after_fit():
    # the search copy of bank_ is cached between calls; it must not outlive the rows it was made from
    train, test, _ = blobs()
    detector = DN2Detector(k=2).fit(train)
    detector.decision_function(test)  # the cache is made

    def brute_force(bank):
        return (NearestNeighbors(n_neighbors=2, algorithm="brute").fit(bank).kneighbors(test)[0] ** 2).mean(1)

    detector.bank_ = detector.bank_[:50].clone()
    np.testing.assert_allclose(detector.decision_function(test), brute_force(train[:50]), rtol=1e-6)
    # other rows in place (a uniform scaling would keep the stale candidates right: their exact distances are
    # recomputed from bank_ itself)
    detector.bank_.copy_(torch.from_numpy(train[100:150]))
    np.testing.assert_allclose(detector.decision_function(test), brute_force(train[100:150]), rtol=1e-6)


def test_a_fit_in_inference_mode_and_an_inference_tensor_bank_score_as_outside_it():
    # an inference tensor has no version counter: the bank's cache key must not ask for one
    train, test, _ = blobs()
    expected = DN2Detector(k=2).fit(train).decision_function(test)
    with torch.inference_mode():
        detector = DN2Detector(k=2).fit(torch.from_numpy(train))
        np.testing.assert_allclose(detector.decision_function(test), expected, rtol=1e-6)
    detector.bank_ = detector.bank_[:50]  # still an inference tensor, outside inference mode
    assert detector.bank_.is_inference()
    brute = (NearestNeighbors(n_neighbors=2, algorithm="brute").fit(train[:50]).kneighbors(test)[0] ** 2).mean(1)
    np.testing.assert_allclose(detector.decision_function(test), brute, rtol=1e-6)


def test_cleaning_drops_the_contaminants_it_should():
    train, _, _ = blobs(1)
    rng = np.random.default_rng(2)
    contaminated = np.vstack([train, rng.normal(loc=4.0, size=(30, 16))])  # far-away anomalies
    detector = DN2Detector(k=2, clean_fraction=0.2, clean_k=50).fit(contaminated)
    assert detector.bank_.shape[0] == round(0.8 * len(contaminated))
    assert not detector.kept_[300:].any(), "every far-away contaminant is removed"


def test_a_clean_fraction_that_removes_no_row_says_so():
    """As DN2Module: 0.004 of 101 rows rounds to none removed, and the bank was kept uncleaned without a word."""
    train = np.random.default_rng(0).normal(size=(101, 4))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="clean_fraction=")
        DN2Detector(k=2, clean_fraction=0.01).fit(train)  # 1 row removed: no warning
    with pytest.warns(UserWarning, match=r"clean_fraction=0.004 of 101 rows rounds to none removed"):
        detector = DN2Detector(k=2, clean_fraction=0.004).fit(train)
    assert detector.bank_.shape[0] == 101


def test_tensor_in_tensor_out_and_pyod_style_use():
    train, test, _ = blobs()
    detector = DN2Detector().fit(torch.from_numpy(train))
    scores = detector.decision_function(torch.from_numpy(test))
    assert isinstance(scores, torch.Tensor) and scores.shape == (120,)
    np.testing.assert_allclose(scores.numpy(), detector.decision_function(test), rtol=1e-6)


def test_float64_input_is_scored_exactly_far_from_the_origin():
    # spread 0.01 around 1e6: float32 cannot tell the rows apart (ulp 0.0625), float64 can
    train, test, _ = blobs()
    train, test = train * 0.01 + 1e6, test * 0.01 + 1e6
    detector = DN2Detector(k=2).fit(train)
    sq = ((test[:, None, :] - train[None, :, :]) ** 2).sum(-1)  # float64 brute force
    expected = np.sort(sq, axis=1)[:, :2].mean(1)
    np.testing.assert_allclose(detector.decision_function(test), expected, rtol=1e-6)
    train_sq = ((train[:, None, :] - train[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(train_sq, np.inf)
    loo = np.sort(train_sq, axis=1)[:, :2].mean(1)
    np.testing.assert_allclose(detector.decision_scores_, loo, rtol=1e-6)
    assert detector.threshold_ == pytest.approx(np.quantile(loo, 0.99), rel=1e-6)
    assert detector.bank_.dtype == torch.float64


def test_large_integer_features_are_not_rounded_to_float32():
    # 2**24 + 1 is not a float32: rounded, the query would equal the first training row
    train = np.array([[2**24], [2**24 + 2], [2**24 + 84], [2**24 + 284]], dtype=np.int64)
    query = np.array([[2**24 + 1]], dtype=np.int64)
    detector = DN2Detector(k=1).fit(train)
    assert detector.decision_function(query).tolist() == [1.0]  # numpy: min((q - x)^2) = 1
    assert detector.bank_.dtype == torch.float64
    small = DN2Detector(k=1).fit(np.arange(10).reshape(5, 2))  # exact in float32: kept there
    assert small.bank_.dtype == torch.float32


def test_uint64_features_beyond_int64_do_not_wrap():
    train = np.array([[2**63 - 4096], [2**63 + 4096], [2**63 + 8192]], dtype=np.uint64)
    with pytest.warns(UserWarning, match="beyond 2\\*\\*53"):  # (these happen to be float64 numbers)
        scores = DN2Detector(k=1).fit(train).decision_scores_.tolist()  # int64 wrapped them: 3.4e38 for 6.7e7
    assert scores == [8192.0**2, 4096.0**2, 4096.0**2]


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_integers_float64_rounds_are_warned_about_and_an_offset_keeps_them_exact(dtype):
    # 2**60 + 100 is not a float64 (multiples of 256 up there): rounded, the score was 18,939,904, not 4300**2
    train = np.array([[2**60], [2**60 + 100], [2**60 + 300], [2**60 + 700]], dtype=dtype)
    query = np.array([[2**60 + 5000]], dtype=dtype)
    with pytest.warns(
        UserWarning, match=r"X holds integers up to 1,152,921,504,606,847,676 .*multiples of up to 256"
    ) as fit:
        detector = DN2Detector(k=1).fit(train)
    with pytest.warns(UserWarning, match="beyond 2") as scoring:
        detector.decision_function(query)
    assert fit[0].filename == scoring[0].filename == __file__  # the user's line, not the library's
    offset = train.min(axis=0)  # the fix the warning gives: exact
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shifted = DN2Detector(k=1, threshold_quantile=0.5).fit(train - offset)
        assert shifted.decision_function(query - offset).tolist() == [4300.0**2]
        DN2Detector(k=1, threshold_quantile=0.5).fit(
            np.array([[2**53], [-(2**53)], [0]])
        )  # up to 2**53 every integer is a float64


def test_a_quantile_of_too_few_training_rows_is_warned_about_and_flags_what_it_says():
    from dn2_lightning.scoring import expected_flagged_share

    rng = np.random.default_rng(0)
    with pytest.warns(UserWarning, match=r"set from 40 scores, too few for it to flag about 1% .* = 3.39%") as caught:
        detectors = [DN2Detector(k=2).fit(rng.normal(size=(40, 4))) for _ in range(10)]
    assert caught[0].filename == __file__  # the user's line
    with pytest.warns(UserWarning, match="set from 40 scores") as caught:
        DN2Detector(k=2).fit_predict(rng.normal(size=(40, 4)))
    assert caught[0].filename == __file__
    # the claim, measured: new normal rows flagged by the 0.99 quantile of 40 training scores
    flagged = np.mean([detector.predict(rng.normal(size=(4000, 4))).mean() for detector in detectors])
    assert 1 / 41 <= flagged <= 2 / 41 and flagged > 2 * 0.01
    assert expected_flagged_share(40, 0.99) == pytest.approx(flagged, abs=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DN2Detector(k=2).fit(rng.normal(size=(106, 4)))  # (106 x 0.01 + 0.99) / 107 = 1.92%: under twice 1%
        DN2Detector(k=2, threshold_quantile=0.9).fit(rng.normal(size=(7, 4)))  # 19.9%, within 10 points of 10%
    with pytest.warns(UserWarning, match=r"set from 6 scores.* = 21.4%, and 0.9 needs about 7 scores"):
        DN2Detector(k=2, threshold_quantile=0.9).fit(rng.normal(size=(6, 4)))

    class Logged(DN2Detector):  # fit_predict goes through a subclass's fit, as scikit-learn's does
        fitted = 0

        def fit(self, X, y=None):  # noqa: N803
            Logged.fitted += 1
            return super().fit(X, y)

    Logged(k=2).fit_predict(rng.normal(size=(200, 4)))
    assert Logged.fitted == 1


def test_predict_after_set_params_of_k_or_quantile_asks_for_a_refit():
    rng = np.random.default_rng(4)
    train, test = rng.normal(size=(100, 3)), rng.normal(size=(50, 3)) * 1.3
    detector = DN2Detector(k=2).fit(train)
    detector.set_params(k=10)  # threshold_ is the 99% quantile of k=2 scores: 11 of 50 flagged, not 4
    refit = DN2Detector(k=10).fit(train)
    np.testing.assert_array_equal(detector.decision_function(test), refit.decision_function(test))
    for call in (detector.predict, detector.predict_proba):
        with pytest.raises(ValueError, match=r"k=10 was set after fit.*fit's k=2: call fit\(X\) again"):
            call(test)
    detector.set_params(threshold_quantile=0.5)
    with pytest.raises(ValueError, match=r"k=10, threshold_quantile=0.5 was set .*fit's k=2, threshold_quantile=0.99"):
        detector.predict(test)
    detector.set_params(threshold_quantile=2.0)  # out of range: said as such, not as "set after fit"
    with pytest.raises(ValueError, match=r"threshold_quantile=2.0 must be in \(0, 1\]"):
        detector.predict(test)
    detector.set_params(k=2, threshold_quantile=0.99, knn_backend="torch")  # a search setting needs no refit
    np.testing.assert_array_equal(detector.predict(test), DN2Detector(k=2).fit(train).predict(test))
    np.testing.assert_array_equal(detector.fit(train).set_params(k=10).fit(train).predict(test), refit.predict(test))


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.uint32, np.bool_])
def test_features_of_any_integer_width_or_bool_are_numbers(dtype):
    # int16, uint16, int8 and bool features were refused as "must hold numbers"
    train = (np.arange(12).reshape(6, 2) % 3 > 0 if dtype is np.bool_ else np.arange(12).reshape(6, 2)).astype(dtype)
    query = train[:2]
    detector = DN2Detector(k=2).fit(train)
    x, q = train.astype(np.float64), query.astype(np.float64)
    expected = np.sort(((q[:, None] - x[None]) ** 2).sum(-1), axis=1)[:, :2].mean(1)
    np.testing.assert_allclose(detector.decision_function(query), expected)
    with pytest.raises(ValueError, match="X must hold real numbers"):
        DN2Detector(k=1).fit(train.astype(np.complex64))


def test_predict_proba_agrees_with_predict_for_float64_scores_closer_than_float32_resolution():
    # k = 1 leave-one-out scores 1, 1, 1 + 2e-9, 1 + 2e-9, 1 + 4e-9, 1 + 4e-9 (float32 rounds all to 1)
    train = np.array([[0.0], [1.0], [10.0], [11 + 1e-9], [20.0], [21 + 2e-9]])
    test = np.array([[-1 - 3e-9], [22 + 5e-9]])  # each 1 + 3e-9 from its nearest row: score 1 + 6e-9
    detector = DN2Detector(k=1, threshold_quantile=0.5).fit(train)
    scores = detector.decision_function(test)
    np.testing.assert_allclose(scores, 1 + 6e-9, rtol=0, atol=1e-14)
    assert detector.predict(test).tolist() == [1, 1]  # above every training score
    assert detector.predict_proba(test)[:, 1].tolist() == [1.0, 1.0]  # so all of them lie below it


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: DN2Detector(k=0), "k=0"),
        (lambda: DN2Detector(threshold_quantile=1.5), "threshold_quantile=1.5"),
        (lambda: DN2Detector(clean_fraction=1.0), "clean_fraction=1.0"),
        (lambda: DN2Detector(k=5).fit(np.zeros((5, 3))), "needs more than k rows"),
        (lambda: DN2Detector().fit(np.array([[0.0, np.nan], [1.0, 1.0], [2, 2]])), r"NaN or Inf in rows \[0\]"),
        (lambda: DN2Detector().fit(np.zeros(4)), "2-D array"),
        (lambda: DN2Detector().decision_function(np.zeros((1, 3))), "not fitted"),
        (lambda: DN2Detector().fit(np.random.rand(10, 3)).predict(np.zeros((1, 4))), "4 features"),
        # were NumPy's "inhomogeneous shape", torch's "can't convert np.ndarray of type numpy.str_", and `queries`
        (lambda: DN2Detector().fit([[1.0, 2.0], [3.0]]), r"X must be a 2-D array \[rows, features\] of numbers"),
        (lambda: DN2Detector().fit(np.array([["a", "b"], ["c", "d"]])), r"X must hold numbers .*<U1"),
        (lambda: DN2Detector().fit(np.zeros((10, 0))), r"X must be a 2-D array .*one feature, got \(10, 0\)"),
    ],
)
def test_bad_input_names_the_parameter(call, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        call()


def test_a_scikit_learn_estimator_clone_set_params_pipeline_and_pickle():
    """As PyOD's detectors: clone (GridSearchCV, cross_val_score) needs get_params, and a Pipeline's last step."""
    import pickle

    from sklearn.base import clone
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(80, 5)) * [1, 2, 3, 4, 5], rng.normal(size=(7, 5)) * 4
    detector = DN2Detector(k=3, threshold_quantile=0.9, clean_fraction=0.1, clean_k=20)
    copy = clone(detector)
    assert copy.get_params() == detector.get_params() and copy.get_params()["k"] == 3
    pipeline = make_pipeline(StandardScaler(), DN2Detector(k=3)).fit(train)
    scaler = StandardScaler().fit(train)
    reference = DN2Detector(k=3).fit(scaler.transform(train)).decision_function(scaler.transform(test))
    np.testing.assert_allclose(pipeline.decision_function(test), reference)
    np.testing.assert_array_equal(DN2Detector(k=3).fit_predict(train), DN2Detector(k=3).fit(train).labels_)
    fitted = DN2Detector(k=3).fit(train)
    unpickled = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(unpickled.decision_function(test), fitted.decision_function(test))
    with pytest.raises(ValueError, match="k=0"):  # set_params is checked when fit runs
        DN2Detector().set_params(k=0).fit(train)
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    with pytest.raises(NotFittedError):  # no fitted attribute (bank_) before fit
        check_is_fitted(DN2Detector())
    assert repr(DN2Detector(clean_fraction=0.1, knn_backend="torch")) == (
        "DN2Detector(clean_fraction=0.1, knn_backend='torch')"
    )


def test_a_training_score_equal_to_the_threshold_is_not_labelled_an_anomaly():
    # guards labels_ = scores >= threshold_ (101 scores, q = 0.99: the threshold is the 100th score itself)
    train = np.random.default_rng(0).normal(size=(101, 4))
    detector = DN2Detector(k=2, threshold_quantile=0.99).fit(train)
    scores = detector.decision_scores_.astype(np.float64)
    assert np.isin(detector.threshold_, scores)
    assert int(detector.labels_.sum()) == int((scores > detector.threshold_).sum()) == 1


def test_detector_predict_proba_ranks_against_every_training_rows_score_after_cleaning():
    # predict_proba ranked scores among the kept rows' scores only (the densest rows): with cleaning, normal rows'
    # anomaly probabilities came out far too high
    rng = np.random.default_rng(0)
    train = np.vstack([rng.normal(size=(120, 6)), rng.normal(loc=3.0, size=(15, 6))])
    test = np.vstack([rng.normal(size=(30, 6)), rng.normal(loc=2.0, size=(10, 6))])
    detector = DN2Detector(k=2, clean_fraction=0.2, clean_k=10).fit(train)
    kept = np.asarray(detector.kept_)
    d = ((train[:, None] - train[None, kept]) ** 2).sum(-1)  # every training row against the kept rows
    d[np.flatnonzero(kept), np.arange(kept.sum())] = np.inf  # a kept row leaves itself out
    training_scores = np.sort(d, axis=1)[:, :2].mean(1)
    np.testing.assert_allclose(detector.decision_scores_, training_scores, rtol=1e-9)
    test_scores = np.sort(((test[:, None] - train[None, kept]) ** 2).sum(-1), axis=1)[:, :2].mean(1)
    expected = (training_scores[None, :] < test_scores[:, None]).mean(1)
    proba = detector.predict_proba(test)
    np.testing.assert_allclose(proba[:, 1], expected, atol=1e-6)
    np.testing.assert_allclose(proba[:, 0], 1 - expected, atol=1e-6)


def test_reversed_strided_big_endian_and_read_only_numpy_arrays_are_read_as_their_copies():
    rng = np.random.default_rng(4)
    train, test = rng.normal(size=(80, 6)), rng.normal(size=(20, 6))
    view, copy = DN2Detector(k=2).fit(train[::-1]), DN2Detector(k=2).fit(train[::-1].copy())
    assert view.threshold_ == copy.threshold_
    np.testing.assert_array_equal(
        view.decision_function(test[::-2, ::-1]), copy.decision_function(test[::-2, ::-1].copy())
    )
    # big-endian data as read from a file (torch refuses another byte order), and a read-only array (np.load's
    # mmap_mode="r"), without torch's "not writable" warning
    frozen = train.copy()
    frozen.setflags(write=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="The given NumPy array is not writable")
        big = DN2Detector(k=2).fit(train.astype(">f8"))
        np.testing.assert_array_equal(big.decision_function(test.astype(">f8")), copy.decision_function(test))
        np.testing.assert_array_equal(
            DN2Detector(k=2).fit(frozen).decision_function(test), copy.decision_function(test)
        )

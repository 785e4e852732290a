"""DN2 on features you already have: a PyOD-style detector over the same kNN, cleaning and threshold code
as :class:`~dn2_lightning.DN2Module`.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> detector = DN2Detector(k=2).fit(rng.normal(size=(200, 8)))
>>> detector.predict(np.vstack([np.zeros((1, 8)), np.full((1, 8), 10.0)])).tolist()
[0, 1]
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from torch import Tensor

from dn2_lightning.knn import KNNBackend, KNNResult, content_key, knn_distances, lacks_float64, prepare_bank
from dn2_lightning.scoring import (
    coarse_quantile_note,
    exceeds,
    keep_lowest,
    knn_scores,
    leave_one_out_scores,
    normalized_scores,
    quantile_threshold,
)
from dn2_lightning.validation import (
    check_clean_fraction,
    check_clean_k,
    check_int,
    check_k,
    check_knn_backend,
    check_threshold,
    tensor_of,
)

try:
    from sklearn.utils.validation import validate_data
except ImportError:  # scikit-learn < 1.6: the estimator's own method (skip_check_array was cast_to_ndarray=False)

    def validate_data(estimator: BaseEstimator, X: Any, reset: bool = True, skip_check_array: bool = False) -> Any:  # noqa: N803
        return estimator._validate_data(X, reset=reset, cast_to_ndarray=not skip_check_array)


ArrayLike = Any  # numpy array, torch tensor, or nested lists of numbers


class DN2Detector(BaseEstimator):
    """Deep Nearest Neighbour anomaly detection on feature vectors, with PyOD's interface.

    A scikit-learn estimator: ``get_params`` / ``set_params``, ``sklearn.base.clone`` and the last step of a
    ``Pipeline`` work as for PyOD's detectors (labels are PyOD's 0 = normal / 1 = anomalous).

    ``fit(X)`` keeps the rows of ``X`` (after optional cleaning) as the memory bank; ``decision_function(Y)``
    is the mean squared Euclidean distance of each row of ``Y`` to its ``k`` nearest bank rows (exact);
    ``predict(Y)`` is 1 where that exceeds :attr:`threshold_`. CUDA tensors are searched on their GPU.

    Args:
        k: neighbours averaged in the score (paper: 2).
        threshold_quantile: ``threshold_`` is this quantile (linearly interpolated, as ``np.quantile``) of the
            training rows' scores against the bank (kept rows leaving themselves out, by index: an exact copy of a
            row stays its neighbour), as PyOD's ``contamination`` sets it; of ``N`` rows, the expected share of
            rows like the training data flagged is ``(N (1 - q) + q) / (N + 1)``, about ``1 - threshold_quantile``
            only for ``N`` large against ``1 / (1 - q)`` (a warning says when it is far off).
        clean_fraction: unsupervised setting: drop this fraction of ``X`` with the largest leave-one-out
            scores over ``clean_k`` neighbours before keeping it (0: keep everything).
        clean_k: neighbours of the cleaning score (capped at the number of rows - 1).
        knn_backend: one of :func:`~dn2_lightning.list_knn_backends`.
        max_memory_bytes: temporary-memory budget of one search.

    Attributes (after ``fit``):
        bank_: ``[N, D]`` tensor of kept training rows (float64 for float64 ``X`` and for integers beyond 2**24, which
            float32 would round; else float32).
        kept_: bool mask over ``X``'s rows.
        decision_scores_: ``[N]`` every training row's score against the bank, in ``X``'s order, kept rows
            leaving themselves out (PyOD's training scores).
        threshold_: the decision threshold. ``labels_``: ``decision_scores_ > threshold_`` as 0/1.
        n_features_in_: ``D``; ``feature_names_in_``: a DataFrame's column names (scikit-learn's conventions).
        ``kept_``, ``decision_scores_`` and ``labels_`` are NumPy arrays for NumPy (or list) ``X``, tensors on
        ``X``'s device for a tensor, as the methods' results are.
    """

    def __init__(
        self,
        k: int = 2,
        threshold_quantile: float = 0.99,
        clean_fraction: float = 0.0,
        clean_k: int = 200,
        knn_backend: KNNBackend = "auto",
        max_memory_bytes: int | None = None,
    ) -> None:
        self.k, self.threshold_quantile = k, threshold_quantile
        self.clean_fraction, self.clean_k = clean_fraction, clean_k
        self.knn_backend, self.max_memory_bytes = knn_backend, max_memory_bytes
        self._check_params()

    def _check_params(self) -> None:
        """At construction and again in ``fit`` (``set_params`` changes them in between)."""
        check_k(self.k)
        check_threshold(self.threshold_quantile)
        check_clean_fraction(self.clean_fraction)
        check_clean_k(self.clean_k)
        check_knn_backend(self.knn_backend)
        check_int("max_memory_bytes", self.max_memory_bytes, 2**16, allow_none=True)

    def fit(self, X: ArrayLike, y: Any = None) -> DN2Detector:  # noqa: N803 (scikit-learn's names)
        """Keep ``X`` ``[N, D]`` (cleaned if asked) as the bank and set ``threshold_``. ``y`` is ignored."""
        return self._fit(X)

    def _fit(self, X: ArrayLike, stacklevel: int = 3) -> DN2Detector:  # noqa: N803
        """``fit``; ``stacklevel``: the user's call's frame, counted from here, for warnings."""
        self._check_params()
        x = _as_matrix(X, "X", stacklevel=stacklevel + 1)
        n = x.shape[0]
        if n <= self.k:
            raise ValueError(f"X has {n} rows; DN2 with k={self.k} needs more than k rows to fit and set a threshold.")
        kept = torch.ones(n, dtype=torch.bool, device=x.device)
        if self.clean_fraction > 0:
            loo = leave_one_out_scores(x, torch.arange(n, device=x.device), min(self.clean_k, n - 1), self._searcher(x))
            kept = keep_lowest(loo, self.clean_fraction)
            if kept.all():
                warnings.warn(
                    f"clean_fraction={self.clean_fraction} of {n} rows rounds to none removed, so the bank is not "
                    "cleaned: raise clean_fraction (or use 0 to say no cleaning).",
                    stacklevel=stacklevel,
                )
            if int(kept.sum()) <= self.k:
                raise ValueError(
                    f"clean_fraction={self.clean_fraction} leaves {int(kept.sum())} rows, not more than "
                    f"k={self.k}; lower clean_fraction or k."
                )
        validate_data(self, X, skip_check_array=True)  # n_features_in_ (a DataFrame's feature_names_in_) with bank_
        self.bank_ = x[kept]  # a copy: X may be the caller's own array, which it can modify afterwards
        self._prepared = None
        # every training row scored against the bank (the kept ones leaving themselves out), as a test row is:
        # the kept rows alone are the densest and would put the threshold too low
        bank_ids = torch.arange(len(self.bank_), device=x.device)
        kept_scores = leave_one_out_scores(self.bank_, bank_ids, self.k, self._searcher())
        scores = kept_scores.new_empty(n)
        scores[kept] = kept_scores
        if not kept.all():
            scores[~kept] = knn_scores(self._searcher()(x[~kept], self.k))  # (x is checked already)
        self._sorted_scores = scores.sort().values
        self.threshold_ = quantile_threshold(scores, self.threshold_quantile)
        note = coarse_quantile_note(n, self.threshold_quantile)
        if note is not None:  # the scores are X's rows'
            warnings.warn(f"{note} Fit more rows.", stacklevel=stacklevel)
        self._threshold_set_at = {"k": self.k, "threshold_quantile": self.threshold_quantile}
        # NumPy for NumPy input, as PyOD's (and this class's methods') results
        self.kept_ = _like_input(kept, X)
        self.decision_scores_ = _like_input(scores, X)
        self.labels_ = _like_input(exceeds(scores, self.threshold_).long(), X)  # float64 threshold, exactly
        return self

    def fit_predict(self, X: ArrayLike, y: Any = None) -> np.ndarray | Tensor:  # noqa: N803
        """``fit(X)``, then the training rows' 0/1 labels (:attr:`labels_`), as PyOD's ``fit_predict``."""
        self._fit(X) if type(self).fit is DN2Detector.fit else self.fit(X)  # (a subclass's own fit is called)
        return self.labels_

    def decision_function(self, X: ArrayLike) -> np.ndarray | Tensor:  # noqa: N803
        """DN2 scores ``[M]`` of the rows of ``X`` (higher = more anomalous), as a numpy array for numpy
        input and a tensor on ``X``'s device for tensor input."""
        return _like_input(self._scores(X), X)

    def predict(self, X: ArrayLike) -> np.ndarray | Tensor:  # noqa: N803
        """0/1 labels ``[M]``: 1 where the score exceeds :attr:`threshold_`."""
        self._check_threshold_settings()
        return _like_input(exceeds(self._scores(X), self.threshold_).long(), X)

    def predict_proba(self, X: ArrayLike) -> np.ndarray | Tensor:  # noqa: N803
        """``[M, 2]`` (normal, anomalous) from the normalised score: the share of the training rows' scores
        (``decision_scores_``) below each score."""
        self._check_fitted()
        self._check_threshold_settings()
        anomalous = normalized_scores(self._sorted_scores, self._scores(X))
        return _like_input(torch.stack([1 - anomalous, anomalous], dim=1), X)

    def _check_threshold_settings(self) -> None:
        """``threshold_`` and ``decision_scores_`` are training scores at the fit's ``k``, cut at its quantile: a
        ``k`` or ``threshold_quantile`` set since (``set_params``) would compare scores of one ``k`` with another's."""
        fitted = getattr(self, "_threshold_set_at", None)
        if getattr(self, "bank_", None) is None or fitted is None:
            return
        self._check_params()  # a value set out of range is said as such first
        changed = {name: value for name, value in fitted.items() if getattr(self, name) != value}
        if changed:
            now = ", ".join(f"{name}={getattr(self, name)!r}" for name in changed)
            then = ", ".join(f"{name}={value!r}" for name, value in changed.items())
            raise ValueError(
                f"{now} was set after fit, but threshold_ and decision_scores_ are from fit's {then}: call fit(X) "
                f"again to set them for {now} (or set {then} back). decision_function gives scores at {now} as it is."
            )

    def _check_fitted(self) -> None:
        """scikit-learn's (and PyOD's) ``NotFittedError`` before ``fit``."""
        if getattr(self, "bank_", None) is None:
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit(X) first.")

    def _scores(self, X: ArrayLike) -> Tensor:  # noqa: N803
        self._check_fitted()
        x = _as_matrix(X, "X", self.bank_.device, stacklevel=4)  # (user -> method -> _scores -> here)
        if hasattr(self, "n_features_in_"):  # (a detector fitted before it was set: bank_'s width below)
            validate_data(self, X, reset=False, skip_check_array=True)  # features (and a DataFrame's names) as fit's
        if x.shape[1] != self.bank_.shape[1]:
            raise ValueError(f"X has {x.shape[1]} features but the detector was fitted on {self.bank_.shape[1]}.")
        return knn_scores(self._searcher()(x, self.k))

    def _searcher(self, bank: Tensor | None = None) -> Callable[[Tensor, int], KNNResult]:
        """``search(queries, k)`` in ``bank`` (by default the fitted bank), which is prepared for search once (the
        fitted bank once per fit), not per call: that would be a centred copy of the bank each time."""
        if bank is None:
            key, cached = content_key(self.bank_), getattr(self, "_prepared", None)
            if cached is None or cached[0] != key:  # a new fit, or bank_ replaced or edited in place
                self._prepared = cached = (key, prepare_bank(self.bank_))
            prepared = cached[1]
        else:
            prepared = prepare_bank(bank)
        backend, budget = self.knn_backend, self.max_memory_bytes
        return lambda queries, k: knn_distances(queries, prepared, k, backend, max_memory_bytes=budget)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # scikit-learn's may be this object's own __dict__
        state.pop("_prepared", None)  # a copy of bank_: made again on first use
        return state

    def __repr__(self) -> str:
        threshold = getattr(self, "threshold_", None)  # scikit-learn's repr: the settings not at their default
        return super().__repr__() + (f" with threshold_={float(threshold):.4g}" if threshold is not None else "")


def _like_input(result: Tensor, X: ArrayLike) -> np.ndarray | Tensor:  # noqa: N803
    """A tensor on ``X``'s device for tensor input (the bank may be elsewhere; float64 results stay on the CPU for
    a device without float64), else a NumPy array."""
    if not isinstance(X, Tensor):
        return result.cpu().numpy()
    return result if result.dtype == torch.float64 and lacks_float64(X.device) else result.to(X.device)


def _warn_if_rounded(tensor: Tensor, name: str, stacklevel: int) -> None:
    """Integers beyond 2**53 in magnitude are searched in float64, which rounds them (as scikit-learn's neighbours
    do): say so, since distances between rows closer than that rounding are then wrong."""
    if tensor.dtype == torch.bool or not tensor.numel():
        return
    if tensor.dtype == torch.uint64:  # (torch has no max for unsigned integers but uint8; uint64 > int64's range)
        largest = int(tensor.cpu().numpy().max())
    else:
        signed = tensor.long()
        largest = max(int(signed.max()), -int(signed.min()))
    if largest > 2**53:
        step = 2 ** (largest.bit_length() - 53)
        warnings.warn(
            f"{name} holds integers up to {largest:,} in magnitude, beyond 2**53: float64, in which they are "
            f"searched, rounds them to multiples of up to {step:,}, so distances between rows closer than that are "
            f"off. Subtract one offset from the training and test rows alike first (e.g. the training rows' "
            f"column minimum), which keeps them exact.",
            stacklevel=stacklevel,
        )


def _as_matrix(values: ArrayLike, name: str, device: torch.device | None = None, stacklevel: int = 3) -> Tensor:
    """``values`` as a 2-D float tensor (see ``DN2Detector``'s attributes for the dtype); ``stacklevel``: the user's
    call's frame, counted from here, for warnings."""
    if scipy.sparse.issparse(values) or (isinstance(values, Tensor) and values.layout != torch.strided):
        raise TypeError(
            f"{name} is a sparse {type(values).__name__}, but DN2Detector needs dense rows: pass {name}.toarray() "
            f"(SciPy) or {name}.to_dense() (torch)."
        )
    if isinstance(values, Tensor):
        tensor = values
    else:
        try:
            array = np.asarray(values)
        except ValueError as err:  # ragged rows: "inhomogeneous shape"
            raise ValueError(f"{name} must be a 2-D array [rows, features] of numbers; NumPy says: {err}") from None
        if array.dtype.kind not in "biufc":  # strings, objects, dates: nothing torch can measure distances on
            raise ValueError(f"{name} must hold numbers (bool, integer or float), got a NumPy {array.dtype} array.")
        if array.dtype.kind in "fc" and array.dtype.itemsize > (8 if array.dtype.kind == "f" else 16):  # torch: none
            real, cast = ("real numbers", ".real") if array.dtype.kind == "c" else ("floats of at most 64 bits", "")
            raise ValueError(
                f"{name} must hold {real}, got a NumPy {array.dtype} array: pass {name}{cast}.astype(np.float64)."
            )
        tensor = tensor_of(array)  # (a view with negative strides or big-endian data, which torch refuses, copied)
    if tensor.ndim != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(
            f"{name} must be a 2-D array [rows, features] with at least one row and one feature, got "
            f"{tuple(tensor.shape)}."
        )
    if tensor.is_complex():
        raise ValueError(f"{name} must hold real numbers, got dtype {tensor.dtype}.")
    if not tensor.is_floating_point():  # bool and integers of any width (some lack abs/max on the CPU)
        _warn_if_rounded(tensor, name, stacklevel + 1)
        tensor = tensor.double() if tensor.dtype == torch.uint64 else tensor.long()  # uint64 would wrap in int64
    # float64 stays float64 (exact at large offsets, as knn_distances searches it), and so do integers beyond
    # float32's 2**24 (which float32 would round); other dtypes become float32
    exact_in_float32 = tensor.is_floating_point() or not len(tensor) or int(tensor.abs().max()) <= 2**24
    dtype = torch.float64 if tensor.dtype == torch.float64 or not exact_in_float32 else torch.float32
    device = device or tensor.device
    if dtype == torch.float64 and (lacks_float64(device) or lacks_float64(tensor.device)):
        tensor, device = tensor.cpu(), torch.device("cpu")  # (Apple's MPS) cast on the CPU, where such banks stay
    tensor = tensor.to(device, dtype)
    if not bool(torch.isfinite(tensor).all()):
        rows = (~torch.isfinite(tensor).all(1)).nonzero().flatten().tolist()
        raise ValueError(f"{name} holds NaN or Inf in rows {rows[:10]}; drop or impute them first.")
    return tensor

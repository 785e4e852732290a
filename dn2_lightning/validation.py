"""Argument validators shared by every entry point (DN2Module, the DataModules, ``dn2-protocol``).

Each parameter is checked by one function here, so the module, the datamodules and the protocol accept
and refuse the same values with the same message. Messages name the parameter, the value and the fix.

>>> check_fraction("contamination", 0.1)
>>> check_fraction("contamination", 1.5)
Traceback (most recent call last):
...
ValueError: contamination=1.5 must be in [0, 1).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import torch


def tensor_of(array: object) -> torch.Tensor:
    """``torch.as_tensor(array)``, sharing a NumPy array's memory where torch can: a read-only array
    (``np.load(..., mmap_mode="r")``) without torch's warning (callers never write to it), a view with negative
    strides (``x[::-1]``) or another byte order (big-endian data read from a file) copied, where torch refuses
    them."""
    if not isinstance(array, np.ndarray):
        return torch.as_tensor(array)
    if any(stride < 0 for stride in array.strides):
        array = np.ascontiguousarray(array)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(array)


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}.")


def check_int(
    name: str, value: object, minimum: int = 1, allow_none: bool = False, none_means: str = "", hint: str = ""
) -> None:
    """Raise ValueError unless ``value`` is an integer ``>= minimum`` (``bool`` is refused), or ``None`` when
    ``allow_none``.

    Args:
        name, value: the parameter, as the user spelled it, and its value.
        minimum: the smallest valid value.
        allow_none: ``None`` is valid too; ``none_means`` says what it stands for in the message.
        hint: appended to the message (e.g. the usual value).
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        none = f"None ({none_means}) or " if allow_none and none_means else "None or " if allow_none else ""
        if isinstance(value, Integral) and not isinstance(value, bool) and value >= minimum:
            hint = f"{hint}; a {type(value).__name__} (NumPy?): pass int(value)"
        raise ValueError(f"{name}={value!r} must be {none}an integer >= {minimum}{_hint(hint)}.")


def check_seed(name: str, value: object) -> None:
    """Raise ValueError unless ``value`` is an integer that torch's and NumPy's generators take (|seed| < 2**63)."""
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
        raise ValueError(f"{name}={value!r} must be an integer in [-2**63, 2**63){numpy_integer_hint(value)}.")


def numpy_integer_hint(value: object) -> str:
    """`` (a int64, NumPy?: pass int(value))`` for an integer that is not a Python ``int`` (a NumPy or torch scalar
    fails ``isinstance(value, int)``), else ``""``."""
    if isinstance(value, Integral) and not isinstance(value, bool | int):
        return f" (a {type(value).__name__}, NumPy?: pass int(value))"
    return ""


def check_bool(name: str, value: object) -> None:
    """Raise ValueError unless ``value`` is ``True`` or ``False`` (a string such as ``"no"`` would read as true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False.")


def check_positive_int(
    name: str, value: object, allow_none: bool = False, none_means: str = "", hint: str = ""
) -> None:
    """Raise ValueError unless ``value`` is an integer >= 1 (or ``None`` when ``allow_none``)."""
    check_int(name, value, 1, allow_none, none_means, hint)


def check_fraction(
    name: str,
    value: object,
    low: float = 0.0,
    high: float = 1.0,
    low_inclusive: bool = True,
    high_inclusive: bool = False,
    hint: str = "",
) -> None:
    """Raise ValueError unless ``value`` is a real number in the interval from ``low`` to ``high``.

    Args:
        name, value: the parameter and its value (NaN is always refused).
        low, high: the interval's ends; ``low_inclusive``/``high_inclusive`` say whether they belong to it.
        hint: appended to the message.
    """
    interval = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
    ok = isinstance(value, Real) and not isinstance(value, bool) and value == value  # NaN != NaN
    if ok:
        ok = (value >= low if low_inclusive else value > low) and (value <= high if high_inclusive else value < high)
    if not ok:
        raise ValueError(f"{name}={value!r} must be in {interval}{_hint(hint)}.")


# ----------------------------------------------------------------------------------------------------
# One function per parameter that several entry points share


def check_k(k: object) -> None:
    """``k``, the neighbours averaged in the DN2 score: a Python or NumPy integer (``numbers.Integral``, not
    ``bool``), as :func:`dn2_lightning.knn.knn_distances` takes it."""
    check_positive_int(
        "k", int(k) if isinstance(k, Integral) and not isinstance(k, bool) else k, hint=" (the paper uses k=2)"
    )


def check_input_size(input_size: object) -> None:
    """``input_size``, the backbone's resolution on the device (``None`` = the backbone's own)."""
    check_int("input_size", input_size, 8, allow_none=True, none_means="the backbone's own")


def check_data_root(root: object) -> None:
    """A datamodule's ``root``: ``None`` or a folder (missing is fine: a download makes it), never a file, which the
    dataset's search would pass over for its other places without a word."""
    if root is not None and not (isinstance(root, str | os.PathLike) and isinstance(os.fspath(root), str)):
        raise ValueError(
            f"root={root!r} must be a folder's path (a str or pathlib.Path), or None ($DN2_DATA_DIR, else "
            "~/.cache/dn2_lightning/data)."
        )
    if root is not None and Path(root).is_file():
        raise ValueError(
            f"root={os.fspath(root)!r} is a file; give the folder that holds the dataset's files (None: "
            "$DN2_DATA_DIR, else ~/.cache/dn2_lightning/data)."
        )


def check_load_size(load_size: object) -> None:
    """``load_size``, the square size uint8 images are resized to on the CPU while loading (``None`` = native)."""
    check_positive_int("load_size", load_size, allow_none=True, none_means="the native size")


def check_knn_backend(knn_backend: object) -> None:
    """``knn_backend``, one of :func:`dn2_lightning.knn.list_knn_backends`."""
    from dn2_lightning.knn import list_knn_backends

    check_choice("knn_backend", knn_backend, list_knn_backends())


def check_clean_fraction(clean_fraction: object) -> None:
    """``clean_fraction``, the share of the bank dropped by cleaning (0 disables cleaning)."""
    check_fraction("clean_fraction", clean_fraction, hint="; 0 disables cleaning")


def check_clean_k(clean_k: object) -> None:
    """``clean_k``, the neighbours in the leave-one-out cleaning score."""
    check_positive_int("clean_k", clean_k)


def check_contamination(contamination: object) -> None:
    """``contamination``, the share of anomalies mixed into the train set (0 = a clean train set)."""
    check_fraction("contamination", contamination, hint="; 0 means a clean train set")


def check_positive_float(name: str, value: object, hint: str = "") -> None:
    """Raise ValueError unless ``value`` is a finite number > 0 (``bool`` is refused)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0.0 < value < float("inf")):
        raise ValueError(f"{name}={value!r} must be a finite number > 0{_hint(hint)}.")


_FLOAT32_MAX = 3.4028234663852886e38
# Python's and NumPy's numbers, which settings store as Python ones (as_python); not every numbers.Real (a Fraction
# reaches torch.quantile, which refuses it, and a checkpoint, which weights-only loading refuses)
_REAL = (int, float, np.integer, np.floating)


def check_threshold(quantile: object, value: object = None) -> None:
    """The decision threshold: a quantile in (0, 1] of the training images' leave-one-out scores, or a finite score."""
    # a NumPy float (np.percentile of float32 scores is an np.float32) is the number it holds
    if isinstance(quantile, bool) or not isinstance(quantile, _REAL) or not 0.0 < quantile <= 1.0:
        raise ValueError(
            f"threshold_quantile={quantile!r} must be in (0, 1]: the share of the training images' leave-one-out "
            f"scores below the threshold (0.99 flags about 1% of normal images){_tensor_hint(quantile)}."
        )
    finite = isinstance(value, _REAL) and not isinstance(value, bool) and math.isfinite(value)
    if value is not None and not finite:
        raise ValueError(
            f"threshold={value!r} must be None (use threshold_quantile) or a finite DN2 score{_tensor_hint(value)}."
        )
    if finite and value > _FLOAT32_MAX:  # flags nothing: a typo's exponent, not a score
        raise ValueError(
            f"threshold={value!r} is beyond float32's range (3.4e38), where no DN2 score of float32 embeddings lies "
            "(it would flag nothing): give a score (the printed threshold, or scores.csv's score column), or None."
        )
    if finite and value < 0:  # a mean of squared distances: every sample would be flagged
        raise ValueError(
            f"threshold={value!r} is below 0, where no DN2 score (a mean of squared distances) lies: every sample "
            "would be flagged. Give a score (the printed threshold, or scores.csv's score column), or None."
        )


def as_python(value: Any) -> Any:
    """``value`` with every NumPy scalar (``np.int64(2)``, ``np.float64(0.5)``, ``np.bool_``) turned into the Python
    number it holds and every path (``pathlib.Path``, any ``os.PathLike``) into its string, inside dicts, lists and
    tuples too; anything else (tensors included) is returned as it is.

    Settings are stored this way: a weights-only checkpoint load refuses NumPy and pathlib objects (a checkpoint
    holding one could never be loaded again), and JSON cannot write them.

    >>> as_python({"k": np.int64(2), "layers": [np.float32(0.5)]})
    {'k': 2, 'layers': [0.5]}
    """
    if isinstance(value, np.floating):
        return float(value)  # (np.longdouble's .item() is an np.longdouble, which checkpoints refuse)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        converted = copy.copy(value)  # the same kind of dict (AttributeDict, OrderedDict, ...)
        for key, item in value.items():
            converted[key] = as_python(item)
        return converted
    if isinstance(value, list | tuple) and not hasattr(value, "_fields"):  # a namedtuple keeps its own type
        return type(value)(as_python(item) for item in value)
    return value


def _tensor_hint(value: object) -> str:
    """``; a tensor: pass float(value)`` for a one-element tensor (e.g. ``scores.max()``), ``; pass float(value)``
    for another kind of number (e.g. a ``Fraction``), else ``""``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return "; a tensor: pass float(value)"
    return "; pass float(value)" if isinstance(value, Real) and not isinstance(value, _REAL) else ""


def _hint(hint: str) -> str:
    return hint if not hint or hint.startswith((" ", ";", ",")) else f" ({hint})"

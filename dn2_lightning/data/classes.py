"""Which classes of a labelled dataset are normal, and which anomalies contaminate a train set (no Lightning
needed: ``dn2-protocol`` uses these without the DataModules)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from dn2_lightning.validation import numpy_integer_hint


@dataclass(frozen=True)
class AnomalyLabel:
    """A ``target_transform`` from class to anomaly label: 0 for the ``normal`` class (an index, or a name,
    matched case-insensitively, for targets that are names), 1 for any other. Unlike a lambda it can be pickled,
    as DataLoader workers started by spawn (the default on macOS and Windows) need.

    >>> from torchvision.datasets import ImageFolder  # doctest: +SKIP
    >>> ImageFolder(root, target_transform=AnomalyLabel(normal=1))  # doctest: +SKIP
    >>> [AnomalyLabel(1)(y) for y in (0, 1, 2)], AnomalyLabel("good")("crack")
    ([1, 0, 1], 1)
    >>> AnomalyLabel("good")(1)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: AnomalyLabel(normal='good') got a class index, 1: give the normal class the same way ...
    """

    normal: int | str

    def __post_init__(self) -> None:
        if isinstance(self.normal, bool) or not isinstance(self.normal, numbers.Integral | str):
            raise TypeError(f"AnomalyLabel(normal={self.normal!r}): give the normal class's index or name.")
        if isinstance(self.normal, numbers.Integral) and self.normal < 0:  # no target is negative: all anomalous
            raise ValueError(f"AnomalyLabel(normal={self.normal!r}): a class index is 0 or more.")

    def __call__(self, target: int | str) -> int:
        if isinstance(target, str) != isinstance(self.normal, str):  # every target would be "not normal"
            given = "a class name" if isinstance(target, str) else "a class index"
            raise TypeError(
                f"AnomalyLabel(normal={self.normal!r}) got {given}, {target!r}: give the normal class the same way "
                "(an ImageFolder's targets are indices: AnomalyLabel(dataset.class_to_idx['good']))."
            )
        if isinstance(target, str):  # names as normal_class takes them: case-insensitive
            return int(target.casefold() != self.normal.casefold())
        return int(target != self.normal)


def resolve_class(normal_class: int | str, classes: tuple[str, ...], name: str = "normal_class") -> int:
    """Index of ``normal_class`` given as an index or a case-insensitive class name.

    Args:
        normal_class: a class index or name.
        classes: the dataset's class names.
        name: how the parameter is called in error messages.

    Raises:
        ValueError: not a class name, or an index out of range; the message lists the classes.
    """
    choices = ", ".join(f"{i}={c!r}" for i, c in enumerate(classes))
    check_class_ref(name, normal_class)
    if isinstance(normal_class, str) and not normal_class.lstrip("-").isdigit():
        names = [c.lower() for c in classes]
        if normal_class.lower() not in names:
            raise ValueError(f"{name}={normal_class!r} is not a class name; choose one of {choices}.")
        return names.index(normal_class.lower())
    index = int(normal_class)
    if not 0 <= index < len(classes):
        raise ValueError(f"{name}={normal_class!r} is out of range 0..{len(classes) - 1}; classes: {choices}.")
    return index


def check_class_ref(name: str, value: object) -> None:
    """Raise ValueError unless ``value`` is a class index (int) or a class name (str)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(
            f"{name}={value!r} must be a class index (int) or a class name (str){numpy_integer_hint(value)}."
        )


def contaminant_count(contamination: float, n_normal: int) -> int:
    """How many anomalies make up the share of ``n_normal + count`` nearest to ``contamination`` (the larger count
    on a tie), in exact arithmetic: rounding ``c * n / (1 - c)`` misses it (0.2 of 10 normal samples is 2.5 by that
    rule, which Python's ``round`` makes 2, a share of 16.7%, where 3 gives 23.1%).

    >>> contaminant_count(0.2, 10), contaminant_count(0.05, 106), contaminant_count(0.5, 7)
    (3, 6, 7)
    """
    c = Fraction(repr(float(contamination)))
    if c == 0:
        return 0
    below = math.floor(c * n_normal / (1 - c))
    return min((below + 1, below), key=lambda n: abs(Fraction(n, n_normal + n) - c) if n_normal + n else 1)


def draw_contaminants(labels: Tensor, normal_class: int, contamination: float, seed: int) -> Tensor:
    """Sorted indices of anomalies drawn (seeded) from the classes other than ``normal_class``, so that they
    make up ``contamination`` of a train set made of every ``normal_class`` sample plus them: as many as give the
    share nearest to it (the larger count on a tie)."""
    n_normal = int((labels == normal_class).sum())
    n = contaminant_count(contamination, n_normal)
    others = (labels != normal_class).nonzero().flatten()
    if contamination > 0 and n == 0:
        one = 0.5 / (n_normal + 1)  # the least fraction whose nearest share is one anomaly; shown rounded up
        step = 10.0 ** (math.floor(math.log10(one)) - 1)
        smallest = math.ceil(one / step * (1 + 1e-9)) * step
        raise ValueError(
            f"contamination={contamination} of a train set of {n_normal} normal samples rounds to 0 anomalies, so "
            f"the run would be unsupervised in name only; use contamination >= {smallest:.2g} (one anomaly) or 0."
        )
    if n > len(others):
        raise ValueError(f"contamination={contamination} needs {n} anomalies but only {len(others)} exist.")
    g = torch.Generator().manual_seed(seed)
    return others[torch.randperm(len(others), generator=g)[:n]].sort().values

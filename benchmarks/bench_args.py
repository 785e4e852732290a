"""argparse types and checks shared by the benchmark scripts: a bad value is an argparse error naming the flag,
not a stack trace (or an impossible figure) from deep inside a run."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch


def at_least(low: int) -> Callable[[str], int]:
    """An int type accepting values >= ``low``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def unit_fraction(text: str) -> float:
    """A float in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def require_device(parser: argparse.ArgumentParser, device: torch.device) -> None:
    """Stop with the flag to change when ``device`` is CUDA and none is available."""
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is available: pass --preset cpu (or another CPU preset)")

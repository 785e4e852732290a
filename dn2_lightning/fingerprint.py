"""The backbone's fingerprint: a fixed probe's embedding, kept with the memory bank when it is made and compared when
a loaded bank is first used. The recorded settings (backbone name, input size, normalisation, a custom trunk's
layout) miss a changed computation under the same settings: an edited ``forward``, other weights loaded with
``strict=False``, a library upgrade that embeds otherwise. Queries embedded so would be scored against rows of another
embedding, without a word."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

# Largest relative L2 difference of a probe embedding from the saved one that is taken as the same backbone. The probe
# is embedded in float32 without autocast or TF32 (:func:`exact_float32`), whatever the bank's rows were embedded
# under: bf16 autocast alone moved efficientnet_lite0's probe embeddings 2.3% to 42% from float32 on the CPU (and two
# bf16 devices round otherwise too), so no tolerance could tell that from another backbone; in float32, one CPU thread
# vs two moved them 2e-6. Another function lies far above it: a custom trunk's forward adding 0.1: 35%; doubling:
# 100%; other weights: 148% (a linear trunk), 100% (lite0, random weights), 147 to 154% (lite1 instead of lite0).
FINGERPRINT_TOLERANCE = 5e-2
# a probe at the training images' size (the resize is part of the embedding) unless larger than this: then at the
# backbone's input size
MAX_PROBE_PIXELS = 1024 * 1024
_SEED = 20_200_228


def probe_images(height: int, width: int, channels: int = 3) -> Tensor:
    """The fixed probe: ``[2, channels, height, width]`` float32 in [0, 1), the same on every device and torch
    version (made on the CPU with NumPy's seeded generator): seeded noise, and smooth stripes."""
    noise = np.random.default_rng(_SEED).random((channels, height, width), dtype=np.float32)
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    phases = np.array([0.0, 2.0, 4.0])[:channels, None, None]
    stripes = 0.5 + 0.4 * np.sin(6.0 * x[None] + 4.0 * y[None] + phases)
    return torch.from_numpy(np.stack([noise, stripes.astype(np.float32)]))


def probe_size(train_image_size: list[int] | None, input_size: int | None) -> list[int] | None:
    """The probe's ``[height, width]``: the training images' one size (as the bank's rows were embedded from), else
    the backbone's input size; ``None`` when neither is known (no fingerprint)."""
    if train_image_size and train_image_size[0] * train_image_size[1] <= MAX_PROBE_PIXELS:
        return [int(train_image_size[0]), int(train_image_size[1])]
    return [int(input_size), int(input_size)] if input_size else None


@contextlib.contextmanager
def exact_float32(device_type: str) -> Iterator[None]:
    """Compute in float32 on ``device_type``: no autocast, no TF32 nor bf16 matmuls (restored afterwards)."""
    knobs = _fp32_precision_knobs()
    saved = [knob.fp32_precision for knob in knobs]
    # torch without the per-backend settings: its TF32 flags
    legacy = None if knobs else (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        for knob in knobs:
            knob.fp32_precision = "ieee"
        if legacy is not None:
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        for knob, precision in zip(knobs, saved, strict=True):
            knob.fp32_precision = precision
        if legacy is not None:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = legacy


def _fp32_precision_knobs() -> list[Any]:
    """torch's per-backend float32 precision settings (``fp32_precision``), where it has them: the legacy TF32 flags
    set there mix the two APIs, after which ``torch.get_float32_matmul_precision()`` raises (Lightning reads it when
    a Trainer starts on a GPU) for a user who set it to "medium"."""
    ops = {"cuda": ("matmul",), "cudnn": ("conv", "rnn"), "mkldnn": ("matmul", "conv", "rnn")}
    knobs = [getattr(getattr(torch.backends, backend), op, None) for backend, names in ops.items() for op in names]
    return [knob for knob in knobs if knob is not None and hasattr(knob, "fp32_precision")]


def fingerprint_difference(saved: Tensor, current: Tensor) -> float | None:
    """The largest relative L2 difference of a probe image's embedding ``current`` from the ``saved`` one (float64,
    on the CPU; infinite for embeddings of another shape); ``None`` for a saved fingerprint that is not finite (a
    backbone whose probe embedding overflowed), which cannot be compared."""
    saved, current = saved.detach().cpu().double(), current.detach().cpu().double()  # (MPS has no float64)
    if not torch.isfinite(saved).all():
        return None
    if saved.shape != current.shape:
        return float("inf")
    # each probe relative to its own norm, floored at a thousandth of the larger one's: a probe that embeds (almost)
    # to zero would read device rounding as a huge relative difference
    norms = saved.norm(dim=1)
    norms = norms.clamp_min(max(float(norms.max()) * 1e-3, torch.finfo(torch.float32).tiny))
    return float(((current - saved).norm(dim=1) / norms).nan_to_num(nan=float("inf")).max())

"""SPADE pixel scores (Cohen & Hoshen, 2020): exact patch kNN, upsampling and Gaussian smoothing.

Every position of a test image is scored by the mean squared distance to its ``kappa`` nearest patch
features in a bank of training positions:

* ``"nearest_images"`` (SPADE): the bank is every position of the test image's ``K`` nearest training
  images by global feature (:func:`nearest_image_patch_scores`);
* ``"all"``: one bank of every training position (:func:`all_patch_scores`).

Both use :func:`dn2_lightning.knn.knn_distances` (exact), within a temporary-memory budget.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from dn2_lightning.knn import DEFAULT_MAX_MEMORY_BYTES, PreparedBank, knn_distances, merge_topk

PatchBankName = Literal["nearest_images", "all"]
PATCH_BANKS: tuple[str, ...] = get_args(PatchBankName)


def nearest_image_patch_scores(
    queries: Tensor,
    train_patches: Tensor,
    neighbours: Tensor,
    kappa: int = 1,
    backend: str = "auto",
    max_memory_bytes: int | None = None,
) -> Tensor:
    """Patch scores against the positions of each test image's nearest training images.

    Args:
        queries: ``[B, P, C]`` patch features of ``B`` test images with ``P`` positions each.
        train_patches: ``[N, Q, C]`` patch features of the ``N`` training images.
        neighbours: ``[B, K]`` rows of ``train_patches``: the ``K`` nearest training images of each test image.
        kappa: nearest patch features averaged per position (``1 <= kappa <= K * Q``).
        backend: kNN backend.
        max_memory_bytes: budget of the search's temporaries, gathered bank chunks included
            (default 512 MiB). The neighbours' patches are searched in chunks of images and the per-chunk
            top-``kappa`` lists merged, which is exact.

    Returns:
        ``[B, P]`` mean squared distance to the ``kappa`` nearest patch features.
    """
    b, p, c = queries.shape
    n, q, _ = train_patches.shape
    k_images = neighbours.shape[1]
    if not 1 <= kappa <= k_images * q:
        raise ValueError(f"map_kappa={kappa} must be in [1, {k_images * q}] (nearest images x positions).")
    budget = max_memory_bytes or DEFAULT_MAX_MEMORY_BYTES
    # a chunk's gathered rows and the kNN's centred copy of them take half the budget, the search the rest
    images_per_chunk = max(1, min(k_images, (budget // 2) // (2 * 4 * q * c + 1)))
    search_budget = max(2**16, budget // 2)
    out = []
    for i in range(b):
        values, indices = [], []
        for start in range(0, k_images, images_per_chunk):
            rows = neighbours[i, start : start + images_per_chunk]
            bank = train_patches[rows].reshape(-1, c)
            knn = knn_distances(queries[i], bank, min(kappa, bank.shape[0]), backend, max_memory_bytes=search_budget)
            values.append(knn.values)
            indices.append(knn.indices + start * q)
        out.append(merge_topk(values, indices, kappa).values.mean(1))
    return torch.stack(out)


def all_patch_scores(
    queries: Tensor,
    bank: Tensor | PreparedBank,
    kappa: int = 1,
    backend: str = "auto",
    max_memory_bytes: int | None = None,
) -> Tensor:
    """Patch scores against one bank of every training position.

    Args:
        queries: ``[B, P, C]`` patch features.
        bank: ``[M, C]`` training patch features (or a :class:`PreparedBank` of them).
        kappa: nearest patch features averaged per position.
        backend, max_memory_bytes: as in :func:`dn2_lightning.knn.knn_distances`.

    Returns:
        ``[B, P]`` mean squared distance to the ``kappa`` nearest bank rows.
    """
    b, p, c = queries.shape
    knn = knn_distances(queries.reshape(b * p, c), bank, kappa, backend, max_memory_bytes=max_memory_bytes)
    return knn.values.mean(1).view(b, p)


def gaussian_kernel(sigma: float, truncate: float = 4.0, device: torch.device | None = None) -> Tensor:
    """Normalised 1-D Gaussian of radius ``round(truncate * sigma)``, as ``scipy.ndimage.gaussian_filter``."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)  # on the CPU: float64 is not on every device
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float().to(device)


def _reflect_indices(n: int, radius: int, device: torch.device) -> Tensor:
    """Indices padding a length-``n`` axis by ``radius`` with half-sample symmetric reflection
    (``d c b a | a b c d | d c b a``, scipy's ``mode="reflect"``), for any radius."""
    i = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_blur(maps: Tensor, sigma: float, truncate: float = 4.0) -> Tensor:
    """Separable Gaussian smoothing of ``[B, H, W]`` maps with reflected borders.

    Matches ``scipy.ndimage.gaussian_filter(map, sigma, mode="reflect", truncate=truncate)`` per map;
    ``sigma = 0`` returns the maps unchanged.

    Example:
        >>> gaussian_blur(torch.ones(1, 5, 5), sigma=2.0).allclose(torch.ones(1, 5, 5))
        True
    """
    if sigma < 0 or not math.isfinite(sigma):
        raise ValueError(f"map_sigma={sigma} must be a finite number >= 0 (0 = no smoothing).")
    if sigma == 0:
        return maps
    kernel = gaussian_kernel(sigma, truncate, maps.device)
    radius = (kernel.numel() - 1) // 2
    h, w = maps.shape[-2:]
    x = maps.float()[:, None]
    x = x.index_select(2, _reflect_indices(h, radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    x = x.index_select(3, _reflect_indices(w, radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return x[:, 0]


def to_image_maps(patch_maps: Tensor, size: tuple[int, int], sigma: float = 4.0) -> Tensor:
    """Upsample ``[B, h, w]`` patch-score maps bilinearly to ``size`` and smooth them (SPADE: sigma 4).

    Args:
        patch_maps: ``[B, h, w]`` scores per feature position.
        size: ``(H, W)`` of the output (the input images' size).
        sigma: Gaussian standard deviation in output pixels.

    Returns:
        ``[B, H, W]`` float32 anomaly maps.
    """
    # outside autocast (Trainer(precision="bf16-mixed" | "16-mixed")): the blur's convolution would round the maps
    # to 8 bits of mantissa, or overflow float16 beyond 65504
    with torch.autocast(patch_maps.device.type, enabled=False):
        up = F.interpolate(patch_maps.float()[:, None], size=tuple(size), mode="bilinear", align_corners=False)
        return gaussian_blur(up[:, 0], sigma)

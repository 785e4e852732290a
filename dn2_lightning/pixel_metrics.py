"""Pixel-level metrics of anomaly maps against ground-truth masks: pixel AUROC and PRO.

* :func:`pixel_auroc`: ROC area over every pixel of every image, with torchmetrics'
  ``BinaryAUROC(thresholds=...)`` (a ``[N, 2, 2]`` state) fed in chunks, so millions of pixels never need
  a sorted copy or an ``[pixels, N]`` comparison matrix.
* Both bin scores at :func:`score_levels`: thresholds at evenly spaced quantiles of the scores (a value held
  by many pixels gets its own), so every bin holds about the same share of pixels however far a few extreme
  pixels stretch the range or however many pixels tie.
* :func:`pro_score`: the per-region overlap of MVTec AD (Bergmann et al., IJCV 2021): ground-truth
  regions are the 8-connected components of each mask (``scipy.ndimage.label``), or the ``regions`` given, e.g.
  labelled where the mask was drawn, before it was resized (:class:`dn2_lightning.data.masks.MaskedImageDataset`
  gives them as ``gt_regions``: a thin scratch resized to fewer pixels falls apart into pieces, each of which would
  otherwise weigh as a whole defect); at each threshold the
  PRO is the mean, over all regions of all images, of the fraction of the region's pixels above the
  threshold; the false-positive rate counts anomaly-free pixels above it. The PRO-vs-FPR curve is
  integrated (trapezoids) from FPR 0 to ``fpr_limit`` (0.3) and divided by ``fpr_limit``, so a perfect
  map scores 1.
* :class:`MapCollector`: a torchmetrics ``Metric`` collecting maps and masks across batches and ranks
  (de-duplicated by sample index, like :class:`dn2_lightning.metrics.ScoreCollector`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC
from torchmetrics.utilities import dim_zero_cat

from dn2_lightning.distributed import collectives_available, unique_by_index
from dn2_lightning.knn import lacks_float64

DEFAULT_THRESHOLDS = 1000
DEFAULT_FPR_LIMIT = 0.3
_CHUNK = 2**20  # pixels per histogram update
_QUANTILE_SAMPLE = 2**22  # scores sorted to place the thresholds; beyond that, a seeded sample of them


class PixelResults(NamedTuple):
    """Anomaly maps of one evaluation, one row per sample, sorted by ``indices``.

    Attributes:
        indices: ``[N]`` sample index in the evaluated dataset.
        maps: ``[N, H, W]`` float32 anomaly maps (higher = more anomalous).
        masks: ``[N, H, W]`` bool ground-truth masks (``True`` = anomalous pixel).
        regions: ``[N, H, W]`` int32 ground-truth regions, numbered within each sample (0 = normal pixel), or
            ``None`` (:func:`pro_score` labels the masks' 8-connected components).
    """

    indices: Tensor
    maps: Tensor
    masks: Tensor
    regions: Tensor | None = None


def _check_maps_and_masks(maps: Tensor, masks: Tensor) -> None:
    if maps.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(
            f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be [N, H, W] with the same shape."
        )
    if not maps.is_floating_point():
        raise ValueError(f"maps must be a floating tensor, got dtype {maps.dtype}.")
    if not torch.isfinite(maps).all():
        raise ValueError("maps hold NaN or Inf values; pixel metrics need finite scores.")


def _normalise(maps: Tensor) -> Tensor:
    """Affine map of all scores to [0, 1] (order-preserving, so ROC and PRO are unchanged)."""
    low, high = maps.min(), maps.max()
    return (maps - low) / (high - low) if high > low else torch.zeros_like(maps)


def _check_threshold_count(thresholds: object, allow_none: bool = False) -> None:
    if isinstance(thresholds, bool) or not isinstance(thresholds, int) or thresholds < 2:
        exact = "None (exact) or " if allow_none else ""
        raise ValueError(f"thresholds={thresholds!r} must be {exact}an integer >= 2.")


def score_levels(scores: Tensor, thresholds: int) -> Tensor:
    """Ascending thresholds at ``thresholds`` evenly spaced quantiles of ``scores``, from the smallest score to
    the largest; every distinct score when there are no more of them (the binned metrics are then exact).

    Each bin between two thresholds then holds about ``1 / thresholds`` of the pixels. Evenly spaced thresholds
    over ``min..max`` do not: a few extreme pixels stretch the range and leave nearly every pixel in one
    bin, where the binned metrics treat them as ties. A value shared by more than ``1 / thresholds`` of the
    scores (e.g. a map clipped at 0 over most of the image) is a threshold of its own, and the others are
    placed at quantiles of the remaining scores, so such a mass cannot squeeze the rest into a few bins.
    Beyond ``2**22`` scores the quantiles are those of a seeded random sample of that size (the same
    thresholds on every run).

    >>> score_levels(torch.tensor([0.0, 1.0, 2.0, 3.0, 1000.0]), 3)
    tensor([   0.,    2., 1000.])
    >>> score_levels(torch.tensor([0.0] * 96 + [1.0, 2.0, 3.0, 4.0]), 3)  # not [0, 0, 4]: 0 holds 96%
    tensor([0., 1., 4.])
    """
    _check_threshold_count(thresholds)
    flat = scores.detach().flatten()
    if flat.numel() == 0 or not torch.isfinite(flat).all():
        raise ValueError("score_levels needs scores: a non-empty tensor of finite values.")
    sample = flat
    if flat.numel() > _QUANTILE_SAMPLE:
        generator = torch.Generator().manual_seed(0)
        sample = flat[torch.randint(flat.numel(), (_QUANTILE_SAMPLE,), generator=generator).to(flat.device)]
    values, counts = torch.unique(sample, sorted=True, return_counts=True)
    if values.numel() <= thresholds:
        levels = values
    else:
        heavy = counts > sample.numel() / thresholds
        rest = torch.repeat_interleave(values[~heavy], counts[~heavy])  # sorted, the heavy values left out
        ranks = torch.linspace(0, rest.numel() - 1, thresholds - int(heavy.sum()), dtype=torch.float64)
        levels = torch.cat([values[heavy], rest[ranks.round().long().to(rest.device)]])
    levels = levels.sort().values
    levels[0], levels[-1] = flat.min(), flat.max()  # a sample may miss the extremes
    return torch.unique(levels)


def pixel_auroc(maps: Tensor, masks: Tensor, thresholds: int = DEFAULT_THRESHOLDS) -> float:
    """Area under the pixel-level ROC curve, computed by torchmetrics' ``BinaryAUROC(thresholds=N)``.

    Scores are mapped affinely to [0, 1] (the ROC is unchanged) and binned at ``thresholds`` thresholds
    placed at quantiles of the scores (:func:`score_levels`), plus one above the largest score, where the
    curve starts at (0, 0). The metric's ``[N, 2, 2]`` confusion-matrix state is filled by :func:`binned_confmat`
    (a histogram: ``O(pixels)`` time, chunked memory) instead of its own update, which compares every
    pixel with every threshold; torchmetrics computes the curve and its area from that state.

    Args:
        maps: ``[N, H, W]`` anomaly maps.
        masks: ``[N, H, W]`` ground truth (non-zero = anomalous pixel).
        thresholds: number of thresholds (memory ``O(thresholds)``; the binning error shrinks as it grows:
            pixels in one bin count as ties, and each bin holds about ``1 / thresholds`` of them).

    Returns:
        The AUROC in [0, 1].

    Raises:
        ValueError: bad shapes, non-finite maps, or masks with only one class.

    Example:
        >>> maps = torch.tensor([[[0.1, 0.9], [0.2, 0.8]]])
        >>> pixel_auroc(maps, torch.tensor([[[0, 1], [0, 1]]]))
        1.0
    """
    _check_maps_and_masks(maps, masks)
    _check_threshold_count(thresholds)
    target = masks.flatten() != 0
    if target.all() or not target.any():
        raise ValueError("pixel AUROC needs both anomalous and normal pixels in the masks.")
    preds = _normalise(maps.flatten().double()).float()
    levels = score_levels(preds, thresholds)
    # every rank's maps are already here (MapCollector gathers them): no sync, which a single-device run after a DDP
    # one in the same script would otherwise make with the other processes
    thresholds_inf = torch.cat([levels, levels.new_full((1,), float("inf"))])
    metric = BinaryAUROC(thresholds=thresholds_inf, sync_on_compute=False).to(maps.device)
    metric.update(maps.new_empty(0), target.new_empty(0).long())  # marks the state as updated; adds nothing
    metric.confmat += binned_confmat(preds, target, metric.thresholds)
    return float(metric.compute().clamp(0.0, 1.0))  # (float32 rounding can land above 1)


def binned_confmat(preds: Tensor, target: Tensor, thresholds: Tensor) -> Tensor:
    """torchmetrics' multi-threshold confusion matrix ``[T, 2, 2]`` (``[t, target, preds >= thresholds[t]]``)
    of ``preds [P]`` and bool ``target [P]`` for ascending ``thresholds [T]``, from histograms, ``_CHUNK``
    pixels at a time.

    >>> binned_confmat(torch.tensor([0.2, 0.7]), torch.tensor([False, True]), torch.tensor([0.0, 0.5, 1.0]))[1]
    tensor([[1, 0],
            [0, 1]])
    """
    t = thresholds.numel()
    counts = torch.zeros(2, t + 1, dtype=torch.long, device=preds.device)
    for start in range(0, preds.numel(), _CHUNK):
        p, y = preds[start : start + _CHUNK], target[start : start + _CHUNK].long()
        reached = torch.bucketize(p, thresholds, right=True)  # how many thresholds each score reaches
        counts += torch.bincount(y * (t + 1) + reached, minlength=2 * (t + 1)).view(2, t + 1)
    # at threshold j a pixel is positive when it reaches more than j thresholds
    above = counts.flip(1).cumsum(1).flip(1)[:, 1:]  # [2, T]
    totals = counts.sum(1, keepdim=True)
    return torch.stack([totals - above, above], dim=-1).permute(1, 0, 2).contiguous()


def label_regions(masks: Tensor) -> tuple[np.ndarray, int]:
    """8-connected components of each mask, numbered 1..R across all images (0 = background).

    Returns:
        ``(labels [N, H, W] int64, R)``.
    """
    from scipy.ndimage import label

    structure = np.ones((3, 3), dtype=int)  # 8-connectivity, as MVTec AD's evaluation code
    out = np.zeros(tuple(masks.shape), dtype=np.int64)
    total = 0
    for i, mask in enumerate(masks.cpu().numpy() != 0):
        labels, count = label(mask, structure=structure)
        out[i] = np.where(labels > 0, labels + total, 0)
        total += count
    return out, total


def _check_regions(regions: Tensor, masks: Tensor) -> None:
    if tuple(regions.shape) != tuple(masks.shape) or regions.is_floating_point() or regions.is_complex():
        raise ValueError(
            f"regions {tuple(regions.shape)} {regions.dtype} must be integer region ids of the masks' shape "
            f"{tuple(masks.shape)} (0 = normal pixel)."
        )
    if regions.numel() and int(regions.min()) < 0:
        raise ValueError("regions hold negative ids: number each sample's regions 1, 2, ... (0 = normal pixel).")
    if bool(((regions != 0) != (masks != 0)).any()):
        raise ValueError(
            "regions and masks disagree on which pixels are anomalous: give regions whose non-zero pixels are "
            "the masks' (both resized the same way, by nearest neighbour)."
        )


def number_regions(regions: Tensor, masks: Tensor) -> tuple[np.ndarray, int]:
    """Given regions, numbered within each sample (any non-negative ids; 0 = normal), renumbered 1..R across all
    samples, as :func:`label_regions` numbers them; they must mark exactly the masks' anomalous pixels.

    Returns:
        ``(labels [N, H, W] int64, R)``.
    """
    _check_regions(regions, masks)
    ids = regions.cpu().numpy().astype(np.int64)
    anomalous = ids != 0
    sample = np.broadcast_to(np.arange(len(ids))[:, None, None], ids.shape)
    # one id per (sample, region): regions of different samples never merge
    pairs = sample[anomalous] * (int(ids.max(initial=0)) + 1) + ids[anomalous]
    unique, inverse = np.unique(pairs, return_inverse=True)
    labels = np.zeros(ids.shape, dtype=np.int64)
    labels[anomalous] = inverse.ravel() + 1
    return labels, len(unique)


def pro_curve(
    maps: Tensor, masks: Tensor, thresholds: int | None = None, regions: Tensor | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The (FPR, PRO) curve, from (0, 0) to (1, 1), FPR ascending.

    Args:
        maps: ``[N, H, W]`` anomaly maps.
        masks: ``[N, H, W]`` ground truth (non-zero = anomalous).
        thresholds: ``None`` uses every distinct score as a threshold (exact); an integer uses that many
            thresholds at quantiles of the scores (:func:`score_levels`; memory ``O(pixels)`` integers).
        regions: ``[N, H, W]`` ground-truth regions numbered within each sample (0 = normal), marking the masks'
            anomalous pixels; ``None``: the masks' 8-connected components.

    Returns:
        ``(fpr, pro)`` float64 arrays of equal length.
    """
    _check_maps_and_masks(maps, masks)
    labels, n_regions = label_regions(masks) if regions is None else number_regions(regions, masks)
    normal = labels == 0
    if n_regions == 0 or normal.all():
        raise ValueError("PRO needs at least one anomalous region in the masks.")
    if not normal.any():
        raise ValueError("PRO needs anomaly-free pixels to measure false positives.")
    scores = maps.detach().cpu().double().numpy()
    if thresholds is None:
        levels = np.unique(scores)
    else:
        _check_threshold_count(thresholds, allow_none=True)
        levels = score_levels(torch.from_numpy(scores), thresholds).numpy()
    # level of each pixel: the largest threshold it reaches (a pixel is positive at t when score >= t)
    level = np.searchsorted(levels, scores, side="right") - 1
    level = np.clip(level, 0, len(levels) - 1).ravel()
    flat_regions = labels.ravel()
    t = len(levels)
    # positives per threshold = pixels at that level or above: reverse cumulative counts
    fp = np.bincount(level[normal.ravel()], minlength=t)[::-1].cumsum()[::-1] / normal.sum()
    region_size = np.bincount(flat_regions, minlength=n_regions + 1)[1:]
    anomalous = ~normal.ravel()
    # PRO at a threshold, the mean over regions of their share of pixels reaching it, is the sum over those pixels
    # of 1 / (their region's size * R): memory O(pixels), not O(pixels * regions) with one count per region
    weights = 1.0 / (region_size[flat_regions[anomalous] - 1] * float(n_regions))
    pro = np.bincount(level[anomalous], weights=weights, minlength=t)[::-1].cumsum()[::-1]
    # thresholds descending = FPR ascending; the curve starts at (0, 0) and ends at (1, 1)
    fpr = np.concatenate([[0.0], np.minimum(fp[::-1], 1.0), [1.0]])
    pro = np.concatenate([[0.0], np.minimum(pro[::-1], 1.0), [1.0]])
    return fpr, pro


def integrate_until(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under ``y(x)`` (``x`` ascending) from ``x[0]`` to ``x_max``, interpolating at ``x_max``."""
    keep = x <= x_max
    area = float(np.sum(0.5 * (y[keep][1:] + y[keep][:-1]) * np.diff(x[keep])))
    last = int(keep.sum())  # first point beyond x_max
    if last < len(x) and x[last - 1] < x_max:
        x0, x1, y0, y1 = x[last - 1], x[last], y[last - 1], y[last]
        y_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_max) * (x_max - x0)
    return float(area)


def pro_score(
    maps: Tensor,
    masks: Tensor,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
    thresholds: int | None = None,
    regions: Tensor | None = None,
) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD's AU-PRO; 1 = perfect).

    Args:
        maps: ``[N, H, W]`` anomaly maps.
        masks: ``[N, H, W]`` ground truth (non-zero = anomalous).
        fpr_limit: upper end of the integral over the false-positive rate, in (0, 1].
        thresholds: see :func:`pro_curve` (``None`` = exact).
        regions: see :func:`pro_curve` (``None``: the masks' 8-connected components).

    Returns:
        The integral divided by ``fpr_limit``, in [0, 1].

    Example:
        >>> maps = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]])
        >>> pro_score(maps, maps > 0.5)
        1.0
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit={fpr_limit} must be in (0, 1]; MVTec AD uses 0.3.")
    fpr, pro = pro_curve(maps, masks, thresholds, regions)
    return float(integrate_until(fpr, pro, fpr_limit) / fpr_limit)


def pixel_metrics(
    maps: Tensor,
    masks: Tensor,
    thresholds: int = DEFAULT_THRESHOLDS,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
    regions: Tensor | None = None,
) -> dict[str, float]:
    """``{"pixel_auroc": ..., "pro": ...}`` of maps ``[N, H, W]`` against masks ``[N, H, W]``, both binned
    with ``thresholds`` thresholds; ``{}`` when the masks hold no anomalous (or no normal) pixel. ``regions``:
    PRO's ground-truth regions (see :func:`pro_curve`; ``None``: the masks' 8-connected components)."""
    if lacks_float64(maps.device):  # (Apple's MPS) the binning is computed in float64
        maps, masks, regions = maps.cpu(), masks.cpu(), None if regions is None else regions.cpu()
    if not masks.any() or masks.all():
        return {}
    return {
        "pixel_auroc": pixel_auroc(maps, masks, thresholds),
        "pro": pro_score(maps, masks, fpr_limit, thresholds, regions),
    }


class MapCollector(Metric):
    """Collects anomaly maps and ground truth over batches and DDP ranks; ``compute`` gives :class:`PixelResults`
    with one row per sample index (``DistributedSampler`` repeats are dropped).

    Maps are kept (float32, one value per pixel: 10 M pixels take 40 MB) because PRO needs per-region
    counts at every threshold and the report figures show them; so are the ground-truth regions (int32), as given
    or, for a batch without them, the masks' 8-connected components (labelled in ``compute``).
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self) -> None:
        super().__init__(distributed_available_fn=collectives_available)  # not under a single-device Trainer
        for name in ("indices", "maps", "regions", "given"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, indices: Tensor, maps: Tensor, masks: Tensor, regions: Tensor | None = None) -> None:
        """Add a batch: ``indices [B]``, ``maps [B, H, W]``, ``masks [B, H, W]`` and, optionally, ``regions
        [B, H, W]`` (integer ids within each sample, 0 = normal; see :func:`pro_curve`)."""
        _check_maps_and_masks(maps, masks)
        if self.maps and maps.shape[-2:] != self.maps[0].shape[-2:]:
            raise ValueError(
                f"anomaly maps of {tuple(maps.shape[-2:])} pixels after maps of {tuple(self.maps[0].shape[-2:])}: "
                "the pixel metrics need test images of one size. Resize them and their masks to one (the "
                "datamodules' load_size does, e.g. OneClassDataModule(load_size=224); in a dataset of your own, "
                "transforms.Resize)."
            )
        if regions is not None:
            _check_regions(regions, masks)
        self.indices.append(indices.long())
        self.maps.append(maps.float())
        self.regions.append((masks != 0).int() if regions is None else regions.int())
        self.given.append(torch.full((len(maps),), regions is not None, dtype=torch.bool, device=maps.device))

    def compute(self) -> PixelResults:
        if isinstance(self.indices, list) and not self.indices:
            raise RuntimeError("no anomaly maps were collected: the evaluation dataloader is empty.")
        indices, maps, regions, given = unique_by_index(
            dim_zero_cat(self.indices), dim_zero_cat(self.maps), dim_zero_cat(self.regions), dim_zero_cat(self.given)
        )
        missing = (~given.reshape(-1)).nonzero().flatten()
        if len(missing):  # samples that came without regions: their masks' 8-connected components
            labels, _ = label_regions(regions[missing])
            regions[missing] = torch.from_numpy(labels).to(regions)
        return PixelResults(indices, maps, regions != 0, regions)

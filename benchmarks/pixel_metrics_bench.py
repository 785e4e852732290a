"""Binned pixel metrics against exact ones when a few extreme pixels stretch the score range.

Maps: smoothed noise with a weakly raised ellipse (the mask) in 5 of 6 images of 64 x 64; then three normal
pixels are raised by an offset. Exact: scikit-learn's ``roc_auc_score`` and PRO with every distinct score as
a threshold. Binned: the library's 1,000 quantile thresholds, and torchmetrics' ``BinaryAUROC(thresholds=1000)``
(evenly spaced over [0, 1]) on the min-max normalised maps, the binning the library used before.

    python benchmarks/pixel_metrics_bench.py      # prints a markdown table
"""

from __future__ import annotations

import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.classification import BinaryAUROC

from dn2_lightning.maps.spade import gaussian_blur
from dn2_lightning.pixel_metrics import pixel_auroc, pro_score


def smooth_maps(seed: int, n: int = 6, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Smoothed noise (as SPADE's maps are smooth) with a weakly raised ellipse (the mask) in all but the last
    image."""
    g = torch.Generator().manual_seed(seed)
    maps = gaussian_blur(torch.rand(n, size, size, generator=g), 2.0)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n - 1):
        top, left = torch.randint(10, size - 10, (2,), generator=g).tolist()
        height, width = torch.randint(3, 9, (2,), generator=g).tolist()
        masks[i] = ((rows - top) / height) ** 2 + ((cols - left) / width) ** 2 <= 1
    return maps + 0.02 * masks, masks


def evenly_binned_auroc(maps: torch.Tensor, masks: torch.Tensor, thresholds: int = 1000) -> float:
    flat = maps.flatten()
    metric = BinaryAUROC(thresholds=thresholds)
    metric.update((flat - flat.min()) / (flat.max() - flat.min()), masks.flatten().long())
    return float(metric.compute())


def main() -> None:
    print("| seed | extreme pixels | AUROC exact | quantile-binned | evenly binned | PRO exact | quantile-binned |")
    print("|---|---|---|---|---|---|---|")
    for seed in range(3):
        maps, masks = smooth_maps(seed)
        for offset in (0.0, 20.0, 2000.0):
            stretched = maps.clone()
            stretched.view(-1)[(~masks).flatten().nonzero().flatten()[:3]] += offset
            row = (
                roc_auc_score(masks.flatten().numpy(), stretched.flatten().numpy()),
                pixel_auroc(stretched, masks, thresholds=1000),
                evenly_binned_auroc(stretched, masks),
                pro_score(stretched, masks),
                pro_score(stretched, masks, thresholds=1000),
            )
            label = f"+{offset:g}" if offset else "none"
            print(f"| {seed} | {label} | " + " | ".join(f"{v:.4f}" for v in row) + " |")


if __name__ == "__main__":
    main()

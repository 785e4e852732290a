"""Binned pixel metrics against exact ones when a few extreme pixels stretch the score range.

Maps: noise with raised scores on random rectangles (the masks), 6 images of 40 x 40; then three normal
pixels are raised by an offset. Exact: scikit-learn's ``roc_auc_score`` and PRO with every distinct score as
a threshold. Binned: the library's 1,000 quantile thresholds, and torchmetrics' ``BinaryAUROC(thresholds=1000)``
(evenly spaced over [0, 1]) on the min-max normalised maps, the binning the library used before.

    python benchmarks/pixel_metrics_bench.py      # prints a markdown table
"""

from __future__ import annotations

import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.classification import BinaryAUROC

from dn2_lightning.pixel_metrics import pixel_auroc, pro_score


def noisy_maps(seed: int, n: int = 6, size: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(n, size, size, generator=g)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n - 1):
        for _ in range(2):
            top, left = torch.randint(0, size - 6, (2,), generator=g).tolist()
            h, w = torch.randint(1, 6, (2,), generator=g).tolist()
            masks[i, top : top + h, left : left + w] = True
    maps[masks] += 0.4 * torch.rand(int(masks.sum()), generator=g)
    return maps, masks


def evenly_binned_auroc(maps: torch.Tensor, masks: torch.Tensor, thresholds: int = 1000) -> float:
    flat = maps.flatten()
    metric = BinaryAUROC(thresholds=thresholds)
    metric.update((flat - flat.min()) / (flat.max() - flat.min()), masks.flatten().long())
    return float(metric.compute())


def main() -> None:
    print("| seed | extreme pixels | AUROC exact | quantile-binned | evenly binned | PRO exact | quantile-binned |")
    print("|---|---|---|---|---|---|---|")
    for seed in range(3):
        maps, masks = noisy_maps(seed)
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

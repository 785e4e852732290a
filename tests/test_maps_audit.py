"""Audit of anomaly maps against independent references: planted defects, pixel metrics of masks given by a dataset
of one's own (scikit-learn's ROC area, scipy's 8-connected regions and a from-scratch PRO)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import DictDataset, quiet_trainer
from scipy.ndimage import label
from sklearn.metrics import roc_auc_score
from test_maps import tiny_conv
from torch.utils.data import DataLoader, Dataset

from dn2_lightning import DN2Module


class MaskedTensors(Dataset):
    """Dict samples with a ``gt_mask`` of any shape per image."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> None:
        self.images, self.labels, self.masks = images, labels, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i), "gt_mask": self.masks[i]}


def reference_pro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """MVTec AD's AU-PRO from scratch: every distinct score a threshold (score >= t positive), 8-connected regions
    per image, trapezoids up to ``fpr_limit`` (interpolated there), divided by it."""
    regions = []
    for image, mask in enumerate(masks):
        labels, count = label(mask, structure=np.ones((3, 3)))
        regions += [(image, labels == r) for r in range(1, count + 1)]
    normal = ~masks
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        positive = maps >= t
        fpr.append((positive & normal).sum() / normal.sum())
        pro.append(np.mean([(positive[i] & region).sum() / region.sum() for i, region in regions]))
    fpr, pro = np.array(fpr + [1.0]), np.array(pro + [1.0])
    area = 0.0
    for k in range(1, len(fpr)):
        x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1, x1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0), fpr_limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / fpr_limit


def test_a_mask_with_channels_is_anomalous_where_any_channel_is_non_zero():
    """A dataset of one's own giving RGB masks ``[3, H, W]`` (e.g. torchvision's read_image of a mask PNG): a defect
    drawn in green, (0, 255, 0), was read from the red channel alone, so it counted as normal pixels and the pixel
    AUROC and PRO were silently those of a mask without it. Masks read from files take any non-zero channel."""
    g = torch.Generator().manual_seed(0)
    train = (torch.rand(8, 3, 32, 32, generator=g) * 60 + 100).to(torch.uint8)
    test = (torch.rand(4, 3, 32, 32, generator=g) * 60 + 100).to(torch.uint8)
    masks = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    test[2, :, 4:10, 4:10] = 250
    masks[2, 0, 4:10, 4:10] = 255  # drawn in red
    test[3, :, 20:28, 18:26] = 250
    masks[3, 1, 20:28, 18:26] = 255  # drawn in green
    model = DN2Module(backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "3"], map_images=4, reports=False)
    labels = torch.tensor([0, 0, 1, 1])
    quiet_trainer().fit(model, train_dataloaders=DataLoader(DictDataset(train, torch.zeros(8).long()), batch_size=4))
    results = quiet_trainer().test(model, dataloaders=DataLoader(MaskedTensors(test, labels, masks), batch_size=4))[0]

    truth = masks.numpy().max(1) > 0
    maps = model.maps.test_results.maps.numpy().astype(np.float64)
    assert np.array_equal(model.maps.test_results.masks.numpy(), truth)
    assert results["test/pixel_auroc"] == pytest.approx(roc_auc_score(truth.ravel(), maps.ravel()), abs=2e-3)
    assert results["test/pro"] == pytest.approx(reference_pro(maps, truth), abs=2e-3)


def test_regions_of_several_channels_are_refused():
    from dn2_lightning.maps import gt_regions_of

    assert gt_regions_of({"gt_regions": torch.ones(2, 1, 4, 4, dtype=torch.int32)}).shape == (2, 4, 4)
    with pytest.raises(ValueError, match="one channel of region ids"):
        gt_regions_of({"gt_regions": torch.ones(2, 3, 4, 4, dtype=torch.int32)})

"""Pixel AUROC and PRO against sklearn, torchmetrics and hand-computed / brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import brute_force_pro
from scipy.ndimage import label
from sklearn.metrics import roc_auc_score
from torchmetrics.classification import BinaryAUROC

from dn2_lightning.pixel_metrics import (
    MapCollector,
    binned_confmat,
    integrate_until,
    label_regions,
    pixel_auroc,
    pixel_metrics,
    pro_curve,
    pro_score,
    score_levels,
)


def random_maps_and_masks(seed: int, n: int = 4, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy maps with raised scores on random rectangles (the masks), plus one mask-free image."""
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


# ------------------------------------------------------------------------------------------ pixel AUROC


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_auroc_matches_sklearn_within_binning_error(seed):
    maps, masks = random_maps_and_masks(seed)
    exact = roc_auc_score(masks.flatten().numpy(), maps.flatten().numpy())
    assert pixel_auroc(maps, masks, thresholds=2000) == pytest.approx(exact, abs=2e-3)


def test_pixel_auroc_is_exact_when_each_score_level_has_its_own_bin():
    g = torch.Generator().manual_seed(3)
    maps = torch.randint(0, 7, (3, 10, 10), generator=g).float() * 5.0 - 4.0  # 7 levels, not in [0, 1]
    masks = (maps + 6 * torch.rand(3, 10, 10, generator=g)) > 12
    exact = roc_auc_score(masks.flatten().numpy(), maps.flatten().numpy())
    assert pixel_auroc(maps, masks, thresholds=101) == pytest.approx(exact, abs=1e-6)


def with_extreme_pixels(maps: torch.Tensor, masks: torch.Tensor, offset: float) -> torch.Tensor:
    """Raise three normal pixels by ``offset``: they stretch the score range far beyond the rest."""
    out = maps.clone()
    out.view(-1)[(~masks).flatten().nonzero().flatten()[:3]] += offset
    return out


@pytest.mark.parametrize("offset", [20.0, 2000.0])
def test_binned_metrics_stay_exact_to_binning_error_when_a_few_pixels_stretch_the_range(offset):
    # evenly spaced thresholds over min..max put every other pixel in one bin: AUROC 0.4998 (exact 0.6705)
    # and PRO 0.1497 (exact 0.4005) at +2000
    maps, masks = random_maps_and_masks(0, n=6, size=40)
    maps = with_extreme_pixels(maps, masks, offset)
    exact = roc_auc_score(masks.flatten().numpy(), maps.flatten().numpy())
    assert pixel_auroc(maps, masks) == pytest.approx(exact, abs=5e-4)
    assert pro_score(maps, masks, thresholds=1000) == pytest.approx(pro_score(maps, masks), abs=5e-4)


def test_score_levels_are_quantiles_from_min_to_max_also_when_sampled(monkeypatch):
    g = torch.Generator().manual_seed(6)
    scores = torch.randn(20_000, generator=g).exp()  # skewed, with a long tail
    levels = score_levels(scores, 11)
    np.testing.assert_allclose(levels.numpy(), np.quantile(scores.numpy(), np.linspace(0, 1, 11)), rtol=1e-3)
    monkeypatch.setattr("dn2_lightning.pixel_metrics._QUANTILE_SAMPLE", 2_000)
    sampled = score_levels(scores, 11)
    assert sampled[0] == scores.min() and sampled[-1] == scores.max()
    share_below = (scores[None, :] < sampled[1:-1, None]).double().mean(1)
    np.testing.assert_allclose(share_below.numpy(), np.linspace(0.1, 0.9, 9), atol=0.03)
    assert torch.equal(sampled, score_levels(scores, 11))  # seeded: the same thresholds every run
    maps, masks = random_maps_and_masks(1, n=6, size=40)
    maps = with_extreme_pixels(maps, masks, 2000.0)
    exact = roc_auc_score(masks.flatten().numpy(), maps.flatten().numpy())
    assert pixel_auroc(maps, masks) == pytest.approx(exact, abs=2e-3)


def test_binned_confmat_equals_torchmetrics_own_update():
    g = torch.Generator().manual_seed(4)
    preds = torch.rand(30_000, generator=g)
    preds[:100] = torch.linspace(0, 1, 100)  # scores exactly on thresholds
    target = torch.rand(30_000, generator=g) < preds
    metric = BinaryAUROC(thresholds=100)
    metric.update(preds, target.long())
    assert torch.equal(binned_confmat(preds, target, metric.thresholds), metric.confmat)


def test_pixel_auroc_rejects_single_class_masks_and_bad_shapes():
    maps = torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="both anomalous and normal"):
        pixel_auroc(maps, torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="same shape"):
        pixel_auroc(maps, torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="thresholds"):
        pixel_auroc(maps, torch.rand(2, 4, 4) > 0.5, thresholds=1)


# -------------------------------------------------------------------------------------------------- PRO


def test_pro_of_a_hand_computed_case():
    # regions: A = {(0,0), (0,1)}, B = {(1,3)}; 5 normal pixels.
    maps = torch.tensor([[[0.9, 0.8, 0.1, 0.2], [0.7, 0.3, 0.0, 0.6]]])
    masks = torch.tensor([[[1, 1, 0, 0], [0, 0, 0, 1]]])
    fpr, pro = pro_curve(maps, masks)
    # thresholds 0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1, 0.0
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.2, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    np.testing.assert_allclose(pro, [0, 0.25, 0.5, 0.5, 1, 1, 1, 1, 1, 1])
    # area up to FPR 0.3: 0.5 * 0.2 + 1.0 * 0.1 = 0.2, normalised by 0.3
    assert pro_score(maps, masks) == pytest.approx(2 / 3)
    assert pro_score(maps, masks, fpr_limit=1.0) == pytest.approx(0.5 * 0.2 + 0.8)


def test_regions_are_8_connected_across_images():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region
    masks[0, 3, 3] = True
    masks[1, 0, 3] = True
    labels, count = label_regions(masks)
    assert count == 3 and labels[0, 0, 0] == labels[0, 1, 1] != labels[0, 3, 3] and labels[1, 0, 3] == 3
    # only (0, 0) scores high: the diagonal region is half found, the others not: PRO = (0.5 + 0 + 0) / 3
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0] = 1.0
    fpr, pro = pro_curve(maps, masks)
    assert fpr[1] == 0 and pro[1] == pytest.approx(0.5 / 3)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pro_matches_brute_force_definition(seed):
    maps, masks = random_maps_and_masks(seed)
    maps = (maps * 20).round() / 20  # ties between normal and anomalous pixels
    assert pro_score(maps, masks) == pytest.approx(brute_force_pro(maps, masks), abs=1e-9)
    assert pro_score(maps, masks, fpr_limit=0.05) == pytest.approx(brute_force_pro(maps, masks, 0.05), abs=1e-9)


def test_binned_pro_is_close_to_exact_and_perfect_maps_score_one():
    maps, masks = random_maps_and_masks(5, n=6, size=40)
    assert pro_score(maps, masks, thresholds=4000) == pytest.approx(pro_score(maps, masks), abs=2e-3)
    assert pro_score(masks.float(), masks) == pytest.approx(1.0)
    assert pro_score(-masks.float(), masks) == pytest.approx(0.0)


def test_integrate_until_interpolates_at_the_limit():
    x, y = np.array([0.0, 0.2, 0.4]), np.array([0.0, 1.0, 1.0])
    assert integrate_until(x, y, 0.3) == pytest.approx(0.1 + 0.1)
    assert integrate_until(x, y, 0.2) == pytest.approx(0.1)


def test_pro_needs_regions_and_normal_pixels():
    with pytest.raises(ValueError, match="anomalous region"):
        pro_score(torch.rand(1, 3, 3), torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="anomaly-free"):
        pro_score(torch.rand(1, 3, 3), torch.ones(1, 3, 3))
    with pytest.raises(ValueError, match="fpr_limit"):
        pro_score(torch.rand(1, 3, 3), torch.eye(3)[None], fpr_limit=0)


def whole_image_regions(masks: torch.Tensor) -> list[tuple[int, np.ndarray]]:
    """Each image's anomalous pixels as one region (the reference for regions labelled before a resize)."""
    return [(i, masks[i].numpy()) for i in range(len(masks)) if masks[i].any()]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_given_regions_are_the_pro_regions_and_never_merge_across_images(seed):
    maps, masks = random_maps_and_masks(seed)
    maps = (maps * 20).round() / 20
    expected = brute_force_pro(maps, masks, regions=whole_image_regions(masks))
    assert expected != pytest.approx(brute_force_pro(maps, masks), abs=1e-3)  # the grouping matters here
    # id 1 in every image: one region per image, not one across them
    assert pro_score(maps, masks, regions=masks.int()) == pytest.approx(expected, abs=1e-9)
    assert pro_score(maps, masks, thresholds=10_000, regions=masks.int()) == pytest.approx(expected, abs=2e-3)
    # any ids: the connected components numbered 40, 47, ... give the default's value
    labels, _ = label_regions(masks)
    scattered = torch.from_numpy(np.where(labels > 0, labels * 7 + 33, 0))
    assert pro_score(maps, masks, regions=scattered) == pytest.approx(brute_force_pro(maps, masks), abs=1e-9)


def test_regions_that_are_not_the_masks_are_refused():
    maps, masks = random_maps_and_masks(0)
    with pytest.raises(ValueError, match="disagree on which pixels are anomalous"):
        pro_score(maps, masks, regions=torch.roll(masks.int(), 1, dims=-1))
    with pytest.raises(ValueError, match="negative ids"):
        pro_score(maps, masks, regions=-masks.int())
    with pytest.raises(ValueError, match=r"must be integer region ids of the masks' shape \(4, 24, 24\)"):
        pro_score(maps, masks, regions=masks.float())
    with pytest.raises(ValueError, match="must be integer region ids"):
        MapCollector().update(torch.arange(4), maps, masks, masks[:, :2].int())


# ------------------------------------------------------------------------------------------- collector


def test_map_collector_keeps_one_row_per_index_in_index_order():
    maps, masks = random_maps_and_masks(6)
    collector = MapCollector()
    collector.update(torch.tensor([2, 3]), maps[2:], masks[2:])
    collector.update(torch.tensor([0, 1, 2]), maps[:3], masks[:3])  # index 2 again (DistributedSampler padding)
    result = collector.compute()
    assert result.indices.tolist() == [0, 1, 2, 3]
    assert torch.equal(result.maps, maps) and torch.equal(result.masks, masks)
    metrics = pixel_metrics(result.maps, result.masks)
    assert metrics["pixel_auroc"] == pytest.approx(pixel_auroc(maps, masks))
    assert pixel_metrics(maps, torch.zeros_like(masks)) == {}


def test_map_collector_keeps_given_regions_and_labels_the_masks_of_batches_without():
    maps, masks = random_maps_and_masks(1)
    maps = (maps * 20).round() / 20
    collector = MapCollector()
    collector.update(torch.tensor([2, 3]), maps[2:], masks[2:])  # no regions: the masks' connected components
    collector.update(torch.tensor([0, 1]), maps[:2], masks[:2], masks[:2].int())  # each image's pixels one region
    result = collector.compute()
    assert torch.equal(result.masks, masks) and result.regions.dtype == torch.int32
    components = []
    for i in (2, 3):
        labels, count = label(masks[i].numpy(), structure=np.ones((3, 3)))
        components += [(i, labels == r) for r in range(1, count + 1)]
    expected = brute_force_pro(maps, masks, regions=whole_image_regions(masks[:2]) + components)
    assert expected != pytest.approx(brute_force_pro(maps, masks), abs=1e-3)
    assert pro_score(result.maps, result.masks, regions=result.regions) == pytest.approx(expected, abs=1e-9)
    binned = pixel_metrics(result.maps, result.masks, thresholds=10_000, regions=result.regions)["pro"]
    assert binned == pytest.approx(expected, abs=2e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_most_pixels_tied_at_one_value_cannot_squeeze_the_rest_into_a_few_bins(seed):
    """Maps clipped at 0 over most of the image (a reviewer's case: 200k normal pixels at exactly 0, the
    anomalous ones above): the tied mass is one threshold, the other 999 stay spread over the rest."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.zeros(8, 160, 160)
    masks = torch.zeros(8, 160, 160, dtype=torch.bool)
    masks[:4, 20:30, 40:52] = True
    maps[masks] = 1.0 + torch.rand(int(masks.sum()), generator=g)
    assert pixel_auroc(maps, masks) == pytest.approx(1.0, abs=1e-9)  # was 0.835 with 5 of 1,000 levels left
    assert pro_score(maps, masks, thresholds=1000) == pytest.approx(1.0, abs=1e-9)  # was 0.7195
    # some normal pixels above the tied mass too, among the anomalous ones: binned = exact to 1e-3
    noisy = maps.clone()
    spots = torch.rand(maps.shape, generator=g) < 0.01
    noisy[spots & ~masks] = 1.0 + 1.2 * torch.rand(int((spots & ~masks).sum()), generator=g)
    exact = roc_auc_score(masks.flatten().numpy(), noisy.flatten().numpy())
    assert 0.9 < exact < 0.999
    assert pixel_auroc(noisy, masks) == pytest.approx(exact, abs=1e-3)
    assert pro_score(noisy, masks, thresholds=1000) == pytest.approx(pro_score(noisy, masks), abs=2e-3)
    levels = score_levels(noisy, 1000)
    assert len(levels) > 900 and levels[0] == 0.0


def test_few_distinct_scores_are_every_threshold_and_exact():
    g = torch.Generator().manual_seed(3)
    maps = torch.randint(0, 40, (5, 30, 30), generator=g).float()  # 40 distinct values, many ties
    masks = torch.rand(5, 30, 30, generator=g) < maps / 80
    assert torch.equal(score_levels(maps, 1000), maps.unique())
    exact = roc_auc_score(masks.flatten().numpy(), maps.flatten().numpy())
    assert pixel_auroc(maps, masks) == pytest.approx(exact, abs=1e-6)  # torchmetrics sums in float32


def test_score_levels_names_a_bad_threshold_count_or_empty_scores():
    with pytest.raises(ValueError, match=r"thresholds=1 must be an integer >= 2"):
        score_levels(torch.rand(10), 1)
    with pytest.raises(ValueError, match=r"thresholds=2.5 must be an integer >= 2"):
        score_levels(torch.rand(10), 2.5)
    with pytest.raises(ValueError, match="non-empty tensor of finite values"):
        score_levels(torch.tensor([0.0, float("nan")]), 10)


def test_binned_pro_curve_counts_the_pixels_at_or_above_each_threshold():
    # a score between two thresholds was counted as reaching the upper one: the binned curve's points were not
    # the (FPR, PRO) of any threshold
    from scipy.ndimage import label

    from dn2_lightning.pixel_metrics import pro_curve, score_levels

    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 16, 16, generator=g)
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[0, 2:6, 3:8] = masks[1, 9:14, 1:4] = masks[1, 0:2, 12:16] = masks[2, 5:11, 5:11] = True
    maps[masks] += 0.3
    fpr, pro = pro_curve(maps, masks, thresholds=9)
    levels = score_levels(maps.double(), 9).numpy()
    s, m = maps.double().numpy(), masks.numpy()
    regions = [label(m[i], structure=np.ones((3, 3)))[0] for i in range(3)]
    region_pixels = [s[i][regions[i] == r] for i in range(3) for r in range(1, regions[i].max() + 1)]
    ref_fpr = np.array([(s[~m] >= t).mean() for t in levels])
    ref_pro = np.array([np.mean([(px >= t).mean() for px in region_pixels]) for t in levels])
    np.testing.assert_allclose(fpr[1:-1], ref_fpr[::-1], atol=1e-12)
    np.testing.assert_allclose(pro[1:-1], ref_pro[::-1], atol=1e-12)

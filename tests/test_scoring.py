"""Scores, leave-one-out kNN, cleaning and group pooling on constructed data with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dn2_lightning.detector import DN2Detector
from dn2_lightning.knn import KNNResult, brute_force_knn
from dn2_lightning.scoring import (
    cleaning_mask,
    drop_own_group,
    keep_lowest,
    knn_scores,
    leave_one_out_knn,
    normalized_scores,
    pool_groups,
    quantile_threshold,
    to_unit_interval,
)


def contaminated_bank(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A tight normal cluster (80), 6 isolated far points, and a small cluster of 6 close contaminants."""
    g = torch.Generator().manual_seed(seed)
    normal = 0.1 * torch.randn(80, 4, generator=g)
    isolated = 10 * torch.eye(4).repeat(2, 1)[:6] * torch.tensor([1.0, 1, 1, 1, -1, -1])[:, None]
    cluster = torch.tensor([6.0, 6.0, 0.0, 0.0]) + 0.01 * torch.randn(6, 4, generator=g)
    bank = torch.cat([normal, isolated, cluster])
    return bank, torch.arange(80, 86), torch.arange(86, 92)


def test_leave_one_out_excludes_self_by_index_even_with_duplicates():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(30, 5, generator=g)
    bank = torch.cat([base, base[:10]])  # rows 0..9 have an exact twin
    loo = leave_one_out_knn(bank, k=2)
    n = len(bank)
    assert not (loo.indices == torch.arange(n)[:, None]).any()
    ref = brute_force_knn(bank, bank, n).values.double()
    # reference: drop exactly one zero (the self distance) per row
    expected = torch.stack([torch.cat([row[:0], row[1:]])[:2] for row in ref])
    torch.testing.assert_close(loo.values.double(), expected, rtol=1e-5, atol=1e-6)
    assert (loo.values[:10, 0] == 0).all() and (loo.values[30:, 0] == 0).all()
    assert (loo.values[10:30, 0] > 0).all()


def test_cleaning_with_small_k_misses_the_contaminant_cluster_and_large_k_finds_it():
    bank, isolated, cluster = contaminated_bank()
    keep_k2 = cleaning_mask(bank, fraction=12 / 92, k=2)
    assert not keep_k2[isolated].any()  # far points go at any k
    assert keep_k2[cluster].all()  # k=2 < cluster size: contaminants hide behind each other
    keep_k8 = cleaning_mask(bank, fraction=12 / 92, k=8)
    assert not keep_k8[isolated].any() and not keep_k8[cluster].any()
    assert keep_k8[:80].all()
    assert keep_k8.sum() == 80


def test_cleaning_fraction_zero_keeps_everything_and_rounding_is_exact():
    bank, _, _ = contaminated_bank()
    assert cleaning_mask(bank, 0.0, 2).all()
    assert cleaning_mask(bank, 0.5, 2).sum() == 46


@pytest.mark.parametrize("rows", [5, 7, 9, 10])
def test_cleaning_removes_the_fraction_rounded_half_up_whatever_the_parity(rows):
    # Python's round() rounds half to even: 0.5 of 5 rows removed 2 (kept 3) but of 7 rows removed 4 (kept 3)
    bank = torch.arange(rows, dtype=torch.float32)[:, None] ** 2  # leave-one-out scores grow with the row
    for fraction, removed in [(0.5, (rows + 1) // 2), (0.25, (rows + 2) // 4), (0.05, rows // 10)]:
        keep = cleaning_mask(bank, fraction, 1)
        assert int((~keep).sum()) == removed, fraction
        assert keep[: rows - removed].all()  # the rows nearest the others stay
        detector = DN2Detector(k=1, clean_fraction=fraction).fit(bank.numpy())
        assert int(detector.kept_.sum()) == rows - removed


def test_the_removed_count_is_exact_where_floats_are_not():
    # 0.35 x 90 = 31.499999999999996 and 0.29 x 50 = 14.499999999999998 in floats: half up is 32 and 15
    for fraction, rows, removed in [(0.35, 90, 32), (0.29, 50, 15), (0.45, 70, 32), (0.1, 3, 0)]:
        bank = torch.arange(rows, dtype=torch.float32)[:, None] ** 2
        assert int((~cleaning_mask(bank, fraction, 1)).sum()) == removed, (fraction, rows)


def numpy_cleaning_mask(bank: torch.Tensor, fraction: float, k: int) -> np.ndarray:
    """Reference: mean squared distance to the k nearest other rows (float64), the largest fraction * n rounded
    half up removed, ties by row order."""
    x = bank.double().numpy()
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    scores = np.sort(d, 1)[:, :k].mean(1)
    removed = int(np.floor(fraction * len(x) + 0.5))
    keep = np.zeros(len(x), dtype=bool)
    keep[np.argsort(scores, kind="stable")[: len(x) - removed]] = True
    return keep


def test_cleaning_with_k_beyond_the_bank_averages_over_every_other_row():
    """clean_k larger than the bank means every other row (n - 1 of them). Guards the cap: at n - 2 the score
    drops each row's farthest neighbour and another pair of rows is removed."""
    bank = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    expected = numpy_cleaning_mask(bank, 0.25, 7)
    assert not np.array_equal(expected, numpy_cleaning_mask(bank, 0.25, 6))  # the data tells n - 1 from n - 2
    np.testing.assert_array_equal(cleaning_mask(bank, 0.25, k=200).numpy(), expected)


def test_knn_scores_are_the_mean_of_k_squared_distances():
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(50, 3, generator=g), torch.randn(7, 3, generator=g)
    ref = brute_force_knn(queries, bank, 3)
    torch.testing.assert_close(
        knn_scores(ref), ((queries[:, None].double() - bank.double()) ** 2).sum(-1).sort(1).values[:, :3].mean(1)
    )


def test_threshold_is_the_linearly_interpolated_quantile_of_the_leave_one_out_scores():
    """50 rows: (50 - 1) * 0.9 = 44.1 falls between two scores, where interpolation methods disagree (at 101 rows
    and 0.9 they all agree). Guards numpy's default, linear interpolation."""
    train = np.random.default_rng(0).normal(size=(50, 4))
    d = ((train[:, None] - train[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    loo = np.sort(d, 1)[:, :2].mean(1)
    expected = np.quantile(loo, 0.9)
    assert np.quantile(loo, 0.9, method="lower") < expected * (1 - 1e-4)  # the methods differ here
    assert quantile_threshold(torch.from_numpy(loo), 0.9) == pytest.approx(expected, rel=1e-12)
    assert DN2Detector(k=2, threshold_quantile=0.9).fit(train).threshold_ == pytest.approx(expected, rel=1e-9)


def test_normalized_scores_count_only_the_leave_one_out_scores_strictly_below():
    """A score equal to a leave-one-out score does not count it. Guards the strict comparison (searchsorted's
    left side): counting ties gave [0.5, 0.75]."""
    loo, scores = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 3.0])
    expected = (loo.numpy()[None] < scores.numpy()[:, None]).mean(1)
    assert expected.tolist() == [0.25, 0.5]
    assert normalized_scores(loo, scores).tolist() == expected.tolist()
    assert normalized_scores(loo.double(), scores.double()).tolist() == expected.tolist()


def test_pool_groups_is_orderless_and_respects_the_mask():
    g = torch.Generator().manual_seed(2)
    members = torch.randn(4, 5, 3, generator=g)
    perm = torch.randperm(5, generator=g)
    torch.testing.assert_close(pool_groups(members), pool_groups(members[:, perm]))
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 4).bool()
    torch.testing.assert_close(pool_groups(members, mask), members[:, :3].mean(1))


@pytest.mark.parametrize("scores", [torch.tensor([3.0, 1e9, -2.0, 3.0, 17.0]), torch.randn(1000) * 1e4])
def test_unit_interval_preserves_order_and_ties(scores):
    mapped = to_unit_interval(scores)
    assert mapped.min() >= 0 and mapped.max() <= 1
    assert torch.equal(torch.argsort(mapped, stable=True), torch.argsort(scores, stable=True))
    assert torch.equal(mapped[:, None] == mapped[None], scores[:, None] == scores[None])


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 300),
    levels=st.integers(1, 40),
    share=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**16),
)
def test_rank_auroc_equals_scikit_learn_and_torchmetrics_with_ties(n, levels, share, seed):
    """dn2-protocol's AUROC (no torchmetrics import) against two independent implementations, on scores with
    many ties (few distinct levels)."""
    from sklearn.metrics import roc_auc_score
    from torchmetrics.functional.classification import binary_auroc

    from dn2_lightning.scoring import rank_auroc

    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < share).long()
    labels[0], labels[1] = 0, 1  # both classes present
    scores = torch.randint(0, levels, (n,), generator=g).double() / levels
    expected = roc_auc_score(labels.numpy(), scores.numpy())
    assert rank_auroc(scores, labels) == pytest.approx(expected, abs=1e-12)
    assert rank_auroc(scores, labels) == pytest.approx(float(binary_auroc(scores, labels)), abs=1e-6)


def test_rank_auroc_needs_both_classes_and_one_binary_label_per_score():
    from dn2_lightning.scoring import rank_auroc

    with pytest.raises(ValueError, match="normal and anomalous"):
        rank_auroc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="one 0/1 label per score; got 3 scores and 2 labels"):
        rank_auroc(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"values \[0, 2\]"):
        rank_auroc(torch.tensor([0.1, 0.2]), torch.tensor([0, 2]))


def test_keep_lowest_breaks_ties_by_row_order():
    # 1 of 4 rows removed (0.25 x 4); rows 1 and 2 tie at the largest score: the later one goes
    assert keep_lowest(torch.tensor([1.0, 2.0, 2.0, 0.0]), 0.25).tolist() == [True, True, False, True]


@pytest.mark.parametrize(
    "sources, expected",
    [
        ([-1, -1, 7, 8], [1, 2]),  # unknown sources are not one image: row 1 stays a neighbour of row 0
        ([7, 7, 8, 9], [2, 3]),  # row 1 holds row 0's image: left out
        (None, [1, 2]),
    ],
)
def test_drop_own_group_leaves_out_copies_of_known_images_only(sources, expected):
    knn = KNNResult(torch.tensor([[0.0, 1.0, 4.0, 9.0]]), torch.tensor([[0, 1, 2, 3]]))
    table = None if sources is None else torch.tensor(sources)
    kept = drop_own_group(knn, own_ids=torch.tensor([0]), members=1, k=2, sources=table)
    assert kept.indices.tolist() == [expected]
    assert kept.values.tolist() == [[float(i) ** 2 for i in expected]]

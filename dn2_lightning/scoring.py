"""Pure functions from embeddings and kNN distances to DN2 scores, bank cleaning and group pooling."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from fractions import Fraction

import torch
from torch import Tensor

from dn2_lightning.knn import KNNResult, knn_distances, lacks_float64


def knn_scores(knn: KNNResult) -> Tensor:
    """DN2 score (paper eq. 2): mean squared distance to the k nearest bank embeddings.

    >>> knn_scores(KNNResult(torch.tensor([[1.0, 3.0]]), torch.tensor([[0, 1]])))
    tensor([2.])
    """
    return knn.values.mean(dim=1)


def worst_member(knn: KNNResult, members: int, mask: Tensor | None = None) -> tuple[Tensor, KNNResult]:
    """Point-wise group scores (``group_pooling="none"``): each group's worst member, from the kNN results of its
    members (rows ``group * members + member``; ``mask [B, M]`` marks real members). Returns the groups' scores
    ``[B]`` and the kNN result of the member behind each.

    >>> knn = KNNResult(torch.tensor([[1.0], [5.0], [9.0], [2.0]]), torch.tensor([[7], [8], [9], [6]]))
    >>> scores, behind = worst_member(knn, members=2, mask=torch.tensor([[1, 1], [0, 1]]))
    >>> scores, behind.indices.flatten()
    (tensor([5., 2.]), tensor([8, 6]))
    """
    member_scores = knn_scores(knn).view(-1, members)
    if mask is not None:
        member_scores = member_scores.masked_fill(~mask.bool(), float("-inf"))
    worst = member_scores.argmax(1)
    rows = torch.arange(len(worst), device=worst.device) * members + worst
    return member_scores.max(1).values, KNNResult(knn.values[rows], knn.indices[rows])


def rank_auroc(scores: Tensor, labels: Tensor) -> float:
    """AUROC of ``scores`` for ``labels`` (1 = anomalous, 0 = normal): the Mann-Whitney U statistic, tied scores
    sharing their average rank. Equal to torchmetrics' ``binary_auroc`` and scikit-learn's ``roc_auc_score``;
    used by ``dn2-protocol``, which thereby imports neither (seconds of start-up on some machines).

    >>> rank_auroc(torch.tensor([0.1, 0.4, 0.4, 0.9]), torch.tensor([0, 0, 1, 1]))
    0.875
    """
    scores, labels = scores.detach().cpu().double().flatten(), torch.as_tensor(labels).cpu().flatten()
    if len(scores) != len(labels) or not ((labels == 0) | (labels == 1)).all():
        raise ValueError(
            f"rank_auroc needs one 0/1 label per score; got {len(scores)} scores and {len(labels)} labels with "
            f"values {labels.unique()[:5].tolist()}."
        )
    labels = labels.bool()
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        raise ValueError(f"AUROC needs normal and anomalous samples; got {positives} anomalous of {len(labels)}.")
    ordered, order = scores.sort()
    _, group, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    average_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # 1-based, ties share their mean
    ranks = torch.empty_like(scores)
    ranks[order] = average_rank[group]
    u = float(ranks[labels].sum()) - positives * (positives + 1) / 2
    return u / (positives * negatives)


def leave_one_out_knn(bank: Tensor, k: int, backend: str = "auto", **knn_kwargs: object) -> KNNResult:
    """Each bank row's k nearest *other* rows: the row itself is excluded by index, not by distance,
    so exact duplicates of a row still count as its neighbours.

    >>> leave_one_out_knn(torch.tensor([[0.0], [0.0], [3.0]]), k=1).values.squeeze(1)
    tensor([0., 0., 9.])
    """
    n = bank.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"leave-one-out k={k} must satisfy 1 <= k <= bank size - 1 ({n - 1}).")
    knn = knn_distances(bank, bank, k + 1, backend, **knn_kwargs)
    return drop_self(knn, torch.arange(n, device=bank.device))


#: the neighbour lists of one chunk of :func:`leave_one_out_scores` (about 34 bytes a neighbour, copies included)
LEAVE_ONE_OUT_CHUNK_BYTES = 64 * 2**20


def leave_one_out_scores(
    rows: Tensor, ids: Tensor, k: int, search: Callable[[Tensor, int], KNNResult], chunked: bool = True
) -> Tensor:
    """DN2 scores ``[N]`` of bank rows over the *other* bank rows: each row's ``k + 1`` nearest (by ``search``, whose
    neighbour ids are those of ``ids``) without itself, as :func:`leave_one_out_knn`.

    By chunks of rows whose neighbour lists take about 64 MiB: the whole ``[N, k + 1]`` result at once would be
    7 GB for 200k rows at ``k = 1000``. ``chunked=False`` searches all rows in one call (a collective search, which
    every rank must call equally often).

    >>> bank = torch.tensor([[0.0], [0.0], [3.0]])
    >>> leave_one_out_scores(bank, torch.arange(3), 1, lambda q, k: knn_distances(q, bank, k))
    tensor([0., 0., 9.])
    """
    step = max(1, LEAVE_ONE_OUT_CHUNK_BYTES // (34 * (k + 1))) if chunked else max(1, len(rows))
    chunks = zip(rows.split(step), ids.split(step), strict=True)
    scores = [knn_scores(drop_self(search(part, k + 1), own)) for part, own in chunks]
    return torch.cat(scores) if scores else rows.new_empty(0)


def drop_self(knn: KNNResult, own_ids: Tensor) -> KNNResult:
    """Remove each query's own id from its k + 1 neighbours (else the farthest, a tie at distance 0)."""
    n, k = knn.indices.shape[0], knn.indices.shape[1] - 1
    is_self = knn.indices == own_ids[:, None]
    drop = torch.where(is_self.any(1), is_self.int().argmax(1), torch.full_like(knn.indices[:, 0], k))
    keep = torch.ones_like(knn.indices, dtype=torch.bool).scatter_(1, drop[:, None], False)
    return KNNResult(knn.values[keep].view(n, k), knn.indices[keep].view(n, k))


def drop_own_group(knn: KNNResult, own_ids: Tensor, members: int, k: int, sources: Tensor | None = None) -> KNNResult:
    """Each row's ``k`` nearest neighbours outside its own group (ids ``group * members + member``), from its
    ``k + members`` nearest: the leave-one-out of a whole group. With ``sources`` (row id -> source image, -1
    unknown; searched ``k + members + copies`` deep) rows holding the same image as the query are left out too.
    Left-out rows fill in only when the bank has too few others."""
    outside = knn.indices // members != (own_ids // members)[:, None]
    if sources is not None:
        own = _lookup(sources, own_ids)[:, None]
        outside &= (_lookup(sources, knn.indices) != own) | (own < 0)
    short = outside.sum(1) < k
    if bool(short.any()):  # read once per leave-one-out pass, not per batch
        kind = "their own group and their image's copies" if sources is not None else "their own group"
        warnings.warn(
            f"{int(short.sum())} of {len(short)} bank rows have fewer than k={k} rows outside {kind}: their "
            "leave-one-out scores (the threshold's, and cleaning's) count rows left out, which lie nearer, so the "
            "threshold comes out low. Train on more groups (or more distinct images), or lower k.",
            stacklevel=2,
        )
    order = torch.argsort((~outside).to(torch.uint8), dim=1, stable=True)[:, :k]  # outside rows first, in order
    return KNNResult(knn.values.gather(1, order), knn.indices.gather(1, order))


def _lookup(table: Tensor, rows: Tensor) -> Tensor:
    """``table[rows]``, -1 for rows beyond the table."""
    return torch.where(rows < len(table), table[rows.clamp(max=len(table) - 1)], -1)


def removed_count(fraction: float, rows: int) -> int:
    """How many of ``rows`` a cleaning ``fraction`` removes: ``fraction * rows`` rounded half up (Python's
    ``round`` rounds half to even: 0.5 of 5 rows would remove 2 but of 7 rows 4).

    >>> [removed_count(0.5, n) for n in (5, 7, 9)], removed_count(0.05, 10), removed_count(0.35, 90)
    ([3, 4, 5], 1, 32)
    """
    return math.floor(
        Fraction(repr(float(fraction))) * rows + Fraction(1, 2)
    )  # exact: 0.35 * 90 is 31.5, not 31.4999...


def keep_lowest(scores: Tensor, fraction: float) -> Tensor:
    """Mask keeping all but the ``fraction`` (:func:`removed_count`) of rows with the largest scores; ties broken
    by row order."""
    n = scores.shape[0]
    n_removed = removed_count(fraction, n)
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
    keep[torch.argsort(scores, stable=True)[: n - n_removed]] = True
    return keep


def cleaning_mask(bank: Tensor, fraction: float, k: int, backend: str = "auto", **knn_kwargs: object) -> Tensor:
    """Paper §3.2: keep the ``1 - fraction`` of rows with the smallest leave-one-out kNN score.

    Returns a bool mask over bank rows (``True`` = kept). Ties are broken by row order.
    """
    if removed_count(fraction, bank.shape[0]) == 0:
        return torch.ones(bank.shape[0], dtype=torch.bool, device=bank.device)
    k = min(k, bank.shape[0] - 1)
    return keep_lowest(knn_scores(leave_one_out_knn(bank, k, backend, **knn_kwargs)), fraction)


def quantile_threshold(loo_scores: Tensor, quantile: float) -> float:
    """The decision threshold: the ``quantile`` of the training images' leave-one-out scores (NaN without any),
    linearly interpolated (``np.quantile``'s default ``method="linear"``).

    >>> quantile_threshold(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), 0.5)
    3.0
    """
    if loo_scores.numel() == 0:
        return float("nan")
    return float(torch.quantile(loo_scores.detach().cpu().double(), quantile))  # (no float64 on MPS)


def exceeds(scores: Tensor, threshold: float | Tensor) -> Tensor:
    """``scores > threshold``, compared exactly: float32 scores against the float64 threshold itself, not its rounding
    to float32 (which a float32 comparison takes, flagging a score at that rounding otherwise than the numbers
    reported say). On the scores' device; compared on the CPU where it has no float64.

    >>> exceeds(torch.tensor([1.0]), 1.0 - 2.0**-26), torch.tensor([1.0]) > 1.0 - 2.0**-26
    (tensor([True]), tensor([False]))
    """
    threshold = float(threshold)
    if lacks_float64(scores.device):
        return (scores.detach().cpu().double() > threshold).to(scores.device)
    return scores.detach().double() > threshold


def expected_flagged_share(n: int, quantile: float) -> float:
    """The expected share of new samples above the ``quantile`` of ``n`` scores (linearly interpolated, as
    :func:`quantile_threshold`), for new samples exchangeable with the scored ones: ``(n (1 - q) + q) / (n + 1)``,
    about ``1 - q`` only for ``n`` large against ``1 / (1 - q)``.

    >>> round(expected_flagged_share(40, 0.99), 4), round(expected_flagged_share(20_000, 0.99), 4)
    (0.0339, 0.01)
    """
    return (n * (1.0 - quantile) + quantile) / (n + 1)


def coarse_quantile_note(n: int, quantile: float) -> str | None:
    """What is wrong with a ``quantile`` threshold of ``n`` scores, or ``None``: too few scores for it to flag about
    ``1 - q`` of normal samples (:func:`expected_flagged_share` off by more than ``min(q, 1 - q)``: twice ``1 - q``
    for large q), with the number of scores ``q`` needs.

    >>> coarse_quantile_note(106, 0.99) is None, coarse_quantile_note(100, 0.5) is None  # 1.92%: under twice 1%
    (True, True)
    """
    target = 1.0 - quantile
    if n == 0 or quantile == 1.0:  # (1.0: the largest score, asked for)
        return None
    if n == 1:
        return f"threshold_quantile={quantile:g} is set from a single score: the threshold is that score."
    share, margin = expected_flagged_share(n, quantile), min(target, quantile)
    if abs(share - target) <= margin * (1 + 1e-9):  # (with room for rounding: 0.9 of 15 scores is just within)
        return None
    needed = math.ceil(abs(2 * quantile - 1) / margin - 1 - 1e-9)  # the fewest with |share - target| <= margin
    points = f"{100 * margin:.3g} percentage point" + ("" if f"{100 * margin:.3g}" == "1" else "s")
    return (
        f"threshold_quantile={quantile:g} is set from {n} scores, too few for it to flag about {100 * target:.3g}% of "
        f"normal samples: of {n} exchangeable scores, the expected share above their {quantile:g} quantile is "
        f"(n (1 - q) + q) / (n + 1) = {100 * share:.3g}%, and {quantile:g} needs about {needed:,} scores to come "
        f"within {points} of {100 * target:.3g}%."
    )


def normalized_scores(sorted_loo_scores: Tensor, scores: Tensor) -> Tensor:
    """Share of the bank's (sorted) leave-one-out scores strictly below each score, in [0, 1] (NaN without any).

    >>> normalized_scores(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, 2.5, 9.0]))
    tensor([0.0000, 0.5000, 1.0000])
    """
    if sorted_loo_scores.numel() == 0:
        return torch.full(scores.shape, float("nan"), device=scores.device)
    # compared in float64 when either side is (a float64 detector's scores differ below float32's resolution)
    dtype = torch.float64 if torch.float64 in (sorted_loo_scores.dtype, scores.dtype) else torch.float32
    device = scores.device
    if dtype == torch.float64 and (lacks_float64(device) or lacks_float64(sorted_loo_scores.device)):
        device = torch.device("cpu")  # (Apple's MPS) compared on the CPU, returned on the scores' device
    # (moved, then cast: MPS casts before it copies)
    below = torch.searchsorted(sorted_loo_scores.to(device).to(dtype), scores.to(device).to(dtype).contiguous())
    return (below.float() / sorted_loo_scores.numel()).to(scores.device)


def pool_groups(embeddings: Tensor, mask: Tensor | None = None) -> Tensor:
    """Orderless mean pooling of member embeddings ``[B, M, D]`` (paper §3.3); ``mask [B, M]`` marks
    real members when groups are padded to a common size.

    >>> pool_groups(torch.tensor([[[1.0], [3.0], [100.0]]]), torch.tensor([[True, True, False]]))
    tensor([[2.]])
    """
    if mask is None:
        return embeddings.mean(dim=1)
    weights = mask.to(embeddings.dtype).unsqueeze(-1)
    return (embeddings * weights).sum(1) / weights.sum(1).clamp_min(1)


def to_unit_interval(scores: Tensor) -> Tensor:
    """Order- and tie-preserving map of scores to [0, 1] (dense ranks), for metrics that read inputs
    outside [0, 1] as logits: AUROC is unchanged.

    >>> to_unit_interval(torch.tensor([5.0, 100.0, 5.0, 7.0]))
    tensor([0.0000, 1.0000, 0.0000, 0.5000], dtype=torch.float64)
    """
    if lacks_float64(scores.device):
        scores = scores.cpu()  # float64 ranks: returned on the CPU
    _, ranks = torch.unique(scores, sorted=True, return_inverse=True)
    return ranks.to(torch.float64) / max(1, int(ranks.max()) if ranks.numel() else 1)

"""Orderless pooling of a group's member embeddings ``[B, M, D]`` into one vector per group.

``"mean"`` is the paper's pooling (§3.3). It barely sees composition: a group with one class twice and
another missing moves the mean by only 1/M of the gap between two class means. ``"histogram"`` describes
a group by *which kinds* of members it holds: k-means centroids are fitted on the training members, each
member is softly assigned to them, and the group is the mean of its members' assignments (a soft
histogram over K clusters, summing to 1). A concatenation of both was measured and dropped: it never beat
the better of the two (``benchmarks/results/group.md``).

Functional core (:func:`fit_kmeans`, :func:`soft_assignments`, :func:`composition_histogram`,
:func:`pack_members`, :func:`unpack_members`) and one stateful module, :class:`GroupPooling`, holding the
fitted centroids as checkpointed buffers.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dn2_lightning.scoring import pool_groups
from dn2_lightning.validation import check_int, check_positive_float

GroupPoolingName = Literal["mean", "histogram", "none"]
GROUP_POOLINGS: tuple[str, ...] = get_args(GroupPoolingName)
DEFAULT_KMEANS_ITERATIONS = 100


def fit_kmeans(
    points: Tensor, clusters: int, iterations: int = DEFAULT_KMEANS_ITERATIONS, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Seeded k-means: k-means++ initialisation, then at most ``iterations`` Lloyd steps, stopping early
    when no assignment changes.

    The centroids depend on the points as a multiset, not on their order: k-means runs on the distinct
    points in sorted order, each weighted by how often it occurs (which is k-means on all of them). The
    same points, seed and device give the same centroids. An emptied cluster keeps its centroid.

    Args:
        points: ``[N, D]`` floating tensor, ``N >= clusters``.
        clusters: K, number of centroids.
        iterations: maximum number of Lloyd steps.
        seed: seeds the k-means++ draws (made on the CPU, so they do not depend on the device).

    Returns:
        ``(centroids [K, D] float32, nearest [N])``: the centroids and each point's squared distance to its
        nearest one.

    Raises:
        ValueError: if there are fewer distinct points than ``clusters``.

    >>> centroids, _ = fit_kmeans(torch.tensor([[0.0], [0.1], [10.0], [10.1]]), clusters=2)
    >>> sorted(round(c, 2) for c in centroids.flatten().tolist())
    [0.05, 10.05]
    """
    n = points.shape[0]
    if n < clusters:
        raise ValueError(f"group_clusters={clusters} exceeds the {n} member embeddings to fit them on; lower it.")
    # sorted distinct rows: the canonical order that makes the draws below independent of the input order
    x, inverse, counts = torch.unique(points.detach().float(), dim=0, return_inverse=True, return_counts=True)
    if x.shape[0] < clusters:
        raise ValueError(f"group_clusters={clusters} exceeds the {x.shape[0]} distinct member embeddings; lower it.")
    weights = counts.to(x.dtype)
    generator = torch.Generator().manual_seed(seed)

    def draw(mass: Tensor) -> int:  # a row with probability proportional to mass, by inverse CDF
        cumulative = mass.cpu().double().cumsum(0)  # (torch.multinomial stops at 2**24 categories)
        u = torch.rand(1, generator=generator, dtype=torch.float64) * cumulative[-1]
        return min(int(torch.searchsorted(cumulative, u, right=True)), len(cumulative) - 1)

    first = draw(weights)
    centroids = [x[first]]
    nearest = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, clusters):
        chosen = draw(weights * nearest)  # D^2 sampling, each point counted as often as it occurs
        centroids.append(x[chosen])
        nearest = torch.minimum(nearest, ((x - x[chosen]) ** 2).sum(1))
    c = torch.stack(centroids)
    # Lloyd steps assign by the GEMM expansion on centred data (fast; a near-tie it may flip moves no
    # centroid measurably); the returned distances are exact
    center = (weights[:, None] * x).sum(0) / weights.sum()
    xc = x - center
    assignment = None
    for _ in range(iterations):
        cc = c - center
        new_assignment = ((cc * cc).sum(1) - 2 * xc @ cc.T).argmin(1)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        # weighted one-hot matmul, not index_add_: deterministic on every device
        one_hot = torch.nn.functional.one_hot(assignment, clusters).to(x.dtype) * weights[:, None]
        mass = one_hot.sum(0)
        c = torch.where(mass[:, None] > 0, (one_hot.T @ x) / mass.clamp_min(1)[:, None], c)
    return c, squared_distances(x, c).min(1).values[inverse]


def squared_distances(points: Tensor, centroids: Tensor) -> Tensor:
    """Exact squared Euclidean distances ``[N, K]`` between points ``[N, D]`` and centroids ``[K, D]``,
    from differences (no GEMM expansion, so no cancellation), in float32.

    >>> squared_distances(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0]]))
    tensor([[ 0.],
            [25.]])
    """
    x, c = points.float(), centroids.to(points.device, torch.float32)
    return torch.cdist(x, c, compute_mode="donot_use_mm_for_euclid_dist").square()


def soft_assignments(points: Tensor, centroids: Tensor, temperature: float, scale: Tensor | float) -> Tensor:
    """Soft assignment ``[N, K]`` of points ``[N, D]`` to centroids ``[K, D]``: the softmax over centroids
    of ``-squared distance / (temperature * scale)``. Rows sum to 1; a small temperature tends to a hard
    (one-hot) assignment.

    >>> soft_assignments(torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [1.0]]), 1.0, 1.0)
    tensor([[0.7311, 0.2689],
            [0.2689, 0.7311]])
    """
    return torch.softmax(-squared_distances(points, centroids) / (temperature * scale), dim=1)


def composition_histogram(
    members: Tensor, centroids: Tensor, temperature: float, scale: Tensor | float, mask: Tensor | None = None
) -> Tensor:
    """A group's composition ``[B, K]``: the mean over its real members (``mask [B, M]``) of their soft
    assignments to the centroids. Orderless; rows sum to 1.

    >>> members = torch.tensor([[[0.0], [0.0], [5.0]]])
    >>> composition_histogram(members, torch.tensor([[0.0], [5.0]]), 0.01, 1.0)
    tensor([[0.6667, 0.3333]])
    """
    b, m, d = members.shape
    assignments = soft_assignments(members.reshape(b * m, d), centroids, temperature, scale)
    return pool_groups(assignments.view(b, m, -1), mask)


def pack_members(members: Tensor, mask: Tensor | None = None) -> Tensor:
    """Members ``[B, M, D]`` and ``mask [B, M]`` as one tensor ``[B, M, D + 1]`` (mask in the last column),
    so that a group's members travel as one bank row through collection, gathering and de-duplication.

    >>> pack_members(torch.ones(1, 2, 3), torch.tensor([[True, False]]))[..., -1]
    tensor([[1., 0.]])
    """
    if mask is None:
        mask = torch.ones(members.shape[:2], dtype=torch.bool, device=members.device)
    return torch.cat([members.float(), mask.to(members.device, torch.float32).unsqueeze(-1)], dim=-1)


def pad_members(packed: Tensor, m: int) -> Tensor:
    """Packed groups ``[B, M', D + 1]`` padded to ``m >= M'`` members with absent ones (mask 0), so that batches of
    other group sizes join into one tensor.

    >>> pad_members(pack_members(torch.ones(1, 2, 3)), 3)[..., -1]
    tensor([[1., 1., 0.]])
    """
    return F.pad(packed, (0, 0, 0, m - packed.shape[1])) if packed.shape[1] < m else packed


def unpack_members(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`pack_members`: ``(members [B, M, D], mask [B, M] bool)``."""
    return packed[..., :-1], packed[..., -1] > 0.5


class GroupPooling(nn.Module):
    """Pools member embeddings ``[B, M, D]`` (``mask [B, M]`` marks real members) into group vectors.

    ``"mean"`` needs no fitting and has no state. ``"histogram"`` is fitted on the training groups
    (:meth:`fit`) and keeps its centroids and distance scale as persistent buffers that take any saved
    shape on load, so they travel in the checkpoint.

    Args:
        method: ``"mean"`` or ``"histogram"``.
        clusters: K, centroids of the histogram.
        temperature: softness of the assignments, relative to the median squared distance of a training
            member to its nearest centroid.
        iterations: maximum k-means (Lloyd) steps.
        seed: seed of the k-means++ initialisation.

    >>> pooling = GroupPooling("histogram", clusters=2, temperature=0.01)
    >>> train = torch.tensor([[[0.0], [5.0]], [[0.1], [5.1]]])
    >>> pooling.fit(train)
    >>> pooling(torch.tensor([[[0.0], [0.0]], [[0.0], [5.0]]])).sort(dim=1).values
    tensor([[0.0000, 1.0000],
            [0.5000, 0.5000]])
    """

    centroids: Tensor
    scale: Tensor

    def __init__(
        self,
        method: str = "mean",
        clusters: int = 10,
        temperature: float = 0.3,
        iterations: int = DEFAULT_KMEANS_ITERATIONS,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if method not in GROUP_POOLINGS or method == "none":
            valid = [p for p in GROUP_POOLINGS if p != "none"]
            raise ValueError(f"group_pooling={method!r} is not one of {valid}.")
        check_int("clusters", clusters, 2, hint="about the number of member classes; default 10")
        check_positive_float("temperature", temperature, hint="default 0.3")
        check_int("iterations", iterations, 1)
        self.method, self.clusters, self.temperature = method, clusters, temperature
        self.iterations, self.seed = iterations, seed
        if self.needs_fit:  # "mean" keeps no state, so its checkpoints hold no pooling keys
            self.register_buffer("centroids", torch.empty(0, 0))
            self.register_buffer("scale", torch.tensor(float("nan")))

    @property
    def needs_fit(self) -> bool:
        return self.method == "histogram"

    @property
    def is_fitted(self) -> bool:
        return not self.needs_fit or self.centroids.numel() > 0

    def output_dim(self, member_dim: int) -> int:
        """Size of a pooled group vector for members of size ``member_dim``."""
        return self.clusters if self.method == "histogram" else member_dim

    def forward(self, members: Tensor, mask: Tensor | None = None) -> Tensor:
        """Group vectors ``[B, D']`` of members ``[B, M, D]`` (see :meth:`output_dim`).

        Raises:
            RuntimeError: if a fitted pooling is used before :meth:`fit` (or loading a fitted checkpoint).
            ValueError: if the members' size differs from the centroids'.
        """
        if self.method == "mean":
            return pool_groups(members, mask)
        if not self.is_fitted:
            raise RuntimeError(
                f"group_pooling={self.method!r} has no centroids yet: fit the module on training groups first "
                "(trainer.fit, or test/predict with a datamodule that has a train_dataloader), or load a fitted "
                "checkpoint."
            )
        if members.shape[-1] != self.centroids.shape[1]:
            raise ValueError(
                f"group members are {members.shape[-1]}-d but the group_pooling centroids are "
                f"{self.centroids.shape[1]}-d: the checkpoint was fitted with another backbone."
            )
        return composition_histogram(members.float(), self.centroids, self.temperature, self.scale, mask)

    def fit(self, members: Tensor, mask: Tensor | None = None) -> None:
        """Fit the centroids on the real members of training groups ``[B, M, D]``; a no-op for ``"mean"``.

        Raises:
            ValueError: if there are fewer distinct real members than ``clusters``.
        """
        if not self.needs_fit:
            return
        members = members.detach().float()
        real = members[mask.bool()] if mask is not None else members.flatten(0, 1)
        centroids, nearest = fit_kmeans(real, self.clusters, self.iterations, self.seed)
        ordered = nearest.cpu().double().sort().values  # the median, averaging the middle two as numpy does
        scale = ((ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2).float().to(nearest.device)
        _refuse_underflow(real, centroids, scale)
        with torch.inference_mode(False):
            self.centroids = centroids.clone()
            # a zero scale (members sitting on their centroids) would divide by zero
            self.scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clone()

    def extra_repr(self) -> str:
        if self.method == "mean":
            return "method='mean'"
        return f"method={self.method!r}, clusters={self.clusters}, temperature={self.temperature}"

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # resize before nn.Module copies in place, so fitted centroids of any size load strictly
        for name in ("centroids", "scale"):
            saved = state_dict.get(prefix + name)
            if saved is not None and hasattr(self, name):
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _refuse_underflow(members: Tensor, centroids: Tensor, scale: Tensor) -> None:
    """A zero median distance is fine when members sit on their centroids, not when float32 flushed tiny
    embeddings' distances to 0 (every histogram would then be uniform, every group alike)."""
    tiny = torch.finfo(torch.float32).tiny
    if float(scale) >= tiny:
        return
    exact = torch.cdist(members.double(), centroids.double(), compute_mode="donot_use_mm_for_euclid_dist")
    median = float(exact.min(1).values.square().median())
    if median > 0:
        raise ValueError(
            f"group_pooling='histogram': the members' median squared distance to their centroid is {median:.3g}, "
            f"below float32's normal range ({tiny:.3g}): the embeddings are too small for the pooling. Rescale the "
            "backbone's output (e.g. divide it by a typical norm)."
        )

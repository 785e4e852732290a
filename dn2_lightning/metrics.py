"""Per-sample evaluation records that survive DDP: gathered, de-duplicated by index, in dataset order."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from dn2_lightning.distributed import check_unique_indices, collectives_available, unique_by_index
from dn2_lightning.scoring import exceeds


def kept_float(values: Tensor) -> Tensor:
    """Scores or distances as collected: float64 kept (a ``precision="64-true"`` or ``.double()`` model returns
    float64 scores and judges them so; rounded to float32 they could fall on the other side of the threshold), any
    other dtype as float32."""
    return values if values.dtype == torch.float64 else values.float()


@dataclass
class AnomalyScores:
    """Scores of one evaluation, one row per dataset sample, sorted by ``indices``.

    Attributes:
        indices: ``[N]`` sample index in the evaluated dataset.
        scores: ``[N]`` DN2 scores (higher = more anomalous).
        labels: ``[N]`` 1 = anomalous, 0 = normal, -1 = unknown.
        neighbours: ``[N, k]`` train-set indices of the k nearest bank embeddings.
        distances: ``[N, k]`` their squared distances, ascending.
        threshold: the decision threshold the scores were judged by (NaN: undefined).
        normalized: ``[N]`` share of the training images' leave-one-out scores below each score, in [0, 1].
        paths: file path of each sample, when the data came from files.
    """

    indices: Tensor
    scores: Tensor
    labels: Tensor
    neighbours: Tensor
    distances: Tensor
    threshold: float = math.nan
    normalized: Tensor | None = None
    paths: list[str] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.indices.shape[0]

    @property
    def is_anomaly(self) -> Tensor | None:
        """``[N]`` score > threshold, or ``None`` when no threshold is defined (never silently False)."""
        return None if math.isnan(self.threshold) else exceeds(self.scores, self.threshold)


@dataclass
class ImageScores:
    """What :meth:`DN2Module.score_images` returns for B images.

    Attributes:
        scores: ``[B]`` DN2 scores (mean squared distance to the k nearest bank embeddings).
        normalized: ``[B]`` share of the training images' leave-one-out scores below each score, in [0, 1].
        is_anomaly: ``[B]`` score > threshold, or ``None`` when no threshold is defined.
        threshold: the decision threshold (NaN: undefined).
        neighbours: ``[B, k]`` train-set indices of the nearest bank embeddings.
        distances: ``[B, k]`` their squared distances, ascending.
        neighbour_paths: for each image, the files of its neighbours (when the bank came from files).
        anomaly_maps: ``[B, H, W]`` pixel scores when the model computes anomaly maps (a list of ``[H, W]``
            when the images differ in size).
    """

    scores: Tensor
    normalized: Tensor
    is_anomaly: Tensor | None
    threshold: float
    neighbours: Tensor
    distances: Tensor
    neighbour_paths: list[list[str]] | None = None
    anomaly_maps: Tensor | list[Tensor] | None = None

    def __len__(self) -> int:
        return self.scores.shape[0]


class ScoreCollector(Metric):
    """Collects per-sample scores across batches and ranks.

    ``DistributedSampler`` pads the last batches with repeated samples; ``compute`` keeps one row per
    sample index so metrics over the result equal the single-device ones.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, padded: bool = True) -> None:
        super().__init__(distributed_available_fn=collectives_available)  # not under a single-device Trainer
        self.padded = padded  # the evaluation's sampler pads ranks with repeats (Lightning's predict sampler does not)
        for name in ("indices", "scores", "labels", "neighbours", "distances"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, indices: Tensor, scores: Tensor, labels: Tensor, neighbours: Tensor, distances: Tensor) -> None:
        self.indices.append(indices.long())
        self.scores.append(kept_float(scores))
        self.labels.append(labels.long())
        self.neighbours.append(neighbours.long())
        self.distances.append(kept_float(distances))

    def compute(self) -> AnomalyScores:
        if isinstance(self.indices, list) and not self.indices:
            raise RuntimeError("no samples were scored: the evaluation dataloader is empty.")
        indices = dim_zero_cat(self.indices)
        check_unique_indices(indices, "scored samples", padded_rows=int(self.padded))
        indices, scores, labels, neighbours, distances = unique_by_index(
            indices,
            dim_zero_cat(self.scores),
            dim_zero_cat(self.labels),
            dim_zero_cat(self.neighbours),
            dim_zero_cat(self.distances),
        )
        return AnomalyScores(indices, scores, labels, neighbours, distances)

    def collect(self) -> AnomalyScores:
        """:meth:`compute` with every field's shape kept for a single sample (torchmetrics squeezes one-element
        results to 0-d)."""
        result = self.compute()
        n = result.indices.numel()
        return AnomalyScores(
            result.indices.reshape(n),
            result.scores.reshape(n),
            result.labels.reshape(n),
            result.neighbours.reshape(n, -1),
            result.distances.reshape(n, -1),
        )

"""Exact kNN over a memory bank split across ranks (``DN2Module(bank_sharding="shard")``).

Every rank holds a disjoint shard of the bank. A search gathers every rank's queries, searches them in the
local shard, and merges the per-shard top-k lists, so each rank gets the exact global neighbours of its
own queries while no rank ever holds the whole bank. All ranks must call it together.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dn2_lightning.distributed import all_gather_same_shape, count_rows, gather_rows, rank
from dn2_lightning.knn import KNNResult, PreparedBank, knn_distances, merge_topk


def sharded_knn(queries: Tensor, shard: PreparedBank, shard_ids: Tensor, k: int, **knn_kwargs: object) -> KNNResult:
    """k nearest neighbours of this rank's ``queries`` over the union of all ranks' shards.

    Returns squared distances and the neighbours' ids (``shard_ids`` values, e.g. dataset indices).
    """
    counts = count_rows(queries.shape[0], queries.device)
    all_queries = gather_rows(queries)
    local_k = min(k, shard.shape[0])
    dtype = torch.float64 if torch.float64 in (queries.dtype, shard.dtype) else torch.float32  # knn_distances' policy
    values = torch.full((all_queries.shape[0], k), float("inf"), dtype=dtype, device=queries.device)
    ids = torch.full((all_queries.shape[0], k), -1, dtype=torch.long, device=queries.device)
    failed: Exception | None = None
    if local_k > 0 and all_queries.shape[0] > 0:
        try:
            local = knn_distances(all_queries, shard, local_k, **knn_kwargs)
            values[:, :local_k], ids[:, :local_k] = local.values, shard_ids[local.indices]
        except Exception as error:  # e.g. MemoryError: the other ranks still wait in the gathers below
            failed = error
    merged = merge_topk(all_gather_same_shape(values), all_gather_same_shape(ids), k)
    if failed is not None:
        raise failed
    start = sum(counts[: rank()])
    return KNNResult(merged.values[start : start + counts[rank()]], merged.indices[start : start + counts[rank()]])

"""Exact k-nearest-neighbour search under squared Euclidean distance.

One signature, several backends::

    knn_distances(queries [M, D], bank [N, D], k) -> KNNResult(values [M, k], indices [M, k])

``values`` are ascending squared L2 distances, ``indices`` rows of ``bank``. Every backend is exact and
is tested against a float64 brute force.

* ``"torch"``: a two-stage search. Candidates come from the GEMM expansion
  ``||x||^2 + ||y||^2 - 2 x.y`` on data centred on the bank mean (small norms, little cancellation),
  computed block by block within a memory budget. The candidates' distances are then recomputed exactly
  from differences, and a worst-case rounding bound of the GEMM stage certifies, per query, that no
  other bank row can be nearer. Queries that cannot be certified are searched again by exact
  differences. The result is exact whatever the matmul precision.
* ``"keops"``: pykeops LazyTensors, ``((x_i - y_j) ** 2).sum(-1).Kmin_argKmin``. Its JIT compiler can
  crash the process on some CUDA set-ups, so it is probed once in a subprocess; if the probe fails the
  search falls back to ``"torch"`` with a warning.
* ``"auto"``: ``"torch"``. On CPU KeOps compiles slowly and loses to BLAS; on GPU KeOps' own
  documentation says cuBLAS-based search wins above D ~ 50-100, and DN2 embeddings have D >= 512.
  KeOps is chosen for low-dimensional GPU data only.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

KNN_BACKENDS = ("auto", "torch", "keops")
DEFAULT_MAX_MEMORY_BYTES = 512 * 2**20
# Below this embedding size KeOps' register-resident reduction beats cuBLAS (KeOps documentation).
_KEOPS_MAX_AUTO_DIM = 64
# KeOps returns neighbour indices through its float accumulator: exact only below 2**24 rows.
_KEOPS_MAX_ROWS = 2**24
_UNIT_ROUNDOFF = {
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}
_TF32_UNIT_ROUNDOFF = 2.0**-11


class KNNResult(NamedTuple):
    """The k nearest bank rows of each query.

    Attributes:
        values: ``[M, k]`` squared Euclidean distances, ascending along dim 1.
        indices: ``[M, k]`` int64 row indices into the bank.
    """

    values: Tensor
    indices: Tensor


@dataclass(frozen=True)
class PreparedBank:
    """A bank ready for repeated searches: centred on its mean, with row norms and the candidate-dtype
    copy computed once. Build it with :func:`prepare_bank`; pass it wherever a bank tensor goes."""

    center: Tensor  # [D] float32
    rows: Tensor  # [N, D] float32, centred
    norms: Tensor  # [N] squared row norms
    low: Tensor  # rows in the candidate dtype (the same tensor for float32)
    max_norm: float

    @property
    def shape(self) -> torch.Size:
        return self.rows.shape

    @property
    def device(self) -> torch.device:
        return self.rows.device


def prepare_bank(bank: Tensor, candidate_dtype: torch.dtype = torch.float32) -> PreparedBank:
    """Centre the bank on its mean (distances are unchanged; norms and cancellation shrink)."""
    with torch.autocast(bank.device.type, enabled=False):
        return _prepare_bank(bank, candidate_dtype)


def _prepare_bank(bank: Tensor, candidate_dtype: torch.dtype) -> PreparedBank:
    extra = bank.shape[0] * bank.shape[1] * (4 + (0 if candidate_dtype == torch.float32 else 2))
    ensure_fits(extra + DEFAULT_MAX_MEMORY_BYTES, bank.device, "searching the memory bank")
    center = bank.mean(0, dtype=torch.float64).to(torch.float32)
    rows = bank.to(torch.float32) - center
    norms = (rows * rows).sum(1)
    low = rows if candidate_dtype == torch.float32 else rows.to(candidate_dtype)
    return PreparedBank(center, rows, norms, low, float(norms.max().sqrt()) if len(norms) else 0.0)


def ensure_fits(nbytes: int, device: torch.device, what: str) -> None:
    """Fail before any work when a CUDA device cannot hold ``nbytes`` more (instead of an OOM mid-run)."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > free:
        raise MemoryError(
            f"{what} needs {nbytes / 2**30:.2f} GiB on {device} but only {free / 2**30:.2f} GiB are free. Use "
            "more devices (the bank is gathered per rank), a smaller max_memory_bytes, or run on the CPU."
        )


def list_knn_backends() -> list[str]:
    """Names accepted by ``knn_distances(..., backend=...)``."""
    return list(KNN_BACKENDS)


def knn_distances(
    queries: Tensor,
    bank: Tensor | PreparedBank,
    k: int,
    backend: str = "auto",
    *,
    max_memory_bytes: int | None = None,
    candidate_dtype: torch.dtype | None = None,
) -> KNNResult:
    """Exact k nearest neighbours of each query row among the bank rows (squared L2).

    Args:
        queries: ``[M, D]`` floating tensor.
        bank: ``[N, D]`` floating tensor on the same device, or a :class:`PreparedBank` of it (saves
            re-centring the bank when it is searched many times).
        k: number of neighbours, ``1 <= k <= N``.
        backend: one of :func:`list_knn_backends`.
        max_memory_bytes: budget for temporary buffers of the ``"torch"`` backend (default 512 MiB).
        candidate_dtype: dtype of the ``"torch"`` backend's GEMM candidate search (default float32;
            ``torch.bfloat16`` uses tensor cores). Results stay exact either way.

    Returns:
        ``KNNResult(values, indices)``, float32 values ascending.

    Raises:
        ValueError: on shapes, dtypes, devices, ``k`` or ``backend`` that cannot work.

    Example:
        >>> bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
        >>> knn_distances(torch.tensor([[0.9, 0.0]]), bank, k=2)
        KNNResult(values=tensor([[0.0100, 0.8100]]), indices=tensor([[1, 0]]))
    """
    _validate_inputs(
        queries, bank.rows if isinstance(bank, PreparedBank) else bank, k, backend, max_memory_bytes, candidate_dtype
    )
    candidate_dtype = candidate_dtype or torch.float32
    # Under Trainer(precision="bf16-mixed") autocast would silently lower the GEMM below the precision the
    # error bound assumes; the search picks its own precisions.
    with torch.autocast(queries.device.type, enabled=False):
        if not isinstance(bank, PreparedBank):
            bank = prepare_bank(bank, candidate_dtype)
        elif bank.low.dtype != candidate_dtype:
            bank = replace(bank, low=bank.rows.to(candidate_dtype))
        if backend == "auto":
            backend = _auto_backend(queries.device, bank.shape[1])
        if backend == "keops":
            if _keops_usable(queries.device, bank.shape[0]):
                return _keops_knn(queries, bank, k)
            backend = "torch"
        return _torch_knn(queries, bank, k, max_memory_bytes or DEFAULT_MAX_MEMORY_BYTES)


def brute_force_knn(queries: Tensor, bank: Tensor, k: int) -> KNNResult:
    """Reference kNN: full float64 distance matrix by differences. For tests and small inputs only."""
    q, b = queries.double(), bank.double()
    distances = ((q[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    values, indices = distances.topk(k, dim=1, largest=False, sorted=True)
    return KNNResult(values, indices)


# --------------------------------------------------------------------------------------------------
# validation and backend choice


def _validate_inputs(
    queries: Tensor,
    bank: Tensor,
    k: int,
    backend: str,
    max_memory_bytes: int | None,
    candidate_dtype: torch.dtype | None,
) -> None:
    if backend not in KNN_BACKENDS:
        raise ValueError(f"knn_backend={backend!r} is not one of {list_knn_backends()}.")
    for name, tensor in (("queries", queries), ("bank", bank)):
        if not isinstance(tensor, Tensor) or tensor.ndim != 2:
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"`{name}` must be a 2-D tensor [rows, dim], got {shape}.")
        if not tensor.is_floating_point():
            raise ValueError(f"`{name}` must be a floating tensor, got dtype {tensor.dtype}.")
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"`queries` have dimension {queries.shape[1]} but the `bank` has {bank.shape[1]}: both must come "
            "from the same backbone."
        )
    if queries.device != bank.device:
        raise ValueError(f"`queries` are on {queries.device} but the `bank` is on {bank.device}.")
    n = bank.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k={k!r} must be an integer with 1 <= k <= bank size ({n}).")
    if max_memory_bytes is not None and max_memory_bytes < 2**16:
        raise ValueError(f"max_memory_bytes={max_memory_bytes} is too small; give at least 65536 bytes.")
    if candidate_dtype is not None and candidate_dtype not in _UNIT_ROUNDOFF:
        raise ValueError(f"candidate_dtype={candidate_dtype} must be one of {list(_UNIT_ROUNDOFF)}.")


def _auto_backend(device: torch.device, dim: int) -> str:
    if device.type == "cuda" and dim <= _KEOPS_MAX_AUTO_DIM and _keops_usable(device, 0):
        return "keops"
    return "torch"


# --------------------------------------------------------------------------------------------------
# torch backend


def _torch_knn(queries: Tensor, bank: PreparedBank, k: int, max_memory_bytes: int) -> KNNResult:
    q = queries.to(torch.float32) - bank.center
    b = bank.rows
    n, dim = b.shape
    num_candidates = min(n, 2 * k + 16)
    query_rows, bank_rows = _block_sizes(q.shape[0], n, dim, num_candidates, max_memory_bytes)
    error_scale = _gemm_error_scale(dim, bank.low.dtype, b.device)

    values_out, indices_out = [], []
    for start in range(0, q.shape[0], query_rows):
        q_blk = q[start : start + query_rows]
        q_norms = (q_blk * q_blk).sum(1)
        approx, cand = _gemm_candidates(q_blk, q_norms, bank.low, bank.norms, num_candidates, bank_rows)
        exact = _exact_distances(q_blk, b, cand)
        exact, order = exact.sort(dim=1)
        cand = cand.gather(1, order)
        values, indices = exact[:, :k], cand[:, :k]

        if num_candidates < n:
            # No row outside the candidates can be nearer than the k-th once the worst-case GEMM error
            # of the last candidate still leaves it above the k-th exact distance.
            bound = error_scale * (q_norms.sqrt() + bank.max_norm) ** 2
            kth = values[:, -1]
            refine_slack = 4 * dim * _UNIT_ROUNDOFF[torch.float32] * kth
            uncertain = approx[:, -1] - bound < kth + refine_slack
            if uncertain.any():
                rows = uncertain.nonzero().squeeze(1)
                v, i = _exact_scan(q_blk[rows], b, k, max_memory_bytes)
                values, indices = values.index_put((rows,), v), indices.index_put((rows,), i)
        values_out.append(values)
        indices_out.append(indices)
    return KNNResult(torch.cat(values_out), torch.cat(indices_out))


def _block_sizes(m: int, n: int, dim: int, num_candidates: int, budget: int) -> tuple[int, int]:
    """Rows of queries and of the bank per block so that temporaries stay within ``budget`` bytes."""
    # per query row: candidate differences [c, D] for the exact recompute, plus the distance block.
    query_rows = max(1, min(m, budget // (4 * (num_candidates * dim + 2 * min(n, 4096) + 2 * dim))))
    bank_rows = max(num_candidates, min(n, budget // (4 * 3 * query_rows)))
    return query_rows, min(n, bank_rows)


def _gemm_error_scale(dim: int, dtype: torch.dtype, device: torch.device) -> float:
    """Factor c with |approx - exact| <= c (||x|| + ||y||)^2 for the expansion computed in ``dtype``.

    Rounding the inputs costs 2u_in relative to ||x|| ||y||, a length-D float32 accumulation
    gamma_D = D u / (1 - D u), and the three additions of the expansion 3u.
    """
    u = _UNIT_ROUNDOFF[torch.float32]
    u_in = _UNIT_ROUNDOFF[dtype]
    if dtype == torch.float32 and device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        u_in = max(u_in, _TF32_UNIT_ROUNDOFF)
    gamma = dim * u / (1 - dim * u)
    return 1.01 * (2 * u_in + gamma + 3 * u)


def _gemm_candidates(
    q: Tensor, q_norms: Tensor, b_low: Tensor, b_norms: Tensor, c: int, bank_rows: int
) -> tuple[Tensor, Tensor]:
    """The c smallest approximate distances (ascending) and their bank rows, one bank block at a time."""
    q_low = q.to(b_low.dtype)
    best_values = best_indices = None
    for start in range(0, b_low.shape[0], bank_rows):
        block = b_low[start : start + bank_rows]
        # ||q||^2 is constant along a row: rank by ||b||^2 - 2 q.b and add it to the c winners only
        if block.dtype == torch.float32:
            approx = torch.addmm(b_norms[None, start : start + bank_rows], q_low, block.T, alpha=-2)
        else:
            approx = torch.add(b_norms[None, start : start + bank_rows], (q_low @ block.T).float(), alpha=-2)
        values, indices = approx.topk(min(c, block.shape[0]), dim=1, largest=False, sorted=False)
        indices = indices + start
        if best_values is not None:
            values, indices = torch.cat([best_values, values], 1), torch.cat([best_indices, indices], 1)
            values, pos = values.topk(c, dim=1, largest=False, sorted=False)
            indices = indices.gather(1, pos)
        best_values, best_indices = values, indices
    values, order = (best_values + q_norms[:, None]).sort(dim=1)
    return values, best_indices.gather(1, order)


def _exact_distances(q: Tensor, b: Tensor, rows: Tensor) -> Tensor:
    """Squared distances from differences: q [m, D] to b[rows] for rows [m, c]."""
    return ((q[:, None, :] - b[rows]) ** 2).sum(-1)


def _exact_scan(q: Tensor, b: Tensor, k: int, max_memory_bytes: int) -> KNNResult:
    """kNN from differences over the whole bank (no expansion), for rows the fast path cannot certify."""
    bank_rows = max(k, min(b.shape[0], max_memory_bytes // (4 * 4 * max(1, q.shape[0]))))
    best_values = best_indices = None
    for start in range(0, b.shape[0], bank_rows):
        block = b[start : start + bank_rows]
        d = torch.cdist(q, block, compute_mode="donot_use_mm_for_euclid_dist").square()
        values, indices = d.topk(min(k, block.shape[0]), dim=1, largest=False)
        indices = indices + start
        if best_values is not None:
            values, indices = torch.cat([best_values, values], 1), torch.cat([best_indices, indices], 1)
            values, pos = values.topk(k, dim=1, largest=False)
            indices = indices.gather(1, pos)
        best_values, best_indices = values, indices
    # recompute from differences so values match the fast path bit for bit in the same arithmetic
    values = _exact_distances(q, b, best_indices)
    values, order = values.sort(dim=1)
    return KNNResult(values, best_indices.gather(1, order))


# --------------------------------------------------------------------------------------------------
# KeOps backend


def keops_environment(world: int | None = None, global_rank: int | None = None) -> dict[str, str]:
    """Environment for importing pykeops: under DDP each rank gets its own compile cache.

    KeOps' cache folder (``KEOPS_CACHE_FOLDER``, default ``~/.cache/keops<version>``) has no lock, so ranks
    compiling the same formula at once race on it. With more than one process the folder becomes
    ``<folder>/rank<global rank>``; a single process keeps KeOps' own default. ``world`` and
    ``global_rank`` default to the running process group.
    """
    from dn2_lightning.distributed import rank, world_size

    env = dict(os.environ)
    world = world_size() if world is None else world
    if world <= 1 or (env.get("KEOPS_CACHE_FOLDER") and env.get("KEOPS_CACHE_FOLDER") == env.get("DN2_KEOPS_FOLDER")):
        return env
    global_rank = rank() if global_rank is None else global_rank
    base = env.get("KEOPS_CACHE_FOLDER") or os.path.join(os.path.expanduser("~"), ".cache", "keops")
    env["KEOPS_CACHE_FOLDER"] = env["DN2_KEOPS_FOLDER"] = os.path.join(base, f"rank{global_rank}")
    return env


def _import_keops_lazytensor() -> type:
    """Import pykeops lazily (importing it initialises CUDA), with the per-rank cache folder set first."""
    if "pykeops" not in sys.modules:
        os.environ.update(keops_environment())
    from pykeops.torch import LazyTensor

    return LazyTensor


def _keops_knn(queries: Tensor, bank: PreparedBank, k: int) -> KNNResult:
    LazyTensor = _import_keops_lazytensor()  # noqa: N806 (the class)

    x_i = LazyTensor((queries.to(torch.float32) - bank.center)[:, None, :].contiguous())
    y_j = LazyTensor(bank.rows[None, :, :].contiguous())
    values, indices = ((x_i - y_j) ** 2).sum(-1).Kmin_argKmin(K=k, dim=1)
    return KNNResult(values, indices.long())


_PROBE = textwrap.dedent(
    """
    import sys, torch
    from pykeops.torch import LazyTensor
    device = sys.argv[1]
    x = torch.randn(50, 3, device=device)
    y = torch.randn(70, 3, device=device)
    d = ((LazyTensor(x[:, None, :]) - LazyTensor(y[None, :, :])) ** 2).sum(-1)
    values, indices = d.Kmin_argKmin(K=2, dim=1)
    ref = torch.cdist(x, y).square().topk(2, dim=1, largest=False).values
    assert torch.allclose(values, ref, atol=1e-4), "KeOps returned wrong distances"
    print("ok")
    """
)


def _keops_usable(device: torch.device, bank_rows: int) -> bool:
    if bank_rows >= _KEOPS_MAX_ROWS:
        warnings.warn(
            f"KeOps returns indices through float32 and is exact only below 2**24 bank rows; the bank has "
            f"{bank_rows}. Using the torch backend.",
            stacklevel=3,
        )
        return False
    verdict = keops_probe(str(device))
    if verdict is not None:
        warnings.warn(
            f"KeOps is unusable on {device} ({verdict}); using the torch backend. README.md, 'KeOps on "
            f"CUDA 13', lists what to check.",
            stacklevel=3,
        )
        return False
    return True


@functools.cache
def keops_probe(device: str = "cpu", timeout_s: float = 600.0) -> str | None:
    """Compile and run one KeOps formula in a subprocess; ``None`` if it worked, else the reason.

    The probe runs in a child process because KeOps' JIT can crash (segfault) the process that calls it,
    and because importing pykeops initialises CUDA, after which a fork is unsafe. The verdict is cached
    for the life of this process.
    """
    if os.environ.get("DN2_DISABLE_KEOPS"):
        return "disabled by DN2_DISABLE_KEOPS"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, device],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=keops_environment(),
        )
    except subprocess.TimeoutExpired:
        return f"probe timed out after {timeout_s:.0f} s"
    if proc.returncode == 0 and proc.stdout.strip().endswith("ok"):
        return None
    if proc.returncode < 0:
        return f"probe killed by signal {-proc.returncode}"
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return f"probe exited with code {proc.returncode}: {tail}"


def merge_topk(values: list[Tensor], indices: list[Tensor], k: int) -> KNNResult:
    """Merge per-shard kNN lists (indices already global) into the overall k nearest."""
    all_values, all_indices = torch.cat(values, 1), torch.cat(indices, 1)
    top, pos = all_values.topk(min(k, all_values.shape[1]), dim=1, largest=False, sorted=True)
    return KNNResult(top, all_indices.gather(1, pos))

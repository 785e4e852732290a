"""Exact k-nearest-neighbour search under squared Euclidean distance.

One signature, several backends::

    knn_distances(queries [M, D], bank [N, D], k) -> KNNResult(values [M, k], indices [M, k])

``values`` are ascending squared L2 distances, ``indices`` rows of ``bank``. Every backend is exact and
is tested against a float64 brute force.

* ``"torch"``: a certified two-stage search. (1) Candidates: one GEMM per block, ``||b||^2 - 2 q.b`` on data
  centred on the bank mean and scaled by a power of two to a radius near 1 (small norms, little cancellation,
  no overflow), into a reused buffer: float32 on a CPU, float16 operands with float32 accumulation on CUDA
  (``candidate_dtype``; the norm rides in the GEMM as two extra float16 columns). The ``2k + 8`` smallest per
  query come from the groups of 32 rows with the smallest minima. (2) A worst-case rounding bound ``E`` of the
  GEMM (per query) brackets every exact distance: ``|approx - exact| <= E``. The k-th exact distance is at
  most ``approx_k + E``, so every candidate with ``approx - E`` above that is provably out; only the few that
  the bound cannot separate (about k per query on real embeddings) get their distances computed from the
  original rows, pair by pair in cache-sized chunks, without materialising ``[queries, candidates, D]``. A
  query is certified when the last candidate's lower bound exceeds the k-th exact distance (no bank row
  outside the candidates can be nearer); the rare queries that are not are searched exactly over the row
  groups whose minimum leaves room for a nearer row, never the whole bank. Results are exact whatever the
  matmul precision (float32, TF32, float16, bfloat16).
* ``"keops"``: pykeops LazyTensors, ``((x_i - y_j) ** 2).sum(-1).Kmin_argKmin`` of the ``2k + 8`` nearest on the
  centred float32 rows, certified like the GEMM's candidates (float32 cannot order near-ties far from the
  bank); uncertified queries go to ``"torch"``. Its JIT compiler can crash the process on some CUDA set-ups, so
  it is probed once in a subprocess; if the probe fails the search falls back to ``"torch"`` with a warning.
* ``"auto"``: ``"torch"`` on every device. On CPU KeOps compiles slowly and loses to BLAS; on an H200 it was
  slower at every shape measured, from 6,000 x 10,000 x 2048 (62 ms against 8.5 ms) to its own best case,
  200,000 x 10,000 x 64 (58 ms against 34 ms): benchmarks/RESULTS.md, section 25.

Dtypes: float64 inputs (queries or bank) are searched exactly in float64 arithmetic (differences in
float64, also against a float32 bank) and returned as float64; float32, float16 and bfloat16 inputs are
returned as float32, from float32 differences squared and accumulated in float64 (relative error below
2**-22, allowed for by the certification; neighbours closer than that to each other are re-ordered from
float64 differences). Exact means: equal to a float64 brute force of the inputs as given. Inputs must be
finite, and float32 results must fit float32: data whose squared distances could exceed 3.4e38 are
refused with a ValueError (rescale them or pass float64). Other dtypes (float8, integers) are refused.
Results are not differentiable (no autograd graph is recorded).
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import operator
import os
import subprocess
import sys
import textwrap
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

KNNBackend = Literal["auto", "torch", "keops"]
KNN_BACKENDS: tuple[str, ...] = get_args(KNNBackend)
DEFAULT_MAX_MEMORY_BYTES = 512 * 2**20
# KeOps returns neighbour indices through its float accumulator: exact only below 2**24 rows.
_KEOPS_MAX_ROWS = 2**24
_UNIT_ROUNDOFF = {
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}
_TF32_UNIT_ROUNDOFF = 2.0**-11
# Input dtypes the search takes (float8 and complex tensors cannot be promoted or ordered this way).
_INPUT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Queries farther than this (squared, in units of the bank's radius) would overflow the candidate GEMM; they
# are searched by float64 differences instead. float16 holds |-2 q| and |q.b| only up to 65504.
_MAX_SCALED_SQUARED_NORM = {torch.float32: 2.0**100, torch.bfloat16: 2.0**100, torch.float16: 2.0**28}
# The candidate GEMM's output buffer (reused for every block, so no page faults) holds at most this many
# values: a few MiB stay near the cache on a CPU; a GPU wants large GEMMs and few kernel launches.
_GEMM_BUFFER_VALUES = {"cpu": 8 * 2**20, "cuda": 128 * 2**20}
_MAX_BANK_BLOCK_ROWS = {"cpu": 16384, "cuda": 65536}
# Candidates are drawn from groups of this many consecutive bank rows: the c groups with the smallest
# minimum hold the c smallest values, so top-k runs over (rows / group) minima plus c * group values instead
# of every row; the group minima also tell an uncertified query which groups can still hold a nearer row.
_GROUP_ROWS = 32  # 16 to 64 time alike on the CPU (RESULTS.md section 4)
# Devices whose float16/bfloat16 GEMM operand is stored tiled: within each tile of _GROUP_ROWS x _TILE_GROUPS rows,
# a group's rows sit _TILE_GROUPS columns apart in the GEMM output, so its minimum is a reduction over a middle
# dimension. On an H200 the minimum over 32 consecutive columns (the last dimension) took 1.19 ms per 2048 x
# 65,536 block, half the search, and over 32 strided columns 0.11 ms (RESULTS.md section 25). Off until the whole
# search is measured on a GPU with it: ("cuda",) turns it on.
_TILED_DEVICES: tuple[str, ...] = ()
_TILE_GROUPS = 256
# Bytes per float64 operand in one chunk of the survivor recompute: in L2 cache on a CPU, large on a GPU;
# never more than an eighth of the search's budget (a chunk's temporaries are about 2.5 times this).
_PAIR_CHUNK_BYTES = {"cpu": 2**19, "cuda": 2**28}
# bytes per (query, candidate) pair of an exact search step: the candidates and their mask, and in _exact_topk the
# float64 distances, the kept pairs' row and column indices, their bank rows and distances (8 each), and the
# recompute of close rows (its own indices while the first ones are still held)
_BYTES_PER_PAIR = 64


class KNNResult(NamedTuple):
    """The k nearest bank rows of each query.

    Attributes:
        values: ``[M, k]`` squared Euclidean distances, ascending along dim 1; float64 when the queries or
            the bank are float64, else float32.
        indices: ``[M, k]`` int64 row indices into the bank.
    """

    values: Tensor
    indices: Tensor


@dataclass(frozen=True)
class PreparedBank:
    """A bank ready for repeated searches. Build it with :func:`prepare_bank`; pass it wherever a bank
    tensor goes.

    Attributes:
        center: ``[D]`` the bank mean, float64 for a float64 bank else float32.
        rows: ``[N, D]`` float32 ``(bank - center) * scale`` when it is the GEMM operand (float32 candidates),
            else ``None``: :meth:`frame_rows` recomputes it on demand, so a float16 bank keeps no float32 copy.
        norms: ``[N]`` float32 squared norms of ``rows``.
        low: the candidate GEMM's bank operand: ``rows`` itself for float32; for float16/bfloat16
            ``[rows, hi, lo, 0...]`` with ``hi + lo = norms`` (padded to a multiple of 8 columns), so that one
            GEMM with ``[-2 q, 1, 1, 0...]`` yields ``||b||^2 - 2 q.b`` in its output dtype.
        max_norm: largest norm of ``rows`` (about 1 after scaling).
        source: ``[N, D]`` the bank as given; exact distances are computed from it in float64.
        scale: the power of two applied to ``rows`` (distances of ``rows`` are ``scale**2`` times the true ones).
        tiled_rows: how many leading rows of ``low`` are stored tiled (see ``_TILED_DEVICES``); 0 = none.
        tile_groups: groups per tile of the tiled rows (``_TILE_GROUPS`` when the bank was prepared).
    """

    center: Tensor
    rows: Tensor | None
    norms: Tensor
    low: Tensor
    max_norm: float
    source: Tensor
    scale: float = 1.0
    tiled_rows: int = 0
    tile_groups: int = 0

    @property
    def shape(self) -> torch.Size:
        return self.source.shape

    @property
    def device(self) -> torch.device:
        return self.source.device

    def frame_rows(self) -> Tensor:
        """``rows``, recomputed (bit for bit) when they are not kept."""
        return self.rows if self.rows is not None else _frame_rows(self.source, self.center, self.scale)

    def with_candidate_dtype(self, dtype: torch.dtype) -> PreparedBank:
        """The same bank with its GEMM operand in ``dtype``."""
        if self.low.dtype == dtype:
            return self
        rows = self.frame_rows()
        low, tiled, groups = _low_rows(rows, self.norms, dtype)
        return replace(self, rows=rows if low is rows else None, low=low, tiled_rows=tiled, tile_groups=groups)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the distances a search of this bank returns (for float32 or lower queries)."""
        return _result_dtype(self.source.dtype)


class _Same:
    """A weak reference to a tensor that compares by identity (tensors compare element-wise)."""

    def __init__(self, tensor: Tensor) -> None:
        self.ref = weakref.ref(tensor)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and self.ref() is not None and self.ref() is other.ref()

    __hash__ = None  # type: ignore[assignment]


def content_key(*tensors: Tensor) -> tuple:
    """What tells whether a :class:`PreparedBank` made from ``tensors`` is still theirs: the tensors themselves
    (weakly: a new tensor at a freed one's address is another bank) and their in-place edits (version counters;
    edits through ``.data`` or a NumPy view escape them, and so do those of an inference tensor, which has none).
    Not picklable: drop it when pickling."""
    return tuple(item for t in tensors for item in (_Same(t), None if t.is_inference() else t._version))


@torch.no_grad()
def prepare_bank(bank: Tensor, candidate_dtype: torch.dtype | None = None) -> PreparedBank:
    """Centre the bank on its mean and scale it by a power of two (distances are unchanged up to that exact
    factor; norms, cancellation and overflow shrink). Done once per bank, reused by every search.

    Args:
        bank: ``[N, D]`` finite floating tensor.
        candidate_dtype: dtype of the candidate GEMM (see :func:`knn_distances`; ``None``: the device's).

    Returns:
        A :class:`PreparedBank` (it keeps a reference to ``bank``, detached from autograd: do not modify it in
        place afterwards).

    Raises:
        ValueError: ``bank`` is not a 2-D float64/float32/float16/bfloat16 tensor with at least one column, has
            NaN/Inf rows, or spans squared distances beyond the range of its result dtype.
    """
    _check_matrix("bank", bank)
    bank = bank.detach()
    if lacks_float64(bank.device):  # the exact search needs float64: prepared (and searched) on the CPU
        bank = bank.cpu()
    candidate_dtype = candidate_dtype or default_candidate_dtype(bank.device)
    if candidate_dtype not in _UNIT_ROUNDOFF:
        raise ValueError(f"candidate_dtype={candidate_dtype} must be one of {list(_UNIT_ROUNDOFF)}.")
    with torch.autocast(bank.device.type, enabled=False):
        return _prepare_bank(bank, candidate_dtype)


def _prepare_bank(bank: Tensor, candidate_dtype: torch.dtype) -> PreparedBank:
    n, dim = bank.shape
    extra = n * dim * 4 + (0 if candidate_dtype == torch.float32 else n * (dim + 10) * 2)
    ensure_fits(extra + DEFAULT_MAX_MEMORY_BYTES, bank.device, "searching the memory bank")
    work = _work_dtype(bank.dtype)
    center = float64_mean(bank).to(work) if n else bank.new_zeros(dim, dtype=work)
    if work == torch.float32:  # centre in float32 (one rounding, in the error bound); norms from the result
        rows = torch.sub(bank, center)
        norms = squared_norms(rows)
        radius = math.sqrt(float(norms.max())) if n else 0.0  # inf once a norm overflows: refused below
    else:  # float64: norms in float64, since the centred rows may not fit float32 before scaling
        radius = _radius64(bank, center)
    if not math.isfinite(radius):  # NaN/Inf rows (the mean, hence every norm, is then NaN too)
        _check_finite("bank", bank)
    limit = torch.finfo(_result_dtype(bank.dtype)).max
    if not _square(2 * radius) <= limit:
        radius = _radius64(bank, center)  # a float32 norm overflows to inf: say how far the rows really lie
        raise ValueError(
            f"`bank` rows lie up to {radius:.3g} from their mean, so squared distances could reach "
            f"{_square(2 * radius):.3g}, beyond {_dtype_name(_result_dtype(bank.dtype))}'s range ({limit:.3g}). "
            "Rescale the embeddings (e.g. divide them by their largest norm) or pass float64 tensors."
        )
    # A power of two (exact in binary floating point) bringing the radius into [1/2, 1), so that neither the
    # GEMM (float16 included) nor its error bound under- or overflows. Only tiny banks clamp it (float32
    # arithmetic cannot hold factors past 2**126, nor float64 scale**2 past 2**1023): their rows fall into the
    # candidate dtype's subnormals, which the bound covers. Large banks never clamp: the range check above
    # keeps the radius below 2**63 (float32) or 2**511 (float64), so every candidate row fits float16 and
    # scale**2 >= 2**-1022 stays a normal float64.
    exponent = 0 if radius == 0 else min(120 if work == torch.float32 else 480, -math.frexp(radius)[1])
    scale = 2.0**exponent
    if work == torch.float32:
        if exponent:  # the same operations as _frame_rows, so that recomputed rows are these bit for bit
            rows.mul_(scale)
            norms = squared_norms(rows)
    else:
        rows = _frame_rows(bank, center, scale)
        norms = squared_norms(rows)
    max_norm = math.sqrt(float(norms.max())) if n else 0.0
    low, tiled, groups = _low_rows(rows, norms, candidate_dtype)
    return PreparedBank(center, rows if low is rows else None, norms, low, max_norm, bank, scale, tiled, groups)


def _frame_rows(bank: Tensor, center: Tensor, scale: float) -> Tensor:
    """float32 ``(bank - center) * scale``: in float32 for a float32 bank, else by float64 chunks of 32 MiB."""
    if _work_dtype(bank.dtype) == torch.float32:
        rows = torch.sub(bank, center)
        return rows.mul_(scale) if scale != 1 else rows
    n, dim = bank.shape
    step = max(1, 2**22 // max(1, dim))
    rows = torch.empty(n, dim, dtype=torch.float32, device=bank.device)
    for start in range(0, n, step):
        rows[start : start + step] = (bank[start : start + step] - center) * scale
    return rows


def _low_rows(rows: Tensor, norms: Tensor, dtype: torch.dtype) -> tuple[Tensor, int, int]:
    """The candidate GEMM's bank operand (see :class:`PreparedBank`), how many of its leading rows are tiled, and
    the groups per tile."""
    if dtype == torch.float32:
        return rows, 0, 0
    n, dim = rows.shape
    low = torch.zeros(n, (dim + 2 + 7) // 8 * 8, dtype=dtype, device=rows.device)
    hi = norms.to(dtype)
    lo = norms - hi.float()  # the norm to about 2u^2, in two low-precision terms
    g, groups = _GROUP_ROWS, _TILE_GROUPS
    tiled = n // (g * groups) * (g * groups) if rows.device.type in _TILED_DEVICES else 0

    def fill(out: Tensor, part: Tensor, high: Tensor, low_part: Tensor) -> None:
        out[..., :dim], out[..., dim], out[..., dim + 1] = part, high, low_part

    if tiled:  # original row i*tile + t*g + s goes to position i*tile + s*groups + t
        view = (-1, groups, g)
        fill(
            low[:tiled].view(-1, g, groups, low.shape[1]),
            rows[:tiled].view(*view, dim).transpose(1, 2),
            hi[:tiled].view(view).transpose(1, 2),
            lo[:tiled].view(view).transpose(1, 2),
        )
    fill(low[tiled:], rows[tiled:], hi[tiled:], lo[tiled:])
    return low, tiled, groups if tiled else 0


def _tiled_positions(columns: Tensor, tiled: int, group: int, tile_groups: int) -> Tensor:
    """GEMM output positions of block ``columns`` (bank rows counted from the block's start) whose first ``tiled``
    rows are stored tiled, ``tile_groups`` groups per tile; the others are where they are."""
    if not tiled:
        return columns
    rem = columns % (group * tile_groups)
    return torch.where(columns < tiled, columns - rem + rem % group * tile_groups + rem // group, columns)


def _tiled_columns(positions: Tensor, tiled: int, group: int, tile_groups: int) -> Tensor:
    """The inverse of :func:`_tiled_positions`: block rows of GEMM output positions."""
    if not tiled:
        return positions
    rem = positions % (group * tile_groups)
    return torch.where(positions < tiled, positions - rem + rem % tile_groups * group + rem // tile_groups, positions)


def _low_queries(q: Tensor, low: Tensor) -> Tensor:
    """``[-2 q, 1, 1, 0...]`` in the dtype of ``low`` (scaling by -2 is exact)."""
    out = torch.zeros(q.shape[0], low.shape[1], dtype=low.dtype, device=q.device)
    out[:, : q.shape[1]] = q * -2
    out[:, q.shape[1] : q.shape[1] + 2] = 1
    return out


def default_candidate_dtype(device: torch.device) -> torch.dtype:
    """The candidate GEMM's dtype where the caller gives none: float16 on CUDA (tensor cores, with float32
    accumulation and a bound 8x tighter than bfloat16's; see benchmarks/RESULTS.md), float32 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def lacks_float64(device: torch.device | str) -> bool:
    """Whether ``device`` cannot hold float64 tensors (Apple's MPS). The exact search needs float64, so banks on
    such a device are kept, prepared and searched on the CPU; only the backbone runs on the device."""
    return torch.device(device).type == "mps"


def ensure_fits(nbytes: int, device: torch.device, what: str) -> None:
    """Fail before any work when a CUDA device cannot hold ``nbytes`` more (instead of an OOM mid-run)."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    # memory PyTorch's caching allocator holds but does not use is free to this process
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if nbytes > free:
        raise MemoryError(
            f"{what} needs {nbytes / 2**30:.2f} GiB on {device} but only {free / 2**30:.2f} GiB are free. Use "
            "more devices (the bank is gathered per rank), a smaller max_memory_bytes, or run on the CPU."
        )


def list_knn_backends() -> list[str]:
    """Names accepted by ``knn_distances(..., backend=...)``."""
    return list(KNN_BACKENDS)


@torch.no_grad()
def knn_distances(
    queries: Tensor,
    bank: Tensor | PreparedBank,
    k: int,
    backend: KNNBackend = "auto",
    *,
    max_memory_bytes: int | None = None,
    candidate_dtype: torch.dtype | None = None,
) -> KNNResult:
    """Exact k nearest neighbours of each query row among the bank rows (squared L2).

    Args:
        queries: ``[M, D]`` finite float64, float32, float16 or bfloat16 tensor (``M`` may be 0, ``D`` not).
        bank: ``[N, D]`` such a tensor on the same device, or a :class:`PreparedBank` of it (saves re-centring
            the bank when it is searched many times).
        k: number of neighbours, an integer (Python or NumPy) with ``1 <= k <= N``.
        backend: one of :func:`list_knn_backends`.
        max_memory_bytes: budget for temporary buffers of the ``"torch"`` backend (default 512 MiB).
        candidate_dtype: dtype of the ``"torch"`` backend's candidate GEMM: ``None`` (float16 on CUDA,
            float32 elsewhere: :func:`default_candidate_dtype`), ``torch.float32``, ``torch.float16`` or
            ``torch.bfloat16``. Results stay exact either way; the dtype only moves time between the GEMM and
            the recompute.

    Returns:
        ``KNNResult(values, indices)``, values ascending: float64 if ``queries`` or ``bank`` is float64
        (searched exactly in float64), else float32. They are not differentiable: inputs that require grad are
        searched as if detached, and no autograd graph is recorded.

    Raises:
        ValueError: on shapes, dtypes, devices, ``k`` or ``backend`` that cannot work, NaN/Inf rows, or
            squared distances beyond the result dtype's range.

    Example:
        >>> bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
        >>> knn_distances(torch.tensor([[0.9, 0.0]]), bank, k=2)
        KNNResult(values=tensor([[0.0100, 0.8100]]), indices=tensor([[1, 0]]))

    On a device without float64 (Apple's MPS: :func:`lacks_float64`) the search runs on the CPU, exactly as
    there, and the results come back on the queries' device; float64 ones (a float64 bank) stay on the CPU.
    """
    on_host = [isinstance(t, Tensor) and lacks_float64(t.device) for t in (queries, bank)]
    if isinstance(queries, Tensor) and any(on_host):
        host_bank = bank.cpu() if on_host[1] else bank
        found = knn_distances(
            queries.cpu(), host_bank, k, backend, max_memory_bytes=max_memory_bytes, candidate_dtype=candidate_dtype
        )
        if found.values.dtype == torch.float64 and lacks_float64(queries.device):
            return found  # float64 distances cannot live on the queries' device
        return KNNResult(found.values.to(queries.device), found.indices.to(queries.device))
    _validate_inputs(queries, bank, k, backend, max_memory_bytes, candidate_dtype)
    queries, k = queries.detach(), operator.index(k)
    candidate_dtype = candidate_dtype or default_candidate_dtype(queries.device)
    # Under Trainer(precision="bf16-mixed") autocast would silently lower the GEMM below the precision the
    # error bound assumes; the search picks its own precisions.
    with torch.autocast(queries.device.type, enabled=False):
        if not isinstance(bank, PreparedBank):
            bank = prepare_bank(bank, candidate_dtype)
        else:
            bank = bank.with_candidate_dtype(candidate_dtype)
        dtype = torch.float64 if torch.float64 in (queries.dtype, bank.source.dtype) else torch.float32
        if queries.shape[0] == 0:
            empty = torch.empty(0, k, device=queries.device)
            return KNNResult(empty.to(dtype), empty.long())
        if backend == "auto":  # KeOps was slower at every shape measured on an H200 (RESULTS.md section 25)
            backend = "torch"
        if backend == "keops":
            if _keops_usable(queries.device, bank.shape[0]):
                return _keops_knn(queries, bank, k, max_memory_bytes or DEFAULT_MAX_MEMORY_BYTES, dtype)
        return _torch_knn(queries, bank, k, max_memory_bytes or DEFAULT_MAX_MEMORY_BYTES, dtype)


def brute_force_knn(queries: Tensor, bank: Tensor, k: int) -> KNNResult:
    """Reference kNN: full float64 distance matrix by differences. For tests and small inputs only."""
    q, b = queries.double(), bank.double()
    distances = ((q[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    values, indices = distances.topk(k, dim=1, largest=False, sorted=True)
    return KNNResult(values, indices)


# --------------------------------------------------------------------------------------------------
# validation and backend choice


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _result_dtype(dtype: torch.dtype) -> torch.dtype:
    return _work_dtype(dtype)


def _result_values(values: Tensor, dtype: torch.dtype, bank: PreparedBank) -> Tensor:
    """Exact float64 distances in the result dtype. In float32, distances below its normal range lose their
    precision or become 0. Between embeddings of ordinary size that is two rows nearly alike (float32 coordinates
    near 1 cannot differ by less than 1e-7), negligible; embeddings that small themselves would be scored on
    rounding (at 1e-24 every score was 0, an AUROC of 0.5): refused, as overflow is."""
    tiny = torch.finfo(torch.float32).tiny
    size = max(bank.max_norm / bank.scale, float(bank.center.double().norm()))  # spread, or offset of a 1-row bank
    if dtype != torch.float32 or values.dtype != torch.float64 or size**2 >= tiny * 2**24:
        return values.to(dtype)
    below = (values > 0) & (values < tiny)
    if bool(below.any()):
        raise ValueError(
            f"squared distances as small as {float(values[below].min()):.3g} lie below float32's normal range "
            f"({tiny:.3g}), where they lose precision or round to 0: the embeddings are too small. Rescale them "
            "(e.g. divide them by their largest norm) or pass float64 tensors."
        )
    return values.to(dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _row_norms64(rows: Tensor) -> Tensor:
    return torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64)


def _square(x: float) -> float:
    """``x * x``; inf where it overflows (Python's ``x ** 2`` raises OverflowError instead)."""
    return x * x


def squared_norms(rows: Tensor) -> Tensor:
    """``[N]`` squared norms of the rows of ``rows``, by chunks of 4 MiB (``vecdot`` of the whole bank makes a
    temporary of its size)."""
    step = max(1, 2**20 // max(1, rows.shape[1]))
    if len(rows) <= step:
        return torch.linalg.vecdot(rows, rows)
    return torch.cat([torch.linalg.vecdot(chunk, chunk) for chunk in rows.split(step)])


def float64_mean(rows: Tensor) -> Tensor:
    """float64 mean of the rows of ``rows``, summed by chunks of 8 MiB (``mean(dtype=float64)`` would first make
    a float64 copy of the whole bank: twice its size)."""
    step = max(1, 2**20 // max(1, rows.shape[1]))
    total = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
    for chunk in rows.split(step):
        total += chunk.sum(0, dtype=torch.float64)
    return total / rows.shape[0]


def _radius64(rows: Tensor, center: Tensor) -> float:
    """Largest float64 norm of ``rows - center`` (differences in float64, chunks of 32 MiB); 0 for no rows."""
    if not len(rows):
        return 0.0
    step = max(1, 2**22 // max(1, rows.shape[1]))
    center = center.double()
    return float(torch.stack([_row_norms64(c.double() - center).max() for c in rows.split(step)]).max())  # NaN stays


def _check_matrix(name: str, tensor: object) -> None:
    if not isinstance(tensor, Tensor) or tensor.ndim != 2:
        shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
        raise ValueError(f"`{name}` must be a 2-D tensor [rows, dim], got {shape}.")
    if tensor.dtype not in _INPUT_DTYPES:
        raise ValueError(
            f"`{name}` must be a floating tensor of dtype {', '.join(map(_dtype_name, _INPUT_DTYPES))}, got dtype "
            f"{_dtype_name(tensor.dtype)}. Convert it first (e.g. with .float())."
        )
    if tensor.shape[1] == 0:
        raise ValueError(
            f"`{name}` has feature dimension 0 (shape {tuple(tensor.shape)}): rows need at least one feature."
        )


def _check_finite(name: str, tensor: Tensor, offset: int = 0) -> None:
    bad = ~torch.isfinite(tensor).all(1)
    if bad.any():
        rows = bad.nonzero().flatten() + offset
        shown = ", ".join(str(r) for r in rows[:10].tolist()) + (", ..." if len(rows) > 10 else "")
        raise ValueError(
            f"`{name}` has {len(rows)} row(s) with NaN or Inf values (rows {shown}); every distance to them "
            "would be NaN. Drop or repair those rows (e.g. check the images or the extractor's precision)."
        )


def _validate_inputs(
    queries: Tensor,
    bank: Tensor | PreparedBank,
    k: int,
    backend: str,
    max_memory_bytes: int | None,
    candidate_dtype: torch.dtype | None,
) -> None:
    if backend not in KNN_BACKENDS:
        raise ValueError(f"knn_backend={backend!r} is not one of {list_knn_backends()}.")
    _check_matrix("queries", queries)
    if not isinstance(bank, PreparedBank):
        _check_matrix("bank", bank)
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"`queries` have dimension {queries.shape[1]} but the `bank` has {bank.shape[1]}: both must come "
            "from the same backbone."
        )
    if queries.device != bank.device:
        raise ValueError(f"`queries` are on {queries.device} but the `bank` is on {bank.device}.")
    n = bank.shape[0]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n:
        raise ValueError(f"k={k!r} must be an integer with 1 <= k <= bank size ({n}).")
    if max_memory_bytes is not None and (
        isinstance(max_memory_bytes, bool)
        or not isinstance(max_memory_bytes, numbers.Integral)
        or max_memory_bytes < 2**16
    ):
        raise ValueError(
            f"max_memory_bytes={max_memory_bytes!r} must be None (the default budget) or an integer >= 65536."
        )
    if candidate_dtype is not None and candidate_dtype not in _UNIT_ROUNDOFF:
        raise ValueError(f"candidate_dtype={candidate_dtype} must be one of {list(_UNIT_ROUNDOFF)}.")


# --------------------------------------------------------------------------------------------------
# torch backend


def _torch_knn(queries: Tensor, bank: PreparedBank, k: int, max_memory_bytes: int, dtype: torch.dtype) -> KNNResult:
    m, (n, dim) = queries.shape[0], bank.shape
    num_candidates = min(n, 2 * k + 8)
    low = bank.low.dtype
    tile = _GROUP_ROWS * bank.tile_groups if bank.tiled_rows else _GROUP_ROWS
    query_rows, bank_rows = _block_sizes(m, n, dim, num_candidates, max_memory_bytes, bank.device, low.itemsize, tile)
    planned = query_rows * (bank_rows * low.itemsize + _per_query_bytes(n, dim, num_candidates, low.itemsize))
    ensure_fits(planned, bank.device, "the kNN search's temporary buffers")
    buffer = torch.empty(query_rows, bank_rows, dtype=low, device=bank.device)
    error_scale = _gemm_error_scale(bank.low.shape[1], low, bank.device)
    values = torch.empty(m, k, dtype=dtype, device=bank.device)
    indices = torch.empty(m, k, dtype=torch.long, device=bank.device)
    for start in range(0, m, query_rows):
        block = queries[start : start + query_rows]
        # Outside the GEMM and top-k every step is small and latency-bound: on a CPU one thread does it
        # as fast, and never waits on a second one that the OS has descheduled.
        with _one_thread(bank.device):
            q, q_norms, far = _frame_queries(block, bank, dtype, start)
        with _full_precision_reductions(bank.device):
            approx, cand, group_mins = _gemm_candidates(q, q_norms, bank, num_candidates, buffer)
        with _one_thread(bank.device):
            search = _BlockSearch(block, q_norms, far, group_mins, bank, k, error_scale, max_memory_bytes)
            v, i = search.certify(approx, cand)
        values[start : start + len(block)] = _result_values(v, dtype, bank)
        indices[start : start + len(block)] = i
    return KNNResult(values, indices)


@dataclass
class _BlockSearch:
    """Certification of one query block's candidates, and the exact search of the rows it cannot certify."""

    queries: Tensor
    q_norms: Tensor
    far: Tensor
    group_mins: Tensor
    bank: PreparedBank
    k: int
    error_scale: float
    budget: int

    def certify(self, approx: Tensor, cand: Tensor) -> tuple[Tensor, Tensor]:
        """Exact k nearest neighbours (float64 values) of the block from its GEMM candidates."""
        bank = self.bank
        # A GEMM that overflowed (NaN or inf among the candidates or the group minima) certifies nothing and its
        # minima exclude nothing (NaN compares false): such rows are searched by differences.
        broken = ~torch.isfinite(approx).all(1) | ~torch.isfinite(self.group_mins).all(1)
        if broken.any():
            self.far = self.far | broken
            approx, cand = approx.masked_fill(broken[:, None], 0), cand.masked_fill(broken[:, None], 0)
        bound = _error_bound(self.error_scale, self.q_norms, bank.max_norm, bank.low)
        v, i, kth, uncertain = _certified_topk(self.queries, bank, approx, cand, bound, self.k, self.budget)
        uncertain |= self.far
        if uncertain.any():
            rows = uncertain.nonzero().flatten()
            near, out = rows[~self.far[rows]], rows[self.far[rows]]
            if len(near):
                v[near], i[near] = self.search_groups(near, bound[near], kth[near])
            if len(out):
                v[out], i[out] = _difference_scan(self.queries[out], bank, self.k, self.budget)
        return v, i

    def search_groups(self, rows: Tensor, bound: Tensor, kth: Tensor) -> tuple[Tensor, Tensor]:
        """Exact search of ``rows`` (block positions) over the bank groups that can still hold a row nearer
        than ``kth`` (an upper bound on each one's k-th distance): those whose smallest approximate distance
        minus the bound does not exceed it. The groups of the current k nearest always qualify."""
        n, g = self.bank.shape[0], _GROUP_ROWS
        limit = kth + bound - self.q_norms[rows].double()  # in the units of the group minima
        qualifies = self.group_mins[rows].double() <= limit[:, None]
        counts = qualifies.sum(1)
        widest = int(counts.max())
        # the candidates of a step of rows (their qualifying groups' members) are made per step: for all rows
        # at once they would take 17 bytes per row and bank row, beyond the budget on a large bank
        step = max(1, self.budget // (_BYTES_PER_PAIR * widest * g))
        values, indices = [], []
        for start in range(0, len(rows), step):
            part = slice(start, start + step)
            # qualifying groups first (stable), then their member rows, padded to the widest row
            groups = torch.argsort((~qualifies[part]).to(torch.uint8), dim=1, stable=True)[:, :widest]
            members = (groups[:, :, None] * g + torch.arange(g, device=rows.device)).flatten(1)
            valid = (torch.arange(widest, device=rows.device)[:, None] < counts[part, None, None]).expand(-1, -1, g)
            valid = valid.flatten(1) & (members < n)
            v, i = _exact_topk(
                self.queries[rows[part]], self.bank, members.clamp_max_(n - 1), valid, self.k, self.budget
            )
            values.append(v)
            indices.append(i)
        return torch.cat(values), torch.cat(indices)


@contextlib.contextmanager
def _full_precision_reductions(device: torch.device) -> Iterator[None]:
    """Forbid cuBLAS's reduced-precision (float16/bfloat16) split-K reductions for the candidate GEMM: the
    error bound assumes float32 accumulation. Restored afterwards; no-op off CUDA."""
    matmul = torch.backends.cuda.matmul
    names = ("allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")
    if device.type != "cuda":
        yield
        return
    before = {name: getattr(matmul, name) for name in names}
    for name in names:
        setattr(matmul, name, False)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(matmul, name, value)


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Run CPU work on one intra-op thread (restored afterwards); no-op on other devices."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _center(queries: Tensor, bank: PreparedBank) -> Tensor:
    """Queries in the bank's centred, scaled float32 frame. The difference is taken in the wider of the two
    dtypes (float64 queries stay float64 against a float32 centre), so that it rounds once relative to the
    centred value, as the error bound assumes; rounding a float64 query to float32 first would err by u ||q||.
    Rows too far out for float32 become inf (see :func:`_frame_queries`)."""
    return torch.sub(queries, bank.center).mul_(bank.scale).to(torch.float32)


def _frame_queries(
    queries: Tensor, bank: PreparedBank, dtype: torch.dtype, offset: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Centred, scaled float32 queries, their squared norms, and the rows too far out for the float32 GEMM
    (zeroed in the returned frame). Validates the block on the way, from the norms it needs anyway: NaN/Inf
    rows and squared distances beyond ``dtype``'s range raise (rows numbered from ``offset``)."""
    q = _center(queries, bank)
    q_norms = torch.linalg.vecdot(q, q)
    largest = float(q_norms.max()) if len(q) else 0.0  # NaN if any row has a NaN
    far = torch.zeros_like(q_norms, dtype=torch.bool)
    reach = _MAX_SCALED_SQUARED_NORM[bank.low.dtype]
    if not largest <= reach:
        far = ~(q_norms <= reach)  # NaN, inf (overflow of the frame) or just far
        _check_finite("queries", queries, offset)
    limit = torch.finfo(dtype).max
    radius = bank.max_norm / bank.scale
    worst = math.sqrt(largest) / bank.scale
    if not _square(worst + radius) * 1.01 <= limit:  # cheap screen; exact float64 norms decide
        norms = _row_norms64(queries.double() - bank.center.double())  # the float32 frame may overflow
        over = ((norms + radius) ** 2 > limit).nonzero().flatten()
        if len(over):
            worst = float(norms.max())
            shown = ", ".join(str(r) for r in (over[:10] + offset).tolist()) + (", ..." if len(over) > 10 else "")
            raise ValueError(
                f"`queries` rows {shown} lie up to {worst:.3g} from the bank's mean (bank radius {radius:.3g}), so "
                f"squared distances could reach {_square(worst + radius):.3g}, beyond {_dtype_name(dtype)}'s range "
                f"({limit:.3g}). Rescale queries and bank by the same factor (e.g. divide both by the bank's largest "
                "norm) or pass float64 tensors, which are searched and returned in float64."
            )
    if not largest <= reach:
        q, q_norms = q.masked_fill(far[:, None], 0), q_norms.masked_fill(far, 0)
    return q, q_norms, far


def _block_sizes(
    m: int,
    n: int,
    dim: int,
    num_candidates: int,
    budget: int,
    device: torch.device,
    itemsize: int = 4,
    tile: int = _GROUP_ROWS,
) -> tuple[int, int]:
    """Rows of queries and of the bank per block. The GEMM output block is one reused buffer of at most
    ``_GEMM_BUFFER_VALUES`` values and half of ``budget``; the block's group minima over the whole bank, its
    float64 copy for the recompute and the per-query candidates share the other half. Blocks smaller than the bank
    hold whole groups, and whole tiles of ``tile`` rows for a tiled operand (see ``_TILED_DEVICES``)."""
    kind = torch.device(device).type
    values = max(num_candidates, min(_GEMM_BUFFER_VALUES.get(kind, 2**27), budget // (2 * itemsize)))
    group = _GROUP_ROWS
    bank_rows = max(num_candidates, min(n, _MAX_BANK_BLOCK_ROWS.get(kind, 65536), values))
    bank_rows = min(n, -(-bank_rows // group) * group)  # whole groups, so that groups align across blocks
    if bank_rows < n and tile > group:  # whole tiles of a tiled operand (see _TILED_DEVICES)
        bank_rows = min(n, max(tile, bank_rows // tile * tile))
    query_rows = max(1, min(m, values // bank_rows, budget // (2 * _per_query_bytes(n, dim, num_candidates, itemsize))))
    return query_rows, bank_rows


def _per_query_bytes(n: int, dim: int, num_candidates: int, itemsize: int) -> int:
    """Temporaries per query of a block besides the GEMM output: its group minima over the whole bank, its
    float64 copy for the recompute, and its candidates' values, columns and group members."""
    return itemsize * -(-n // _GROUP_ROWS) + 16 * dim + 8 * num_candidates * (_GROUP_ROWS + 4)


def _gemm_error_scale(width: int, dtype: torch.dtype, device: torch.device) -> float:
    """Factor c with |approx - exact| <= c (||x|| + ||y||)^2 (plus :func:`_error_bound`'s absolute term) for the
    expansion computed in ``dtype`` over ``width`` GEMM columns.

    Centring and scaling round each coordinate once (2u relative to ||x|| ||y||), rounding the inputs to
    ``dtype`` costs 2u_in, a length-``width`` float32 accumulation gamma, the additions of the expansion 3u,
    and for float16/bfloat16 the output rounding u_in (|output| <= (||x|| + ||y||)^2) and the two-term norm
    u_in^2.
    """
    u = _UNIT_ROUNDOFF[torch.float32]
    u_in = _UNIT_ROUNDOFF[dtype] if dtype != torch.float32 else _float32_matmul_roundoff(device)
    gamma = (width + 2) * u / (1 - (width + 2) * u)
    low_output = 0.0 if dtype == torch.float32 else u_in + u_in**2
    return 1.01 * (2 * u + 2 * u_in + gamma + 3 * u + low_output)


def _float32_matmul_roundoff(device: torch.device) -> float:
    """Unit roundoff of a float32 GEMM's inputs under the user's settings: TF32 (``set_float32_matmul_precision
    ("high")`` on CUDA) keeps 11 bits, bfloat16 (``"medium"``, or any lowered mode on a CPU, where oneDNN
    uses AMX bf16) 8 bits."""
    # torch's per-backend settings, most specific first ("none" inherits from the next), then the legacy one
    backend = getattr(torch.backends, "cuda" if device.type == "cuda" else "mkldnn", None)
    settings = (getattr(backend, "matmul", None), backend, torch.backends)
    mode = next((m for m in (str(getattr(s, "fp32_precision", "none")) for s in settings) if m != "none"), "none")
    if mode == "none":
        try:
            mode = {"highest": "ieee", "high": "tf32"}.get(torch.get_float32_matmul_precision(), "bf16")
        except RuntimeError:  # legacy and per-backend settings mixed (e.g. only CUDA's set): assume the coarsest
            mode = "bf16"
    if mode == "ieee":
        return _UNIT_ROUNDOFF[torch.float32]
    return _TF32_UNIT_ROUNDOFF if mode == "tf32" and device.type == "cuda" else _UNIT_ROUNDOFF[torch.bfloat16]


def _error_bound(error_scale: float, q_norms: Tensor, max_norm: float, operand: Tensor) -> Tensor:
    """Per query, a bound on |approx - exact| for every bank row (scaled frame) whose approximations were
    computed from the bank ``operand`` (its width and dtype); float64. The absolute terms cover values below the
    normal range: float32 products flushed to zero, and the float16 inputs, norm terms and output that fall into
    its subnormals (absolute error up to half their spacing each)."""
    width = operand.shape[1]
    info = torch.finfo(operand.dtype)
    half_subnormal = info.tiny * info.eps / 2
    norms = q_norms.double().sqrt() + max_norm
    tiny = 4 * half_subnormal * (math.sqrt(width) * norms + width + 4)
    return error_scale * norms**2 + tiny + 8 * (width + 2) * 2.0**-126


def _gemm_candidates(
    q: Tensor, q_norms: Tensor, bank: PreparedBank, c: int, buffer: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The c smallest approximate distances (float64, ascending) and their bank rows, one bank block at a time,
    each GEMM written into ``buffer``; and every group's smallest ``||b||^2 - 2 q.b`` ``[queries, groups]``
    (the buffer's dtype) for re-searching the queries the candidates cannot certify."""
    low, n, group = bank.low, bank.shape[0], _GROUP_ROWS
    q_low = q if low.dtype == torch.float32 else _low_queries(q, low)
    group_mins = torch.empty(q.shape[0], -(-n // group), dtype=buffer.dtype, device=q.device)
    best_values = best_indices = None
    for start in range(0, n, buffer.shape[1]):
        block = low[start : start + buffer.shape[1]]
        out = buffer[: q.shape[0], : block.shape[0]]
        # ||q||^2 is constant along a row: rank by ||b||^2 - 2 q.b and add it to the c winners only
        if low.dtype == torch.float32:
            torch.addmm(bank.norms[None, start : start + block.shape[0]], q_low, block.T, alpha=-2, out=out)
        else:
            torch.mm(q_low, block.T, out=out)
        tiled = min(block.shape[0], max(0, bank.tiled_rows - start))
        mins, values, indices = _block_topk(out, c, group, tiled, bank.tile_groups)
        group_mins[:, start // group : start // group + mins.shape[1]] = mins
        if start:
            indices += start
            values, indices = torch.cat([best_values, values], 1), torch.cat([best_indices, indices], 1)
            values, pos = values.topk(c, dim=1, largest=False, sorted=False)
            indices = indices.gather(1, pos)
        best_values, best_indices = values, indices
    with _one_thread(q.device):
        values, order = (best_values.double() + q_norms.double()[:, None]).sort(dim=1)
        return values, best_indices.gather(1, order), group_mins


def _block_topk(out: Tensor, c: int, group: int, tiled: int = 0, tile_groups: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Group minima of one GEMM block ``[queries, rows]`` and its c smallest values with their columns (block
    rows); the block's first ``tiled`` rows are stored tiled, ``tile_groups`` groups per tile (``_TILED_DEVICES``).

    The c groups with the smallest minima hold the c smallest values (any other group's minimum is at least
    the c-th smallest of theirs), so the top-k runs over the minima and then over c * group values."""
    width = out.shape[1]
    parts = []
    if tiled:  # a tile's group t holds its columns t, t + tile_groups, ...: a reduction over a middle dimension
        parts.append(out[:, :tiled].unflatten(1, (-1, group, tile_groups)).amin(2).flatten(1))
    full = tiled + (width - tiled) // group * group
    if full > tiled:
        parts.append(out[:, tiled:full].unflatten(1, (-1, group)).amin(2))
    if full < width:
        parts.append(out[:, full:].amin(1, keepdim=True))
    mins = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    c = min(c, width)
    if mins.shape[1] <= c:  # small block: every column is a candidate
        values, positions = out.topk(c, dim=1, largest=False, sorted=False)
        return mins, values, _tiled_columns(positions, tiled, group, tile_groups)
    _, groups = mins.topk(c, dim=1, largest=False, sorted=False)
    columns = (groups[:, :, None] * group + torch.arange(group, device=out.device)).flatten(1)
    inside = columns < width
    positions = _tiled_positions(columns.clamp_max(width - 1), tiled, group, tile_groups)
    values = out.gather(1, positions).masked_fill_(~inside, math.inf)
    values, pos = values.topk(c, dim=1, largest=False, sorted=False)
    return mins, values, columns.gather(1, pos)


def _certified_topk(
    queries: Tensor, bank: PreparedBank, approx: Tensor, cand: Tensor, bound: Tensor, k: int, budget: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The exact top k among candidates ``cand`` whose ascending approximate distances ``approx`` (scaled frame)
    lie within ``bound`` of the exact ones: ``(values, indices, kth, uncertain)``, where ``kth`` bounds each
    query's k-th distance from above (scaled frame) and ``uncertain`` marks the queries for which a bank row
    outside the candidates could still be nearer."""
    # The k-th exact distance is at most approx_k + bound: candidates whose lower bound exceeds it are out.
    # Comparisons are written so that NaN (no bound at all) keeps a candidate and never certifies a query.
    keep = ~(approx - bound[:, None] > (approx[:, k - 1] + bound)[:, None])
    v, i = _exact_topk(queries, bank, cand, keep, k, budget)
    kth = v[:, -1] * bank.scale**2 * (1 + _exact_slack(queries, bank))  # with the recompute's own rounding
    # rows outside the candidates have approx >= approx_c, so exact >= approx_c - bound
    uncertain = ~(approx[:, -1] - bound > kth) if cand.shape[1] < bank.shape[0] else torch.zeros_like(kth).bool()
    return v, i, kth, uncertain | ~torch.isfinite(approx).all(1)  # an overflowed approximation bounds nothing


def _exact_topk(
    queries: Tensor, bank: PreparedBank, cand: Tensor, keep: Tensor, k: int, budget: int
) -> tuple[Tensor, Tensor]:
    """Exact distances (float64) for the kept candidates only; the k smallest per query, ascending (``keep``
    holds at least k per row). Rows whose k + 1 smallest include values too close for float32 differences
    to order are recomputed with float64 differences, so membership and order are exact."""
    rows, cols = keep.nonzero(as_tuple=True)
    exact = torch.full(keep.shape, math.inf, dtype=torch.float64, device=keep.device)
    chunk = min(_PAIR_CHUNK_BYTES.get(keep.device.type, 2**28), budget // 8)
    exact[rows, cols] = _pair_distances(queries, bank.source, rows, cand[rows, cols], chunk)
    if _pair_dtype(queries, bank.source) != torch.float64:
        top = exact.topk(min(k + 1, exact.shape[1]), dim=1, largest=False, sorted=True).values
        close = (top[:, 1:] <= top[:, :-1] * (1 + 2 * _exact_slack(queries, bank))).any(1)
        if close.any():
            rows, cols = (keep & close[:, None]).nonzero(as_tuple=True)
            exact[rows, cols] = _pair_distances(queries, bank.source, rows, cand[rows, cols], chunk, torch.float64)
    values, pos = exact.topk(k, dim=1, largest=False, sorted=True)
    return values, cand.gather(1, pos)


def _pair_distances(
    queries: Tensor,
    bank: Tensor,
    query_rows: Tensor,
    bank_rows: Tensor,
    chunk_bytes: int,
    work: torch.dtype | None = None,
) -> Tensor:
    """``||queries[query_rows[p]] - bank[bank_rows[p]]||^2`` squared and accumulated in float64, a chunk of
    pairs at a time whose float64 squares take ``chunk_bytes`` (never ``[queries, candidates, D]`` at once).
    Differences are taken in ``work`` (default float64 when either side is float64, exact; else float32,
    relative error <= 2^-22 per distance).
    A float32 difference squares exactly in float64; squared in float32 it could fall into float32's
    subnormals (below 2^-126), where the relative error is unbounded."""
    work = work or _pair_dtype(queries, bank)
    out = torch.empty(len(query_rows), dtype=torch.float64, device=queries.device)
    # rows per chunk: the float64 squares are the largest temporary
    step = max(1, chunk_bytes // (8 * queries.shape[1]))
    for start in range(0, len(query_rows), step):
        diff = torch.index_select(queries, 0, query_rows[start : start + step]).to(work)
        diff.sub_(torch.index_select(bank, 0, bank_rows[start : start + step]))
        torch.sum(diff.to(torch.float64).square_(), 1, out=out[start : start + step])
    return out


def _pair_dtype(queries: Tensor, bank: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (queries.dtype, bank.dtype) else torch.float32


def _exact_slack(queries: Tensor, bank: PreparedBank) -> float:
    """Relative error bound of :func:`_pair_distances` (a float32 difference rounds once, its square twice
    that; the float64 squares and sum add ``(D + 2) 2^-53`` each)."""
    dim = bank.shape[1]
    rounding = 0.0 if _pair_dtype(queries, bank.source) == torch.float64 else 4 * _UNIT_ROUNDOFF[torch.float32]
    return rounding + 4 * (dim + 2) * 2.0**-53


def _difference_scan(queries: Tensor, bank: PreparedBank, k: int, budget: int) -> tuple[Tensor, Tensor]:
    """kNN by float64 differences over the whole bank, for queries too far out for the float32 GEMM."""
    n = bank.shape[0]
    step = max(1, budget // (_BYTES_PER_PAIR * n))
    values, indices = [], []
    for start in range(0, len(queries), step):
        qs = queries[start : start + step]
        keep = torch.ones(len(qs), n, dtype=torch.bool, device=qs.device)
        cand = torch.arange(n, device=qs.device).expand_as(keep)
        v, i = _exact_topk(qs, bank, cand, keep, k, budget)
        values.append(v)
        indices.append(i)
    return torch.cat(values), torch.cat(indices)


# --------------------------------------------------------------------------------------------------
# KeOps backend


def keops_environment(world: int | None = None, global_rank: int | None = None) -> dict[str, str]:
    """Environment for importing pykeops: under DDP each rank gets its own compile cache.

    KeOps' cache folder (``KEOPS_CACHE_FOLDER``, default ``~/.cache/keops<version>``) has no lock, so ranks
    compiling the same formula at once race on it. With more than one process the folder becomes
    ``<folder>/rank<global rank>``; a single process keeps KeOps' own default. ``world`` and
    ``global_rank`` default to the running process group.
    """
    from dn2_lightning.distributed import process_rank, process_world

    env = dict(os.environ)
    world = process_world() if world is None else world
    if world <= 1 or (env.get("KEOPS_CACHE_FOLDER") and env.get("KEOPS_CACHE_FOLDER") == env.get("DN2_KEOPS_FOLDER")):
        return env
    global_rank = process_rank() if global_rank is None else global_rank
    base = env.get("KEOPS_CACHE_FOLDER") or os.path.join(os.path.expanduser("~"), ".cache", "keops")
    env["KEOPS_CACHE_FOLDER"] = env["DN2_KEOPS_FOLDER"] = os.path.join(base, f"rank{global_rank}")
    return env


def _import_keops_lazytensor() -> type:
    """Import pykeops lazily (importing it initialises CUDA), with the per-rank cache folder set first."""
    if "pykeops" not in sys.modules:
        os.environ.update(keops_environment())
    from pykeops.torch import LazyTensor

    return LazyTensor


def _keops_knn(queries: Tensor, bank: PreparedBank, k: int, budget: int, dtype: torch.dtype) -> KNNResult:
    """KeOps ranks the bank in float32 by ``sum((q - b)^2)`` in the bank's frame; its 2k + 8 best are certified
    like the torch backend's GEMM candidates, and the queries it cannot certify (near-ties that float32 cannot
    order, e.g. far from the bank) are searched again by the torch backend."""
    LazyTensor = _import_keops_lazytensor()  # noqa: N806 (the class)
    q, q_norms, far = _frame_queries(queries, bank, dtype, 0)
    n, dim = bank.shape
    rows = bank.frame_rows()
    x_i = LazyTensor(q[:, None, :].contiguous())
    y_j = LazyTensor(rows[None, :, :].contiguous())
    approx, cand = ((x_i - y_j) ** 2).sum(-1).Kmin_argKmin(K=min(n, 2 * k + 8), dim=1)
    # Frame rounding (u per coordinate of each side), the float32 difference, square and sum of D terms:
    # |approx - exact| <= (gamma_(D+3) + 2u) (||q|| + radius)^2, the same form as the GEMM's bound.
    u = _UNIT_ROUNDOFF[torch.float32]
    gamma = (dim + 3) * u / (1 - (dim + 3) * u)
    bound = _error_bound(1.01 * (gamma + 2 * u + 2 * u * u), q_norms, bank.max_norm, rows)
    v, i, _, uncertain = _certified_topk(queries, bank, approx.double(), cand.long(), bound, k, budget)
    uncertain |= far
    if uncertain.any():
        rows = uncertain.nonzero().flatten()
        v[rows], i[rows] = _torch_knn(queries[rows], bank, k, budget, torch.float64)
    return KNNResult(_result_values(v, dtype, bank), i)


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

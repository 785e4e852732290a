"""Every kNN backend against the float64 brute force."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist

from dn2_lightning.detector import DN2Detector
from dn2_lightning.knn import (
    brute_force_knn,
    keops_probe,
    knn_distances,
    list_knn_backends,
    merge_topk,
    prepare_bank,
)

KEOPS_OK = keops_probe("cpu") is None if os.environ.get("DN2_TEST_KEOPS", "1") == "1" else False
BACKENDS = ["torch", "auto"] + (["keops"] if KEOPS_OK else [])


def assert_exact(result, queries, bank, k, rtol=1e-5):
    """Values equal the float64 reference; indices point at rows with exactly those distances (ties may
    pick different rows)."""
    ref = brute_force_knn(queries, bank, k)
    scale = ref.values.abs().max().clamp_min(1e-12)
    assert result.values.shape == result.indices.shape == (queries.shape[0], k)
    assert result.indices.dtype == torch.int64
    assert ((result.values.double() - ref.values).abs() / scale).max() < rtol
    own = ((queries.double()[:, None, :] - bank.double()[result.indices]) ** 2).sum(-1)
    assert ((own - ref.values).abs() / scale).max() < rtol
    assert (result.values[:, 1:] >= result.values[:, :-1]).all()


def numpy_knn(queries, bank, k):
    """Independent reference: scipy's float64 squared distances (by differences), stable argsort; (values, indices)."""
    d = cdist(queries.double().numpy(), bank.double().numpy(), "sqeuclidean")
    indices = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, indices, 1), indices


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 7])
def test_random_data(backend, k):
    g = torch.Generator().manual_seed(k)
    bank, queries = torch.randn(500, 24, generator=g), torch.randn(64, 24, generator=g)
    assert_exact(knn_distances(queries, bank, k, backend), queries, bank, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_common_offset(backend):
    """1e3 + N(0, 1e-2): the naive ||x||^2 + ||y||^2 - 2xy expansion in float32 loses every digit."""
    g = torch.Generator().manual_seed(0)
    bank = 1e3 + 1e-2 * torch.randn(400, 32, generator=g)
    queries = 1e3 + 1e-2 * torch.randn(50, 32, generator=g)
    naive = (queries**2).sum(1, keepdim=True) + (bank**2).sum(1) - 2 * queries @ bank.T
    ref = brute_force_knn(queries, bank, 2)
    assert (naive.topk(2, largest=False).indices != ref.indices).any(), "the test data must defeat the naive way"
    result = knn_distances(queries, bank, 2, backend)
    assert torch.equal(result.indices, ref.indices)
    assert_exact(result, queries, bank, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_and_ties(backend):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(20, 8, generator=g)
    bank = torch.cat([base, base, base[:5]])  # every row at least twice
    queries = torch.cat([base[:10], torch.randn(10, 8, generator=g)])
    result = knn_distances(queries, bank, 3, backend)
    assert_exact(result, queries, bank, 3)
    assert (result.values[:10, :2] == 0).all()  # a query equal to a bank row has two zero-distance twins


def test_torch_memory_budget_forces_many_blocks():
    """A tiny budget splits queries and bank into many blocks; the result must not change."""
    g = torch.Generator().manual_seed(2)
    bank, queries = torch.randn(3000, 16, generator=g), torch.randn(300, 16, generator=g)
    small = knn_distances(queries, bank, 4, "torch", max_memory_bytes=2**16)
    big = knn_distances(queries, bank, 4, "torch")
    assert torch.equal(small.indices, big.indices)
    assert_exact(small, queries, bank, 4)


_PAIR_RECOMPUTE_PEAK = """
import resource, torch
import dn2_lightning.knn as knn
knn._PAIR_CHUNK_BYTES["cpu"] = knn._PAIR_CHUNK_BYTES["cuda"]  # the GPU's 256 MiB chunks, measurable on a CPU
g = torch.Generator().manual_seed(0)
bank, queries = torch.randn(20000, 256, generator=g), torch.randn(40, 256, generator=g)
queries[:20] *= 2.0**52  # too far for the float32 GEMM: searched by float64 differences over the whole bank
knn.knn_distances(queries[20:], bank, 2, "torch", max_memory_bytes=2**20)  # warm-up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
knn.knn_distances(queries, bank, 2, "torch", max_memory_bytes=2**20)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux only")
def test_the_float64_recompute_stays_within_max_memory_bytes():
    """The recompute's chunk was a fixed 256 MiB on CUDA whatever ``max_memory_bytes`` said: with a 1 MiB
    budget the peak grew by 300 MiB. It is now an eighth of the budget at most (run with the GPU's chunk size
    on the CPU, in a fresh process so that the peak resident size is this search's)."""
    run = subprocess.run(
        [sys.executable, "-c", _PAIR_RECOMPUTE_PEAK],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=True,
    )
    grown_mib = float(run.stdout.split()[-1])
    assert grown_mib < 32, f"a search with max_memory_bytes=1 MiB grew the peak resident memory by {grown_mib} MiB"


def test_candidates_of_several_bank_blocks_are_merged_with_their_own_rows(monkeypatch):
    """At max_memory_bytes=2**16 a GEMM block holds 8192 bank rows, so 20,000 rows take three blocks whose
    candidates are merged. Guards the merge: each block's columns offset by its start and concatenated in the
    same order as its values (a swapped order returned wrong rows; an offset one too far left 187 of 200
    queries uncertified and searched again)."""
    from dn2_lightning.knn import _block_sizes

    g = torch.Generator().manual_seed(30)
    bank, queries = torch.randn(20000, 16, generator=g), torch.randn(200, 16, generator=g)
    k = 3
    _, bank_rows = _block_sizes(200, 20000, 16, 2 * k + 8, 2**16, torch.device("cpu"))
    assert bank_rows * 2 < len(bank)  # at least three blocks
    seen = _count_pairs(monkeypatch)
    result = knn_distances(queries, bank, k, "torch", max_memory_bytes=2**16)
    values, indices = numpy_knn(queries, bank, k)
    np.testing.assert_array_equal(result.indices.numpy(), indices)
    np.testing.assert_allclose(result.values.double().numpy(), values, rtol=1e-6)
    assert seen["rescans"] == 0  # the merged candidates certify every query


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_candidates_stay_exact(dtype):
    """bf16/fp16 candidate search + exact refinement + certification = exact result."""
    g = torch.Generator().manual_seed(3)
    bank = 5 + torch.randn(2000, 64, generator=g)
    queries = 5 + torch.randn(200, 64, generator=g)
    result = knn_distances(queries, bank, 2, "torch", candidate_dtype=dtype)
    assert torch.equal(result.indices, brute_force_knn(queries, bank, 2).indices)
    assert_exact(result, queries, bank, 2)


def test_autocast_does_not_lower_the_search_precision():
    """Under Trainer(precision="bf16-mixed") the search runs inside autocast. The certification bound
    assumes the precision the search chose, so autocast must not silently lower its matmuls to bf16."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
                self.dtypes.update(a.dtype for a in args if isinstance(a, torch.Tensor))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(5)
    bank, queries = 5 + torch.randn(2000, 64, generator=g), 5 + torch.randn(200, 64, generator=g)
    seen = MatmulDtypes()
    with torch.autocast("cpu", dtype=torch.bfloat16), seen:
        result = knn_distances(queries, bank, 2, "torch")
    assert seen.dtypes == {torch.float32}
    assert torch.equal(result.indices, brute_force_knn(queries, bank, 2).indices)
    assert_exact(result, queries, bank, 2)


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_lowered_float32_matmul_precision_stays_exact(precision):
    """``set_float32_matmul_precision("medium")`` lets oneDNN (AMX) or cuBLAS run float32 GEMMs in bfloat16
    or TF32: the bound must widen with it, and the result stay exact."""
    g = torch.Generator().manual_seed(15)
    bank, queries = 5 + torch.randn(3000, 64, generator=g), 5 + torch.randn(300, 64, generator=g)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        result = knn_distances(queries, bank, 3, "torch")
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.equal(result.indices, brute_force_knn(queries, bank, 3).indices)
    assert_exact(result, queries, bank, 3)


@pytest.mark.parametrize("setting", [("cuda", "tf32"), ("mkldnn", "bf16"), ("mkldnn", "ieee")])
def test_per_backend_matmul_precision_settings_stay_exact(setting):
    """torch's per-backend API (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, common in training
    scripts even on a CPU) mixed with the legacy one made every search raise torch's "mix of the legacy and new
    APIs" error; the search must run, exact, under any of them."""
    g = torch.Generator().manual_seed(16)
    bank, queries = 5 + torch.randn(3000, 64, generator=g), 5 + torch.randn(300, 64, generator=g)
    matmul = getattr(getattr(torch.backends, setting[0]), "matmul", None)
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has no per-backend fp32_precision (added after 2.8)")
    before = matmul.fp32_precision
    matmul.fp32_precision = setting[1]
    try:
        result = knn_distances(queries, bank, 3, "torch")
        detector = DN2Detector(k=2).fit(bank[:500].numpy())
    finally:
        matmul.fp32_precision = before
    assert torch.equal(result.indices, brute_force_knn(queries, bank, 3).indices)
    assert_exact(result, queries, bank, 3)
    reference = ((bank[:500, None].double() - bank[None, :500].double()) ** 2).sum(-1)
    reference.fill_diagonal_(float("inf"))
    np.testing.assert_allclose(detector.decision_scores_, reference.sort(1).values[:, :2].mean(1).numpy(), rtol=1e-5)


@pytest.mark.parametrize("budget", [2**20, 64 * 2**20, 512 * 2**20])
def test_block_sizes_respect_the_memory_budget_for_a_million_row_bank(budget):
    """The issue's largest shape (1M x 10k x 2048): the GEMM block and the candidate buffers fit the budget."""
    import dn2_lightning.knn as knn
    from dn2_lightning.knn import _block_sizes

    n, m, dim, candidates = 1_000_000, 10_000, 2048, 8
    for device, itemsize in [("cpu", 4), ("cuda", 2), ("cuda", 4)]:
        query_rows, bank_rows = _block_sizes(m, n, dim, candidates, budget, torch.device(device), itemsize)
        assert 1 <= query_rows <= m and candidates <= bank_rows <= n
        distance_block = itemsize * query_rows * bank_rows
        group_minima = itemsize * query_rows * -(-n // knn._GROUP_ROWS)
        candidate_diffs = 4 * query_rows * candidates * dim
        assert distance_block + group_minima + candidate_diffs <= budget


def test_float64_inputs_are_accepted():
    g = torch.Generator().manual_seed(4)
    bank, queries = torch.randn(100, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    assert_exact(knn_distances(queries, bank, 3), queries, bank, 3)


def test_merge_topk_of_shards_equals_whole():
    g = torch.Generator().manual_seed(5)
    bank, queries = torch.randn(300, 6, generator=g), torch.randn(20, 6, generator=g)
    parts = [knn_distances(queries, shard, 3) for shard in bank.split(100)]
    merged = merge_topk([p.values for p in parts], [p.indices + 100 * i for i, p in enumerate(parts)], 3)
    whole = knn_distances(queries, bank, 3)
    assert torch.equal(merged.indices, whole.indices)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k=0"),
        ({"k": 11}, "k=11"),
        ({"k": 2.0}, "k=2.0"),
        ({"backend": "faiss"}, "knn_backend='faiss'"),
        ({"queries": torch.zeros(3, 4)}, "dimension 4"),
        ({"queries": torch.zeros(3, 5, dtype=torch.long)}, "floating"),
        ({"bank": torch.zeros(10)}, "2-D"),
        ({"max_memory_bytes": 10}, "max_memory_bytes"),
        # a string, a float, NaN: a TypeError deep in the search, or NaN taken as a budget (a review)
        ({"max_memory_bytes": "1000000"}, r"max_memory_bytes='1000000' must be None .* or an integer >= 65536"),
        ({"max_memory_bytes": 1e6}, r"max_memory_bytes=1000000.0 must be"),
        ({"max_memory_bytes": float("nan")}, r"max_memory_bytes=nan must be"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, match):
    args = {"queries": torch.zeros(3, 5), "bank": torch.zeros(10, 5), "k": 2, "backend": "torch"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        knn_distances(args.pop("queries"), args.pop("bank"), args.pop("k"), args.pop("backend"), **args)
    knn_distances(torch.zeros(3, 5), torch.zeros(10, 5), np.int64(2), max_memory_bytes=np.int64(2**20))  # NumPy ints


def test_backend_registry():
    assert list_knn_backends() == ["auto", "torch", "keops"]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 80),
    m=st.integers(1, 20),
    d=st.integers(1, 40),
    k_frac=st.floats(0, 1),
    offset=st.sampled_from([0.0, 1.0, 1e2, 1e3]),
    spread=st.sampled_from([1e-2, 1.0, 1e2]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_property_torch_backend_matches_brute_force(n, m, d, k_frac, offset, spread, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    bank = (offset + spread * torch.randn(n, d, generator=g)).to(dtype)
    queries = (offset + spread * torch.randn(m, d, generator=g)).to(dtype)
    k = 1 + int(k_frac * (n - 1))
    # float32 inputs: both sides see the same float32 numbers; tolerance covers float32 arithmetic
    assert_exact(knn_distances(queries, bank, k, "torch"), queries, bank, k, rtol=1e-4)


def test_keops_crash_is_contained_and_search_falls_back(monkeypatch):
    """A KeOps JIT that kills its process (as pykeops 2.3 does on CUDA 13) must not take the run with it."""
    import dn2_lightning.knn as knn

    monkeypatch.setattr(knn, "_PROBE", "import os; os.abort()")
    knn.keops_probe.cache_clear()
    try:
        assert knn.keops_probe("cpu") == "probe killed by signal 6"
        g = torch.Generator().manual_seed(6)
        bank, queries = torch.randn(100, 4, generator=g), torch.randn(10, 4, generator=g)
        with pytest.warns(UserWarning, match=r"KeOps is unusable on cpu \(probe killed by signal 6\)"):
            result = knn_distances(queries, bank, 2, "keops")
        assert_exact(result, queries, bank, 2)
    finally:
        knn.keops_probe.cache_clear()


def test_keops_probe_reports_a_failing_run_instead_of_raising():
    assert keops_probe("cuda:99").startswith("probe exited with code 1: ")  # no such device anywhere


def test_keops_cache_folder_is_per_rank_under_ddp(monkeypatch, tmp_path):
    """KeOps' compile cache has no lock: ranks must not share it (and a re-run must not nest folders)."""
    from dn2_lightning.knn import keops_environment

    monkeypatch.setenv("KEOPS_CACHE_FOLDER", str(tmp_path))
    monkeypatch.delenv("DN2_KEOPS_FOLDER", raising=False)
    assert keops_environment(world=1)["KEOPS_CACHE_FOLDER"] == str(tmp_path)
    folders = {keops_environment(world=4, global_rank=r)["KEOPS_CACHE_FOLDER"] for r in range(4)}
    assert folders == {str(tmp_path / f"rank{r}") for r in range(4)}
    env = keops_environment(world=4, global_rank=3)
    for name in ("KEOPS_CACHE_FOLDER", "DN2_KEOPS_FOLDER"):
        monkeypatch.setenv(name, env[name])
    assert keops_environment(world=4, global_rank=3)["KEOPS_CACHE_FOLDER"] == str(tmp_path / "rank3")
    monkeypatch.delenv("KEOPS_CACHE_FOLDER")
    monkeypatch.delenv("DN2_KEOPS_FOLDER")
    assert keops_environment(world=2, global_rank=0)["KEOPS_CACHE_FOLDER"].endswith("rank0")


# --------------------------------------------------------------------------------------------------
# the certified pruning path (issue 15): only candidates the bound cannot separate get exact distances


def _count_pairs(monkeypatch):
    """Spy on the float64 recompute: how many (query, bank row) distances the search computed exactly."""
    import dn2_lightning.knn as knn

    seen = {"pairs": 0, "rescans": 0}
    pair_distances, search_groups = knn._pair_distances, knn._BlockSearch.search_groups

    def counting_pairs(queries, bank, query_rows, bank_rows, *args):
        seen["pairs"] += len(query_rows)
        return pair_distances(queries, bank, query_rows, bank_rows, *args)

    def counting_search_groups(self, rows, *args):
        seen["rescans"] += len(rows)
        return search_groups(self, rows, *args)

    monkeypatch.setattr(knn, "_pair_distances", counting_pairs)
    monkeypatch.setattr(knn._BlockSearch, "search_groups", counting_search_groups)
    return seen


def test_pruning_path_recomputes_only_what_the_bound_cannot_separate(monkeypatch):
    """Clustered data: the k-th neighbour stands well apart from the rest, so the bound proves most of the
    2k + 8 candidates out and only about k per query are recomputed, yet the result is exact."""
    g = torch.Generator().manual_seed(7)
    centers = 10 * torch.randn(50, 64, generator=g)
    bank = centers.repeat(40, 1) + torch.randn(2000, 64, generator=g)
    queries = centers[torch.randint(0, 50, (300,), generator=g)] + torch.randn(300, 64, generator=g)
    seen = _count_pairs(monkeypatch)
    k = 3
    result = knn_distances(queries, bank, k, "torch")
    assert torch.equal(result.indices, brute_force_knn(queries, bank, k).indices)
    assert_exact(result, queries, bank, k)
    assert seen["rescans"] == 0
    assert k * 300 <= seen["pairs"] < 0.5 * (2 * k + 8) * 300  # candidates were cut by the bound


def test_near_ties_inside_the_bound_are_ordered_exactly(monkeypatch):
    """Rows whose distances differ by far less than the GEMM's error bound: all survive the pruning and the
    float64 recompute orders them. Distances 1 + j * 1e-6 in random directions, listed in reverse order."""
    g = torch.Generator().manual_seed(8)
    directions = torch.nn.functional.normalize(torch.randn(6, 256, generator=g, dtype=torch.float64), dim=1)
    radii = (1 + 1e-6 * torch.arange(6, 0, -1, dtype=torch.float64)).sqrt()
    far = 3 + torch.randn(200, 256, generator=g, dtype=torch.float64)
    bank = torch.cat([directions * radii[:, None], far]).float()
    queries = torch.zeros(1, 256)
    seen = _count_pairs(monkeypatch)
    result = knn_distances(queries, bank, 4, "torch")
    assert result.indices.tolist() == [[5, 4, 3, 2]]
    assert seen["pairs"] >= 6  # all six near-ties were recomputed
    assert_exact(result, queries, bank, 4, rtol=3e-7)  # float32 differences and output: <= 3 roundings


def test_near_ties_closer_than_float32_differences_resolve_are_reordered_from_float64():
    """200 bank rows at distance ~1 from the query, in random directions: their distances differ by less than
    the float32 differences' rounding, so float32 alone returns the wrong 10 nearest in the wrong order. Guards
    _exact_topk's near-tie test (recompute from float64 differences when neighbours lie within the rounding of
    each other), which a test for exact ties only skips."""
    g = torch.Generator().manual_seed(0)
    query = 0.3 * torch.rand(1, 64, generator=g, dtype=torch.float64)
    directions = torch.nn.functional.normalize(torch.randn(200, 64, generator=g, dtype=torch.float64), dim=1)
    bank = torch.cat([query + directions, query + 3 * directions[:100]]).float()
    query = query.float()
    k = 10
    values, indices = numpy_knn(query, bank, k + 1)
    assert (np.diff(values[0]) < 4 * 2.0**-24 * values[0, 1:]).any()  # within float32 differences' rounding
    result = knn_distances(query, bank, k, "torch")
    assert result.indices.tolist() == indices[:, :k].tolist()
    own = cdist(query.double().numpy(), bank.double().numpy()[result.indices[0].numpy()], "sqeuclidean")[0]
    assert (np.diff(own) > 0).all()  # ascending in float64
    np.testing.assert_allclose(result.values.double().numpy(), values[:, :k], rtol=1e-7)


def test_uncertified_queries_are_searched_again_over_every_row_the_bound_cannot_exclude(monkeypatch):
    """More near-equidistant rows than candidates: the last candidate cannot prove the rest of the bank out,
    so the query is searched again over every row the bound cannot exclude."""
    g = torch.Generator().manual_seed(9)
    shell = torch.nn.functional.normalize(torch.randn(100, 32, generator=g, dtype=torch.float64), dim=1)
    shell = shell * (1 + 1e-7 * torch.rand(100, 1, generator=g, dtype=torch.float64))
    bank = torch.cat([shell, 5 + torch.randn(400, 32, generator=g, dtype=torch.float64)]).float()
    queries = torch.cat([torch.zeros(1, 32), 5 + torch.randn(20, 32, generator=g)])
    seen = _count_pairs(monkeypatch)
    result = knn_distances(queries, bank, 2, "torch")
    assert seen["rescans"] >= 1
    assert torch.equal(result.indices, brute_force_knn(queries, bank, 2).indices)
    assert_exact(result, queries, bank, 2, rtol=3e-7)


def test_a_search_again_that_reaches_the_banks_last_partial_group_returns_each_row_once(monkeypatch):
    """The same shell at the end of a 500-row bank (not a multiple of the 32-row groups), its last row the nearest:
    the re-search pads the last group's slots with row 499, which must count once (a mutation that dropped the
    padding mask returned [499, 499, 499] unnoticed)."""
    g = torch.Generator().manual_seed(9)
    shell = torch.nn.functional.normalize(torch.randn(100, 32, generator=g, dtype=torch.float64), dim=1)
    shell = shell * (1 + 1e-7 * torch.rand(100, 1, generator=g, dtype=torch.float64))
    shell[-1] *= 1 - 1e-6
    bank = torch.cat([5 + torch.randn(400, 32, generator=g, dtype=torch.float64), shell]).float()
    queries = torch.zeros(1, 32)
    seen = _count_pairs(monkeypatch)
    result = knn_distances(queries, bank, 3, "torch")
    assert seen["rescans"] >= 1
    expected = brute_force_knn(queries, bank, 3).indices
    assert torch.equal(result.indices, expected) and expected[0, 0] == 499 and len(set(result.indices[0].tolist())) == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_search_is_exact_for_any_candidate_approximation_within_the_documented_bound(monkeypatch, seed):
    """Certification's contract, by fault injection: the candidate GEMM's approximations are replaced by the
    worst ones its error bound allows (the true k nearest pushed up by 0.9 of the bound, every other candidate
    down), the bound computed here from Higham's gamma_(D+2) + 7u (centring and the norm expansion). Real rounding
    stays far below the bound, so only this shows a prune window or a bound that is too narrow (dropping the
    bound's gamma term, or the window's lower side, each went unnoticed by every other test)."""
    import dn2_lightning.knn as knn

    g = torch.Generator().manual_seed(seed)
    dim, ties, k = 256, 12, 5  # more near-ties than k, fewer than the 2k + 8 candidates
    dirs = torch.nn.functional.normalize(torch.randn(ties, dim, generator=g, dtype=torch.float64), dim=1)
    radii = 1 + 1e-6 * torch.rand(ties, 1, generator=g, dtype=torch.float64)
    bank = torch.cat([dirs * radii, 4 + torch.randn(500, dim, generator=g, dtype=torch.float64)]).float()
    queries = torch.zeros(4, dim)
    truth = brute_force_knn(queries, bank, k).indices
    gemm_candidates = knn._gemm_candidates

    def worst_case(q, q_norms, prepared, c, buffer):
        values, cand, mins = gemm_candidates(q, q_norms, prepared, c, buffer)
        exact = ((q.double()[:, None, :] - prepared.frame_rows().double()[cand]) ** 2).sum(-1)
        u, width = 2.0**-24, prepared.low.shape[1]
        scale = (width + 2) * u / (1 - (width + 2) * u) + 7 * u
        bound = scale * (q_norms.double().sqrt() + prepared.max_norm) ** 2
        nearest = (cand[:, :, None] == truth[: len(q), None, :]).any(-1)
        values, order = (exact + torch.where(nearest, 0.9, -0.9) * bound[:, None]).sort(1)
        return values, cand.gather(1, order), mins

    monkeypatch.setattr(knn, "_gemm_candidates", worst_case)
    result = knn_distances(queries, bank, k, "torch", candidate_dtype=torch.float32)
    assert torch.equal(result.indices, truth)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_embeddings_are_certified_in_the_banks_scaled_frame(monkeypatch, dtype):
    """The same shell scaled by 1e-3: prepare_bank scales the bank up by 32, so distances in its frame are
    32**2 times the true ones. Guards the k-th exact distance's conversion into that frame (by scale**2): by
    scale alone it came out 32 times too small, and wrong neighbours were certified without a re-search."""
    g = torch.Generator().manual_seed(9)
    shell = torch.nn.functional.normalize(torch.randn(100, 32, generator=g, dtype=torch.float64), dim=1)
    shell = shell * (1 + 1e-7 * torch.rand(100, 1, generator=g, dtype=torch.float64))
    bank = (1e-3 * torch.cat([shell, 5 + torch.randn(400, 32, generator=g, dtype=torch.float64)])).float().to(dtype)
    queries = torch.zeros(1, 32, dtype=dtype)
    assert prepare_bank(bank).scale > 1
    seen = _count_pairs(monkeypatch)
    result = knn_distances(queries, bank, 2, "torch")
    values, indices = numpy_knn(queries, bank, 2)
    np.testing.assert_array_equal(result.indices.numpy(), indices)
    np.testing.assert_allclose(result.values.double().numpy(), values, rtol=1e-12 if dtype == torch.float64 else 1e-7)
    assert seen["rescans"] == 1  # the near-equidistant shell leaves the query to the re-search


@pytest.mark.skipif(not KEOPS_OK, reason="KeOps does not compile on this machine")
def test_keops_float32_ranking_is_certified_far_from_the_bank():
    """KeOps ranks by float32 sums: 1e3 to 1e5 bank radii out, neighbours whose distances differ by less than
    float32 resolves came back in the wrong order (6 of 50 queries) until its candidates were certified like the
    GEMM's and the uncertified queries searched again."""
    g = torch.Generator().manual_seed(3)
    bank = 1e3 + 1e-2 * torch.randn(500, 48, generator=g)
    center, radius = bank.mean(0), (bank - bank.mean(0)).norm(dim=1).max()
    directions = torch.nn.functional.normalize(torch.randn(10, 48, generator=g), dim=1)
    distances = torch.tensor([1e1, 1e3, 1e4, 3e4, 1e5])[:, None, None] * radius
    queries = (center + distances * directions).flatten(0, 1)
    result = knn_distances(queries, bank, 5, "keops")
    truth = brute_force_knn(queries, bank, 5)
    own = ((queries.double()[:, None, :] - bank.double()[result.indices]) ** 2).sum(-1)
    assert torch.equal(own, truth.values)  # the returned rows are the nearest, in float64
    assert torch.allclose(result.values.double(), truth.values, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_uncertified_queries_search_only_the_groups_that_can_hold_a_nearer_row(monkeypatch, dtype):
    """Issue 13: a query the candidates cannot certify is not re-searched over the whole bank, only over the
    row groups whose smallest approximate distance leaves room for a nearer row: here the 100 shell rows (and
    the groups they share), not the 3,900 far rows."""
    import dn2_lightning.knn as knn

    g = torch.Generator().manual_seed(9)
    shell = torch.nn.functional.normalize(torch.randn(100, 32, generator=g, dtype=torch.float64), dim=1)
    shell = shell * (1 + 1e-7 * torch.rand(100, 1, generator=g, dtype=torch.float64))
    bank = torch.cat([5 + torch.randn(1900, 32, generator=g, dtype=torch.float64), shell]).float()
    bank = torch.cat([bank, 5 + torch.randn(2000, 32, generator=g)])
    queries = torch.zeros(1, 32)
    seen = _count_pairs(monkeypatch)
    result = knn_distances(queries, bank, 2, "torch", candidate_dtype=dtype)
    assert seen["rescans"] == 1
    group = knn._GROUP_ROWS
    # the shell's groups (twice: these near-ties are reordered from float64 differences) and the candidates
    assert seen["pairs"] <= 2 * (100 + 2 * group) + 2 * (2 * 2 + 8) < len(bank) / 10
    assert torch.equal(result.indices, brute_force_knn(queries, bank, 2).indices)
    assert_exact(result, queries, bank, 2, rtol=3e-7)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 200),
    queries=st.integers(1, 6),
    c=st.integers(1, 12),
    group=st.sampled_from([1, 2, 3, 16, 32]),
    levels=st.integers(2, 50),
    seed=st.integers(0, 2**16),
)
def test_group_minima_select_the_same_smallest_values_as_a_full_topk(rows, queries, c, group, levels, seed):
    """The candidate stage's shortcut (top-k over group minima, then over the chosen groups' members) returns
    exactly the c smallest values of a block, ties and partial last groups included."""
    from dn2_lightning.knn import _block_topk

    g = torch.Generator().manual_seed(seed)
    out = torch.randint(0, levels, (queries, rows), generator=g).float()  # many ties
    mins, values, columns = _block_topk(out, c, group)
    c = min(c, rows)
    expected = out.topk(c, dim=1, largest=False).values
    assert torch.equal(values.sort(1).values, expected)
    assert torch.equal(out.gather(1, columns), values)
    assert len(set(columns[0].tolist())) == c  # distinct rows
    padded = torch.nn.functional.pad(out, (0, -rows % group), value=float("inf"))
    assert torch.equal(mins, padded.unflatten(1, (-1, group)).amin(2))


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_float16_candidates_are_exact_at_any_scale_and_offset(scale):
    """float16 holds 5 exponent bits: the bank is centred and scaled by a power of two first, small values
    round into float16's subnormals (covered by the bound), and queries too far out for its range are
    searched by differences."""
    g = torch.Generator().manual_seed(11)
    bank = scale * (1e3 + torch.randn(3000, 48, generator=g, dtype=torch.float64))
    bank[:, :8] *= 1e-6  # coordinates far below the rest: float16 subnormals
    queries = scale * (1e3 + torch.randn(100, 48, generator=g, dtype=torch.float64))
    queries[-2:] = scale * 1e3 + scale * 1e6 * torch.randn(2, 48, generator=g, dtype=torch.float64)  # far out
    bank, queries = bank.float(), queries.float()
    result = knn_distances(queries, bank, 3, "torch", candidate_dtype=torch.float16)
    assert_exact(result, queries, bank, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_float16_prepared_bank_keeps_no_float32_copy_and_switches_dtype_exactly(dtype):
    """On CUDA the bank's GEMM operand is float16: the float32 frame rows are not kept (the bank would otherwise
    take 2.5x its size on the device), are recomputed bit for bit when needed, and every dtype and backend
    searched from that bank stays exact."""
    g = torch.Generator().manual_seed(12)
    bank = (1e3 + torch.randn(1500, 40, generator=g, dtype=torch.float64)).to(dtype)
    queries = (1e3 + torch.randn(60, 40, generator=g, dtype=torch.float64)).to(dtype)
    low = prepare_bank(bank, torch.float16)
    full = prepare_bank(bank, torch.float32)
    assert low.rows is None and low.low.dtype == torch.float16 and low.shape == bank.shape
    assert torch.equal(low.frame_rows(), full.rows) and torch.equal(low.norms, full.norms)
    backends = ["torch"] + (["keops"] if KEOPS_OK else [])
    for backend in backends:
        for candidate in (torch.float16, torch.float32, torch.bfloat16):
            result = knn_distances(queries, low, 3, backend, candidate_dtype=candidate)
            assert_exact(result, queries, bank, 3, rtol=1e-6)


def test_the_default_candidate_dtype_is_float16_on_cuda_and_float32_elsewhere():
    from dn2_lightning.knn import default_candidate_dtype

    assert default_candidate_dtype(torch.device("cpu")) == torch.float32
    assert default_candidate_dtype(torch.device("cuda", 0)) == torch.float16
    assert prepare_bank(torch.randn(10, 4)).low.dtype == torch.float32


def test_far_float64_queries_are_searched_by_differences():
    """A float64 query 1e40 bank radii away would overflow the float32 GEMM: searched exactly anyway."""
    g = torch.Generator().manual_seed(10)
    bank = 1e-20 * torch.randn(300, 16, generator=g, dtype=torch.float64)
    queries = torch.cat([1e-20 * torch.randn(5, 16, generator=g, dtype=torch.float64), torch.full((2, 16), 1e20)])
    result = knn_distances(queries, bank, 3, "torch")
    assert result.values.dtype == torch.float64
    assert torch.equal(result.indices[:5], brute_force_knn(queries[:5], bank, 3).indices)
    assert_exact(result, queries, bank, 3, rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# issue 11: no silent wrong numbers


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_bank_rows_are_named_issue11(bad):
    bank = torch.randn(20, 4)
    bank[3, 1] = bank[17, 0] = bad
    for call in (lambda: knn_distances(torch.randn(5, 4), bank, 2), lambda: prepare_bank(bank)):
        with pytest.raises(ValueError, match=r"`bank` has 2 row\(s\) with NaN or Inf values \(rows 3, 17\)"):
            call()


def test_non_finite_query_rows_are_named_issue11():
    queries = torch.randn(6000, 4)
    queries[4100, 2] = float("nan")  # in the second query block: the row number must still be global
    queries[5, 0] = float("inf")
    with pytest.raises(ValueError, match=r"`queries` has 1 row\(s\) with NaN or Inf values \(rows 5\)"):
        knn_distances(queries, torch.randn(50, 4), 2, max_memory_bytes=2**20)
    queries[5, 0] = 0
    with pytest.raises(ValueError, match=r"rows 4100\)"):
        knn_distances(queries, torch.randn(50, 4), 2, max_memory_bytes=2**20)


def test_float32_squared_distances_beyond_range_are_refused_issue11():
    """x 1e19: squared distances ~1e39 do not fit float32 (they used to come back as inf with wrong rows)."""
    g = torch.Generator().manual_seed(11)
    bank, queries = 1e19 * torch.randn(50, 8, generator=g), 1e19 * torch.randn(5, 8, generator=g)
    with pytest.raises(ValueError, match=r"`bank` rows lie up to .* float32's range .*Rescale"):
        knn_distances(queries, bank, 2)
    small_bank = torch.randn(50, 8, generator=g)  # the bank fits, the queries are too far from it
    with pytest.raises(ValueError, match=r"`queries` rows 0, 1, 2, 3, 4 lie up to .*float32's range.*Rescale"):
        knn_distances(queries, small_bank, 2)


def test_float64_beyond_float32_range_is_exact_issue11():
    g = torch.Generator().manual_seed(12)
    bank = 1e19 * torch.randn(300, 8, generator=g, dtype=torch.float64)
    queries = 1e19 * torch.randn(40, 8, generator=g, dtype=torch.float64)
    result = knn_distances(queries, bank, 2)
    ref = brute_force_knn(queries, bank, 2)
    assert result.values.dtype == torch.float64 and torch.isfinite(result.values).all()
    assert torch.equal(result.indices, ref.indices)
    assert_exact(result, queries, bank, 2, rtol=1e-12)


def test_float64_input_is_searched_in_float64_issue11():
    """Rows that differ only below float32's resolution: float64 input must tell them apart (float32 cannot:
    both round to the same numbers)."""
    g = torch.Generator().manual_seed(13)
    bank = torch.cat(
        [
            torch.tensor([[1 + 2e-10, 0.0, 0.0], [1 + 1e-10, 0.0, 0.0]], dtype=torch.float64),
            3 + torch.randn(100, 3, generator=g, dtype=torch.float64),
        ]
    )
    assert torch.equal(bank[0].float(), bank[1].float())
    queries = torch.zeros(1, 3, dtype=torch.float64)
    result = knn_distances(queries, bank, 2)
    assert result.values.dtype == torch.float64
    assert result.indices.tolist() == [[1, 0]]
    assert result.values[0].tolist() == [(1 + 1e-10) ** 2, (1 + 2e-10) ** 2]


def test_mixed_float32_queries_and_float64_bank_return_float64_issue11():
    g = torch.Generator().manual_seed(14)
    bank, queries = torch.randn(100, 6, generator=g, dtype=torch.float64), torch.randn(9, 6, generator=g)
    result = knn_distances(queries, bank, 3)
    assert result.values.dtype == torch.float64
    assert_exact(result, queries, bank, 3, rtol=1e-12)
    assert knn_distances(queries, bank.float(), 3).values.dtype == torch.float32


@pytest.mark.parametrize("prepared", [False, True])
def test_zero_query_rows_give_empty_results_issue11(prepared):
    bank = torch.randn(10, 5)
    result = knn_distances(torch.zeros(0, 5), prepare_bank(bank) if prepared else bank, 3)
    assert result.values.shape == result.indices.shape == (0, 3)
    assert result.values.dtype == torch.float32 and result.indices.dtype == torch.int64


@pytest.mark.parametrize("bank", [torch.zeros(10), torch.zeros(2, 3, 4), [[0.0, 1.0]]])
def test_bank_must_be_a_matrix_issue11(bank):
    with pytest.raises(ValueError, match=r"`bank` must be a 2-D tensor \[rows, dim\]"):
        prepare_bank(bank)


# --------------------------------------------------------------------------------------------------
# fuzzer findings: exact means equal to a float64 brute force of the inputs as given


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_queries_against_a_float32_bank_are_centred_in_float64(backend):
    """A float64 query rounded to the float32 bank's dtype before centring moved by u * |q| (here 4 at 1e8, half
    the grid's spacing of 8), which the bound (rounding relative to |q - center|) does not cover: the 5th
    neighbour came back at 141.61 instead of 80.81."""
    grid = [[1e8 + 8 * a, 1e8 + 8 * b] for a in range(-12, 13) for b in range(-12, 13)]
    bank = torch.tensor(grid, dtype=torch.float32)
    queries = torch.tensor([[1e8 + 3.9, 1e8]], dtype=torch.float64)
    result = knn_distances(queries, bank, 5, backend)
    assert result.values.dtype == torch.float64
    assert torch.equal(result.values, brute_force_knn(queries, bank, 5).values)
    g = torch.Generator().manual_seed(21)
    bank = (1e6 + torch.randn(2000, 16, generator=g, dtype=torch.float64)).float()
    queries = 1e6 + torch.randn(100, 16, generator=g, dtype=torch.float64)
    result = knn_distances(queries, bank, 5, backend)
    assert torch.equal(result.indices, brute_force_knn(queries, bank, 5).indices)
    assert_exact(result, queries, bank, 5, rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 120),
    m=st.integers(1, 8),
    d=st.integers(1, 16),
    k_frac=st.floats(0, 1),
    offset=st.sampled_from([0.0, 1e4, 1e6, 1e8]),
    spread=st.sampled_from([1e-2, 1.0, 1e2]),
    candidate=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_property_float64_queries_and_float32_bank_match_brute_force(n, m, d, k_frac, offset, spread, candidate, seed):
    g = torch.Generator().manual_seed(seed)
    bank = (offset + spread * torch.randn(n, d, generator=g, dtype=torch.float64)).float()
    queries = offset + spread * torch.randn(m, d, generator=g, dtype=torch.float64)
    k = 1 + int(k_frac * (n - 1))
    result = knn_distances(queries, bank, k, "torch", candidate_dtype=candidate)
    assert result.values.dtype == torch.float64
    assert_exact(result, queries, bank, k, rtol=1e-12)


def test_float64_query_far_beyond_float32_range_of_a_float32_bank_is_searched():
    """A float64 query at 1e100 was cast to the float32 bank's dtype (inf) and refused; its squared distances
    (~4e200) fit float64, the result dtype."""
    g = torch.Generator().manual_seed(22)
    bank = torch.randn(100, 4, generator=g)
    queries = torch.cat([torch.full((1, 4), 1e100, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)])
    result = knn_distances(queries, bank, 2)
    assert result.values.dtype == torch.float64 and torch.isfinite(result.values).all()
    assert_exact(result, queries, bank, 2, rtol=1e-12)


@pytest.mark.parametrize("radius", [1e149, 1e152, 1e153])
def test_float64_banks_up_to_the_float64_range_fit_every_candidate_dtype(radius):
    """The bank's scaling factor was clamped at 2**-480, so above ~1e149 the float16 candidate rows overflowed to
    inf, the GEMM gave NaN, NaN passed as certified (inf returned at a wrong row) or padding columns came back as
    candidates (IndexError). Every candidate dtype must hold the rows up to float64's range."""
    torch.manual_seed(0)
    small = torch.randn(8, 4, dtype=torch.float64) * 1e152
    g = torch.Generator().manual_seed(23)
    bank = torch.randn(500, 6, generator=g, dtype=torch.float64) * (radius / 4)
    queries = torch.cat([bank[:20] + radius * 1e-10, radius * torch.randn(10, 6, generator=g, dtype=torch.float64)])
    for candidate in (torch.float16, torch.bfloat16, torch.float32):
        result = knn_distances(small.mean(0, keepdim=True), small, 1, "torch", candidate_dtype=candidate)
        assert_exact(result, small.mean(0, keepdim=True), small, 1, rtol=1e-12)
        result = knn_distances(queries, bank, 3, "torch", candidate_dtype=candidate)
        assert torch.equal(result.indices, brute_force_knn(queries, bank, 3).indices)
        assert_exact(result, queries, bank, 3, rtol=1e-12)


def test_distances_beyond_the_float64_range_are_refused_not_overflowed():
    """Python's float ** 2 raises OverflowError: squared distances past 1.8e308 must be named instead."""
    g = torch.Generator().manual_seed(24)
    with pytest.raises(ValueError, match=r"`bank` rows lie up to .* beyond float64's range"):
        knn_distances(torch.zeros(1, 6, dtype=torch.float64), 1e154 * torch.randn(50, 6, generator=g).double(), 2)
    bank = 1e150 * torch.randn(50, 6, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"`queries` rows 1 lie up to .* beyond float64's range"):
        knn_distances(torch.cat([bank[:1], bank[1:2] * 1e10]), bank, 2)


def test_overflowed_candidates_are_never_certified():
    """NaN (and inf) approximations compare false: they must leave a query uncertified and be searched exactly,
    never certify a wrong neighbour or hand padding columns on as candidates. A bank operand overflowed on
    purpose: row 7 gives NaN, row 300 +inf, for every query."""
    import dataclasses

    g = torch.Generator().manual_seed(25)
    bank = torch.randn(500, 8, generator=g)
    prepared = prepare_bank(bank, torch.float16)
    low = prepared.low.clone()
    low[7, 0] = float("nan")
    low[300, 0] = -float("inf") * torch.sign(prepared.frame_rows()[300, 0])  # -2 q.b = +inf near row 300
    broken = dataclasses.replace(prepared, low=low)
    queries = torch.cat([bank[[7, 300]] + 1e-3 * torch.randn(2, 8, generator=g), torch.randn(5, 8, generator=g)])
    for k in (1, 3):
        result = knn_distances(queries, broken, k, "torch", candidate_dtype=torch.float16)
        assert torch.equal(result.indices, brute_force_knn(queries, bank, k).indices)
        assert_exact(result, queries, bank, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_subnormal_squared_distances_are_ordered_exactly(backend):
    """float32 squares below 2**-126 are subnormal (relative error unbounded): 1.4718781e-39 and 1.4718777e-39
    came back in the wrong order. Squares are taken in float64. Beside a bank of ordinary size they are rows nearly
    alike, returned rounded to float32."""
    queries = torch.zeros(1, 2)
    bank = torch.tensor([[3.836506332521277e-20, 0.0], [2.712819275106922e-20, 2.712819275106922e-20], [1.0, 1.0]])
    assert knn_distances(queries, bank, 1, backend).indices.tolist() == [[1]]
    result = knn_distances(queries, bank, 2, backend)
    assert result.indices.tolist() == [[1, 0]]
    assert result.values.tolist() == brute_force_knn(queries, bank, 2).values.float().tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e-21, 1e-24])
def test_banks_too_small_for_float32_distances_are_refused(backend, scale):
    """A bank whose distances are all float32 subnormals was scored on rounding: at 1e-24 every distance came back
    0 (an AUROC of 0.5 where float64 gives 1.0), at 1e-21 with relative errors of 2e-4. Refused, with the fix;
    float64 input is exact, and 1e-18 (normal float32 distances) is still searched in float32."""
    g = torch.Generator().manual_seed(26)
    bank, queries = (
        torch.randn(400, 4, generator=g, dtype=torch.float64),
        torch.randn(40, 4, generator=g, dtype=torch.float64),
    )
    with pytest.raises(ValueError, match=r"below float32's normal range .* Rescale them .* float64"):
        knn_distances((scale * queries).float(), (scale * bank).float(), 3, backend)
    assert_exact(knn_distances(scale * queries, scale * bank, 3, backend), scale * queries, scale * bank, 3, 1e-12)
    small = knn_distances((1e-18 * queries).float(), (1e-18 * bank).float(), 3, backend)
    assert_exact(small, (1e-18 * queries).float(), (1e-18 * bank).float(), 3)
    with pytest.raises(ValueError, match=r"below float32's normal range"):
        DN2Detector(k=2).fit((scale * bank).float().numpy())
    # a bank of one row (or copies of one) has no spread: its size is its norm, here 1, so a query 1e-20 off it is
    # a row nearly alike, returned as float32's rounding (it was refused, "the embeddings are too small")
    one_row = torch.tensor([[1.0, 0.0]])
    nearly = knn_distances(torch.tensor([[1.0, 1e-20], [3.0, 0.0]]), one_row, 1, backend)
    assert nearly.values.flatten().tolist() == torch.tensor([1e-40, 4.0]).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_that_require_grad_are_searched_without_autograd(backend):
    g = torch.Generator().manual_seed(27)
    bank = torch.randn(200, 8, generator=g).requires_grad_()
    queries = torch.randn(20, 8, generator=g).requires_grad_()
    for searched in (bank, prepare_bank(bank)):
        result = knn_distances(queries, searched, 3, backend)
        assert not result.values.requires_grad
        assert_exact(result, queries.detach(), bank.detach(), 3)


def test_zero_feature_dimension_is_named():
    with pytest.raises(ValueError, match=r"`queries` has feature dimension 0 \(shape \(3, 0\)\)"):
        knn_distances(torch.empty(3, 0), torch.empty(5, 0), 2)
    with pytest.raises(ValueError, match=r"`bank` has feature dimension 0"):
        prepare_bank(torch.empty(5, 0))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_unsupported_dtypes_are_refused_by_name(dtype):
    supported = r"float64, float32, float16, bfloat16, got dtype"
    with pytest.raises(ValueError, match=rf"`queries` must be a floating tensor of dtype {supported}"):
        knn_distances(torch.randn(3, 4).to(dtype), torch.randn(5, 4).to(dtype), 2)
    with pytest.raises(ValueError, match=rf"`bank` must be a floating tensor of dtype {supported}"):
        knn_distances(torch.randn(3, 4), torch.randn(5, 4).to(dtype), 2)


def test_overflowing_float32_norms_report_the_real_radius():
    g = torch.Generator().manual_seed(28)
    bank = 1e20 * torch.randn(50, 8, generator=g)
    radius = (bank.double() - bank.double().mean(0)).norm(dim=1).max().item()
    with pytest.raises(ValueError, match=re.escape(f"`bank` rows lie up to {radius:.3g} from their mean")):
        knn_distances(torch.randn(2, 8), bank, 2)


def test_numpy_integer_k_is_accepted():
    import numpy as np

    from dn2_lightning.validation import check_k

    g = torch.Generator().manual_seed(29)
    bank, queries = torch.randn(50, 4, generator=g), torch.randn(5, 4, generator=g)
    for k in (np.int64(2), np.int32(2), np.uint8(2)):
        check_k(k)
        assert_exact(knn_distances(queries, bank, k), queries, bank, 2)
    for bad in (np.int64(0), True, np.float64(2.0), 2.0):
        with pytest.raises(ValueError, match=r"k=.* must be an integer"):
            check_k(bad)
        with pytest.raises(ValueError, match=r"k=.* must be an integer"):
            knn_distances(queries, bank, bad)

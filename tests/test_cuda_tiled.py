"""On a GPU (``pytest -m cuda``): test_cuda.py's exactness and budget tests again with the float16/bfloat16 GEMM
operand stored tiled (``knn._TILED_DEVICES``, off until a GPU run shows it faster), so that one GPU run checks the
tiled search on the device it is meant for before it is switched on there. Tiles of 32 x 4 rows, so that the
tests' banks of hundreds to thousands of rows are tiled with a tail; one test at the real tile size.

``DN2_TEST_DEVICE=cpu`` runs them on the CPU, as test_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
from test_cuda import (  # noqa: F401  (the tests are collected again in this module; pytestmark marks them cuda)
    DEVICE,
    check_exact,
    offset_data,
    pytestmark,
    reference,
    test_duplicates_ties_and_k_near_n_are_exact,
    test_far_queries_are_exact,
    test_large_offset_is_exact,
    test_tf32_and_high_matmul_precision_stay_exact,
    test_tiny_memory_budgets_give_the_default_budget_results,
)

import dn2_lightning.knn as knn
from dn2_lightning.knn import knn_distances, prepare_bank

TILE_GROUPS = 4
REAL_TILE_GROUPS = knn._TILE_GROUPS


@pytest.fixture(autouse=True, scope="module")
def tiled_operand():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(knn, "_TILED_DEVICES", ("cuda", "cpu"))
        patch.setattr(knn, "_TILE_GROUPS", TILE_GROUPS)
        yield


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_the_banks_here_are_tiled_with_a_tail(offset_data, dtype):  # noqa: F811 (the fixture above)
    _, bank, _ = offset_data
    prepared = prepare_bank(bank, dtype)
    tile = knn._GROUP_ROWS * TILE_GROUPS
    assert prepared.tiled_rows == len(bank) // tile * tile > 0 and prepared.tiled_rows < len(bank)
    assert prepare_bank(bank, torch.float32).tiled_rows == 0  # a float32 operand is never tiled


def test_the_real_tile_size_is_exact_over_several_tiles_and_a_tail(monkeypatch):
    monkeypatch.setattr(knn, "_TILE_GROUPS", REAL_TILE_GROUPS)
    tile = knn._GROUP_ROWS * REAL_TILE_GROUPS
    g = torch.Generator().manual_seed(5)
    centres = 3 * torch.randn(40, 64, generator=g)
    bank = centres[torch.randint(0, 40, (3 * tile + 100,), generator=g)] + torch.randn(3 * tile + 100, 64, generator=g)
    queries = torch.cat([bank[:: len(bank) // 150][:150] + 1e-3, centres[:40] + torch.randn(40, 64, generator=g)])
    bank, queries = bank.to(DEVICE), queries.to(DEVICE)
    prepared = prepare_bank(bank, torch.float16)
    assert prepared.tiled_rows == 3 * tile
    truth = reference(queries, bank, 2)
    # the default budget: the whole bank in one block on CUDA (blocks of 2 tiles on a CPU); 64 KiB: blocks of 2 tiles
    for budget in (knn.DEFAULT_MAX_MEMORY_BYTES, 2**16):
        result = knn_distances(queries, prepared, 2, "torch", max_memory_bytes=budget)
        check_exact(result, queries, bank, truth, f"real tiles, max_memory_bytes={budget} on {DEVICE}")

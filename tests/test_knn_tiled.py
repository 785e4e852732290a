"""The exact search with the tiled float16 operand (``_TILED_DEVICES``, meant for CUDA), checked on the CPU: every
test of test_knn.py again with float16 candidates and tiles of 32 x 4 rows (banks of 128 rows or more are tiled;
the validation tests and those on smaller banks run untiled, as they would on CUDA); then the tiling itself, on
banks of one tile up to many tiles and a tail."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_knn import *  # noqa: F403  (the tests are collected again in this module)

import dn2_lightning.knn as knn
from dn2_lightning.knn import brute_force_knn, knn_distances, prepare_bank

TILE_GROUPS = 4
TILE = knn._GROUP_ROWS * TILE_GROUPS

# these check the CPU's own default (float32 candidates), which this module replaces
del test_the_default_candidate_dtype_is_float16_on_cuda_and_float32_elsewhere  # noqa: F821
del test_autocast_does_not_lower_the_search_precision  # noqa: F821
# float32's bound: float16 candidates of these 64-d clusters are all searched again (as without tiles)
del test_pruning_path_recomputes_only_what_the_bound_cannot_separate  # noqa: F821


@pytest.fixture(autouse=True, scope="module")
def tiled_float16_operand_on_the_cpu():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(knn, "_TILED_DEVICES", ("cuda", "cpu"))
        patch.setattr(knn, "_TILE_GROUPS", TILE_GROUPS)
        patch.setattr(knn, "default_candidate_dtype", lambda device: torch.float16)
        yield


def test_the_operand_holds_every_row_at_its_tiled_position():
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(3 * TILE + 45, 12, generator=g)
    tiled = prepare_bank(bank, torch.float16)
    assert tiled.tiled_rows == 3 * TILE
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(knn, "_TILED_DEVICES", ())
        plain = prepare_bank(bank, torch.float16)
    assert plain.tiled_rows == 0
    rows = torch.arange(len(bank))
    assert tiled.tile_groups == TILE_GROUPS and plain.tile_groups == 0
    positions = knn._tiled_positions(rows, tiled.tiled_rows, knn._GROUP_ROWS, TILE_GROUPS)
    assert sorted(positions.tolist()) == rows.tolist()  # a permutation
    assert torch.equal(tiled.low[positions], plain.low)
    assert torch.equal(knn._tiled_columns(positions, tiled.tiled_rows, knn._GROUP_ROWS, TILE_GROUPS), rows)
    # group t of a tile: its 32 rows are 4 columns apart
    assert positions[:32].tolist() == [s * TILE_GROUPS for s in range(32)]


@settings(max_examples=40, deadline=None)
@given(
    tiles=st.integers(0, 3),
    tail=st.integers(0, 70),
    queries=st.integers(1, 5),
    c=st.integers(1, 12),
    levels=st.integers(2, 50),
    seed=st.integers(0, 2**16),
)
def test_block_topk_of_a_tiled_block_returns_the_smallest_values_by_bank_row(tiles, tail, queries, c, levels, seed):
    """The same block stored tiled or not: equal group minima, equal c smallest values, the same bank rows."""
    rows = tiles * TILE + tail
    if rows == 0:
        return
    g = torch.Generator().manual_seed(seed)
    plain = torch.randint(0, levels, (queries, rows), generator=g).float()  # many ties
    tiled = torch.empty_like(plain)
    tiled[:, knn._tiled_positions(torch.arange(rows), tiles * TILE, knn._GROUP_ROWS, TILE_GROUPS)] = plain
    mins, values, columns = knn._block_topk(tiled, c, knn._GROUP_ROWS, tiles * TILE, TILE_GROUPS)
    expected_mins, expected_values, _ = knn._block_topk(plain, c, knn._GROUP_ROWS)
    assert torch.equal(mins, expected_mins)
    assert torch.equal(values.sort(1).values, expected_values.sort(1).values)
    assert torch.equal(plain.gather(1, columns), values)  # columns are bank rows, not positions
    assert len(set(columns[0].tolist())) == min(c, rows)


@pytest.mark.parametrize("block_rows", [16384, 1100])
def test_blocks_of_whole_tiles_under_a_small_budget_stay_exact(block_rows, monkeypatch):
    """Several bank blocks (each whole tiles, the last one with the untiled tail) and several query blocks; blocks
    of 1,100 rows (1,120: whole groups) are cut down to whole tiles (1,024), else the minima could not be read."""
    monkeypatch.setattr(knn, "_MAX_BANK_BLOCK_ROWS", {"cpu": block_rows})
    budget = 2**16
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(300 * TILE + 19, 24, generator=g)
    queries = torch.randn(40, 24, generator=g)
    prepared = prepare_bank(bank)
    assert prepared.low.dtype == torch.float16 and prepared.tiled_rows == 300 * TILE
    _, bank_rows = knn._block_sizes(40, len(bank), 24, 12, budget, torch.device("cpu"), 2, TILE)
    assert bank_rows % TILE == 0 and 2 * bank_rows < len(bank) and bank_rows <= block_rows
    for k in (1, 5):
        result = knn_distances(queries, prepared, k, "torch", max_memory_bytes=budget)
        truth = brute_force_knn(queries, bank, k)
        assert torch.equal(result.indices, truth.indices)
        torch.testing.assert_close(result.values.double(), truth.values, rtol=1e-6, atol=0)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(TILE, 6 * TILE + 40),
    m=st.integers(1, 12),
    d=st.integers(1, 20),
    k_frac=st.floats(0, 1),
    levels=st.sampled_from([3, 1000]),
    duplicates=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_tiled_banks_match_brute_force(n, m, d, k_frac, levels, duplicates, seed):
    """Banks of one tile up to six and a tail: integer grids (ties everywhere) or fine ones, duplicated rows, k up
    to the whole bank (the "every column is a candidate" path of small blocks)."""
    g = torch.Generator().manual_seed(seed)
    bank = torch.randint(0, levels, (n, d), generator=g).float()
    if duplicates:
        bank[n // 2 :] = bank[: n - n // 2].clone()
    queries = torch.randint(0, levels, (m, d), generator=g).float()
    k = max(1, min(n, round(k_frac * n)))
    prepared = prepare_bank(bank)
    assert prepared.tiled_rows == n // TILE * TILE
    result = knn_distances(queries, prepared, k, "torch")
    truth = brute_force_knn(queries, bank, k)
    torch.testing.assert_close(result.values.double(), truth.values, rtol=1e-6, atol=0)
    found = ((queries[:, None, :].double() - bank[result.indices].double()) ** 2).sum(-1)
    torch.testing.assert_close(found, result.values.double(), rtol=1e-6, atol=0)  # the rows returned are that far

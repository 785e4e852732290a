"""Where the exact search's time goes on one shape: each step of the candidate stage on one GEMM block, timed
alone with CUDA events, and the kernels of a whole ``knn_distances`` call from torch's profiler.

    python benchmarks/knn_profile.py                       # 1M bank x 10k queries x 2048 (needs ~16 GB on a GPU)
    python benchmarks/knn_profile.py --shape 20000 500 64  # a smoke test, seconds on a CPU
    python benchmarks/knn_profile.py --shape 20000 500 64 --candidate_dtype float16  # and of the tiled operand
    python benchmarks/knn_profile.py --tile_groups 64 256 1024   # whole searches of three tile sizes
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator

import torch
from bench_args import at_least
from knn_bench import tiled_bank
from torch.profiler import ProfilerActivity, profile

import dn2_lightning.knn as knn


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 5) -> float:
    """Mean milliseconds of ``fn`` after one warm-up."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / repeats


def block_steps(q: torch.Tensor, rows: torch.Tensor, c: int, device: torch.device) -> list[tuple[str, float]]:
    """The candidate stage's steps on one query block x one bank block, each timed alone."""
    out = torch.empty(q.shape[0], rows.shape[0], dtype=rows.dtype, device=device)
    group = knn._GROUP_ROWS
    width = rows.shape[0] // group * group
    tile = group * knn._TILE_GROUPS
    tiled = rows.shape[0] // tile * tile  # as if the operand were tiled (knn._TILED_DEVICES)
    steps = {
        "GEMM into the buffer": lambda: torch.mm(q, rows.T, out=out),
        "group minima, consecutive rows (amin over the last dim)": lambda: (
            out[:, :width].unflatten(1, (-1, group)).amin(2)
        ),
        "group minima, strided rows (amin over a middle dim)": lambda: out[:, :width].unflatten(1, (group, -1)).amin(1),
        "group minima of a tiled block": lambda: out[:, :tiled].unflatten(1, (-1, group, knn._TILE_GROUPS)).amin(2),
        "top-k over every column": lambda: out.topk(c, dim=1, largest=False, sorted=False),
        "_block_topk (minima + top-k of groups + gather)": lambda: knn._block_topk(out, c, group),
        "_block_topk of a tiled block": lambda: knn._block_topk(out, c, group, tiled, knn._TILE_GROUPS),
    }
    return [(name, timed(fn, device)) for name, fn in steps.items()]


@contextlib.contextmanager
def tile_groups(groups: int) -> Iterator[None]:
    """Banks prepared inside are tiled ``groups`` groups per tile (``knn._TILE_GROUPS``)."""
    default, knn._TILE_GROUPS = knn._TILE_GROUPS, groups
    try:
        yield
    finally:
        knn._TILE_GROUPS = default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = {"nargs": 3, "default": [1_000_000, 10_000, 2048], "metavar": ("N", "M", "D")}
    parser.add_argument("--shape", type=at_least(1), **shape)
    parser.add_argument("--k", type=at_least(1), default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kernels", type=int, default=15, help="rows of the profiler's kernel table")
    parser.add_argument(
        "--tile_groups",
        type=at_least(1),
        nargs="+",
        default=[knn._TILE_GROUPS],
        help="groups per tile of the tiled operands to search (knn._TILE_GROUPS by default)",
    )
    parser.add_argument(
        "--candidate_dtype", choices=["float32", "float16", "bfloat16"], help="the GEMM's dtype (default: the device's)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    n, m, d = args.shape
    g = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, args.candidate_dtype) if args.candidate_dtype else None
    bank = knn.prepare_bank(torch.randn(n, d, device=device, generator=g).relu_(), dtype)
    queries = torch.randn(m, d, device=device, generator=g).relu_()
    c = min(n, 2 * args.k + 8)
    low = bank.low
    query_rows, bank_rows = knn._block_sizes(m, n, d, c, knn.DEFAULT_MAX_MEMORY_BYTES, device, low.itemsize)
    blocks = -(-m // query_rows) * -(-n // bank_rows)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {device} ({name}), torch {torch.__version__}")
    print(f"shape: bank {n:,} x queries {m:,} x D {d}, k={args.k}, candidates {c}, {low.dtype} GEMM")
    print(f"blocks: {query_rows} queries x {bank_rows} bank rows, {blocks} GEMM blocks per search\n")

    q = low[:query_rows].clone() if low.shape[0] >= query_rows else torch.randn(query_rows, low.shape[1], device=device)
    q = q.to(low.dtype)
    print("| step (one block) | ms per block | x blocks = ms per search |")
    print("|---|---:|---:|")
    for name, ms in block_steps(q, low[:bank_rows], c, device):
        print(f"| {name} | {ms:.3f} | {ms * blocks:.1f} |")

    # the tiled operand (knn._TILED_DEVICES, off by default until measured) against the default, whole searches
    searched = {"the default operand": bank}
    if low.dtype == torch.float32:
        print("\n(no tiled operand: a float32 GEMM operand is never tiled; pass --candidate_dtype float16)")
    else:
        for groups in args.tile_groups:
            with tile_groups(groups):
                searched[f"the tiled operand, {groups} groups per tile"] = tiled_bank(bank.source, device, low.dtype)
    for label, prepared in searched.items():
        total = timed(lambda p=prepared: knn.knn_distances(queries, p, args.k, "torch"), device, repeats=2)
        print(f"\nwhole knn_distances, {label} ({prepared.tiled_rows:,} rows tiled): {total:.1f} ms\n")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            knn.knn_distances(queries, prepared, args.k, "torch")
            if device.type == "cuda":
                torch.cuda.synchronize()
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.kernels, max_name_column_width=60))


if __name__ == "__main__":
    main()

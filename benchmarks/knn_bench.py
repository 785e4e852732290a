"""Exact top-k benchmark: every kNN backend against the GEMM lower bound, with exactness per row.

    python benchmarks/knn_bench.py                 # the issue's GPU shapes (needs a CUDA device)
    python benchmarks/knn_bench.py --preset cpu    # smaller shapes that finish on a laptop CPU

Prints a markdown table: median wall time over --repeats runs (after a warm-up), and exactness against
a float64 reference (exact top-k indices up to ties, max relative error of the values).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dn2_lightning.knn import KNNResult, keops_probe, knn_distances

PRESETS = {
    "gpu": [(6_000, 10_000, 1280), (60_000, 10_000, 2048), (1_000_000, 10_000, 2048)],
    "cpu": [(6_000, 1_000, 1280), (60_000, 1_000, 2048)],
}


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (and JIT compile for KeOps)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, out


def reference(queries: torch.Tensor, bank: torch.Tensor, k: int) -> KNNResult:
    """float64 top-k, block by block (exact differences would not fit; float64 GEMM on centred data is
    accurate to ~1e-12 relative here)."""
    center = bank.double().mean(0)
    b = bank.double() - center
    b_norms = (b * b).sum(1)
    values, indices = [], []
    for q in queries.split(1024):
        q = q.double() - center
        d = (q * q).sum(1, keepdim=True) + b_norms - 2 * q @ b.T
        v, i = d.topk(k, dim=1, largest=False)
        values.append(v)
        indices.append(i)
    return KNNResult(torch.cat(values), torch.cat(indices))


def exactness(result: KNNResult, ref: KNNResult) -> str:
    same = (result.indices == ref.indices).all(1).float().mean().item()
    err = ((result.values.double() - ref.values).abs() / ref.values.abs().clamp_min(1e-12)).max().item()
    return f"{100 * same:.2f}% rows, max rel err {err:.1e}"


def candidates(queries: torch.Tensor, bank: torch.Tensor, k: int, keops: bool, device: torch.device) -> dict:
    """The methods to time, each a no-argument callable returning a KNNResult."""
    methods = {
        "torch (float32 candidates)": lambda: knn_distances(queries, bank, k, "torch"),
        "torch (bfloat16 candidates)": lambda: knn_distances(queries, bank, k, "torch", candidate_dtype=torch.bfloat16),
        "cdist + topk (no exactness guarantee)": lambda: KNNResult(
            *torch.cdist(queries, bank).square().topk(k, dim=1, largest=False)
        ),
    }
    if keops and keops_probe(str(device)) is None:
        methods["keops"] = lambda: knn_distances(queries, bank, k, "keops")
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keops", action="store_true", help="include KeOps (probed in a subprocess first)")
    args = parser.parse_args()
    device = torch.device("cuda" if args.preset == "gpu" else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}, k={args.k}, median of {args.repeats}\n")
    print("| N bank | M queries | D | method | ms | exact (vs float64) |")
    print("|---:|---:|---:|---|---:|---|")
    for n, m, dim in PRESETS[args.preset]:
        g = torch.Generator(device=device).manual_seed(0)
        bank = torch.randn(n, dim, device=device, generator=g).relu_()  # post-ReLU-like features
        queries = torch.randn(m, dim, device=device, generator=g).relu_()
        ref = reference(queries, bank, args.k)
        low = torch.bfloat16 if device.type == "cuda" else torch.float32
        q_low, b_low = queries.to(low), bank.to(low)
        gemm_ms, _ = timed(lambda: q_low @ b_low.T, device, args.repeats)  # noqa: B023 (called right here)
        print(f"| {n:,} | {m:,} | {dim} | GEMM alone ({low}) — lower bound | {gemm_ms:.1f} | n/a |")
        methods = candidates(queries, bank, args.k, args.keops, device)
        for label, fn in methods.items():
            ms, out = timed(fn, device, args.repeats)
            print(f"| {n:,} | {m:,} | {dim} | {label} | {ms:.1f} | {exactness(out, ref)} |")


if __name__ == "__main__":
    main()

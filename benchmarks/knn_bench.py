"""Exact top-k benchmark: dn2's kNN against faiss, scikit-learn and plain torch, with exactness per row.

    python benchmarks/knn_bench.py --preset fashionmnist   # real FashionMNIST embeddings (64 px, D=1280), CPU
    python benchmarks/knn_bench.py --preset cpu            # synthetic shapes that finish on a laptop CPU
    python benchmarks/knn_bench.py                         # the issue's GPU shapes (needs a CUDA device)
    python benchmarks/knn_bench.py --preset fashionmnist --before old_knn.py   # also time an older knn.py

The ``fashionmnist`` preset searches the cached efficientnet_lite0 embeddings at 64 px (extracted on first
use by ``dn2_lightning.protocol.embed_split``): one class's 6,000 train rows as the bank x the 10,000 test
rows (one DN2 protocol step), and all 60,000 train rows x 2,000 test rows. Peers, in the same run and table:
faiss ``IndexFlatL2`` (if ``faiss`` is installed: ``pip install dn2-lightning[bench]``), scikit-learn's
brute-force ``NearestNeighbors``, ``torch.cdist`` + ``topk``, and the bare float32 GEMM (a lower bound for
any GEMM-based search). Banks and indexes are built outside the timed region (as a DN2 model holds them).

Prints a markdown table: best wall time over --repeats runs (after a warm-up); the share of dn2's time
spent after the candidate GEMM and top-k (the certification and float64 recompute); and exactness against
a float64 reference: the percentage of query rows whose k neighbours have exactly the reference distances
(ties may pick other rows), and the largest relative error of the returned distances.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import time
from collections.abc import Callable

import torch

import dn2_lightning.knn as knn
from dn2_lightning.knn import KNNResult, keops_probe, knn_distances, prepare_bank

SYNTHETIC = {
    "gpu": [(6_000, 10_000, 1280), (60_000, 10_000, 2048), (1_000_000, 10_000, 2048)],
    "cpu": [(6_000, 1_000, 1280), (60_000, 1_000, 2048)],
}


class StageClock:
    """Accumulates the wall time spent inside dn2's candidate stage (GEMM + top-k) of a module."""

    def __init__(self, module, device: torch.device) -> None:
        self.module, self.device, self.seconds = module, device, 0.0

    @contextlib.contextmanager
    def measuring(self):
        original = self.module._gemm_candidates

        def timed_candidates(*args, **kwargs):
            _sync(self.device)
            start = time.perf_counter()
            out = original(*args, **kwargs)
            _sync(self.device)
            self.seconds += time.perf_counter() - start
            return out

        self.module._gemm_candidates = timed_candidates
        try:
            yield self
        finally:
            self.module._gemm_candidates = original


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, repeats: int, clock: StageClock | None = None):
    """Best wall time (ms) of ``repeats`` runs after a warm-up, the output, and the candidate-stage share of
    that best run (when ``clock`` is given)."""
    out = fn()  # warm-up (and JIT compile for KeOps)
    best, share = float("inf"), None
    for _ in range(repeats):
        if clock is not None:
            clock.seconds = 0.0
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best = elapsed
            share = None if clock is None else 1 - clock.seconds / elapsed
    return best * 1e3, out, share


def reference(queries: torch.Tensor, bank: torch.Tensor, k: int) -> KNNResult:
    """float64 top-k, block by block (float64 GEMM on centred data is accurate to ~1e-12 relative here)."""
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


def exactness(result: KNNResult, ref: KNNResult, queries: torch.Tensor, bank: torch.Tensor) -> str:
    """Rows whose neighbours have the reference distances (float64 recomputed; ties may pick other rows)."""
    indices = torch.as_tensor(result.indices).long().to(bank.device)
    own = torch.cat(
        [
            ((q.double()[:, None, :] - bank.double()[i]) ** 2).sum(-1)
            for q, i in zip(queries.split(256), indices.split(256), strict=True)
        ]
    )
    own = own.sort(dim=1).values
    scale = ref.values.abs().clamp_min(1e-30)
    same = ((own - ref.values).abs() / scale <= 1e-9).all(1).float().mean().item()
    values = torch.as_tensor(result.values).double().to(bank.device)
    err = ((values - ref.values).abs() / scale).max().item()
    return f"{100 * same:.2f}% | {err:.1e}"


def load_before(path: str):
    """Import an older ``knn.py`` (e.g. ``git show main:dn2_lightning/knn.py > old_knn.py``) as a module."""
    spec = importlib.util.spec_from_file_location("dn2_knn_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def methods(
    queries: torch.Tensor, bank: torch.Tensor, k: int, keops: bool, device: torch.device, before
) -> dict[str, tuple[Callable[[], object], StageClock | None]]:
    """The methods to time: label -> (no-argument callable returning (values, indices), stage clock)."""
    prepared = prepare_bank(bank)
    clock = StageClock(knn, device)
    table = {
        "dn2 torch, bank prepared once": (lambda: knn_distances(queries, prepared, k, "torch"), clock),
        "dn2 torch, bank prepared per call": (lambda: knn_distances(queries, bank, k, "torch"), clock),
    }
    if device.type == "cuda":
        table["dn2 torch, bfloat16 candidates"] = (
            lambda: knn_distances(queries, prepared, k, "torch", candidate_dtype=torch.bfloat16),
            clock,
        )
    if before is not None:
        old_prepared = before.prepare_bank(bank)
        table["dn2 torch before (--before), bank prepared once"] = (
            lambda: before.knn_distances(queries, old_prepared, k, "torch"),
            StageClock(before, device),
        )
    if keops and keops_probe(str(device)) is None:
        table["dn2 keops"] = (lambda: knn_distances(queries, prepared, k, "keops"), None)
    with contextlib.suppress(ImportError):
        import faiss

        if device.type == "cpu":
            index = faiss.IndexFlatL2(bank.shape[1])
            index.add(bank.numpy())
            table["faiss IndexFlatL2"] = (lambda: index.search(queries.numpy(), k), None)
    if device.type == "cpu":
        from sklearn.neighbors import NearestNeighbors

        nn = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(bank.numpy())

        def sklearn_brute():
            distances, indices = nn.kneighbors(queries.numpy())
            return distances**2, indices

        table["scikit-learn brute"] = (sklearn_brute, None)
    table["torch.cdist + topk"] = (lambda: torch.cdist(queries, bank).square().topk(k, dim=1, largest=False), None)
    return table


def fashionmnist_cases() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    from dn2_lightning.protocol import embed_split

    train, train_labels = embed_split("fashionmnist", "train", input_size=64)
    test, _ = embed_split("fashionmnist", "test", input_size=64)
    one_class = train[train_labels == 0]
    return [
        ("FashionMNIST class 0 (6k) x test (10k)", one_class, test),
        ("FashionMNIST train (60k) x test[:2k]", train, test[:2000]),
    ]


def synthetic_cases(preset: str, device: torch.device) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    cases = []
    for n, m, dim in SYNTHETIC[preset]:
        g = torch.Generator(device=device).manual_seed(0)
        bank = torch.randn(n, dim, device=device, generator=g).relu_()  # post-ReLU-like features
        queries = torch.randn(m, dim, device=device, generator=g).relu_()
        cases.append(("synthetic ReLU(N(0,1))", bank, queries))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["fashionmnist", *sorted(SYNTHETIC)], default="gpu")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch, faiss and BLAS")
    parser.add_argument("--keops", action="store_true", help="include KeOps (probed in a subprocess first)")
    parser.add_argument("--before", default=None, help="path of an older knn.py to time in the same run")
    args = parser.parse_args()
    device = torch.device("cuda" if args.preset == "gpu" else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
        with contextlib.suppress(ImportError):
            import faiss

            faiss.omp_set_num_threads(args.threads)
    limits = contextlib.nullcontext()
    with contextlib.suppress(ImportError):
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(args.threads) if args.threads else limits
    before = load_before(args.before) if args.before else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}, torch {torch.__version__}, k={args.k}, best of {args.repeats}\n")
    print("| data | N bank | M queries | D | method | ms | after GEMM+top-k | exact rows | max rel err |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    cases = fashionmnist_cases() if args.preset == "fashionmnist" else synthetic_cases(args.preset, device)
    with limits:
        for label, bank, queries in cases:
            bank, queries = bank.to(device).contiguous(), queries.to(device).contiguous()
            n, dim, m = bank.shape[0], bank.shape[1], queries.shape[0]
            row = f"| {label} | {n:,} | {m:,} | {dim} |"
            ref = reference(queries, bank, args.k)
            gemm_ms, _, _ = timed(lambda: queries @ bank.T, device, args.repeats)  # noqa: B023 (called right here)
            print(f"{row} bare float32 GEMM (lower bound) | {gemm_ms:.0f} | | n/a | n/a |")
            for method, (fn, clock) in methods(queries, bank, args.k, args.keops, device, before).items():
                with clock.measuring() if clock is not None else contextlib.nullcontext():
                    ms, out, share = timed(fn, device, args.repeats, clock)
                result = KNNResult(torch.as_tensor(out[0]), torch.as_tensor(out[1]))
                share_text = "" if share is None else f"{100 * share:.0f}%"
                print(f"{row} {method} | {ms:.0f} | {share_text} | {exactness(result, ref, queries, bank)} |")


if __name__ == "__main__":
    main()

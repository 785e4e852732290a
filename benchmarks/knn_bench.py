"""Exact top-k benchmark: dn2's kNN against faiss, scikit-learn and plain torch, with exactness per row.

    python benchmarks/knn_bench.py --preset fashionmnist   # real FashionMNIST embeddings (64 px, D=1280), CPU
    python benchmarks/knn_bench.py --preset cpu            # synthetic shapes that finish on a laptop CPU
    python benchmarks/knn_bench.py --preset tiny --dtypes --keops --json /tmp/knn.json   # smoke test, seconds
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
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_args import at_least, require_device

import dn2_lightning.knn as knn
from dn2_lightning.knn import KNNResult, keops_probe, knn_distances, prepare_bank

SYNTHETIC = {
    # (bank rows, queries, dim); the 64-dim row is where KeOps' own guidance expects it to win (it lost there
    # too on an H200: RESULTS.md section 25)
    "gpu": [(1_000_000, 10_000, 2048), (60_000, 10_000, 2048), (6_000, 10_000, 2048), (200_000, 10_000, 64)],
    "cpu": [(6_000, 1_000, 1280), (60_000, 1_000, 2048)],
    "tiny": [(2_000, 200, 64)],  # a smoke test of every code path in seconds
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


class RescanCounter:
    """Counts the queries that dn2's candidates could not certify (searched again over their open groups)."""

    def __init__(self) -> None:
        self.rows = 0

    @contextlib.contextmanager
    def measuring(self):
        original = knn._BlockSearch.search_groups

        def counted(search, rows, *args):
            self.rows += len(rows)
            return original(search, rows, *args)

        knn._BlockSearch.search_groups = counted
        try:
            yield self
        finally:
            knn._BlockSearch.search_groups = original


@contextlib.contextmanager
def float32_matmul_precision(precision: str):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(
    fn: Callable[[], object],
    device: torch.device,
    repeats: int,
    clock: StageClock | None = None,
    warmup: Callable[[], object] | None = None,
):
    """Best wall time (ms) of ``repeats`` runs after a warm-up (``warmup``, default ``fn`` itself), the output,
    and the candidate-stage share of that best run (when ``clock`` is given)."""
    out = (warmup or fn)()  # warm-up (and JIT compile for KeOps)
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


def tiled_bank(bank: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float16) -> knn.PreparedBank:
    """The bank prepared with its ``dtype`` operand tiled (``knn._TILED_DEVICES``, off by default until measured)."""
    tiled_devices = knn._TILED_DEVICES
    knn._TILED_DEVICES = (*tiled_devices, device.type)
    try:
        return prepare_bank(bank, dtype)
    finally:
        knn._TILED_DEVICES = tiled_devices


def methods(
    queries: torch.Tensor, bank: torch.Tensor, k: int, keops: bool, device: torch.device, before, dtypes: bool
) -> dict[str, tuple[Callable[[], object], StageClock | None]]:
    """The methods to time: label -> (no-argument callable returning (values, indices), stage clock)."""
    prepared = prepare_bank(bank)
    clock = StageClock(knn, device)
    default = knn.default_candidate_dtype(device)
    table = {
        f"dn2 torch ({_name(default)} candidates), bank prepared once": (
            lambda: knn_distances(queries, prepared, k, "torch"),
            clock,
        ),
        "dn2 torch, bank prepared per call": (lambda: knn_distances(queries, bank, k, "torch"), clock),
    }
    if dtypes:
        for dtype in [d for d in (torch.float32, torch.float16, torch.bfloat16) if d != default]:
            table[f"dn2 torch, {_name(dtype)} candidates"] = (
                lambda dtype=dtype: knn_distances(queries, prepared, k, "torch", candidate_dtype=dtype),
                clock,
            )

        def tf32():
            with float32_matmul_precision("high"):
                return knn_distances(queries, prepared, k, "torch", candidate_dtype=torch.float32)

        table["dn2 torch, float32 candidates under TF32"] = (tf32, clock)
        tiled = tiled_bank(bank, device)
        table["dn2 torch, float16 candidates, tiled operand"] = (
            lambda: knn_distances(queries, tiled, k, "torch", candidate_dtype=torch.float16),
            clock,
        )
    if before is not None:
        old_prepared = before.prepare_bank(bank)
        table["dn2 torch before (--before), bank prepared once"] = (
            lambda: before.knn_distances(queries, old_prepared, k, "torch"),
            StageClock(before, device),
        )
    reason = keops_probe(str(device)) if keops else None
    if keops and reason is None:
        table["dn2 keops"] = (lambda: knn_distances(queries, prepared, k, "keops"), None)
        table["dn2 auto"] = (lambda: knn_distances(queries, prepared, k, "auto"), clock)
    elif keops:
        _note_once(f"KeOps rows left out: its probe failed ({reason})")
    try:
        import faiss
    except ImportError:
        _note_once("faiss rows left out: faiss is not installed (pip install 'dn2-lightning[bench]')")
    else:
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


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


def bare_gemms(
    queries: torch.Tensor, bank: torch.Tensor, device: torch.device, repeats: int, dtypes: bool
) -> dict[str, float]:
    """The GEMM alone (no top-k): the floor of any GEMM-based search, per dtype."""
    floors = {"float32": timed(lambda: queries @ bank.T, device, repeats)[0]}
    if dtypes:
        with float32_matmul_precision("high"):
            floors["TF32"] = timed(lambda: queries @ bank.T, device, repeats)[0]
        for dtype in (torch.float16, torch.bfloat16):
            q, b = queries.to(dtype), bank.to(dtype)
            floors[_name(dtype)] = timed(lambda q=q, b=b: q @ b.T, device, repeats)[0]
            del q, b
    return floors


_NOTED: set[str] = set()


def _note_once(text: str) -> None:
    """Say on stderr, once per run, why rows are missing from the table."""
    if text not in _NOTED:
        _NOTED.add(text)
        print(f"note: {text}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["fashionmnist", *sorted(SYNTHETIC)], default="gpu")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda for --preset gpu, else cpu)")
    parser.add_argument("--k", type=at_least(1), default=2)
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch, faiss and BLAS")
    parser.add_argument("--keops", action="store_true", help="include KeOps (probed in a subprocess first)")
    parser.add_argument("--before", default=None, help="path of an older knn.py to time in the same run")
    parser.add_argument("--json", default=None, help="also write every row of the table to this JSON file")
    parser.add_argument(
        "--dtypes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the other candidate dtypes and TF32 (default: on CUDA only)",
    )
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if args.preset == "gpu" else "cpu"))
    require_device(parser, device)
    if args.before is not None and not Path(args.before).is_file():
        parser.error(f"--before: no such file {args.before!r} (the path of an older knn.py)")
    dtypes = device.type == "cuda" if args.dtypes is None else args.dtypes
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
    print(f"device: {name}, torch {torch.__version__}, k={args.k}, best of {args.repeats}\n", flush=True)
    print("| data | N bank | M queries | D | method | ms | after GEMM+top-k | uncertified | exact rows | max rel err |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|", flush=True)
    rows = []
    cases = fashionmnist_cases() if args.preset == "fashionmnist" else synthetic_cases(args.preset, device)
    with limits:
        for label, bank, queries in cases:
            bank, queries = bank.to(device).contiguous(), queries.to(device).contiguous()
            n, dim, m = bank.shape[0], bank.shape[1], queries.shape[0]
            row = f"| {label} | {n:,} | {m:,} | {dim} |"
            common = {"data": label, "n": n, "m": m, "dim": dim, "k": args.k}
            ref = reference(queries, bank, args.k)

            def warm_keops(queries=queries, bank=bank, k=args.k):
                return knn_distances(queries[:64], bank, k, "keops")

            for dtype, ms in bare_gemms(queries, bank, device, args.repeats, dtypes).items():
                print(f"{row} bare {dtype} GEMM (lower bound) | {ms:.1f} | | | n/a | n/a |", flush=True)
                rows.append({**common, "method": f"bare {dtype} GEMM", "ms": ms})
            for method, (fn, clock) in methods(queries, bank, args.k, args.keops, device, before, dtypes).items():
                counter = RescanCounter()
                try:
                    with clock.measuring() if clock is not None else contextlib.nullcontext(), counter.measuring():
                        if method == "dn2 keops":  # compile on a few queries, then time one full call
                            ms, out, share = timed(fn, device, 1, clock, warm_keops)
                        else:
                            ms, out, share = timed(fn, device, args.repeats, clock)
                except torch.OutOfMemoryError as err:
                    print(f"{row} {method} | out of memory | | | | |", flush=True)
                    rows.append({**common, "method": method, "error": str(err).splitlines()[0]})
                    torch.cuda.empty_cache()
                    continue
                result = KNNResult(torch.as_tensor(out[0]), torch.as_tensor(out[1]))
                share_text = "" if share is None else f"{100 * share:.0f}%"
                calls = (1 if method == "dn2 keops" else args.repeats) + 1
                uncertified = 100 * counter.rows / (calls * m) if clock is not None else None
                unc_text = "" if uncertified is None else f"{uncertified:.2f}%"
                exact = exactness(result, ref, queries, bank)
                print(f"{row} {method} | {ms:.1f} | {share_text} | {unc_text} | {exact} |", flush=True)
                same, err = exact.split(" | ")
                rows.append(
                    {
                        **common,
                        "method": method,
                        "ms": ms,
                        "after_candidates_share": share,
                        "uncertified_rows_pct": uncertified,
                        "exact_rows": same,
                        "max_rel_err": float(err),
                    }
                )
                del out, result
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            del bank, queries, ref
    if args.json:
        meta = {"device": name, "torch": torch.__version__, "k": args.k, "repeats": args.repeats}
        with open(args.json, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

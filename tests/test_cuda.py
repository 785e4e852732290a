"""On a GPU (``pytest -m cuda``): the exact kNN for every backend and candidate dtype, memory budgets and TF32,
MemoryError before any allocation, and DN2Module fit/test/predict, bf16-mixed and checkpoints against the CPU.

Skipped where CUDA is unavailable. ``DN2_TEST_DEVICE=cpu`` runs the same checks on the CPU (the CUDA-only
memory checks skip), to validate the tests themselves on a machine without a GPU.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import traceback
import warnings

import numpy as np
import pytest
import torch
from helpers import BlobDataModule, linear_backbone, quiet_trainer
from lightning.pytorch.callbacks import Callback
from sklearn.metrics import roc_auc_score

from dn2_lightning import DN2Module
from dn2_lightning.knn import KNNResult, brute_force_knn, ensure_fits, keops_probe, knn_distances, prepare_bank

DEVICE = os.environ.get("DN2_TEST_DEVICE", "cuda")
if DEVICE not in ("cuda", "cpu"):
    raise ValueError(f"DN2_TEST_DEVICE={DEVICE!r} must be 'cuda' (default) or 'cpu'.")
ON_CUDA = DEVICE == "cuda"
ACCELERATOR = "gpu" if ON_CUDA else "cpu"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        ON_CUDA and not torch.cuda.is_available(),
        reason="needs a CUDA device (torch.cuda.is_available() is False; DN2_TEST_DEVICE=cpu runs these on the CPU)",
    ),
]
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="CUDA-only: checks free GPU memory (DN2_TEST_DEVICE=cpu)")

BACKENDS = ["torch", "auto", "keops"]
CANDIDATE_DTYPES = [None, torch.float32, torch.float16, torch.bfloat16]


def dtype_id(dtype: torch.dtype | None) -> str:
    return "default" if dtype is None else str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------
# helpers


def reference(queries: torch.Tensor, bank: torch.Tensor, k: int) -> KNNResult:
    """Float64 truth from differences (cdist without the matmul expansion; squaring its root costs <= 3 ulps),
    checked against the package's own brute force on the first queries."""
    q, b = queries.double(), bank.double()
    distances = torch.cdist(q, b, compute_mode="donot_use_mm_for_euclid_dist").square_()
    values, indices = distances.topk(k, dim=1, largest=False, sorted=True)
    brute = brute_force_knn(queries[:4], bank, k)
    assert torch.allclose(brute.values, values[:4], rtol=1e-13, atol=0), "the two float64 references disagree"
    return KNNResult(values, indices)


def check_exact(
    result: KNNResult,
    queries: torch.Tensor,
    bank: torch.Tensor,
    truth: KNNResult,
    what: str,
    rtol: float = 1e-5,
    tie_rtol: float = 1e-12,
) -> None:
    """Values equal the float64 truth (each to ``rtol``); the returned rows have exactly the truth's distances
    (to ``tie_rtol``: float64 summation order only; ties may pick other rows); ascending, distinct, int64, on
    the queries' device."""
    m, n = queries.shape[0], bank.shape[0]
    k = truth.values.shape[1]
    values, indices = result.values, result.indices
    want = torch.float64 if torch.float64 in (queries.dtype, bank.dtype) else torch.float32
    assert values.shape == indices.shape == (m, k), f"{what}: shapes {values.shape}, {indices.shape}, want {(m, k)}"
    assert values.dtype == want, f"{what}: values are {values.dtype}, want {want}"
    assert indices.dtype == torch.int64, f"{what}: indices are {indices.dtype}"
    assert values.device == indices.device == queries.device, f"{what}: results on {values.device}, {indices.device}"
    assert bool(((indices >= 0) & (indices < n)).all()), f"{what}: indices outside [0, {n})"
    assert bool((values[:, 1:] >= values[:, :-1]).all()), f"{what}: values not ascending"
    ordered = indices.sort(1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(1)
    assert not repeated.any(), f"{what}: rows {repeated.nonzero().flatten()[:5].tolist()} list a bank row twice"

    def fail(kind: str, bad: torch.Tensor, got: torch.Tensor) -> str:
        rows = bad.any(1).nonzero().flatten()
        r = int(rows[0])
        return (
            f"{what}: {kind}: {int(bad.sum())} of {bad.numel()} entries in {len(rows)} of {m} queries differ from "
            f"the float64 truth; first query {r}: got {got[r].tolist()} (indices {indices[r].tolist()}), truth "
            f"{truth.values[r].tolist()} (indices {truth.indices[r].tolist()})"
        )

    err = (values.double() - truth.values).abs()
    bad = err > rtol * truth.values.abs()
    assert not bad.any(), fail(f"values beyond rtol={rtol}", bad, values.double())
    own = ((queries.double()[:, None, :] - bank.double()[indices]) ** 2).sum(-1)
    bad = (own - truth.values).abs() > tie_rtol * truth.values.abs()
    assert not bad.any(), fail(f"the returned rows' true distances beyond rtol={tie_rtol}", bad, own)


def search(queries: torch.Tensor, bank, k: int, backend: str, **kwargs) -> KNNResult:
    """``knn_distances``; with ``backend="keops"`` where KeOps does not work here, its documented fallback to the
    torch backend with a UserWarning (and no such warning where it works)."""
    if backend != "keops":
        return knn_distances(queries, bank, k, backend, **kwargs)
    verdict = keops_probe(str(queries.device))  # the key the search itself probes with (cached per process)
    if verdict is not None:
        with pytest.warns(UserWarning, match="KeOps is unusable"):
            return knn_distances(queries, bank, k, backend, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = knn_distances(queries, bank, k, backend, **kwargs)
    fallbacks = [str(w.message) for w in caught if "KeOps is unusable" in str(w.message)]
    assert not fallbacks, f"keops_probe({str(queries.device)!r}) passed but the search fell back: {fallbacks}"
    return result


@pytest.fixture(scope="module")
def offset_data() -> tuple[torch.Tensor, torch.Tensor, KNNResult]:
    """1e3 + N(0, 1e-2) in D = 512: the float32 expansion ||q||^2 + ||b||^2 - 2 q.b loses every digit (norms ~5e8,
    distances ~0.1). A third of the queries are near copies of bank rows (distances ~5e-4), the rest sit among
    5,000 nearly equidistant rows (neighbours a hair apart)."""
    g = torch.Generator().manual_seed(0)
    bank = 1e3 + 1e-2 * torch.randn(5000, 512, generator=g)
    near = bank[torch.randperm(5000, generator=g)[:100]] + 1e-3 * torch.randn(100, 512, generator=g)
    queries = torch.cat([near, 1e3 + 1e-2 * torch.randn(200, 512, generator=g)])
    bank, queries = bank.to(DEVICE), queries.to(DEVICE)
    return queries, bank, reference(queries, bank, 5)


def top(truth: KNNResult, k: int) -> KNNResult:
    return KNNResult(truth.values[:, :k], truth.indices[:, :k])


# --------------------------------------------------------------------------------------------------
# 1. exactness of every backend and candidate dtype


def test_offset_data_defeats_the_naive_float32_expansion(offset_data):
    """The data are hard: the naive float32 GEMM expansion on this device gets most nearest neighbours wrong."""
    queries, bank, truth = offset_data
    naive = (queries * queries).sum(1, keepdim=True) + (bank * bank).sum(1) - 2 * queries @ bank.T
    wrong = (naive.argmin(1) != truth.indices[:, 0]).float().mean().item()
    assert wrong > 0.5, f"only {wrong:.0%} of naive nearest neighbours are wrong: the test data are too easy"


@pytest.mark.parametrize("dtype", CANDIDATE_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_offset_is_exact(offset_data, backend, dtype):
    queries, bank, truth = offset_data
    for k in (1, 2, 5):
        result = search(queries, bank, k, backend, candidate_dtype=dtype)
        check_exact(result, queries, bank, top(truth, k), f"{backend}/{dtype_id(dtype)} k={k} on {DEVICE}")
    if backend == "torch":  # a prepared bank, as DN2Module searches it
        prepared = prepare_bank(bank) if dtype is None else prepare_bank(bank, candidate_dtype=dtype)
        result = search(queries, prepared, 5, backend, candidate_dtype=dtype)
        check_exact(result, queries, bank, truth, f"prepared bank {dtype_id(dtype)} k=5 on {DEVICE}")


@pytest.mark.parametrize("dtype", CANDIDATE_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_ties_and_k_near_n_are_exact(backend, dtype):
    """(b) every bank row twice: a query's two nearest are the two copies, at equal distances; (c) exact ties:
    the bank holds 1e3 +/- 0.5 e_i (96 rows at distance exactly 0.25 from the centre, far more than the
    2k + 8 candidates) beside far rows; (d) k = N - 1 and k = N."""
    g = torch.Generator().manual_seed(1)
    kwargs = {"candidate_dtype": dtype}
    label = f"{backend}/{dtype_id(dtype)} on {DEVICE}"

    base = 1e3 + 1e-2 * torch.randn(150, 48, generator=g)
    bank = torch.cat([base, base])[torch.randperm(300, generator=g)]
    queries = torch.cat([base[:20], base[20:60] + 1e-4 * torch.randn(40, 48, generator=g)])
    bank, queries = bank.to(DEVICE), queries.to(DEVICE)
    truth = reference(queries, bank, 5)
    for k in (2, 5):  # few distinct k: KeOps compiles one kernel per (D, k)
        result = search(queries, bank, k, backend, **kwargs)
        check_exact(result, queries, bank, top(truth, k), f"duplicates {label} k={k}")
        first, second = result.indices[:, 0], result.indices[:, 1]
        assert torch.equal(bank[first], bank[second]), f"duplicates {label} k={k}: the two nearest are not copies"
        assert torch.equal(result.values[:, 0], result.values[:, 1]), (
            f"duplicates {label} k={k}: copies at different distances "
            f"{(result.values[:, 0] - result.values[:, 1]).abs().max().item():.3g}"
        )
        assert bool((result.values[:20, :2] == 0).all()), f"duplicates {label} k={k}: a query on a row is not at 0"

    signs = torch.cat([torch.eye(48), -torch.eye(48)])
    bank = torch.cat([1e3 + 0.5 * signs, 1e3 + 3 * torch.randn(400, 48, generator=g)])
    queries = torch.cat([torch.full((5, 48), 1e3), 1e3 + 0.05 * torch.randn(20, 48, generator=g)])
    bank, queries = bank.to(DEVICE), queries.to(DEVICE)
    truth = reference(queries, bank, 5)
    assert bool((truth.values[:5] == 0.25).all()), "the tie data are not exact ties"
    for k in (1, 5):
        result = search(queries, bank, k, backend, **kwargs)
        check_exact(result, queries, bank, top(truth, k), f"ties {label} k={k}")
        assert bool((result.values[:5] == 0.25).all()), f"ties {label} k={k}: {result.values[:5].tolist()}"

    bank = (1e3 + 1e-2 * torch.randn(60, 48, generator=g)).to(DEVICE)
    queries = (1e3 + 1e-2 * torch.randn(30, 48, generator=g)).to(DEVICE)
    truth = reference(queries, bank, 60)
    for k in (59, 60):
        result = search(queries, bank, k, backend, **kwargs)
        check_exact(result, queries, bank, top(truth, k), f"k near N {label} k={k}")


@pytest.mark.parametrize("dtype", CANDIDATE_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_far_queries_are_exact(backend, dtype):
    """Queries 10 to 1e5 bank radii out: float16 GEMM operands and outputs overflow beyond ~1.6e4 radii, and the
    neighbours' distances differ by as little as ~1e-10 relative (below float32's resolution: the order is
    float64's). KeOps ranks in float32 (rows ~1e-7 relative too far from 1e3 radii on, before its ranking was
    certified like the GEMM's)."""
    g = torch.Generator().manual_seed(3)
    bank = 1e3 + 1e-2 * torch.randn(500, 48, generator=g)
    center, radius = bank.mean(0), (bank - bank.mean(0)).norm(dim=1).max()
    directions = torch.nn.functional.normalize(torch.randn(10, 48, generator=g), dim=1)
    distances = torch.tensor([1e1, 1e3, 1e4, 3e4, 1e5])[:, None, None] * radius
    queries = (center + distances * directions).flatten(0, 1).to(DEVICE)
    bank = bank.to(DEVICE)
    truth = reference(queries, bank, 5)
    result = search(queries, bank, 5, backend, candidate_dtype=dtype)
    check_exact(
        result,
        queries,
        bank,
        truth,
        f"far queries (10 per 10, 1e3, 1e4, 3e4, 1e5 radii) {backend}/{dtype_id(dtype)} on {DEVICE}",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs_give_float64_results_to_1e_12(backend):
    g = torch.Generator().manual_seed(2)
    bank = 1e3 + 1e-2 * torch.randn(2000, 256, generator=g, dtype=torch.float64)
    bank = torch.cat([bank, bank[:100]]).to(DEVICE)  # duplicates too
    queries = torch.cat([bank[:50], 1e3 + 1e-2 * torch.randn(150, 256, generator=g, dtype=torch.float64).to(DEVICE)])
    truth = reference(queries, bank, 5)
    for dtype in CANDIDATE_DTYPES:
        result = search(queries, bank, 5, backend, candidate_dtype=dtype)
        check_exact(result, queries, bank, truth, f"float64 {backend}/{dtype_id(dtype)} on {DEVICE}", 1e-12, 1e-12)
    mixed = search(queries.float(), bank, 5, backend)  # float32 queries, float64 bank: float64 results
    check_exact(mixed, queries.float(), bank, reference(queries.float(), bank, 5), f"mixed {backend}", 1e-12, 1e-12)


# --------------------------------------------------------------------------------------------------
# 2. memory budgets and TF32


@pytest.mark.parametrize("dtype", CANDIDATE_DTYPES, ids=dtype_id)
def test_tiny_memory_budgets_give_the_default_budget_results(offset_data, dtype):
    queries, bank, truth = offset_data
    kwargs = {"candidate_dtype": dtype}
    default = knn_distances(queries, bank, 5, "torch", **kwargs)
    check_exact(default, queries, bank, truth, f"default budget {dtype_id(dtype)} on {DEVICE}")
    for budget in (2**16, 2**20):
        small = knn_distances(queries, bank, 5, "torch", max_memory_bytes=budget, **kwargs)
        check_exact(small, queries, bank, truth, f"max_memory_bytes={budget} {dtype_id(dtype)} on {DEVICE}")
        differ = (small.indices != default.indices).any(1)
        assert not differ.any(), (
            f"max_memory_bytes={budget} {dtype_id(dtype)}: queries {differ.nonzero().flatten()[:5].tolist()} get "
            "other neighbours than under the default budget"
        )
        torch.testing.assert_close(small.values, default.values, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_tf32_and_high_matmul_precision_stay_exact(offset_data, backend):
    queries, bank, truth = offset_data
    matmul = torch.backends.cuda.matmul
    before = torch.get_float32_matmul_precision(), matmul.allow_tf32
    modes = [
        (m, m.fp32_precision)
        for m in (matmul, getattr(torch.backends.mkldnn, "matmul", None))
        if hasattr(m, "fp32_precision")
    ]
    flags = ("allow_tf32", "allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")
    try:
        matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        for dtype in (None, torch.float32, torch.float16):
            user = {name: getattr(matmul, name) for name in flags if hasattr(matmul, name)}
            result = knn_distances(queries, bank, 5, backend, candidate_dtype=dtype)
            check_exact(result, queries, bank, truth, f"TF32 {backend}/{dtype_id(dtype)} on {DEVICE}")
            after = {name: getattr(matmul, name) for name in user}
            assert after == user, f"the search left the matmul flags changed: {user} -> {after}"
            assert torch.get_float32_matmul_precision() == "high", "the search changed the matmul precision"
    finally:
        torch.set_float32_matmul_precision(before[0])
        matmul.allow_tf32 = before[1]
        for module, mode in modes:
            module.fp32_precision = mode
    assert (torch.get_float32_matmul_precision(), matmul.allow_tf32) == before, "matmul settings not restored"


# --------------------------------------------------------------------------------------------------
# 3. MemoryError before any work


@cuda_only
def test_ensure_fits_raises_memory_error_naming_the_gib():
    device = torch.device(DEVICE, torch.cuda.current_device())
    cache = torch.empty(2**28, dtype=torch.uint8, device=device)  # 256 MiB that PyTorch keeps cached when freed
    del cache
    free, _ = torch.cuda.mem_get_info(device)
    reusable = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    assert reusable >= 2**28
    ensure_fits(free + reusable - 2**20, device, "a buffer that needs the cached memory")  # fits: no error
    with pytest.raises(MemoryError, match=r"searching x.*[0-9.]+ GiB"):
        ensure_fits(free + reusable + 2**30, device, "searching x")


@cuda_only
def test_a_bank_too_large_for_the_device_is_refused_before_allocating():
    """An 800 GB bank (an expanded view: 8 KB of real memory) must raise MemoryError up front, not run out of
    memory midway (torch.OutOfMemoryError) or allocate anything first."""
    bank = torch.zeros(1, 2048, device=DEVICE).expand(10**8, 2048)
    queries = torch.zeros(4, 2048, device=DEVICE)
    for name, call in [
        ("knn_distances", lambda: knn_distances(queries, bank, 2)),
        ("knn_distances(backend='torch')", lambda: knn_distances(queries, bank, 2, "torch")),
        ("prepare_bank", lambda: prepare_bank(bank)),
    ]:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            call()
        except MemoryError as err:
            assert "GiB" in str(err), f"{name}: the MemoryError does not name the size: {err}"
        except Exception as err:  # torch.OutOfMemoryError is a RuntimeError, not a MemoryError
            pytest.fail(f"{name} on an 800 GB bank raised {type(err).__name__} instead of MemoryError: {err}")
        else:
            pytest.fail(f"{name} accepted an 800 GB bank on a {torch.cuda.get_device_name()}")
        grown = torch.cuda.max_memory_allocated() - before
        assert grown < 2**20, f"{name} allocated {grown / 2**20:.1f} MiB before refusing the bank"


@cuda_only
def test_the_search_stays_near_max_memory_bytes():
    """Queries too far for the float32 GEMM go to the float64 recompute, whose chunk was a fixed 256 MiB on
    CUDA: a 16 MiB budget grew by about 384 MiB. Every temporary now follows the budget."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    bank = prepare_bank(torch.randn(20000, 256, device=DEVICE, generator=g))
    queries = torch.randn(400, 256, device=DEVICE, generator=g)
    queries[:200] *= 2.0**52
    budget = 2**24
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = knn_distances(queries, bank, 2, "torch", max_memory_bytes=budget)
    grown = torch.cuda.max_memory_allocated() - before
    check_exact(result, queries, bank.source, reference(queries, bank.source, 2), "far queries, 16 MiB budget")
    assert grown < 3 * budget, f"a search with a 16 MiB budget grew the allocated memory by {grown / 2**20:.0f} MiB"


# --------------------------------------------------------------------------------------------------
# 4, 5. DN2Module on the device


def blob_data() -> BlobDataModule:
    """The module tests' blobs with the anomalies 0.05 brighter still: a test AUROC near 0.97, not near chance."""
    dm = BlobDataModule()
    dm.test_images[dm.test_labels == 1] += 0.05
    return dm


def make_model(**kwargs) -> DN2Module:
    """DN2 with the tests' fixed linear backbone, 128-d ("auto" is the torch backend)."""
    return DN2Module(k=2, backbone=linear_backbone(seed=1, dim=128), **{"reports": False, **kwargs})


def independent_scores(model: DN2Module, dm: BlobDataModule) -> np.ndarray:
    """DN2 scores from float64 embeddings of the model's own backbone (on the CPU) and a float64 brute force."""
    backbone = copy.deepcopy(model.backbone).to("cpu", torch.float64)
    with torch.no_grad():
        train, test = backbone(dm.train_images.double()), backbone(dm.test_images.double())
    return brute_force_knn(test, train, 2).values.mean(1).numpy()


class BankAtTrainEnd(Callback):
    """The bank as fit leaves it on the device: Lightning's teardown moves the whole module back to the CPU at the
    end of trainer.fit (Strategy.teardown), and trainer.test moves it to the device again."""

    def on_train_end(self, trainer, pl_module) -> None:
        self.device, self.dtype = pl_module.bank.embeddings.device, pl_module.bank.embeddings.dtype


def test_module_fit_test_predict_on_the_device_match_the_cpu():
    dm = blob_data()
    cpu_model = make_model()
    cpu_trainer = quiet_trainer()
    cpu_trainer.fit(cpu_model, datamodule=dm)
    cpu_auroc = cpu_trainer.test(cpu_model, datamodule=dm)[0]["test/auroc"]

    # the reports (CSV, figures) read device tensors too; their figures need matplotlib (the `reports` extra)
    model = make_model(reports=importlib.util.find_spec("matplotlib") is not None)
    at_end = BankAtTrainEnd()
    trainer = quiet_trainer(accelerator=ACCELERATOR, callbacks=[at_end])
    trainer.fit(model, datamodule=dm)
    assert at_end.device.type == DEVICE, f"bank on {at_end.device} at the end of fit"
    assert len(model.bank) == len(dm.train_images)
    auroc = trainer.test(model, datamodule=dm)[0]["test/auroc"]
    scores = model.test_scores
    assert torch.equal(scores.indices.cpu(), torch.arange(len(dm.test_images)))
    np.testing.assert_allclose(
        scores.scores.cpu().numpy(), cpu_model.test_scores.scores.numpy(), rtol=1e-4, err_msg=f"{DEVICE} vs cpu"
    )
    np.testing.assert_allclose(scores.scores.cpu().numpy(), independent_scores(model, dm), rtol=1e-4)
    assert auroc == pytest.approx(cpu_auroc, abs=1e-3), f"test AUROC {auroc} on {DEVICE}, {cpu_auroc} on cpu"
    assert auroc > 0.9, f"test AUROC {auroc}: the anomalies were not found"
    assert float(model.threshold) == pytest.approx(float(cpu_model.threshold), rel=1e-4)

    out = trainer.predict(model, datamodule=dm)
    predicted = torch.cat([o["score"] for o in out]).cpu()
    assert torch.equal(torch.cat([o["index"] for o in out]).cpu(), torch.arange(len(dm.test_images)))
    assert predicted.shape == (len(dm.test_images),) and bool(torch.isfinite(predicted).all())
    torch.testing.assert_close(predicted, scores.scores.cpu(), rtol=1e-5, atol=0)
    torch.testing.assert_close(model.predict_scores.scores.cpu(), predicted, rtol=0, atol=0)


def test_bf16_mixed_on_the_device_scores_the_stored_embeddings_exactly():
    """Under precision="bf16-mixed" the backbone runs in bf16 (its outputs, hence the bank, are bf16 values),
    the AUROC stays near the float64 pipeline's, and the reported distances are the exact distances between
    the embeddings the module scored and the bank it stored."""
    dm = blob_data()
    model = make_model()
    at_end = BankAtTrainEnd()
    trainer = quiet_trainer(accelerator=ACCELERATOR, precision="bf16-mixed", callbacks=[at_end])
    trainer.fit(model, datamodule=dm)
    assert at_end.device.type == DEVICE and at_end.dtype == torch.float32, f"bank {at_end.dtype} on {at_end.device}"
    bank = model.bank.embeddings
    assert torch.equal(bank.bfloat16().float(), bank), "bf16-mixed did not run the backbone in bfloat16"

    seen: list[torch.Tensor] = []
    hook = model.backbone.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    try:
        auroc = trainer.test(model, datamodule=dm)[0]["test/auroc"]
    finally:
        hook.remove()
    embeddings = torch.cat(seen).to(bank.device)  # the test ran on the device; teardown moved the bank back
    scores = model.test_scores
    assert embeddings.shape[0] == len(dm.test_images), f"{embeddings.shape[0]} embeddings seen in test"
    assert torch.equal(scores.indices.cpu(), torch.arange(len(dm.test_images))), "test scores not in dataset order"

    truth = reference(embeddings, bank, 2)
    positions = torch.empty_like(model.bank.sample_indices)  # train index -> bank row
    positions[model.bank.sample_indices] = torch.arange(len(bank), device=bank.device)
    reported = KNNResult(scores.distances.to(bank.device), positions[scores.neighbours.to(bank.device)])
    check_exact(reported, embeddings, bank, truth, f"bf16-mixed module on {DEVICE}")
    torch.testing.assert_close(scores.scores.to(bank.device), reported.values.mean(1), rtol=1e-6, atol=0)

    reference_auroc = roc_auc_score(dm.test_labels.numpy(), independent_scores(model, dm))
    assert auroc == pytest.approx(reference_auroc, abs=0.02), f"bf16 AUROC {auroc} vs float64 {reference_auroc}"


def test_checkpoint_from_the_device_loads_on_the_device_and_the_cpu_with_the_same_scores(tmp_path):
    dm = blob_data()
    model = make_model()
    trainer = quiet_trainer(accelerator=ACCELERATOR, default_root_dir=tmp_path, enable_checkpointing=True)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm)
    expected = model.test_scores.scores.cpu()
    ckpt = trainer.checkpoint_callback.best_model_path
    assert ckpt, "no checkpoint saved after fit"

    for location in (DEVICE, "cpu"):
        # the backbone's weights come from the checkpoint, not from this differently seeded module
        restored = DN2Module.load_from_checkpoint(ckpt, map_location=location, backbone=linear_backbone(2, dim=128))
        assert restored.bank.embeddings.device.type == location, f"bank on {restored.bank.embeddings.device}"
        torch.testing.assert_close(restored.bank.embeddings.cpu(), model.bank.embeddings.cpu(), rtol=0, atol=0)
        assert float(restored.threshold) == pytest.approx(float(model.threshold), rel=1e-6)
        scored = restored.score_images(dm.test_images).scores
        np.testing.assert_allclose(scored.cpu().numpy(), expected.numpy(), rtol=1e-5, err_msg=f"loaded on {location}")
        accelerator = "cpu" if location == "cpu" else ACCELERATOR
        quiet_trainer(accelerator=accelerator).test(restored, datamodule=dm)
        np.testing.assert_allclose(
            restored.test_scores.scores.cpu().numpy(), expected.numpy(), rtol=1e-5, err_msg=f"test on {location}"
        )


# --------------------------------------------------------------------------------------------------
# 6. DN2Detector on device tensors


def test_detector_searches_device_tensors_on_their_device_like_scikit_learn():
    """CUDA tensors in, CUDA tensors out: the bank, scores and labels stay on the device, and equal
    scikit-learn's brute-force neighbours on the same rows (cleaning included)."""
    from sklearn.neighbors import NearestNeighbors

    from dn2_lightning import DN2Detector

    rng = np.random.default_rng(4)
    train = np.vstack([rng.normal(size=(400, 32)), rng.normal(loc=5.0, size=(20, 32))])  # 20 contaminants
    test = np.vstack([rng.normal(size=(100, 32)), rng.normal(loc=1.5, size=(50, 32))])
    detector = DN2Detector(k=2, clean_fraction=0.05, clean_k=30, threshold_quantile=0.95)
    detector.fit(torch.from_numpy(train).float().to(DEVICE))
    assert detector.bank_.device.type == DEVICE and not detector.kept_[400:].any()
    scores = detector.decision_function(torch.from_numpy(test).float().to(DEVICE))
    assert isinstance(scores, torch.Tensor) and scores.device.type == DEVICE
    kept = train[detector.kept_.cpu().numpy()].astype(np.float32)
    nn = NearestNeighbors(n_neighbors=2, algorithm="brute").fit(kept)
    expected = (nn.kneighbors(test.astype(np.float32))[0] ** 2).mean(1)
    np.testing.assert_allclose(scores.cpu().numpy(), expected, rtol=1e-4)
    labels = detector.predict(torch.from_numpy(test).float().to(DEVICE))
    assert torch.equal(torch.as_tensor(labels).cpu(), (scores.cpu() > detector.threshold_).long())
    assert roc_auc_score(np.r_[np.zeros(100), np.ones(50)], scores.cpu().numpy()) > 0.9


@cuda_only
def test_auto_is_the_torch_backend_and_never_probes_keops_on_the_device(monkeypatch):
    """On an H200 KeOps was slower than the torch backend at every shape, D = 64 included (RESULTS.md section 25):
    "auto" picked it on CUDA for D <= 64, now it neither probes nor runs it."""
    import dn2_lightning.knn as knn

    def no_keops(*args, **kwargs):
        raise AssertionError("auto probed or ran KeOps")

    monkeypatch.setattr(knn, "_keops_usable", no_keops)
    monkeypatch.setattr(knn, "_keops_knn", no_keops)
    g = torch.Generator(device=DEVICE).manual_seed(5)
    bank = torch.randn(300, 16, device=DEVICE, generator=g)
    queries = torch.randn(40, 16, device=DEVICE, generator=g)
    result = knn_distances(queries, bank, 3, "auto")
    check_exact(result, queries, bank, reference(queries, bank, 3), "auto at D = 16")


class WaitsBeforeQueueing(Callback):
    """Per training step, where dn2_lightning's code made the host wait for the device (a synchronising CUDA call,
    as ``torch.cuda.set_sync_debug_mode`` reports it, with a dn2_lightning frame on its stack: torch's Python
    wrappers count too) before the step's work was queued, i.e. before the module's ``ChecksBehind.advance`` read
    the batch before's checks."""

    def __init__(self) -> None:
        self.early: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._waits, self._queued_at = [], None
        self._catching = warnings.catch_warnings()
        self._catching.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._record
        checks, advance = pl_module._checks_behind, pl_module._checks_behind.advance

        def marked_advance() -> None:
            self._queued_at = len(self._waits)
            advance()

        checks.advance = marked_advance
        torch.cuda.set_sync_debug_mode("warn")

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return
        ours = [
            f"{os.path.basename(f.filename)}:{f.lineno}"
            for f in traceback.extract_stack()
            if "dn2_lightning" in f.filename
        ]
        if ours:
            self._waits.append(" < ".join(reversed(ours)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._stop(pl_module)
        self.early.append(self._waits if self._queued_at is None else self._waits[: self._queued_at])

    def on_exception(self, trainer, pl_module, exception) -> None:
        if hasattr(self, "_catching"):
            self._stop(pl_module)

    def _stop(self, pl_module) -> None:
        torch.cuda.set_sync_debug_mode(0)
        self._catching.__exit__(None, None, None)
        del self._catching
        pl_module._checks_behind.__dict__.pop("advance", None)  # the class's own again


class GroupsWithSources(torch.utils.data.Dataset):
    """test_group_pooling's padded groups, each member naming its source image (GroupDataModule's ``members``)."""

    def __init__(self) -> None:
        from test_group_pooling import PaddedGroups

        self.groups = PaddedGroups(50, 0.0, seed=0)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict:
        return self.groups[i] | {"members": torch.arange(4) + 4 * (i % 10)}  # images reused across groups


@cuda_only
@pytest.mark.parametrize("setting", ["images", "groups, point-wise", "groups, mean-pooled", "groups, histogram"])
def test_a_training_step_queues_its_batch_before_the_host_waits(setting):
    """The host waits for the device only after a step's work is queued, to read the batch before's checks, so
    the device never idles while Lightning fetches the next batch: point-wise groups read their members' sources
    and dropped their padding rows at once (boolean indexing) in every step. The pass's first step (the sampler's
    order, copied once) and last (the bank is made) are not counted."""
    if setting == "images":
        loader = blob_data().train_dataloader()
    else:
        loader = torch.utils.data.DataLoader(GroupsWithSources(), batch_size=8)
    pooling = {"groups, point-wise": "none", "groups, histogram": "histogram"}.get(setting, "mean")
    model = make_model(group_pooling=pooling, group_clusters=3)
    waits = WaitsBeforeQueueing()
    quiet_trainer(accelerator=ACCELERATOR, callbacks=[waits]).fit(model, train_dataloaders=loader)
    assert len(waits.early) == len(loader) >= 4
    middle = waits.early[1:-1]
    assert not any(middle), f"{setting}: steps waited for their own batch at {middle}"
    assert len(model.bank) > 0


def test_a_bank_fingerprinted_on_the_cpu_is_accepted_on_the_device():
    """The backbone fingerprint (a fixed probe's float32 embedding, no autocast or TF32) recorded by a CPU fit is
    compared on the device at the loaded bank's first use: cuDNN's float32 convolutions must stay far inside its 5%
    tolerance (a tenth of it here), and the scores agree with the CPU's."""
    from dn2_lightning.fingerprint import FINGERPRINT_TOLERANCE, fingerprint_difference

    dm = blob_data()
    model = DN2Module(k=2, backbone="efficientnet_lite0", input_size=64, reports=False)
    quiet_trainer().fit(model, datamodule=dm)
    on_device = DN2Module(k=2, backbone="efficientnet_lite0", input_size=64, reports=False)
    on_device.load_state_dict(copy.deepcopy(model.state_dict()))
    on_device.to(DEVICE)
    difference = fingerprint_difference(on_device.bank.fingerprint, on_device._probe_embedding())
    assert difference is not None and difference < FINGERPRINT_TOLERANCE / 10, f"cpu -> {DEVICE}: {difference:.2e}"
    scores = on_device.score_images(dm.test_images[:8]).scores.cpu().numpy()
    np.testing.assert_allclose(scores, model.score_images(dm.test_images[:8]).scores.numpy(), rtol=1e-3)

"""The memory bank is held once: rows are not copied where nothing needs a copy (collecting, de-duplicating,
setting, loading, preparing for search, leave-one-out searches, the detector's calls), and every shortcut gives the
numbers an independent NumPy reference gives. benchmarks/memory_bench.py measures the memory (RESULTS.md §15)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from helpers import BlobDataModule, linear_backbone, quiet_trainer
from sklearn.neighbors import NearestNeighbors

import dn2_lightning.scoring as scoring
from dn2_lightning import DN2Detector, DN2Module
from dn2_lightning.bank import BankCollector, MemoryBank
from dn2_lightning.distributed import unique_by_index
from dn2_lightning.knn import float64_mean, knn_distances


def leave_one_out_reference(rows: np.ndarray, k: int) -> np.ndarray:
    """Each row's mean squared distance to its k nearest other rows (by index: duplicates count), in float64."""
    distances = ((rows[:, None].astype(np.float64) - rows[None].astype(np.float64)) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    return np.sort(distances, axis=1)[:, :k].mean(1)


def test_set_copies_unless_told_and_never_keeps_a_view_or_an_inference_tensor():
    rows, ids = torch.randn(6, 4), torch.arange(6)
    bank = MemoryBank()
    bank.set(rows, ids)
    rows.add_(1.0)  # the caller's tensor changes; the bank's copy does not
    assert not torch.equal(bank.embeddings, rows)
    bank.set(rows, ids, copy=False)
    assert bank.embeddings.data_ptr() == rows.data_ptr()
    bank.set(rows[::2], ids[::2], copy=False)  # a strided view would keep the whole tensor alive: copied
    assert bank.embeddings.data_ptr() != rows.data_ptr() and bank.embeddings.is_contiguous()
    assert torch.equal(bank.embeddings, rows[::2])
    tokens = torch.randn(6, 50, 4)
    bank.set(tokens[:, 0], ids, copy=False)  # a ViT's class token: 1/50 of its storage
    assert bank.embeddings.untyped_storage().nbytes() == 6 * 4 * 4 and torch.equal(bank.embeddings, tokens[:, 0])
    with torch.inference_mode():
        made_in_inference = torch.randn(3, 4)
    bank.set(made_in_inference, torch.arange(3), copy=False)
    assert not bank.embeddings.is_inference() and torch.equal(bank.embeddings, made_in_inference)
    bank.embeddings.mul_(2)  # a later fit or load may update it in place


def test_a_loaded_bank_takes_the_saved_tensors_in_any_shape():
    source = MemoryBank()
    source.set(torch.randn(9, 5), torch.arange(9) * 2)
    source.set_loo_scores(torch.rand(9), 2)
    state = source.state_dict()
    loaded = MemoryBank()  # another shape (empty): loads strictly
    loaded.set(torch.randn(4, 5), torch.arange(4))
    loaded.prepared()
    loaded.load_state_dict(state)
    assert loaded.embeddings.data_ptr() == state["embeddings"].data_ptr()  # not a second copy of the bank
    assert loaded._prepared is None  # nor the old bank's search copy
    for name in ("embeddings", "sample_indices", "loo_scores", "loo_k"):
        assert torch.equal(getattr(loaded, name), getattr(source, name))
    model, other = DN2Module(k=2, backbone=linear_backbone()), DN2Module(k=2, backbone=linear_backbone())
    quiet_trainer().fit(model, datamodule=BlobDataModule())
    other.load_state_dict(model.state_dict())
    images = BlobDataModule().test_images
    assert torch.equal(other.score_images(images).scores, model.score_images(images).scores)


def test_collect_keeps_the_rows_once_and_goes_on_collecting():
    collector, batches = BankCollector(), [torch.randn(n, 3) for n in (4, 2, 5)]
    start = 0
    for batch in batches:
        collector.add(batch, torch.arange(start, start + len(batch)), torch.zeros(len(batch)))
        start += len(batch)
    embeddings, indices, _ = collector.collect()
    assert torch.equal(embeddings, torch.cat(batches)) and indices.tolist() == list(range(11))
    assert len(collector._embeddings) == 1 and collector._embeddings[0] is embeddings  # the batches are released
    collector.add(torch.ones(1, 3), torch.tensor([11]), torch.zeros(1))
    embeddings, indices, _ = collector.collect()
    assert torch.equal(embeddings, torch.cat([*batches, torch.ones(1, 3)])) and indices.tolist() == list(range(12))


def test_unique_by_index_keeps_the_first_row_of_each_index_in_order():
    rows = torch.arange(8.0)[:, None]
    same = unique_by_index(torch.arange(8), rows)
    assert same[1] is rows  # one process's pass, already in order: no copy
    indices = torch.tensor([5, 1, 5, 0, 1, 7, 0, 3])  # DistributedSampler padding repeats samples across ranks
    first: dict[int, float] = {}
    for index, value in zip(indices.tolist(), rows.flatten().tolist(), strict=True):
        first.setdefault(index, value)
    kept_indices, kept_rows = unique_by_index(indices, rows)
    assert kept_indices.tolist() == sorted(first)
    assert kept_rows.flatten().tolist() == [first[i] for i in sorted(first)]
    # sorted but repeated (one test image on 2 ranks gathers [0, 0]): not the no-copy path
    kept_indices, kept_rows = unique_by_index(torch.tensor([0, 0, 1]), torch.tensor([[1.0], [2.0], [3.0]]))
    assert kept_indices.tolist() == [0, 1] and kept_rows.flatten().tolist() == [1.0, 3.0]


def test_float64_mean_by_chunks_matches_numpy(monkeypatch):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(5000, 7, generator=g) * 3 + 1e4  # a large offset: float32 summation would drift
    expected = rows.double().numpy().mean(0)
    np.testing.assert_allclose(float64_mean(rows).numpy(), expected, rtol=1e-14)
    assert float64_mean(rows).dtype == torch.float64
    wide = torch.randn(3, 2**22 + 1, generator=g)  # wider than one chunk: one row per chunk
    np.testing.assert_allclose(float64_mean(wide).numpy(), wide.double().numpy().mean(0), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("k", [1, 3])
def test_leave_one_out_scores_by_chunks_match_numpy(monkeypatch, k):
    g = torch.Generator().manual_seed(k)
    rows = torch.randn(53, 6, generator=g)
    rows[10] = rows[11]  # a duplicate: its neighbour at distance 0 counts, itself does not
    monkeypatch.setattr(scoring, "LEAVE_ONE_OUT_CHUNK_BYTES", 34 * (k + 1) * 7)  # chunks of 7 rows, the last of 4
    ids = torch.arange(100, 153)
    calls = []

    def search(queries, k_):
        calls.append(len(queries))
        knn = knn_distances(queries, rows, k_)
        return type(knn)(knn.values, ids[knn.indices])

    scores = scoring.leave_one_out_scores(rows, ids, k, search)
    assert calls == [7] * 7 + [4]
    np.testing.assert_allclose(scores.double().numpy(), leave_one_out_reference(rows.numpy(), k), rtol=1e-5, atol=1e-6)
    if k == 1:
        assert scores[10] == scores[11] == 0
    whole = scoring.leave_one_out_scores(rows, ids, k, search, chunked=False)
    assert calls[-1] == 53 and torch.equal(whole, scores)


def test_cleaning_by_chunks_removes_what_a_brute_force_removes(monkeypatch):
    monkeypatch.setattr(scoring, "LEAVE_ONE_OUT_CHUNK_BYTES", 34 * 6 * 5)  # clean_k = 5: chunks of 5 rows
    g = torch.Generator().manual_seed(0)
    normal, outliers = torch.randn(60, 4, generator=g), torch.randn(8, 4, generator=g) * 4 + 6
    x = torch.cat([normal, outliers]).numpy()
    detector = DN2Detector(k=2, clean_fraction=0.25, clean_k=5).fit(x)
    loo = leave_one_out_reference(x, 5)
    expected = np.ones(len(x), dtype=bool)
    expected[np.argsort(loo, kind="stable")[-17:]] = False  # 25% of 68 rows, the largest scores
    assert np.array_equal(detector.kept_, expected)
    bank = x[expected]
    neighbours = NearestNeighbors(n_neighbors=2).fit(bank)
    kept_scores = leave_one_out_reference(bank, 2)
    removed_scores = (neighbours.kneighbors(x[~expected])[0] ** 2).mean(1)
    expected_scores = np.empty(len(x))
    expected_scores[expected], expected_scores[~expected] = kept_scores, removed_scores
    np.testing.assert_allclose(detector.decision_scores_, expected_scores, rtol=1e-5, atol=1e-6)


def test_the_detector_prepares_its_bank_once_per_fit_and_pickles_without_it():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(80, 5, generator=g), torch.randn(9, 5, generator=g)
    detector = DN2Detector(k=2).fit(x.numpy())
    first = detector.decision_function(y.numpy())
    prepared = detector._prepared
    assert detector.predict(y.numpy()) is not None and detector._prepared is prepared  # reused, not made again
    reference = (NearestNeighbors(n_neighbors=2).fit(x.numpy()).kneighbors(y.numpy())[0] ** 2).mean(1)
    np.testing.assert_allclose(first, reference, rtol=1e-5, atol=1e-6)
    restored = pickle.loads(pickle.dumps(detector))
    assert "_prepared" not in restored.__dict__ and detector._prepared is prepared  # the live one keeps its own
    np.testing.assert_array_equal(restored.decision_function(y.numpy()), first)
    detector.fit(y.numpy())  # a new fit: a new bank, prepared anew
    again = (NearestNeighbors(n_neighbors=2).fit(y.numpy()).kneighbors(x.numpy())[0] ** 2).mean(1)
    np.testing.assert_allclose(detector.decision_function(x.numpy()), again, rtol=1e-5, atol=1e-6)


def test_checkpoints_stream_into_their_file_and_other_filesystems_still_save(tmp_path):
    # Lightning's own save serialises the whole checkpoint into memory first: a second copy of the bank
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    trainer = quiet_trainer(default_root_dir=tmp_path)
    trainer.fit(model, datamodule=BlobDataModule())
    images = BlobDataModule().test_images
    for path in (tmp_path / "bank.ckpt", "memory://dn2/bank.ckpt"):  # local: streamed; fsspec's memory fs: Lightning's
        trainer.save_checkpoint(path)
        loaded = DN2Module.load_from_checkpoint(path, backbone=linear_backbone())
        assert torch.equal(loaded.bank.embeddings, model.bank.embeddings)
        assert torch.equal(loaded.score_images(images).scores, model.score_images(images).scores)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["bank.ckpt"]  # no temporary file left

"""DN2Module: the Lightning glue around backbone -> memory bank -> exact kNN -> score -> AUROC."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from torchmetrics.classification import BinaryAUROC

from dn2_lightning.backbones import build_backbone
from dn2_lightning.bank import BankCollector, MemoryBank
from dn2_lightning.batch import Batch, unpack_batch
from dn2_lightning.distributed import (
    broadcast_module_state,
    count_rows,
    gather_rows,
    gather_rows_to_cpu,
    keep_first_owner,
    unique_by_index,
    world_size,
)
from dn2_lightning.group_pooling import GROUP_POOLINGS, GroupPooling, pack_members, unpack_members
from dn2_lightning.knn import KNNResult, knn_distances, list_knn_backends
from dn2_lightning.metrics import AnomalyScores, ScoreCollector
from dn2_lightning.scoring import drop_self, keep_lowest, knn_scores, to_unit_interval
from dn2_lightning.sharding import sharded_knn

BANK_SHARDINGS = ("replicate", "shard")
NO_BANK_MESSAGE = (
    "DN2Module has no memory bank yet and cannot build one: call trainer.fit(model, datamodule) first, "
    "pass a datamodule with a train_dataloader() to trainer.{fn}(model, datamodule=...), or load a fitted "
    "checkpoint (ckpt_path=...)."
)


class DN2Module(LightningModule):
    """Deep Nearest Neighbour anomaly detection (Bergman, Cohen & Hoshen, 2020).

    ``fit`` makes one pass over the train dataloader and keeps the embeddings (the memory bank, a
    checkpointed buffer). Evaluation scores each sample by the mean squared Euclidean distance to its
    ``k`` nearest bank embeddings and logs ``{val,test}/auroc``. ``test``/``validate``/``predict``
    without ``fit`` build the bank from the datamodule's ``train_dataloader()`` on first need.

    Args:
        k: neighbours averaged in the score (paper: 2).
        backbone: a name from :func:`dn2_lightning.list_backbones` or an ``nn.Module`` mapping float
            images in [0, 1] ``[B, 3, H, W]`` to embeddings ``[B, D]``.
        pretrained: load the backbone's ImageNet weights.
        input_size: backbone input resolution (images are resized to it on the device); ``None`` = the
            backbone's native size.
        knn_backend: one of :func:`dn2_lightning.list_knn_backends`.
        max_memory_bytes: temporary-memory budget of one kNN search (``None`` = 512 MiB).
        clean_fraction: unsupervised setting (paper §3.2): fraction of the bank with the largest
            leave-one-out kNN scores dropped before scoring; 0 disables cleaning.
        clean_k: neighbours in the leave-one-out score used for cleaning (capped at bank size - 1). The
            paper's k=2 lets contaminants of one class hide each other; 200 was the best value of a sweep
            at 5-20% contamination on FashionMNIST (``benchmarks/RESULTS.md``).
        group_pooling: for group batches ``[B, M, C, H, W]``: ``"mean"`` pools member embeddings (paper
            §3.3); ``"histogram"`` describes a group by its composition: k-means centroids fitted on the
            training members, each member softly assigned to them, the group = the mean assignment (sees a
            class twice and another missing, which the mean barely does); ``"none"`` keeps single-image
            embeddings in the bank and scores a group by the max of its members' scores (the point-wise
            baseline). See :class:`dn2_lightning.group_pooling.GroupPooling`.
        group_clusters: K, k-means centroids of the histogram pooling (fitted at fit time, checkpointed).
        group_temperature: softness of the histogram's assignments: softmax of -squared distance /
            (group_temperature x the median squared distance of a training member to its nearest centroid).
        threshold_quantile: the decision threshold is this quantile of the bank's leave-one-out scores
            (normal data only; never the test set).
        bank_sharding: under DDP, ``"replicate"`` gives every rank the whole bank; ``"shard"`` keeps a
            disjoint shard per rank and merges per-shard top-k lists (exact), for banks larger than one
            device's memory. Single-device runs ignore it.
        reports: after ``test``, write per-sample ``scores.csv`` and PNG figures (ROC, histograms, most
            anomalous images) to the run's log dir (and TensorBoard); after ``predict``, write
            ``predictions.csv`` (path, score, is_anomaly). ``False`` opts out.
    """

    def __init__(
        self,
        k: int = 2,
        backbone: str | nn.Module = "resnet152",
        pretrained: bool = True,
        input_size: int | None = None,
        knn_backend: str = "auto",
        max_memory_bytes: int | None = None,
        clean_fraction: float = 0.0,
        clean_k: int = 200,
        group_pooling: str = "mean",
        group_clusters: int = 10,
        group_temperature: float = 0.3,
        threshold_quantile: float = 0.99,
        bank_sharding: str = "replicate",
        reports: bool = True,
    ) -> None:
        super().__init__()
        _validate_hparams(
            k,
            input_size,
            knn_backend,
            max_memory_bytes,
            clean_fraction,
            clean_k,
            group_pooling,
            group_clusters,
            group_temperature,
            threshold_quantile,
            bank_sharding,
        )
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        # DN2 has nothing to optimise: fit is one feature-extraction pass, driven by training_step.
        self.automatic_optimization = False
        self.backbone = build_backbone(backbone, pretrained=pretrained, image_size=input_size)
        self.bank = MemoryBank()
        pooling = "mean" if group_pooling == "none" else group_pooling  # "none" pools nothing: members are scored
        self.group_pool = GroupPooling(pooling, clusters=group_clusters, temperature=group_temperature)
        self.register_buffer("threshold", torch.tensor(float("nan")))
        # DDP broadcasts rank 0's buffers at set-up; the bank is made consistent by its own gathering (and
        # differs per rank when sharded), so it is excluded as torch's DDP allows.
        self._ddp_params_and_buffers_to_ignore = ["bank.embeddings", "bank.sample_indices", "threshold"]
        self._ddp_params_and_buffers_to_ignore += [f"group_pool.{name}" for name, _ in self.group_pool.named_buffers()]
        self.val_collector = ScoreCollector()
        self.test_collector = ScoreCollector()
        # inputs are already gathered and de-duplicated by the collectors, so no second sync
        self.val_auroc = BinaryAUROC(sync_on_compute=False)
        self.test_auroc = BinaryAUROC(sync_on_compute=False)
        self.val_scores: AnomalyScores | None = None
        self.test_scores: AnomalyScores | None = None
        self.bank_report: dict[str, float] = {}
        self._collector: BankCollector | None = None
        self._stream_position = 0  # samples seen this epoch, to index datasets that give no indices
        self._bank_is_shard = False

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        """Embeddings ``[B, D]`` of images ``[B, C, H, W]``, or pooled embeddings of groups
        ``[B, M, C, H, W]`` (``mask [B, M]`` marks real members; pooling by ``group_pooling``)."""
        if images.ndim == 5:
            b, m = images.shape[:2]
            members = self.backbone(images.flatten(0, 1)).view(b, m, -1)
            return self.group_pool(members, mask)
        return self.backbone(images)

    # ----------------------------------------------------------------------------------------- training

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        frozen = not any(p.requires_grad for p in self.parameters())
        if stage == "fit" and isinstance(strategy, DDPStrategy) and frozen:
            # torch's DistributedDataParallel refuses a module without trainable parameters, and DN2 has no
            # gradients to synchronise: fit runs unwrapped (each rank embeds its shard, the bank is gathered
            # afterwards), with the weights made identical on every rank as DDP would.
            strategy.configure_ddp = lambda: broadcast_module_state(self.backbone)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        parsed = unpack_batch(batch)
        with torch.no_grad():
            embeddings, indices, labels = self._bank_rows(parsed, batch_idx)
        if self._collector is None:
            self._collector = BankCollector()
        self._collector.add(embeddings, indices, labels)
        self._count_bank_step()

    def on_train_epoch_start(self) -> None:
        # pretrained features as they are: BatchNorm must use its ImageNet statistics, not the batch's
        self.backbone.eval()
        self._collector = BankCollector()
        self._stream_position = 0

    def on_train_epoch_end(self) -> None:
        if self._collector is not None:
            self._warn_if_partial_pass(self._collector.num_batches)
            self._finalize_bank()
        # one pass is all DN2 needs; more epochs would rebuild the same bank
        rank_zero_info(f"DN2: memory bank of {len(self.bank)} embeddings built; stopping fit after one epoch.")
        self.trainer.should_stop = True

    def _warn_if_partial_pass(self, seen: int) -> None:
        total = len(self.trainer.train_dataloader) if self.trainer.train_dataloader is not None else seen
        if seen < total:
            warnings.warn(
                f"the memory bank was built from {seen} of {total} training batches (limit_train_batches, "
                "max_steps or fast_dev_run); scores use a partial bank.",
                stacklevel=2,
            )

    def configure_optimizers(self) -> list:
        return []

    def configure_callbacks(self) -> list:
        from dn2_lightning.reports import EvaluationReport

        return [EvaluationReport()] if self.hparams.reports else []

    # --------------------------------------------------------------------------------------- evaluation

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            self._ensure_bank()
        self._stream_position = 0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if not self.trainer.sanity_checking:  # the sanity check runs before the bank exists
            self._score_into(self.val_collector, unpack_batch(batch), batch_idx)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.val_scores = self._report("val", self.val_collector, self.val_auroc)

    def on_test_epoch_start(self) -> None:
        self._ensure_bank()
        self._stream_position = 0

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._score_into(self.test_collector, unpack_batch(batch), batch_idx)

    def on_test_epoch_end(self) -> None:
        self.test_scores = self._report("test", self.test_collector, self.test_auroc)

    def on_predict_epoch_start(self) -> None:
        self._ensure_bank()
        self._stream_position = 0

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Per sample: ``score``, ``is_anomaly`` (score > threshold), ``label``, ``index``, and the
        train-set ``neighbours`` with their squared ``distances``."""
        parsed = unpack_batch(batch)
        scores, knn = self.score(parsed, batch_idx)
        out = {
            "score": scores,
            "is_anomaly": scores > self.threshold,
            "label": parsed.labels,
            "index": self._indices_of(parsed, batch_idx),
            "neighbours": knn.indices,
            "distances": knn.values,
        }
        if parsed.paths is not None:
            out["path"] = list(parsed.paths)
        return out

    # ------------------------------------------------------------------------------------------ scoring

    def score(self, batch: Batch, batch_idx: int = 0) -> tuple[Tensor, KNNResult]:
        """DN2 scores ``[B]`` of a batch, and the kNN result behind them (neighbours as train indices)."""
        if not self.bank.is_fitted:
            raise RuntimeError(NO_BANK_MESSAGE.format(fn="test"))
        if batch.images.ndim == 5 and self.hparams.group_pooling == "none":
            b, m = batch.images.shape[:2]
            members = self._embed(batch.images.flatten(0, 1), batch, batch_idx)
            knn = self._search(members, self.hparams.k)
            member_scores = knn_scores(knn).view(b, m)
            if batch.mask is not None:
                member_scores = member_scores.masked_fill(~batch.mask.bool(), float("-inf"))
            worst = member_scores.argmax(1)
            rows = torch.arange(b, device=worst.device) * m + worst
            return member_scores.max(1).values, KNNResult(knn.values[rows], knn.indices[rows])
        knn = self._search(self._embed(batch.images, batch, batch_idx), self.hparams.k)
        return knn_scores(knn), knn

    def _search(self, embeddings: Tensor, k: int) -> KNNResult:
        """Exact kNN of ``embeddings`` in the whole bank; neighbours as train-set sample indices."""
        bank = self.bank.prepared()
        if embeddings.shape[1] != bank.shape[1]:
            raise ValueError(
                f"the backbone gives {embeddings.shape[1]}-d embeddings but the memory bank holds "
                f"{bank.shape[1]}-d ones: the bank (checkpoint) was built with another backbone."
            )
        if self._sharded:
            return sharded_knn(embeddings, bank, self.bank.sample_indices, k, **self._knn_kwargs())
        knn = knn_distances(embeddings, bank, k, **self._knn_kwargs())
        return KNNResult(knn.values, self.bank.sample_indices[knn.indices])

    @property
    def _sharded(self) -> bool:
        return self.hparams.bank_sharding == "shard" and world_size() > 1

    def _score_into(self, collector: ScoreCollector, batch: Batch, batch_idx: int) -> None:
        scores, knn = self.score(batch, batch_idx)
        collector.update(self._indices_of(batch, batch_idx), scores, batch.labels, knn.indices, knn.values)

    def _report(self, stage: str, collector: ScoreCollector, auroc: BinaryAUROC) -> AnomalyScores:
        result = collector.compute()
        collector.reset()
        labels = result.labels
        if (labels < 0).any():
            rank_zero_info(f"DN2: {stage} data has no labels; scores are kept in module.{stage}_scores, no AUROC.")
        elif labels.unique().numel() < 2:
            warnings.warn(
                f"AUROC is undefined: every {stage} sample has label {int(labels[0])}. The test set needs both "
                "normal (0) and anomalous (1) samples; scores are still kept in module."
                f"{stage}_scores.",
                stacklevel=2,
            )
        else:
            auroc.update(to_unit_interval(result.scores), labels)
            self.log(f"{stage}/auroc", auroc.compute(), sync_dist=True)
            auroc.reset()
        return AnomalyScores(*(t.cpu() for t in vars(result).values()))

    # ------------------------------------------------------------------------------------- memory bank

    def _ensure_bank(self) -> None:
        """Finalise a bank still being collected by fit, else build it from the datamodule if missing."""
        if self._collector is not None and len(self._collector):
            if not self.trainer.is_last_batch:
                warnings.warn(
                    "validation inside a training epoch sees a partial memory bank; use val_check_interval=1.0.",
                    stacklevel=2,
                )
            self._finalize_bank()
        elif not self.bank.is_fitted:
            self._build_bank_from_datamodule()
        elif self._sharded and not self._bank_is_shard:
            # a whole bank (from a checkpoint) meets a sharded run: keep this rank's share
            rows = slice(self.global_rank, None, world_size())
            self.bank.set(self.bank.embeddings[rows], self.bank.sample_indices[rows])
        self._bank_is_shard = self._sharded

    def _build_bank_from_datamodule(self) -> None:
        datamodule = self.trainer.datamodule
        fn = self.trainer.state.fn.value if self.trainer.state.fn else "test"
        if datamodule is None or not is_overridden("train_dataloader", datamodule):
            raise RuntimeError(NO_BANK_MESSAGE.format(fn=fn))
        datamodule.setup("fit")
        loader = _shard_for_this_rank(datamodule.train_dataloader())
        rank_zero_info(f"DN2: building the memory bank from {type(datamodule).__name__}.train_dataloader().")
        self._collector = BankCollector()
        self._stream_position = 0
        # the same precision context (e.g. bf16 autocast) as fit's training_step, so both banks are alike
        with torch.no_grad(), self.trainer.precision_plugin.train_step_context():
            for batch_idx, batch in enumerate(loader):
                batch = self._on_device(batch, batch_idx)
                self._collector.add(*self._bank_rows(unpack_batch(batch), batch_idx))
        self._finalize_bank()

    def _bank_rows(self, batch: Batch, batch_idx: int) -> tuple[Tensor, Tensor, Tensor]:
        """Embeddings, dataset indices and labels that a training batch adds to the bank."""
        indices = self._indices_of(batch, batch_idx)
        if batch.images.ndim == 5 and self.hparams.group_pooling == "none":
            # point-wise baseline: every member is a bank row, indexed group * M + member
            b, m = batch.images.shape[:2]
            embeddings = self._embed(batch.images.flatten(0, 1), batch, batch_idx)
            member = torch.arange(m, device=indices.device)
            rows = (indices[:, None] * m + member).flatten()
            labels = batch.labels.repeat_interleave(m)
            if batch.mask is not None:
                real = batch.mask.bool().flatten()
                return embeddings[real], rows[real], labels[real]
            return embeddings, rows, labels
        if batch.images.ndim == 5 and self.group_pool.needs_fit:
            # the pooling is fitted on the whole bank's members: keep them (and the mask) until finalisation
            b, m = batch.images.shape[:2]
            members = self._embed(batch.images.flatten(0, 1), batch, batch_idx).view(b, m, -1)
            return pack_members(members, batch.mask), indices, batch.labels
        return self._embed(batch.images, batch, batch_idx), indices, batch.labels

    def _finalize_bank(self) -> None:
        """Turn the collected rows into the bank: one row per train sample (whole on every rank, or one
        shard per rank), cleaned if asked, and the decision threshold from its leave-one-out scores."""
        assert self._collector is not None
        collector, self._collector = self._collector, None
        embeddings, indices, labels = collector.collect()
        if self._sharded:
            own = keep_first_owner(indices)
            indices, embeddings, labels = unique_by_index(indices[own], embeddings[own], labels[own])
        else:
            indices, embeddings, labels = unique_by_index(*(gather_rows(t) for t in (indices, embeddings, labels)))
        if embeddings.ndim == 3:  # packed group members [N, M, D + 1]: fit the group pooling, then pool
            embeddings = self._fit_group_pooling(*unpack_members(embeddings), indices)
        self.bank.set(embeddings, indices)
        self._bank_is_shard = self._sharded
        k, n = self.hparams.k, self._bank_size()
        if n < k:
            raise ValueError(f"k={k} exceeds the number of training embeddings ({n}); use k <= {n}.")
        report: dict[str, float] = {"bank/size_before_cleaning": float(n)}
        if self.hparams.clean_fraction > 0:
            ids, scores, all_labels = self._leave_one_out_scores(self.hparams.clean_k, labels)
            keep = keep_lowest(scores, self.hparams.clean_fraction)
            if (all_labels >= 0).all() and (all_labels > 0).any():
                report["bank/contaminants_before"] = float((all_labels > 0).sum())
                report["bank/contaminants_kept"] = float((all_labels[keep] > 0).sum())
            report["bank/removed"] = float((~keep).sum())
            mine = torch.isin(indices, ids[keep])
            self.bank.set(embeddings[mine], indices[mine])
            if int(keep.sum()) < k:
                raise ValueError(
                    f"clean_fraction={self.hparams.clean_fraction} leaves {int(keep.sum())} embeddings, fewer "
                    f"than k={k}; lower clean_fraction or k."
                )
        self._set_threshold()
        report["bank/size"] = float(self._bank_size())
        self.bank_report = report
        rank_zero_info("DN2: " + ", ".join(f"{name}={value:g}" for name, value in report.items()))
        if self.hparams.clean_fraction > 0 and self._trainer is not None and self.trainer.state.fn != "predict":
            self.log_dict(report, sync_dist=False, rank_zero_only=True)

    def _fit_group_pooling(self, members: Tensor, mask: Tensor, indices: Tensor) -> Tensor:
        """Fit the group pooling on every training group's members, in dataset order (so the fit is the
        single-device one), then pool this rank's groups."""
        if self._sharded:  # this rank holds only its shard: fit on all of them
            _, all_members, all_mask = unique_by_index(*(gather_rows(t) for t in (indices, members, mask)))
            self.group_pool.fit(all_members, all_mask)
        else:
            self.group_pool.fit(members, mask)
        broadcast_module_state(self.group_pool)  # rank 0's centroids everywhere, whatever the arithmetic
        return self.group_pool(members, mask)

    def _bank_size(self) -> int:
        """Rows in the whole bank (summed over shards)."""
        return sum(count_rows(len(self.bank), self.bank.embeddings.device)) if self._sharded else len(self.bank)

    def _leave_one_out_scores(self, k: int, labels: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Every bank row's leave-one-out DN2 score over the whole bank, as ``(ids, scores, labels)``
        sorted by id (gathered from all shards in shard mode)."""
        ids = self.bank.sample_indices
        k = min(k, self._bank_size() - 1)
        scores = knn_scores(drop_self(self._search(self.bank.embeddings, k + 1), ids))
        labels = labels if labels is not None else torch.full_like(ids, -1)
        if self._sharded:
            ids, scores, labels = gather_rows(ids), gather_rows(scores), gather_rows(labels)
        return unique_by_index(ids, scores, labels)

    def _set_threshold(self) -> None:
        if self._bank_size() <= self.hparams.k:
            self.threshold = torch.tensor(float("nan"), device=self.bank.embeddings.device)
            return
        _, scores, _ = self._leave_one_out_scores(self.hparams.k)
        with torch.inference_mode(False):
            self.threshold = torch.quantile(scores.double(), self.hparams.threshold_quantile).float().clone()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._sharded:
            # each rank holds a shard: the checkpoint gets the whole bank, so it loads on any number of devices.
            # It is assembled in host memory, one shard on the device at a time.
            ids = gather_rows_to_cpu(self.bank.sample_indices)
            rows = gather_rows_to_cpu(self.bank.embeddings)
            ids, rows = unique_by_index(ids, rows)
            checkpoint["state_dict"]["bank.sample_indices"] = ids
            checkpoint["state_dict"]["bank.embeddings"] = rows

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._bank_is_shard = False
        saved = checkpoint.get("state_dict", {}).get("bank.embeddings")
        expected = self.backbone.feature_dim
        # a bank of pooled groups may hold another size than the backbone's (histogram pooling)
        allowed = {expected, self.group_pool.output_dim(expected)} if expected is not None else set()
        if saved is not None and saved.numel() and expected is not None and saved.shape[1] not in allowed:
            raise ValueError(
                f"the checkpoint's memory bank holds {saved.shape[1]}-d embeddings but backbone="
                f"{self.hparams.get('backbone')!r} gives {expected}-d ones; load it with the backbone it was "
                "built with."
            )

    # ---------------------------------------------------------------------------------------- helpers

    def _embed(self, images: Tensor, batch: Batch, batch_idx: int) -> Tensor:
        """Backbone embeddings (group-pooled for group batches), refusing non-finite inputs or outputs."""
        if images.is_floating_point():
            _check_finite(images.flatten(1), "input images", batch, batch_idx)
        embeddings = self(images, batch.mask) if images.ndim == 5 else self(images)
        _check_finite(embeddings, "embeddings", batch, batch_idx)
        return embeddings

    def _indices_of(self, batch: Batch, batch_idx: int) -> Tensor:
        if batch.indices is not None:
            return torch.as_tensor(batch.indices, device=batch.images.device).long()
        # datasets without indices are assumed to be read in order, as an unshuffled
        # DistributedSampler deals them: sample i of this rank's stream is rank + world * i
        size = batch.images.shape[0]
        local = torch.arange(self._stream_position, self._stream_position + size, device=batch.images.device)
        self._stream_position += size
        return self.global_rank + world_size() * local

    def _on_device(self, batch: Any, batch_idx: int) -> Any:
        batch = self.on_before_batch_transfer(batch, 0)
        batch = self.transfer_batch_to_device(batch, self.device, 0)
        return self.on_after_batch_transfer(batch, 0)

    def _count_bank_step(self) -> None:
        # A bank update is this model's optimisation step. Counting it keeps global_step, max_steps and
        # ModelCheckpoint (which skips saving when global_step did not move) working without an optimizer.
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    def _knn_kwargs(self) -> dict[str, Any]:
        return {"backend": self.hparams.knn_backend, "max_memory_bytes": self.hparams.max_memory_bytes}


def _check_finite(values: Tensor, what: str, batch: Batch, batch_idx: int) -> None:
    bad = ~torch.isfinite(values).flatten(1).all(1) if values.ndim > 1 else ~torch.isfinite(values)
    if bad.any():
        positions = bad.nonzero().flatten().tolist()
        where = f"positions {positions[:10]}"
        if batch.indices is not None and values.shape[0] == batch.images.shape[0]:
            where += f" (dataset indices {torch.as_tensor(batch.indices)[bad.cpu()].tolist()[:10]})"
        raise ValueError(f"NaN or Inf in {what} of batch {batch_idx} at {where}; fix or drop those samples.")


def _shard_for_this_rank(loader: DataLoader) -> DataLoader:
    """Give each rank a disjoint share of the train set when building the bank outside fit."""
    if world_size() == 1:
        return loader
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=DistributedSampler(loader.dataset, shuffle=False),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )


def _validate_hparams(
    k: int,
    input_size: int | None,
    knn_backend: str,
    max_memory_bytes: int | None,
    clean_fraction: float,
    clean_k: int,
    group_pooling: str,
    group_clusters: int,
    group_temperature: float,
    threshold_quantile: float,
    bank_sharding: str,
) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be an integer >= 1 (the paper uses k=2).")
    if input_size is not None and (isinstance(input_size, bool) or input_size < 8):
        raise ValueError(f"input_size={input_size!r} must be None (the backbone's own) or an integer >= 8.")
    if knn_backend not in list_knn_backends():
        raise ValueError(f"knn_backend={knn_backend!r} is not one of {list_knn_backends()}.")
    if max_memory_bytes is not None and max_memory_bytes < 2**16:
        raise ValueError(f"max_memory_bytes={max_memory_bytes} must be None or at least 65536.")
    if not 0.0 <= clean_fraction < 1.0:
        raise ValueError(f"clean_fraction={clean_fraction} must be in [0, 1); 0 disables cleaning.")
    if isinstance(clean_k, bool) or not isinstance(clean_k, int) or clean_k < 1:
        raise ValueError(f"clean_k={clean_k!r} must be an integer >= 1.")
    if group_pooling not in GROUP_POOLINGS:
        raise ValueError(f"group_pooling={group_pooling!r} is not one of {list(GROUP_POOLINGS)}.")
    if isinstance(group_clusters, bool) or not isinstance(group_clusters, int) or group_clusters < 2:
        raise ValueError(
            f"group_clusters={group_clusters!r} must be an integer >= 2 (about the number of member classes; "
            "default 10)."
        )
    if (
        not isinstance(group_temperature, int | float)
        or isinstance(group_temperature, bool)
        or not (0.0 < group_temperature < float("inf"))
    ):
        raise ValueError(f"group_temperature={group_temperature!r} must be a finite number > 0 (default 0.3).")
    if not 0.0 < threshold_quantile <= 1.0:
        raise ValueError(f"threshold_quantile={threshold_quantile} must be in (0, 1].")
    if bank_sharding not in BANK_SHARDINGS:
        raise ValueError(f"bank_sharding={bank_sharding!r} is not one of {list(BANK_SHARDINGS)}.")

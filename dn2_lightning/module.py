"""DN2Module: the Lightning glue around backbone -> memory bank -> exact kNN -> score -> AUROC."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import math
import weakref
from collections.abc import Iterator, Mapping, Sequence, Sized
from typing import Any, Literal, get_args

import torch
from lightning.fabric.utilities.data import sized_len
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from torchmetrics.classification import BinaryAUROC

from dn2_lightning.backbones import (
    LITE_PADDING,
    build_backbone,
    check_backbone_input_size,
    out_of_memory_hint,
    trunk_layout,
)
from dn2_lightning.bank import BankBuilder, BankCollector, MemoryBank, as_buffer
from dn2_lightning.bank_checkpointing import BankCheckpointing, refuse_lite_bank_padded_otherwise
from dn2_lightning.batch import (
    Batch,
    Check,
    ChecksBehind,
    check_dataset_labels,
    check_group_mask,
    check_pixels,
    unpack_batch,
)
from dn2_lightning.checkpointing import (
    BANK_FORMAT,
    BANK_SETTINGS,
    DATA_SETTINGS,
    QuietOptimizerAdvice,
    WeightsOnlyCheckpointIO,
    batch_count,
    check_bank_format,
    check_bank_settings,
    check_train_set,
)
from dn2_lightning.console import info
from dn2_lightning.data_source import ONE_LOADER, one_batch, one_loader, running_datamodule
from dn2_lightning.distributed import (
    broadcast_module_state,
    follow_trainer,
    gather_objects,
    process_rank,
    rank,
    refuse_ranks_that_differ,
    refuse_ranks_with_other_banks,
    stop_together,
    world_size,
)
from dn2_lightning.fingerprint import (
    FINGERPRINT_TOLERANCE,
    exact_float32,
    fingerprint_difference,
    probe_images,
    probe_size,
)
from dn2_lightning.group_pooling import GROUP_POOLINGS, GroupPooling, GroupPoolingName, pack_members, unpack_members
from dn2_lightning.inputs import ImagesLike, as_image_batches
from dn2_lightning.knn import KNNBackend, KNNResult, lacks_float64
from dn2_lightning.maps.bank import PatchBank
from dn2_lightning.maps.head import AnomalyMaps, PatchBankName, gt_masks_of, gt_regions_of, validate_map_options
from dn2_lightning.metrics import AnomalyScores, ImageScores, ScoreCollector
from dn2_lightning.samplers import (
    Reading,
    refuse_iterable_cut_short,
    refuse_ranks_drawing_their_own_samples,
    refuse_ranks_reading_other_data,
    sampler_order,
    shard_for_this_rank,
    warn_if_drop_last,
    warn_if_out_of_order,
    warn_if_workers_repeat_unnumbered_samples,
)
from dn2_lightning.scoring import (
    exceeds,
    knn_scores,
    to_unit_interval,
    worst_member,
)
from dn2_lightning.threshold import DecisionThreshold, adopt_recorded_threshold, record_fixed_threshold
from dn2_lightning.validation import (
    as_python,
    check_bool,
    check_choice,
    check_clean_fraction,
    check_clean_k,
    check_input_size,
    check_int,
    check_k,
    check_knn_backend,
    check_positive_float,
    check_positive_int,
    check_threshold,
)

_log = logging.getLogger(__name__)
# what the ranks' bank states are called, and the fix, when they differ (each rank would enter other collectives)
_BANKS_DIFFER = (
    "memory banks",
    "e.g. a checkpoint path that holds another file on another node's disk, or a module loaded on some ranks only. "
    "Give every node the same checkpoint (one shared copy) and the same module, or fit again.",
)
CUSTOM_BACKBONE = "custom:"  # hparams value recording a user nn.Module backbone (not serialisable)
BankSharding = Literal["replicate", "shard"]
BANK_SHARDINGS: tuple[str, ...] = get_args(BankSharding)
# the Trainer attribute holding the dataloader each stage reads
_STAGE_LOADERS = {
    RunningStage.TRAINING: "train_dataloader",
    RunningStage.TESTING: "test_dataloaders",
    RunningStage.PREDICTING: "predict_dataloaders",
    RunningStage.VALIDATING: "val_dataloaders",
}
# hyperparameters read into submodules at construction: editing them in hparams later is refused
FIXED_AT_CONSTRUCTION = (
    "backbone",
    "pretrained",
    "input_size",
    "group_pooling",
    "group_clusters",
    "group_temperature",
    "anomaly_maps",
    "patch_bank",
    "map_images",
    "map_kappa",
    "map_sigma",
    "map_layers",
)
NO_BANK_MESSAGE = (
    "DN2Module has no memory bank yet and cannot build one: call trainer.fit(model, datamodule) first, "
    "pass a datamodule with a train_dataloader() to trainer.{fn}(model, datamodule=...), or load a fitted "
    "checkpoint (ckpt_path=...)."
)


class DN2Module(DecisionThreshold, BankCheckpointing, LightningModule):
    """Deep Nearest Neighbour anomaly detection (Bergman, Cohen & Hoshen, 2020).

    ``fit`` makes one pass over the train dataloader and keeps the embeddings (the memory bank, a
    checkpointed buffer). Evaluation scores each sample by the mean squared Euclidean distance to its
    ``k`` nearest bank embeddings and logs ``{val,test}/auroc``. ``test``/``validate``/``predict``
    without ``fit`` build the bank from the datamodule's ``train_dataloader()`` on first need.

    Args:
        k: neighbours averaged in the score (paper: 2).
        backbone: a registered name (:func:`~dn2_lightning.list_backbones`) or an ``nn.Module`` mapping
            images ``[B, 3, H, W]`` in [0, 1] to ``[B, D]``.
        pretrained: load the backbone's ImageNet weights.
        input_size: the backbone's input resolution (resized on the device); ``None``: its own.
        knn_backend: exact kNN engine; ``"auto"`` is ``"torch"``.
        max_memory_bytes: temporary-memory budget of one kNN search (``None``: 512 MiB).
        clean_fraction: unsupervised setting: share of the bank with the largest leave-one-out scores
            dropped (paper: 0.5); 0 = no cleaning.
        clean_k: neighbours of the cleaning score (200: best of a sweep in ``benchmarks/RESULTS.md``).
        group_pooling: groups ``[B, M, C, H, W]``: ``"mean"`` (paper), ``"histogram"`` (composition: soft
            assignments to k-means centroids of the training members), or ``"none"`` (point-wise).
        group_clusters: k-means centroids of the histogram pooling.
        group_temperature: softness of the histogram's member-to-centroid assignments.
        threshold_quantile: the threshold is this quantile of the training images' leave-one-out scores (never test
            data); about ``1 - threshold_quantile`` of normal images are flagged.
        threshold: a fixed threshold on the score instead (``None``: use the quantile).
        threshold_samples: at most this many training images' scores (drawn, fixed seed) set the quantile; None: all.
        bank_sharding: under DDP, ``"replicate"`` the bank on every rank or ``"shard"`` it (exact).
        reports: write CSVs, ``summary.json`` and figures to ``<log dir>/dn2_reports/<stage>_<N>/``.
        anomaly_maps: also compute SPADE pixel maps (``anomaly_map`` in predict, pixel AUROC/PRO in test).
        patch_bank: maps: ``"nearest_images"`` (SPADE) or ``"all"`` (every training position).
        map_images: maps: K nearest training images per test image (SPADE: 50).
        map_kappa: maps: nearest patch features averaged per position (SPADE: 1).
        map_sigma: maps: Gaussian smoothing in image pixels (SPADE: 4).
        map_layers: maps: trunk stages of the patch pyramid (``None``: ResNet layer1-3 / Lite strides 4-16).

    Details of each setting: README.md ("Your own images", "Anomaly maps", "Group anomalies").
    """

    def __init__(
        self,
        k: int = 2,
        backbone: str | nn.Module = "resnet152",
        pretrained: bool = True,
        input_size: int | None = None,
        knn_backend: KNNBackend = "auto",
        max_memory_bytes: int | None = None,
        clean_fraction: float = 0.0,
        clean_k: int = 200,
        group_pooling: GroupPoolingName = "mean",
        group_clusters: int = 10,
        group_temperature: float = 0.3,
        threshold_quantile: float = 0.99,
        threshold: float | None = None,
        threshold_samples: int | None = 20_000,
        bank_sharding: BankSharding = "replicate",
        reports: bool = True,
        anomaly_maps: bool = False,
        patch_bank: PatchBankName = "nearest_images",
        map_images: int = 50,
        map_kappa: int = 1,
        map_sigma: float = 4.0,
        map_layers: list[str] | None = None,
    ) -> None:
        super().__init__()
        for name, flag in (("pretrained", pretrained), ("reports", reports), ("anomaly_maps", anomaly_maps)):
            check_bool(name, flag)
        if isinstance(backbone, str) and backbone.startswith(CUSTOM_BACKBONE):
            raise ValueError(
                f"this model was built with a custom backbone ({backbone[len(CUSTOM_BACKBONE) :]}), which a "
                "checkpoint cannot hold: pass it again, e.g. DN2Module.load_from_checkpoint(path, "
                "backbone=MyBackbone()) (in a config: model.backbone.class_path)."
            )
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        hp = self.hparams
        hp.update(as_python(dict(hp)))  # NumPy numbers (e.g. from a grid search) as Python ones, for checkpoints
        _validate_hparams(hp)
        if isinstance(backbone, nn.Module):
            hp["backbone"] = CUSTOM_BACKBONE + type(backbone).__qualname__
        self._built_with = {name: copy.deepcopy(hp[name]) for name in FIXED_AT_CONSTRUCTION}
        # DN2 has nothing to optimise: fit is one feature-extraction pass, driven by training_step.
        self.automatic_optimization = False
        self.backbone = build_backbone(backbone, pretrained=pretrained, image_size=hp.input_size)
        self.bank = MemoryBank()
        # a fixed threshold travels with plain state dicts too (also as a submodule's, or a compiled module's)
        self.register_state_dict_post_hook(record_fixed_threshold)
        self.register_load_state_dict_post_hook(adopt_recorded_threshold)
        pooling = "mean" if group_pooling == "none" else group_pooling  # "none" pools nothing: members are scored
        self.group_pool = GroupPooling(pooling, clusters=hp.group_clusters, temperature=hp.group_temperature)
        validate_map_options(patch_bank, hp.map_images, hp.map_kappa, hp.map_sigma)
        self.maps: AnomalyMaps | None = None
        if anomaly_maps:
            if bank_sharding == "shard":
                raise ValueError("anomaly_maps=True needs bank_sharding='replicate' (the patch bank is not sharded).")
            self.maps = AnomalyMaps(
                self.backbone,
                patch_bank,
                hp.map_images,
                hp.map_kappa,
                hp.map_sigma,
                hp.map_layers,
                knn_backend,
                hp.max_memory_bytes,
            )
        # DDP broadcasts rank 0's buffers at set-up; the banks and the group centroids are made consistent by
        # their own gathering (and the bank differs per rank when sharded), so they are excluded as DDP allows.
        self._ddp_params_and_buffers_to_ignore = [f"bank.{name}" for name, _ in self.bank.named_buffers()]
        self._ddp_params_and_buffers_to_ignore += [f"group_pool.{name}" for name, _ in self.group_pool.named_buffers()]
        self._ddp_params_and_buffers_to_ignore += [f"maps.bank.{name}" for name, _ in PatchBank().named_buffers()]
        self.val_collector = ScoreCollector()
        self.test_collector = ScoreCollector()
        self.predict_collector = ScoreCollector(padded=False)
        # inputs are already gathered and de-duplicated by the collectors, so no second sync
        self.val_auroc = BinaryAUROC(sync_on_compute=False)
        self.test_auroc = BinaryAUROC(sync_on_compute=False)
        self.val_scores: AnomalyScores | None = None
        self.test_scores: AnomalyScores | None = None
        self.predict_scores: AnomalyScores | None = None
        self._paths: dict[int, str] = {}  # dataset index -> file, for the stage being evaluated
        self.bank_report: dict[str, float] = {}
        self._collector: BankCollector | None = None
        # how far this rank has read the training pass / the evaluation being run (kept apart: a validation inside
        # the training epoch must not renumber the training samples that follow it)
        self._train_stream, self._eval_stream = Reading(), Reading()
        self._stream_loader: DataLoader | None = None  # the loader being read outside Lightning's loops
        self._members_per_group = 0  # M of the group batches whose members are bank rows (group_pooling="none")
        self._bank_of_groups = False  # the pass being read has group batches [B, M, C, H, W]
        self._searches_owed = 0  # sharded predict: collective searches this rank still has to join
        self._bank_is_shard = False
        self._warned_no_threshold: tuple[int, int] | None = None  # (bank size, k) of the last such warning
        self._warned_few_threshold_scores: tuple[int, float] | None = None  # (scores, quantile) of the last one
        self._threshold_said: tuple[str, object] | None = None  # the threshold's last explanation, with its line
        # (value, k) of a fixed threshold: the k whose scores it was set for (it does not follow later k changes)
        self._fixed_threshold: tuple[float, int] | None = None if threshold is None else (float(threshold), hp.k)
        self._warned_threshold_k: tuple[float, int, int] | None = None
        self.fit_built_bank = False  # whether the last fit embedded its train data (not so when resumed when done)
        self._pass_started = self._resumed_mid_pass = False  # this fit's epoch began here; it began in a checkpoint
        self._pass_done = False  # this fit read its whole pass (later epochs, forced by min_epochs/min_steps, do not)
        self._bank_datamodule: weakref.ref | None = None  # the datamodule a bank built on first need came from
        self._pass_batches: tuple[int, int] | None = None  # (read, in all) of the training pass being finalised
        self._bank_step: float = 0  # the global step at which fit built the bank (checkpoints saved before lack it)
        self._trainer_spent = False  # this fit's Trainer had run its epochs before it started
        self._bank_autocast: str | None = None  # autocast dtype the bank rows are being embedded under, if any
        self._embedding_bank_rows = False  # forward embeds under the autocast in force (else the bank's)
        self._pixels_checked = False  # forward is called by _embed, whose batches were checked already
        self._fingerprint_weights: tuple | None = None  # the backbone's weights when the fingerprint was last compared
        self._checks_behind = ChecksBehind()  # the training pass's checks that read the device, one batch later
        # under DDP: this rank's error in the training pass / the evaluation, raised with the others' later
        self._held_errors: dict[str, Exception] = {}
        self._checkpoint_error: Exception | None = None  # under DDP: what is wrong with the checkpoint this rank read
        self._restored_from: tuple[Any, Any] | None = None  # (epoch, global_step) of the checkpoint restored, if any
        self._searches_made = 0  # searches of the bank so far (a sharded one's are collectives)
        self._other_size: tuple[int, int] | None = None  # this evaluation's first size other than the training one
        self._unlabelled_folder = False  # this evaluation reads a one-folder ImageFolder: its labels are unknown
        self._said_unlabelled: int | None = None  # id() of the last such dataset said so

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_bank_datamodule"] = None  # a weakref (which cannot be pickled) to an object of this process
        state["_fingerprint_weights"] = None  # this process's tensors: an unpickled module checks its backbone again
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_embedding_bank_rows", False)
        self.__dict__.setdefault("_pixels_checked", False)
        self.__dict__.setdefault("_fingerprint_weights", None)
        self.__dict__.setdefault("_checks_behind", ChecksBehind())
        self.__dict__.setdefault("_other_size", None)
        self.__dict__.setdefault("_unlabelled_folder", False)
        self.__dict__.setdefault("_said_unlabelled", None)
        self.__dict__.setdefault("_warned_few_threshold_scores", None)
        # a module pickled by an earlier dn2-lightning has no state-dict hooks: the fixed threshold travels all the same
        if record_fixed_threshold not in self._state_dict_hooks.values():
            self.register_state_dict_post_hook(record_fixed_threshold)
        if adopt_recorded_threshold not in self._load_state_dict_post_hooks.values():
            self.register_load_state_dict_post_hook(adopt_recorded_threshold)

    def __setattr__(self, name: str, value: Any) -> None:
        """Refuse a setting assigned as an attribute (``model.k = 5``): it would make a new attribute that nothing
        reads, and the scores would stay those of ``hparams.k``; and another backbone once built (the bank's rows, the
        maps' patch features and the recorded settings all come from the one built)."""
        if name == "backbone" and self._modules.get("backbone") not in (None, value):
            raise AttributeError(
                "model.backbone = ... would embed queries with another backbone than the one the memory bank's rows "
                "(and the recorded settings) come from, so scores would compare two embeddings. The backbone is fixed "
                "when the model is built: build a new DN2Module(backbone=...) and fit it (to compile it, compile the "
                "whole module: torch.compile(model))."
            )
        hparams = self.__dict__.get("_hparams")
        if (
            hparams is not None
            and name in hparams
            and name in _SETTINGS  # a subclass's own constructor argument (also in hparams) is its attribute to set
            and not hasattr(type(self), name)
            and not isinstance(value, nn.Module)  # the backbone: a submodule of that name, which is read
            and all(name not in where for where in (self.__dict__, self._modules, self._parameters, self._buffers))
        ):
            fix = (
                f"pass it when the model is built, DN2Module({name}=...) or DN2Module.load_from_checkpoint(path, "
                f"{name}=...)"
                if name in FIXED_AT_CONSTRUCTION
                else f"set model.hparams.{name} = {value!r} (read at each use)"
            )
            raise AttributeError(
                f"model.{name} = {value!r} would set an attribute that DN2Module never reads: its settings live in "
                f"model.hparams (now {name}={hparams[name]!r}), so the scores would not change. {fix[0].upper()}"
                f"{fix[1:]}."
            )
        super().__setattr__(name, value)

    def to(self, *args: Any, **kwargs: Any) -> DN2Module:
        _refuse_16_bit(torch._C._nn._parse_to(*args, **kwargs)[1])
        return super().to(*args, **kwargs)

    def half(self) -> DN2Module:
        _refuse_16_bit(torch.float16)
        return super().half()

    def bfloat16(self) -> DN2Module:
        _refuse_16_bit(torch.bfloat16)
        return super().bfloat16()

    def type(self, dst_type: str | torch.dtype) -> DN2Module:
        _refuse_16_bit(dst_type if isinstance(dst_type, torch.dtype) else torch.empty(0).type(dst_type).dtype)
        return super().type(dst_type)

    def _apply(self, fn: Any, recurse: bool = True) -> DN2Module:
        # .half(), .bfloat16(), .to(torch.float16): refused before anything is cast (an empty tensor tells what
        # ``fn`` does), since a rounded bank would stay rounded after .float()
        # (a parent's cast reaches here only: to/half/bfloat16/type refuse before Lightning updates its properties)
        probe = fn(torch.empty(0))
        cast = probe.dtype
        to_meta = probe.device.type == "meta" and self.bank.is_set
        if cast in (torch.float16, torch.bfloat16) or to_meta:
            # Lightning's dtype and device properties were set before the cast was asked for: nothing moved
            weights = next((p for p in (*self.parameters(), *self.backbone.buffers()) if p.is_floating_point()), None)
            if weights is not None:
                self._dtype, self._device = weights.dtype, weights.device
            _refuse_16_bit(cast)
            raise ValueError(
                "DN2Module with a memory bank cannot be moved to the meta device (.to('meta'), .to_empty(device="
                "'meta')): the bank's rows would be dropped for good, and every later score would fail. Keep the "
                "module where it is (a copy: copy.deepcopy(model)), or save it first (trainer.save_checkpoint) and "
                "reload it with DN2Module.load_from_checkpoint."
            )
        return super()._apply(fn, recurse)

    def to_torchscript(self, *args: Any, **kwargs: Any) -> Any:
        """Not supported (Lightning deprecates it): scripting fails on the bank's state, and tracing would fix the
        example's dtype and size into the graph without a word. Export :meth:`forward` with ``torch.export`` or
        :meth:`to_onnx` instead (README: Deploying)."""
        raise NotImplementedError(
            "DN2Module.to_torchscript is not supported: scripting fails on the memory bank's state, and a trace "
            "would silently keep the example's dtype and image size (other inputs would embed wrongly). Export the "
            "embedder with torch.export.export(model.eval(), (images,)) or model.to_onnx(path, images), which refuse "
            "other inputs clearly, and score its output with DN2Detector fitted on model.bank.embeddings (README: "
            "Deploying)."
        )

    def to_onnx(self, file_path: Any = None, input_sample: Any = None, **kwargs: Any) -> Any:
        """Lightning's export of :meth:`forward` (the embedder) with torch's default (dynamo) exporter; the
        TorchScript-based one (``dynamo=False``) cannot read the bank's state."""
        if kwargs.get("dynamo") is False:
            raise ValueError(
                "to_onnx(..., dynamo=False): torch's TorchScript-based ONNX exporter cannot read the memory bank's "
                "state. Leave dynamo at its default (True), or export model.backbone alone with it."
            )
        return super().to_onnx(file_path, input_sample, **kwargs)

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        """Embeddings ``[B, D]`` of images ``[B, C, H, W]``, or pooled embeddings of groups
        ``[B, M, C, H, W]`` (``mask [B, M]`` marks real members; pooling by ``group_pooling``).

        Once a bank exists, images are embedded as its rows were (under their autocast, e.g. a
        ``precision="bf16-mixed"`` fit), so ``forward`` and a model exported from it embed as ``score_images`` does.
        It is the embedder only: README's "Deploying" shows how to score its output against the bank. Called
        directly, it refuses pixels the backbone would misread (0..255 floats, other integer types), as the loaders
        and ``score_images`` do (not while ``torch.export`` or ``torch.compile`` traces it)."""
        if not self._pixels_checked and not _tracing():
            check_pixels(images)
        with contextlib.nullcontext() if self._embedding_bank_rows else self._embedding_precision():
            return self._embed_images(images, mask)

    def _embed_images(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        """:meth:`forward` under the autocast in force (bank rows are embedded so, and record it)."""
        if images.ndim == 5:
            if mask is not None and not self._embedding_bank_rows:  # the training pass's is read a batch later
                check_group_mask(mask, images)
            b, m = images.shape[:2]
            members = self.backbone(images.flatten(0, 1)).view(b, m, -1)
            return self.group_pool(members, mask)
        return self.backbone(images)

    # ----------------------------------------------------------------------------------------- training

    def setup(self, stage: str) -> None:
        follow_trainer(self.trainer.world_size)  # e.g. Trainer(devices=1).test after a DDP fit: no gathers
        self._check_hparams()
        self._checkpoint_error, self._restored_from = None, None  # set again by this run's restore, if any
        # (the kNN's backend and memory budget may follow each node's device: their results are the same)
        settings = {k: v for k, v in self.hparams.items() if k not in ("knn_backend", "max_memory_bytes")}
        same = "Build the same module on every rank (the same arguments, or one checkpoint with the same overrides)."
        refuse_ranks_that_differ(settings, "DN2Module settings", same)
        strategy = self.trainer.strategy
        # runs before Lightning restores ckpt_path: make that load weights-only too (Lightning loads remote
        # paths with weights_only=False, i.e. it would run a downloaded file's pickled code)
        if not isinstance(strategy.checkpoint_io, WeightsOnlyCheckpointIO):
            strategy.checkpoint_io = WeightsOnlyCheckpointIO(strategy.checkpoint_io)
        precision = str(self.trainer.precision)
        if precision in ("bf16-true", "16-true"):
            raise ValueError(
                f"Trainer(precision={precision!r}) casts the backbone's weights to 16 bits, which DN2's float32 "
                "preprocessing and memory bank do not take: use precision='bf16-mixed' (autocast: the backbone runs "
                "in bfloat16 where it is safe, the bank stays float32) or '32-true'."
            )
        if stage == "fit":
            _refuse_tuning_callbacks(self.trainer.callbacks)
        frozen = not any(p.requires_grad for p in self.parameters())
        if stage == "fit" and isinstance(strategy, DDPStrategy) and frozen:
            # torch's DistributedDataParallel refuses a module without trainable parameters, and DN2 has no
            # gradients to synchronise: fit runs unwrapped (each rank embeds its shard, the bank is gathered
            # afterwards), with the weights made identical on every rank as DDP would.
            strategy.configure_ddp = lambda: broadcast_module_state(self.backbone)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """Embed one training batch into the memory bank being collected (no loss, no optimizer step: DN2's fit
        is one pass of the frozen backbone); returns ``None``."""
        self.fit_built_bank = True  # also when fit resumes mid-epoch (on_train_epoch_start is skipped then)
        if not self._pass_started:
            # resumed mid-epoch: Lightning feeds the epoch's remaining batch count from a restarted iterator, so
            # these batches are not the missing ones; the whole pass is read again at the epoch's end instead
            self._resumed_mid_pass = True
            self._count_bank_step()
            if self._pass_ends_here():
                self._reread_pass("fit resumed from a mid-epoch checkpoint")
            return
        if self._pass_done:  # an epoch after the pass (min_epochs, min_steps): counted, not embedded
            self._count_bank_step()
            return
        if "pass" not in self._held_errors:
            with self._holding_errors("pass"), torch.no_grad(), self._checks_behind.first_on_error():
                parsed = unpack_batch(self._stage_batch(batch), batch_idx, defer=self._checks_behind.add)
                rows = self._bank_rows(parsed, batch_idx)
                self._checks_behind.advance()  # this batch's work is queued: the batch before's checks cost no wait
                if self._collector is None:
                    self._collector = BankCollector()
                self._collector.add(*rows, paths=parsed.paths)
        self._count_bank_step()
        if self._pass_ends_here():  # the bank now, so a checkpoint saved at this step (every_n_train_steps) holds it
            self._end_pass()

    def teardown(self, stage: str) -> None:
        follow_trainer(None)  # outside a run (trainer.save_checkpoint, score_images): the process group's

    def on_fit_start(self) -> None:
        self._agree_on_the_checkpoint()
        # a module from load_from_checkpoint is in eval mode, which Lightning warns about before training; the
        # backbone embeds alike in either mode
        self.train()
        self.fit_built_bank = False
        self._pass_started = self._resumed_mid_pass = self._pass_done = False
        # rows and an unread finiteness verdict of an earlier fit that stopped on an error are never this fit's (one
        # resumed mid-epoch starts no pass before a validation inside it)
        self._collector = None
        self._checks_behind.drop()
        max_epochs, max_steps = self.trainer.max_epochs, self.trainer.max_steps
        # a Trainer that already ran its epochs (or steps) in an earlier fit runs none in this one
        self._trainer_spent = (max_epochs is not None and 0 < max_epochs <= self.trainer.current_epoch) or (
            0 < max_steps <= self.trainer.global_step
        )

    def on_train_epoch_start(self) -> None:
        self.fit_built_bank = self._pass_started = True
        if self._pass_done:  # Lightning runs more epochs only for min_epochs or min_steps
            info(
                f"DN2: the memory bank is complete; epoch {self.trainer.current_epoch} runs only for the Trainer's "
                f"min_epochs={self.trainer.min_epochs} / min_steps={self.trainer.min_steps} and embeds nothing."
            )
            return
        refuse_ranks_drawing_their_own_samples(self._train_loader)
        refuse_ranks_reading_other_data(self._train_loader)
        self._start_pass()

    def _start_pass(self) -> None:
        """A new pass over the training data: nothing collected yet."""
        self._collector = BankCollector()
        self._checks_behind.drop()
        self._held_errors.pop("pass", None)
        if self.maps is not None:
            self.maps.start_collecting()
        self._train_stream, self._members_per_group, self._bank_of_groups = Reading(), 0, False

    def on_train_epoch_end(self) -> None:
        if self._resumed_mid_pass:
            self._reread_pass("fit resumed from a mid-epoch checkpoint")
        elif self._collector is not None:
            self._end_pass()
        self._pass_done = self._pass_done or self._has_bank
        # one pass is all DN2 needs; more epochs would rebuild the same bank
        self.trainer.should_stop = True

    def on_fit_end(self) -> None:
        restored = self.trainer.ckpt_path is not None
        if not self.fit_built_bank and not restored and self._trainer_spent:
            raise RuntimeError(
                f"trainer.fit ran no training epoch: this Trainer already ran its max_epochs={self.trainer.max_epochs}"
                f" (max_steps={self.trainer.max_steps}) in an earlier fit, so nothing was embedded. Use a new "
                "Trainer for each fit."
            )
        if not self._has_bank and (self.fit_built_bank or not restored):
            raise ValueError(
                "fit read no training batches (the train dataloader is empty, limit_train_batches=0, or max_time ran "
                "out first), so there is no memory bank: give it the normal training images."
            )
        if not self.fit_built_bank:
            self._restore_or_reread_the_pass()
        if self.fit_built_bank and self.checkpoints_lack_the_bank:
            rank_zero_warn(
                f"no checkpoint of this fit holds its memory bank: ModelCheckpoint's files (last saved at step "
                f"{self._last_checkpoint_step}) predate it. Save it with trainer.save_checkpoint(path), or let "
                "ModelCheckpoint save at the epoch's end (every_n_epochs=1)."
            )
        elif self.fit_built_bank and self.checkpoints_missing:
            rank_zero_warn(
                "ModelCheckpoint saved no checkpoint in this fit: DN2's fit is one epoch, and it saves after a "
                "validation or an epoch that this one was not (check_val_every_n_epoch > 1, every_n_epochs > 1, "
                "every_n_train_steps above the pass's steps). Save the bank with trainer.save_checkpoint(path), or "
                "use check_val_every_n_epoch=1 and ModelCheckpoint's defaults."
            )

    def _restore_or_reread_the_pass(self) -> None:
        """Fit resumed from a checkpoint whose pass Lightning counts as done: keep its bank (checked against this
        data) unless it holds none or a pass this run would read further, which is then read again."""
        seen, total = self.bank.spec.get("train_batches") or (0, 0)
        state = {"(holds a bank, batches read, in pass)": (self._has_bank, seen, total)}
        refuse_ranks_that_differ(state, *_BANKS_DIFFER)
        if not self._has_bank:
            self._reread_pass("the checkpoint holds no memory bank (saved before its training pass ended)")
        elif seen < min(total if total is not None else float("inf"), self.trainer.num_training_batches):
            self._reread_pass(f"the checkpoint's bank was built from {batch_count(seen, total)}")
        else:
            # the ranks' banks agree first: the fingerprint check then meets one bank (and rank 0's broadcast weights)
            refuse_ranks_with_other_banks(self.bank.summary())
            with stop_together():
                self._check_settings_against_bank()
            if total is None or seen < total:
                rank_zero_warn(
                    f"fit restored a memory bank built from {batch_count(seen, total)} (this "
                    f"run reads {seen} too): scores use a partial bank; fit without the limit to read the whole pass.",
                    stacklevel=5,
                )
            else:
                info("DN2: fit restored the memory bank from ckpt_path (its pass was complete): nothing was embedded.")
            if self._sharded:  # the checkpoint's whole bank: each rank keeps its shard, as a bank built here would
                self._bank_builder.keep_own_shard()
            self._bank_is_shard = self._sharded
            return
        self._bank_step = math.inf  # built after the fit loop, so after every save Lightning made

    @property
    def _last_checkpoint_step(self) -> int:
        """The global step of this fit's last ModelCheckpoint save (0: none; ``_last_global_step_saved`` starts
        at 0, and fast_dev_run or every_n_epochs=2 on one epoch never save)."""
        return max((getattr(c, "_last_global_step_saved", 0) for c in self.trainer.checkpoint_callbacks), default=0)

    @property
    def checkpoints_lack_the_bank(self) -> bool:
        """Whether this fit's ModelCheckpoint files all predate its bank: saves of every_n_train_steps=N that miss
        the pass's last step, or any file it names (also one restored from ckpt_path) when the bank was read again
        after the fit loop."""
        if not self.trainer.checkpoint_callbacks:
            return False
        return self._bank_step == math.inf or 0 < self._last_checkpoint_step < self._bank_step

    @property
    def checkpoints_missing(self) -> bool:
        """Whether this fit has a ModelCheckpoint that saved nothing (e.g. ``check_val_every_n_epoch=2``: DN2 stops
        after one epoch, before its first validation)."""
        saving = [c for c in self.trainer.checkpoint_callbacks if getattr(c, "save_top_k", 1) or c.save_last]
        if not saving or self.trainer.fast_dev_run or self._bank_step == math.inf:  # inf: checkpoints_lack_the_bank
            return False
        return self._last_checkpoint_step == 0

    def _pass_ends_here(self) -> bool:
        """Whether this training batch is the pass's last: the loader's (``limit_train_batches`` included) or
        ``max_steps``'."""
        max_steps = self.trainer.max_steps
        return self.trainer.is_last_batch or 0 <= max_steps <= self.trainer.global_step

    def _end_pass(self, loader: Any = None, partial: bool = True) -> None:
        """The pass over ``loader`` (the trainer's train dataloader by default) is over: its collected rows become
        the bank, with a warning when ``partial`` batch limits or ``drop_last`` left rows out."""
        assert self._collector is not None
        with self._holding_errors("pass"):
            self._checks_behind.flush()  # the last batch's
        self._raise_held_error("pass")
        if partial:
            self._warn_if_partial_pass(self._collector.num_batches)
        loader = loader if loader is not None else self._train_loader
        refuse_iterable_cut_short(loader, self._train_stream, "training")
        warn_if_drop_last(loader, "training samples are not in the memory bank")
        self._finalize_bank()
        self._bank_step = self.trainer.global_step

    def _reread_pass(self, why: str) -> None:
        """Build the bank from one whole pass of the trainer's train dataloader (within its batch limits)."""
        info(f"DN2: {why}: reading the training pass again for the memory bank.")
        self._build_bank_from(self._train_loader, limit=self._batch_limit)
        self._resumed_mid_pass, self.fit_built_bank = False, True

    @property
    def _batch_limit(self) -> float:
        """The most training batches this fit reads in its pass: ``limit_train_batches`` and ``max_steps``."""
        max_steps = self.trainer.max_steps if self.trainer.max_steps >= 0 else float("inf")
        return min(self.trainer.num_training_batches, max_steps)

    def _warn_if_partial_pass(self, seen: int) -> None:
        total = sized_len(self._train_loader)
        if total is None:  # no length (an IterableDataset): whole, unless a batch limit is what stopped the pass
            total = None if seen >= self._batch_limit else seen
        self._pass_batches = (seen, total)
        if total is None or seen < total:
            rank_zero_warn(
                f"the memory bank was built from {batch_count(seen, total)} "
                "(limit_train_batches, max_steps, overfit_batches or fast_dev_run); scores use a partial bank.",
                stacklevel=5,
            )

    def configure_optimizers(self) -> list:
        return []

    def _apply_batch_transfer_handler(
        self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0
    ) -> Any:
        """Lightning's copy of a batch to the device, with float64 tensors (NumPy's default: labels given as floats,
        float64 images) sent as float32 to a device without float64 (Apple's MPS), where Lightning's copy raised;
        their values are 0/1/-1 labels and [0, 1] pixels, which the backbone reads in float32 anyway. Not in the
        ``transfer_batch_to_device`` hook: a LightningModule overriding it makes Lightning warn on every run with a
        datamodule ("You have overridden `transfer_batch_to_device` in `LightningModule` ...")."""
        batch = _float64_batch_as_float32(batch, device or self.device)
        return super()._apply_batch_transfer_handler(batch, device, dataloader_idx)

    def configure_callbacks(self) -> list:
        """:class:`~dn2_lightning.checkpointing.QuietOptimizerAdvice` and the report callbacks (``reports=True``),
        except kinds the Trainer already has: the user's own (e.g. ``EvaluationReport(out_dir=...)``), which Lightning
        would otherwise replace, or those of an earlier call."""
        from dn2_lightning.reports import EvaluationReport

        callbacks: list = [QuietOptimizerAdvice()]
        if self.hparams.reports:
            callbacks.append(EvaluationReport())
            if self.maps is not None:
                from dn2_lightning.maps.figures import MapReport

                callbacks.append(MapReport())
        present = self._trainer.callbacks if self._trainer is not None else []
        return [callback for callback in callbacks if not any(isinstance(c, type(callback)) for c in present)]

    # --------------------------------------------------------------------------------------- evaluation

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            self._ensure_bank()
        self._start_evaluation()

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        _refuse_second_dataloader(dataloader_idx, "validate")
        if not self.trainer.sanity_checking and self._evaluates_batch():  # the sanity check runs before the bank
            with self._holding_errors("evaluation", joins_search=True):
                self._score_into(self.val_collector, self._evaluation_batch(batch, batch_idx)[1], batch_idx)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.val_scores = self._report("val", self.val_collector, self.val_auroc)

    def on_test_epoch_start(self) -> None:
        self._ensure_bank()
        self._start_evaluation()

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        _refuse_second_dataloader(dataloader_idx, "test")
        if not self._evaluates_batch():
            return
        with self._holding_errors("evaluation", joins_search=True):
            batch, parsed = self._evaluation_batch(batch, batch_idx)
            if self.maps is None:
                self._score_into(self.test_collector, parsed, batch_idx)
                return
            scores, knn, maps = self.score_with_maps(parsed, batch_idx)
            indices = self._indices_of(parsed, batch_idx)
            self.test_collector.update(indices, scores, parsed.labels, knn.indices, knn.values)
            self.maps.update_metrics(indices, maps, gt_masks_of(batch), gt_regions_of(batch))

    def on_test_epoch_end(self) -> None:
        self.test_scores = self._report("test", self.test_collector, self.test_auroc)
        if self.maps is not None:
            pixel = self.maps.compute_metrics()
            if pixel:
                self.log_dict({f"test/{name}": value for name, value in pixel.items()}, sync_dist=False)
            else:
                info(
                    "DN2 test: no anomalous pixel in the test masks (no 'gt_mask' in the batches: a folder dataset "
                    "reads root/ground_truth/<kind>/<stem>_mask.png), so pixel AUROC and PRO are not computed."
                )

    def on_predict_epoch_start(self) -> None:
        self.predict_scores = None
        self._ensure_bank()
        self._start_evaluation()
        self._searches_owed = 0
        batches = self.trainer.num_predict_batches
        if self._sharded and all(math.isfinite(n) for n in batches):
            # every sharded search is a collective, one per batch, but Lightning's predict sampler does not pad:
            # a rank with fewer batches joins the others' remaining searches with empty ones once its own end
            mine = int(sum(batches))  # at least one (Lightning runs no predict hook on a rank without batches)
            self._searches_owed = max(gather_objects(mine)) - mine

    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._searches_owed and batch_idx + 1 == self.trainer.num_predict_batches[dataloader_idx]:
            self._pay_owed_searches()

    def _pay_owed_searches(self) -> None:
        empty = torch.empty(0, self.bank.dim, device=self.bank.embeddings.device)
        for _ in range(self._searches_owed):
            self._search(empty, self.hparams.k)
        self._searches_owed = 0

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Per sample: ``score``, ``normalized`` score, ``is_anomaly`` (score > threshold; ``None`` when no
        threshold is defined), ``label``, ``index``, and the train-set ``neighbours`` with their squared
        ``distances``. All ranks' rows are also gathered into :attr:`predict_scores` at the end."""
        _refuse_second_dataloader(dataloader_idx, "predict")
        if not self._evaluates_batch():
            return self._no_predictions()
        with self._holding_errors("evaluation", joins_search=True):
            return self._predict_batch(batch, batch_idx)
        return self._no_predictions()  # an error held under DDP (raised at the end, on every rank)

    def _no_predictions(self) -> dict[str, Any]:
        """A batch's outputs with no rows, after an error held under DDP: a prediction writer (or any
        ``on_predict_batch_end``) reading the usual keys gets no rows instead of ``None``, so the held error, raised
        on every rank at the end of the pass, is the one the user sees."""
        k, device = self.hparams.k, self.device
        rows = torch.empty(0, device=device)
        out = {
            "score": rows,
            "normalized": rows,
            "is_anomaly": None if self.threshold.isnan() else rows.bool(),
            "label": rows.long(),
            "index": rows.long(),
            "neighbours": torch.empty(0, k, dtype=torch.long, device=device),
            "distances": torch.empty(0, k, device=device),
        }
        if self.maps is not None:
            out["anomaly_map"] = torch.empty(0, 0, 0, device=device)
        return out

    def _predict_batch(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        parsed = self._evaluation_batch(batch, batch_idx)[1]
        indices = self._indices_of(parsed, batch_idx)
        if self.maps is None:
            scores, knn = self.score(parsed, batch_idx)
        else:
            scores, knn, maps = self.score_with_maps(parsed, batch_idx)
        self.predict_collector.update(indices, scores, parsed.labels, knn.indices, knn.values)
        self._remember_paths(indices, parsed.paths)
        threshold = self.threshold
        out = {
            "score": scores,
            "normalized": self.normalized(scores),
            "is_anomaly": None if threshold.isnan() else exceeds(scores, threshold),
            "label": parsed.labels,
            "index": indices,
            "neighbours": knn.indices,
            "distances": knn.values,
        }
        if parsed.paths is not None:
            out["path"] = list(parsed.paths)
        if self.maps is not None:
            out["anomaly_map"] = maps
        return out

    def on_predict_epoch_end(self) -> None:
        self.predict_scores = self._collect("predict", self.predict_collector)
        scores = self.predict_scores
        flagged = "undefined (no threshold)" if scores.is_anomaly is None else int(scores.is_anomaly.sum())
        info(
            f"DN2 predict: {len(scores)} samples scored against a bank of {self._bank_builder.size()} embeddings, "
            f"flagged as anomalous: {flagged}; {self._say_threshold()}."
        )

    # ------------------------------------------------------------------------------------------ scoring

    def score(self, batch: Batch, batch_idx: int = 0) -> tuple[Tensor, KNNResult]:
        """DN2 scores ``[B]`` of a batch, and the kNN result behind them (neighbours as train indices)."""
        self._require_bank()
        self._check_sample_kind(batch.images.ndim == 5)
        self._warn_if_other_image_size(batch.images)
        if batch.images.ndim == 5 and batch.mask is not None:
            check_group_mask(batch.mask, batch.images, batch_idx)
        if batch.images.ndim == 5 and self.hparams.group_pooling == "none":
            with self._embedding_precision():
                members = self._embed(batch.images.flatten(0, 1), batch, batch_idx)
            return worst_member(self._search(members, self.hparams.k), batch.images.shape[1], batch.mask)
        with self._embedding_precision():
            embeddings = self._embed(batch.images, batch, batch_idx)
        knn = self._search(embeddings, self.hparams.k)
        return knn_scores(knn), knn

    def _check_sample_kind(self, groups: bool) -> None:
        """Refuse single images against a bank of pooled training groups, and pooled groups against a bank of single
        images (recorded since bank format 2): either score would mean nothing. Point-wise groups
        (``group_pooling="none"``) score their members as images, against either, with a warning that the quantile
        threshold was set on the other kind of sample."""
        spec, pooling = self.bank.spec, self.hparams.group_pooling
        bank_of_groups = self._bank_of_group_samples
        if bank_of_groups and not groups and not spec.get("members_per_group"):
            raise ValueError(
                f"these samples are single images [B, C, H, W], but this memory bank holds pooled training groups "
                f"(group_pooling={pooling!r}): a single image's score against it means nothing. Score groups "
                "[B, M, C, H, W] (a GroupDataModule, or your own group batches), or fit on single images."
            )
        if groups and not bank_of_groups and pooling != "none" and spec.get("format", 1) >= 2:
            raise ValueError(
                f"these samples are groups [B, M, C, H, W], but this memory bank holds single training images: a "
                f"pooled group (group_pooling={pooling!r}) scored against them means nothing. Fit on training groups "
                "(a GroupDataModule, or your own group batches), or score each member as an image "
                "(group_pooling='none': a group scores as its worst member)."
            )
        if self.hparams.threshold is not None:  # a fixed threshold: the user chose it for these samples
            return
        if groups and not bank_of_groups:  # point-wise groups against single images
            rank_zero_warn(
                "these groups score as their worst member against a bank of single training images, whose threshold "
                "is the threshold_quantile of single images' leave-one-out scores: the worst of M members lies higher, "
                "so is_anomaly and normalized_score flag more than 1 - threshold_quantile of normal groups (scores and "
                "AUROC are unaffected). Fit on training groups (a GroupDataModule) for a group threshold, or set one "
                "with set_threshold(value=...).",
                stacklevel=6,
            )
        elif not groups and spec.get("members_per_group"):  # single images against point-wise training groups
            rank_zero_warn(
                "these single images score against a bank of training groups' members, whose threshold is the "
                "threshold_quantile of each training group's worst member: is_anomaly and normalized_score flag fewer "
                "than 1 - threshold_quantile of normal images (scores and AUROC are unaffected). Fit on single images "
                "for an image threshold, or set one with set_threshold(value=...).",
                stacklevel=6,
            )

    def _warn_if_other_image_size(self, images: Tensor) -> None:
        """Warn (once per evaluation) of samples of another size than the training batches' one size: the backbone
        resizes both to its input size, but from another resolution, so scores shift (a plain DataLoader resizing
        test images to 20 px for a bank of 48 px images flagged 8 of 8 normal ones, scores up 12x). Under DDP, a size
        seen by other ranks only is warned of at the evaluation's end (:meth:`_warn_of_other_sizes_on_other_ranks`)."""
        trained = self.bank.spec.get("train_image_size")
        size = tuple(images.shape[-2:])
        if self._other_size is not None or not trained or size == tuple(trained):
            return
        self._other_size = size
        rank_zero_warn(_other_size_message(size, trained), stacklevel=6)

    def _warn_of_other_sizes_on_other_ranks(self) -> None:
        """Rank 0 warns as soon as it sees another size; the other ranks' are gathered here (a collective)."""
        if world_size() == 1:
            return
        seen = gather_objects(self._other_size)
        others = [(r, size) for r, size in enumerate(seen) if size is not None]
        if seen[0] is None and others:
            r, size = others[0]
            rank_zero_warn(_other_size_message(size, self.bank.spec["train_image_size"], rank=r))

    @property
    def _bank_of_group_samples(self) -> bool:
        """The bank was built from pooled training groups (recorded since bank format 2)."""
        spec = self.bank.spec
        return bool(spec.get("groups") or "group_size" in (spec.get("train_set") or {}))

    def score_with_maps(self, batch: Batch, batch_idx: int = 0) -> tuple[Tensor, KNNResult, Tensor]:
        """DN2 scores ``[B]``, their kNN result and anomaly maps ``[B, H, W]`` (``anomaly_maps=True``), from one
        backbone pass over single images ``[B, C, H, W]``."""
        if self.maps is None:
            raise ValueError(
                "score_with_maps needs a model built with anomaly_maps=True (DN2Module(anomaly_maps=True), then fit); "
                "for scores alone use score_images."
            )
        self._require_bank()
        self._check_sample_kind(False)
        self._warn_if_other_image_size(batch.images)
        with self._embedding_precision(), out_of_memory_hint(lambda: self._out_of_memory_hint(batch.images)):
            embeddings, patches = self.maps.embed(self.backbone, batch.images)
        self._check_embeddings(embeddings, batch, batch_idx)
        knn = self._search(embeddings, self.hparams.k)
        maps = self.maps.maps_for(embeddings, patches, self._search, batch.images.shape[-2:])
        return knn_scores(knn), knn, maps

    @torch.no_grad()
    def score_images(self, images: ImagesLike, batch_size: int = 64) -> ImageScores:
        """Score images directly, without a DataModule.

        Args:
            images: a uint8 (0..255) or float (0..1) tensor ``[B, C, H, W]`` or ``[C, H, W]``, a PIL image, a
                file path, or a list of these. Decoded and resized as the datamodule the bank was built from
                did, so an image gets the same score here as from ``dn2 predict``.
            batch_size: images per backbone call.

        Returns:
            :class:`~dn2_lightning.metrics.ImageScores`: scores, normalised scores, ``is_anomaly`` (``None``
            without a threshold), the neighbours' train indices (and files) and their squared distances.

        Raises:
            RuntimeError: the model has no memory bank (fit it or load a checkpoint first).
            ValueError: an input it cannot read, naming its position.
        """
        self._check_hparams()
        check_positive_int("batch_size", batch_size, hint=" (images per backbone call)")
        self._require_bank()
        self._check_model_against_bank()
        self._warn_if_fixed_threshold_meets_another_k()  # as an evaluation run does, e.g. after an hparams.k edit
        parts: list[tuple[Tensor, KNNResult]] = []
        maps: list[Tensor] = []
        for chunk, _ in as_image_batches(images, self._scoring_size()):
            for piece in chunk.split(batch_size):
                piece = _float64_batch_as_float32(piece, self.device)
                batch = Batch(piece.to(self.device), torch.full((len(piece),), -1, device=self.device), None)
                if self.maps is None:
                    parts.append(self.score(batch))
                else:
                    scores, knn, piece_maps = self.score_with_maps(batch)
                    parts.append((scores, knn))
                    maps.extend(piece_maps.cpu().unbind(0))  # images of different sizes give different maps
        scores = torch.cat([p[0] for p in parts]).cpu()
        knn = KNNResult(*(torch.cat([getattr(p[1], f) for p in parts]).cpu() for f in ("values", "indices")))
        threshold = float(self.threshold)
        train_paths = self.bank.spec.get("train_paths")
        return ImageScores(
            scores=scores,
            normalized=self.normalized(scores).cpu(),
            is_anomaly=None if math.isnan(threshold) else exceeds(scores, threshold),
            threshold=threshold,
            neighbours=knn.indices,
            distances=knn.values,
            neighbour_paths=[[train_paths[i] for i in row] for row in knn.indices.tolist()] if train_paths else None,
            anomaly_maps=(torch.stack(maps) if len({m.shape for m in maps}) == 1 else maps) if maps else None,
        )

    def _scoring_size(self) -> int | tuple[int, int] | None:
        """The CPU resize of :meth:`score_images`: the datamodule's ``load_size``, else the one image size of the
        training batches (a plain DataLoader or a datamodule that resizes in its own transforms)."""
        spec = self.bank.spec
        if spec.get("load_size") is not None:
            return int(spec["load_size"])
        size = spec.get("train_image_size")
        return (int(size[0]), int(size[1])) if size else None

    # ------------------------------------------------------------------------------------------ search

    def _search(self, embeddings: Tensor, k: int) -> KNNResult:
        """Exact kNN of ``embeddings`` in the whole bank; neighbours as train-set sample indices."""
        self._searches_made += 1
        return self._bank_builder.search(embeddings, k)

    @contextlib.contextmanager
    def _holding_errors(self, stream: str, joins_search: bool = False) -> Iterator[None]:
        """Under DDP, an error in this rank's batch of the training ``stream="pass"`` or the ``"evaluation"`` is held,
        and its later batches skipped, until a point every rank reaches (the pass's or the stage's end), where every
        rank raises it together (:meth:`_raise_held_error`): raised here, it would leave the other ranks waiting in
        their next collective for the process group's timeout. It is logged at once, in case they never get there.
        ``joins_search``: the batch's search of a sharded bank is a collective, which this rank still joins."""
        searches = self._searches_made
        try:
            yield
        except Exception as error:
            if world_size() == 1:
                raise
            self._held_errors[stream] = error
            _log.error(
                f"DN2 rank {rank()}: {type(error).__name__}: {error} (raised on every rank at the {stream}'s end)"
            )
        held = stream in self._held_errors
        if joins_search and held and self._searches_made == searches and self._sharded:
            self._join_search()

    def _evaluates_batch(self) -> bool:
        """Whether this rank scores its batch: not after an error held under DDP (it then only joins the batch's
        collective search of a sharded bank)."""
        if "evaluation" not in self._held_errors:
            return True
        if self._sharded:
            self._join_search()
        return False

    def _join_search(self) -> None:
        """Join the other ranks' collective search of a sharded bank with no queries, this rank holding an error: a
        failure of its own part (it completes the collectives all the same) is not raised again."""
        with contextlib.suppress(Exception):
            self._search(torch.empty(0, self.bank.dim, device=self.bank.embeddings.device), self.hparams.k)

    def _raise_held_error(self, stream: str) -> None:
        """Raise on every rank together when any rank holds an error of ``stream`` (see :meth:`_holding_errors`): a
        collective."""
        error = self._held_errors.pop(stream, None)
        with stop_together():
            if error is not None:
                raise error

    def _agree_on_the_checkpoint(self) -> None:
        """Under DDP at fit's start, a problem with the checkpoint one rank restored (see ``on_load_checkpoint``) is
        raised on every rank together, where they all meet, and the ranks must resume from the same point (one that
        resumes part-way through the pass and one after it, or without a checkpoint, run other loops). One gather.
        (An evaluation makes the same check in :meth:`_ensure_bank`.)"""
        error, self._checkpoint_error = self._checkpoint_error, None
        resumed = {"(epoch, global_step)": self._restored_from}
        fix = "Give every node the same checkpoint to resume from (one shared copy), or none."
        with stop_together(resumed, "checkpoints to resume fit from", fix):
            if error is not None:
                raise error

    def _require_bank(self) -> None:
        if not self._has_bank:
            raise RuntimeError(NO_BANK_MESSAGE.format(fn="test"))
        self._refuse_a_lone_shard()

    def _refuse_a_lone_shard(self) -> None:
        """A shard of a bank sharded over ranks, met by a single-device run (e.g. ``Trainer(devices=1).test`` after a
        DDP fit with ``bank_sharding="shard"``): scores against this rank's rows alone would be silently wrong."""
        if self._bank_is_shard and not self._sharded and self.bank.is_fitted:
            raise RuntimeError(
                f"this DN2Module holds rank {process_rank()}'s shard of its memory bank ({len(self.bank)} rows; it was "
                "fit with bank_sharding='shard' under DDP), and this run is on one device: it would score against "
                "those rows alone. Save the whole bank under the DDP Trainer (trainer.save_checkpoint(path) gathers "
                "it, as ModelCheckpoint does) and load it with DN2Module.load_from_checkpoint(path), evaluate with the "
                "DDP Trainer, or fit with bank_sharding='replicate'."
            )

    @property
    def _has_bank(self) -> bool:
        """A bank is built or loaded: rows here, or this rank's shard of a sharded one (which may hold none)."""
        return self.bank.is_fitted or (self._sharded and self.bank.is_set)

    @property
    def _sharded(self) -> bool:
        return self.hparams.bank_sharding == "shard" and world_size() > 1

    def _score_into(self, collector: ScoreCollector, batch: Batch, batch_idx: int) -> None:
        indices = self._indices_of(batch, batch_idx)
        scores, knn = self.score(batch, batch_idx)
        collector.update(indices, scores, batch.labels, knn.indices, knn.values)
        self._remember_paths(indices, batch.paths)

    def _start_evaluation(self) -> None:
        loader = self._current_loader()
        refuse_ranks_drawing_their_own_samples(loader)
        refuse_ranks_reading_other_data(loader)
        dataset = getattr(loader, "dataset", None)
        self._unlabelled_folder = check_dataset_labels(dataset)
        if self._unlabelled_folder and self._said_unlabelled != id(dataset):  # once, not at every validation
            self._said_unlabelled = id(dataset)
            info(
                "DN2: the dataset is an ImageFolder of one class folder, without a target_transform: its images are "
                "read as unlabelled (label -1), not as normal. Name that folder 'good' to label them normal."
            )
        warn_if_drop_last(loader, "samples are not scored (the metrics cover the others)")
        self._eval_stream = Reading()
        self._paths = {}
        for collector in (self.val_collector, self.test_collector, self.predict_collector):
            collector.reset()  # a run that stopped on an error left its rows
        if self.maps is not None:
            self.maps.start_evaluation()
        self._held_errors.pop("evaluation", None)
        self._other_size = None
        # a collective when sharded: every rank computes it here, not lazily later (the sanity check scores nothing,
        # and runs before the ranks are checked to agree on their banks)
        if self._has_bank and not self.trainer.sanity_checking:
            self._loo_scores()
        self._warn_if_fixed_threshold_meets_another_k()  # e.g. hparams.k changed after set_threshold(value=...)

    def _evaluation_batch(self, batch: Any, batch_idx: int) -> tuple[Any, Batch]:
        """The evaluation batch on the device, and parsed (labels unknown for a one-folder ImageFolder)."""
        staged = self._stage_batch(batch)
        parsed = unpack_batch(staged, batch_idx)
        if self._unlabelled_folder:
            parsed = parsed._replace(labels=torch.full_like(parsed.labels, -1))
        return staged, parsed

    def _remember_paths(self, indices: Tensor, paths: list[str] | None) -> None:
        if paths is not None:
            self._paths.update(zip(indices.tolist(), paths, strict=True))

    def _collect(self, stage: str, collector: ScoreCollector) -> AnomalyScores:
        """Every rank's rows of this stage, one per sample, in dataset order, with threshold and paths."""
        self._raise_held_error("evaluation")
        refuse_iterable_cut_short(self._current_loader(), self._eval_stream, stage)
        result = collector.collect()
        collector.reset()
        self._warn_of_other_sizes_on_other_ranks()
        paths = self._all_paths(self._paths, "test" if stage == "val" else stage)
        threshold = float(self.threshold)
        return AnomalyScores(
            *(t.cpu() for t in (result.indices, result.scores, result.labels, result.neighbours, result.distances)),
            threshold=threshold,
            normalized=self.normalized(result.scores).cpu(),
            paths=[paths.get(int(i), "") for i in result.indices] if paths else None,
        )

    def _report(self, stage: str, collector: ScoreCollector, auroc: BinaryAUROC) -> AnomalyScores:
        result = self._collect(stage, collector)
        self._warn_if_partial_evaluation(stage, len(result))
        labels = result.labels
        if (labels < 0).any():
            unknown = int((labels < 0).sum())
            what = (
                "has no labels" if unknown == len(labels) else f"has {unknown} of {len(labels)} samples unlabelled (-1)"
            )
            info(f"DN2: {stage} data {what}; scores are kept in module.{stage}_scores, no AUROC.")
        elif labels.unique().numel() < 2:
            rank_zero_warn(
                f"AUROC is undefined: every {stage} sample has label {int(labels[0])}. The test set needs both "
                "normal (0) and anomalous (1) samples; scores are still kept in module."
                f"{stage}_scores.",
                stacklevel=5,
            )
        else:
            auroc.update(to_unit_interval(result.scores), labels)
            # (float32 sums of exact rank areas can land above 1: 1.0000001 for 10 normal below 12 anomalous)
            self.log(f"{stage}/auroc", auroc.compute().clamp(0.0, 1.0), sync_dist=True)
            auroc.reset()
        bank = self._bank_builder.size()  # a collective when sharded: every rank gets here
        threshold = self._say_threshold()
        info(f"DN2 {stage}: {len(result)} samples scored against a bank of {bank} embeddings; {threshold}.")
        return result

    def _warn_if_partial_evaluation(self, stage: str, scored: int) -> None:
        """A val/test pass cut short by ``limit_val_batches``/``limit_test_batches`` (or ``fast_dev_run``) scores and
        measures only its first batches: say so, as a partial training pass does."""
        limits = {"val": self.trainer.num_val_batches, "test": self.trainer.num_test_batches}.get(stage)
        total = sized_len(self._current_loader())
        if not limits or total is None or not limits[0] < total:
            return
        flag = "limit_val_batches" if stage == "val" else "limit_test_batches"
        rank_zero_warn(
            f"the {stage} pass read {int(limits[0])} of {total} {stage} batches ({flag} or fast_dev_run): its "
            f"scores and {stage}/auroc cover those {scored} samples only, not the whole {stage} set.",
            stacklevel=5,
        )

    def _check_hparams(self) -> None:
        """``hparams`` may be edited between calls: the settings read at each use (``k``, the threshold, cleaning)
        are checked again; those built into the backbone, the group pooling or the anomaly maps at construction are
        refused when changed (they would be recorded with the bank and the checkpoint, but not used)."""
        hp = self.hparams
        hp.update(as_python(dict(hp)))  # an edit may bring NumPy numbers too
        for name, built in self._built_with.items():
            if hp.get(name) != built:
                fix = (
                    f"it shapes the memory bank: build and fit a new DN2Module({name}=...)"
                    if name in BANK_SETTINGS or name == "anomaly_maps"
                    else f"pass it to DN2Module({name}=...) or DN2Module.load_from_checkpoint(path, {name}=...)"
                )
                raise ValueError(
                    f"hparams.{name} was changed to {hp.get(name)!r} after this DN2Module was built with {built!r}; "
                    f"{name} is read when the model is built, so the edit would not be used: {fix}."
                )
        if self.maps is not None:  # the patch search follows the image search's settings
            if hp.bank_sharding == "shard":  # (refused at construction; a run setting, so editable after)
                raise ValueError(
                    "hparams.bank_sharding='shard' with anomaly_maps=True: the patch bank is not sharded; use "
                    "bank_sharding='replicate' (or a DN2Module without anomaly maps)."
                )
            self.maps.knn_backend, self.maps.max_memory_bytes = hp.knn_backend, hp.max_memory_bytes
        _validate_hparams(hp)

    # ------------------------------------------------------------------------------------- memory bank

    def _ensure_bank(self) -> None:
        """Finalise a bank still being collected by fit, else build it from the datamodule if missing."""
        self._refuse_a_lone_shard()
        if self._collector is not None and self.trainer.state.fn != TrainerFn.FITTING:
            self._collector = None  # rows of a fit that stopped on an error: never a bank
            self._checks_behind.drop()
        collecting = self._collector is not None and len(self._collector) > 0
        # validation inside the pass: the batches read so far must be whole, also those that gave no rows (groups
        # all masked out), whose checks a bank built on first need would otherwise drop
        if self._checks_behind.pending:
            with self._holding_errors("pass"):
                self._checks_behind.flush()
        # one gather: a problem with the checkpoint one rank restored (see on_load_checkpoint), an error held in the
        # training pass (a validation inside the epoch: the pass so far must be whole), and each rank's bank state
        errors = (self._checkpoint_error, self._held_errors.pop("pass", None))
        self._checkpoint_error = None
        state = {"(collecting one, holds one, holds a shard)": (collecting, self._has_bank, self._bank_is_shard)}
        with stop_together(state, *_BANKS_DIFFER):
            for error in errors:
                if error is not None:
                    raise error
        if collecting:
            rank_zero_warn(
                "validation inside a training epoch sees a partial memory bank (the rows read so far; the pass goes "
                "on collecting); use val_check_interval=1.0.",
                stacklevel=5,
            )
            # recorded as partial, so a checkpoint saved by this validation (ModelCheckpoint's best) says so
            self._pass_batches = (self._collector.num_batches, sized_len(self._train_loader))
            self._finalize_bank(keep_collecting=True)
        elif not self._has_bank:
            self._build_bank_from_datamodule()
        else:
            # a whole bank on every rank, e.g. each node's copy of a checkpoint; first, so that the settings' and the
            # fingerprint's checks meet one bank (Lightning broadcasts rank 0's weights but not the bank)
            if not self._bank_is_shard:
                refuse_ranks_with_other_banks(self.bank.summary())
            with stop_together():  # e.g. one node's copy of the folder holds another file
                data_settings = self._data_settings()  # may set up the datamodule: read once for both checks
                self._check_settings_against_bank(data_settings)
                self._warn_if_bank_from_another_datamodule(data_settings)
            if self._sharded and not self._bank_is_shard:
                self._bank_builder.keep_own_shard()
        self._bank_is_shard = self._sharded

    def _build_bank_from_datamodule(self) -> None:
        datamodule = running_datamodule(self._trainer)
        fn = self.trainer.state.fn.value if self.trainer.state.fn else "test"
        if datamodule is None or not is_overridden("train_dataloader", datamodule):
            raise RuntimeError(NO_BANK_MESSAGE.format(fn=fn))
        datamodule.setup("fit")
        info(f"DN2: building the memory bank from {type(datamodule).__name__}.train_dataloader().")
        self._build_bank_from(shard_for_this_rank(one_loader(datamodule.train_dataloader(), fn)))
        self._bank_datamodule = weakref.ref(datamodule)

    def _warn_if_bank_from_another_datamodule(self, data_settings: dict[str, Any]) -> None:
        """A bank built on first need from one datamodule meets another, whose training data nothing can compare
        (no ``train_set_identity``): said, since the bank was never asked for explicitly."""
        current = running_datamodule(self._trainer)
        if self._bank_datamodule is None or current is None or self._bank_datamodule() is current:
            return
        if not is_overridden("train_dataloader", current) or data_settings.get("train_set") is not None:
            return
        rank_zero_warn(
            f"{type(current).__name__} is not the datamodule this memory bank was built from on first need (in an "
            "earlier call), and DN2 cannot compare their training data: scores use the bank of the earlier one. If "
            "the training data differ, use a new DN2Module (or fit this one again); a datamodule method "
            "train_set_identity() returning a dict that describes its training data makes DN2 check it."
        )

    def _build_bank_from(self, loader: DataLoader, limit: int | float = float("inf")) -> None:
        """One pass over ``loader`` (at most ``limit`` batches) outside Lightning's loops, into the bank."""
        refuse_ranks_drawing_their_own_samples(loader)
        refuse_ranks_reading_other_data(loader)
        self._start_pass()
        self._stream_loader = loader
        batches = _progress(loader, "DN2: building the memory bank", self.trainer.progress_bar_callback is not None)
        try:
            # the same precision context (e.g. bf16 autocast) as fit's training_step, so both banks are alike
            with torch.no_grad(), self.trainer.precision_plugin.train_step_context():
                batch_iter, batch_idx = iter(batches), 0
                while batch_idx < limit and "pass" not in self._held_errors:
                    # reading a file too: one node's copy may be unreadable
                    with self._holding_errors("pass"), self._checks_behind.first_on_error():
                        batch = next(batch_iter, None)
                        if batch is None:
                            break
                        parsed = unpack_batch(self._on_device(batch, batch_idx), batch_idx, self._checks_behind.add)
                        self._collector.add(*self._bank_rows(parsed, batch_idx), paths=parsed.paths)
                        self._checks_behind.advance()
                    batch_idx += 1
        except BaseException:
            self._collector = None  # a build that stopped part-way leaves no partial bank behind, nor its checks
            self._checks_behind.drop()
            raise
        finally:
            self._stream_loader = None
        # a pass of Lightning's train dataloader (a limit given) may be cut short by limit_train_batches
        self._end_pass(loader, partial=limit < float("inf"))

    def _bank_rows(self, batch: Batch, batch_idx: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Embeddings, dataset indices and labels that a training batch adds to the bank (embedded under the autocast
        in force, which forward otherwise replaces by the bank's), and which of them are real (``None``: all; the
        collector drops the others when the bank is made)."""
        self._embedding_bank_rows = True
        try:
            return self._new_bank_rows(batch, batch_idx)
        finally:
            self._embedding_bank_rows = False

    def _new_bank_rows(self, batch: Batch, batch_idx: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        self._bank_autocast = _active_autocast(batch.images.device)  # queries are embedded the same way
        if self._collector is not None:
            self._collector.image_sizes.add((int(batch.images.shape[-2]), int(batch.images.shape[-1])))
            self._collector.image_channels.add(int(batch.images.shape[-3]))
        if batch.images.ndim == 5 and self.maps is not None:  # before any pooling: none has patches to collect
            raise ValueError(
                f"anomaly_maps=True needs single training images [B, C, H, W], but these batches are groups [B, M, C, "
                f"H, W] {tuple(batch.images.shape)} (group_pooling={self.hparams.group_pooling!r}): a group has no "
                "pixel map. Build the model with anomaly_maps=False for group data, or fit on single images."
            )
        indices = self._indices_of(batch, batch_idx)
        self._bank_of_groups = self._bank_of_groups or batch.images.ndim == 5
        if batch.images.ndim == 5 and self.hparams.group_pooling == "none":
            # point-wise baseline: every member is a bank row, indexed group * M + member
            b, m = batch.images.shape[:2]
            _check_point_wise_groups(m, self._members_per_group)
            self._members_per_group = m
            embeddings = self._embed(batch.images.flatten(0, 1), batch, batch_idx)
            member = torch.arange(m, device=indices.device)
            rows = (indices[:, None] * m + member).flatten()
            labels = batch.labels.repeat_interleave(m)
            if batch.members is not None and self._collector is not None:
                self._collector.add_member_sources(rows, batch.members.flatten())
            return embeddings, rows, labels, None if batch.mask is None else batch.mask.bool().flatten()
        if batch.images.ndim == 5 and batch.members is not None and self._collector is not None:
            # a pooled group of one image (M = 1, or one real member of a padded group) is that image: the
            # threshold must leave out its copies in other groups
            self._add_one_image_group_sources(batch, indices)
        if batch.images.ndim == 5 and self.group_pool.needs_fit:
            # the pooling is fitted on the whole bank's members: keep them (and the mask) until finalisation
            b, m = batch.images.shape[:2]
            members = self._embed(batch.images.flatten(0, 1), batch, batch_idx).view(b, m, -1)
            return pack_members(members, batch.mask), indices, batch.labels, None
        if self.maps is not None:  # one backbone pass gives the embeddings and the patch features
            with out_of_memory_hint(lambda: self._out_of_memory_hint(batch.images)):
                embeddings, patches = self.maps.embed(self.backbone, batch.images)
            self._check_embeddings(embeddings, batch, batch_idx)
            self.maps.collect(patches, indices)
            return embeddings, indices, batch.labels, None
        return self._embed(batch.images, batch, batch_idx), indices, batch.labels, None

    def _add_one_image_group_sources(self, batch: Batch, indices: Tensor) -> None:
        """Record the source image (``members``) of each pooled group holding one real member as its bank row's
        source, -1 (unknown) for the others; without a host sync. A mask that does not fit the groups is left to the
        (deferred) mask check."""
        assert self._collector is not None and batch.members is not None
        real = batch.mask.bool() if batch.mask is not None else None
        if real is None or tuple(real.shape) != tuple(batch.images.shape[:2]):
            if batch.images.shape[1] == 1:
                self._collector.add_member_sources(indices, batch.members[:, 0])
            return
        first_real = batch.members.gather(1, real.int().argmax(1, keepdim=True)).squeeze(1)
        self._collector.add_member_sources(indices, torch.where(real.sum(1) == 1, first_real, -1))

    def _finalize_bank(self, keep_collecting: bool = False) -> None:
        """Turn the collected rows into the bank (``BankBuilder``), with its maps, spec and threshold scores;
        ``keep_collecting``: a bank of the rows so far, for validation inside the pass, which goes on."""
        assert self._collector is not None
        self._bank_datamodule = None  # set again by a build on first need
        collector = self._collector
        if not keep_collecting:
            self._collector = None
        builder, hp = self._bank_builder, self.hparams
        if hp.group_pooling == "none" and world_size() > 1:  # every rank numbered its member rows with one M
            sizes = sorted({int(m) for m in gather_objects(self._members_per_group) if m})
            if len(sizes) > 1:
                _check_point_wise_groups(sizes[-1], sizes[0])
            self._members_per_group = sizes[-1] if sizes else 0
        embeddings, indices, labels = builder.rows(collector, max(1, self._members_per_group))
        if embeddings.ndim == 3:  # packed group members [N, M, D + 1]: fit the group pooling, then pool
            embeddings = builder.pool_groups(self.group_pool, *unpack_members(embeddings), indices)
        members = self._members_per_group
        # member row (or, for pooled groups of one image, group) -> source image; None for single-image banks
        sources = _gathered_sources(collector.member_sources) if members or self._bank_of_groups else None
        report = builder.build(
            embeddings, indices, labels, hp.k, hp.clean_fraction, hp.clean_k, max(1, members), sources
        )
        self._bank_is_shard = self._sharded
        if self.maps is not None:
            self.maps.finalize(self.bank.sample_indices, keep_collecting)
        shapes = gather_objects((collector.image_sizes, collector.image_channels))
        image_sizes = {size for sizes, _ in shapes for size in sizes}
        self._record_bank_spec(collector.paths, sources, image_sizes)
        self._record_fingerprint({channels for _, part in shapes for channels in part})
        builder.update_loo_scores(hp.k, hp.threshold_samples)
        self._warn_if_no_threshold()
        report["bank/size"] = float(builder.size())
        self.bank_report = report
        if "bank/removed" in report:  # the cleaning's figures; without it they only repeat the size
            info("DN2: " + ", ".join(f"{name}={value:g}" for name, value in report.items()))
        info(f"DN2: memory bank of {report['bank/size']:g} embeddings; {self._say_threshold()}.")
        if hp.clean_fraction > 0 and self._trainer is not None and self.trainer.state.fn != "predict":
            if self._current_fx_name == "on_fit_end":  # a pass read again after the loop: self.log is closed there
                for logger in self.trainer.loggers if self.trainer.is_global_zero else ():
                    logger.log_metrics(report, step=self.trainer.global_step)
            else:
                self.log_dict(report, on_step=False, on_epoch=True, sync_dist=False, rank_zero_only=True)

    @property
    def _bank_builder(self) -> BankBuilder:
        return BankBuilder(self.bank, self._sharded, self._knn_kwargs())

    def _model_settings(self) -> dict[str, Any]:
        """The model settings that define the bank's content (see ``checkpointing.BANK_SETTINGS``)."""
        hp = self.hparams
        return {
            "backbone": hp.backbone,
            # a user trunk's layers (another structure under the same weight names would embed otherwise)
            "trunk": trunk_layout(self.backbone.trunk) if str(hp.backbone).startswith(CUSTOM_BACKBONE) else None,
            "pretrained": hp.pretrained,
            "input_size": self.backbone.image_size,
            "mean": self.backbone.mean.flatten().tolist(),
            "std": self.backbone.std.flatten().tolist(),
            "clean_fraction": hp.clean_fraction,
            "clean_k": hp.clean_k if hp.clean_fraction > 0 else None,
            "group_pooling": hp.group_pooling,
            "group_clusters": hp.group_clusters if "histogram" in hp.group_pooling else None,
            "group_temperature": hp.group_temperature if "histogram" in hp.group_pooling else None,
            # the patch bank's stages (compared only when both sides have maps: image scores do not use them)
            **({"map_layers": list(self.maps.layers)} if self.maps is not None else {}),
            **(dict([LITE_PADDING]) if str(hp.backbone).startswith("efficientnet_lite") else {}),
        }

    def _data_settings(self) -> dict[str, Any]:
        datamodule = running_datamodule(self._trainer)
        hparams = getattr(datamodule, "hparams", None) or {}
        settings = {name: hparams[name] for name in DATA_SETTINGS if name in hparams}
        identity = getattr(datamodule, "train_set_identity", None)  # the dn2 datamodules' training data
        if callable(identity) and (train_set := identity()) is not None:
            settings["train_set"] = train_set
        return settings

    def _record_bank_spec(
        self, paths: dict[int, str], member_sources: list[int] | None, image_sizes: set[tuple[int, int]]
    ) -> None:
        all_paths = self._all_paths(paths, "train")
        spec = {**self._model_settings(), "train_set": None, **self._data_settings(), "format": BANK_FORMAT}
        if len(image_sizes) == 1:  # the training loader's one image size: score_images resizes to it without load_size
            spec["train_image_size"] = list(next(iter(image_sizes)))
        spec["autocast"] = self._bank_autocast
        if self._pass_batches is not None:  # (batches read, batches in the pass): a partial bank is known as one
            spec["train_batches"] = list(self._pass_batches)
            self._pass_batches = None
        if self._bank_of_groups:  # its rows describe groups: single images are not scored against it
            spec["groups"] = True
        if self._members_per_group:  # rows are group members (group_pooling="none"): row = group * M + member
            spec["members_per_group"] = self._members_per_group
        if member_sources:  # row -> source image, so the leave-one-out threshold skips copies in other groups
            spec["member_sources"] = member_sources
        if all_paths:  # train files by dataset index (every rank's, also when the bank is sharded), for neighbour paths
            spec["train_paths"] = [all_paths.get(i, "") for i in range(max(all_paths) + 1)]
        self.bank.spec = spec

    def _all_paths(self, local: dict[int, str], split: str) -> dict[int, str]:
        """Dataset index -> file of every rank's samples (from the batches, else the datamodule's listing)."""
        paths: dict[int, str] = {}
        for part in gather_objects(local):
            paths.update(part)
        datamodule = running_datamodule(self._trainer)
        if not paths and hasattr(datamodule, "source_paths"):
            listed = datamodule.source_paths(split)
            paths = dict(enumerate(listed)) if listed else {}
        return paths

    def _check_settings_against_bank(self, data_settings: dict[str, Any] | None = None) -> None:
        """The model's and the datamodule's settings against the bank's record, on every use: a bank can also
        arrive by ``load_state_dict``, which no Lightning hook sees."""
        self._check_model_against_bank()
        self._check_data_settings(data_settings)

    def _check_model_against_bank(self) -> None:
        """The model's recorded settings and its backbone's fingerprint against the bank's."""
        model_settings = self._model_settings()
        check_bank_format(self.bank.spec, model_settings)
        check_bank_settings(self.bank.spec, model_settings, BANK_SETTINGS, "this model")
        refuse_lite_bank_padded_otherwise(self.bank.spec)  # (a bank from load_state_dict met no on_load_checkpoint)
        self._check_fingerprint()

    def _probe_embedding(self) -> Tensor | None:
        """This model's embedding ``[P, D]`` of the fixed probe (:mod:`~dn2_lightning.fingerprint`) at the size the
        bank records, in float32 whatever the bank's rows were embedded under (bf16 rounding would hide an edit);
        ``None`` when no size is known."""
        size = self.bank.spec.get("fingerprint_size")
        if not size:
            return None
        channels = self.bank.spec.get("fingerprint_channels", 3)
        with torch.no_grad(), exact_float32(self.device.type):
            return self._embed_images(probe_images(*size, channels=channels).to(self.device))

    def _record_fingerprint(self, image_channels: set[int]) -> None:
        """Keep the backbone's embedding of the probe with a bank just made (queued on the device: no sync), with
        the training images' channels (``image_channels``: a grey backbone's trunk may take one channel only)."""
        size = probe_size(self.bank.spec.get("train_image_size"), self.backbone.image_size)
        self.bank.spec["fingerprint_size"] = size
        self.bank.spec["fingerprint_channels"] = next(iter(image_channels)) if len(image_channels) == 1 else 3
        embedding = self._probe_embedding()
        rows = self.bank.embeddings
        self.bank.fingerprint = as_buffer(
            embedding if embedding is not None else rows.new_empty(0, 0), torch.float32, rows.device
        )
        self.bank.fingerprint_unchecked = False
        self._fingerprint_weights = self._backbone_weights_key()

    def _backbone_weights_key(self) -> tuple:
        """The backbone's weights and buffers as they are now: each tensor's identity, storage and version counter
        (bumped by in-place edits, ``load_state_dict`` included). A fingerprint check holds until it changes. No weak
        references (as :func:`~dn2_lightning.knn.content_key` keeps): a parameter with one cannot be swapped, which
        ``module.to()`` does for some devices (``RuntimeError: _apply(): Couldn't swap Linear.weight``)."""
        tensors = (*self.backbone.parameters(), *self.backbone.buffers())
        return tuple((id(t), _values_pointer(t), None if t.is_inference() else t._version) for t in tensors)

    def _check_fingerprint(self) -> None:
        """A loaded bank's first use, and the first use after the backbone's weights changed (``load_state_dict`` on
        the backbone itself, an in-place edit): this model's backbone must embed the probe as the one that made the
        bank did (the recorded settings miss an edited ``forward``, other weights, another library version).
        Deterministic, so every rank reaches the same verdict without a collective. Refused, it is checked again at
        the next use."""
        if self.bank.fingerprint.numel() == 0:
            return
        weights = self._backbone_weights_key()
        if not self.bank.fingerprint_unchecked and weights == self._fingerprint_weights:
            return
        current = self._probe_embedding()
        difference = None if current is None else fingerprint_difference(self.bank.fingerprint, current)
        if difference is not None and not difference <= FINGERPRINT_TOLERANCE:
            raise ValueError(
                f"this model's backbone ({self.hparams.backbone}) does not embed as the one that built the memory "
                f"bank: a fixed probe image embeds {difference:.1%} (relative L2) away from the embedding saved "
                f"with the bank (device differences stay far below {FINGERPRINT_TOLERANCE:.0%}), so "
                "queries would be compared with rows of another embedding and their scores would mean nothing. It "
                "happens when a custom backbone's forward (or your own FeatureExtractor subclass) was edited since "
                "the fit, when other backbone weights were loaded (load_state_dict(..., strict=False) leaving the "
                "bank's out, or into model.backbone) or edited in place, or when an upgrade of torch, torchvision or "
                "the backbone's package changed its computation. Load the bank into a DN2Module with the backbone it "
                "was built with (the same code, weights and library versions), or build a new bank with fit."
            )
        self.bank.fingerprint_unchecked = False
        self._fingerprint_weights = weights

    def _check_data_settings(self, current: dict[str, Any] | None = None) -> None:
        current = self._data_settings() if current is None else current
        check_bank_settings(self.bank.spec, current, DATA_SETTINGS, "this datamodule")
        check_train_set(self.bank.spec.get("train_set"), current.get("train_set"))
        if "train_set" not in self.bank.spec and current.get("train_set") is not None:
            rank_zero_warn(
                "this memory bank does not record the training data it was built from (a checkpoint saved by an "
                "earlier dn2-lightning), so nothing checks that it matches this datamodule's "
                f"({current['train_set']}): make sure it does, or fit again to record it.",
                stacklevel=5,
            )

    # ---------------------------------------------------------------------------------------- helpers

    def _embedding_precision(self) -> contextlib.AbstractContextManager:
        """Embed queries under the autocast the bank rows were embedded under (``Trainer(precision="bf16-mixed")``
        or not), whatever is in force now: ``score_images``, a reloaded checkpoint or another Trainer precision
        then give the bank's scores. Banks saved before this was recorded keep whatever is in force."""
        if "autocast" not in self.bank.spec:
            return contextlib.nullcontext()
        dtype = self.bank.spec["autocast"]
        if dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=getattr(torch, dtype))

    def _embed(self, images: Tensor, batch: Batch, batch_idx: int) -> Tensor:
        """Backbone embeddings (group-pooled for group batches), refusing non-finite outputs (the pixels were
        checked by ``unpack_batch``)."""
        self._pixels_checked = True  # by unpack_batch or as_image_batches (in the training pass, a batch later)
        try:
            with out_of_memory_hint(lambda: self._out_of_memory_hint(images)):
                embeddings = self(images, batch.mask) if images.ndim == 5 else self(images)  # forward's hooks, compile
        finally:
            self._pixels_checked = False
        self._check_embeddings(embeddings, batch, batch_idx)
        return embeddings

    def _check_embeddings(self, embeddings: Tensor, batch: Batch, batch_idx: int) -> None:
        """Refuse NaN/Inf embeddings: at once, or in the training pass a batch later (:class:`ChecksBehind`)."""
        check = _finite_check(embeddings, "embeddings", batch, batch_idx)
        if self._embedding_bank_rows:
            self._checks_behind.add(check)
        else:
            check()

    def _out_of_memory_hint(self, images: Tensor) -> str:
        """What to lower when the backbone ran out of memory on a batch."""
        size = getattr(self.backbone, "image_size", None)
        what = f"{images.shape[0]} {'groups of images' if images.ndim == 5 else 'images'}"
        at = f" at input_size {size}" if size is not None else ""
        return (
            f"DN2 ran out of memory embedding a batch of {what}{at} on {images.device}: lower the batch size (the "
            "DataModule's or DataLoader's batch_size, --data.batch_size; score_images(batch_size=...)) or input_size "
            "(--model.input_size), or fit in bfloat16 (Trainer(precision='bf16-mixed'): test and predict embed as "
            "the bank was)."
        )

    def _indices_of(self, batch: Batch, batch_idx: int) -> Tensor:
        training = self._stream_loader is not None or (
            self._trainer is not None and self.trainer.state.stage == RunningStage.TRAINING
        )
        stream = self._train_stream if training else self._eval_stream
        stream.batches += 1
        if batch.indices is not None:
            stream.samples += batch.images.shape[0]
            return torch.as_tensor(batch.indices, device=batch.images.device).long()
        loader = self._current_loader()
        # samples without indices are numbered by the order this rank reads them: a DistributedSampler's own list
        # for this epoch (shuffled or not, its padding included) when it can be read again, else the stream as an
        # unshuffled DistributedSampler deals it: sample i of this rank is position rank + world * i of the
        # sampler's list, which pads the dataset's N samples with its first ones again (so the position modulo N)
        if stream.samples == 0:
            stream.order = sampler_order(loader)
            if stream.order is None:
                warn_if_out_of_order(loader)
                warn_if_workers_repeat_unnumbered_samples(loader)
        size = batch.images.shape[0]
        local = torch.arange(stream.samples, stream.samples + size, device=batch.images.device)
        stream.samples += size
        if stream.order is not None:
            stream.order = stream.order.to(local.device)  # once, not the whole order again with every batch
            return stream.order[local]
        positions = self.global_rank + world_size() * local
        dataset = getattr(loader, "dataset", None)
        padded = isinstance(getattr(loader, "sampler", None), DistributedSampler)
        return positions % len(dataset) if padded and isinstance(dataset, Sized) and len(dataset) else positions

    def _current_loader(self) -> Any:
        """The dataloader being read: the bank's (built outside Lightning's loops) or the running stage's."""
        if self._stream_loader is not None or self._trainer is None:
            return self._stream_loader
        name = _STAGE_LOADERS.get(self.trainer.state.stage)
        return one_loader(getattr(self.trainer, name), self.trainer.state.fn.value) if name else None

    def _stage_batch(self, batch: Any) -> Any:
        """A batch of the running stage's one dataloader, unwrapped where Lightning wraps it (``[batch]`` or
        ``{name: batch}``: one train loader in a list or dict, a CombinedLoader of one)."""
        if self._trainer is None:  # a step called by hand
            return batch
        name = _STAGE_LOADERS.get(self.trainer.state.stage)
        return one_batch(batch, getattr(self.trainer, name)) if name else batch

    @property
    def _train_loader(self) -> Any:
        """The fit's one train dataloader."""
        return one_loader(self.trainer.train_dataloader, "fit")

    def _on_device(self, batch: Any, batch_idx: int) -> Any:
        """A batch of DN2's own pass through the batch hooks as Lightning's loops call them: the datamodule's where it
        overrides them, and the MPS float64 cast (:meth:`_apply_batch_transfer_handler`)."""
        batch = self._on_before_batch_transfer(batch, 0)
        return self._apply_batch_transfer_handler(batch, self.device, 0)

    def _count_bank_step(self) -> None:
        # A bank update is this model's optimisation step. Counting it keeps global_step, max_steps and
        # ModelCheckpoint (which skips saving when global_step did not move) working without an optimizer.
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    def _knn_kwargs(self) -> dict[str, Any]:
        return {"backend": self.hparams.knn_backend, "max_memory_bytes": self.hparams.max_memory_bytes}


def _other_size_message(size: tuple[int, int], trained: Sequence[int], rank: int | None = None) -> str:
    (h, w), (th, tw) = size, trained
    where = "these samples are" if rank is None else f"samples scored on rank {rank} are"
    return (
        f"{where} {h}x{w} pixels, but the memory bank was built from {th}x{tw} training images: the backbone "
        "resizes both to its input size, from another resolution, so the scores shift (normal images may all score "
        f"as anomalies). Resize them as the training images were (transforms.Resize(({th}, {tw})), or the "
        "datamodule's load_size), or fit on images of this size."
    )


def _check_point_wise_groups(m: int, earlier: int) -> None:
    """``group_pooling="none"`` numbers member rows ``group * M + member`` with one M for the whole bank."""
    if earlier and m != earlier:
        raise ValueError(
            f"group_pooling='none' needs every training batch padded to the same group size M (its member rows are "
            f"numbered group * M + member); got batches of M = {earlier} and M = {m}. Pad every group to the "
            "largest size, with a 'mask' marking the real members."
        )


def _finite_check(values: Tensor, what: str, batch: Batch, batch_idx: int) -> Check:
    """The check that ``values`` hold no NaN or Inf, its rows' verdicts ``[B]`` queued on the device now and read
    when it is called (as :func:`~dn2_lightning.batch.pixel_check`)."""
    bad = ~torch.isfinite(values).flatten(1).all(1) if values.ndim > 1 else ~torch.isfinite(values)
    indices = batch.indices if values.shape[0] == batch.images.shape[0] else None
    return functools.partial(_refuse_nonfinite, bad, what, indices, batch_idx)


def _refuse_nonfinite(bad: Tensor, what: str, indices: Any, batch_idx: int) -> None:
    if bad.any():
        positions = bad.nonzero().flatten().tolist()
        where = f"positions {positions[:10]}"
        if indices is not None:
            where += f" (dataset indices {torch.as_tensor(indices)[bad.cpu()].tolist()[:10]})"
        raise ValueError(f"NaN or Inf in {what} of batch {batch_idx} at {where}; fix or drop those samples.")


def _values_pointer(tensor: Tensor) -> int:
    """Where a tensor's values live, for :meth:`DN2Module._backbone_weights_key`: its storage's address, or that of a
    sparse tensor's values (a sparse buffer, e.g. a random projection, has no storage: ``data_ptr()`` raises)."""
    if tensor.layout == torch.sparse_coo:
        return tensor._values().data_ptr()
    if tensor.layout in (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc):
        return tensor.values().data_ptr()
    return tensor.data_ptr()


def _float64_as_float32(tensor: Tensor) -> Tensor:
    return tensor.float() if tensor.dtype == torch.float64 else tensor


def _float64_batch_as_float32(batch: Any, device: torch.device) -> Any:
    """A batch's float64 tensors as float32 for a device without float64 (Apple's MPS); elsewhere the batch as is."""
    return apply_to_collection(batch, Tensor, _float64_as_float32) if lacks_float64(device) else batch


def _refuse_tuning_callbacks(callbacks: Sequence[Any]) -> None:
    """Refuse callbacks that tune or average what an optimizer trains, or try the fit loop in trial runs (Lightning's
    own errors name an optimizer count or an ``lr`` attribute, not the cause; BatchSizeFinder's trials ended DN2's
    one-pass fit before it began): runs in ``setup``, before their ``on_fit_start``."""
    from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder, StochasticWeightAveraging

    for callback in callbacks:
        name = type(callback).__name__
        if isinstance(callback, (StochasticWeightAveraging, LearningRateFinder)):
            raise ValueError(
                f"Trainer(callbacks=[{name}()]) needs an optimizer, and DN2's fit has no optimizer (one pass of the "
                "frozen backbone fills the memory bank; no weights are trained): remove it from the callbacks (or "
                "do not call Tuner(trainer).lr_find on DN2)."
            )
        if isinstance(callback, BatchSizeFinder):
            raise ValueError(
                f"Trainer(callbacks=[{name}()]) runs trial fits that end DN2's one-pass fit before it starts (no "
                "validation, no checkpoint of the bank): remove it from the callbacks (or do not call "
                "Tuner(trainer).scale_batch_size on DN2) and set the batch size of your dataloaders (the "
                "datamodule's batch_size) yourself."
            )


def _refuse_second_dataloader(dataloader_idx: int, fn: str) -> None:
    if dataloader_idx > 0:
        raise ValueError(ONE_LOADER.format(fn=fn))


def _progress(loader: DataLoader, description: str, enabled: bool) -> Any:
    """``loader`` with a rich progress bar (the one Lightning's RichProgressBar uses) on rank 0 when enabled."""
    if not enabled or rank() != 0:
        return loader
    from rich.progress import track

    return track(loader, description=description, total=sized_len(loader), transient=True)


# DN2Module's settings (its constructor's arguments): those assigned as attributes are refused (``model.k = 5``)
_SETTINGS = frozenset(inspect.signature(DN2Module.__init__).parameters) - {"self"}


def _refuse_16_bit(dtype: torch.dtype | None) -> None:
    """A 16-bit cast of DN2Module (``.half()``, ``.bfloat16()``, ``.to(torch.float16)``) is refused before anything
    is cast, since a rounded bank would stay rounded after ``.float()``."""
    if dtype in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"DN2Module cannot be cast to {dtype} (.half(), .bfloat16(), .to({dtype})): its preprocessing runs in "
            "float32 and its memory bank would be rounded for good. Keep it in float32 and embed in 16 bits "
            "under autocast: Trainer(precision='bf16-mixed') when fitting (score_images then embeds the same "
            "way), or export the embedder under torch.autocast (README: Deploying)."
        )


def _tracing() -> bool:
    """Whether ``torch.export``, ``torch.compile`` or ``torch.jit.trace`` is tracing (a check that reads the pixels'
    values cannot be)."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.compiler.is_compiling() or exporting() or torch.jit.is_tracing()


def _active_autocast(device: torch.device) -> str | None:
    """The autocast dtype in force on ``device``'s type (e.g. ``"bfloat16"`` under bf16-mixed), else ``None``."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return str(torch.get_autocast_dtype(device.type)).removeprefix("torch.")


def _gathered_sources(local: dict[int, int]) -> list[int] | None:
    """Every rank's member row -> source image (:class:`~dn2_lightning.data.GroupDataModule`'s ``members``) as a list
    by row (-1 unknown), ``None`` when no batch gave them. A collective: every rank calls it."""
    sources = {row: source for part in gather_objects(local) for row, source in part.items() if source >= 0}
    return [sources.get(row, -1) for row in range(max(sources) + 1)] if sources else None


def _validate_hparams(hp: Mapping[str, Any]) -> None:
    """The settings' checks: at construction, and again at each use (``hparams`` may be edited between calls)."""
    check_k(hp["k"])
    check_input_size(hp["input_size"])
    check_backbone_input_size(hp.get("backbone"), hp["input_size"])
    check_knn_backend(hp["knn_backend"])
    check_int("max_memory_bytes", hp["max_memory_bytes"], 2**16, allow_none=True)
    check_clean_fraction(hp["clean_fraction"])
    check_clean_k(hp["clean_k"])
    check_choice("group_pooling", hp["group_pooling"], GROUP_POOLINGS)
    check_int("group_clusters", hp["group_clusters"], 2, hint="about the number of member classes; default 10")
    check_positive_float("group_temperature", hp["group_temperature"], hint="default 0.3")
    check_threshold(hp["threshold_quantile"], hp["threshold"])
    check_positive_int("threshold_samples", hp["threshold_samples"], allow_none=True, none_means="all of them")
    check_choice("bank_sharding", hp["bank_sharding"], BANK_SHARDINGS)

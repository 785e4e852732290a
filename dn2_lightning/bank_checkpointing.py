"""How a DN2Module's checkpoints are written and read: the whole bank (also from a sharded one), plain types only
(weights-only loading), the threshold saved with its k, and a loaded checkpoint checked against the model (its
weights, bank settings, embedding size, patch bank) before anything is used."""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from dn2_lightning.backbones import LITE_PADDING, lite_padding_differed
from dn2_lightning.bank import THRESHOLD_RECORD
from dn2_lightning.checkpointing import (
    BANK_SETTINGS,
    batch_count,
    check_bank_settings,
    readable_checkpoint,
    refuse_unsafe_load,
)
from dn2_lightning.distributed import across_processes, world_size
from dn2_lightning.validation import as_python

if TYPE_CHECKING:
    from dn2_lightning.module import DN2Module

# checkpoint key: the fixed threshold saved and the k it scores at (load_from_checkpoint's overrides rewrite the
# checkpoint's hyperparameters before on_load_checkpoint sees them)
THRESHOLD_KEY = "dn2_threshold"


class BankCheckpointing:
    """DN2Module's checkpoint hooks (a mixin) and its weights-only ``load_from_checkpoint``."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[THRESHOLD_KEY] = {"value": self.hparams.threshold, "k": self._threshold_k()}
        # weights-only loading refuses NumPy scalars: one in any setting (the model's or hparams edited since, the
        # datamodule's, the bank's record of its training data) would make the file unloadable
        state = checkpoint.get("state_dict", {})
        checkpoint.update(as_python({key: value for key, value in checkpoint.items() if key != "state_dict"}))
        state.update({key: as_python(value) for key, value in state.items() if not isinstance(value, Tensor)})
        if self._bank_is_shard:
            # each rank holds a shard: the checkpoint gets the whole bank, so it loads on any number of devices.
            # It is assembled in host memory, one shard on the device at a time, from every process that holds one.
            with across_processes():
                ids, rows = self._bank_builder.whole_bank_on_cpu()
                removed_ids, removed = self._bank_builder.all_removed_on_cpu()
            checkpoint["state_dict"]["bank.sample_indices"] = ids
            checkpoint["state_dict"]["bank.embeddings"] = rows
            checkpoint["state_dict"]["bank.removed_indices"] = removed_ids
            checkpoint["state_dict"]["bank.removed"] = removed

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> DN2Module:
        """Lightning's ``load_from_checkpoint``, always weights-only (also for URLs) and in eval mode.

        Keyword arguments override saved hyperparameters: scoring settings (``k``, ``threshold_quantile``,
        ``threshold``, ``knn_backend``, ``max_memory_bytes``, ``reports``) freely (``threshold_quantile`` alone
        also replaces a fixed threshold saved by ``set_threshold(value=...)``); settings that define the
        bank (backbone, ``input_size``, cleaning, pooling) must match the saved bank or raise ``ValueError``.
        """
        refuse_unsafe_load(weights_only)
        _refuse_unknown_overrides(cls, kwargs)
        if hparams_file is not None and not _is_file(hparams_file):  # Lightning warns and uses the checkpoint's
            raise FileNotFoundError(
                f"hparams_file={str(hparams_file)!r} is not a file: give the path of a hparams.yaml (or .csv), or "
                "leave it out to use the checkpoint's own hyperparameters."
            )
        if "threshold_quantile" in kwargs and "threshold" not in kwargs:
            kwargs["threshold"] = None  # a quantile asked for replaces a fixed value saved by set_threshold
        with readable_checkpoint(checkpoint_path):
            model = super().load_from_checkpoint(
                checkpoint_path, map_location, hparams_file, strict, weights_only=True, **kwargs
            )
        return model.eval()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._restored_from = (checkpoint.get("epoch"), checkpoint.get("global_step"))
        if self._trainer is None or world_size() == 1:
            self._check_checkpoint(checkpoint)
            return
        # restored by a Trainer (ckpt_path) under DDP: one node's copy of the path may hold another file, or none
        # (ckpt_path="last" found on one node's disk only, so some ranks restore nothing). A problem is raised on
        # every rank together where they all meet (DN2Module._agree_on_the_checkpoint in fit, _ensure_bank in an
        # evaluation); until then this rank loads its own state again, so Lightning's load does not stop it alone.
        try:
            self._check_checkpoint(checkpoint)
        except Exception as error:
            self._checkpoint_error = error
            checkpoint["state_dict"] = self.state_dict()

    def _check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._bank_is_shard = False
        self._bank_datamodule = None
        state = checkpoint.get("state_dict", {})
        own = dict(self.named_parameters())  # the bank's buffers take any shape; the weights must fit
        other = [
            (name, v.shape, own[name].shape) for name, v in state.items() if name in own and v.shape != own[name].shape
        ]
        if other:
            name, saved, here = other[0]
            raise ValueError(
                f"the checkpoint's weights do not fit this model: {name} is {list(saved)} in the checkpoint but "
                f"{list(here)} here{f' ({len(other) - 1} more differ)' if len(other) > 1 else ''}. Load it into a "
                "DN2Module with the backbone (and its settings) it was saved with."
            )
        self._refuse_bank_without_its_weights(state)
        # load_from_checkpoint takes the threshold from the checkpoint's hyperparameters (and its overrides); a
        # ckpt_path restore keeps this model's own threshold settings (Lightning restores no hyperparameters there).
        # Neither takes the record a plain state dict carries for loads without hyperparameters.
        if isinstance(state.get("bank._extra_state"), dict):
            state["bank._extra_state"] = {k: v for k, v in state["bank._extra_state"].items() if k != THRESHOLD_RECORD}
        state.pop("threshold", None)  # checkpoints before the threshold was derived from bank.loo_scores
        check_bank_settings(state.get("bank._extra_state") or {}, self._model_settings(), BANK_SETTINGS, "this model")
        refuse_lite_bank_padded_otherwise(state.get("bank._extra_state") or {})
        saved = checkpoint.get(THRESHOLD_KEY, {})
        if saved.get("value") is not None and saved["value"] == self.hparams.threshold and saved.get("k") is not None:
            self._fixed_threshold = (float(saved["value"]), int(saved["k"]))
        self._warn_if_fixed_threshold_meets_another_k()
        self._match_patch_bank(state)
        saved = state.get("bank.embeddings")
        self._warn_if_bank_incomplete(saved, state.get("bank._extra_state") or {})
        expected = self.backbone.feature_dim
        # a bank of pooled groups may hold another size than the backbone's (histogram pooling)
        allowed = {expected, self.group_pool.output_dim(expected)} if expected is not None else set()
        if saved is not None and saved.numel() and expected is not None and saved.shape[1] not in allowed:
            raise ValueError(
                f"the checkpoint's memory bank holds {saved.shape[1]}-d embeddings but backbone="
                f"{self.hparams.get('backbone')!r} gives {expected}-d ones; load it with the backbone it was "
                "built with."
            )

    def _refuse_bank_without_its_weights(self, state: dict[str, Any]) -> None:
        """A bank was embedded by the checkpoint's backbone weights: a load that would leave this model's backbone
        without them (``strict=False`` or ``strict_loading = False`` with a backbone whose weights are named
        otherwise, or a checkpoint without them) would embed queries with other weights than the bank's rows."""
        saved = state.get("bank.embeddings")
        if saved is None or not saved.numel():
            return  # no bank (e.g. saved mid-pass): one is built with this model's backbone
        own = {f"backbone.{name}" for name in self.backbone.state_dict()}
        theirs = {name for name in state if name.startswith("backbone.")}
        if own != theirs:
            missing, unexpected = sorted(own - theirs), sorted(theirs - own)
            raise ValueError(
                "the checkpoint's memory bank was embedded with its own backbone weights, but they do not fit this "
                f"model's backbone (missing from the checkpoint: {missing or 'none'}; in the checkpoint only: "
                f"{unexpected or 'none'}), so queries would be embedded with other weights than the bank's rows "
                "(strict=False does not change that). Load it into a DN2Module with the backbone it was saved with."
            )

    def _warn_if_bank_incomplete(self, embeddings: Tensor | None, spec: dict[str, Any]) -> None:
        """A checkpoint saved mid-pass holds no bank, one of a capped pass a partial bank: said when it is loaded
        for evaluation (a resumed fit reads the pass again itself)."""
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            return
        seen, total = spec.get("train_batches") or (0, 0)
        if embeddings is not None and not embeddings.numel():
            rank_zero_warn(
                "this checkpoint holds no memory bank: it was saved before its fit's training pass ended (e.g. by "
                "ModelCheckpoint(every_n_train_steps=...)); test/predict build one from the datamodule's training "
                "data. Use the checkpoint saved at the end of the pass."
            )
        elif total is None or seen < total:
            rank_zero_warn(
                f"this checkpoint's memory bank was built from {batch_count(seen, total)} (limit_train_batches, "
                "max_steps, overfit_batches or fast_dev_run, or a checkpoint saved by a validation inside the training "
                "epoch, e.g. ModelCheckpoint's best with val_check_interval < 1): scores use a partial bank. Use the "
                "checkpoint saved at the end of the pass, or `dn2 fit --ckpt_path` of it without the limit."
            )

    def _match_patch_bank(self, state: dict[str, Any]) -> None:
        """A checkpoint's patch bank (``anomaly_maps=True``) is dropped by a model without maps (image scores do
        not use it); a model with maps needs one."""
        saved = [name for name in state if name.startswith("maps.")]
        if self.maps is None:
            for name in saved:
                del state[name]
        elif state.get("bank.embeddings") is not None and not saved:
            raise ValueError(
                "anomaly_maps=True, but the checkpoint was fitted with anomaly_maps=False and holds no patch bank "
                "for the maps: load it with anomaly_maps=False (image scores only), or fit again with "
                "anomaly_maps=True."
            )


def refuse_lite_bank_padded_otherwise(spec: dict[str, Any]) -> None:
    """An EfficientNet-Lite bank saved before the trunks padded each input for its own size, at a size padded
    otherwise then (:func:`~dn2_lightning.backbones.lite_padding_differed`), holds other embeddings than queries get
    now: its scores would compare two backbones. Checked at load (``on_load_checkpoint``) and at each use of the bank
    (one loaded with ``load_state_dict`` meets no hook)."""
    key, _ = LITE_PADDING
    if key not in spec and lite_padding_differed(spec.get("backbone"), spec.get("input_size")):
        raise ValueError(
            f"this checkpoint's memory bank was embedded by {spec['backbone']} at input_size={spec['input_size']} "
            "by a dn2-lightning that padded that size as if it were the backbone's own (fixed since): queries "
            "embedded now would not match its rows. Build the bank again with fit."
        )


def _refuse_unknown_overrides(cls: type, overrides: dict[str, Any]) -> None:
    """Lightning drops keyword arguments that are not ``__init__`` parameters without a word: a misspelt override
    (``threshhold_quantile=0.5``) would leave the saved setting in force."""
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return  # a subclass taking **kwargs: Lightning passes every keyword on, as it does
    known = [name for name, p in parameters.items() if name != "self" and p.kind is not p.VAR_POSITIONAL]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        hints = "; ".join(
            f"{name!r}"
            + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(name, known, 1)) else "")
            for name in unknown
        )
        raise TypeError(
            f"load_from_checkpoint got keyword argument(s) that are no {cls.__name__} setting: {hints}. The "
            f"settings it takes: {', '.join(known)}."
        )


def _is_file(path: str | Path) -> bool:
    """Whether ``path`` (local, or an fsspec URL, as Lightning reads ``hparams_file``) is a file."""
    filesystem = get_filesystem(path)
    return bool(filesystem.isfile(str(path)))

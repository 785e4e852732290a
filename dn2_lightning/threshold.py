"""The decision threshold of a DN2Module: a quantile of the training samples' leave-one-out scores or a fixed score,
how it is described, and how a fixed one travels with checkpoints and plain state dicts."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from dn2_lightning.bank import THRESHOLD_RECORD
from dn2_lightning.console import info
from dn2_lightning.scoring import coarse_quantile_note, expected_flagged_share, normalized_scores, quantile_threshold
from dn2_lightning.validation import check_threshold

if TYPE_CHECKING:
    from dn2_lightning.module import DN2Module

# the last threshold explanation said in this process, by any module: "(as above)" follows a module's own line only.
# A fresh object per line, so that a module unpickled from another process never matches this one's.
_last_line_said: list[object] = [object()]


class DecisionThreshold:
    """DN2Module's threshold (a mixin): ``threshold``, ``set_threshold``, ``normalized`` and what they say.

    State (set by ``DN2Module.__init__``): ``_fixed_threshold`` (value, k) of a fixed threshold, i.e. the k whose
    scores it was set for; ``_threshold_said`` (the last explanation printed, with the token of that line);
    ``_warned_no_threshold``, ``_warned_few_threshold_scores`` and ``_warned_threshold_k`` (warnings said once per
    change)."""

    @property
    def threshold(self) -> Tensor:
        """The decision threshold on the DN2 score (a float64 0-d tensor, whatever torch's default dtype: rounded to
        float32 it would not be the value set or the quantile; NaN when undefined): ``threshold`` if set, else the
        ``threshold_quantile`` of the training images' leave-one-out scores at the current ``k``."""
        if self.hparams.threshold is not None:
            return torch.tensor(float(self.hparams.threshold), dtype=torch.float64)
        loo_scores = self._loo_scores()
        self._warn_if_few_threshold_scores(len(loo_scores))
        return torch.tensor(quantile_threshold(loo_scores, self.hparams.threshold_quantile), dtype=torch.float64)

    def set_threshold(self, quantile: float | None = None, value: float | None = None) -> float:
        """Set the decision threshold: a ``quantile`` of the training images' leave-one-out scores (normal data only,
        never test labels: about ``1 - quantile`` of normal images get flagged) or a fixed score ``value``.
        Give exactly one. Returns the threshold; it is saved with the checkpoint's hyperparameters."""
        if (quantile is None) == (value is None):
            raise ValueError(
                f"set_threshold takes exactly one of quantile= or value=, got quantile={quantile!r}, value={value!r}."
            )
        check_threshold(quantile if quantile is not None else self.hparams.threshold_quantile, value)
        if quantile is not None:
            self.hparams.threshold_quantile, self.hparams.threshold = float(quantile), None
        else:
            self.hparams.threshold = float(value)
            self._fixed_threshold = (float(value), self.hparams.k)
        threshold = float(self.threshold)
        self._threshold_said = None  # asked for: said in full
        info(f"DN2: {self._say_threshold()}.")
        return threshold

    def normalized(self, scores: Tensor) -> Tensor:
        """Share of the training images' leave-one-out scores below each score, in [0, 1] (NaN without them): 0.5 is a
        typical normal image, values near 1 are beyond almost every normal one."""
        return normalized_scores(self._loo_scores(), scores)

    def _loo_scores(self) -> Tensor:
        """The bank's sorted leave-one-out scores at the current k and ``threshold_samples``, recomputed when either
        changed."""
        k, samples = self.hparams.k, self.hparams.threshold_samples
        if self._has_bank and not self.bank.has_loo_scores(k, samples):
            self._bank_builder.update_loo_scores(k, samples)
            self._warn_if_no_threshold()  # e.g. a k given at load that leaves no leave-one-out scores
        return self.bank.loo_scores if self.bank.has_loo_scores(k, samples) else self.bank.loo_scores[:0]

    def _describe_threshold(self) -> str:
        threshold = float(self.threshold)
        if math.isnan(threshold) and not self._has_bank and self.hparams.threshold is None:
            q = self.hparams.threshold_quantile  # set_threshold(quantile=...) before a fit: kept for it
            return f"threshold_quantile {q:g} set; the threshold is computed once the model has a memory bank"
        if math.isnan(threshold):
            return "no decision threshold (is_anomaly undefined)"
        if self.hparams.threshold is not None:
            return f"threshold {threshold:.6g} (fixed value)"
        q = self.hparams.threshold_quantile
        drawn = f", {len(self.bank.loo_scores):,} drawn at random" if self.bank.loo_drawn else ""
        groups = self._bank_of_group_samples or self.bank.spec.get("members_per_group")  # point-wise: per group
        sample = "group" if groups else "image"
        if self.hparams.clean_fraction > 0:  # unsupervised: the training samples include the contaminants
            return (
                f"threshold {threshold:.6g} (quantile {q:g} of every training {sample}'s score{drawn}, contaminants "
                "included: for a fraction c of contaminants, threshold_quantile = (1 - c) x 0.99 puts it near the "
                f"normal {sample}s' 0.99 quantile)"
            )
        share = expected_flagged_share(len(self.bank.loo_scores), q)  # 1 - q only for many scores
        return (
            f"threshold {threshold:.6g} (quantile {q:g} of the training {sample}s' leave-one-out scores{drawn}: "
            f"about {100 * share:.3g}% of normal {sample}s are flagged)"
        )

    def _say_threshold(self) -> str:
        """The threshold's description: in full the first time, then by its value while it stays the same and no
        other module (another model in this process) has said its own since."""
        text = self._describe_threshold()
        said = self._threshold_said
        if said is not None and said[0] == text and said[1] is _last_line_said[0]:
            return text.split(" (", 1)[0] + " (as above)"
        _last_line_said[0] = token = object()
        self._threshold_said = (text, token)
        return text

    def _warn_if_no_threshold(self) -> None:
        size, k = self._bank_builder.size(), self.hparams.k
        if self.hparams.threshold is None and size <= k and self._warned_no_threshold != (size, k):
            self._warned_no_threshold = (size, k)  # once per bank size and k, not per batch
            rank_zero_warn(
                f"the memory bank holds {size} embeddings, not more than k={self.hparams.k}: there are "
                "no leave-one-out scores to set a threshold from, so is_anomaly is undefined (None, empty CSV "
                "cells) and normalised scores are NaN. Use a larger train set or set_threshold(value=...).",
                stacklevel=5,
            )

    def _warn_if_few_threshold_scores(self, n: int) -> None:
        """A quantile of too few leave-one-out scores (:func:`~dn2_lightning.scoring.coarse_quantile_note`)."""
        q = self.hparams.threshold_quantile
        note = coarse_quantile_note(n, q)
        if note is None or self._warned_few_threshold_scores == (n, q):
            return
        self._warned_few_threshold_scores = (n, q)  # once per count and quantile, not per batch
        more = "threshold_samples=None (every training sample)" if self.bank.loo_drawn else "more training samples"
        rank_zero_warn(
            f"{note} Use {more}, or set a threshold read off normal images' scores (set_threshold(value=...))."
        )

    def _threshold_k(self) -> int:
        """The k whose scores the fixed threshold was set for (the current k for one set through ``hparams``)."""
        value = self.hparams.threshold
        if self._fixed_threshold is not None and value is not None and self._fixed_threshold[0] == float(value):
            return self._fixed_threshold[1]
        return self.hparams.k

    def _warn_if_fixed_threshold_meets_another_k(self) -> None:
        """A fixed threshold is a score at the k it was set for; a quantile threshold follows k, a value cannot."""
        value, k, now = self.hparams.threshold, self._threshold_k(), self.hparams.k
        if value is not None and k != now and self._warned_threshold_k != (value, k, now):
            self._warned_threshold_k = (value, k, now)  # once per change, not per evaluation
            rank_zero_warn(
                f"threshold={value:g} is a fixed score set for k={k} scores, but this model scores with "
                f"k={now} (a larger k gives larger scores): set a threshold for k={now} (threshold=..., or "
                "set_threshold(value=...)), or use threshold_quantile (it follows k)."
            )


def record_fixed_threshold(module: DN2Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict hook: a fixed threshold (``set_threshold(value=...)``, a hyperparameter, which a plain state dict
    would leave behind) is recorded in the bank's extra state."""
    key = prefix + "bank._extra_state"
    if isinstance(state_dict.get(key), dict) and module.hparams.threshold is not None:
        record = {"value": float(module.hparams.threshold), "k": module._threshold_k()}
        state_dict[key] = {**state_dict[key], THRESHOLD_RECORD: record}


def adopt_recorded_threshold(module: DN2Module, incompatible_keys: Any) -> None:
    """Load hook: the fixed threshold a loaded state dict recorded is used, unless the module has one of its own
    (``load_from_checkpoint`` takes it from the checkpoint's hyperparameters instead; a ``ckpt_path`` restore keeps
    the model's own threshold settings)."""
    saved, module.bank.loaded_threshold = module.bank.loaded_threshold, None
    if not isinstance(saved, dict) or module.hparams.threshold is not None:
        return
    module.hparams.threshold = float(saved["value"])
    module._fixed_threshold = (float(saved["value"]), int(saved["k"]))
    info(
        f"DN2: the state dict's fixed threshold {module.hparams.threshold:.6g} (set for k={saved['k']}) is used; "
        "set_threshold(quantile=...) replaces it."
    )
    module._warn_if_fixed_threshold_meets_another_k()

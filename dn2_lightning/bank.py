"""The memory bank: training embeddings kept as checkpointed buffers, the collector that fills it during one pass
over the train data, and the builder that turns what was collected into the bank (over every rank)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from dn2_lightning.distributed import (
    broadcast_module_state,
    check_unique_indices,
    count_rows,
    gather_objects,
    gather_rows,
    gather_rows_to_cpu,
    keep_first_owner,
    rank,
    unique_by_index,
    world_size,
)
from dn2_lightning.group_pooling import pad_members
from dn2_lightning.knn import KNNResult, PreparedBank, content_key, knn_distances, lacks_float64, prepare_bank
from dn2_lightning.scoring import drop_own_group, keep_lowest, knn_scores, leave_one_out_scores
from dn2_lightning.sharding import sharded_knn

# key of the owner's fixed threshold in the bank's extra state within a state dict: a plain state dict (which has no
# hyperparameters) carries it there; ``MemoryBank.set_extra_state`` keeps it out of the spec
THRESHOLD_RECORD = "fixed_threshold"


class BankModule(nn.Module):
    """A module of bank buffers, which stay on the CPU when it is moved to a device without float64 (Apple's
    MPS): the exact search needs float64 and runs there, while the backbone runs on the device."""

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> BankModule:
        # an empty tensor tells where ``fn`` goes without moving the bank there first
        return self if lacks_float64(fn(torch.empty(0)).device) else super()._apply(fn, recurse)


class MemoryBank(BankModule):
    """Training embeddings ``[N, D]`` and the dataset index of each row, as persistent buffers, with what
    the decision threshold needs (the rows' leave-one-out scores) and how the bank was built.

    The buffers start empty and take whatever shape a loaded state dict has, so a checkpoint loads into
    a fresh module whatever the bank size. ``spec`` (saved as the module's extra state, plain types only)
    records the settings that define the bank (backbone, resolutions, cleaning, ...) and the training
    files' paths, so a checkpoint can be checked against the settings it is used with.

    >>> bank = MemoryBank()
    >>> bank.is_fitted
    False
    >>> bank.set(torch.zeros(3, 4), torch.tensor([0, 1, 2]))
    >>> bank.is_fitted, tuple(bank.embeddings.shape)
    (True, (3, 4))
    """

    embeddings: Tensor
    sample_indices: Tensor
    removed: Tensor
    loo_scores: Tensor
    loo_k: Tensor
    loo_samples: Tensor
    loo_drawn: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("embeddings", torch.empty(0, 0))
        self.register_buffer("sample_indices", torch.empty(0, dtype=torch.long))
        # training rows that cleaning removed (unsupervised setting) and their dataset indices: not searched, but
        # scored against the bank with the rest for the threshold, as a test image is
        self.register_buffer("removed", torch.empty(0, 0))
        self.register_buffer("removed_indices", torch.empty(0, dtype=torch.long))
        # sorted leave-one-out DN2 scores of the training samples at k = loo_k (0: not computed yet), for
        # threshold_samples = loo_samples (0: None); loo_drawn: they are a random draw, not every sample's
        self.register_buffer("loo_scores", torch.empty(0))
        self.register_buffer("loo_k", torch.tensor(0))
        self.register_buffer("loo_samples", torch.tensor(0))
        self.register_buffer("loo_drawn", torch.tensor(False))
        # the backbone's embedding of a fixed probe when the bank was made ([P, D]; empty: none recorded), and whether
        # a loaded one is still to be compared with this model's backbone (see ``dn2_lightning.fingerprint``)
        self.register_buffer("fingerprint", torch.empty(0, 0))
        self.fingerprint_unchecked = False
        self.spec: dict[str, Any] = {}
        self.loaded_threshold: dict[str, Any] | None = None  # the fixed threshold a loaded state dict recorded
        self._prepared: tuple[tuple, PreparedBank] | None = None
        self._summary: tuple[tuple, tuple[int, int, float, float]] | None = None
        # the rows the leave-one-out scores were computed from (see :meth:`_rows_key`): an in-place edit of the bank
        # (``model.bank.embeddings.mul_(2)``) or a new tensor assigned to it makes them stale, as it does the search
        self._loo_key: tuple | None = None

    def __getstate__(self) -> dict[str, Any]:
        # the caches hold weak references (which cannot be pickled) and are rebuilt on first need; whether the
        # leave-one-out scores are still the rows' travels as a flag
        return {**super().__getstate__(), "_prepared": None, "_summary": None, "_loo_key": self._loo_is_current()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        current = state.pop("_loo_key", True)  # pickled by an earlier dn2-lightning: taken as current
        super().__setstate__(state)
        for name in ("_prepared", "_summary", "loaded_threshold"):  # pickled by an earlier dn2-lightning
            self.__dict__.setdefault(name, None)
        self.__dict__.setdefault("fingerprint_unchecked", False)
        if "fingerprint" not in self._buffers:
            self.register_buffer("fingerprint", torch.empty(0, 0))
        self._loo_key = self._rows_key() if current is True else None

    def _rows_key(self) -> tuple:
        """What the leave-one-out scores depend on: the rows searched and the rows cleaning removed (as
        :meth:`_content_key`)."""
        return content_key(self.embeddings, self.sample_indices, self.removed, self.removed_indices)

    def _loo_is_current(self) -> bool:
        """Whether the kept leave-one-out scores were computed from the bank's rows as they are now."""
        return self._loo_key is not None and self._loo_key == self._rows_key()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> BankModule:
        # ``.double()``, ``.to(device)``: the rows are converted, not edited, so scores that were current stay so
        current = self._loo_is_current()
        result = super()._apply(fn, recurse)
        self._loo_key = self._rows_key() if current else None
        return result

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self._loo_is_current():  # scores of rows edited since: saved as not computed (recomputed on load)
            destination[prefix + "loo_k"] = torch.zeros_like(self.loo_k)

    @property
    def is_fitted(self) -> bool:
        return self.embeddings.shape[0] > 0

    @property
    def is_set(self) -> bool:
        """Whether the bank was set, possibly with no rows (one rank's shard of a sharded bank may hold none)."""
        return self.embeddings.shape[1] > 0

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def summary(self) -> tuple[int, int, float, float]:
        """(rows, sum of the sample indices, float64 sum of the embeddings and of their magnitudes): what tells two
        ranks' copies of a bank apart, computed once per bank content."""
        key = self._content_key()
        if self._summary is None or self._summary[0] != key:
            total = magnitude = 0.0
            for rows in self.embeddings.split(8192):  # float64 sums a few rows at a time: no copy of the whole bank
                # a copy even of a float64 bank (Trainer(precision="64-true"), model.double()): abs_ must not edit it
                wide = rows.to(torch.float64, copy=True)
                total, magnitude = total + float(wide.sum()), magnitude + float(wide.abs_().sum())
            self._summary = (key, (len(self.embeddings), int(self.sample_indices.sum()), total, magnitude))
        return self._summary[1]

    def _content_key(self) -> tuple:
        """What identifies the bank's content for the caches: its tensors themselves (weakly: a new tensor at a freed
        one's address is another bank) and their in-place edits."""
        return content_key(self.embeddings, self.sample_indices)

    def prepared(self) -> PreparedBank:
        """The bank centred for search, computed once per bank content and device (edits through ``.data`` or a
        NumPy view escape PyTorch's version counter and are not seen: replace the rows with :meth:`set`)."""
        key = self._content_key()
        if self._prepared is None or self._prepared[0] != key:
            self._prepared = (key, prepare_bank(self.embeddings))
        return self._prepared[1]

    def set(self, embeddings: Tensor, sample_indices: Tensor, copy: bool = True) -> None:
        """Replace the bank with copies of these rows, made outside inference mode so that later fits and loads
        may replace them; ``copy=False`` keeps the tensors themselves where it can (the caller does not modify
        them afterwards)."""
        if embeddings.ndim != 2 or embeddings.shape[0] != sample_indices.shape[0]:
            raise ValueError(
                f"bank embeddings {tuple(embeddings.shape)} and sample_indices {tuple(sample_indices.shape)} "
                "do not match."
            )
        self._prepared = None  # the old bank's search copy is not kept alive next to the new one
        self._summary = None
        self.embeddings = as_buffer(embeddings, torch.float32, copy=copy)
        self.sample_indices = as_buffer(sample_indices, torch.long, copy=copy)
        self.set_removed(self.embeddings[:0], self.sample_indices[:0])

    def set_removed(self, rows: Tensor, sample_indices: Tensor, copy: bool = True) -> None:
        """Keep the training rows that cleaning removed (``[R, D]``, with their dataset indices ``[R]``), for the
        threshold's scores (``copy`` as in :meth:`set`, which clears them)."""
        if rows.ndim != 2 or rows.shape[0] != sample_indices.shape[0] or (len(rows) and rows.shape[1] != self.dim):
            raise ValueError(
                f"removed rows {tuple(rows.shape)} and sample_indices {tuple(sample_indices.shape)} must be [R, D] "
                f"and [R], with the bank's D = {self.dim}."
            )
        self.removed = as_buffer(rows, torch.float32, copy=copy)
        self.removed_indices = as_buffer(sample_indices, torch.long, copy=copy)
        self.set_loo_scores(self.loo_scores.new_empty(0), 0)

    def set_loo_scores(self, scores: Tensor, k: int, samples: int | None = None, drawn: bool = False) -> None:
        """Keep the training samples' leave-one-out scores at ``k`` (sorted) for thresholds and normalised scores:
        every sample's, or (``drawn``) those of a random draw for ``threshold_samples=samples``."""
        with torch.inference_mode(False):
            self.loo_scores = scores.detach().to(torch.float32).sort().values.clone()
            self.loo_k = torch.tensor(int(k), device=self.loo_k.device)
            self.loo_samples = torch.tensor(int(samples or 0), device=self.loo_k.device)
            self.loo_drawn = torch.tensor(bool(drawn), device=self.loo_k.device)
        self._loo_key = self._rows_key()

    def has_loo_scores(self, k: int, samples: int | None) -> bool:
        """Whether the kept leave-one-out scores serve ``k`` and ``threshold_samples=samples``: scores at ``k`` of
        every training sample (also kept for a smaller ``samples``: a draw would only be less exact), or of the
        draw made for ``samples``."""
        if int(self.loo_k) != k or k == 0 or not self._loo_is_current():
            return False
        return not bool(self.loo_drawn) or int(self.loo_samples) == (samples or 0)

    def reset(self) -> None:
        self.set(self.embeddings.new_empty(0, 0), self.sample_indices.new_empty(0))

    def get_extra_state(self) -> dict[str, Any]:
        return dict(self.spec)

    def set_extra_state(self, state: Any) -> None:
        spec = dict(state) if isinstance(state, dict) else {}
        # the owner's fixed threshold, which a plain state dict carries here (see ``THRESHOLD_RECORD``): kept apart
        # from the spec, for the owner to take up after loading
        self.loaded_threshold = spec.pop(THRESHOLD_RECORD, None)
        self.spec = spec

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        embeddings, ids = state_dict.get(prefix + "embeddings"), state_dict.get(prefix + "sample_indices")
        if embeddings is not None and (embeddings.ndim != 2 or ids is None or ids.shape != embeddings.shape[:1]):
            raise ValueError(
                f"the checkpoint's memory bank is inconsistent: {prefix}embeddings has shape "
                f"{tuple(embeddings.shape)} but {prefix}sample_indices has "
                f"{None if ids is None else tuple(ids.shape)}; expected [N, D] and [N]. The file is damaged "
                "or was edited: rebuild the bank with fit."
            )
        removed, removed_ids = state_dict.get(prefix + "removed"), state_dict.get(prefix + "removed_indices")
        if (
            removed is not None
            and len(removed)
            and (
                removed_ids is None
                or removed_ids.shape != removed.shape[:1]
                or (embeddings is not None and removed.shape[1:] != embeddings.shape[1:])
            )
        ):
            raise ValueError(
                f"the checkpoint's memory bank is inconsistent: {prefix}removed has shape {tuple(removed.shape)}, "
                f"{prefix}removed_indices {None if removed_ids is None else tuple(removed_ids.shape)} and "
                f"{prefix}embeddings {None if embeddings is None else tuple(embeddings.shape)}. The file is damaged "
                "or was edited: rebuild the bank with fit."
            )
        spec = state_dict.get(prefix + "_extra_state") or {}
        if removed is None and embeddings is not None and len(embeddings) and (spec.get("clean_fraction") or 0) > 0:
            rank_zero_warn(
                "this checkpoint (saved by an earlier dn2-lightning) does not hold the rows that cleaning removed, "
                "so its threshold and normalised scores come from the kept rows alone, the densest of the training "
                "set: far more than 1 - threshold_quantile of normal images get flagged. Fit again to fix it.",
                stacklevel=5,
            )
        if embeddings is None:  # a partial load (strict=False, e.g. the backbone's weights alone): the bank stays
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
            self.fingerprint_unchecked = self.fingerprint.numel() > 0  # other weights may have come: checked again
            return
        # checkpoints written before these entries existed: recomputed on first need
        state_dict.setdefault(prefix + "loo_scores", torch.empty(0))
        state_dict.setdefault(prefix + "loo_k", torch.tensor(0))
        state_dict.setdefault(prefix + "loo_samples", torch.tensor(0))  # saved before threshold_samples: all
        state_dict.setdefault(prefix + "loo_drawn", torch.tensor(False))
        state_dict.setdefault(prefix + "removed", torch.empty(0, 0))
        state_dict.setdefault(prefix + "removed_indices", torch.empty(0, dtype=torch.long))
        state_dict.setdefault(prefix + "_extra_state", {})
        state_dict.setdefault(prefix + "fingerprint", torch.empty(0, 0))  # saved before banks recorded one: unchecked
        # take the saved tensors themselves (any bank size loads strictly; nn.Module's copy into them is then a
        # no-op): a new buffer to copy into would hold the bank twice while loading
        self._prepared = None  # nor is the old bank kept alive by its search copy
        self._summary = None
        taken = []
        for name in ("embeddings", "sample_indices", "removed", "removed_indices", "loo_scores", "fingerprint"):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor):
                current = getattr(self, name)
                setattr(self, name, as_buffer(saved, current.dtype, current.device, copy=False))
                taken.append(prefix + name)
        # the taken tensors are not handed on: nn.Module's copy_ of one into itself would bump the version counter
        # it shares with a live module's state_dict() it came from, whose leave-one-out scores would then look stale
        rest = {key: value for key, value in state_dict.items() if key not in taken}
        super()._load_from_state_dict(rest, prefix, *args, **kwargs)
        missing_keys = kwargs.get("missing_keys", args[2] if len(args) > 2 else [])
        missing_keys[:] = [key for key in missing_keys if key not in taken]
        self._loo_key = self._rows_key()  # the saved scores are the saved rows' (loo_k 0 when they were not)
        self.fingerprint_unchecked = self.fingerprint.numel() > 0  # compared with the backbone on first use


def as_buffer(tensor: Tensor, dtype: torch.dtype, device: torch.device | None = None, copy: bool = True) -> Tensor:
    """``tensor`` as a bank buffer: detached, of ``dtype`` on ``device``, contiguous, usable outside inference mode
    (later fits and loads replace it), and a copy unless ``copy=False``. Then it is ``tensor`` itself where it can
    be: not when a conversion is needed (that is the copy), nor for an inference tensor, nor for a view of part of
    a larger storage (e.g. a backbone's ``x[:, 0]``: the bank would keep, and checkpoints save, all of it)."""
    tensor = tensor.detach()
    converted = tensor.to(device=device, dtype=dtype)
    if converted is not tensor and not converted.is_inference() and converted.is_contiguous():
        return converted
    partial = converted.untyped_storage().nbytes() != converted.numel() * converted.element_size()
    if copy or partial or converted.is_inference() or not converted.is_contiguous():
        with torch.inference_mode(False):
            return converted.clone(memory_format=torch.contiguous_format)
    return converted


class BankCollector:
    """Accumulates (embedding, dataset index, label) batches during one pass over the train data."""

    def __init__(self) -> None:
        self._embeddings: list[Tensor] = []
        self._indices: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._paths: dict[int, str] = {}  # dataset index -> file, when batches carry paths
        self._path_batches: list[tuple[Tensor, list[str]]] = []  # batches' (indices, paths) not in _paths yet
        # group member row -> its image's index in the source dataset (group_pooling="none"), so that the
        # leave-one-out threshold also skips that image's copies in other training groups
        self._member_sources: dict[int, int] = {}
        self._source_batches: list[tuple[Tensor, Tensor]] = []  # batches' (rows, sources) not in it yet
        self._keep: list[Tensor | None] = []  # per batch: which rows are real (point-wise groups' padding is not)
        self.image_sizes: set[tuple[int, int]] = set()  # (H, W) of the batches read, as the loader gave them
        self.image_channels: set[int] = set()  # and their channels (the backbone's fingerprint probes with them)
        self.num_batches = 0

    def __len__(self) -> int:
        """Rows added (those ``keep`` drops not counted)."""
        return sum(
            len(i) if keep is None else int(keep.sum()) for i, keep in zip(self._indices, self._keep, strict=True)
        )

    def add(
        self,
        embeddings: Tensor,
        indices: Tensor,
        labels: Tensor,
        keep: Tensor | None = None,
        paths: list[str] | None = None,
    ) -> None:
        """One batch's rows; ``keep`` (bool ``[rows]``) marks the real ones, dropped at :meth:`collect` rather than
        here (selecting rows on a GPU makes the host wait for it)."""
        if lacks_float64(embeddings.device):  # the bank is built and kept on the CPU (MemoryBank._apply)
            embeddings, indices, labels = embeddings.cpu(), indices.cpu(), labels.cpu()
            keep = None if keep is None else keep.cpu()
        self._embeddings.append(embeddings.detach())
        self._indices.append(indices.detach().long())
        self._labels.append(labels.detach().long())
        self._keep.append(None if keep is None else keep.detach().bool())
        if paths is not None and len(paths) == len(indices):
            self._path_batches.append((indices, paths))  # read when needed: reading device indices waits for it
        self.num_batches += 1

    def add_member_sources(self, rows: Tensor, sources: Tensor) -> None:
        """Bank row -> source image index for one batch's rows; read when needed, as paths are."""
        self._source_batches.append((rows.detach(), sources.detach()))

    @property
    def member_sources(self) -> dict[int, int]:
        """Bank row -> its image's index in the source dataset, for the rows added with sources."""
        for rows, sources in self._source_batches:
            self._member_sources.update(zip(rows.tolist(), sources.tolist(), strict=True))
        self._source_batches.clear()
        return self._member_sources

    @property
    def paths(self) -> dict[int, str]:
        """Dataset index -> file, for the rows added with paths."""
        for indices, paths in self._path_batches:
            self._paths.update(zip(indices.tolist(), paths, strict=True))
        self._path_batches.clear()
        return self._paths

    def collect(self) -> tuple[Tensor, Tensor, Tensor]:
        """Concatenated ``(embeddings [N, D], indices [N], labels [N])``; the batches are released (they are kept as
        these tensors, which a further ``add`` extends), so the rows are held once, not twice."""
        if not self._embeddings:
            raise RuntimeError("no training batches were seen; the train dataloader is empty.")
        if self._embeddings[0].ndim == 3:  # packed group members: batches of other group sizes padded to the largest
            m = max(part.shape[1] for part in self._embeddings)
            self._embeddings[:] = [pad_members(part, m) for part in self._embeddings]
        for i, keep in enumerate(self._keep):  # point-wise groups' padding rows go now, a batch at a time
            if keep is not None:
                for parts in (self._embeddings, self._indices, self._labels):
                    parts[i] = parts[i][keep]
        for parts in (self._embeddings, self._indices, self._labels):
            if len(parts) > 1:
                parts[:] = [torch.cat(parts)]
        self._keep[:] = [None]
        return self._embeddings[0], self._indices[0], self._labels[0]


@dataclass
class BankBuilder:
    """The bank's life cycle over ranks: whole on every rank, or one shard per rank (``sharded``).

    It turns one pass of collected rows into the bank (one row per train sample, group-pooled, cleaned), keeps
    the leave-one-out scores the decision threshold needs, and searches the whole bank whichever way it is held.

    Args:
        bank: the module's :class:`MemoryBank`.
        sharded: this rank holds one shard of the bank (``bank_sharding="shard"`` under DDP).
        knn_kwargs: ``backend`` and ``max_memory_bytes`` of every search.
    """

    bank: MemoryBank
    sharded: bool
    knn_kwargs: dict[str, Any]

    def search(self, embeddings: Tensor, k: int) -> KNNResult:
        """Exact kNN of ``embeddings`` in the whole bank; neighbours as train-set sample indices."""
        prepared = self.bank.prepared()
        if embeddings.shape[1] != prepared.shape[1]:
            raise ValueError(
                f"the backbone gives {embeddings.shape[1]}-d embeddings but the memory bank holds "
                f"{prepared.shape[1]}-d ones: the bank (checkpoint) was built with another backbone."
            )
        if self.sharded:
            return sharded_knn(embeddings, prepared, self.bank.sample_indices, k, **self.knn_kwargs)
        knn = knn_distances(embeddings, prepared, k, **self.knn_kwargs)
        ids = self.bank.sample_indices  # on the CPU for embeddings from an MPS device
        return KNNResult(knn.values, ids[knn.indices.to(ids.device)].to(knn.indices.device))

    def size(self) -> int:
        """Rows in the whole bank (summed over shards)."""
        if not self.sharded:
            return len(self.bank)
        return sum(count_rows(len(self.bank), self.bank.embeddings.device))

    def rows(self, collector: BankCollector, rows_per_sample: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """The collected ``(embeddings, indices, labels)``, one row per train sample (de-duplicated by dataset
        index; ``rows_per_sample``: rows a sample adds, e.g. a group's members): every rank's rows gathered, or
        this rank's own share of them when sharded."""
        embeddings, indices, labels = collector.collect()
        if embeddings.ndim == 3 and world_size() > 1:  # packed group members: one group size on every rank
            embeddings = pad_members(embeddings, max(int(m) for m in gather_objects(embeddings.shape[1])))
        all_indices = gather_rows(indices)
        check_unique_indices(all_indices, "training samples", padded_rows=rows_per_sample)
        if self.sharded:
            own = keep_first_owner(indices)
            indices, embeddings, labels = unique_by_index(indices[own], embeddings[own], labels[own])
        else:
            indices, embeddings, labels = unique_by_index(all_indices, gather_rows(embeddings), gather_rows(labels))
        return embeddings, indices, labels

    def pool_groups(self, pool: nn.Module, members: Tensor, mask: Tensor, indices: Tensor) -> Tensor:
        """Fit the group pooling on every training group's members (all ranks' when sharded, so the fit is
        the single-device one; rank 0's state is then broadcast), and pool this rank's groups."""
        if self.sharded:  # this rank holds only its shard: fit on all of them
            _, all_members, all_mask = unique_by_index(*(gather_rows(t) for t in (indices, members, mask)))
            pool.fit(all_members, all_mask)
        else:
            pool.fit(members, mask)
        broadcast_module_state(pool)
        return pool(members, mask)

    def build(
        self,
        embeddings: Tensor,
        indices: Tensor,
        labels: Tensor,
        k: int,
        clean_fraction: float,
        clean_k: int,
        members: int = 1,
        member_sources: list[int] | None = None,
    ) -> dict[str, float]:
        """Make these rows the bank, without the ``clean_fraction`` of largest leave-one-out scores over
        ``clean_k`` neighbours when asked (the unsupervised setting). Returns the cleaning report.

        With ``members > 1`` the rows are group members (``group_pooling="none"``, ids ``group * members +
        member``, ``member_sources`` as in the bank's spec) and cleaning removes whole groups: the ``clean_fraction``
        of training groups whose worst member scores highest, each member leaving its group (and its image's copies)
        out, as the threshold scores them."""
        self.bank.set(embeddings, indices, copy=False)  # rows made for the bank: held once, not copied
        n = self.size()
        if n < k:
            self.bank.reset()  # no bank rather than one too small to search: its next use builds it again
            raise ValueError(f"k={k} exceeds the number of training embeddings ({n}); use k <= {n}.")
        report: dict[str, float] = {"bank/size_before_cleaning": float(n)}
        if clean_fraction > 0:
            sources = _source_table(member_sources, embeddings.device)  # also for groups of one image
            ids, scores, all_labels = self.leave_one_out_scores(clean_k, labels, members, sources)
            if members > 1:  # a group goes or stays whole
                group_of_row, worst = _worst_per_group(ids, scores, members)
                keep = keep_lowest(worst, clean_fraction)[group_of_row]
            else:
                keep = keep_lowest(scores, clean_fraction)
            if (all_labels >= 0).all() and (all_labels > 0).any():
                report["bank/contaminants_before"] = float((all_labels > 0).sum())
                report["bank/contaminants_kept"] = float((all_labels[keep] > 0).sum())
            report["bank/removed"] = float((~keep).sum())
            if keep.all():
                candidates = f"{len(worst)} groups" if members > 1 else f"{len(keep)} training embeddings"
                rank_zero_warn(
                    f"clean_fraction={clean_fraction} of {candidates} rounds to none removed, so the bank is not "
                    "cleaned: raise clean_fraction (or use 0 to say no cleaning)."
                )
            mine = torch.isin(indices, ids[keep])
            self.bank.set(embeddings[mine], indices[mine], copy=False)
            self.bank.set_removed(embeddings[~mine], indices[~mine], copy=False)
            if int(keep.sum()) < k:
                self.bank.reset()
                raise ValueError(
                    f"clean_fraction={clean_fraction} leaves {int(keep.sum())} embeddings, fewer than k={k}; lower "
                    "clean_fraction or k."
                )
        return report

    def leave_one_out_scores(
        self,
        k: int,
        labels: Tensor | None = None,
        members: int = 1,
        sources: tuple[Tensor, int] | None = None,
        chosen: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Every bank row's leave-one-out DN2 score over the whole bank, as ``(ids, scores, labels)`` sorted by
        id (gathered from all shards when sharded); ``k`` is capped at the bank size - 1. With ``members > 1`` the
        rows are group members (ids ``group * members + member``) and each leaves its whole group out, and with
        ``sources`` (:func:`_source_table`) also its own image's copies in other groups; ``k`` is then capped at
        the bank size less both. ``chosen``: only the
        rows of these samples (:meth:`threshold_draw`)."""
        ids, rows = self.bank.sample_indices, self.bank.embeddings
        if chosen is not None:
            pick = torch.isin(ids // members, chosen)
            ids, rows, labels = ids[pick], rows[pick], None if labels is None else labels[pick]
        if members > 1 or sources is not None:  # groups, even of one image each: their copies elsewhere left out
            scores = self._outside_group_scores(rows, ids, self._outside_group_k(k, members, sources), members, sources)
        else:
            k = min(k, self.size() - 1)
            scores = leave_one_out_scores(rows, ids, k, self.search, chunked=not self.sharded)
        labels = labels if labels is not None else torch.full_like(ids, -1)
        if self.sharded:
            ids, scores, labels = gather_rows(ids), gather_rows(scores), gather_rows(labels)
        return unique_by_index(ids, scores, labels)

    def _outside_group_k(self, k: int, members: int, sources: tuple[Tensor, int] | None) -> int:
        """``k`` capped at as few rows as a group member may keep: the bank less its group and its image's copies
        (clean_k=200 of a small bank: the left-out rows, which lie nearer, would fill in)."""
        copies = sources[1] if sources is not None else 0
        return max(1, min(k, self.size() - 1, self.size() - members - copies))

    def _outside_group_scores(
        self, rows: Tensor, ids: Tensor, k: int, members: int, sources: tuple[Tensor, int] | None
    ) -> Tensor:
        """DN2 scores of group-member ``rows`` (ids ``group * members + member``) over the bank rows outside
        their own group and, with ``sources`` (:func:`_source_table`), other than copies of their own image."""
        table, copies = sources if sources is not None else (None, 0)
        knn = self.search(rows, min(k + members + copies, self.size()))
        return knn_scores(drop_own_group(knn, ids, members, k, table))

    def threshold_draw(self, samples: int | None, members: int = 1) -> Tensor | None:
        """The training samples whose leave-one-out scores set the threshold, as sorted ids (of groups when
        ``members > 1``): ``None`` (all of them) when there are no more than ``samples``, else ``samples`` of them
        drawn with a fixed seed from the ids of every rank, so that the draw does not depend on the sharding."""
        if samples is None:
            return None
        ids = torch.cat([self.bank.sample_indices, self.bank.removed_indices]) // members
        population = torch.unique(gather_rows(ids) if self.sharded else ids)  # sorted
        if len(population) <= samples:
            return None
        draw = torch.randperm(len(population), generator=torch.Generator().manual_seed(0))[:samples]
        return population[draw.to(population.device)].sort().values

    def update_loo_scores(self, k: int, samples: int | None = None) -> None:
        """Store the training samples' leave-one-out scores at ``k`` (for thresholds), if the bank has more than k
        rows: every bank row's, and the scores against the bank of the rows that cleaning removed (every training
        row, scored as a test image would be, the kept ones leaving themselves out); only those of
        :meth:`threshold_draw`'s samples when there are more than ``samples`` (``threshold_samples``).

        A bank of group members (``group_pooling="none"``, rows ``group * M + member``, ``members_per_group`` in
        the bank's spec) scores a group by its worst member, so its threshold scores are per group too: each
        training group's largest member score, with the whole group left out (a test group's members are never
        in the bank), and, where the batches gave each member's source image (``members``), that image's copies
        in other groups too.
        """
        if self.size() > k:
            members = int(self.bank.spec.get("members_per_group") or 1)
            sources = _source_table(self.bank.spec.get("member_sources"), self.bank.embeddings.device)
            chosen = self.threshold_draw(samples, members)
            ids, scores, _ = self.leave_one_out_scores(k, members=members, sources=sources, chosen=chosen)
            removed, removed_ids = self.bank.removed, self.bank.removed_indices
            if chosen is not None:
                pick = torch.isin(removed_ids // members, chosen)
                removed, removed_ids = removed[pick], removed_ids[pick]
            if sum(count_rows(len(removed), removed.device)) if self.sharded else len(removed):
                # rows removed by cleaning are scored against the bank too: the kept half alone is the densest
                # (its leave-one-out scores flagged 25-30% of normal test images at threshold_quantile=0.99)
                if members > 1 or sources is not None:  # at the kept rows' k: one threshold, one k
                    k_out = self._outside_group_k(k, members, sources)
                    removed_scores = self._outside_group_scores(removed, removed_ids, k_out, members, sources)
                else:
                    removed_scores = knn_scores(self.search(removed, min(k, self.size())))
                if self.sharded:
                    removed_ids, removed_scores = gather_rows(removed_ids), gather_rows(removed_scores)
                ids, scores = torch.cat([ids, removed_ids]), torch.cat([scores, removed_scores])
            if members > 1:
                scores = _worst_per_group(ids, scores, members)[1]
            self.bank.set_loo_scores(scores, k, samples, drawn=chosen is not None)
        else:  # none to keep; kept as known, so that no later call (e.g. rank 0's report) asks the shards again
            self.bank.set_loo_scores(self.bank.loo_scores.new_empty(0), k, samples)

    def keep_own_shard(self) -> None:
        """A whole bank (from a checkpoint) meeting a sharded run: keep this rank's share of the rows."""
        rows = slice(rank(), None, world_size())
        # of the whole bank: still valid, unless its rows were edited since (then recomputed on first need), and
        # only where every rank holds the same ones: a rank that computed them alone (model.threshold read on rank 0
        # before the run) would skip the sharded recomputation the others enter (a collective mismatch)
        loo, loo_k = self.bank.loo_scores, int(self.bank.loo_k) if self.bank._loo_is_current() else 0
        loo_samples, loo_drawn = int(self.bank.loo_samples) or None, bool(self.bank.loo_drawn)
        if len(set(gather_objects((loo_k, loo_samples, loo_drawn, len(loo))))) > 1:
            loo_k = 0
        removed, removed_ids = self.bank.removed, self.bank.removed_indices
        self.bank.set(self.bank.embeddings[rows], self.bank.sample_indices[rows])
        if len(removed):
            self.bank.set_removed(removed[rows], removed_ids[rows])
        self.bank.set_loo_scores(loo, loo_k, loo_samples, loo_drawn)

    def whole_bank_on_cpu(self) -> tuple[Tensor, Tensor]:
        """``(sample_indices, embeddings)`` of the whole bank in host memory (one shard on the device at a time),
        for a checkpoint that loads on any number of devices."""
        ids, rows = gather_rows_to_cpu(self.bank.sample_indices), gather_rows_to_cpu(self.bank.embeddings)
        return unique_by_index(ids, rows)

    def all_removed_on_cpu(self) -> tuple[Tensor, Tensor]:
        """``(removed_indices, removed)``: the rows cleaning removed, from every shard, in host memory."""
        return gather_rows_to_cpu(self.bank.removed_indices), gather_rows_to_cpu(self.bank.removed)


def _worst_per_group(ids: Tensor, scores: Tensor, members: int) -> tuple[Tensor, Tensor]:
    """Group-member rows (ids ``group * members + member``) to groups: ``(group of each row, the largest score of
    each group)``, groups in id order."""
    group_of_row = torch.unique(ids // members, return_inverse=True)[1]
    worst = scores.new_full((int(group_of_row.max()) + 1,), float("-inf"))
    return group_of_row, worst.scatter_reduce(0, group_of_row, scores, "amax")


def _source_table(member_sources: list[int] | None, device: torch.device) -> tuple[Tensor, int] | None:
    """Row id -> source image (-1 unknown) as a tensor, with the most copies of one image beyond itself (how much
    deeper a search must go to skip them); ``None`` when no source is known."""
    table = torch.tensor(member_sources or [], dtype=torch.long, device=device)
    known = table[table >= 0]
    return (table, int(torch.bincount(known).max()) - 1) if len(known) else None

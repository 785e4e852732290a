"""The memory bank: training embeddings kept as checkpointed buffers, and the collector that fills it."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dn2_lightning.knn import PreparedBank, prepare_bank


class MemoryBank(nn.Module):
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
    loo_scores: Tensor
    loo_k: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("embeddings", torch.empty(0, 0))
        self.register_buffer("sample_indices", torch.empty(0, dtype=torch.long))
        # sorted leave-one-out DN2 scores of the whole bank at k = loo_k (0: not computed yet)
        self.register_buffer("loo_scores", torch.empty(0))
        self.register_buffer("loo_k", torch.tensor(0))
        self.spec: dict[str, Any] = {}
        self._prepared: tuple[tuple, PreparedBank] | None = None

    @property
    def is_fitted(self) -> bool:
        return self.embeddings.shape[0] > 0

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def prepared(self) -> PreparedBank:
        """The bank centred for search, computed once per bank content and device."""
        e = self.embeddings
        key = (e.data_ptr(), e.device, tuple(e.shape), e._version)
        if self._prepared is None or self._prepared[0] != key:
            self._prepared = (key, prepare_bank(e))
        return self._prepared[1]

    def set(self, embeddings: Tensor, sample_indices: Tensor) -> None:
        """Replace the bank. Copies out of inference mode so later fits and loads may update it."""
        if embeddings.ndim != 2 or embeddings.shape[0] != sample_indices.shape[0]:
            raise ValueError(
                f"bank embeddings {tuple(embeddings.shape)} and sample_indices {tuple(sample_indices.shape)} "
                "do not match."
            )
        with torch.inference_mode(False):
            self.embeddings = embeddings.detach().to(torch.float32).clone()
            self.sample_indices = sample_indices.detach().to(torch.long).clone()
            self.set_loo_scores(self.loo_scores.new_empty(0), 0)

    def set_loo_scores(self, scores: Tensor, k: int) -> None:
        """Keep the whole bank's leave-one-out scores at ``k`` (sorted) for thresholds and normalised scores."""
        with torch.inference_mode(False):
            self.loo_scores = scores.detach().to(torch.float32).sort().values.clone()
            self.loo_k = torch.tensor(int(k), device=self.loo_k.device)

    def reset(self) -> None:
        self.set(self.embeddings.new_empty(0, 0), self.sample_indices.new_empty(0))

    def get_extra_state(self) -> dict[str, Any]:
        return dict(self.spec)

    def set_extra_state(self, state: Any) -> None:
        self.spec = dict(state) if isinstance(state, dict) else {}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        embeddings, ids = state_dict.get(prefix + "embeddings"), state_dict.get(prefix + "sample_indices")
        if embeddings is not None and (embeddings.ndim != 2 or ids is None or ids.shape != embeddings.shape[:1]):
            raise ValueError(
                f"the checkpoint's memory bank is inconsistent: {prefix}embeddings has shape "
                f"{tuple(embeddings.shape)} but {prefix}sample_indices has "
                f"{None if ids is None else tuple(ids.shape)}; expected [N, D] and [N]. The file is damaged "
                "or was edited: rebuild the bank with fit."
            )
        # checkpoints written before these entries existed: recomputed on first need
        state_dict.setdefault(prefix + "loo_scores", torch.empty(0))
        state_dict.setdefault(prefix + "loo_k", torch.tensor(0))
        state_dict.setdefault(prefix + "_extra_state", {})
        # resize before nn.Module copies in place, so any saved bank size loads strictly
        for name in ("embeddings", "sample_indices", "loo_scores"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                current = getattr(self, name)
                setattr(self, name, torch.empty_like(saved, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class BankCollector:
    """Accumulates (embedding, dataset index, label) batches during one pass over the train data."""

    def __init__(self) -> None:
        self._embeddings: list[Tensor] = []
        self._indices: list[Tensor] = []
        self._labels: list[Tensor] = []
        self.paths: dict[int, str] = {}  # dataset index -> file, when batches carry paths
        self.num_batches = 0

    def __len__(self) -> int:
        return sum(len(i) for i in self._indices)

    def add(self, embeddings: Tensor, indices: Tensor, labels: Tensor, paths: list[str] | None = None) -> None:
        self._embeddings.append(embeddings.detach())
        self._indices.append(indices.detach().long())
        self._labels.append(labels.detach().long())
        if paths is not None and len(paths) == len(indices):
            self.paths.update(zip(indices.tolist(), paths, strict=True))
        self.num_batches += 1

    def collect(self) -> tuple[Tensor, Tensor, Tensor]:
        """Concatenated ``(embeddings [N, D], indices [N], labels [N])``."""
        if not self._embeddings:
            raise RuntimeError("no training batches were seen; the train dataloader is empty.")
        return torch.cat(self._embeddings), torch.cat(self._indices), torch.cat(self._labels)

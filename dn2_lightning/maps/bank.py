"""The patch bank: every training image's patch features, as checkpointed buffers, and its memory checks."""

from __future__ import annotations

from typing import Any

import psutil
import torch
from torch import Tensor

from dn2_lightning.bank import BankModule, as_buffer
from dn2_lightning.knn import PreparedBank, ensure_fits, float64_mean, squared_norms


class PatchBank(BankModule):
    """Patch features ``[N, P, C]`` of ``N`` training images (``P = h * w`` positions), centred on their
    mean ``center [C]`` (distances are unchanged and the search needs no centred copy), with the dataset
    index of each image, sorted.

    >>> bank = PatchBank()
    >>> bank.set(torch.ones(2, 3, 4, 5), torch.tensor([7, 3]))
    >>> bank.is_fitted, tuple(bank.patches.shape), bank.grid, bank.sample_indices.tolist()
    (True, (2, 20, 3), (4, 5), [3, 7])
    """

    patches: Tensor
    center: Tensor
    sample_indices: Tensor
    grid_size: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("patches", torch.empty(0, 0, 0))
        self.register_buffer("center", torch.empty(0))
        self.register_buffer("sample_indices", torch.empty(0, dtype=torch.long))
        self.register_buffer("grid_size", torch.zeros(2, dtype=torch.long))
        self._prepared: tuple[tuple, PreparedBank] | None = None

    @property
    def is_fitted(self) -> bool:
        return self.patches.shape[0] > 0

    def __len__(self) -> int:
        return self.patches.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        """``(h, w)`` of the feature maps."""
        return int(self.grid_size[0]), int(self.grid_size[1])

    def set(self, patches: Tensor, sample_indices: Tensor) -> None:
        """Replace the bank with ``patches [N, C, h, w]`` of the images ``sample_indices [N]``."""
        if patches.ndim != 4 or patches.shape[0] != sample_indices.shape[0]:
            raise ValueError(
                f"patches {tuple(patches.shape)} must be [N, C, h, w] with N = len(sample_indices) "
                f"({sample_indices.shape[0]})."
            )
        n, c, h, w = patches.shape
        order = torch.argsort(sample_indices)
        with torch.inference_mode(False), torch.no_grad():
            rows = patches[order].to(torch.float32).permute(0, 2, 3, 1).reshape(n, h * w, c).contiguous()  # a copy
            center = float64_mean(rows.view(-1, c)).to(torch.float32)
            self.patches = rows.sub_(center)  # centred in place: the patch bank is held once
            self.center = center
            self.sample_indices = sample_indices[order].detach().long().clone()
            self.grid_size = torch.tensor([h, w], dtype=torch.long, device=patches.device)
        self._prepared = None

    def rows_of(self, sample_indices: Tensor) -> Tensor:
        """Bank rows of dataset indices (any shape). Raises ValueError for indices not in the bank."""
        rows = torch.searchsorted(self.sample_indices, sample_indices.contiguous()).clamp_max(len(self) - 1)
        if not torch.equal(self.sample_indices[rows], sample_indices):
            missing = sample_indices[self.sample_indices[rows] != sample_indices].unique()[:10].tolist()
            raise ValueError(
                f"training images {missing} are in the image memory bank but not in the patch bank: the checkpoint "
                "was saved without anomaly maps; rebuild it with anomaly_maps=True."
            )
        return rows

    def flat(self) -> PreparedBank:
        """All positions as one search-ready bank ``[N * P, C]`` (no copy: rows are already centred)."""
        p = self.patches
        key = (p.data_ptr(), p.device, tuple(p.shape), p._version)
        if self._prepared is None or self._prepared[0] != key:
            # float32 rows, whatever the bank was cast to (``model.double()``, ``Trainer(precision="64-true")``): set
            # makes them float32, so the cast back is exact, and they serve as the search's float32 candidates too
            rows = p.view(-1, p.shape[-1]).to(torch.float32)
            norms = squared_norms(rows)
            center = torch.zeros(p.shape[-1], device=p.device)
            bank = PreparedBank(center, rows, norms, rows, float(norms.max().sqrt()), source=rows)
            self._prepared = (key, bank)
        return self._prepared[1]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # take the saved tensors themselves (any size loads strictly; nn.Module's copy is then a no-op)
        for name in ("patches", "center", "sample_indices", "grid_size"):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor):
                current = getattr(self, name)
                setattr(self, name, as_buffer(saved, current.dtype, current.device, copy=False))
        self._prepared = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def ensure_room(nbytes: int, device: torch.device, what: str) -> None:
    """Fail before any work when ``device`` cannot hold ``nbytes`` more: free CUDA memory, or the host's
    available memory (:func:`_host_available_bytes`) for the CPU. The message gives the size needed and the fixes."""
    fixes = (
        "Use patch_bank='nearest_images', a smaller model.input_size (the patch grid is input_size / 4 squared), "
        "fewer map_layers, or fewer training images."
    )
    if device.type == "cuda":
        try:
            ensure_fits(nbytes, device, what)
        except MemoryError as err:
            raise MemoryError(f"{err} {fixes}") from None
        return
    available = _host_available_bytes()
    if nbytes > available:
        raise MemoryError(
            f"{what} needs {nbytes / 2**30:.2f} GiB of host memory but only {available / 2**30:.2f} GiB are "
            f"available. {fixes}"
        )


def _host_available_bytes() -> int:
    """The host memory still available without swapping (Linux ``MemAvailable``; macOS and Windows alike)."""
    return psutil.virtual_memory().available
